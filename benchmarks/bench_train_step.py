"""End-to-end training-step benchmarks: our decoder path against the public code's path and FlexAttention.

    pytest benchmarks/bench_train_step.py --benchmark-only

``unigendet``       the expert-contiguous decoder (dense matmuls on each expert's slice) with ``packed_attention``
                    over the pack's layout (one layout per pack, reused by every layer);
``reference-code``  a faithful re-statement of the public code: BAGEL token order, per-layer gather/scatter
                    routing into zero tensors, per-sample SDPA over dense masks rebuilt every step, K/V heads
                    repeated (:func:`unigendet.models.reference.reference_decoder`);
``flex``            our decoder with FlexAttention (a block mask built from the same splits) as the attention.

GPU: two decoder layers of BAGEL-7B width (hidden 3584, 28/4 heads, SwiGLU 18944) in bf16 on a FakeClue-like pack
of ~33k tokens, forward + backward. CPU: the tiny preset's decoder on a small pack of the same kind.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from bench_attention import fakeclue_samples, flex_bagel
from conftest import HAS_CUDA, peak_memory_bytes, run_pedantic

from unigendet.models import get_config
from unigendet.models.config import LLMConfig
from unigendet.models.qwen2_mot import Qwen2MoTModel
from unigendet.models.reference import reference_decoder
from unigendet.ops import AttentionLayout, packed_attention


def expert_order(samples) -> tuple[torch.Tensor, int]:
    """Expert-contiguous order of a split list (latent ``noise`` splits go to the generation expert)."""
    is_gen = []
    for sample in samples:
        for length, mode in sample:
            is_gen += [mode == "noise"] * length
    g = torch.tensor(is_gen, dtype=torch.bool)
    idx = torch.arange(len(is_gen))
    return torch.cat([idx[~g], idx[g]]), int((~g).sum())


def decoder_pack(samples, total: int, device):
    """What the decoder needs of a pack: layout in expert order, order, RoPE positions and the split list."""
    order, n_und = expert_order(samples)
    layout = AttentionLayout.from_splits(samples, order=order).to(device)
    return SimpleNamespace(order=order.to(device), num_und=n_und, splits=samples, layout=layout,
                           position_ids=torch.arange(total, device=device)[order.to(device)], seq_len=total)


def _decoder(llm: LLMConfig, device, dtype) -> Qwen2MoTModel:
    torch.manual_seed(0)
    model = Qwen2MoTModel(llm).to(device=device, dtype=dtype)
    for p in model.parameters():  # HF-style init keeps activations in range
        torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else torch.nn.init.ones_(p)
    return model


def _step_fn(provider: str, model: Qwen2MoTModel, pack, h_und0, h_gen0):
    if provider == "unigendet":
        def attn(q, k, v):
            return packed_attention(q, k, v, pack.layout)
    elif provider == "flex":
        flex = flex_bagel(pack.splits, pack.seq_len, model.config.num_attention_heads, h_und0.device)
        if flex is None:
            pytest.skip("FlexAttention is not available")
        scale = model.config.head_dim**-0.5
        # flex works in BAGEL order: permute q/k/v there and back
        inv = torch.empty_like(pack.order)
        inv[pack.order] = torch.arange(pack.order.numel(), device=pack.order.device)

        def attn(q, k, v):
            return flex(q[inv], k[inv], v[inv], scale)[pack.order]
    else:
        attn = None

    def step():
        model.zero_grad(set_to_none=True)
        hu = h_und0.detach().requires_grad_()
        hg = h_gen0.detach().requires_grad_()
        if attn is None:
            und, gen = reference_decoder(model, hu, hg, pack, final_norm=False)
        else:
            out = model(hu, hg, pack.position_ids, attn, final_norm=False)
            und, gen = out["und"], out["gen"]
        (und.float().square().mean() + gen.float().square().mean()).backward()

    return step


def _run(benchmark, provider, llm, samples, total, device, dtype, rounds):
    pack = decoder_pack(samples, total, device)
    model = _decoder(llm, device, dtype)
    h = torch.randn(total, llm.hidden_size, device=device, dtype=dtype)
    step = _step_fn(provider, model, pack, h[: pack.num_und], h[pack.num_und:])
    benchmark.extra_info.update(tokens=total, samples=len(samples), layers=llm.num_hidden_layers)
    run_pedantic(benchmark, step, device, rounds=rounds, warmup_rounds=1)
    benchmark.extra_info["tokens_per_s"] = total / benchmark.stats.stats.mean
    mem = peak_memory_bytes(step, device)
    if mem is not None:
        benchmark.extra_info["peak_mem_bytes"] = mem


@pytest.mark.parametrize("provider", ["unigendet", "reference-code"])
def test_cpu_tiny_decoder_step(benchmark, provider):
    benchmark.group = "cpu-tiny-decoder-fwd_bwd"
    samples, total = fakeclue_samples(1024, seed=0, lo=60, hi=200)
    _run(benchmark, provider, get_config("tiny").llm, samples, total, torch.device("cpu"), torch.float32, 5)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("provider", ["unigendet", "flex", "reference-code"])
def test_gpu_bagel_two_layer_step(benchmark, provider):
    benchmark.group = "gpu-bagel7b-2layers-33k-fwd_bwd"
    llm = get_config("bagel-7b-mot").llm
    llm = LLMConfig(**{**llm.__dict__, "num_hidden_layers": 2})
    samples, total = fakeclue_samples(33_000, seed=0)
    _run(benchmark, provider, llm, samples, total, torch.device("cuda"), torch.bfloat16, 5)


def test_paths_agree():
    """The providers compute the same function (fp64, CPU), so their timings compare like with like."""
    samples, total = fakeclue_samples(300, seed=1, lo=40, hi=120)
    pack = decoder_pack(samples, total, "cpu")
    model = _decoder(get_config("tiny").llm, "cpu", torch.float64)
    h = torch.randn(total, model.config.hidden_size, dtype=torch.float64)
    hu, hg = h[: pack.num_und], h[pack.num_und:]
    out = model(hu, hg, pack.position_ids, lambda q, k, v: packed_attention(q, k, v, pack.layout), final_norm=False)
    ref_und, ref_gen = reference_decoder(model, hu, hg, pack, final_norm=False)
    torch.testing.assert_close(out["und"], ref_und, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out["gen"], ref_gen, rtol=1e-9, atol=1e-9)
