"""Sharded safetensors files with a Hugging Face-style index (``<prefix>.safetensors.index.json``)."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file

__all__ = ["load_sharded", "save_sharded"]

_SHARD_BYTES = 2 * 1024**3


def _host_tensors(sd: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors (floating ones cast to ``dtype``); shared storage is cloned, since
    safetensors refuses tensors that share memory."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, v in sd.items():
        t = v.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        t = t.to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else (id(t), 0)
        if key in seen:
            t = t.clone()
        seen.add(key)
        out[k] = t
    return out


def save_sharded(state: dict[str, torch.Tensor], folder: str, prefix: str = "model",
                 max_shard_bytes: int = _SHARD_BYTES, dtype: torch.dtype | None = None,
                 metadata: dict[str, str] | None = None) -> list[str]:
    """Write ``state`` as ``<prefix>-0000i-of-0000n.safetensors`` + ``<prefix>.safetensors.index.json`` into the
    existing ``folder``; returns the shard names. Shards are filled in key order up to ``max_shard_bytes``."""
    state = _host_tensors(state, dtype)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += nbytes
    n = len(shards)
    names, weight_map = [], {}
    for i, shard in enumerate(shards):
        name = f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(shard, os.path.join(folder, name), metadata=metadata or {"format": "pt"})
        names.append(name)
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    with open(os.path.join(folder, f"{prefix}.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    return names


def load_sharded(folder: str, prefix: str = "model", device: str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of the shards listed in ``<prefix>.safetensors.index.json``."""
    with open(os.path.join(folder, f"{prefix}.safetensors.index.json")) as f:
        index = json.load(f)
    out: dict[str, torch.Tensor] = {}
    for name in sorted(set(index["weight_map"].values())):
        out.update(load_file(os.path.join(folder, name), device=device))
    return out
