"""Per-GPU memory of a sharded training run, from the model's parameter counts (counted on the meta device).

    python -m unigendet.train.memory bagel-7b-mot --world-size 8

Training keeps fp32 master weights, fp32 gradients and fp32 AdamW moments (and an fp32 EMA when ``ema > 0``),
sharded over the ranks by FSDP2; compute runs in bf16 on gathered copies of one decoder block at a time (plus the
root module's own parameters while it computes); the DIGA teacher is a whole bf16 replica on every rank; the
frozen VAE is a replicated bf16 module. These parts are exact byte counts. Activations depend on the pack and on
recomputation; the estimate given for them (with activation checkpointing: each layer's input saved, one layer's
working set recomputed at a time) is a model, and the benchmark report measures the real peak of a two-layer step.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

import torch

__all__ = ["MemoryEstimate", "estimate_training_memory"]

GIB = 2**30
FP32, BF16 = 4, 2


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU, by part (``stage`` is ``gduf`` or ``diga``)."""

    stage: str
    world_size: int
    trainable_params: int
    total_params: int
    master_weights: int
    gradients: int
    optimizer_state: int
    ema: int
    gathered_compute_copies: int
    diga_teacher: int
    vae: int
    activations_estimate: int

    @property
    def states(self) -> int:
        return (self.master_weights + self.gradients + self.optimizer_state + self.ema + self.gathered_compute_copies
                + self.diga_teacher + self.vae)

    @property
    def total(self) -> int:
        return self.states + self.activations_estimate

    def as_dict(self) -> dict:
        d = asdict(self)
        d["states"], d["total"] = self.states, self.total
        return d


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _vae_params(vae_cfg) -> int:
    """FLUX AE parameters (encoder and decoder), or 0 for the parameter-free stand-in."""
    if vae_cfg.kind != "flux":
        return 0
    try:
        from ..models.vae import build_vae

        with torch.device("meta"):
            return _count(build_vae(vae_cfg))
    except ImportError:  # diffusers absent: the published size of the FLUX AE
        return 83_819_683


def estimate_training_memory(model: str = "bagel-7b-mot", *, world_size: int = 8, stage: str = "gduf",
                             ema: bool = True, tokens_per_gpu: int = 16384, grad_checkpointing: bool = True,
                             prefetch_blocks: int = 2) -> MemoryEstimate:
    """Per-GPU bytes of a FSDP2 run of the ``model`` preset (fp32 masters, bf16 compute)."""
    from ..models import UniGenDet, get_config

    if stage not in ("gduf", "diga"):
        raise ValueError(f"stage must be 'gduf' or 'diga', got {stage!r}")
    cfg = get_config(model)
    with torch.device("meta"):
        m = UniGenDet(cfg, build_vae_module=False)
    trainable = set(m.configure_stage(stage))
    named = dict(m.named_parameters())
    total = sum(p.numel() for p in named.values())
    train = sum(named[n].numel() for n in trainable)
    layers = list(m.language_model.model.layers)
    block = max(_count(b) for b in layers)
    root = total - sum(_count(b) for b in layers)  # embeddings, LM head, ViT, connectors, heads
    teacher = _count(m.make_diga_teacher()) if stage == "diga" else 0
    llm = cfg.llm
    h, s = llm.hidden_size, tokens_per_gpu
    if grad_checkpointing:
        # saved: every layer's input; recomputed: one layer's activations (q/k/v/o, two norms, the SwiGLU's
        # gate/up/product, attention output and lse), plus the logits of the ~5% text positions in fp32.
        per_layer_saved = s * h * BF16
        working = s * BF16 * (4 * h + 2 * llm.num_key_value_heads * llm.head_dim + 3 * llm.intermediate_size)
        acts = llm.num_hidden_layers * per_layer_saved + 2 * working
    else:
        working = s * BF16 * (6 * h + 2 * llm.num_key_value_heads * llm.head_dim + 3 * llm.intermediate_size)
        acts = llm.num_hidden_layers * working
    acts += int(0.05 * s) * llm.vocab_size * FP32
    return MemoryEstimate(
        stage=stage, world_size=world_size, trainable_params=train, total_params=total,
        master_weights=total * FP32 // world_size,
        gradients=train * FP32 // world_size,
        optimizer_state=2 * train * FP32 // world_size,
        ema=(train * FP32 // world_size) if ema else 0,
        gathered_compute_copies=(prefetch_blocks * block + root) * BF16,
        diga_teacher=teacher * BF16,
        vae=_vae_params(cfg.vae) * BF16,
        activations_estimate=int(acts),
    )


def markdown(estimates: list[MemoryEstimate]) -> str:
    parts = ("master_weights", "gradients", "optimizer_state", "ema", "gathered_compute_copies", "diga_teacher",
             "vae", "states", "activations_estimate", "total")
    lines = ["| GiB per GPU | " + " | ".join(e.stage.upper() for e in estimates) + " |",
             "| --- |" + " ---: |" * len(estimates)]
    for p in parts:
        lines.append(f"| {p.replace('_', ' ')} | " + " | ".join(f"{e.as_dict()[p] / GIB:.1f}" for e in estimates)
                     + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m unigendet.train.memory", description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default="bagel-7b-mot")
    p.add_argument("--world-size", type=int, default=8)
    p.add_argument("--tokens-per-gpu", type=int, default=16384)
    p.add_argument("--no-ema", action="store_true")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.world_size < 1 or a.tokens_per_gpu < 1:
        p.error("--world-size and --tokens-per-gpu must be positive")
    est = [estimate_training_memory(a.model, world_size=a.world_size, stage=st, ema=not a.no_ema,
                                    tokens_per_gpu=a.tokens_per_gpu) for st in ("gduf", "diga")]
    if a.json:
        print(json.dumps([e.as_dict() for e in est], indent=1))
    else:
        print(f"{a.model}, {a.world_size} GPUs, {a.tokens_per_gpu} tokens per GPU, fp32 masters + bf16 compute:\n")
        print(markdown(est))
    return 0


if __name__ == "__main__":
    sys.exit(main())
