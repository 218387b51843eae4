"""Training checkpoints: atomic, pickle-free, exactly resumable.

A checkpoint is a folder ``<out>/checkpoints/step_0000120/`` holding

- ``model-0000x-of-0000n.safetensors`` + ``model.safetensors.index.json``: the weights (sharded safetensors,
  the model's own key space),
- ``ema.safetensors`` (when an EMA is kept),
- ``optimizer.safetensors`` + the optimizer's non-tensor state in ``trainer_state.json``,
- ``rng.safetensors``: torch CPU/CUDA generator states and numpy's key array,
- ``trainer_state.json``: step, stage, round, scheduler, data position, counters, Python/numpy RNG scalars.

- ``checksums.json``: the size and SHA-256 of every other file (``unigendet._integrity``).

It is written to a temporary folder beside the final one, every file is fsynced and checksummed, then the folder
is renamed into place (atomic on POSIX), and ``latest`` (a one-line text file) is replaced atomically after that,
so a crash or SIGKILL at any moment leaves either the previous checkpoint or the new one. A checkpoint is never
written from non-finite weights, optimizer or EMA state (:class:`NonFiniteWeightsError`, before anything is
written). Loading verifies every checksum, parses every file and checks the weights are finite, raising
:class:`CheckpointError` naming the file otherwise; :meth:`CheckpointManager.load_newest_intact` walks back from
the newest checkpoint to the newest intact one. Pruning keeps the newest ``keep_last`` *verified* checkpoints, so a
good checkpoint is never deleted in favour of one that failed verification. Nothing is ever loaded with pickle.
"""

from __future__ import annotations

import glob
import json
import os
import random
import shutil
from collections.abc import Callable

import numpy as np
import torch
from safetensors.torch import save_file

from .._integrity import (
    CheckpointError,
    NonFiniteWeightsError,
    atomic_folder,
    atomic_write_text,
    check_finite,
    clean_temporaries,
    load_safetensors,
    read_json,
    verify_checksums,
)
from .._shards import _host_tensors, load_sharded, save_sharded

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "NonFiniteWeightsError",
    "atomic_write_text",
    "clean_stale_temporaries",
    "get_rng_state",
    "load_optimizer_state",
    "load_sharded",
    "save_sharded",
    "save_snapshot",
    "set_rng_state",
]

# ----------------------------------------------------------------------------------------------------------
# RNG
# ----------------------------------------------------------------------------------------------------------


def get_rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).view(np.int32).copy())
    py_version, py_state, py_gauss = random.getstate()
    scalars = {"numpy": [kind, int(pos), int(has_gauss), float(cached)],
               "python": [py_version, list(py_state), py_gauss]}
    return tensors, scalars


def set_rng_state(tensors: dict[str, torch.Tensor], scalars: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda_states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
    kind, pos, has_gauss, cached = scalars["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().view(np.uint32), pos, has_gauss, cached))
    version, state, gauss = scalars["python"]
    random.setstate((version, tuple(state), gauss))


# ----------------------------------------------------------------------------------------------------------
# Optimizer state without pickles
# ----------------------------------------------------------------------------------------------------------


def _optimizer_to_safetensors(opt_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for pid, st in opt_state["state"].items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"{pid}.{key}"] = val
            else:
                scalars[f"{pid}.{key}"] = val
    return tensors, {"param_groups": opt_state["param_groups"], "scalars": scalars}


def _optimizer_from_safetensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, t in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = t
    for name, v in meta["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = v
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


# ----------------------------------------------------------------------------------------------------------
# Manager
# ----------------------------------------------------------------------------------------------------------

_REQUIRED = ("trainer_state.json", "rng.safetensors", "model.safetensors.index.json")


class CheckpointManager:
    """Saves, lists, verifies, prunes and loads training checkpoints under ``<out_dir>/checkpoints``."""

    def __init__(self, out_dir: str, keep_last: int = 2):
        self.root = os.path.join(out_dir, "checkpoints")
        self.keep_last = keep_last
        self._verified: set[str] = set()  # names fully verified by this process (written or checked)

    def _name(self, step: int, tag: str = "") -> str:
        return f"step_{step:07d}" + (f"_{tag}" if tag else "")

    def save(self, *, step: int, model_state: dict[str, torch.Tensor],
             optimizer: torch.optim.Optimizer | dict | None, trainer_state: dict,
             ema_state: dict[str, torch.Tensor] | None = None, tag: str = "") -> str:
        """Write one checkpoint atomically, then prune older ones; returns its folder.

        ``optimizer`` is an optimizer or its ``state_dict()`` (e.g. one gathered from a sharded model). Non-finite
        weights, EMA or optimizer tensors raise :class:`NonFiniteWeightsError` before anything is written; a
        failed write (a full disk) raises :class:`CheckpointError` and leaves the previous checkpoints as they were.
        """
        name = self._name(step, tag)
        final = os.path.join(self.root, name)
        check_finite(model_state, f"checkpoint {name}: model weights")
        if ema_state is not None:
            check_finite(ema_state, f"checkpoint {name}: EMA weights")
        opt_tensors = opt_meta = None
        if optimizer is not None:
            osd = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
            opt_tensors, opt_meta = _optimizer_to_safetensors(osd)
            check_finite(opt_tensors, f"checkpoint {name}: optimizer state")
        previous = self.latest_name()
        try:
            os.makedirs(self.root, exist_ok=True)
            with atomic_folder(final) as tmp:
                save_sharded(model_state, tmp, "model")
                if ema_state is not None:
                    save_file(_host_tensors(ema_state, None), os.path.join(tmp, "ema.safetensors"))
                meta = dict(trainer_state)
                if opt_tensors is not None:
                    save_file(_host_tensors(opt_tensors, None), os.path.join(tmp, "optimizer.safetensors"))
                    meta["optimizer"] = opt_meta
                rng_tensors, rng_scalars = get_rng_state()
                save_file(_host_tensors(rng_tensors, None), os.path.join(tmp, "rng.safetensors"))
                meta["rng"] = rng_scalars
                meta["step"] = step
                atomic_write_text(os.path.join(tmp, "trainer_state.json"), json.dumps(meta))
            self._verified.add(name)
            self._write_latest(name)
        except (OSError, CheckpointError) as e:
            cause = e.__cause__ if isinstance(e, CheckpointError) and e.__cause__ is not None else e
            kept = f"; {os.path.join(self.root, previous)} is intact" if previous and previous != name else ""
            raise CheckpointError(f"could not write checkpoint {final}: {cause}{kept}") from cause
        self.prune()
        return final

    def _write_latest(self, name: str) -> None:
        atomic_write_text(os.path.join(self.root, "latest"), name + "\n")

    def list(self) -> list[str]:
        """Every checkpoint folder (intact or not), oldest first."""
        if not os.path.isdir(self.root):
            return []
        return sorted(n for n in os.listdir(self.root) if n.startswith("step_")
                      and os.path.isdir(os.path.join(self.root, n)))

    def candidates(self) -> list[str]:
        """Checkpoint names newest first: the one ``latest`` names (the last completed save), then the others by
        decreasing step."""
        names = self.list()[::-1]
        pointed = self._pointer()
        if pointed in names:
            names.remove(pointed)
            names.insert(0, pointed)
        return names

    def _pointer(self) -> str | None:
        path = os.path.join(self.root, "latest")
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                return f.read().strip() or None
        except OSError:
            return None

    def verify(self, folder: str) -> None:
        """Check a checkpoint folder: its checksums (every file), the files a checkpoint needs, and that
        ``trainer_state.json`` parses. Raises :class:`CheckpointError` naming the first bad file."""
        verify_checksums(folder, require=_REQUIRED)
        read_json(os.path.join(folder, "trainer_state.json"))
        self._verified.add(os.path.basename(folder))

    def is_intact(self, name: str) -> bool:
        if name in self._verified:
            return True
        try:
            self.verify(os.path.join(self.root, name))
        except (CheckpointError, OSError):
            return False
        return True

    def prune(self) -> None:
        """Keep the newest ``keep_last`` verified checkpoints and anything newer than the oldest of them (a folder
        that failed verification is kept for inspection but does not count); delete everything older."""
        kept = 0
        for name in self.candidates():
            if kept >= self.keep_last:
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
                self._verified.discard(name)
            elif self.is_intact(name):
                kept += 1
        self.clean_stale()

    def clean_stale(self) -> list[str]:
        """Remove leftovers of interrupted saves (temporary folders and files); returns what was removed."""
        return clean_temporaries(self.root, legacy_prefixes=(".latest-",))

    def latest_name(self) -> str | None:
        """The newest checkpoint that has its trainer state (not verified; see :meth:`load_newest_intact`)."""
        for name in self.candidates():
            if os.path.isfile(os.path.join(self.root, name, "trainer_state.json")):
                return name
        return None

    def latest(self) -> str | None:
        name = self.latest_name()
        return os.path.join(self.root, name) if name else None

    def load_newest_intact(self, *, restore_rng: bool = True, device: str = "cpu",
                           on_skip: Callable[[str, str], None] | None = None) -> dict | None:
        """:meth:`load` the newest checkpoint that verifies, walking back over the ones that do not.

        ``on_skip(folder, reason)`` is called once for every checkpoint skipped. Returns None when there is no
        checkpoint at all; raises :class:`CheckpointError` listing every reason when none is intact. The result
        also holds ``folder``.
        """
        reasons = []
        for name in self.candidates():
            folder = os.path.join(self.root, name)
            try:
                loaded = self.load(folder, restore_rng=restore_rng, device=device, verify=True)
            except (CheckpointError, OSError) as e:
                reason = str(e)
                reasons.append(f"{name}: {reason}")
                if on_skip is not None:
                    on_skip(folder, reason)
                continue
            self._verified.add(name)
            loaded["folder"] = folder
            return loaded
        if reasons:
            raise CheckpointError(f"no intact checkpoint in {self.root}: " + "; ".join(reasons))
        return None

    @staticmethod
    def load(folder: str, optimizer: torch.optim.Optimizer | None = None, restore_rng: bool = True,
             device: str = "cpu", verify: bool = True) -> dict:
        """Read a checkpoint: returns {model_state, ema_state, trainer_state}; loads the optimizer in place.

        ``verify`` checks every file against ``checksums.json`` first. Every failure (a checksum, an unreadable
        file, missing fields, non-finite weights) raises :class:`CheckpointError` naming the file; the RNG is
        restored only once everything else has been read.
        """
        if verify:
            verify_checksums(folder, require=_REQUIRED)
        state_path = os.path.join(folder, "trainer_state.json")
        if not os.path.isfile(state_path):
            raise CheckpointError(f"{state_path}: missing")
        meta = read_json(state_path)
        model_state = load_sharded(folder, "model", device=device, verify=False)
        ema_path = os.path.join(folder, "ema.safetensors")
        ema_state = load_safetensors(ema_path, device=device) if os.path.exists(ema_path) else None
        if ema_state is not None:
            check_finite(ema_state, ema_path)
        if optimizer is not None and "optimizer" in meta:
            optimizer.load_state_dict(_read_optimizer(folder, meta, device))
        rng = None
        if restore_rng:
            rng = load_safetensors(os.path.join(folder, "rng.safetensors"))
            if "rng" not in meta or "torch_cpu" not in rng:
                raise CheckpointError(f"{folder}: trainer_state.json or rng.safetensors lacks the RNG state")
        if rng is not None:
            try:
                set_rng_state(rng, meta["rng"])
            except (TypeError, ValueError, KeyError, RuntimeError) as e:
                raise CheckpointError(f"{state_path}: unusable RNG state ({e})") from None
        return {"model_state": model_state, "ema_state": ema_state, "trainer_state": meta}


def _read_optimizer(folder: str, meta: dict, device: str = "cpu") -> dict:
    path = os.path.join(folder, "optimizer.safetensors")
    tensors = load_safetensors(path, device=device)
    check_finite(tensors, path)
    try:
        return _optimizer_from_safetensors(tensors, meta["optimizer"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{folder}: optimizer state in trainer_state.json is malformed ({e})") from None


def load_optimizer_state(folder: str, verify: bool = True) -> dict:
    """The optimizer ``state_dict`` of a checkpoint, its two files verified against ``checksums.json`` unless
    ``verify=False`` (the whole folder was just verified, e.g. by :meth:`CheckpointManager.load_newest_intact`)."""
    if verify:
        verify_checksums(folder, ["trainer_state.json", "optimizer.safetensors"])
    return _read_optimizer(folder, read_json(os.path.join(folder, "trainer_state.json")))


# ----------------------------------------------------------------------------------------------------------
# Other folders of a run
# ----------------------------------------------------------------------------------------------------------


def save_snapshot(state: dict[str, torch.Tensor], folder: str) -> None:
    """Weights as an atomic, checksummed sharded-safetensors folder (the end-of-GDUF snapshot the DIGA teacher is
    rebuilt from); read back with :func:`load_sharded`, which verifies it."""
    check_finite(state, folder)
    with atomic_folder(folder) as tmp:
        save_sharded(state, tmp, "model")


def clean_stale_temporaries(out_dir: str) -> list[str]:
    """Remove what interrupted saves left in a run folder (``checkpoints/.tmp-*``, ``.final.tmp-*``, the
    snapshot's temporaries, ...), putting back a folder a kill left under its ``.old`` name; returns what was
    removed."""
    removed = CheckpointManager(out_dir).clean_stale()
    removed += clean_temporaries(out_dir)
    for rnd in sorted(glob.glob(os.path.join(glob.escape(out_dir), "round*"))):
        if os.path.isdir(rnd):
            removed += clean_temporaries(rnd, legacy_prefixes=("gduf_model.tmp",))
    return removed
