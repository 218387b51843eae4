"""One optimizer step: forward and backward over the step's packs, the global loss reduction, the update.

:func:`forward_backward` runs ``grad_accum`` packs (bf16 autocast on GPUs over fp32 masters, DDP's gradient sync
only on the last one); :func:`reduce_step` makes every rank see the same losses, token count and pending signal;
:func:`apply_update` clips, steps the optimizer and the schedule and the EMA, or skips a non-finite step.
"""

from __future__ import annotations

import contextlib
import math
import zlib

import torch

__all__ = ["apply_update", "forward_backward", "pack_generator", "reduce_step", "stage_losses"]


def stage_losses(out: dict, stage: str, scfg) -> dict:
    """The stage's weighted losses from the model's outputs (``loss`` is the total)."""
    from unigendet.models import diga_losses, gduf_losses

    if stage == "gduf":
        return gduf_losses(out, ce_weight=scfg.w_text, mse_weight=scfg.w_flow, label_weight=scfg.w_det)
    return diga_losses(out, diga_weight=scfg.w_diga, mse_weight=scfg.w_flow)


def pack_generator(seed: int, stage_key: str, pack_index: int, device: torch.device) -> torch.Generator:
    """The RNG of global pack ``pack_index`` of a stage: it depends on the pack only, so W processes x grad_accum A
    draw exactly what one process with grad_accum W * A draws, and a resumed run what an uninterrupted one draws.
    (On the model's device: torch.randn on a GPU refuses a CPU generator.)"""
    return torch.Generator(device=device).manual_seed(zlib.crc32(f"{seed}/{stage_key}/pack{pack_index}".encode()))


def forward_backward(model, packs, *, accum: int, device: torch.device, amp_dtype: torch.dtype | None, seed: int,
                     stage_key: str, loss_fn, teacher=None) -> tuple[dict[str, float], int]:
    """Forward and backward over the next ``accum`` packs of ``packs``; returns the mean losses and the token count."""
    sums: dict[str, float] = {}
    n_tokens = 0
    for micro in range(accum):
        batch = next(packs).to(device, non_blocking=True)
        n_tokens += batch.seq_len
        gen = pack_generator(seed, stage_key, batch.pack_id[1], device)
        sync = contextlib.nullcontext() if micro == accum - 1 or not hasattr(model, "no_sync") else model.no_sync()
        with sync, torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(batch, generator=gen, diga_teacher=teacher)  # the pack carries its layout
            losses = loss_fn(out)
        (losses["loss"] / accum).backward()
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach()) / accum  # one host sync per micro-batch
    return sums, n_tokens


def reduce_step(sums: dict[str, float], n_tokens: int, stop_signal: int | None, *, world_size: int,
                device: torch.device) -> tuple[dict[str, float], int, int | None]:
    """Global mean losses, global token count and the largest pending signal, identical on every rank.

    Every rank then takes the same decisions (skip a non-finite step, save and stop after a signal that reached
    only some of the processes) and rank 0 logs the global losses.
    """
    import torch.distributed as dist

    keys = sorted(sums)
    t = torch.tensor([sums[k] for k in keys] + [float(n_tokens)], dtype=torch.float64, device=device)
    sig = torch.tensor([stop_signal or 0], dtype=torch.int64, device=device)
    dist.all_reduce(t)
    dist.all_reduce(sig, op=dist.ReduceOp.MAX)
    vals = t.tolist()
    return {k: v / world_size for k, v in zip(keys, vals)}, int(vals[-1]), (int(sig) or None)


def apply_update(loss: float, params, opt, sched, *, clip_grad_norm: float, ema: dict | None, ema_decay: float,
                 model) -> tuple[bool, float]:
    """Clip and step (optimizer, schedule, EMA of ``model``'s parameters) when the loss and the gradient norm are
    finite; otherwise drop the gradients. Returns ``(finite, grad_norm)`` (NaN when not clipped)."""
    finite = math.isfinite(loss)
    grad_norm = float("nan")
    if finite and clip_grad_norm > 0:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip_grad_norm))
        finite = math.isfinite(grad_norm)
    if finite:
        opt.step()
        sched.step()
        if ema is not None:
            named = dict(model.named_parameters())
            torch._foreach_lerp_(list(ema.values()), [named[n].detach().float() for n in ema], 1.0 - ema_decay)
    else:
        opt.zero_grad(set_to_none=True)
    return finite, grad_norm
