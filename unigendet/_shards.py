"""Sharded safetensors files with a Hugging Face-style index (``<prefix>.safetensors.index.json``)."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from ._integrity import CheckpointError, check_finite, has_checksums, load_safetensors, read_json, verify_checksums

__all__ = ["load_sharded", "read_index", "save_sharded"]

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


def read_index(index_path: str) -> dict[str, str]:
    """The ``weight_map`` of a Hugging Face-style index as {key: file path}, validated.

    Raises :class:`CheckpointError` naming the index for invalid or truncated JSON, a missing or malformed
    ``weight_map``, or a file name that leaves the index's folder (absolute, or through ``..``).
    """
    index = read_json(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_path}: 'weight_map' must be an object of tensor name -> file name")
    base = os.path.dirname(os.path.abspath(index_path))
    out: dict[str, str] = {}
    for key, fname in weight_map.items():
        if not isinstance(fname, str) or not fname or "\0" in fname:
            raise CheckpointError(f"{index_path}: weight_map[{key!r}] must be a file name, got {fname!r}")
        norm = os.path.normpath(fname)
        if os.path.isabs(fname) or norm == ".." or norm.startswith(".." + os.sep):
            raise CheckpointError(f"{index_path}: weight_map[{key!r}] = {fname!r} points outside the folder "
                                  f"{base!r}; an index may only name files inside its own folder")
        out[key] = os.path.join(base, norm)
    return out


def load_sharded(folder: str, prefix: str = "model", device: str = "cpu", *, verify: bool = True,
                 check_finite_values: bool = True) -> dict[str, torch.Tensor]:
    """Every tensor of the shards listed in ``<prefix>.safetensors.index.json``.

    ``verify``: when the folder has ``checksums.json`` (written by every atomic save), the index and shards are
    checked against it first. ``check_finite_values``: NaN or infinite weights raise
    :class:`~unigendet._integrity.NonFiniteWeightsError` naming the first bad keys. Unreadable files raise
    :class:`~unigendet._integrity.CheckpointError` naming the file.
    """
    index_name = f"{prefix}.safetensors.index.json"
    index_path = os.path.join(folder, index_name)
    if not os.path.isfile(index_path):
        raise CheckpointError(f"{index_path}: missing")
    files = read_index(index_path)
    shards = sorted(set(files.values()))
    if verify and has_checksums(folder):
        verify_checksums(folder, [index_name] + [os.path.relpath(f, os.path.abspath(folder)) for f in shards])
    out: dict[str, torch.Tensor] = {}
    for path in shards:
        out.update(load_safetensors(path, device=device))
    missing = sorted(set(files) - set(out))
    if missing:
        raise CheckpointError(f"{index_path}: lists {len(missing)} tensor(s) its shards do not hold: {missing[:5]}")
    if check_finite_values:
        check_finite(out, os.path.join(folder, prefix))
    return out
