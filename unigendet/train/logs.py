"""Structured training logs (JSONL) and the loss-curve plots written at the end of a run.

The log survives faults: a record is appended with one ``write`` on an ``O_APPEND`` descriptor, and a write that
fails part-way (a full disk) is cut back to the last complete line, counted in :attr:`JsonlLogger.failed` and
warned about once, without stopping training. A line torn by an earlier crash is closed with a newline before
the next record is appended, so it cannot swallow it, and :func:`read_jsonl` skips and counts such lines.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time

__all__ = ["JsonlLogger", "JsonlRecords", "plot_losses", "read_jsonl"]

log = logging.getLogger("unigendet.train")


class JsonlLogger:
    """Appends one JSON object per line; every record gets ``time`` (Unix seconds) and ``event``."""

    def __init__(self, path: str, enabled: bool = True):
        self.path = path
        self.enabled = enabled
        self.failed = 0  # records lost to failed writes
        self._tail_checked = False
        if enabled:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def log(self, event: str, **fields) -> None:
        if not self.enabled:
            return
        rec = {"time": round(time.time(), 3), "event": event}
        for k, v in fields.items():
            if hasattr(v, "item") and getattr(v, "numel", lambda: 2)() == 1:
                v = v.item()
            if isinstance(v, float) and not math.isfinite(v):
                v = str(v)
            rec[k] = v
        self._append((json.dumps(rec) + "\n").encode("utf-8"))

    def _append(self, data: bytes) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            self._lost(e)
            return
        try:
            size = os.fstat(fd).st_size
            if not self._tail_checked and size > 0 and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data  # close a line an earlier crash tore, so it cannot swallow this record
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            except OSError as e:
                self._tail_checked = False  # look at the tail again before the next record
                try:
                    os.ftruncate(fd, size)  # never leave half a record behind
                except OSError:
                    pass
                self._lost(e)
                return
            self._tail_checked = True
        finally:
            os.close(fd)

    def _lost(self, err: OSError) -> None:
        self.failed += 1
        if self.failed == 1:
            log.warning("could not write to %s (%s); log records are being dropped, training continues",
                        self.path, err)


class JsonlRecords(list):
    """The records of a JSONL file; :attr:`skipped` counts the lines that were not a JSON object (torn writes)."""

    skipped: int = 0


def read_jsonl(path: str) -> JsonlRecords:
    """Every JSON-object line of ``path`` (none when it does not exist); unreadable lines are skipped and counted."""
    out = JsonlRecords()
    if not os.path.exists(path):
        return out
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                rec = None
            if isinstance(rec, dict):
                out.append(rec)
            else:
                out.skipped += 1
    return out


def plot_losses(records: list[dict], path: str) -> bool:
    """One panel per loss key of the ``step`` records, per stage; returns False without matplotlib/data."""
    steps = [r for r in records if r.get("event") == "step"]
    if not steps:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    keys = sorted({k for r in steps for k in r if k.startswith("loss")})
    if not keys:
        return False
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        by_stage: dict[str, tuple[list, list]] = {}
        for r in steps:
            if isinstance(r.get(key), (int, float)):
                xs, ys = by_stage.setdefault(f"{r.get('stage', '')}{r.get('round', '')}", ([], []))
                xs.append(r["global_step"])
                ys.append(r[key])
        for label, (xs, ys) in by_stage.items():
            ax.plot(xs, ys, lw=1, label=label)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(by_stage) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
