"""The ``torch`` backend of the packed attention ops against an independent dense fp64 attention."""

import random

import pytest
import torch
from attention_helpers import (
    assert_within,
    dense_attention,
    mask_from_splits,
    mask_varlen,
    max_err,
    order_keeping_causal,
    permute_mask,
    random_splits,
)

import unigendet.ops.attention as attn_mod
from unigendet.ops import AttentionLayout, packed_attention, smsa_attention, varlen_attention

# lengths 1, 17, 97, 130, an empty query segment with keys, an empty key segment with queries,
# and more queries than keys
LENS_Q = [1, 17, 0, 97, 130, 9, 7]
LENS_K = [1, 17, 3, 97, 130, 0, 2]


def cu(lens, device="cpu"):
    out = [0]
    for n in lens:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32, device=device)


def rand(*shape, dtype=torch.float64, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype).requires_grad_()


@pytest.fixture(autouse=True, params=["dense", "ranges"])
def reference_path(request, monkeypatch):
    """Run every test on both reference paths: the whole pack as one masked attention and range by range."""
    if request.param == "ranges":
        monkeypatch.setattr(attn_mod, "_REF_DENSE_ELEMS", 0)
    return request.param


def grads(out, inputs, dout):
    return torch.autograd.grad(out, inputs, dout, allow_unused=True)


def ref_and_grads(q, ks, vs, masks, dout, dtype=torch.float64, reorder=False):
    leaves = [t.detach().requires_grad_() for t in (q, *ks, *vs)]
    n = len(ks)
    out, lse = dense_attention(leaves[0], leaves[1:1 + n], leaves[1 + n:], masks, dtype=dtype, reorder=reorder)
    gs = torch.autograd.grad(out, leaves, dout.to(out.dtype))
    return out.detach(), lse.detach(), gs


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("groups, head_dim", [(1, 64), (4, 72), (7, 128)])
def test_varlen_fp64_matches_dense(causal, groups, head_dim):
    hkv = 2 if groups == 1 else 1
    h = hkv * groups
    cq, ck = cu(LENS_Q), cu(LENS_K)
    tq, tk = int(cq[-1]), int(ck[-1])
    q, k, v = rand(tq, h, head_dim), rand(tk, hkv, head_dim), rand(tk, hkv, head_dim)
    out, lse, _ = varlen_attention(q, k, v, cq, ck, max(LENS_Q), max(LENS_K), causal=causal, return_attn_probs=True,
                                   backend="torch")
    mask = mask_varlen(cq.tolist(), ck.tolist(), causal)
    dout = torch.randn_like(out)
    ref, ref_lse, ref_g = ref_and_grads(q, [k], [v], [mask], dout)
    assert out.dtype == torch.float64 and lse.dtype == torch.float32 and lse.shape == (h, tq)
    assert max_err(out, ref) < 1e-12
    assert max_err(lse, ref_lse) < 1e-5
    # rows with no visible key: zero output, -inf lse
    empty = ~mask.any(1)
    assert empty.any() and (out[empty] == 0).all() and torch.isneginf(lse[:, empty]).all()
    for name, g, r in zip("qkv", grads(out, (q, k, v), dout), ref_g):
        assert max_err(g, r) < 1e-11, name


@pytest.mark.parametrize("seed", range(6))
def test_from_splits_fp64_matches_dense(seed):
    rng = random.Random(seed)
    samples = random_splits(rng, max_samples=3, max_splits=4, max_len=9)
    order = order_keeping_causal(rng, samples) if seed % 2 else None
    mask = mask_from_splits(samples)
    if order is not None:
        mask = permute_mask(mask, order)
    layout = AttentionLayout.from_splits(samples, order=order)
    t, hkv, g, d = mask.shape[0], 2, [1, 4, 7][seed % 3], 16
    q, k, v = rand(t, hkv * g, d), rand(t, hkv, d), rand(t, hkv, d)
    out, lse = packed_attention(q, k, v, layout, softmax_scale=0.3, return_lse=True, backend="torch")
    dout = torch.randn_like(out)
    ref, ref_lse = dense_attention(q, [k], [v], [mask], scale=0.3)
    assert max_err(out, ref) < 1e-12 and max_err(lse, ref_lse) < 1e-5
    ref_g = torch.autograd.grad(ref, (q, k, v), dout)
    for name, a, b in zip("qkv", grads(out, (q, k, v), dout), ref_g):
        assert max_err(a, b) < 1e-11, name


def test_from_ranges_multi_source_fp64():
    entries = [(0, 4, [(0, 3, True, 0), (2, 5, False, 1)]), (4, 9, [(1, 6, True, 0), (0, 2, True, 1)]),
               (2, 6, [(3, 6, False, 0)])]
    layout = AttentionLayout.from_ranges(entries, 10, (6, 5), num_sources=2)
    masks = [layout.dense_mask(0), layout.dense_mask(1)]
    q, k0, v0, k1, v1 = rand(10, 4, 8), rand(6, 2, 8), rand(6, 2, 8), rand(5, 2, 8), rand(5, 2, 8)
    out = packed_attention(q, [k0, k1], [v0, v1], layout, backend="torch")
    ref, _ = dense_attention(q, [k0, k1], [v0, v1], masks)
    assert max_err(out, ref) < 1e-12
    dout = torch.randn_like(out)
    for a, b in zip(grads(out, (q, k0, v0, k1, v1), dout), torch.autograd.grad(ref, (q, k0, v0, k1, v1), dout)):
        assert max_err(a, b) < 1e-11


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_low_precision_2x_rule(dtype, causal):
    """fp32/fp16/bf16: error vs fp64 within 2x (out) / 3x (grads) of plain PyTorch at that precision."""
    lens_q, lens_k = [1, 17, 0, 40, 9], [1, 17, 3, 40, 2]
    cq, ck = cu(lens_q), cu(lens_k)
    tq, tk = int(cq[-1]), int(ck[-1])
    q, k, v = rand(tq, 4, 32, dtype=dtype), rand(tk, 2, 32, dtype=dtype), rand(tk, 2, 32, dtype=dtype)
    out = varlen_attention(q, k, v, cq, ck, 40, 40, causal=causal, backend="torch")
    assert out.dtype == dtype
    dout = torch.randn(out.shape, dtype=torch.float64).to(dtype)
    mask = mask_varlen(cq.tolist(), ck.tolist(), causal)
    ref, _, ref_g = ref_and_grads(q, [k], [v], [mask], dout)
    pt, _, pt_g = ref_and_grads(q, [k], [v], [mask], dout, dtype=dtype, reorder=True)
    assert_within("out", out, ref, pt, 2.0, dtype)
    for name, g, r, p in zip("qkv", grads(out, (q, k, v), dout), ref_g, pt_g):
        assert g.dtype == dtype
        assert_within(f"d{name}", g, r, p, 3.0, dtype)


def test_large_values_no_nan():
    # scaled inputs (softmax saturates) must not produce NaN/inf in outputs or gradients
    cq = cu([5, 17, 128, 2])
    t = int(cq[-1])
    q, k, v = rand(t, 2, 16, scale=5.0), rand(t, 2, 16, scale=3.0), rand(t, 2, 16)
    out = varlen_attention(q, k, v, cq, cq, 128, 128, causal=True, backend="torch")
    gs = grads(out, (q, k, v), torch.randn_like(out))
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in gs)


def test_query_chunking_matches(monkeypatch):
    """The reference bounds memory by processing long ranges in query chunks; chunking changes nothing."""
    layout = AttentionLayout.from_splits([[(9, "full"), (30, "causal")], [(20, "noise")]])
    q, k, v = rand(59, 4, 8), rand(59, 2, 8), rand(59, 2, 8)
    dout = torch.randn(59, 4, 8, dtype=torch.float64)
    out = packed_attention(q, k, v, layout, backend="torch")
    g = grads(out, (q, k, v), dout)
    monkeypatch.setattr(attn_mod, "_REF_BLOCK_ELEMS", 4 * 39 * 3)  # 3 query rows per chunk
    out2 = packed_attention(q, k, v, layout, backend="torch")
    g2 = grads(out2, (q, k, v), dout)
    assert max_err(out, out2) < 1e-13 and all(max_err(a, b) < 1e-12 for a, b in zip(g, g2))


def _smsa_inputs(lens_q, lens_src, h=4, hkv=2, d=16, dtype=torch.float64):
    q = rand(sum(lens_q), h, d, dtype=dtype)
    srcs = []
    for lens in lens_src:
        if lens is None:
            srcs.append((None, None, None, 0))
        else:
            srcs.append((rand(sum(lens), hkv, d, dtype=dtype), rand(sum(lens), hkv, d, dtype=dtype), cu(lens),
                         max(lens)))
    return q, srcs


def _smsa_call(q, srcs, lens_q, **kw):
    (kg, vg, cg, mg), (kd, vd, cd, md), (kt, vt, ct, mt) = srcs
    return smsa_attention(q, kg, vg, kd, vd, kt, vt, cu(lens_q), cg, cd, ct, max(lens_q), mg, md, mt, **kw)


def _concat_reference(q, srcs, lens_q):
    """Per sample, attend to the explicit concatenation cat(gen_b, det_b, txt_b) with plain varlen attention."""
    cq = cu(lens_q).tolist()
    k_parts, v_parts, lens_k = [], [], []
    for b in range(len(lens_q)):
        n = 0
        for k, v, c, _ in srcs:
            if k is None:
                continue
            a, e = int(c[b]), int(c[b + 1])
            k_parts.append(k[a:e])
            v_parts.append(v[a:e])
            n += e - a
        lens_k.append(n)
    kc, vc = torch.cat(k_parts), torch.cat(v_parts)
    ck = cu(lens_k)
    out, lse, _ = varlen_attention(q, kc, vc, torch.tensor(cq, dtype=torch.int32), ck, max(lens_q),
                                   max(lens_k), return_attn_probs=True, backend="torch")
    mask = mask_varlen(cq, ck.tolist(), False)
    dense, _ = dense_attention(q, [kc], [vc], [mask])
    return out, lse, dense


@pytest.mark.parametrize("absent", [None, 0, 1, 2])
@pytest.mark.parametrize("empty", [None, 0, 1, 2])
def test_smsa_matches_concatenated_varlen(absent, empty):
    lens_q = [3, 0, 11, 6]
    lens_src = [[4, 2, 7, 1], [5, 1, 0, 3], [2, 6, 3, 0]]
    if empty is not None:
        lens_src[empty] = [0, 0, 0, 0]
    if absent is not None:
        lens_src[absent] = None
    q, srcs = _smsa_inputs(lens_q, lens_src)
    out, lse = _smsa_call(q, srcs, lens_q, return_lse=True, backend="torch")
    ref_out, ref_lse, dense = _concat_reference(q, srcs, lens_q)
    assert max_err(out, ref_out) < 1e-13 and max_err(lse, ref_lse) < 1e-6 and max_err(out, dense) < 1e-12
    dout = torch.randn_like(out)
    leaves = [q] + [t for k, v, _, _ in srcs if k is not None for t in (k, v)]
    got = grads(out, leaves, dout)
    want = torch.autograd.grad(ref_out, leaves, dout)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a is not None and max_err(a, b) < 1e-12, i


def test_expert_order_permutation_invariance():
    """Permuting the pack (layout built with ``order``) and un-permuting the result changes nothing."""
    rng = random.Random(11)
    samples = [[(4, "full"), (6, "full"), (3, "causal"), (5, "causal")], [(2, "causal"), (7, "noise")]]
    order = order_keeping_causal(rng, samples)
    o = torch.tensor(order)
    t = len(order)
    q, k, v = rand(t, 4, 16), rand(t, 2, 16), rand(t, 2, 16)
    dout = torch.randn(t, 4, 16, dtype=torch.float64)
    base = packed_attention(q, k, v, AttentionLayout.from_splits(samples), backend="torch")
    g_base = grads(base, (q, k, v), dout)
    perm = packed_attention(q[o], k[o], v[o], AttentionLayout.from_splits(samples, order=order), backend="torch")
    g_perm = grads(perm, (q, k, v), dout[o])
    assert max_err(perm, base[o]) < 1e-13
    assert all(max_err(a, b) < 1e-12 for a, b in zip(g_perm, g_base))
