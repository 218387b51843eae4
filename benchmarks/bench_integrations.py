"""A Hugging Face Qwen2 decoder on a packed batch: ``attn_implementation="unigendet"`` against ``"sdpa"``.

    pytest benchmarks/bench_integrations.py --benchmark-only

Forward + backward (cross-entropy on every token) of a randomly initialised ``Qwen2ForCausalLM`` over one
row of packed documents told apart by ``position_ids`` restarting at 0, the input transformers' own
packing support expects. Both providers get exactly that input:

``unigendet``  the registered attention implementation (``unigendet.integrations.transformers``): one
               layout per batch, documents attend only to themselves, no dense mask;
``sdpa``       transformers' SDPA path, which builds the block-diagonal causal mask from ``position_ids``
               (a dense (tokens x tokens) mask) and runs ``scaled_dot_product_attention`` with it.

CPU: a tiny width (hidden 128, 2 layers) on 1k tokens, fp32, the ``torch`` backend. GPU (skips without CUDA):
4 layers of Qwen2-1.5B width (hidden 1536, 12 query / 2 KV heads of 128, MLP 8960, vocabulary 32k) in bf16 on
16k tokens of 512-4k-token documents, the Triton backend. ``extra_info``: tokens, documents, tokens/s,
TFLOP/s over the step's FLOPs (6 x linear weights x tokens, plus 3.5 x 4 x head_dim x heads per visible
causal pair and layer) and peak device memory.
"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import HAS_CUDA, mean_seconds, peak_memory_bytes, run_pedantic

from unigendet import _backend

SHAPES = {
    # name: device, dtype, backend, config, total tokens, document length range
    "cpu-tiny": ("cpu", torch.float32, "torch",
                 dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32, vocab_size=1000), 1024, (64, 320)),
    "gpu-qwen2-1.5b-width": ("cuda", torch.bfloat16, "triton",
                             dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=4,
                                  num_attention_heads=12, num_key_value_heads=2, head_dim=128, vocab_size=32768),
                             16384, (512, 4096)),
}


def documents(total: int, lo: int, hi: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    lens = []
    while sum(lens) < total:
        lens.append(min(rng.randint(lo, hi), total - sum(lens)))
    return lens


def step_flops(cfg, lens: list[int]) -> float:
    """FLOPs of one forward + backward: linear layers (incl. the LM head) and causal attention over documents."""
    h, d, nh, nkv = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    per_layer = h * (nh + 2 * nkv) * d + nh * d * h + 3 * h * cfg.intermediate_size
    linear = cfg.num_hidden_layers * per_layer + h * cfg.vocab_size
    tokens = sum(lens)
    pairs = sum(n * (n + 1) // 2 for n in lens)
    return 6.0 * linear * tokens + 3.5 * 4.0 * d * nh * pairs * cfg.num_hidden_layers


@pytest.mark.parametrize("provider", ["unigendet", "sdpa"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_qwen2_packed_step(benchmark, monkeypatch, shape, provider):
    device, dtype, backend, over, total, (lo, hi) = SHAPES[shape]
    if device == "cuda":
        if not HAS_CUDA:
            pytest.skip("needs a CUDA device")
        pytest.importorskip("triton")
    from transformers import AutoModelForCausalLM, Qwen2Config

    import unigendet.integrations.transformers  # noqa: F401  (registers "unigendet")

    monkeypatch.setenv(_backend.ENV_VAR, backend)
    benchmark.group = f"hf-qwen2-packed-{shape}-fwd_bwd"
    cfg = Qwen2Config(max_position_embeddings=8192, use_cache=False, **over)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=provider).to(device=device, dtype=dtype)
    model.train()
    lens = documents(total, lo, hi)
    ids = torch.randint(0, cfg.vocab_size, (1, total), device=device)
    pos = torch.cat([torch.arange(n) for n in lens]).unsqueeze(0).to(device)

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, position_ids=pos, labels=ids).loss
        loss.backward()
        return loss

    run_pedantic(benchmark, step, device, rounds=5 if device == "cuda" else 3, warmup_rounds=1)
    t = mean_seconds(benchmark)
    flops = step_flops(cfg, lens)
    benchmark.extra_info.update(tokens=total, documents=len(lens), tokens_per_s=total / t if t > 0 else 0.0,
                                tflops=flops / t / 1e12 if t > 0 else 0.0, gflop=flops / 1e9)
    mem = peak_memory_bytes(step, device)
    if mem is not None:
        benchmark.extra_info["peak_mem_bytes"] = mem
