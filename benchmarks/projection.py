"""Project the paper's training budget from a measured decoder-layer step and the FLOP count of the full model.

    python benchmarks/projection.py --out benchmarks/results/projection

1. **Measure** forward+backward of ``--layers`` MoT decoder layers on a FakeClue-like pack through our fused path
   (expert-contiguous projections + ``packed_attention`` over the pack's layout). On a GPU the layers have
   BAGEL-7B's width in bf16 and the pack has ``--tokens`` (default 16384, one GPU's share of a step); on a CPU the
   tiny preset's width and a small pack are used so the script still runs (the projection is then for this CPU).
2. **Count** the FLOPs of one training step of the full model per GPU: the 28-layer LLM (weights x 2 per token
   forward, attention 4*D per visible pair and head; backward 2x forward; activation recompute adds a forward),
   SigLIP on the ViT tokens, the VAE encoder (counted analytically, equal to ``torch.utils.flop_counter``'s count), and
   for DIGA the teacher's no-grad pass (first 8 layers + SigLIP) instead of the ViT training.
3. **Project**: step time = step FLOPs / the achieved FLOP/s of step 1 (assumption: the ViT and VAE run at the
   decoder layers' efficiency); GDUF = 1000 steps, DIGA = 500 steps, each of 16384 x 8 tokens on 8 GPUs (perfect
   data-parallel scaling assumed). Other cards are derived by scaling with dense bf16 peaks (A100 312, H100 989
   TFLOP/s) from the measured card, when it is one of them.

Writes ``projection.json`` and ``projection.md``; every assumption is written next to the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import fakeclue_samples, visible_pairs  # noqa: E402
from bench_train_step import decoder_pack  # noqa: E402

from unigendet.models import get_config  # noqa: E402
from unigendet.models.qwen2_mot import MoTDecoderLayer, rope_cos_sin  # noqa: E402
from unigendet.ops import AttentionLayout, packed_attention  # noqa: E402
from unigendet.train.flops import PaperSchedule, active_params_per_token  # noqa: E402

PEAK_BF16_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0}
#: Share of a GDUF pack's tokens that are ViT tokens (a 512 px FakeClue sample has ~1.4k of ~2.6k; generation
#: samples have none; 1:1 mix) and images per 16k-token pack (VAE encodes: each sample has one 512 px image).
VIT_TOKEN_SHARE = 0.3
IMAGES_PER_PACK = 8
DIGA_LAYER = 8


def layer_fwd_flops(llm, tokens: int, pairs: int) -> float:
    """Forward FLOPs of one decoder layer over a pack: projections + MLP of one expert per token + attention."""
    weights = active_params_per_token(llm) / llm.num_hidden_layers
    return 2.0 * weights * tokens + 4.0 * llm.head_dim * llm.num_attention_heads * pairs


def measure_layers(device: torch.device, n_layers: int, tokens: int, rounds: int = 5) -> dict:
    """Time forward+backward of ``n_layers`` decoder layers on a FakeClue-like pack; returns times and FLOPs."""
    if device.type == "cuda":
        llm, dtype = get_config("bagel-7b-mot").llm, torch.bfloat16
        samples, total = fakeclue_samples(tokens, seed=0)
    else:
        llm, dtype = get_config("tiny").llm, torch.float32
        samples, total = fakeclue_samples(tokens, seed=0, lo=150, hi=600)
    pack = decoder_pack(samples, total, device)
    layout, n_und = pack.layout, pack.num_und
    pairs = visible_pairs(layout.plan_cpu if layout.plan_cpu is not None else layout.plan)
    layers = [MoTDecoderLayer(llm).to(device=device, dtype=dtype) for _ in range(n_layers)]
    h = torch.randn(total, llm.hidden_size, device=device, dtype=dtype) * 0.02
    cos, sin = rope_cos_sin(pack.position_ids, llm.head_dim, llm.rope_theta, dtype)

    def attn(q, k, v):
        return packed_attention(q, k, v, layout)

    def step():
        hu = h[:n_und].detach().requires_grad_()
        hg = h[n_und:].detach().requires_grad_()
        a, b = hu, hg
        for layer in layers:
            a, b = layer(a, b, cos, sin, attn)
        (a.float().square().mean() + b.float().square().mean()).backward()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()
    sync()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    per_layer = sorted(times)[len(times) // 2] / n_layers
    fwd = layer_fwd_flops(llm, total, pairs)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "width": "bagel-7b-mot" if device.type == "cuda" else "tiny",
        "dtype": str(dtype).replace("torch.", ""),
        "tokens": total,
        "visible_pairs": pairs,
        "layers_timed": n_layers,
        "seconds_per_layer_fwd_bwd": per_layer,
        "layer_fwd_flops": fwd,
        "achieved_tflops": 3.0 * fwd / per_layer / 1e12,
    }


def vae_encode_flops_per_pixel() -> float:
    """FLUX VAE encoder FLOPs per input pixel at 512 x 512, counted analytically (no diffusers needed)."""
    from unigendet.models.vae import flux_encoder_flops

    return flux_encoder_flops(get_config("bagel-7b-mot").vae, 512, 512) / (512 * 512)


def step_flops(tokens: int, pairs_per_token: float) -> dict:
    """FLOPs of one GDUF and one DIGA step on one GPU (``tokens`` per GPU per step)."""
    cfg = get_config("bagel-7b-mot")
    llm, vit = cfg.llm, cfg.vit
    layer_fwd = layer_fwd_flops(llm, tokens, int(pairs_per_token * tokens))
    llm_fwd = layer_fwd * llm.num_hidden_layers + 2.0 * llm.hidden_size * llm.vocab_size * tokens * 0.05
    vit_tokens = VIT_TOKEN_SHARE * tokens
    vit_params = vit.num_layers * (4 * vit.hidden_size**2 + 2 * vit.hidden_size * vit.intermediate_size)
    vit_fwd = 2.0 * vit_params * vit_tokens + 4.0 * vit.hidden_size * vit.num_layers * vit_tokens * 1400
    vae = vae_encode_flops_per_pixel()
    vae_fwd = vae * 512 * 512 * IMAGES_PER_PACK
    # training: forward + backward (2x) + recompute (1x) = 4x forward for the LLM and the ViT
    gduf = 4.0 * llm_fwd + 4.0 * vit_fwd + vae_fwd
    teacher = layer_fwd * DIGA_LAYER + vit_fwd  # no-grad teacher pass reusing the clean latents
    diga = 4.0 * llm_fwd + teacher + vae_fwd
    return {"gduf": gduf, "diga": diga, "llm_fwd": llm_fwd, "vit_fwd": vit_fwd, "vae_fwd": vae_fwd,
            "teacher_fwd": teacher, "vae_flops_per_pixel": vae}


def project(measured: dict, flops: dict, sched: PaperSchedule) -> dict:
    rate = measured["achieved_tflops"] * 1e12
    cards = {"measured": rate}
    name = measured["device"]
    for card, peak in PEAK_BF16_TFLOPS.items():
        if card in name:
            for other, p in PEAK_BF16_TFLOPS.items():
                cards[f"8x {other} (scaled from {card} by peak bf16)"] = rate * p / peak
    out = {}
    for label, r in cards.items():
        g = sched.gduf_steps * flops["gduf"] / r / 3600
        d = sched.diga_steps * flops["diga"] / r / 3600
        out[label if label != "measured" else f"8x {name} (measured card)"] = {
            "gduf_hours": g, "diga_hours": d, "total_hours": g + d}
    return out


def markdown(report: dict) -> str:
    m = report["measured"]
    lines = [
        "# Projected wall time of the paper's schedule",
        "",
        f"Measured: {m['layers_timed']} MoT decoder layer(s) of {m['width']} width, {m['dtype']}, pack of "
        f"{m['tokens']} tokens on {m['device']}: {m['seconds_per_layer_fwd_bwd'] * 1e3:.2f} ms per layer "
        f"forward+backward, {m['achieved_tflops']:.3g} TFLOP/s achieved.",
        "",
        "| hardware | GDUF (h) | DIGA (h) | total (h) | paper (h) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for label, r in report["projection"].items():
        lines.append(f"| {label} | {r['gduf_hours']:.1f} | {r['diga_hours']:.1f} | {r['total_hours']:.1f} | "
                     f"{report['paper_hours']:.0f} (8x A100) |")
    lines += ["", "Assumptions:"] + [f"- {a}" for a in report["assumptions"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "projection"))
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--tokens", type=int, default=None, help="pack size (default 16384 on GPU, 1024 on CPU)")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokens = args.tokens or (16384 if device.type == "cuda" else 1024)
    measured = measure_layers(device, args.layers, tokens, args.rounds)
    sched = PaperSchedule()
    per_gpu = sched.tokens_per_step // 8
    samples, total = fakeclue_samples(per_gpu, seed=0)
    pairs_per_token = visible_pairs(AttentionLayout.from_splits(samples).plan_cpu) / total
    flops = step_flops(per_gpu, pairs_per_token)
    report = {
        "measured": measured,
        "step_flops": flops,
        "projection": project(measured, flops, sched),
        "paper_hours": sched.paper_hours_gduf + sched.paper_hours_diga,
        "assumptions": [
            f"{sched.gduf_steps} GDUF + {sched.diga_steps} DIGA steps of {sched.tokens_per_step} tokens on 8 GPUs "
            "with perfect data-parallel scaling (communication hidden behind compute)",
            "ViT, VAE encoder and LM head run at the measured decoder layers' FLOP efficiency",
            f"ViT tokens are {VIT_TOKEN_SHARE:.0%} of a GDUF pack; {IMAGES_PER_PACK} images of 512x512 are "
            "VAE-encoded per GPU step; LM-head logits only at the ~5% text positions with a loss",
            "training costs 4x forward (backward 2x, activation recompute 1x); the DIGA teacher is a no-grad pass "
            f"of the first {DIGA_LAYER} layers plus SigLIP and reuses the clean latents",
            f"visible attention pairs per token as in a FakeClue-like pack of {per_gpu} tokens (samples of "
            f"1.5k-9k tokens): {pairs_per_token:.0f}",
            "other cards scaled from the measured one by dense bf16 peak (A100 312, H100 989 TFLOP/s)",
        ],
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "projection.json"), "w") as f:
        json.dump(report, f, indent=2)
    md = markdown(report)
    with open(os.path.join(args.out, "projection.md"), "w") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
