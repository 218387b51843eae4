"""The optimizer and its schedule: AdamW over fp32 master weights, parameter groups, warm-up and cosine decay."""

from __future__ import annotations

import math

import torch

from .config import OptimConfig

__all__ = ["build_optimizer", "build_scheduler", "lr_multiplier"]


def build_optimizer(params, o: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over ``params`` = ``[(parameter, is_generation)]``: weight decay only on matrices, and the generation
    side's learning rate scaled by ``o.gen_lr_scale`` (one group per combination). NVIDIA apex's FusedAdam on a GPU
    when ``o.impl`` is ``auto`` (and apex is installed) or ``apex``; torch's fused (GPU) or foreach (CPU) AdamW
    otherwise."""
    groups = []
    for gen in (False, True):
        for decay in (True, False):
            ps = [p for p, g in params if g == gen and (p.dim() >= 2) == decay]
            if ps:
                groups.append({"params": ps, "weight_decay": o.weight_decay if decay else 0.0,
                               "lr": o.lr * (o.gen_lr_scale if gen else 1.0)})
    if o.impl in ("auto", "apex"):
        try:
            from apex.optimizers import FusedAdam  # NVIDIA apex, optional

            if device.type == "cuda":
                return FusedAdam(groups, lr=o.lr, betas=o.betas, eps=o.eps, adam_w_mode=True)
        except ImportError:
            if o.impl == "apex":
                raise ValueError("optim.impl='apex' but NVIDIA apex is not installed") from None
    kw = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, **kw)


def build_scheduler(opt: torch.optim.Optimizer, o: OptimConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The per-step learning-rate schedule of a stage of ``total_steps`` optimizer steps (:func:`lr_multiplier`)."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier(o, total_steps))


def lr_multiplier(o: OptimConfig, total_steps: int):
    """The learning-rate factor at optimizer step ``s`` (0-based): a linear warm-up over ``o.warmup_steps``, then
    constant (``o.schedule == "constant"``) or a cosine decay to ``o.min_lr_ratio`` at ``total_steps``."""
    warm = o.warmup_steps
    decay = max(1, total_steps - warm)

    def factor(s: int) -> float:
        if warm > 0 and s < warm:
            return (s + 1) / warm
        if o.schedule == "constant":
            return 1.0
        frac = min(1.0, (s - warm) / decay)
        return o.min_lr_ratio + (1.0 - o.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * frac))

    return factor
