"""Files on disk that can be trusted: per-file SHA-256 checksums, atomic folders, finite weights, and reads of JSON
and safetensors files whose errors name the file.

A folder written with :func:`atomic_folder` (training checkpoints, the DIGA teacher snapshot, model exports) is
filled in a temporary sibling ``.<name>.tmp-XXXX``, gets ``checksums.json`` (size and SHA-256 of every file, each
file fsynced), and is renamed into place; an existing folder is first moved aside to ``.<name>.old-XXXX`` and
removed afterwards. A kill at any moment leaves the old folder or the new one (or, between the two renames, the old
one under its ``.old`` name, which :func:`clean_temporaries` puts back). :func:`verify_checksums` re-reads every
listed file and names the first one whose size or hash differs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping

import torch

__all__ = [
    "CHECKSUMS_NAME",
    "CheckpointError",
    "NonFiniteWeightsError",
    "atomic_folder",
    "atomic_write_text",
    "check_finite",
    "clean_temporaries",
    "has_checksums",
    "load_safetensors",
    "nonfinite_keys",
    "read_json",
    "safe_open_checked",
    "verify_checksums",
    "write_checksums",
]

CHECKSUMS_NAME = "checksums.json"
_FORMAT = "unigendet-checksums/1"
_CHUNK = 1 << 22


class CheckpointError(RuntimeError):
    """A checkpoint or weight file is missing, unreadable, fails its checksum or could not be written; the message
    names the file."""


class NonFiniteWeightsError(CheckpointError):
    """Weights hold NaN or infinite values; the message lists the first offending keys."""


# ------------------------------------------------------------------------------------------------ small files


def fsync_dir(path: str) -> None:
    """Make a rename or a new entry in ``path`` durable (a no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a fsynced temporary file and a rename: readers see the old or new file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".part", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(folder)


def read_json(path: str, error: type[Exception] = CheckpointError, *, mapping: bool = True):
    """``json.load`` of ``path`` whose failures (not UTF-8, truncated or invalid JSON, not an object when
    ``mapping``) raise ``error`` naming the file and the position. A missing file raises FileNotFoundError."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        end = len(raw.decode("utf-8", errors="replace").rstrip())
        what = "truncated" if e.pos >= end - 1 or e.msg.startswith("Unterminated string") else "invalid"
        raise error(f"{path}: {what} JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if mapping and not isinstance(data, dict):
        raise error(f"{path}: must hold a JSON object, got {type(data).__name__}")
    return data


# ------------------------------------------------------------------------------------------------ checksums


def _hash_file(path: str, fsync: bool = False) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
            n += len(chunk)
        if fsync:
            os.fsync(f.fileno())
    return h.hexdigest(), n


def write_checksums(folder: str) -> dict[str, dict]:
    """Fsync every file of ``folder`` (recursively) and record its size and SHA-256 in ``checksums.json``."""
    files: dict[str, dict] = {}
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for name in sorted(names):
            full = os.path.join(root, name)
            rel = os.path.relpath(full, folder).replace(os.sep, "/")
            if rel == CHECKSUMS_NAME or os.path.islink(full):
                continue
            digest, size = _hash_file(full, fsync=True)
            files[rel] = {"bytes": size, "sha256": digest}
    payload = json.dumps({"format": _FORMAT, "algorithm": "sha256", "files": files}, indent=1, sort_keys=True)
    atomic_write_text(os.path.join(folder, CHECKSUMS_NAME), payload + "\n")
    return files


def has_checksums(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, CHECKSUMS_NAME))


def verify_checksums(folder: str, names: list[str] | None = None, *, require: tuple[str, ...] = ()) -> list[str]:
    """Check ``folder`` against its ``checksums.json``; returns the verified names.

    ``names``: only these files (each must be listed); default every listed file. ``require``: files that must be
    listed. Raises :class:`CheckpointError` naming the first file that is missing, has another size (truncated or
    grown) or another SHA-256 (modified or corrupted), or when ``checksums.json`` itself is missing or unreadable.
    """
    path = os.path.join(folder, CHECKSUMS_NAME)
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder}: no {CHECKSUMS_NAME}, so its files cannot be verified")
    data = read_json(path)
    files = data.get("files")
    if data.get("format") != _FORMAT or not isinstance(files, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("bytes"), int) and isinstance(v.get("sha256"), str)
            for v in files.values()):
        raise CheckpointError(f"{path}: not a {_FORMAT} file")
    for name in require:
        if name not in files:
            raise CheckpointError(f"{path}: does not list {name}")
    todo = sorted(files) if names is None else list(names)
    for name in todo:
        entry = files.get(name)
        full = os.path.join(folder, name)
        if entry is None:
            raise CheckpointError(f"{full}: not listed in {CHECKSUMS_NAME}")
        if not os.path.isfile(full):
            raise CheckpointError(f"{full}: missing (listed in {CHECKSUMS_NAME})")
        size = os.path.getsize(full)
        if size != entry["bytes"]:
            raise CheckpointError(f"{full}: {size} bytes, {CHECKSUMS_NAME} says {entry['bytes']} "
                                  f"({'truncated' if size < entry['bytes'] else 'grown'})")
        digest, _ = _hash_file(full)
        if digest != entry["sha256"]:
            raise CheckpointError(f"{full}: SHA-256 mismatch (the file was modified or corrupted)")
    return todo


# ------------------------------------------------------------------------------------------------ atomic folders


@contextlib.contextmanager
def atomic_folder(folder: str) -> Iterator[str]:
    """Yield a temporary sibling of ``folder`` to fill; on success write its checksums and rename it to ``folder``
    (replacing an existing one). On any exception, including a signal, the temporary folder is removed; an OSError
    (a full disk) is raised as :class:`CheckpointError` naming ``folder``, which is left as it was."""
    folder = os.path.abspath(folder)
    parent, name = os.path.split(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        yield tmp
        write_checksums(tmp)
        old = None
        if os.path.lexists(folder):
            old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
            os.rename(folder, os.path.join(old, name))
        os.rename(tmp, folder)
        fsync_dir(parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write {folder}: {e}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def clean_temporaries(parent: str, legacy_prefixes: tuple[str, ...] = ()) -> list[str]:
    """Remove what interrupted :func:`atomic_folder` writes left in ``parent``; returns the removed paths.

    ``.X.tmp-*`` folders and ``.X.*.part`` files are deleted; an ``.X.old-*`` folder is moved back to ``X`` when
    ``X`` is missing (a kill between the two renames), else deleted. ``legacy_prefixes``: further name prefixes to
    delete (older layouts).
    """
    removed: list[str] = []
    if not os.path.isdir(parent):
        return removed
    for entry in sorted(os.listdir(parent)):
        full = os.path.join(parent, entry)
        if entry.startswith(".") and ".old-" in entry and os.path.isdir(full):
            name = entry[1:entry.rindex(".old-")]
            inner = os.path.join(full, name)
            target = os.path.join(parent, name)
            if name and os.path.isdir(inner) and not os.path.lexists(target):
                os.rename(inner, target)
            shutil.rmtree(full, ignore_errors=True)
            removed.append(full)
        elif (entry.startswith(".") and (".tmp-" in entry or entry.endswith(".part"))) or (
                legacy_prefixes and entry.startswith(legacy_prefixes)):
            if os.path.isdir(full) and not os.path.islink(full):
                shutil.rmtree(full, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(full)
            removed.append(full)
    return removed


# ------------------------------------------------------------------------------------------------ tensors


def nonfinite_keys(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Keys of the floating-point tensors holding a NaN or an infinity, in order."""
    bad = []
    for k, t in tensors.items():
        if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()) and t.numel():
            if not bool(torch.isfinite(t).all()):
                bad.append(k)
    return bad


def check_finite(tensors: Mapping[str, torch.Tensor], what: str, shown: int = 5) -> None:
    """Raise :class:`NonFiniteWeightsError` listing the first ``shown`` non-finite tensors of ``what``."""
    bad = nonfinite_keys(tensors)
    if bad:
        more = f" (and {len(bad) - shown} more)" if len(bad) > shown else ""
        raise NonFiniteWeightsError(f"{what}: non-finite values (NaN/inf) in {len(bad)} tensor(s): "
                                    f"{', '.join(bad[:shown])}{more}")


def load_safetensors(path: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file`` whose failures (missing, empty, truncated, bad header) name the file."""
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing")
    try:
        return load_file(path, device=str(device))
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError) without the path
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None


@contextlib.contextmanager
def safe_open_checked(path: str):
    """``safetensors.safe_open(path, framework="pt")`` whose failures name the file."""
    from safetensors import safe_open

    try:
        handle = safe_open(path, framework="pt")
    except FileNotFoundError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    with handle as h:
        yield h
