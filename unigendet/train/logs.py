"""Structured training logs (JSONL) and the loss-curve plots written at the end of a run."""

from __future__ import annotations

import json
import math
import os
import time

__all__ = ["JsonlLogger", "plot_losses", "read_jsonl"]


class JsonlLogger:
    """Appends one JSON object per line; every record gets ``time`` (Unix seconds) and ``event``."""

    def __init__(self, path: str, enabled: bool = True):
        self.path = path
        self.enabled = enabled
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
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")


def read_jsonl(path: str) -> list[dict]:
    out = []
    if not os.path.exists(path):
        return out
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                out.append(json.loads(line))
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
