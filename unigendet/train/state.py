"""Training checkpoints: atomic, pickle-free, exactly resumable.

A checkpoint is a folder ``<out>/checkpoints/step_0000120/`` holding

- ``model-0000x-of-0000n.safetensors`` + ``model.safetensors.index.json``: the weights (sharded safetensors,
  the model's own key space),
- ``ema.safetensors`` (when an EMA is kept),
- ``optimizer.safetensors`` + the optimizer's non-tensor state in ``trainer_state.json``,
- ``rng.safetensors``: torch CPU/CUDA generator states and numpy's key array,
- ``trainer_state.json``: step, stage, round, scheduler, data position, counters, Python/numpy RNG scalars.

It is written to a temporary folder beside the final one, then renamed into place (``os.replace`` of a folder
is atomic on POSIX), and ``latest`` (a one-line text file) is replaced atomically after that, so a crash or
SIGKILL at any moment leaves either the previous checkpoint or the new one. Only the newest ``keep_last``
checkpoints are kept. Nothing is ever loaded with pickle.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .._shards import _host_tensors, load_sharded, save_sharded

__all__ = [
    "CheckpointManager",
    "get_rng_state",
    "load_sharded",
    "save_sharded",
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


class CheckpointManager:
    """Saves, lists, prunes and loads training checkpoints under ``<out_dir>/checkpoints``."""

    def __init__(self, out_dir: str, keep_last: int = 2):
        self.root = os.path.join(out_dir, "checkpoints")
        self.keep_last = keep_last

    def _name(self, step: int, tag: str = "") -> str:
        return f"step_{step:07d}" + (f"_{tag}" if tag else "")

    def save(self, *, step: int, model_state: dict[str, torch.Tensor],
             optimizer: torch.optim.Optimizer | dict | None, trainer_state: dict,
             ema_state: dict[str, torch.Tensor] | None = None, tag: str = "") -> str:
        """Write one checkpoint atomically and prune old ones; returns its folder.

        ``optimizer`` is an optimizer or its ``state_dict()`` (e.g. one gathered from a sharded model).
        """
        os.makedirs(self.root, exist_ok=True)
        final = os.path.join(self.root, self._name(step, tag))
        tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(final) + "-", dir=self.root)
        try:
            save_sharded(model_state, tmp, "model")
            if ema_state is not None:
                save_file(_host_tensors(ema_state, None), os.path.join(tmp, "ema.safetensors"))
            meta = dict(trainer_state)
            if optimizer is not None:
                osd = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
                tensors, opt_meta = _optimizer_to_safetensors(osd)
                save_file(_host_tensors(tensors, None), os.path.join(tmp, "optimizer.safetensors"))
                meta["optimizer"] = opt_meta
            rng_tensors, rng_scalars = get_rng_state()
            save_file(_host_tensors(rng_tensors, None), os.path.join(tmp, "rng.safetensors"))
            meta["rng"] = rng_scalars
            meta["step"] = step
            with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
                json.dump(meta, f)
                f.flush()
                os.fsync(f.fileno())
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._write_latest(os.path.basename(final))
        self.prune()
        return final

    def _write_latest(self, name: str) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".latest-", dir=self.root)
        with os.fdopen(fd, "w") as f:
            f.write(name + "\n")
        os.replace(tmp, os.path.join(self.root, "latest"))

    def list(self) -> list[str]:
        if not os.path.isdir(self.root):
            return []
        names = [n for n in os.listdir(self.root) if n.startswith("step_")
                 and os.path.isfile(os.path.join(self.root, n, "trainer_state.json"))]
        return sorted(names)

    def prune(self) -> None:
        names = self.list()
        protected = self.latest_name()
        for n in names[: max(0, len(names) - self.keep_last)]:
            if n != protected:
                shutil.rmtree(os.path.join(self.root, n), ignore_errors=True)
        for n in os.listdir(self.root):  # leftovers of interrupted saves
            if n.startswith(".tmp-"):
                shutil.rmtree(os.path.join(self.root, n), ignore_errors=True)

    def latest_name(self) -> str | None:
        path = os.path.join(self.root, "latest")
        if os.path.isfile(path):
            name = open(path).read().strip()
            if os.path.isfile(os.path.join(self.root, name, "trainer_state.json")):
                return name
        names = self.list()
        return names[-1] if names else None

    def latest(self) -> str | None:
        name = self.latest_name()
        return os.path.join(self.root, name) if name else None

    @staticmethod
    def load(folder: str, optimizer: torch.optim.Optimizer | None = None, restore_rng: bool = True,
             device: str = "cpu") -> dict:
        """Read a checkpoint: returns {model_state, ema_state, trainer_state}; loads the optimizer in place."""
        with open(os.path.join(folder, "trainer_state.json")) as f:
            meta = json.load(f)
        model_state = load_sharded(folder, "model", device=device)
        ema_path = os.path.join(folder, "ema.safetensors")
        ema_state = load_file(ema_path, device=device) if os.path.exists(ema_path) else None
        if optimizer is not None and "optimizer" in meta:
            tensors = load_file(os.path.join(folder, "optimizer.safetensors"), device=device)
            optimizer.load_state_dict(_optimizer_from_safetensors(tensors, meta["optimizer"]))
        if restore_rng:
            set_rng_state(load_file(os.path.join(folder, "rng.safetensors")), meta["rng"])
        return {"model_state": model_state, "ema_state": ema_state, "trainer_state": meta}
