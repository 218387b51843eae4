"""The UniGenDet training loop: stage 1 GDUF, stage 2 DIGA, and co-evolution rounds.

One :class:`Trainer` runs ``rounds`` x (GDUF, DIGA) (or one stage, ``--stage``):

* **GDUF** trains everything but the VAE on packs mixing detection samples (VAE clean latents, ViT tokens,
  question, answer) and generation samples (caption, noisy latents) with
  ``w_det * CE(head) + w_text * CE(explanation) + w_flow * flow MSE``.
* **DIGA** snapshots the stage-1 model as a frozen authenticity teacher (:meth:`UniGenDet.make_diga_teacher`:
  a copy, so it cannot drift while the generator trains) and trains only the generation expert, the timestep
  embedder, ``vae2llm``, ``llm2vae`` and ``diga_mlp`` with ``w_flow * flow MSE + w_diga * diga_loss`` on
  generation packs; every other parameter is frozen.
* **Rounds** (``--rounds N``): from round 2 on, GDUF retrains the detector on fakes that include images the
  current generator made from the training captions (labelled fake), then DIGA realigns the generator to the
  new detector.

Data parallelism: rank ``r`` of ``W`` takes global packs ``k = r, r + W, ...`` (``PackedDataset(shard="packs")``
through the public ``PackedLoader``); with ``grad_accum = A`` a step consumes ``A`` packs per rank, so a single
process with ``grad_accum = W`` sees exactly the packs (and, for mean-normalised losses, the gradients) of ``W``
processes with ``grad_accum = 1``. Under FSDP2 the model is sharded in place once; checkpoints, the DIGA teacher,
co-evolution sampling and the end-of-run export gather its full weights (``unigendet.train.distributed``), so
everything after training sees an ordinary model.

Checkpoints (``unigendet.train.state``) hold weights, optimizer, scheduler, EMA, RNG and the data position, each
file checksummed, and ``--resume`` continues exactly from the newest intact one (walking back over corrupt ones,
refusing a changed configuration unless ``allow_config_change``; ``unigendet.train.resume``). SIGTERM/SIGINT stop
the run at once in every phase, except inside a training step, where they take effect at the end of the step
with a checkpoint. A non-finite loss skips the step (counted); more than ``max_nonfinite`` abort, and so does a
checkpoint that would hold non-finite weights (the previous ones are kept). Progress is a tqdm bar (plain lines
when stderr is not a terminal); logs are JSONL; the run ends with loss-curve PNGs, a sample grid, held-out
detection metrics and ``summary.json``.

This module is the stage driver; the pieces it drives live beside it: ``setup`` (model, packing, records),
``step`` (one optimizer step), ``optim`` (AdamW and its schedule), ``teacher`` (the DIGA teacher and whole copies),
``checkpointing`` (what a checkpoint holds), ``coevolution`` (self-generated fakes, the detectors compared) and
``finish`` (export and end-of-run evaluation).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator

import torch

from unigendet._progress import progress_bar

from .checkpointing import TrainingAborted, load_training_checkpoint, save_training_checkpoint
from .checks import clear_run_outputs, out_dir_problem
from .coevolution import detection_records_with, self_generated_fakes
from .config import TrainConfig, config_to_dict
from .distributed import (
    DistInfo,
    barrier,
    full_model_state,
    init_distributed,
    is_sharded,
    load_full_optimizer_state,
    shard_like,
    wrap_model,
)
from .finish import evaluate_detection
from .finish import finish as finish_run
from .logs import JsonlLogger
from .optim import build_optimizer, build_scheduler
from .setup import build_model, compute_dtype_of, load_run_records, packing_config, seed_everything
from .state import (
    CheckpointManager,
    atomic_write_text,
    clean_stale_temporaries,
    load_optimizer_state,
    save_snapshot,
)
from .step import apply_update, forward_backward, reduce_step, stage_losses
from .teacher import build_teacher, plain_copy, snapshot_dir, weights_state

log = logging.getLogger("unigendet.train")

__all__ = ["Trainer", "TrainingAborted", "train"]


class _Interrupted(BaseException):
    # A BaseException, like KeyboardInterrupt: raised from the signal handler anywhere outside a training step, it
    # must not be swallowed by an ``except Exception`` that skips a bad record.
    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum


class Trainer:
    """Runs the configured stages; see the module docstring."""

    def __init__(self, cfg: TrainConfig, *, progress: bool = True):
        self.cfg = cfg
        self.dist: DistInfo = init_distributed(cfg.device)
        self.device = self.dist.device
        self.progress = progress and self.dist.is_main
        self.out_dir = cfg.out_dir
        problem = out_dir_problem(cfg)
        barrier(self.dist)  # every process has looked before any of them writes
        if problem is not None:
            raise ValueError(problem)
        if cfg.overwrite and self.dist.is_main and (removed := clear_run_outputs(self.out_dir)):
            log.info("overwrite: removed the previous run's %s from %s", ", ".join(removed), self.out_dir)
        barrier(self.dist)
        os.makedirs(self.out_dir, exist_ok=True)
        self.logger = JsonlLogger(os.path.join(self.out_dir, "train.jsonl"), enabled=self.dist.is_main)
        self.ckpt = CheckpointManager(self.out_dir, keep_last=cfg.keep_last)
        if self.dist.is_main:
            for path in clean_stale_temporaries(self.out_dir):
                log.info("removed %s (left by an interrupted save)", path)
                self.logger.log("stale_temporary_removed", path=path)
        self.amp_dtype = compute_dtype_of(cfg, self.device)
        seed_everything(cfg.seed)
        self.tokenizer, self.model = build_model(cfg, self.device, self.amp_dtype, is_main=self.dist.is_main)
        self.packing = packing_config(cfg, self.model.config)
        self.det_records, self.gen_records, self.test_records = load_run_records(cfg)
        self.extra_fakes: list = []  # self-generated fakes of earlier rounds
        self.stop_signal: int | None = None
        self._defer_signals = False  # inside a training step: a signal takes effect at the end of the step
        self._empty_packs = 0  # packs of this stage that came out empty (all their samples skipped), this rank
        self.nonfinite = 0
        self.global_step = 0
        self.completed: list[str] = []
        self.history: dict[str, dict] = {}

    # ------------------------------------------------------------------ data
    def _stage_seed(self, rnd: int, stage: str) -> int:
        return self.cfg.seed * 1000 + rnd * 10 + (1 if stage == "gduf" else 2)

    def _make_dataset(self, rnd: int, stage: str):
        from unigendet.data import PackedDataset

        packing = dataclasses.replace(self.packing)
        if stage == "diga":
            packing = dataclasses.replace(packing, gen_weight=max(packing.gen_weight, 1), det_weight=0, diga=True)
            det = []
        else:
            det = detection_records_with(self.det_records, self.extra_fakes, balance=self.cfg.data.balance_classes)
        return PackedDataset(det, self.gen_records, self.tokenizer, packing, seed=self._stage_seed(rnd, stage),
                             rank=self.dist.rank, world_size=self.dist.world_size, shard="packs")

    def _iter_packs(self, dataset, start_pack: int) -> Iterator:
        """This rank's packs from global index ``start_pack`` (a multiple of the world size) on, through the
        public :class:`~unigendet.data.PackedLoader` (loader workers or DALI build each pack and its layout)."""
        from unigendet.data import PackedLoader

        d = self.cfg.data
        loader = PackedLoader(
            dataset, num_workers=d.num_workers, backend=d.backend, pin_memory=self.device.type == "cuda",
            prefetch_factor=2 if d.num_workers > 0 else None, num_threads=max(1, d.num_workers),
            device_id=self.device.index if self.device.type == "cuda" else None)
        state = loader.state_dict()
        loader.load_state_dict(state | {"next_pack": start_pack + self.dist.rank})
        empty0 = self._empty_packs
        for batch in loader:
            self._next_pack = loader.state_dict()["next_pack"]
            self._empty_packs = empty0 + loader.empty_packs
            yield batch

    # ------------------------------------------------------------------ stage setup
    def _set_trainable(self, stage: str) -> list[torch.nn.Parameter]:
        names = set(self.model.configure_stage(stage))
        return [p for n, p in self.model.named_parameters() if n in names]

    # ------------------------------------------------------------------ one stage
    def _stage_key(self, rnd: int, stage: str) -> str:
        return f"r{rnd}-{stage}"

    def run_stage(self, rnd: int, stage: str, resume_state: dict | None = None) -> dict:
        cfg = self.cfg
        scfg = cfg.gduf if stage == "gduf" else cfg.diga
        steps = scfg.steps_in_round(rnd)
        key = self._stage_key(rnd, stage)
        teacher = None
        if stage == "diga":
            teacher = self._diga_teacher(rnd, resume_state is not None)
        self._set_trainable(stage)
        self.model.zero_grad(set_to_none=True)  # no stale gradients on parameters this stage freezes
        # DDP must see the stage's trainable set, so it wraps per stage; FSDP2 shards once, in place (replacing the
        # parameters, hence the lookup after wrapping), and follows requires_grad changes by itself.
        model = wrap_model(self.model, self.dist, cfg.parallel, blocks=list(self.model.language_model.model.layers),
                           param_dtype=self.amp_dtype or torch.float32, ignored=[self.model.vae])
        gen = {id(p) for n, p in self.model.named_parameters() if self.model.is_generation_parameter(n)}
        params = [p for p in self.model.parameters() if p.requires_grad]
        # Rounds after the first fine-tune the previous round's weights: their learning rate is scaled.
        optim = cfg.optim if rnd == 1 else dataclasses.replace(cfg.optim, lr=cfg.optim.lr * cfg.optim.round_lr_scale)
        opt = build_optimizer([(p, id(p) in gen) for p in params], optim, self.device)
        sched = build_scheduler(opt, optim, steps)
        ema = {n: p.detach().float().clone() for n, p in self.model.named_parameters()
               if p.requires_grad} if cfg.ema > 0 else None
        step, start_pack = 0, 0
        if resume_state is not None:
            step = resume_state["stage_step"]
            positions = resume_state["next_pack"]
            start_pack = positions[self.dist.rank] - self.dist.rank if self.dist.rank < len(positions) else 0
            load_full_optimizer_state(self.model, opt, resume_state["_optimizer_state"])
            sched.load_state_dict(resume_state["scheduler"])
            if ema is not None and resume_state.get("_ema") is not None:
                for n in ema:
                    ema[n].copy_(shard_like(resume_state["_ema"][n], ema[n]))
        self._empty_packs = resume_state["empty_packs"][self.dist.rank] if resume_state is not None else 0
        self._next_pack = start_pack + self.dist.rank
        dataset = self._make_dataset(rnd, stage)
        packs = self._iter_packs(dataset, start_pack)
        if step < steps:
            packs = _primed(packs)  # plan up to the resume position here, where a signal stops the run at once
        accum = max(1, cfg.grad_accum)
        bar = progress_bar(total=steps, initial=step, desc=f"round {rnd} {stage.upper()}", unit="step",
                           disable=not self.progress)
        tokens_done, t_start = 0, time.perf_counter()
        self.model.train()
        self._defer_signals = True  # from here on a signal takes effect at the end of the current step
        while step < steps:
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            sums, n_tokens = forward_backward(
                model, packs, accum=accum, device=self.device, amp_dtype=self.amp_dtype, seed=cfg.seed,
                stage_key=key, teacher=teacher, loss_fn=lambda out: stage_losses(out, stage, scfg))
            stop_signal = self.stop_signal
            if self.dist.distributed:
                sums, n_tokens, stop_signal = reduce_step(sums, n_tokens, stop_signal,
                                                          world_size=self.dist.world_size, device=self.device)
            finite, grad_norm = apply_update(sums["loss"], params, opt, sched, clip_grad_norm=cfg.optim.clip_grad_norm,
                                             ema=ema, ema_decay=cfg.ema, model=self.model)
            if not finite:
                self.nonfinite += 1
                self.logger.log("nonfinite", stage=stage, round=rnd, step=step, count=self.nonfinite)
                if self.nonfinite > cfg.max_nonfinite:
                    raise TrainingAborted(
                        f"{self.nonfinite} non-finite losses/gradients (limit max_nonfinite={cfg.max_nonfinite}); "
                        "lower the learning rate or check the data. Last checkpoint: "
                        f"{self.ckpt.latest() or 'none'}")
            step += 1
            self.global_step += 1
            dt = time.perf_counter() - t0
            tokens_done += n_tokens
            tok_s = n_tokens / max(dt, 1e-9)
            rec = {f"loss_{k}" if k != "loss" else "loss": v for k, v in sums.items()}
            if step % cfg.log_every == 0 or step == steps:
                self.logger.log("step", stage=stage, round=rnd, step=step, global_step=self.global_step,
                                lr=sched.get_last_lr()[0], grad_norm=grad_norm, tokens=n_tokens,
                                tokens_per_s=tok_s, step_s=dt, skipped=not finite, **rec)
            bar.set_postfix({k.replace("loss_", ""): f"{v:.3f}" for k, v in rec.items()} | {"tok/s": f"{tok_s:.0f}"},
                            refresh=False)
            bar.update(1)
            if not self.dist.distributed:
                stop_signal = self.stop_signal
            stopping = stop_signal is not None
            if step % cfg.save_every == 0 or step == steps or stopping:
                save_training_checkpoint(self, rnd, stage, step, opt, sched, ema)
            if stopping:
                bar.close()
                raise _Interrupted(stop_signal)
        bar.close()
        self._defer_signals = False
        if self.stop_signal is not None:  # it came during the stage's last save: that checkpoint is complete
            raise _Interrupted(self.stop_signal)
        elapsed = time.perf_counter() - t_start
        summary = {"steps": step, "seconds": elapsed, "tokens": tokens_done,
                   "tokens_per_s": tokens_done / max(elapsed, 1e-9)}
        if ema is not None:  # the exported weights are the EMA ones
            with torch.no_grad():
                for n, p in self.model.named_parameters():
                    if n in ema:
                        p.copy_(ema[n].to(p.dtype))
        if stage == "gduf":
            self._save_stage_snapshot(rnd)
        self.completed.append(key)
        self.history[key] = summary
        return summary

    # ------------------------------------------------------------------ DIGA teacher
    def _save_stage_snapshot(self, rnd: int) -> None:
        """The end-of-GDUF weights: the DIGA teacher is rebuilt from them after a resume."""
        state = weights_state(self.model)  # collective when sharded
        if self.dist.is_main:
            save_snapshot(state, snapshot_dir(self.out_dir, rnd))  # atomic and checksummed; load_sharded verifies it
        barrier(self.dist)

    def _diga_teacher(self, rnd: int, resuming: bool):
        """The frozen authenticity teacher: the end-of-GDUF model of this round (rebuilt from its snapshot after a
        resume), or the starting model when DIGA runs alone."""
        folder = None
        if resuming or self._stage_key(rnd, "gduf") not in self.completed:
            folder = snapshot_dir(self.out_dir, rnd)
            if not os.path.isdir(folder):
                if self.cfg.stage != "diga":
                    raise FileNotFoundError(f"the DIGA teacher needs the GDUF snapshot {folder}")
                folder = None  # DIGA alone: the starting model is the teacher.
        return build_teacher(self.model, folder, device=self.device, amp_dtype=self.amp_dtype)

    def _plain_copy(self, state: dict[str, torch.Tensor], *, teacher: bool = False):
        """An unsharded copy of the model holding ``state`` (:func:`unigendet.train.teacher.plain_copy`)."""
        return plain_copy(self.model, state, device=self.device, amp_dtype=self.amp_dtype, teacher=teacher)

    # ------------------------------------------------------------------ checkpoints
    def _load_resume(self) -> dict | None:
        return load_training_checkpoint(self)

    # ------------------------------------------------------------------ driver
    def _install_signals(self):
        def handler(signum, frame):
            self.stop_signal = signum
            if not self._defer_signals:  # data planning, loading, the teacher, export, evaluation: stop now
                raise _Interrupted(signum)
            log.warning("signal %d received: saving a checkpoint after this step", signum)

        old = {}
        for s in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread
                old[s] = signal.signal(s, handler)
        return old

    def plan(self) -> list[tuple[int, str]]:
        stages = {"gduf": ["gduf"], "diga": ["diga"], "all": ["gduf", "diga"]}[self.cfg.stage]
        return [(r, s) for r in range(1, self.cfg.rounds + 1) for s in stages]

    def run(self) -> dict:
        """Train every planned stage (resuming if asked), then evaluate; returns the summary."""
        old = self._install_signals()
        t0 = time.perf_counter()
        try:
            resume = self._load_resume() if self.cfg.resume else None
            self.logger.log("start", config=config_to_dict(self.cfg), world_size=self.dist.world_size,
                            device=str(self.device), resumed=resume is not None)
            for rnd, stage in self.plan():
                key = self._stage_key(rnd, stage)
                if key in self.completed:
                    continue
                if stage == "gduf" and rnd > 1 and not (resume and resume["stage"] == "gduf"
                                                        and resume["round"] == rnd):
                    self.extra_fakes = self.extra_fakes + self_generated_fakes(self, rnd)
                rs = None
                if resume is not None and resume["round"] == rnd and resume["stage"] == stage:
                    rs = resume
                    rs["_optimizer_state"] = load_optimizer_state(resume["_folder"], verify=False)  # just verified
                    resume = None
                self.run_stage(rnd, stage, rs)
            summary = {"train_seconds": time.perf_counter() - t0, "stages": self.history,
                       "nonfinite_steps": self.nonfinite, "global_step": self.global_step}
            if is_sharded(self.model):
                # The end-of-run export, evaluation and samples run on rank 0 with a whole copy of the model.
                state = full_model_state(self.model)
                if self.dist.is_main:
                    self.model = self._plain_copy(state)
            if self.dist.is_main:
                summary.update(self.finish())
                atomic_write_text(os.path.join(self.out_dir, "summary.json"), json.dumps(summary, indent=2))
        except _Interrupted as e:
            self._defer_signals = True  # a second signal while stopping is only recorded
            latest = self.ckpt.latest()
            self.logger.log("interrupted", signal=e.signum, checkpoint=latest)
            if self.dist.is_main:  # rank 0 writes the checkpoints
                print(f"interrupted by signal {e.signum}; latest checkpoint: {latest or 'none'}", file=sys.stderr)
            raise SystemExit(128 + e.signum) from None
        finally:
            self._defer_signals = False
            for s, h in old.items():
                signal.signal(s, h)
        return summary

    # ------------------------------------------------------------------ end of run
    def finish(self) -> dict:
        """The end-of-run export, plots and evaluation (:func:`unigendet.train.finish.finish`)."""
        return finish_run(self)

    def evaluate_detection(self, records) -> dict:
        """Held-out detection metrics of the trained model (:func:`unigendet.train.finish.evaluate_detection`)."""
        return evaluate_detection(self, records)


def _optimizer_state(folder: str) -> dict:
    return load_optimizer_state(folder)


def _primed(it: Iterator) -> Iterator:
    """``it`` with its first item already fetched."""
    first = next(it)
    return itertools.chain([first], it)


def train(cfg: TrainConfig, *, progress: bool = True) -> dict:
    """Run a whole training (the Python entry point behind ``python -m unigendet.train``)."""
    return Trainer(cfg, progress=progress).run()

