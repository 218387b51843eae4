"""AttentionLayout: dense masks of every constructor against masks built independently from the rules."""

import pickle
import random

import numpy as np
import pytest
import torch
from attention_helpers import (
    mask_from_backward_view,
    mask_from_ranges,
    mask_from_splits,
    mask_from_splits_vectorised,
    mask_varlen,
    order_keeping_causal,
    permute_mask,
    random_splits,
)

from unigendet.ops.layout import AttentionLayout

HAND_SPLITS = [
    [],
    [[]],
    [[(5, "full")]],
    [[(5, "causal")]],
    [[(3, "full"), (2, "causal"), (2, "noise")], [(0, "full"), (2, "causal")]],
    # noise split in the middle: later splits must not see it
    [[(2, "causal"), (3, "noise"), (2, "full"), (1, "causal")]],
    # two noise splits
    [[(2, "noise"), (1, "causal"), (3, "noise"), (2, "causal")]],
    # empty splits everywhere, empty samples
    [[(0, "full")], [], [(0, "causal"), (1, "full"), (0, "noise")], [(0, "causal")]],
    # single-token splits
    [[(1, "causal"), (1, "full"), (1, "noise"), (1, "causal"), (1, "full")]],
    # detection sample (VAE, ViT, question, answer) followed by a T2I sample (caption, noisy latents)
    [[(4, "full"), (5, "full"), (3, "causal"), (4, "causal")], [(3, "causal"), (6, "noise")]],
]


def check_plan_invariants(layout: AttentionLayout, normalised: bool = True):
    p = layout.plan_cpu
    for name in ("q_ranges", "kv_ptr", "kv_entries", "k_segments", "q_ptr", "q_entries"):
        t = getattr(p, name)
        assert t.dtype == torch.int32 and t.is_contiguous(), name
    qr, ptr, ents = p.q_ranges.tolist(), p.kv_ptr.tolist(), p.kv_entries.tolist()
    assert ptr[0] == 0 and ptr[-1] == len(ents) and len(ptr) == len(qr) + 1
    assert all(a <= b for a, b in zip(ptr[:-1], ptr[1:]))
    for (_, a1), (b0, _) in zip(qr[:-1], qr[1:]):
        assert a1 <= b0, "query ranges must be disjoint and sorted"
    max_q = 0
    for r, (qs, qe) in enumerate(qr):
        assert 0 <= qs <= qe <= p.total_q
        max_q = max(max_q, qe - qs)
        mine = ents[ptr[r]:ptr[r + 1]]
        keys = [(f >> 1, k0, k1) for k0, k1, _, f in mine]
        assert keys == sorted(keys), "entries of one range must be sorted by (src, k_start)"
        for (s0, _, e0), (s1, b0, _) in zip(keys[:-1], keys[1:]):
            assert s0 != s1 or e0 <= b0, "entries of one range overlap"
        for k0, k1, _, f in mine:
            assert 0 <= k0 <= k1 <= p.total_k[f >> 1] and (f >> 1) < p.num_sources
            if normalised:
                assert k1 > k0
    assert p.max_q_len >= max_q
    segs = p.k_segments.tolist()
    if segs:
        assert p.max_k_len >= max(k1 - k0 for _, k0, k1 in segs)
    if normalised:
        assert p.max_q_len == max_q
        # each segment lies inside exactly one entry of each range that sees any of it
        qptr, qents = p.q_ptr.tolist(), p.q_entries.tolist()
        for i, (src, s0, s1) in enumerate(segs):
            for qs, qe, _, _ in qents[qptr[i]:qptr[i + 1]]:
                r = qr.index([qs, qe])
                inside = [e for e in ents[ptr[r]:ptr[r + 1]] if e[3] >> 1 == src and e[0] <= s0 and s1 <= e[1]]
                assert len(inside) == 1


def check_layout(layout: AttentionLayout, masks, normalised: bool = True):
    check_plan_invariants(layout, normalised)
    for src, m in enumerate(masks):
        assert torch.equal(layout.dense_mask(src), m), f"forward view, src {src}"
        assert torch.equal(mask_from_backward_view(layout.plan_cpu, src), m), f"backward view, src {src}"


@pytest.mark.parametrize("samples", HAND_SPLITS)
def test_from_splits_hand_written(samples):
    check_layout(AttentionLayout.from_splits(samples), [mask_from_splits(samples)])


def test_from_splits_random():
    rng = random.Random(1234)
    for _ in range(150):
        samples = random_splits(rng)
        check_layout(AttentionLayout.from_splits(samples), [mask_from_splits(samples)])


def test_vectorised_mask_helper_agrees_with_double_loop():
    rng = random.Random(5)
    for samples in HAND_SPLITS + [random_splits(rng) for _ in range(30)]:
        assert torch.equal(mask_from_splits_vectorised(samples), mask_from_splits(samples))


def test_from_splits_order_random():
    rng = random.Random(99)
    for i in range(80):
        samples = random_splits(rng)
        order = order_keeping_causal(rng, samples)
        as_input = [order, np.array(order, dtype=np.int64), torch.tensor(order, dtype=torch.int32)][i % 3]
        layout = AttentionLayout.from_splits(samples, order=as_input)
        check_layout(layout, [permute_mask(mask_from_splits(samples), order)])


def test_from_splits_order_expert_grouping():
    # keep the "und" tokens (text, ViT) first and the "gen" tokens (VAE latents) last, as a MoT pack would
    samples = [[(4, "full"), (5, "full"), (3, "causal"), (2, "causal")], [(3, "causal"), (6, "noise")]]
    gen = list(range(0, 4)) + list(range(17, 23))
    und = [t for t in range(23) if t not in gen]
    order = und + gen
    layout = AttentionLayout.from_splits(samples, order=order)
    check_layout(layout, [permute_mask(mask_from_splits(samples), order)])


def test_normalised_plan_is_compact():
    # prefix + causal text merge into one causal entry; the noise split at the end removes nothing
    layout = AttentionLayout.from_splits([[(4, "full"), (3, "causal"), (2, "noise")]])
    p = layout.plan_cpu
    assert p.q_ranges.tolist() == [[0, 4], [4, 7], [7, 9]]
    assert p.kv_entries.tolist() == [[0, 4, 0, 0], [0, 7, 0, 1], [0, 9, 0, 0]]
    assert p.k_segments.tolist() == [[0, 0, 4], [0, 4, 7], [0, 7, 9]]
    # keys 0-3 are seen fully by every range; keys 4-6 causally by the text and fully by the noise split
    assert p.q_entries.tolist() == [[0, 4, 0, 0], [4, 7, 0, 0], [7, 9, 0, 0],
                                    [4, 7, 0, 1], [7, 9, 0, 0], [7, 9, 0, 0]]


def test_adjacent_ranges_with_compatible_entries_merge():
    # a question and its answer (two causal splits) are one query range with one causal entry; two
    # consecutive full splits of different samples stay apart
    layout = AttentionLayout.from_splits([[(4, "full"), (3, "causal"), (5, "causal")], [(2, "full")]])
    p = layout.plan_cpu
    assert p.q_ranges.tolist() == [[0, 4], [4, 12], [12, 14]]
    assert p.kv_entries.tolist() == [[0, 4, 0, 0], [0, 12, 0, 1], [12, 14, 0, 0]]
    check_layout(layout, [mask_from_splits([[(4, "full"), (3, "causal"), (5, "causal")], [(2, "full")]])])


def test_order_breaking_causal_split_raises():
    samples = [[(3, "causal"), (2, "full")]]
    with pytest.raises(ValueError, match="order"):
        AttentionLayout.from_splits(samples, order=[0, 3, 1, 2, 4])  # split 0 not contiguous
    with pytest.raises(ValueError, match="order"):
        AttentionLayout.from_splits(samples, order=[1, 0, 2, 3, 4])  # split 0 not increasing
    with pytest.raises(ValueError, match="order"):
        AttentionLayout.from_splits(samples, order=[0, 1, 2, 3])  # not a permutation
    with pytest.raises(ValueError, match="order"):
        AttentionLayout.from_splits(samples, order=[0, 1, 2, 3, 3])


@pytest.mark.parametrize(
    "samples, match",
    [
        ([[(-1, "full")]], "length"),
        ([[(2, "bidirectional")]], "mode"),
        ([[(2.0, "full")]], "length"),
        ([[(2, "full", 1)]], r"samples\[0\]\[0\]"),
        ([(2, "full")], r"samples\[0\]"),
        ("full", "samples"),
    ],
)
def test_from_splits_validation(samples, match):
    with pytest.raises(ValueError, match=match):
        AttentionLayout.from_splits(samples)


def _random_ranges(rng: random.Random, num_sources: int):
    total_q = rng.randint(0, 12)
    total_k = tuple(rng.randint(0, 12) for _ in range(num_sources))
    entries = []
    for _ in range(rng.randint(0, 4)):
        qs = rng.randint(0, total_q)
        qe = rng.randint(qs, total_q)
        kl = []
        for _ in range(rng.randint(0, 3)):
            src = rng.randrange(num_sources)
            k0 = rng.randint(0, total_k[src])
            k1 = rng.randint(k0, total_k[src])
            kl.append((k0, k1, rng.random() < 0.5, src))
        entries.append((qs, qe, kl))
    return entries, total_q, total_k


def test_from_ranges_random_overlapping():
    rng = random.Random(7)
    for i in range(150):
        n = 1 + i % 3
        entries, total_q, total_k = _random_ranges(rng, n)
        layout = AttentionLayout.from_ranges(entries, total_q, total_k, num_sources=n)
        check_layout(layout, mask_from_ranges(entries, total_q, total_k))


def test_from_ranges_causal_bottom_right():
    # more queries than keys: the first queries see nothing, the last sees everything
    entries = [(0, 5, [(0, 2, True, 0)]), (5, 7, [(2, 6, True, 0)])]
    layout = AttentionLayout.from_ranges(entries, 7, 6)
    m = layout.dense_mask()
    assert m[:3].sum() == 0 and m[3].tolist()[:2] == [True, False] and m[4].tolist()[:2] == [True, True]
    check_layout(layout, mask_from_ranges(entries, 7, (6,)))


@pytest.mark.parametrize(
    "args, match",
    [
        (([(0, 5, [])], 4), "query range"),
        (([(2, 1, [])], 4), "query range"),
        (([(0, 2, [(0, 5, False, 0)])], 4, 4), "key range"),
        (([(0, 2, [(0, 1, False, 1)])], 4, 4), "src"),
        (([(0, 2)], 4), r"entries\[0\]"),
        (([(0, 2, [(0, 1)])], 4), r"entries\[0\]\[2\]\[0\]"),
        (([], 4, None, 2), "total_k"),
        (([], 4, (4,), 2), "total_k"),
        (([], 4, None, 0), "num_sources"),
        (([], -1), "total_q"),
    ],
)
def test_from_ranges_validation(args, match):
    with pytest.raises(ValueError, match=match):
        AttentionLayout.from_ranges(*args)


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_layout(causal):
    cu_q = torch.tensor([0, 1, 1, 18, 21, 26], dtype=torch.int32)
    cu_k = torch.tensor([0, 3, 5, 22, 22, 24], dtype=torch.int32)  # empty sample, empty keys, Lq > Lk
    layout = AttentionLayout.varlen(cu_q, cu_k, causal)
    assert layout.plan.max_q_len == 17 and layout.plan.max_k_len == 17
    check_layout(layout, [mask_varlen(cu_q.tolist(), cu_k.tolist(), causal)], normalised=False)
    # the explicit host totals give the same plan
    same = AttentionLayout.varlen(cu_q, cu_k, causal, total_q=26, total_k=24, max_seqlen_q=17, max_seqlen_k=17)
    for a, b in zip(layout.plan.tensors(), same.plan.tensors()):
        assert torch.equal(a, b)


def test_smsa_layout():
    cu_q = torch.tensor([0, 2, 2, 5], dtype=torch.int32)
    cu = [torch.tensor([0, 1, 3, 3], dtype=torch.int32), None, torch.tensor([0, 0, 4, 6], dtype=torch.int32)]
    layout = AttentionLayout.smsa(cu_q, cu)
    p = layout.plan_cpu
    assert p.num_sources == 3 and p.total_k == (3, 0, 6) and p.total_q == 5
    masks = []
    for c in cu:
        if c is None:
            masks.append(torch.zeros(5, 0, dtype=torch.bool))
        else:
            masks.append(mask_varlen(cu_q.tolist(), c.tolist(), False))
    check_layout(layout, masks, normalised=False)
    # entries of one range are sorted by source
    for r in range(3):
        srcs = [f >> 1 for *_, f in p.kv_entries[p.kv_ptr[r]:p.kv_ptr[r + 1]].tolist()]
        assert srcs == sorted(srcs)


def test_layout_validation_cu_seqlens():
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        AttentionLayout.varlen(torch.tensor([0, 2]), torch.tensor([0, 2], dtype=torch.int32), False)
    with pytest.raises(ValueError, match="cu_seqlens_q and cu_seqlens_k"):
        AttentionLayout.varlen(torch.tensor([0, 2], dtype=torch.int32), torch.tensor([0, 2, 3], dtype=torch.int32),
                               False)
    with pytest.raises(ValueError, match="cu_seqlens_det"):
        AttentionLayout.smsa(torch.tensor([0, 2], dtype=torch.int32),
                             [None, torch.tensor([0, 1, 2], dtype=torch.int32), None])
    with pytest.raises(ValueError, match="src"):
        AttentionLayout.from_splits([[(2, "full")]]).dense_mask(1)


def test_to_and_plan_cpu():
    layout = AttentionLayout.from_splits([[(3, "full"), (2, "causal")]])
    moved = layout.to("cpu")
    assert moved.plan_cpu is layout.plan_cpu and moved.device.type == "cpu"
    assert layout.total_q == 5 and layout.total_k == (5,) and layout.num_sources == 1
    assert "KernelPlan" in repr(layout)
    with pytest.raises(AttributeError):
        layout.plan = None  # frozen: safe to share between layers and threads


def test_pickle_round_trip():
    # layouts are built in data-loader workers and sent to the main process
    layout = AttentionLayout.from_splits([[(3, "full"), (2, "causal")], [(4, "noise")]])
    back = pickle.loads(pickle.dumps(layout))
    assert torch.equal(back.dense_mask(), layout.dense_mask())
    assert back.plan.max_q_len == layout.plan.max_q_len and back.total_k == layout.total_k


@pytest.mark.gpu
def test_layout_to_cuda_keeps_host_copy():
    layout = AttentionLayout.from_splits([[(3, "full"), (2, "causal")]], device="cuda")
    assert layout.plan.q_ranges.is_cuda and not layout.plan_cpu.q_ranges.is_cuda
    assert torch.equal(layout.plan.kv_entries.cpu(), layout.plan_cpu.kv_entries)
    v = AttentionLayout.varlen(torch.tensor([0, 3], dtype=torch.int32, device="cuda"),
                               torch.tensor([0, 3], dtype=torch.int32, device="cuda"), True)
    assert v.plan.q_ranges.is_cuda and torch.equal(v.dense_mask(), mask_varlen([0, 3], [0, 3], True))
    pinned = AttentionLayout.from_splits([[(3, "full"), (2, "causal")]]).pin_memory()
    assert pinned.plan.q_ranges.is_pinned()
    moved = pinned.to("cuda", non_blocking=True)
    assert torch.equal(moved.plan.kv_entries.cpu(), pinned.plan_cpu.kv_entries)
