"""Progress reporting: a tqdm bar on a terminal, plain lines otherwise.

When stderr is redirected to a file or a pipe (a log, CI, ``nohup``), redrawn bars leave carriage returns and
cursor-movement escapes (``\\x1b[A``) in the output. There :func:`progress_bar` writes ordinary lines instead:
one at most every ``UNIGENDET_PROGRESS_INTERVAL`` seconds (default 30) and one when the task ends, e.g.::

    round 1 GDUF: 120/1000 steps (12%), 6.1 steps/s, 2m24s left, loss=0.532 tok/s=6210

Nested bars (``leave=False``, such as the per-step bar inside image generation) print nothing in line mode.
"""

from __future__ import annotations

import os
import sys
import time

__all__ = ["progress_bar", "progress_iter"]


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get("UNIGENDET_PROGRESS_INTERVAL", "30")))
    except ValueError:
        return 30.0


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LineProgress(_Silent):
    """The plain-line replacement of a tqdm bar (same ``update`` / ``set_postfix`` / ``close`` calls)."""

    def __init__(self, total: int | None, desc: str, unit: str, initial: int, stream, interval: float):
        self.total, self.desc, self.unit, self.n = total, desc, unit, int(initial)
        self.stream, self.interval = stream, interval
        self.start_n = self.n
        self.t0 = self.last = time.monotonic()
        self.postfix = ""
        self.closed = False

    def _line(self) -> str:
        elapsed = time.monotonic() - self.t0
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        unit = self.unit + ("" if self.unit.endswith("s") else "s")
        parts = [f"{self.n}/{self.total} {unit}" if self.total else f"{self.n} {unit}"]
        if self.total:
            parts[0] += f" ({100.0 * self.n / self.total:.0f}%)"
        if rate > 0:
            parts.append(f"{rate:.3g} {unit}/s")
            if self.total and self.n < self.total:
                parts.append(f"{_duration((self.total - self.n) / rate)} left")
        parts.append(f"{_duration(elapsed)} elapsed" if self.closed else "")
        text = ", ".join(p for p in parts if p)
        return f"{self.desc}: {text}" + (f", {self.postfix}" if self.postfix else "")

    def _emit(self) -> None:
        print(self._line(), file=self.stream, flush=True)
        self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last >= self.interval and not (self.total and self.n >= self.total):
            self._emit()

    def set_postfix(self, values=None, refresh: bool = True, **kwargs) -> None:
        items = dict(values or {}, **kwargs)
        self.postfix = " ".join(f"{k}={v}" for k, v in items.items())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._emit()


def progress_bar(*, total: int | None, desc: str, unit: str = "it", disable: bool = False, initial: int = 0,
                 leave: bool = True, stream=None):
    """A tqdm bar on ``stream`` (default stderr) when it is a terminal, else a :class:`LineProgress`."""
    stream = sys.stderr if stream is None else stream
    if disable:
        return _Silent()
    if _is_terminal(stream):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, initial=initial, leave=leave, file=stream, dynamic_ncols=True)
    if not leave:
        return _Silent()
    return LineProgress(total, desc, unit, initial, stream, _interval())


def progress_iter(iterable, *, total: int | None = None, desc: str, unit: str = "it", disable: bool = False,
                  leave: bool = True):
    """Iterate ``iterable`` while reporting progress as :func:`progress_bar` does."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    bar = progress_bar(total=total, desc=desc, unit=unit, disable=disable, leave=leave)
    try:
        for item in iterable:
            yield item
            bar.update(1)
    finally:
        bar.close()
