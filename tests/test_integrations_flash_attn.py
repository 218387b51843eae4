"""The flash-attn shim: flash-attn 2's signatures and conventions, against a dense fp64 reference.

The reference mask is written here from flash-attn's documented rule (bottom-right causal, local windows
``[i + Lk - Lq - left, i + Lk - Lq + right]``), independently of the layouts. Pass rule: outputs within 2x,
gradients within 3x the error of the same dense computation at the input precision, plus the noise floor.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from attention_helpers import assert_within, dense_attention

from unigendet import _backend
from unigendet.integrations import _layouts
from unigendet.integrations.flash_attn import flash_attn_func, flash_attn_varlen_func

interpret = pytest.mark.interpret
gpu = pytest.mark.gpu
I32 = torch.int32


def cu_of(lens, device="cpu"):
    return torch.tensor([0, *torch.tensor(lens, dtype=torch.int64).cumsum(0).tolist()], dtype=I32, device=device)


def fa_mask(lq, lk, causal, window=(-1, -1)):
    """flash-attn's visibility rule, sequence by sequence."""
    left, right = window
    if causal:
        right = 0
    m = torch.zeros(sum(lq), sum(lk), dtype=torch.bool)
    q0 = k0 = 0
    for a, b in zip(lq, lk):
        i = torch.arange(a)[:, None]
        j = torch.arange(b)[None, :]
        vis = torch.ones(a, b, dtype=torch.bool)
        if right >= 0:
            vis &= j <= i + b - a + right
        if left >= 0:
            vis &= j >= i + b - a - left
        m[q0:q0 + a, k0:k0 + b] = vis
        q0, k0 = q0 + a, k0 + b
    return m


def _rand(shape, dtype, device, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def check(fn, q, k, v, mask, dtype, scale=None):
    """Run ``fn(q, k, v)`` forward + backward and compare with the dense reference under the rule."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    assert out.dtype == dtype and out.shape == q.shape[:-1] + v.shape[-1:]
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(out)
    out.backward(dout)

    def dense(prec):
        ls = [t.detach().to(prec).requires_grad_() for t in (q, k, v)]
        flat = [t.flatten(0, -3) for t in ls]  # (batch, seqlen, heads, dim) -> (tokens, heads, dim)
        o, _ = dense_attention(flat[0], [flat[1]], [flat[2]], [mask], scale=scale, dtype=prec)
        o = o.view(out.shape)
        o.backward(dout.to(prec))
        return o.detach(), [t.grad for t in ls]

    ref, ref_g = dense(torch.float64)
    pt, pt_g = dense(dtype)
    floor = 1e-6 if dtype == torch.float32 else 1e-4
    assert_within("out", out, ref, pt, 2, dtype, floor)
    for name, t, r, p in zip("qkv", leaves, ref_g, pt_g):
        assert_within(f"d{name}", t.grad, r, p, 3, dtype, floor)
    return out


@pytest.fixture
def torch_backend(monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "torch")


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "triton")


VARLEN_CASES = [
    # causal, window, q lengths, k lengths, H, Hkv
    (False, (-1, -1), [5, 17, 1], [5, 17, 1], 4, 2),
    (True, (-1, -1), [3, 9, 12], [11, 9, 4], 4, 1),      # Lk > Lq and Lq > Lk (fully masked rows)
    (True, (3, -1), [20, 7, 0, 9], [20, 7, 0, 14], 4, 2),  # sliding window; an empty sequence
    (True, (0, 0), [9], [9], 2, 2),                      # each query sees only itself
    (False, (2, 5), [13, 6], [10, 6], 4, 2),             # two-sided local window
    (False, (-1, 1), [8, 11], [8, 15], 4, 4),            # right window only
    (False, (4, -1), [12], [12], 2, 1),                  # left window only
    (True, (40, 40), [9, 16], [9, 16], 4, 2),            # a window longer than every sequence
]


def _case_id(c):
    return f"c{int(c[0])}-w{c[1][0]}_{c[1][1]}-{c[4]}x{c[5]}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", VARLEN_CASES, ids=_case_id)
def test_varlen(torch_backend, case, dtype):
    causal, window, lq, lk, h, hkv = case
    gen = torch.Generator().manual_seed(0)
    d = 32
    q, k, v = (_rand((sum(lq), h, d), dtype, "cpu", gen), _rand((sum(lk), hkv, d), dtype, "cpu", gen),
               _rand((sum(lk), hkv, d), dtype, "cpu", gen))
    cq, ck = cu_of(lq), cu_of(lk)
    fn = lambda q, k, v: flash_attn_varlen_func(q, k, v, cq, ck, max(lq), max(lk), causal=causal, window_size=window)
    check(fn, q, k, v, fa_mask(lq, lk, causal, window), dtype)


def test_window_layout_is_exact_for_random_windows():
    """The windowed plans (forward and backward views) against flash-attn's rule, small chunks included."""
    import random

    from attention_helpers import mask_from_backward_view

    rng = random.Random(0)
    for chunk in (3, _layouts._CHUNK):
        old, _layouts._CHUNK = _layouts._CHUNK, chunk
        try:
            for _ in range(150):
                n = rng.randint(1, 4)
                lq = [rng.randint(0, 20) for _ in range(n)]
                lk = [x if rng.random() < 0.5 else rng.randint(0, 20) for x in lq]
                causal = rng.random() < 0.5
                window = (rng.choice([-1, 0, 1, 3, 7, 30]), rng.choice([-1, 0, 2, 5, 40]))
                w = _layouts.normalise_window(window, causal, max(lq), max(lk))
                expect = fa_mask(lq, lk, causal, window)
                if w is None:  # the window cuts nothing: the plain varlen rule
                    assert torch.equal(expect, fa_mask(lq, lk, causal))
                    continue
                layout = _layouts.window_layout(cu_of(lq), cu_of(lk), causal, w, sum(lq), sum(lk), "cpu")
                assert torch.equal(layout.dense_mask(), expect), (lq, lk, causal, window)
                assert torch.equal(mask_from_backward_view(layout.plan), expect), (lq, lk, causal, window)
                assert layout.plan.max_q_len <= chunk and layout.plan.max_k_len <= chunk
        finally:
            _layouts._CHUNK = old


@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (True, (5, 0)), (False, (3, 2))])
def test_flash_attn_func(torch_backend, causal, window):
    gen = torch.Generator().manual_seed(1)
    b, sq, sk, h, hkv, d = 3, 9, 13, 4, 2, 32
    q = _rand((b, sq, h, d), torch.float32, "cpu", gen)
    k = _rand((b, sk, hkv, d), torch.float32, "cpu", gen)
    v = _rand((b, sk, hkv, d), torch.float32, "cpu", gen)
    fn = lambda q, k, v: flash_attn_func(q, k, v, softmax_scale=0.2, causal=causal, window_size=window)
    check(fn, q, k, v, fa_mask([sq] * b, [sk] * b, causal, window), torch.float32, scale=0.2)


def test_signatures_match_flash_attn():
    """Parameter names, order and defaults of flash-attn 2 (flash_attn/flash_attn_interface.py)."""
    common = [("dropout_p", 0.0), ("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)),
              ("softcap", 0.0), ("alibi_slopes", None), ("deterministic", False), ("return_attn_probs", False)]
    varlen = [(n, inspect.Parameter.empty) for n in ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q",
                                                      "max_seqlen_k")] + common + [("block_table", None)]
    dense = [(n, inspect.Parameter.empty) for n in ("q", "k", "v")] + common
    for fn, expect in ((flash_attn_varlen_func, varlen), (flash_attn_func, dense)):
        got = [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]
        assert got == expect, fn.__name__


# --------------------------------------------------------------------------------------------------
# Code written for flash-attn, unchanged but for the import
# --------------------------------------------------------------------------------------------------


def bagel_style_attention(packed_query_states, packed_key_states, packed_value_states, query_lens,
                          past_key_states=None, past_value_states=None, key_values_lens=None,
                          packed_query_indexes=None, packed_key_value_indexes=None, is_causal=True):
    """A packed decoder layer's inference attention in the style of BAGEL's ``forward_inference``: new keys
    scattered into a merged cache, query segments against it, keyword arguments, ``.item()`` maxima."""
    if past_key_states is not None:
        seqlens = int(sum(query_lens) + sum(key_values_lens))
        merged_k = past_key_states.new_zeros((seqlens, *past_key_states.shape[1:]))
        merged_v = past_value_states.new_zeros((seqlens, *past_value_states.shape[1:]))
        merged_k[packed_query_indexes] = packed_key_states
        merged_k[packed_key_value_indexes] = past_key_states
        merged_v[packed_query_indexes] = packed_value_states
        merged_v[packed_key_value_indexes] = past_value_states
        key_values_lens = key_values_lens + query_lens
    else:
        merged_k, merged_v, key_values_lens = packed_key_states, packed_value_states, query_lens
    cu_seqlens_q = torch.nn.functional.pad(torch.cumsum(query_lens, dim=0), (1, 0))
    cu_seqlens_k = torch.nn.functional.pad(torch.cumsum(key_values_lens, dim=0), (1, 0))
    return flash_attn_varlen_func(
        q=packed_query_states,
        k=merged_k,
        v=merged_v,
        cu_seqlens_q=cu_seqlens_q.to(torch.int32),
        cu_seqlens_k=cu_seqlens_k.to(torch.int32),
        max_seqlen_q=max(query_lens).item(),
        max_seqlen_k=max(key_values_lens).item(),
        causal=is_causal,
    )


def siglip_style_attention(query_states, key_states, value_states, cu_seqlens, max_seqlen):
    """A NaViT vision encoder's attention: positional arguments, no mask."""
    return flash_attn_varlen_func(query_states, key_states, value_states, cu_seqlens, cu_seqlens, max_seqlen,
                                  max_seqlen, causal=False)


@pytest.mark.parametrize("is_causal", [True, False])
def test_bagel_style_cached_call(torch_backend, is_causal):
    gen = torch.Generator().manual_seed(2)
    h, hkv, d = 4, 2, 32
    past, new = [6, 10], [3, 4]  # two samples: cached tokens, then new query tokens appended
    query_lens, kv_lens = torch.tensor(new), torch.tensor(past)
    # merged layout per sample: [past | new]
    starts = [0, past[0] + new[0]]
    q_idx = torch.cat([torch.arange(s + p, s + p + n) for s, p, n in zip(starts, past, new)])
    kv_idx = torch.cat([torch.arange(s, s + p) for s, p in zip(starts, past)])
    q = _rand((sum(new), h, d), torch.float32, "cpu", gen)
    k_new, v_new = _rand((sum(new), hkv, d), torch.float32, "cpu", gen), _rand((sum(new), hkv, d), torch.float32,
                                                                                "cpu", gen)
    k_past, v_past = _rand((sum(past), hkv, d), torch.float32, "cpu", gen), _rand((sum(past), hkv, d),
                                                                                  torch.float32, "cpu", gen)
    out = bagel_style_attention(q, k_new, v_new, query_lens, k_past, v_past, kv_lens, q_idx, kv_idx, is_causal)
    merged_k = torch.zeros(sum(past) + sum(new), hkv, d)
    merged_v = torch.zeros_like(merged_k)
    merged_k[q_idx], merged_k[kv_idx] = k_new, k_past
    merged_v[q_idx], merged_v[kv_idx] = v_new, v_past
    mask = fa_mask(new, [p + n for p, n in zip(past, new)], is_causal)
    ref, _ = dense_attention(q, [merged_k], [merged_v], [mask])
    torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=1e-5)


def test_siglip_style_call(torch_backend):
    gen = torch.Generator().manual_seed(3)
    lens = [16, 9, 25]
    x = [_rand((sum(lens), 4, 72), torch.float32, "cpu", gen) for _ in range(3)]
    check(lambda q, k, v: siglip_style_attention(q, k, v, cu_of(lens), max(lens)), *x, fa_mask(lens, lens, False),
          torch.float32)


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------

Q = torch.randn(10, 4, 32)
K = V = torch.randn(10, 2, 32)
CU = cu_of([4, 6])


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(return_attn_probs=True), ValueError, "testing only"),
    (dict(dropout_p=0.1), NotImplementedError, "dropout_p"),
    (dict(softcap=30.0), NotImplementedError, "softcap"),
    (dict(alibi_slopes=torch.zeros(4)), NotImplementedError, "alibi_slopes"),
    (dict(block_table=torch.zeros(2, 1, dtype=I32)), NotImplementedError, "block_table"),
    (dict(window_size=3), ValueError, "window_size"),
    (dict(max_seqlen_q=torch.tensor(6)), ValueError, "max_seqlen_q"),
    (dict(window_size=(2, 0), max_seqlen_k=5), ValueError, "max_seqlen_k = 5 is smaller"),
    (dict(window_size=(2, 0), cu_seqlens_k=cu_of([4, 5])), ValueError, r"cu_seqlens_k\[-1\]"),
])
def test_varlen_errors(torch_backend, kwargs, exc, match):
    args = dict(q=Q, k=K, v=V, cu_seqlens_q=CU, cu_seqlens_k=CU, max_seqlen_q=6, max_seqlen_k=6)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        flash_attn_varlen_func(**args)


def test_dense_errors(torch_backend):
    with pytest.raises(ValueError, match="testing only"):
        flash_attn_func(Q[None], K[None], V[None], return_attn_probs=True)
    with pytest.raises(ValueError, match="batch_size, seqlen"):
        flash_attn_func(Q, K, V)
    with pytest.raises(ValueError, match="batch size"):
        flash_attn_func(Q[None], K[None].expand(2, -1, -1, -1), V[None].expand(2, -1, -1, -1))


# --------------------------------------------------------------------------------------------------
# Triton kernels: interpreter (CPU) and GPU
# --------------------------------------------------------------------------------------------------


INTERPRET_CASES = [  # small: every kernel program runs in numpy
    (True, (-1, -1), [3, 9], [11, 9], 2, 1),
    (True, (3, -1), [10, 0, 6], [10, 0, 8], 2, 1),
    (False, (2, 5), [7], [6], 2, 1),
]


@interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", INTERPRET_CASES, ids=_case_id)
def test_interpret_varlen(triton_backend, case, dtype):
    causal, window, lq, lk, h, hkv = case
    gen = torch.Generator().manual_seed(0)
    q, k, v = (_rand((sum(lq), h, 32), dtype, "cpu", gen), _rand((sum(lk), hkv, 32), dtype, "cpu", gen),
               _rand((sum(lk), hkv, 32), dtype, "cpu", gen))
    cq, ck = cu_of(lq), cu_of(lk)
    fn = lambda q, k, v: flash_attn_varlen_func(q, k, v, cq, ck, max(lq), max(lk), causal=causal, window_size=window)
    check(fn, q, k, v, fa_mask(lq, lk, causal, window), dtype)


@gpu
@pytest.mark.parametrize("window", [(-1, -1), (255, 0)])
def test_gpu_varlen_bf16(triton_backend, window):
    gen = torch.Generator().manual_seed(0)
    lens = [300, 1024, 77, 600]
    q = _rand((sum(lens), 8, 128), torch.bfloat16, "cuda", gen)
    k = _rand((sum(lens), 2, 128), torch.bfloat16, "cuda", gen)
    v = _rand((sum(lens), 2, 128), torch.bfloat16, "cuda", gen)
    cu = cu_of(lens, "cuda")
    fn = lambda q, k, v: flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), causal=True, window_size=window)
    check(fn, q, k, v, fa_mask(lens, lens, True, window).cuda(), torch.bfloat16)
