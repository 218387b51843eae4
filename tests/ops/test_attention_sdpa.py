"""The ``sdpa`` backend (PyTorch's CPU flash-attention kernels, one connected block per call) against the dense
fp64 reference under flash-attention's rule, forward and backward, with GQA, masked rows and absent sources."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from attention_helpers import assert_within, dense_attention, mask_from_splits, mask_varlen  # noqa: E402

from unigendet.ops import AttentionLayout, packed_attention  # noqa: E402
from unigendet.ops.attention_sdpa import sdpa_unavailable_reason  # noqa: E402

pytestmark = pytest.mark.skipif(sdpa_unavailable_reason() is not None, reason=str(sdpa_unavailable_reason()))


def _cu(lengths):
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32)


def _check(q, ks, vs, masks, layout, dtype):
    present = [i for i, k in enumerate(ks) if k is not None]
    leaves = [q.to(dtype).requires_grad_(), *(ks[i].to(dtype).requires_grad_() for i in present),
              *(vs[i].to(dtype).requires_grad_() for i in present)]
    n = len(present)
    kk, vv = list(ks), list(vs)
    for j, i in enumerate(present):
        kk[i], vv[i] = leaves[1 + j], leaves[1 + n + j]
    hkv, d = leaves[1].shape[1], q.shape[-1]
    kk = [torch.zeros(0, hkv, d, dtype=dtype) if t is None else t for t in kk]
    vv = [torch.zeros(0, hkv, d, dtype=dtype) if t is None else t for t in vv]
    out, lse = packed_attention(leaves[0], kk if len(kk) > 1 else kk[0], vv if len(vv) > 1 else vv[0], layout,
                                return_lse=True, backend="sdpa")
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    grads = torch.autograd.grad(out, leaves, dout)

    def dense(prec, reorder):
        ls = [t.detach().to(prec).requires_grad_() for t in leaves]
        o, l_ = dense_attention(ls[0], ls[1:1 + n], ls[1 + n:], [masks[i] for i in present], dtype=prec,
                                reorder=reorder)
        return o, l_, torch.autograd.grad(o, ls, dout.to(prec))

    ref_o, ref_l, ref_g = dense(torch.float64, False)
    pt_o, pt_l, pt_g = dense(dtype, True)
    assert out.dtype == dtype
    assert_within("out", out, ref_o, pt_o, 2, dtype, 1e-6)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_l)), "fully masked rows must have lse = -inf"
    assert_within("lse", lse, ref_l, pt_l.float(), 2, torch.float32, 1e-6)
    for i, (g, r, p) in enumerate(zip(grads, ref_g, pt_g)):
        assert torch.isfinite(g).all()
        assert_within(f"grad {i}", g, r, p, 3, dtype, 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_varlen_gqa_masked_rows_and_empty_segments(dtype):
    lq, lk = [1, 17, 0, 40, 9], [1, 17, 3, 40, 2]  # Nq > Nk causal: fully masked rows; an empty query range
    cu_q, cu_k = _cu(lq), _cu(lk)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(sum(n), h, 32, generator=g) for n, h in ((lq, 4), (lk, 2), (lk, 2)))
    _check(q, [k], [v], [mask_varlen(cu_q, cu_k, True)], AttentionLayout.varlen(cu_q, cu_k, True), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_bagel_packed_layout_in_expert_order(dtype):
    samples = [[(6, "causal"), (20, "full"), (13, "noise"), (3, "causal")], [(9, "causal"), (5, "full")]]
    total = sum(n for s in samples for n, _ in s)
    gen = torch.tensor([m == "noise" for s in samples for n, m in s for _ in range(n)])
    order = torch.cat([torch.nonzero(~gen).flatten(), torch.nonzero(gen).flatten()])  # the model's token order
    layout = AttentionLayout.from_splits(samples, order=order)
    mask = mask_from_splits(samples)[order][:, order]
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(total, 4, 64, generator=g), torch.randn(total, 1, 64, generator=g), torch.randn(
        total, 1, 64, generator=g)
    _check(q, [k], [v], [mask], layout, dtype)


def test_smsa_three_sources_one_absent():
    lq, lgen, ldet = [19, 1, 6], [17, 0, 9], [19, 1, 6]
    cu_q, cu_gen, cu_det = _cu(lq), _cu(lgen), _cu(ldet)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(sum(lq), 8, 72, generator=g)
    ks = [torch.randn(sum(lgen), 2, 72, generator=g), torch.randn(sum(ldet), 2, 72, generator=g), None]
    vs = [torch.randn(sum(lgen), 2, 72, generator=g), torch.randn(sum(ldet), 2, 72, generator=g), None]
    masks = [mask_varlen(cu_q, cu_gen, False), mask_varlen(cu_q, cu_det, False), None]
    _check(q, ks, vs, masks, AttentionLayout.smsa(cu_q, [cu_gen, cu_det, None]), torch.float32)


def test_auto_picks_it_on_the_cpu_and_it_agrees_with_the_reference():
    samples = [[(5, "full"), (17, "causal"), (3, "noise")], [(9, "causal")]]
    layout = AttentionLayout.from_splits(samples)
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(34, 8, 16, generator=g), torch.randn(34, 2, 16, generator=g)
    torch.testing.assert_close(packed_attention(q, k, k, layout), packed_attention(q, k, k, layout,
                                                                                   backend="torch"))


@pytest.mark.parametrize("native_gqa", [True, False], ids=["grouped-heads", "expanded-heads"])
def test_rows_without_keys_and_keys_without_queries(native_gqa, monkeypatch):
    """Query segments with no key segment (rows no block covers: out 0, lse -inf), key segments no query reads
    (gradients accumulated, not written), and both ways of feeding grouped K/V heads to the kernel."""
    from unigendet.ops import attention_sdpa

    if native_gqa and not attention_sdpa._native_gqa():
        pytest.skip("this torch's CPU flash kernels expand K/V heads")
    monkeypatch.setattr(attention_sdpa, "_native_gqa", lambda: native_gqa)
    lq, lk = [7, 12, 0, 5, 9], [7, 0, 4, 5, 11]
    cu_q, cu_k = _cu(lq), _cu(lk)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(sum(n), h, 24, generator=g) for n, h in ((lq, 6), (lk, 3), (lk, 3)))
    _check(q, [k], [v], [mask_varlen(cu_q, cu_k, True)], AttentionLayout.varlen(cu_q, cu_k, True), torch.float32)
    _check(q, [k], [v], [mask_varlen(cu_q, cu_k, False)], AttentionLayout.varlen(cu_q, cu_k, False), torch.float32)


@pytest.mark.parametrize("order", ["packed", "expert"])
def test_blocks_split_into_full_rows_and_their_prefix(order, monkeypatch):
    """A block's rows that see all its keys run as their own unmasked call and the other rows attend only to the key
    span they see; with the threshold at one row every causal segment's last row and every noise split splits."""
    from unigendet.ops import attention_sdpa

    monkeypatch.setattr(attention_sdpa, "_SPLIT_MIN_ROWS", 1)
    samples = [[(6, "causal"), (9, "full"), (4, "causal"), (13, "noise")], [(3, "full"), (8, "causal")],
               [(5, "causal"), (7, "noise")]]
    total = sum(n for s in samples for n, _ in s)
    order_t = None
    if order == "expert":
        gen = torch.tensor([m == "noise" for s in samples for n, m in s for _ in range(n)])
        order_t = torch.cat([torch.nonzero(~gen).flatten(), torch.nonzero(gen).flatten()])
    layout = AttentionLayout.from_splits(samples, order=order_t)
    mask = mask_from_splits(samples)
    if order_t is not None:
        mask = mask[order_t][:, order_t]
    bp = attention_sdpa._plan_blocks(layout.plan_cpu.tensors(), 6, total, [total])
    assert sum(len(b.calls) == 2 for b in bp.blocks) == 3  # every sample splits
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(total, h, 40, generator=g) for h in (6, 2, 2))
    _check(q, [k], [v], [mask], layout, torch.float32)
    lq, lk = [7, 12, 5, 9], [7, 12, 11, 9]
    cu_q, cu_k = _cu(lq), _cu(lk)
    q, k, v = (torch.randn(sum(n), h, 24, generator=g) for n, h in ((lq, 6), (lk, 3), (lk, 3)))
    _check(q, [k], [v], [mask_varlen(cu_q, cu_k, True)], AttentionLayout.varlen(cu_q, cu_k, True), torch.float32)


def test_split_rows_that_see_a_later_key_span(monkeypatch):
    """Full rows first, then rows that see only a later span of the block's keys (columns from c0 > 0)."""
    from unigendet.ops import attention_sdpa

    monkeypatch.setattr(attention_sdpa, "_SPLIT_MIN_ROWS", 1)
    layout = AttentionLayout.from_splits([[(8, "full"), (6, "causal")]], visible=[[[1], []]])
    mask = torch.zeros(14, 14, dtype=torch.bool)
    mask[:8] = True
    mask[8:, 8:] = torch.ones(6, 6, dtype=torch.bool).tril()
    bp = attention_sdpa._plan_blocks(layout.plan_cpu.tensors(), 4, 14, [14])
    assert [(c.c0, c.c1) for c in bp.blocks[0].calls] == [(0, 14), (8, 14)]
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(14, h, 16, generator=g) for h in (4, 2, 2))
    _check(q, [k], [v], [mask], layout, torch.float32)
