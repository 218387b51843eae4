"""Triton packed-attention kernels against a dense fp64 reference.

CPU cases (``interpret``) run the kernels in the Triton interpreter with tiny shapes, fp32 and fp16 only
(the interpreter cannot multiply bf16). GPU cases (``gpu``) add bf16, large packs and repeated-run
determinism. Pass rule: ``max|ours - ref64| <= 2x (outputs) / 3x (gradients) max|torch - ref64|`` plus the
representational noise floor, where ``torch`` is the same dense computation in the input precision.
"""

from __future__ import annotations

import random

import pytest
import torch
from attention_helpers import (
    assert_within,
    dense_attention,
    mask_from_ranges,
    mask_from_splits,
    mask_from_splits_vectorised,
    mask_varlen,
    order_keeping_causal,
    permute_mask,
    random_splits,
)

from unigendet.ops.layout import AttentionLayout

interpret = pytest.mark.interpret
gpu = pytest.mark.gpu


def _triton():
    from unigendet.ops import attention_triton

    return attention_triton


def _cu(lengths) -> torch.Tensor:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32)


def _rand(shape, dtype, device, scale=1.0):
    return (torch.randn(shape, dtype=torch.float32, device=device) * scale).to(dtype)


def _nan_guarded(t: torch.Tensor, pad: int = 40) -> torch.Tensor:
    """A contiguous copy of ``t`` living inside a larger NaN-filled buffer (rows before and after)."""
    buf = torch.full((t.shape[0] + 2 * pad, *t.shape[1:]), float("nan"), dtype=t.dtype, device=t.device)
    view = buf[pad:pad + t.shape[0]]
    view.copy_(t)
    assert view.is_contiguous()
    return view


def _check_case(q, ks, vs, masks, plan, dtype, *, scale=None, floor=None, deterministic=True):
    """Run fwd + bwd of the Triton launchers and compare with the dense fp64 reference.

    ``ks``/``vs``/``masks`` list the sources of the plan (None for an absent source); ``deterministic=False``
    runs the backward whose dK/dV kernel accumulates dQ with atomics.
    """
    at = _triton()
    d = q.shape[-1]
    scale = d**-0.5 if scale is None else scale
    present = [i for i, k in enumerate(ks) if k is not None]
    # The kernels see NaN-guarded views: any read outside a tensor would poison the results.
    gk = [None if k is None else _nan_guarded(k) for k in ks]
    gv = [None if v is None else _nan_guarded(v) for v in vs]
    out, lse = at.packed_attention_fwd_triton(_nan_guarded(q), gk, gv, plan, scale)
    dout = _rand(q.shape, dtype, q.device)
    dq, dks, dvs = at.packed_attention_bwd_triton(_nan_guarded(dout), _nan_guarded(q), gk, gv, _nan_guarded(out),
                                                  lse, plan, scale, deterministic=deterministic)

    def run_dense(prec):
        leaves = [t.detach().to(prec).requires_grad_() for t in [q, *(ks[i] for i in present),
                                                                  *(vs[i] for i in present)]]
        n = len(present)
        o, lse_ = dense_attention(leaves[0], leaves[1:1 + n], leaves[1 + n:], [masks[i] for i in present],
                                  scale=scale, dtype=prec)
        o.backward(dout.to(prec))
        return o.detach(), lse_.detach(), [t.grad for t in leaves]

    ref_o, ref_lse, ref_g = run_dense(torch.float64)
    pt_o, pt_lse, pt_g = run_dense(dtype)
    if floor is None:
        # fp32: a few ulps of accumulation-order noise (larger on GPU, whose exp2 is approximate).
        floor = (1e-6 if q.device.type == "cpu" else 1e-5) if dtype == torch.float32 else 1e-4
    fl = floor
    assert_within("out", out, ref_o, pt_o, 2, dtype, fl)
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (q.shape[1], q.shape[0])
    # Empty rows: -inf in both; finite rows compared under the rule.
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "lse: -inf rows differ from the reference"
    assert_within("lse", lse, ref_lse, pt_lse.float(), 2, torch.float32, fl)
    got_g = [dq, *(dks[i] for i in present), *(dvs[i] for i in present)]
    names = ["dq", *(f"dk{i}" for i in present), *(f"dv{i}" for i in present)]
    for name, g, r, p in zip(names, got_g, ref_g, pt_g):
        assert g.dtype == dtype and g.shape == r.shape, name
        assert torch.isfinite(g).all(), f"{name}: non-finite values"
        assert_within(name, g, r, p, 3, dtype, fl)
    for i, k in enumerate(ks):
        if k is None:
            assert dks[i] is None and dvs[i] is None
    return out, lse, dq, dks, dvs


# --------------------------------------------------------------------------------------------------
# Interpreter (CPU) cases
# --------------------------------------------------------------------------------------------------

VARLEN_CASES = [
    # dtype, causal, H, Hkv, D, q lengths, k lengths
    (torch.float32, False, 4, 1, 64, [1, 17, 40], [1, 17, 40]),
    (torch.float16, True, 7, 1, 72, [17, 5, 0], [40, 5, 3]),  # Nk > Nq (bottom-right), an empty query segment
    (torch.float32, True, 2, 2, 64, [30, 3, 4], [10, 0, 4]),  # Nq > Nk: fully masked rows; an empty key segment
    (torch.float16, False, 4, 4, 128, [130], [20]),
    (torch.float32, True, 4, 1, 72, [97, 33], [97, 33]),
]


BWD = pytest.mark.parametrize("deterministic", [True, False], ids=["split-dq", "atomic-dq"])


@interpret
@BWD
@pytest.mark.parametrize("case", VARLEN_CASES, ids=lambda c: f"{str(c[0])[6:]}-c{int(c[1])}-{c[2]}x{c[3]}-d{c[4]}")
def test_varlen(case, deterministic):
    dtype, causal, h, hkv, d, lq, lk = case
    cu_q, cu_k = _cu(lq), _cu(lk)
    layout = AttentionLayout.varlen(cu_q, cu_k, causal)
    q = _rand((sum(lq), h, d), dtype, "cpu")
    k = _rand((sum(lk), hkv, d), dtype, "cpu")
    v = _rand((sum(lk), hkv, d), dtype, "cpu")
    _check_case(q, [k], [v], [mask_varlen(cu_q, cu_k, causal)], layout.plan, dtype, deterministic=deterministic)


@interpret
@pytest.mark.parametrize("d", [32, 40, 48, 80, 96, 112])
def test_other_head_dims(d):
    """Every declared head dim (padded ones masked on the d axis), on a tiny causal varlen batch."""
    dtype = torch.float32
    lq, lk = [9, 20], [12, 20]
    cu_q, cu_k = _cu(lq), _cu(lk)
    layout = AttentionLayout.varlen(cu_q, cu_k, True)
    q = _rand((sum(lq), 2, d), dtype, "cpu")
    k = _rand((sum(lk), 1, d), dtype, "cpu")
    v = _rand((sum(lk), 1, d), dtype, "cpu")
    _check_case(q, [k], [v], [mask_varlen(cu_q, cu_k, True)], layout.plan, dtype)


BAGEL_SAMPLES = [
    [(6, "causal"), (20, "full"), (13, "noise"), (3, "causal")],
    [(9, "causal"), (0, "full"), (17, "noise"), (1, "causal"), (5, "full")],
]


@interpret
@BWD
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_bagel_packed_layout(dtype, deterministic):
    layout = AttentionLayout.from_splits(BAGEL_SAMPLES)
    total = sum(n for s in BAGEL_SAMPLES for n, _ in s)
    q = _rand((total, 4, 64), dtype, "cpu")
    k = _rand((total, 1, 64), dtype, "cpu")
    v = _rand((total, 1, 64), dtype, "cpu")
    _check_case(q, [k], [v], [mask_from_splits(BAGEL_SAMPLES)], layout.plan, dtype, deterministic=deterministic)


@interpret
def test_bagel_packed_layout_reordered():
    """Tokens regrouped (e.g. per expert): the layout is expressed in the new order."""
    samples = [[(5, "causal"), (6, "full"), (4, "noise")], [(3, "causal"), (5, "noise"), (2, "causal")]]
    order = order_keeping_causal(random.Random(3), samples)
    layout = AttentionLayout.from_splits(samples, order=order)
    total = len(order)
    dtype = torch.float32
    q = _rand((total, 2, 64), dtype, "cpu")
    k = _rand((total, 2, 64), dtype, "cpu")
    v = _rand((total, 2, 64), dtype, "cpu")
    mask = permute_mask(mask_from_splits(samples), order)
    _check_case(q, [k], [v], [mask], layout.plan, dtype)


@interpret
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_split_layouts(seed):
    """Random BAGEL layouts (empty and single-token splits, all modes), optionally reordered."""
    rng = random.Random(seed)
    samples = random_splits(rng, max_samples=3, max_splits=4, max_len=23)
    total = sum(n for s in samples for n, _ in s)
    if total == 0:
        samples, total = [[(3, "causal")]], 3
    order = order_keeping_causal(rng, samples) if seed == 2 else None
    layout = AttentionLayout.from_splits(samples, order=order)
    mask = mask_from_splits(samples)
    if order is not None:
        mask = permute_mask(mask, order)
    dtype = torch.float32 if seed % 2 == 0 else torch.float16
    q = _rand((total, 4, 64), dtype, "cpu")
    k = _rand((total, 2, 64), dtype, "cpu")
    v = _rand((total, 2, 64), dtype, "cpu")
    _check_case(q, [k], [v], [mask], layout.plan, dtype, deterministic=seed != 1)


@interpret
@BWD
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("absent", ["none", "empty"])
def test_smsa_three_sources(dtype, absent, deterministic):
    """Detection queries over generative, detection and text K/V kept in three tensors; text absent/empty."""
    lq, lgen, ldet = [19, 1, 6], [17, 0, 9], [19, 1, 6]
    cu_q, cu_gen, cu_det = _cu(lq), _cu(lgen), _cu(ldet)
    h, hkv, d = 7, 1, 72
    q = _rand((sum(lq), h, d), dtype, "cpu")
    ks = [_rand((sum(lgen), hkv, d), dtype, "cpu"), _rand((sum(ldet), hkv, d), dtype, "cpu")]
    vs = [_rand((sum(lgen), hkv, d), dtype, "cpu"), _rand((sum(ldet), hkv, d), dtype, "cpu")]
    masks = [mask_varlen(cu_q, cu_gen, False), mask_varlen(cu_q, cu_det, False)]
    if absent == "none":
        layout = AttentionLayout.smsa(cu_q, [cu_gen, cu_det, None])
        ks.append(None)
        vs.append(None)
        masks.append(None)
    else:
        cu_txt = _cu([0, 0, 0])
        layout = AttentionLayout.smsa(cu_q, [cu_gen, cu_det, cu_txt])
        ks.append(_rand((0, hkv, d), dtype, "cpu"))
        vs.append(_rand((0, hkv, d), dtype, "cpu"))
        masks.append(mask_varlen(cu_q, cu_txt, False))
    _check_case(q, ks, vs, masks, layout.plan, dtype, deterministic=deterministic)


@interpret
def test_smsa_gen_source_off():
    """The "off" ablation: the generative source is absent, the other two remain."""
    lq, ldet, ltxt = [12, 5], [12, 5], [4, 7]
    cu_q, cu_det, cu_txt = _cu(lq), _cu(ldet), _cu(ltxt)
    dtype, h, hkv, d = torch.float32, 4, 2, 64
    layout = AttentionLayout.smsa(cu_q, [None, cu_det, cu_txt])
    q = _rand((sum(lq), h, d), dtype, "cpu")
    ks = [None, _rand((sum(ldet), hkv, d), dtype, "cpu"), _rand((sum(ltxt), hkv, d), dtype, "cpu")]
    vs = [None, _rand((sum(ldet), hkv, d), dtype, "cpu"), _rand((sum(ltxt), hkv, d), dtype, "cpu")]
    masks = [None, mask_varlen(cu_q, cu_det, False), mask_varlen(cu_q, cu_txt, False)]
    _check_case(q, ks, vs, masks, layout.plan, dtype)


@interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_explicit_ranges_with_masked_rows(dtype):
    """Several causal entries with different diagonals, two sources, and queries in no range (masked rows)."""
    entries = [
        (0, 20, [(0, 25, True, 0), (3, 9, False, 1)]),    # causal with Nk > Nq, plus a second source
        (20, 23, [(30, 34, True, 0)]),                     # tiny causal block
        (26, 45, [(25, 31, False, 0), (40, 50, True, 0), (0, 12, True, 1)]),
        # queries 23..25 and 45..47 are in no range: out 0, lse -inf, dq 0
    ]
    total_q, total_k = 48, (50, 12)
    layout = AttentionLayout.from_ranges(entries, total_q, total_k, num_sources=2)
    masks = mask_from_ranges(entries, total_q, total_k)
    h, hkv, d = 4, 1, 64
    q = _rand((total_q, h, d), dtype, "cpu")
    ks = [_rand((n, hkv, d), dtype, "cpu") for n in total_k]
    vs = [_rand((n, hkv, d), dtype, "cpu") for n in total_k]
    out, lse, dq, _, _ = _check_case(q, ks, vs, masks, layout.plan, dtype)
    for rows in (slice(23, 26), slice(45, 48)):
        assert torch.all(out[rows] == 0) and torch.all(dq[rows] == 0)
        assert torch.all(lse[:, rows] == float("-inf"))


@interpret
def test_large_logits_no_overflow():
    """Inputs scaled x5 (large logits) with short sequences must give finite, accurate results."""
    dtype = torch.float16
    lq = [1, 2, 5, 17]
    cu = _cu(lq)
    layout = AttentionLayout.varlen(cu, cu, True)
    q = _rand((sum(lq), 2, 64), dtype, "cpu", 5.0)
    k = _rand((sum(lq), 1, 64), dtype, "cpu", 3.0)
    v = _rand((sum(lq), 1, 64), dtype, "cpu")
    _check_case(q, [k], [v], [mask_varlen(cu, cu, True)], layout.plan, dtype)


@interpret
def test_backward_deterministic():
    at = _triton()
    dtype = torch.float16
    lq, lk = [37, 9], [50, 9]
    layout = AttentionLayout.varlen(_cu(lq), _cu(lk), True)
    q = _rand((sum(lq), 4, 64), dtype, "cpu")
    k = _rand((sum(lk), 1, 64), dtype, "cpu")
    v = _rand((sum(lk), 1, 64), dtype, "cpu")
    out, lse = at.packed_attention_fwd_triton(q, [k], [v], layout.plan, 0.125)
    out2, lse2 = at.packed_attention_fwd_triton(q, [k], [v], layout.plan, 0.125)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)
    dout = _rand(q.shape, dtype, "cpu")
    g1 = at.packed_attention_bwd_triton(dout, q, [k], [v], out, lse, layout.plan, 0.125)
    g2 = at.packed_attention_bwd_triton(dout, q, [k], [v], out, lse, layout.plan, 0.125)
    assert torch.equal(g1[0], g2[0]) and torch.equal(g1[1][0], g2[1][0]) and torch.equal(g1[2][0], g2[2][0])


@interpret
def test_invalid_inputs():
    at = _triton()
    cu = _cu([4, 3])
    plan = AttentionLayout.varlen(cu, cu, False).plan
    q = torch.randn(7, 2, 64)
    k = torch.randn(7, 1, 64)
    with pytest.raises(ValueError, match="ks\\[0\\]"):
        at.packed_attention_fwd_triton(q, [k.half()], [k.half()], plan, 0.1)
    with pytest.raises(ValueError, match="head dim"):
        at.packed_attention_fwd_triton(torch.randn(7, 2, 24), [torch.randn(7, 1, 24)], [torch.randn(7, 1, 24)],
                                       plan, 0.1)
    with pytest.raises(ValueError, match="q"):  # 3 query heads over 2 kv heads
        at.packed_attention_fwd_triton(torch.randn(7, 3, 64), [torch.randn(7, 2, 64)], [torch.randn(7, 2, 64)],
                                       plan, 0.1)
    with pytest.raises(ValueError, match="q"):
        at.packed_attention_fwd_triton(q.to(torch.int32), [k], [k], plan, 0.1)
    with pytest.raises(ValueError, match="vs\\[0\\]"):
        at.packed_attention_fwd_triton(q, [k], [torch.randn(6, 1, 64)], plan, 0.1)
    with pytest.raises(ValueError, match="ks"):
        at.packed_attention_fwd_triton(q, [torch.randn(9, 1, 64)], [torch.randn(9, 1, 64)], plan, 0.1)
    with pytest.raises(ValueError, match="lse"):
        at.packed_attention_bwd_triton(q, q, [k], [k], q, torch.zeros(7, 2), plan, 0.1)
    with pytest.raises(ValueError, match="softmax_scale"):
        at.packed_attention_fwd_triton(q, [k], [k], plan, float("nan"))


def test_head_dims_and_dtypes_declared():
    at = _triton()
    assert {64, 72, 80, 96, 128} <= set(at.TRITON_HEAD_DIMS)
    assert set(at.TRITON_DTYPES) == {torch.float16, torch.bfloat16, torch.float32}


# --------------------------------------------------------------------------------------------------
# GPU cases
# --------------------------------------------------------------------------------------------------


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("d", [64, 72, 80, 96, 128])
def test_gpu_varlen_dtypes_head_dims(dtype, d):
    lq, lk = [1, 17, 113, 300, 0], [147, 17, 203, 256, 5]
    cu_q, cu_k = _cu(lq), _cu(lk)
    for causal in (False, True):
        layout = AttentionLayout.varlen(cu_q, cu_k, causal, device="cuda")
        q = _rand((sum(lq), 8, d), dtype, "cuda")
        k = _rand((sum(lk), 2, d), dtype, "cuda")
        v = _rand((sum(lk), 2, d), dtype, "cuda")
        _check_case(q, [k], [v], [mask_varlen(cu_q, cu_k, causal).cuda()], layout.plan, dtype)


@gpu
@BWD
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_bagel_pack(dtype, deterministic):
    samples = [[(40, "causal"), (300, "full"), (256, "noise"), (20, "causal")],
               [(64, "causal"), (700, "full"), (15, "causal")]]
    layout = AttentionLayout.from_splits(samples, device="cuda")
    total = sum(n for s in samples for n, _ in s)
    q = _rand((total, 28, 128), dtype, "cuda")
    k = _rand((total, 4, 128), dtype, "cuda")
    v = _rand((total, 4, 128), dtype, "cuda")
    _check_case(q, [k], [v], [mask_from_splits_vectorised(samples).cuda()], layout.plan, dtype,
                deterministic=deterministic)


@gpu
@BWD
def test_gpu_smsa_bf16(deterministic):
    lq, lgen, ltxt = [700, 300], [513, 256], [60, 0]
    cu_q, cu_gen, cu_txt = _cu(lq), _cu(lgen), _cu(ltxt)
    dtype, h, hkv, d = torch.bfloat16, 28, 4, 128
    layout = AttentionLayout.smsa(cu_q.cuda(), [cu_gen.cuda(), cu_q.cuda(), cu_txt.cuda()])
    q = _rand((sum(lq), h, d), dtype, "cuda")
    ks = [_rand((sum(n), hkv, d), dtype, "cuda") for n in (lgen, lq, ltxt)]
    vs = [_rand((sum(n), hkv, d), dtype, "cuda") for n in (lgen, lq, ltxt)]
    masks = [mask_varlen(cu_q, c, False).cuda() for c in (cu_gen, cu_q, cu_txt)]
    _check_case(q, ks, vs, masks, layout.plan, dtype, deterministic=deterministic)


def _big_pack(seed: int = 0):
    """A ~33k-token BAGEL-7B-like pack: samples of 1.5k-9k tokens (text causal, ViT full, VAE noise)."""
    rng = random.Random(seed)
    samples, total = [], 0
    while total < 33_000:
        n = rng.randint(1_500, 9_000)
        n = min(n, 33_500 - total)
        vae = n // 2
        vit = n // 3
        txt = n - vae - vit
        samples.append([(txt // 2, "causal"), (vit, "full"), (txt - txt // 2, "causal"), (vae, "noise")])
        total += n
    return samples, total


@gpu
def test_gpu_big_pack_against_torch_reference():
    """33k-token pack, H=28/Hkv=4, D=128, bf16, against the memory-bounded ``torch`` reference in fp32."""
    from unigendet.ops.attention import packed_attention_reference

    at = _triton()
    samples, total = _big_pack()
    layout = AttentionLayout.from_splits(samples, device="cuda")
    dtype = torch.bfloat16
    q = _rand((total, 28, 128), dtype, "cuda")
    k = _rand((total, 4, 128), dtype, "cuda")
    v = _rand((total, 4, 128), dtype, "cuda")
    scale = 128**-0.5
    out, lse = at.packed_attention_fwd_triton(q, [k], [v], layout.plan, scale)
    ref_out, ref_lse = packed_attention_reference(q.float(), [k.float()], [v.float()], layout.plan, scale)
    pt_out, _ = packed_attention_reference(q, [k], [v], layout.plan, scale)
    err = (out.float() - ref_out).abs().max().item()
    base = (pt_out.float() - ref_out).abs().max().item()
    assert err <= 2 * base + 1e-2, (err, base)
    assert (lse - ref_lse.float()).abs().nan_to_num(0.0).max().item() < 1e-2


@gpu
def test_gpu_deterministic_50_runs():
    at = _triton()
    samples, total = _big_pack(1)
    samples = samples[:2]
    total = sum(n for s in samples for n, _ in s)
    layout = AttentionLayout.from_splits(samples, device="cuda")
    dtype = torch.bfloat16
    q = _rand((total, 28, 128), dtype, "cuda")
    k = _rand((total, 4, 128), dtype, "cuda")
    v = _rand((total, 4, 128), dtype, "cuda")
    scale = 128**-0.5
    out, lse = at.packed_attention_fwd_triton(q, [k], [v], layout.plan, scale)
    dout = _rand(q.shape, dtype, "cuda")
    g0 = at.packed_attention_bwd_triton(dout, q, [k], [v], out, lse, layout.plan, scale, deterministic=True)
    for _ in range(50):
        g = at.packed_attention_bwd_triton(dout, q, [k], [v], out, lse, layout.plan, scale, deterministic=True)
        assert torch.equal(g[0], g0[0]) and torch.equal(g[1][0], g0[1][0]) and torch.equal(g[2][0], g0[2][0])
