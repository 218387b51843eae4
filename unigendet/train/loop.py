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

Data parallelism: rank ``r`` of ``W`` takes global packs ``k = r, r + W, ...`` (``PackedDataset(shard="packs")`` through
the public ``PackedLoader``); with ``grad_accum = A`` a step
consumes ``A`` packs per rank, so a single process with ``grad_accum = W`` sees exactly the packs (and, for
mean-normalised losses, the gradients) of ``W`` processes with ``grad_accum = 1``. Under FSDP2 the model is
sharded in place once; checkpoints, the DIGA teacher, co-evolution sampling and the end-of-run export gather its
full weights (``unigendet.train.distributed``), so everything after training sees an ordinary model.

Checkpoints (``unigendet.train.state``) hold weights, optimizer, scheduler, EMA, RNG and the data position, each
file checksummed, and ``--resume`` continues exactly from the newest intact one (walking back over corrupt ones,
refusing a changed configuration unless ``allow_config_change``; ``unigendet.train.resume``). SIGTERM/SIGINT stop
the run at once in every phase, except inside a training step, where they take effect at the end of the step
with a checkpoint. A non-finite loss skips the step (counted); more than ``max_nonfinite`` abort, and so does a
checkpoint that would hold non-finite weights (the previous ones are kept). Progress is a tqdm bar (plain lines
when stderr is not a terminal); logs are JSONL; the run ends with loss-curve PNGs, a sample grid, held-out
detection metrics and ``summary.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import math
import os
import signal
import sys
import time
import zlib
from collections.abc import Iterator

import numpy as np
import torch

from unigendet._progress import progress_bar
from unigendet.prompts import FAKECLUE_QUESTION

from .checks import clear_run_outputs, out_dir_problem
from .config import OptimConfig, TrainConfig, config_to_dict
from .distributed import (
    DistInfo,
    barrier,
    full_model_state,
    full_optimizer_state,
    full_tensors,
    init_distributed,
    is_sharded,
    load_full_optimizer_state,
    shard_like,
    wrap_model,
)
from .flops import project_schedule, train_flops_per_token
from .logs import JsonlLogger, plot_losses, read_jsonl
from .resume import ResumeError, check_resume
from .state import (
    CheckpointManager,
    NonFiniteWeightsError,
    atomic_write_text,
    clean_stale_temporaries,
    load_optimizer_state,
    load_sharded,
    save_snapshot,
)

log = logging.getLogger("unigendet.train")

__all__ = ["Trainer", "TrainingAborted", "train"]

class TrainingAborted(RuntimeError):
    """Too many non-finite losses (or another unrecoverable training condition)."""


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
        self.amp_dtype = self._amp_dtype()
        self._seed_all(cfg.seed)
        self.tokenizer, self.model = self._build_model()
        self.packing = self._packing_config()
        self.det_records, self.gen_records, self.test_records = self._load_records()
        self.extra_fakes: list = []  # self-generated fakes of earlier rounds
        self.stop_signal: int | None = None
        self._defer_signals = False  # inside a training step: a signal takes effect at the end of the step
        self._empty_packs = 0  # packs of this stage that came out empty (all their samples skipped), this rank
        self.nonfinite = 0
        self.global_step = 0
        self.completed: list[str] = []
        self.history: dict[str, dict] = {}

    # ------------------------------------------------------------------ setup
    def _amp_dtype(self) -> torch.dtype | None:
        d = self.cfg.dtype
        if d == "auto":
            return torch.bfloat16 if self.device.type == "cuda" else None
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[d]

    def _seed_all(self, seed: int) -> None:
        import random

        random.seed(seed)
        np.random.seed(seed)  # noqa: NPY002  (third-party code may draw from the global RNG)
        torch.manual_seed(seed)

    def _build_model(self):
        from unigendet.models import UniGenDet, get_config, load_pretrained
        from unigendet.models.config import PRESETS as MODEL_PRESETS
        from unigendet.tokenizer import load_tokenizer

        cfg = self.cfg
        overrides = {"smsa_mode": cfg.smsa, "timestep_shift": cfg.timestep_shift}
        if cfg.diga.diga_layer is not None:
            overrides["diga_layer"] = cfg.diga.diga_layer
        if cfg.model in MODEL_PRESETS and cfg.model_path is None:
            tokenizer = load_tokenizer("tiny")
            mcfg = get_config(cfg.model, **overrides)
            if tokenizer.vocab_size > mcfg.llm.vocab_size:
                raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids, the model's table {mcfg.llm.vocab_size}")
            model = UniGenDet(mcfg).to(self.device)
        else:
            from unigendet.models.config import load_config as load_model_config

            base = cfg.model_path or cfg.model
            mcfg = load_model_config(base)
            mcfg = dataclasses.replace(mcfg, **overrides)
            # fp32 master weights (the optimizer updates these; compute runs in amp_dtype under autocast or
            # FSDP2's mixed precision); the frozen VAE is stored in the compute dtype.
            loaded = load_pretrained(base, config=mcfg, dtype=torch.float32, device=self.device,
                                     vae_dtype=self.amp_dtype or torch.float32)
            if self.dist.is_main:
                log.info("loaded %s: %s", base, loaded.report)
            model, tokenizer = loaded.model, loaded.tokenizer
        if model.vae is not None:
            model.vae.requires_grad_(False)
        model.set_gradient_checkpointing(cfg.grad_checkpointing)
        return tokenizer, model

    def _packing_config(self):
        from unigendet.inference.loading import packing_for

        d = self.cfg.data
        kw = dict(gen_weight=d.gen_ratio, det_weight=d.det_ratio, text_cond_dropout_prob=d.cfg_text_dropout,
                  diga_prompt=self.cfg.diga_prompt, smsa=self.cfg.smsa)
        for key, value in (("expected_num_tokens", d.expected_tokens), ("max_num_tokens", d.max_tokens),
                           ("max_num_tokens_per_sample", d.max_tokens_per_sample)):
            if value is not None:
                kw[key] = value
        # The geometry follows the model's position tables (a tiny checkpoint folder packs as the tiny preset).
        return packing_for(self.model.config, **kw)

    def _load_records(self):
        from unigendet.data import load_records

        d = self.cfg.data
        if d.source == "embedded":
            det, gen = load_records(balance=d.balance_classes)
            test, _ = load_records(split="test")
        else:
            det, gen = load_records(d.fakeclue_root, d.laion_manifest, balance=d.balance_classes)
            test, _ = load_records(d.fakeclue_root, None, split="test") if d.fakeclue_root else ([], [])
        return det, gen, test

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
            det = self.det_records + self.extra_fakes
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

    def _optimizer(self, params) -> torch.optim.Optimizer:
        """AdamW over ``params`` = ``[(parameter, is_generation)]``: weight decay only on matrices, and the
        generation side's learning rate scaled by ``optim.gen_lr_scale`` (one group per combination)."""
        o = self.cfg.optim
        groups = []
        for gen in (False, True):
            for decay in (True, False):
                ps = [p for p, g in params if g == gen and (p.dim() >= 2) == decay]
                if ps:
                    groups.append({"params": ps, "weight_decay": o.weight_decay if decay else 0.0,
                                   "lr": o.lr * (o.gen_lr_scale if gen else 1.0)})
        impl = o.impl
        if impl in ("auto", "apex"):
            try:
                from apex.optimizers import FusedAdam  # NVIDIA apex, optional

                if self.device.type == "cuda":
                    return FusedAdam(groups, lr=o.lr, betas=o.betas, eps=o.eps, adam_w_mode=True)
            except ImportError:
                if impl == "apex":
                    raise ValueError("optim.impl='apex' but NVIDIA apex is not installed") from None
        kw = {"fused": True} if self.device.type == "cuda" else {"foreach": True}
        return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, **kw)

    def _scheduler(self, opt, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier(self.cfg.optim, total_steps))

    # ------------------------------------------------------------------ one stage
    def _stage_key(self, rnd: int, stage: str) -> str:
        return f"r{rnd}-{stage}"

    def run_stage(self, rnd: int, stage: str, resume_state: dict | None = None) -> dict:
        cfg = self.cfg
        scfg = cfg.gduf if stage == "gduf" else cfg.diga
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
        opt = self._optimizer([(p, id(p) in gen) for p in params])
        sched = self._scheduler(opt, scfg.steps)
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
        if step < scfg.steps:
            packs = _primed(packs)  # plan up to the resume position here, where a signal stops the run at once
        accum = max(1, cfg.grad_accum)
        bar = progress_bar(total=scfg.steps, initial=step, desc=f"round {rnd} {stage.upper()}", unit="step",
                           disable=not self.progress)
        tokens_done, t_start = 0, time.perf_counter()
        self.model.train()
        self._defer_signals = True  # from here on a signal takes effect at the end of the current step
        while step < scfg.steps:
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            sums: dict[str, float] = {}
            n_tokens = 0
            for micro in range(accum):
                batch = next(packs).to(self.device, non_blocking=True)
                n_tokens += batch.seq_len
                # The noise of global pack k depends on k only, so W processes x grad_accum A draw exactly what
                # one process with grad_accum W * A draws, and a resumed run what an uninterrupted one draws.
                # (On the model's device: torch.randn on a GPU refuses a CPU generator.)
                gen = torch.Generator(device=self.device).manual_seed(
                    zlib.crc32(f"{cfg.seed}/{key}/pack{batch.pack_id[1]}".encode()))
                sync = (contextlib.nullcontext() if micro == accum - 1 or not hasattr(model, "no_sync")
                        else model.no_sync())
                with sync, torch.autocast(self.device.type, dtype=self.amp_dtype,
                                          enabled=self.amp_dtype is not None):
                    out = model(batch, generator=gen, diga_teacher=teacher)  # the pack carries its layout
                    losses = self._losses(out, stage, scfg)
                (losses["loss"] / accum).backward()
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) / accum  # one host sync per micro-batch
            stop_signal = self.stop_signal
            if self.dist.distributed:
                sums, n_tokens, stop_signal = self._reduce_step(sums, n_tokens, stop_signal)
            finite = math.isfinite(sums["loss"])
            grad_norm = float("nan")
            if finite and cfg.optim.clip_grad_norm > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_grad_norm))
                finite = math.isfinite(grad_norm)
            if finite:
                opt.step()
                sched.step()
                if ema is not None:
                    named = dict(self.model.named_parameters())
                    torch._foreach_lerp_(list(ema.values()), [named[n].detach().float() for n in ema],
                                         1.0 - cfg.ema)
            else:
                self.nonfinite += 1
                opt.zero_grad(set_to_none=True)
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
            if step % cfg.log_every == 0 or step == scfg.steps:
                self.logger.log("step", stage=stage, round=rnd, step=step, global_step=self.global_step,
                                lr=sched.get_last_lr()[0], grad_norm=grad_norm, tokens=n_tokens,
                                tokens_per_s=tok_s, step_s=dt, skipped=not finite, **rec)
            bar.set_postfix({k.replace("loss_", ""): f"{v:.3f}" for k, v in rec.items()} | {"tok/s": f"{tok_s:.0f}"},
                            refresh=False)
            bar.update(1)
            if not self.dist.distributed:
                stop_signal = self.stop_signal
            stopping = stop_signal is not None
            if step % cfg.save_every == 0 or step == scfg.steps or stopping:
                self._save(rnd, stage, step, opt, sched, ema)
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

    def _reduce_step(self, sums: dict[str, float], n_tokens: int, stop_signal: int | None):
        """Global mean losses, global token count and the largest pending signal, identical on every rank.

        Every rank then takes the same decisions (skip a non-finite step, save and stop after a signal that
        reached only some of the processes) and rank 0 logs the global losses.
        """
        import torch.distributed as dist

        keys = sorted(sums)
        t = torch.tensor([sums[k] for k in keys] + [float(n_tokens)], dtype=torch.float64, device=self.device)
        sig = torch.tensor([stop_signal or 0], dtype=torch.int64, device=self.device)
        dist.all_reduce(t)
        dist.all_reduce(sig, op=dist.ReduceOp.MAX)
        vals = t.tolist()
        w = self.dist.world_size
        return {k: v / w for k, v in zip(keys, vals)}, int(vals[-1]), (int(sig) or None)

    def _losses(self, out: dict, stage: str, scfg) -> dict:
        from unigendet.models import diga_losses, gduf_losses

        if stage == "gduf":
            return gduf_losses(out, ce_weight=scfg.w_text, mse_weight=scfg.w_flow, label_weight=scfg.w_det)
        return diga_losses(out, diga_weight=scfg.w_diga, mse_weight=scfg.w_flow)

    # ------------------------------------------------------------------ DIGA teacher
    def _snapshot_dir(self, rnd: int) -> str:
        return os.path.join(self.out_dir, f"round{rnd}", "gduf_model")

    def _save_stage_snapshot(self, rnd: int) -> None:
        """The end-of-GDUF weights: the DIGA teacher is rebuilt from them after a resume."""
        state = self._model_state()  # collective when sharded
        if self.dist.is_main:
            save_snapshot(state, self._snapshot_dir(rnd))  # atomic and checksummed; load_sharded verifies it
        barrier(self.dist)

    def _diga_teacher(self, rnd: int, resuming: bool):
        """The frozen authenticity teacher: the end-of-GDUF model of this round (rebuilt from its snapshot after a
        resume), or the starting model when DIGA runs alone."""
        folder = None
        if resuming or self._stage_key(rnd, "gduf") not in self.completed:
            folder = self._snapshot_dir(rnd)
            if not os.path.isdir(folder):
                if self.cfg.stage != "diga":
                    raise FileNotFoundError(f"the DIGA teacher needs the GDUF snapshot {folder}")
                folder = None  # DIGA alone: the starting model is the teacher.
        if is_sharded(self.model):
            # Every rank holds a whole teacher (it only runs forward), built from the snapshot or, without one, from
            # the gathered current weights (collective: every rank takes the same branch).
            state = load_sharded(folder) if folder is not None else full_model_state(self.model, all_ranks=True)
            return self._plain_copy(state, teacher=True)
        if folder is None:
            return self._compute_dtype(self.model.make_diga_teacher())
        # state_dict() tensors share storage with the parameters: copy them before loading over them.
        current = {k: v.clone() for k, v in self._model_state().items()}
        self.model.load_state_dict(load_sharded(folder), strict=False)
        teacher = self.model.make_diga_teacher()
        self.model.load_state_dict(current, strict=False)
        return self._compute_dtype(teacher)

    def _compute_dtype(self, frozen):
        """A frozen, forward-only copy (the DIGA teacher) needs no fp32 masters: store it in the compute dtype."""
        if self.amp_dtype is None:
            return frozen
        vae = getattr(frozen, "vae", None)
        frozen.vae = None  # shared with the trained model: never cast it here
        frozen = frozen.to(dtype=self.amp_dtype)
        frozen.vae = vae
        return frozen

    def _plain_copy(self, state: dict[str, torch.Tensor], *, teacher: bool = False):
        """An unsharded copy of the model (or of its DIGA teacher part) holding ``state``, sharing the VAE.

        Built on the meta device and materialised once, so only the copy's own weights are allocated.
        """
        from unigendet.models import UniGenDet

        src = self.model
        with torch.device("meta"):
            copy = UniGenDet(src.config, build_vae_module=False)
        if teacher:
            copy = copy.make_diga_teacher()
        copy = copy.to_empty(device=self.device).to(dtype=(self.amp_dtype or src.dtype) if teacher else src.dtype)
        copy.reset_fixed_buffers()
        missing, unexpected = copy.load_state_dict({k: v for k, v in state.items() if not k.startswith("vae.")},
                                                   strict=False)
        missing = [k for k in missing if "pos_embed" not in k]
        if missing:
            raise RuntimeError(f"gathered state lacks {missing[:5]} (of {len(missing)})")
        copy.requires_grad_(False)
        copy.vae = src.vae  # frozen since _build_model
        return copy.eval()

    # ------------------------------------------------------------------ checkpoints
    def _model_state(self) -> dict[str, torch.Tensor]:
        """The weights to save, without the frozen VAE (collective when sharded; full tensors on rank 0)."""
        return {k: v for k, v in full_model_state(self.model).items() if not k.startswith("vae.")}

    def _gather_positions(self) -> tuple[list[int], list[int]]:
        """Every rank's next pack and count of empty packs in this stage."""
        pos = torch.tensor([self._next_pack, self._empty_packs], dtype=torch.int64)
        if self.dist.distributed:
            import torch.distributed as dist

            out = [torch.zeros_like(pos) for _ in range(self.dist.world_size)]
            dist.all_gather(out, pos)
            return [int(t[0]) for t in out], [int(t[1]) for t in out]
        return [int(pos[0])], [int(pos[1])]

    def _save(self, rnd, stage, step, opt, sched, ema) -> None:
        positions, empty = self._gather_positions()
        # Gathers are collective when the model is sharded: every rank takes part, rank 0 writes.
        model_state = self._model_state()
        opt_state = full_optimizer_state(self.model, opt)
        if ema is not None and is_sharded(self.model):
            ema = full_tensors(ema)
        if not self.dist.is_main:
            return
        state = {
            "round": rnd, "stage": stage, "stage_step": step, "global_step": self.global_step,
            "completed": list(self.completed), "history": self.history, "nonfinite": self.nonfinite,
            "next_pack": positions, "empty_packs": empty, "scheduler": sched.state_dict(),
            "world_size": self.dist.world_size,
            "extra_fakes": [dataclasses.asdict(r) for r in self.extra_fakes],
            "config": config_to_dict(self.cfg),
        }
        try:
            path = self.ckpt.save(step=self.global_step, model_state=model_state, optimizer=opt_state,
                                  trainer_state=state, ema_state=ema)
        except NonFiniteWeightsError as e:
            self.logger.log("checkpoint_refused", stage=stage, round=rnd, step=step, reason=str(e))
            raise TrainingAborted(f"{e}; no checkpoint written, the last good one is "
                                  f"{self.ckpt.latest() or 'none'}") from None
        self.logger.log("checkpoint", path=path, stage=stage, round=rnd, step=step)

    def _load_resume(self) -> dict | None:
        """Load the newest intact checkpoint (one log line per corrupt one skipped), after checking it fits this
        run: its configuration (:func:`config_changes`) and its trainer state (:func:`check_trainer_state`)."""
        def skipped(folder: str, reason: str) -> None:
            if self.dist.is_main:
                log.warning("resume: skipping checkpoint %s: %s", folder, reason)
            self.logger.log("checkpoint_skipped", path=folder, reason=reason)

        loaded = self.ckpt.load_newest_intact(restore_rng=True, on_skip=skipped)
        if self.dist.distributed:  # every rank must continue from the same checkpoint
            import torch.distributed as dist

            mine = -1 if loaded is None else loaded["trainer_state"].get("global_step", -1)
            t = torch.tensor([mine, -mine], dtype=torch.int64, device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            if int(t[0]) != -int(t[1]):
                raise ResumeError(f"the processes found different newest intact checkpoints in {self.ckpt.root} "
                                  f"(global steps {-int(t[1])} to {int(t[0])}); is the folder shared by all?")
        if loaded is None:
            return None
        folder, meta = loaded["folder"], loaded["trainer_state"]
        for key, old, new in check_resume(meta, self.cfg, self.dist.world_size, folder):  # allowed changes
            if self.dist.is_main:
                log.warning("resume: configuration change %s: %r -> %r", key, old, new)
            self.logger.log("config_change", field=key, checkpoint=old, now=new)
        missing, unexpected = self.model.load_state_dict(loaded["model_state"], strict=False)
        bad = [k for k in missing if not k.startswith("vae.") and "pos_embed" not in k]
        if bad or unexpected:
            raise ResumeError(f"checkpoint {folder} does not match the model (missing {bad[:5]}, "
                              f"unexpected {unexpected[:5]})")
        self.global_step = meta["global_step"]
        self.completed = list(meta["completed"])
        self.history = dict(meta["history"])
        self.nonfinite = meta["nonfinite"]
        from unigendet.data import DetectionRecord

        try:
            self.extra_fakes = [DetectionRecord(**r) for r in meta.get("extra_fakes", [])]
        except TypeError as e:
            raise ResumeError(f"{folder}/trainer_state.json: extra_fakes holds a malformed record ({e})") from None
        meta["_folder"] = folder
        meta["_ema"] = loaded["ema_state"]
        self.logger.log("resume", path=folder, global_step=self.global_step)
        return meta

    # ------------------------------------------------------------------ co-evolution
    def _self_generated_fakes(self, rnd: int) -> list:
        """Images the current generator makes from training captions, as fake detection records.

        The same call also draws ``coevolution_heldout`` images from held-out scene prompts into
        ``round<rnd>/heldout_fakes`` (never trained on), on which the end of the run compares the detectors.
        """
        from unigendet.data import DetectionRecord
        from unigendet.inference import ImageGenerator

        from .evaluation import heldout_scene_prompts, save_images

        n = max(1, min(len(self.gen_records), self.cfg.coevolution_fakes))
        prompts = [r.prompt for r in self.gen_records[:n]]
        heldout = []
        if self.cfg.data.source == "embedded" and self.cfg.coevolution_heldout > 0:
            heldout = heldout_scene_prompts(self.cfg.coevolution_heldout, offset=self.cfg.gen_eval_samples)
        folder = os.path.join(self.out_dir, f"round{rnd}", "fakes")
        model = self.model
        if is_sharded(model):  # sampling calls into the model outside forward(): use a whole copy
            model = self._plain_copy(full_model_state(model, all_ranks=True))
        gen = ImageGenerator(model, self.tokenizer, self.packing, steps=self.cfg.sample_steps)
        images = gen.generate(prompts + heldout, seed=self.cfg.seed + rnd, progress=self.progress)
        del gen, model
        if heldout and self.dist.is_main:
            save_images(images[n:], os.path.join(self.out_dir, f"round{rnd}", "heldout_fakes"))
        records = []
        # Every rank writes the same self-generated fakes (save_images renames each file into place).
        for i, path in enumerate(save_images(images[:n], folder)):
            records.append(DetectionRecord(
                id=f"selfgen-r{rnd}-{i}", image=path, label=0, cate="self-generated",
                question=FAKECLUE_QUESTION,
                answer="This is a fake image. It was synthesised by the current generator: "
                       "its textures and colours carry the generator's own rendering artefacts."))
        return records

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
                    self.extra_fakes = self.extra_fakes + self._self_generated_fakes(rnd)
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
        """Export the model, plot the losses, draw samples, evaluate held-out detection, project the budget."""
        from unigendet.models import save_checkpoint

        out: dict = {}
        final = os.path.join(self.out_dir, "final")
        save_checkpoint(self.model, final)
        self.tokenizer.save(final)
        out["checkpoint"] = final
        records = read_jsonl(self.logger.path)
        if records.skipped or self.logger.failed:  # torn lines of an earlier crash, records a full disk dropped
            log.warning("%s: %d unreadable line(s) skipped, %d record(s) of this run could not be written",
                        self.logger.path, records.skipped, self.logger.failed)
            out["log_lines_skipped"], out["log_records_lost"] = records.skipped, self.logger.failed
        if plot_losses(records, os.path.join(self.out_dir, "losses.png")):
            out["loss_plot"] = os.path.join(self.out_dir, "losses.png")
        out["throughput"] = self._throughput()
        if self.cfg.eval_samples > 0 and self.test_records:
            out["detection"] = self.evaluate_detection(self.test_records[: self.cfg.eval_samples])
        if self.model.config.visual_gen and self.cfg.data.source == "embedded" and self.cfg.gen_eval_samples > 0:
            from .evaluation import evaluate_generation

            out["generation"], _ = evaluate_generation(
                self.model, self.tokenizer, self.packing, n=self.cfg.gen_eval_samples, seed=self.cfg.seed,
                steps=self.cfg.sample_steps, out_dir=self.out_dir, sample_images=self.cfg.sample_images,
                progress=self.progress)
            if "samples" in out["generation"]:
                out["samples"] = out["generation"]["samples"]
            if self.cfg.rounds >= 2 and self.cfg.stage == "all":
                out["coevolution"] = self.coevolution()
        elif self.cfg.sample_images > 0 and self.gen_records:
            out["samples"] = self.sample_grid(self.cfg.sample_images)
        return out

    def coevolution(self) -> dict:
        """Round 1's detector against the final one on the final generator's held-out samples, round 1's
        generator's held-out samples (drawn when round 2 began, never trained on) and the held-out real photos."""
        from .evaluation import coevolution_report

        def pngs(folder):
            return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".png")) \
                if os.path.isdir(folder) else []

        sets = {
            "final_generator_heldout": pngs(os.path.join(self.out_dir, "generated")),
            "round1_generator_heldout": pngs(os.path.join(self.out_dir, "round2", "heldout_fakes")),
            "real_photos": [r.image for r in self.test_records if r.label == 1][: self.cfg.eval_samples // 2],
        }
        first = self._plain_copy(load_sharded(self._snapshot_dir(1)))
        detectors = {"round1_detector": first, f"round{self.cfg.rounds}_detector": self.model}
        report = coevolution_report(detectors, self.tokenizer, self.packing, sets, smsa=self.cfg.smsa,
                                    progress=self.progress)
        del first
        return {"detectors": report, "images": {k: len(v) for k, v in sets.items()},
                "note": "fake_rate: share of images the detection head calls fake; real_accuracy: share of the "
                        "held-out real photographs it calls real"}

    def _throughput(self) -> dict:
        from .flops import PaperSchedule

        st = [v for v in self.history.values() if v["tokens"]]
        if not st:
            return {}
        tok_s = sum(v["tokens"] for v in st) / sum(v["seconds"] for v in st)
        llm = self.model.config.llm
        ctx = self.packing.expected_num_tokens / 4  # a token sees about a quarter of a pack (prefix masks)
        fpt = train_flops_per_token(llm, ctx, self.cfg.grad_checkpointing)
        achieved = tok_s * fpt
        from unigendet.models import get_config

        big = get_config("bagel-7b-mot").llm
        big_fpt = train_flops_per_token(big, 16384 / 4, recompute=True)
        big_tok_s = achieved / big_fpt
        proj = project_schedule(big_tok_s * self.dist.world_size, PaperSchedule())
        return {
            "tokens_per_s": tok_s,
            "model_flops_per_token": fpt,
            "achieved_tflops": achieved / 1e12,
            "device": torch.cuda.get_device_name(0) if self.device.type == "cuda" else f"cpu x{os.cpu_count()}",
            "world_size": self.dist.world_size,
            "paper_schedule_projection": proj | {
                "bagel_7b_flops_per_token": big_fpt,
                "method": "the achieved FLOP/s of this run applied to BAGEL-7B-MoT's training FLOPs per token "
                          "(weights x 8 with recompute + attention at a mean context of 4096), on this run's "
                          "hardware and process count",
            },
        }

    def evaluate_detection(self, records) -> dict:
        from unigendet.eval import evaluate_detection
        from unigendet.inference import Detector

        self.model.eval()
        det = Detector(self.model, self.tokenizer, self.packing, smsa=self.cfg.smsa,
                       max_new_tokens=self.cfg.eval_max_new_tokens)
        with torch.no_grad():
            results = det.detect([r.image for r in records], batch_size=16, progress=self.progress)
        preds = [{"text": r.text, "logits": [r.prob_fake, 1.0 - r.prob_fake]} for r in results]
        report = evaluate_detection(records, preds)
        with open(os.path.join(self.out_dir, "detection_eval.json"), "w") as f:
            json.dump(report, f, indent=2, default=str)
        head_acc = float(np.mean([r.label == rec.label for r, rec in zip(results, records)]))
        self.model.train()
        return {"n": len(records), "head_accuracy": head_acc, "report": report}

    def sample_grid(self, n: int) -> str:
        """``samples.png``: images from the first ``n`` training captions, each under its prompt (data sets without
        held-out scenes; the embedded one draws its grid in :func:`evaluate_generation`)."""
        from .evaluation import generate
        from .logs import plot_samples

        prompts = [r.prompt for r in self.gen_records[:n]]
        images = generate(self.model, self.tokenizer, self.packing, prompts, seed=self.cfg.seed,
                          steps=self.cfg.sample_steps, progress=self.progress)
        path = os.path.join(self.out_dir, "samples.png")
        plot_samples(images, prompts, path)
        return path


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


def _optimizer_state(folder: str) -> dict:
    return load_optimizer_state(folder)


def _primed(it: Iterator) -> Iterator:
    """``it`` with its first item already fetched."""
    first = next(it)
    return itertools.chain([first], it)


def train(cfg: TrainConfig, *, progress: bool = True) -> dict:
    """Run a whole training (the Python entry point behind ``python -m unigendet.train``)."""
    return Trainer(cfg, progress=progress).run()

