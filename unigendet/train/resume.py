"""What a checkpoint must satisfy before a run continues from it.

* The configuration it was written with equals this run's, except the fields in
  :data:`~unigendet.train.config.RESUME_MUTABLE` (reporting, saving, end-of-run outputs); otherwise resuming is
  refused unless ``allow_config_change`` is set, and then every difference is reported.
* Every value of its ``trainer_state.json`` is of the right type and inside what the configuration allows: the
  stage and round are in this run's plan, ``0 <= stage_step <= <stage>.steps``, the data positions are the ones
  ``stage_step`` steps and the counted empty packs reach, and the process count is this run's.

Both raise :class:`ResumeError` naming the file and the field.
"""

from __future__ import annotations

import json
import os
import re

from .config import RESUME_MUTABLE, TrainConfig, config_to_dict

__all__ = ["ResumeError", "check_resume", "check_trainer_state", "config_changes"]

_MISSING = "(absent)"


class ResumeError(ValueError):
    """A checkpoint that this run cannot continue: another configuration, another process count, or state values
    outside what the configuration allows."""


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(stored: dict, cfg: TrainConfig) -> list[tuple[str, object, object]]:
    """``(field, checkpoint value, this run's value)`` for every field that differs, ignoring
    :data:`RESUME_MUTABLE`; tuples and lists compare equal (the stored config went through JSON)."""
    now = _flatten(json.loads(json.dumps(config_to_dict(cfg))))
    old = _flatten(stored)
    out = []
    for key in sorted(set(now) | set(old)):
        if key in RESUME_MUTABLE:
            continue
        a, b = old.get(key, _MISSING), now.get(key, _MISSING)
        if a != b:
            out.append((key, a, b))
    return out


def check_resume(meta: dict, cfg: TrainConfig, world_size: int, folder: str) -> list[tuple[str, object, object]]:
    """Everything a checkpoint's ``trainer_state.json`` must satisfy to continue this run: the configuration it
    stores equals this run's (:func:`config_changes`; else :class:`ResumeError` unless ``cfg.allow_config_change``)
    and its values fit (:func:`check_trainer_state`). Returns the configuration changes that were allowed."""
    stored = meta.get("config")
    if not isinstance(stored, dict):
        raise ResumeError(f"{os.path.join(folder, 'trainer_state.json')}: no stored configuration to compare with")
    changes = config_changes(stored, cfg)
    if changes and not cfg.allow_config_change:
        shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changes[:8])
        more = f" (and {len(changes) - 8} more)" if len(changes) > 8 else ""
        raise ResumeError(f"the configuration differs from the one {folder} was written with: {shown}{more}. "
                          "Resume with the same options, or pass --allow-config-change to continue anyway")
    accum = stored.get("grad_accum")
    check_trainer_state(meta, cfg, world_size, folder,
                        stored_grad_accum=accum if isinstance(accum, int) and not isinstance(accum, bool) else None)
    return changes


def _int(meta: dict, key: str, where: str, lo: int, hi: int | None, why: str = "") -> int:
    v = meta.get(key, _MISSING)
    if v is _MISSING:
        raise ResumeError(f"{where}: missing field {key!r}")
    if not isinstance(v, int) or isinstance(v, bool):
        raise ResumeError(f"{where}: {key} must be an integer, got {v!r}")
    if v < lo or (hi is not None and v > hi):
        bound = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ResumeError(f"{where}: {key} = {v} is out of range {bound}{why}")
    return v


def check_trainer_state(meta: dict, cfg: TrainConfig, world_size: int, folder: str,
                        stored_grad_accum: int | None = None) -> None:
    """Range-check a checkpoint's trainer state against this run (see the module docstring)."""
    where = os.path.join(folder, "trainer_state.json")
    ws = meta.get("world_size", 1)
    if ws != world_size:
        raise ResumeError(f"{where}: written by {ws} processes, this run has {world_size}; resume with the same "
                          "number of processes")
    stage = meta.get("stage", _MISSING)
    if stage not in ("gduf", "diga"):
        raise ResumeError(f"{where}: stage must be 'gduf' or 'diga', got {stage!r}")
    rnd = _int(meta, "round", where, 1, cfg.rounds, f" (this run has rounds={cfg.rounds})")
    stages = {"gduf": ["gduf"], "diga": ["diga"], "all": ["gduf", "diga"]}[cfg.stage]
    if stage not in stages:
        raise ResumeError(f"{where}: the checkpoint is in stage {stage!r}, which this run (stage={cfg.stage}) "
                          "does not train")
    scfg = cfg.gduf if stage == "gduf" else cfg.diga
    steps = scfg.steps_in_round(rnd)
    field = "steps" if steps == scfg.steps else "round_steps"
    step = _int(meta, "stage_step", where, 0, steps, f" ({stage}.{field} = {steps})")
    _int(meta, "global_step", where, step, None, " (at least stage_step)")
    if "step" in meta and meta["step"] != meta["global_step"]:
        raise ResumeError(f"{where}: step {meta['step']!r} differs from global_step {meta['global_step']}")
    _int(meta, "nonfinite", where, 0, None)
    completed = meta.get("completed")
    if not isinstance(completed, list) or not all(isinstance(c, str) and re.fullmatch(r"r\d+-(gduf|diga)", c)
                                                 for c in completed):
        raise ResumeError(f"{where}: completed must be a list of stage keys like 'r1-gduf', got {completed!r}")
    if f"r{rnd}-{stage}" in completed:
        raise ResumeError(f"{where}: stage r{rnd}-{stage} is both in progress and completed")
    if not isinstance(meta.get("history"), dict):
        raise ResumeError(f"{where}: history must be an object")
    fakes = meta.get("extra_fakes", [])
    if not isinstance(fakes, list) or not all(isinstance(r, dict) for r in fakes):
        raise ResumeError(f"{where}: extra_fakes must be a list of records")
    sched = meta.get("scheduler")
    if not isinstance(sched, dict):
        raise ResumeError(f"{where}: scheduler must be an object")
    _int(sched, "last_epoch", f"{where}: scheduler", 0, step, " (optimizer steps taken, at most stage_step)")

    # Data positions: rank r reads global packs r, r + W, ...; after `n` packs (stage_step x grad_accum used by
    # the steps, plus the packs that came out empty) its next pack is r + n W.
    positions, empty = meta.get("next_pack"), meta.get("empty_packs")
    for name, val in (("next_pack", positions), ("empty_packs", empty)):
        if not (isinstance(val, list) and len(val) == world_size
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in val)):
            raise ResumeError(f"{where}: {name} must be a list of {world_size} non-negative integers, got {val!r}")
    accum = max(1, cfg.grad_accum, stored_grad_accum or 1)
    for r, (pos, e) in enumerate(zip(positions, empty)):
        used = (pos - r) // world_size - e
        if (pos - r) % world_size or not step <= used <= step * accum:
            raise ResumeError(
                f"{where}: next_pack[{r}] = {pos} does not fit {step} steps of at most {accum} packs (+ {e} empty) "
                f"on {world_size} process(es): expected {r + world_size * (step + e)}"
                + (f"..{r + world_size * (step * accum + e)}" if accum > 1 else ""))
