"""Training checkpoints: what the trainer saves after a step and restores on ``--resume``.

The checkpoint files and their checksums are :mod:`unigendet.train.state`'s; this module decides what goes in: the
weights (without the frozen VAE), the optimizer, scheduler and EMA states, the RNG, every rank's data position, the
stage progress, the co-evolution fakes and the configuration (checked on resume by :mod:`unigendet.train.resume`).
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from .config import config_to_dict
from .distributed import full_optimizer_state, full_tensors, is_sharded
from .resume import ResumeError, check_resume
from .state import NonFiniteWeightsError
from .teacher import weights_state

log = logging.getLogger("unigendet.train")

__all__ = ["TrainingAborted", "gather_positions", "load_training_checkpoint", "save_training_checkpoint"]


class TrainingAborted(RuntimeError):
    """Too many non-finite losses, a checkpoint that would hold non-finite weights, or another unrecoverable
    training condition."""


def gather_positions(trainer) -> tuple[list[int], list[int]]:
    """Every rank's next pack and count of empty packs in this stage."""
    pos = torch.tensor([trainer._next_pack, trainer._empty_packs], dtype=torch.int64)
    if trainer.dist.distributed:
        import torch.distributed as dist

        out = [torch.zeros_like(pos) for _ in range(trainer.dist.world_size)]
        dist.all_gather(out, pos)
        return [int(t[0]) for t in out], [int(t[1]) for t in out]
    return [int(pos[0])], [int(pos[1])]


def save_training_checkpoint(trainer, rnd, stage, step, opt, sched, ema) -> None:
    """Checkpoint the run after ``step`` of ``stage`` (collective when sharded; rank 0 writes)."""
    positions, empty = gather_positions(trainer)
    # Gathers are collective when the model is sharded: every rank takes part, rank 0 writes.
    model_state = weights_state(trainer.model)
    opt_state = full_optimizer_state(trainer.model, opt)
    if ema is not None and is_sharded(trainer.model):
        ema = full_tensors(ema)
    if not trainer.dist.is_main:
        return
    state = {
        "round": rnd, "stage": stage, "stage_step": step, "global_step": trainer.global_step,
        "completed": list(trainer.completed), "history": trainer.history, "nonfinite": trainer.nonfinite,
        "next_pack": positions, "empty_packs": empty, "scheduler": sched.state_dict(),
        "world_size": trainer.dist.world_size,
        "extra_fakes": [dataclasses.asdict(r) for r in trainer.extra_fakes],
        "config": config_to_dict(trainer.cfg),
    }
    try:
        path = trainer.ckpt.save(step=trainer.global_step, model_state=model_state, optimizer=opt_state,
                                 trainer_state=state, ema_state=ema)
    except NonFiniteWeightsError as e:
        trainer.logger.log("checkpoint_refused", stage=stage, round=rnd, step=step, reason=str(e))
        raise TrainingAborted(f"{e}; no checkpoint written, the last good one is "
                              f"{trainer.ckpt.latest() or 'none'}") from None
    trainer.logger.log("checkpoint", path=path, stage=stage, round=rnd, step=step)


def load_training_checkpoint(trainer) -> dict | None:
    """Load the newest intact checkpoint (one log line per corrupt one skipped), after checking it fits this
    run: its configuration (:func:`config_changes`) and its trainer state (:func:`check_trainer_state`)."""
    def skipped(folder: str, reason: str) -> None:
        if trainer.dist.is_main:
            log.warning("resume: skipping checkpoint %s: %s", folder, reason)
        trainer.logger.log("checkpoint_skipped", path=folder, reason=reason)

    loaded = trainer.ckpt.load_newest_intact(restore_rng=True, on_skip=skipped)
    if trainer.dist.distributed:  # every rank must continue from the same checkpoint
        import torch.distributed as dist

        mine = -1 if loaded is None else loaded["trainer_state"].get("global_step", -1)
        t = torch.tensor([mine, -mine], dtype=torch.int64, device=trainer.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if int(t[0]) != -int(t[1]):
            raise ResumeError(f"the processes found different newest intact checkpoints in {trainer.ckpt.root} "
                              f"(global steps {-int(t[1])} to {int(t[0])}); is the folder shared by all?")
    if loaded is None:
        return None
    folder, meta = loaded["folder"], loaded["trainer_state"]
    for key, old, new in check_resume(meta, trainer.cfg, trainer.dist.world_size, folder):  # allowed changes
        if trainer.dist.is_main:
            log.warning("resume: configuration change %s: %r -> %r", key, old, new)
        trainer.logger.log("config_change", field=key, checkpoint=old, now=new)
    missing, unexpected = trainer.model.load_state_dict(loaded["model_state"], strict=False)
    bad = [k for k in missing if not k.startswith("vae.") and "pos_embed" not in k]
    if bad or unexpected:
        raise ResumeError(f"checkpoint {folder} does not match the model (missing {bad[:5]}, "
                          f"unexpected {unexpected[:5]})")
    trainer.global_step = meta["global_step"]
    trainer.completed = list(meta["completed"])
    trainer.history = dict(meta["history"])
    trainer.nonfinite = meta["nonfinite"]
    from unigendet.data import DetectionRecord

    try:
        trainer.extra_fakes = [DetectionRecord(**r) for r in meta.get("extra_fakes", [])]
    except TypeError as e:
        raise ResumeError(f"{folder}/trainer_state.json: extra_fakes holds a malformed record ({e})") from None
    meta["_folder"] = folder
    meta["_ema"] = loaded["ema_state"]
    trainer.logger.log("resume", path=folder, global_step=trainer.global_step)
    return meta
