"""Checks of a training configuration that need the file system, done before any model is built.

* The run folder rule: a run never writes into a non-empty ``out_dir`` (it would overwrite the previous run's
  outputs and append to its ``train.jsonl``) unless it continues that run (``resume``) or replaces it
  (``overwrite``, which first deletes the previous run's outputs there, and only those).
* Input paths: the base model folder and the data files of ``data.source="files"``.
"""

from __future__ import annotations

import os
import re
import shutil

__all__ = ["RUN_OUTPUTS", "check_inputs", "clear_run_outputs", "out_dir_problem"]

#: What a run writes into its out_dir (``round<N>/`` folders and temporary ``.final.*`` folders come on top).
RUN_OUTPUTS = ("train.jsonl", "summary.json", "losses.png", "samples.png", "detection_eval.json", "final",
               "checkpoints", "eval")
_RUN_PATTERN = re.compile(r"^(round\d+|\.final\..*)$")


def _is_run_output(name: str) -> bool:
    return name in RUN_OUTPUTS or bool(_RUN_PATTERN.match(name))


def out_dir_problem(cfg) -> str | None:
    """Why the run may not write into ``cfg.out_dir`` (None: it may)."""
    d = cfg.out_dir
    if os.path.exists(d) and not os.path.isdir(d):
        return f"out_dir {d} is a file, not a folder"
    if cfg.resume or cfg.overwrite or not os.path.isdir(d):
        return None
    entries = sorted(os.listdir(d))
    if not entries:
        return None
    shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
    return (f"out_dir {d} is not empty ({shown}); pass --resume to continue that run, --overwrite to replace it, "
            "or --out_dir=NEW_FOLDER")


def clear_run_outputs(out_dir: str) -> list[str]:
    """Delete the outputs of a previous run in ``out_dir`` (nothing else); returns the names removed."""
    removed = []
    if not os.path.isdir(out_dir):
        return removed
    for name in sorted(os.listdir(out_dir)):
        if not _is_run_output(name):
            continue
        path = os.path.join(out_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
        removed.append(name)
    return removed


def check_inputs(cfg) -> None:
    """The model and data paths the configuration names exist (``FileNotFoundError`` naming the option)."""
    from unigendet.models.config import PRESETS as MODEL_PRESETS

    base = cfg.model_path or (None if cfg.model in MODEL_PRESETS else cfg.model)
    if base is not None:
        opt = "--model_path" if cfg.model_path else "--model"
        if not os.path.isdir(base):
            known = ", ".join(MODEL_PRESETS)
            hint = "" if cfg.model_path else f" (and not a model preset: {known})"
            raise FileNotFoundError(f"{opt} {base}: no such folder{hint}")
        missing = [n for n in ("llm_config.json", "vit_config.json") if not os.path.isfile(os.path.join(base, n))]
        if missing:
            raise FileNotFoundError(f"{opt} {base}: not a model folder (no {' / '.join(missing)})")
    if cfg.data.source != "embedded":
        root, manifest = cfg.data.fakeclue_root, cfg.data.laion_manifest
        if root is None and manifest is None:
            raise ValueError(f"data.source={cfg.data.source!r} needs --data.fakeclue_root and/or "
                             "--data.laion_manifest (or --data.source=embedded)")
        if root is not None:
            if not os.path.isdir(root):
                raise FileNotFoundError(f"--data.fakeclue_root {root}: no such folder")
            split = os.path.join(root, "data_json", "train.json")
            if not os.path.isfile(split):
                raise FileNotFoundError(f"--data.fakeclue_root {root}: no FakeClue data_json/train.json in it")
        if manifest is not None and not os.path.exists(manifest):
            raise FileNotFoundError(f"--data.laion_manifest {manifest}: no such file or folder")
