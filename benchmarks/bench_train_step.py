"""End-to-end training-step benchmarks: our decoder path against the public code's path.

    pytest benchmarks/bench_train_step.py --benchmark-only

``unigendet``       the expert-contiguous decoder (dense matmuls on each expert's slice) with ``packed_attention``
                    over the pack's layout (one layout per pack, reused by every layer);
``reference-code``  a faithful re-statement of the public code: BAGEL token order, per-layer gather/scatter
                    routing into zero tensors, per-sample SDPA over dense masks with K/V heads repeated
                    (:mod:`unigendet.models.reference`).

CPU: the tiny preset's decoder, forward + backward, on a FakeClue-like pack (detection and generation samples).
"""

from __future__ import annotations

import pytest
import torch
from conftest import run_pedantic

from unigendet.models import UniGenDet, get_config
from unigendet.models.reference import reference_decoder
from unigendet.models.synthetic import DetSpec, GenSpec, make_batch


def _tiny_pack(n_pairs: int = 8):
    cfg = get_config("tiny")
    samples = []
    for i in range(n_pairs):
        samples.append(DetSpec(vae_grid=(4, 4), vit_grid=(4, 4), question_len=12, answer_len=40, label=i % 2))
        samples.append(GenSpec(vae_grid=(4, 4), caption_len=16))
    return cfg, make_batch(cfg, samples, seed=0)


@pytest.mark.parametrize("provider", ["unigendet", "reference-code"])
def test_cpu_tiny_decoder_step(benchmark, provider):
    benchmark.group = "cpu-tiny-decoder-fwd_bwd"
    torch.manual_seed(0)
    cfg, batch = _tiny_pack()
    model = UniGenDet(cfg)
    with torch.no_grad():
        emb = model.embed(batch, generator=torch.Generator().manual_seed(0))
    h_und0, h_gen0 = emb["h_und"].detach(), emb["h_gen"].detach()
    lm = model.language_model.model

    if provider == "unigendet":
        from unigendet.ops import packed_attention

        def attn(q, k, v):
            return packed_attention(q, k, v, batch.layout)

        def step():
            model.zero_grad(set_to_none=True)
            out = lm(h_und0, h_gen0, batch.position_ids, attn, final_norm=False)
            (out["und"].float().pow(2).mean() + out["gen"].float().pow(2).mean()).backward()
    else:
        def step():
            model.zero_grad(set_to_none=True)
            und, gen = reference_decoder(lm, h_und0, h_gen0, batch, final_norm=False)
            (und.float().pow(2).mean() + gen.float().pow(2).mean()).backward()

    benchmark.extra_info.update(tokens=batch.seq_len, samples=len(batch.sample_lens))
    run_pedantic(benchmark, step, "cpu", rounds=5, warmup_rounds=1)
    benchmark.extra_info["tokens_per_s"] = batch.seq_len / benchmark.stats.stats.mean


def test_paths_agree():
    """The two providers above compute the same loss gradients (so their timings compare like with like)."""
    torch.manual_seed(0)
    cfg, batch = _tiny_pack(2)
    model = UniGenDet(cfg).double()
    with torch.no_grad():
        emb = model.embed(batch, generator=torch.Generator().manual_seed(0))
    h_und, h_gen = emb["h_und"].double(), emb["h_gen"].double()
    lm = model.language_model.model
    from unigendet.ops import packed_attention

    out = lm(h_und, h_gen, batch.position_ids, lambda q, k, v: packed_attention(q, k, v, batch.layout),
             final_norm=False)
    ref_und, ref_gen = reference_decoder(lm, h_und, h_gen, batch, final_norm=False)
    torch.testing.assert_close(out["und"], ref_und, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out["gen"], ref_gen, rtol=1e-9, atol=1e-9)
