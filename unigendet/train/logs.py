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

__all__ = ["LOSS_LABELS", "JsonlLogger", "JsonlRecords", "plot_losses", "read_jsonl", "smooth"]

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


#: Panel title and y-axis label of each loss key of the ``step`` records (other keys get a generic label).
LOSS_LABELS = {
    "loss": ("Total loss (weighted sum of the stage's terms)", "loss"),
    "loss_ce": ("Explanation text: next-token cross-entropy", "cross-entropy (nats/token)"),
    "loss_label": ("Detection head: real/fake cross-entropy", "cross-entropy (nats)"),
    "loss_mse": ("Flow matching: velocity MSE", "mean squared error"),
    "loss_diga": ("DIGA alignment: 1 - cos(teacher, student)", "1 - cosine similarity"),
}
_STAGE_COLOURS = {"gduf": "#1f77b4", "diga": "#d62728"}
_ROUND_STYLES = ("-", "--", ":", "-.")


def smooth(values: list[float], window: int) -> list[float]:
    """Centred moving average over ``window`` points (shrinking at the ends); NaNs are ignored."""
    out = []
    half = max(0, window // 2)
    for i in range(len(values)):
        chunk = [v for v in values[max(0, i - half): i + half + 1] if math.isfinite(v)]
        out.append(sum(chunk) / len(chunk) if chunk else float("nan"))
    return out


def plot_losses(records: list[dict], path: str) -> bool:
    """One panel per loss term of the ``step`` records: the raw values faint, a moving average on top, one colour
    per stage (GDUF, DIGA; rounds as line styles) with a legend. Returns False without matplotlib or data."""
    steps = [r for r in records if r.get("event") == "step"]
    if not steps:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    order = list(LOSS_LABELS)
    keys = sorted({k for r in steps for k in r if k.startswith("loss")},
                  key=lambda k: (order.index(k) if k in order else len(order), k))
    if not keys:
        return False
    rounds = sorted({int(r.get("round", 1)) for r in steps})
    ncols = min(3, len(keys))
    nrows = (len(keys) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.6 * nrows), squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    for ax, key in zip(axes.flat, keys):
        series: dict[tuple[int, str], tuple[list, list]] = {}
        for r in steps:
            v = r.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                xs, ys = series.setdefault((int(r.get("round", 1)), str(r.get("stage", ""))), ([], []))
                xs.append(r["global_step"])
                ys.append(float(v))
        for (rnd, stage), (xs, ys) in series.items():
            colour = _STAGE_COLOURS.get(stage, "#555555")
            style = _ROUND_STYLES[(rnd - 1) % len(_ROUND_STYLES)]
            label = stage.upper() + (f" (round {rnd})" if len(rounds) > 1 else "")
            window = max(1, len(ys) // 25)
            if window > 1:
                ax.plot(xs, ys, color=colour, lw=0.6, alpha=0.25)
            ax.plot(xs, smooth(ys, window), color=colour, lw=1.6, ls=style,
                    label=label + (f", {window}-step mean" if window > 1 else ""))
        title, ylabel = LOSS_LABELS.get(key, (key.replace("loss_", "").replace("_", " ") + " loss", "loss"))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training step (both stages counted)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    fig.suptitle("Training losses (faint: every step; solid: moving average)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_samples(images, prompts: list[str], path: str, *, cols: int = 4, title: str | None = None) -> bool:
    """A grid of generated images, each with its prompt printed (wrapped) under it. Returns False without
    matplotlib or images. ``images``: ``(3, H, W)`` tensors in [-1, 1] or ``(H, W, 3)`` uint8 arrays."""
    import textwrap

    from unigendet.eval.generation import as_uint8

    if not images:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cols = max(1, min(cols, len(images)))
    rows = (len(images) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 3.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, prompt in zip(axes.flat, images, prompts):
        ax.imshow(as_uint8(img), interpolation="nearest")
        ax.set_title("\n".join(textwrap.wrap(prompt, 28)), fontsize=8, y=-0.02, va="top")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = f"{path}.{os.getpid()}.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return True
