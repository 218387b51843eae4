"""Packed attention benchmarks: BAGEL-7B packs, SigLIP varlen, symbiotic multi-source attention.

    pytest benchmarks/bench_attention.py --benchmark-only

Providers (GPU cases skip without CUDA; optional peers skip when not importable):

``ours``            the Triton kernels through the public API (``backend="triton"``);
``torch-ref``       the memory-bounded ``torch`` reference backend;
``sdpa-varlen``     ``torch.nn.attention.varlen.varlen_attn`` (plain varlen layouts only);
``flex``            compiled FlexAttention with a block mask built from the same splits;
``reference-code``  the public-code approach: per-sample SDPA with a dense additive mask and K/V heads
                    repeated to the query heads;
``flash-attn``      ``flash_attn_varlen_func`` (plain varlen layouts only);
``xformers``        ``memory_efficient_attention`` with a block-diagonal (causal) mask.

A tiny CPU case compares the ``torch`` backend against the public-code approach so CPU ratios print.
``extra_info`` holds TFLOP/s counted over *visible* (query, key) pairs only (4 * D * pairs * H forward,
2.5x that backward, 3.5x forward+backward) and the peak device memory of one call.
"""

from __future__ import annotations

import importlib.util
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import HAS_CUDA, mean_seconds, peak_memory_bytes, run_pedantic

from unigendet.ops.attention import packed_attention, packed_attention_reference, smsa_attention
from unigendet.ops.layout import AttentionLayout

MODE_ID = {"full": 0, "causal": 1, "noise": 2}


# --------------------------------------------------------------------------------------------------
# Shapes and FLOP accounting
# --------------------------------------------------------------------------------------------------


def fakeclue_samples(total_tokens: int, seed: int = 0, lo: int = 1_500, hi: int = 9_000):
    """FakeClue-like BAGEL samples of ``lo``-``hi`` tokens packed up to ``total_tokens``.

    Each sample: a causal text prompt, full-attention ViT tokens, a causal explanation, and noised VAE
    latents (noise split): the splits an understanding + generation batch mixes.
    """
    rng = random.Random(seed)
    samples, total = [], 0
    while total < total_tokens:
        n = min(rng.randint(lo, hi), total_tokens - total)
        if n < 8:
            break
        vae, vit = n // 2, n // 3
        txt = n - vae - vit
        samples.append([(txt // 2, "causal"), (vit, "full"), (txt - txt // 2, "causal"), (vae, "noise")])
        total += n
    return samples, total


def visible_pairs(plan) -> int:
    """Number of visible (query, key) pairs of a kernel plan (host copy), summed over sources."""
    q_ranges, kv_ptr, ents = plan.q_ranges.tolist(), plan.kv_ptr.tolist(), plan.kv_entries.tolist()
    pairs = 0
    for r, (qs, qe) in enumerate(q_ranges):
        for k0, k1, diag, flags in ents[kv_ptr[r]:kv_ptr[r + 1]]:
            if k1 <= k0 or qe <= qs:
                continue
            if flags & 1:
                q = torch.arange(qs, qe, dtype=torch.int64)
                pairs += int((torch.minimum(q + diag + 1, torch.tensor(k1)) - k0).clamp(0, k1 - k0).sum())
            else:
                pairs += (qe - qs) * (k1 - k0)
    return pairs


def attention_flops(pairs: int, heads: int, head_dim: int, mode: str) -> float:
    """FLOPs of attention over ``pairs`` visible pairs: fwd 4*D per pair and head, bwd 2.5x, fwd_bwd 3.5x."""
    fwd = 4.0 * head_dim * pairs * heads
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd_bwd": 3.5 * fwd}[mode]


def _record(benchmark, flops: float, fn, device) -> None:
    t = mean_seconds(benchmark)
    benchmark.extra_info["tflops"] = flops / t / 1e12 if t > 0 else 0.0
    benchmark.extra_info["gflop"] = flops / 1e9
    mem = peak_memory_bytes(fn, device)
    if mem is not None:
        benchmark.extra_info["peak_mem_bytes"] = mem


# --------------------------------------------------------------------------------------------------
# Providers
# --------------------------------------------------------------------------------------------------


def token_labels(samples):
    """Per-token (sample id, global split id, mode id) in packed order."""
    sample_id, split_id, mode = [], [], []
    g = 0
    for si, sample in enumerate(samples):
        for n, m in sample:
            sample_id += [si] * n
            split_id += [g] * n
            mode += [MODE_ID[m]] * n
            g += 1
    return [torch.tensor(x, dtype=torch.int32) for x in (sample_id, split_id, mode)]


def bagel_visible(sample_q, split_q, mode_q, q_idx, sample_k, split_k, mode_k, k_idx):
    """BAGEL rule on labels: earlier non-noise splits of the same sample, and the own split (causal or not)."""
    same = sample_q == sample_k
    earlier = (split_k < split_q) & (mode_k != MODE_ID["noise"])
    own = (split_k == split_q) & ((mode_q != MODE_ID["causal"]) | (k_idx <= q_idx))
    return same & (earlier | own)


def reference_code_masks(samples, device, dtype):
    """Per-sample additive masks (0 / -inf), as the public code builds them in its data pipeline."""
    masks, start = [], 0
    for sample in samples:
        n = sum(length for length, _ in sample)
        sid, spl, mode = (x.to(device) for x in token_labels([sample]))
        idx = torch.arange(n, device=device)
        vis = bagel_visible(sid[:, None], spl[:, None], mode[:, None], idx[:, None],
                            sid[None, :], spl[None, :], mode[None, :], idx[None, :])
        masks.append(torch.zeros(n, n, device=device, dtype=dtype).masked_fill(~vis, float("-inf")))
        start += n
    return masks


def reference_code_attention(q, k, v, masks, scale):
    """Public-code approach: loop over samples, repeat K/V heads, SDPA with a dense additive mask."""
    h, hkv = q.shape[1], k.shape[1]
    outs, start = [], 0
    for m in masks:
        n = m.shape[0]
        qs = q[start:start + n].transpose(0, 1).unsqueeze(0)
        ks = k[start:start + n].repeat_interleave(h // hkv, 1).transpose(0, 1).unsqueeze(0)
        vs = v[start:start + n].repeat_interleave(h // hkv, 1).transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=m, scale=scale)
        outs.append(o.squeeze(0).transpose(0, 1))
        start += n
    return torch.cat(outs, 0)


def flex_bagel(samples, total, heads, device):
    """A compiled FlexAttention callable with a block mask from the same splits (None if unavailable)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    sid, spl, mode = (x.to(device) for x in token_labels(samples))

    def mask_mod(b, h, q_idx, kv_idx):
        return bagel_visible(sid[q_idx], spl[q_idx], mode[q_idx], q_idx, sid[kv_idx], spl[kv_idx], mode[kv_idx],
                             kv_idx)

    block_mask = create_block_mask(mask_mod, 1, None, total, total, device=device)
    flex = torch.compile(flex_attention, dynamic=False)

    def run(q, k, v, scale):
        o = flex(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0),
                 block_mask=block_mask, scale=scale, enable_gqa=True)
        return o.squeeze(0).transpose(0, 1)

    return run


def _bench(benchmark, fn, inputs, flops_fwd: float, mode: str, device, rounds: int = 5):
    """Time ``fn(*inputs)`` forward (no grad) or forward+backward; record TFLOP/s and peak memory."""
    if mode == "fwd":
        def call():
            with torch.no_grad():
                return fn(*inputs)
        flops = flops_fwd
    else:
        leaves = [t.detach().requires_grad_() if t.is_floating_point() else t for t in inputs]
        dout = None

        def call():
            nonlocal dout
            for t in leaves:
                t.grad = None
            out = fn(*leaves)
            if dout is None:
                dout = torch.randn_like(out)
            out.backward(dout)
            return out
        flops = flops_fwd * 3.5
    run_pedantic(benchmark, call, device, rounds=rounds, warmup_rounds=2)
    _record(benchmark, flops, call, device)


# --------------------------------------------------------------------------------------------------
# GPU: BAGEL-7B packed layout (28 q heads, 4 kv heads, D=128, ~33k tokens)
# --------------------------------------------------------------------------------------------------

GPU_PROVIDERS = ["ours", "flex", "reference-code", "torch-ref"]


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("provider", GPU_PROVIDERS)
def test_bagel7b_pack(benchmark, provider, mode):
    benchmark.group = f"bagel7b-pack-33k-{mode}"
    device, dtype, h, hkv, d = torch.device("cuda"), torch.bfloat16, 28, 4, 128
    samples, total = fakeclue_samples(33_000)
    layout = AttentionLayout.from_splits(samples, device=device)
    pairs = visible_pairs(layout.plan_cpu)
    scale = d**-0.5
    q = torch.randn(total, h, d, device=device, dtype=dtype)
    k = torch.randn(total, hkv, d, device=device, dtype=dtype)
    v = torch.randn(total, hkv, d, device=device, dtype=dtype)
    if provider == "ours":
        pytest.importorskip("triton")

        def fn(q, k, v):
            return packed_attention(q, k, v, layout, scale, backend="triton")
    elif provider == "torch-ref":
        if mode == "fwd_bwd":
            pytest.skip("the torch reference is timed forward only at this size")

        def fn(q, k, v):
            return packed_attention_reference(q, [k], [v], layout.plan, scale)[0]
    elif provider == "flex":
        flex = flex_bagel(samples, total, h, device)
        if flex is None:
            pytest.skip("FlexAttention unavailable")

        def fn(q, k, v):
            return flex(q, k, v, scale)
    else:
        masks = reference_code_masks(samples, device, dtype)

        def fn(q, k, v):
            return reference_code_attention(q, k, v, masks, scale)
    benchmark.extra_info.update(tokens=total, samples=len(samples), visible_pairs=pairs)
    _bench(benchmark, fn, (q, k, v), attention_flops(pairs, h, d, "fwd"), mode, device)


# --------------------------------------------------------------------------------------------------
# GPU: plain varlen (causal text packs, SigLIP full attention) against the varlen libraries
# --------------------------------------------------------------------------------------------------

VARLEN_SHAPES = {
    # name: (heads, kv heads, head dim, causal, sequence lengths)
    "bagel7b-causal": (28, 4, 128, True, [sum(n for n, _ in s) for s in fakeclue_samples(33_000)[0]]),
    "siglip-d72": (16, 16, 72, False, [729, 4900, 1024, 2304, 4096, 1600, 3136, 729, 4900]),
}
VARLEN_PROVIDERS = ["ours", "sdpa-varlen", "flex", "flash-attn", "xformers", "reference-code"]


def _varlen_peer(provider, cu, max_len, causal, h, hkv, lengths, device, scale):
    if provider == "sdpa-varlen":
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            pytest.skip("torch.nn.attention.varlen unavailable")
        ws = (-1, 0) if causal else (-1, -1)
        return lambda q, k, v: varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scale, window_size=ws,
                                           enable_gqa=h != hkv)
    if provider == "flash-attn":
        if importlib.util.find_spec("flash_attn") is None:
            pytest.skip("flash-attn not installed")
        from flash_attn import flash_attn_varlen_func

        return lambda q, k, v: flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, softmax_scale=scale,
                                                      causal=causal)
    if provider == "xformers":
        if importlib.util.find_spec("xformers") is None:
            pytest.skip("xformers not installed")
        from xformers.ops import fmha

        bias = (fmha.attn_bias.BlockDiagonalCausalMask if causal else fmha.attn_bias.BlockDiagonalMask)
        bias = bias.from_seqlens(lengths)

        def run(q, k, v):
            g = h // hkv
            qq = q.view(1, -1, hkv, g, q.shape[-1])
            kk = k.view(1, -1, hkv, 1, k.shape[-1]).expand(-1, -1, -1, g, -1)
            vv = v.view(1, -1, hkv, 1, v.shape[-1]).expand(-1, -1, -1, g, -1)
            return fmha.memory_efficient_attention(qq, kk, vv, attn_bias=bias, scale=scale).view(q.shape)
        return run
    if provider == "flex":
        samples = [[(n, "causal" if causal else "full")] for n in lengths]
        flex = flex_bagel(samples, sum(lengths), h, device)
        if flex is None:
            pytest.skip("FlexAttention unavailable")
        return lambda q, k, v: flex(q, k, v, scale)
    masks = reference_code_masks([[(n, "causal" if causal else "full")] for n in lengths], device, torch.bfloat16)
    return lambda q, k, v: reference_code_attention(q, k, v, masks, scale)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("provider", VARLEN_PROVIDERS)
@pytest.mark.parametrize("shape", list(VARLEN_SHAPES))
def test_varlen(benchmark, shape, provider, mode):
    benchmark.group = f"varlen-{shape}-{mode}"
    h, hkv, d, causal, lengths = VARLEN_SHAPES[shape]
    device, dtype = torch.device("cuda"), torch.bfloat16
    total, max_len = sum(lengths), max(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    layout = AttentionLayout.varlen(cu, cu, causal, total_q=total, total_k=total, max_seqlen_q=max_len,
                                    max_seqlen_k=max_len)
    pairs = visible_pairs(layout.plan_cpu)
    scale = d**-0.5
    q = torch.randn(total, h, d, device=device, dtype=dtype)
    k = torch.randn(total, hkv, d, device=device, dtype=dtype)
    v = torch.randn(total, hkv, d, device=device, dtype=dtype)
    if provider == "ours":
        pytest.importorskip("triton")

        def fn(q, k, v):
            return packed_attention(q, k, v, layout, scale, backend="triton")
    else:
        fn = _varlen_peer(provider, cu, max_len, causal, h, hkv, lengths, device, scale)
    benchmark.extra_info.update(tokens=total, visible_pairs=pairs)
    _bench(benchmark, fn, (q, k, v), attention_flops(pairs, h, d, "fwd"), mode, device)


# --------------------------------------------------------------------------------------------------
# GPU: symbiotic multi-source attention (detection queries over gen / det / text K/V)
# --------------------------------------------------------------------------------------------------


def smsa_cat_then_ours(cu_q, cus, scale, backend):
    """SMSA by concatenating each sample's generative, detection and text K/V, then one varlen attention."""
    offs = [c.tolist() for c in cus]
    b = len(offs[0]) - 1
    lens = [offs[0][i + 1] - offs[0][i] + offs[1][i + 1] - offs[1][i] + offs[2][i + 1] - offs[2][i] for i in range(b)]
    cu_k = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=cu_q.device)
    cat_layout = AttentionLayout.varlen(cu_q, cu_k, False)

    def fn(q, kg, vg, kd, vd, kt, vt):
        ks = torch.cat([t[o[i]:o[i + 1]] for i in range(b) for t, o in zip((kg, kd, kt), offs)], 0)
        vs = torch.cat([t[o[i]:o[i + 1]] for i in range(b) for t, o in zip((vg, vd, vt), offs)], 0)
        return packed_attention(q, ks, vs, cat_layout, scale, backend=backend)
    return fn


def smsa_reference_code(lq, cus, h, hkv, scale):
    """The public code's SMSA: per sample, concatenate the three K/V groups, repeat the K/V heads, SDPA."""
    offs = [c.tolist() for c in cus]
    starts = [sum(lq[:i]) for i in range(len(lq))]

    def fn(q, kg, vg, kd, vd, kt, vt):
        outs = []
        for i, s0 in enumerate(starts):
            qs = q[s0:s0 + lq[i]].transpose(0, 1).unsqueeze(0)
            ks = torch.cat([t[o[i]:o[i + 1]] for t, o in zip((kg, kd, kt), offs)], 0)
            vs = torch.cat([t[o[i]:o[i + 1]] for t, o in zip((vg, vd, vt), offs)], 0)
            ks = ks.repeat_interleave(h // hkv, 1).transpose(0, 1).unsqueeze(0)
            vs = vs.repeat_interleave(h // hkv, 1).transpose(0, 1).unsqueeze(0)
            outs.append(F.scaled_dot_product_attention(qs, ks, vs, scale=scale).squeeze(0).transpose(0, 1))
        return torch.cat(outs, 0)
    return fn


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("provider", ["ours", "cat+ours", "reference-code"])
def test_smsa(benchmark, provider, mode):
    """8 detection samples at 512^2: 1,371 ViT queries over 1,026 VAE + 1,371 ViT + ~260 text keys."""
    benchmark.group = f"smsa-det512-{mode}"
    device, dtype, h, hkv, d, b = torch.device("cuda"), torch.bfloat16, 28, 4, 128, 8
    lq = [1371] * b
    lens = {"gen": [1026] * b, "det": lq, "txt": [240 + 5 * i for i in range(b)]}

    def cu(x):
        return torch.tensor([0, *torch.tensor(x).cumsum(0).tolist()], dtype=torch.int32, device=device)

    cu_q = cu(lq)
    cus = [cu(lens[n]) for n in ("gen", "det", "txt")]
    scale = d**-0.5
    q = torch.randn(sum(lq), h, d, device=device, dtype=dtype)
    kv = [torch.randn(sum(lens[n]), hkv, d, device=device, dtype=dtype) for n in ("gen", "gen", "det", "det",
                                                                                      "txt", "txt")]
    layout = AttentionLayout.smsa(cu_q, cus)
    pairs = visible_pairs(layout.plan_cpu)
    if provider == "ours":
        pytest.importorskip("triton")

        def fn(q, kg, vg, kd, vd, kt, vt):
            return smsa_attention(q, kg, vg, kd, vd, kt, vt, cu_q, *cus, max(lq), max(lens["gen"]),
                                  max(lens["det"]), max(lens["txt"]), scale, backend="triton")
    elif provider == "cat+ours":
        pytest.importorskip("triton")
        fn = smsa_cat_then_ours(cu_q, cus, scale, "triton")
    else:
        fn = smsa_reference_code(lq, cus, h, hkv, scale)
    benchmark.extra_info.update(visible_pairs=pairs)
    _bench(benchmark, fn, (q, *kv), attention_flops(pairs, h, d, "fwd"), mode, device)


# --------------------------------------------------------------------------------------------------
# CPU: tiny BAGEL pack, auto (sdpa) and torch backends against the public-code approach (prints CPU ratios)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("provider", ["unigendet", "unigendet-torch", "reference-code"])
def test_cpu_tiny_pack(benchmark, provider, mode):
    benchmark.group = f"cpu-tiny-pack-{mode}"
    device, dtype, h, hkv, d = torch.device("cpu"), torch.float32, 4, 1, 64
    samples, total = fakeclue_samples(600, seed=1, lo=150, hi=300)
    layout = AttentionLayout.from_splits(samples)
    pairs = visible_pairs(layout.plan_cpu)
    assert 0 < pairs <= total * total
    assert attention_flops(pairs, h, d, "fwd_bwd") == 3.5 * attention_flops(pairs, h, d, "fwd")
    scale = d**-0.5
    q = torch.randn(total, h, d, dtype=dtype)
    k = torch.randn(total, hkv, d, dtype=dtype)
    v = torch.randn(total, hkv, d, dtype=dtype)
    if provider.startswith("unigendet"):
        backend = "torch" if provider == "unigendet-torch" else None  # None: what auto picks on the CPU

        def fn(q, k, v):
            return packed_attention(q, k, v, layout, scale, backend=backend)
    else:
        masks = reference_code_masks(samples, device, dtype)

        def fn(q, k, v):
            return reference_code_attention(q, k, v, masks, scale)
    benchmark.extra_info.update(tokens=total, visible_pairs=pairs)
    _bench(benchmark, fn, (q, k, v), attention_flops(pairs, h, d, "fwd"), mode, device, rounds=30)
