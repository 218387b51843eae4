"""Varlen layouts with flash-attn's local (sliding) windows, built on the public layout API.

flash-attn's rule for sequence b with ``Lq`` queries and ``Lk`` keys: query i sees key j iff

    i + Lk - Lq - left <= j <= i + Lk - Lq + right        (a negative bound is unbounded; causal: right = 0)

A :class:`~unigendet.ops.layout.KernelPlan` entry bounds ``k - q`` from above only (``k - q <= diag``),
so the upper bound (causal, or a right window) is one entry per query range, while the lower bound
(a left window) is expressed by giving every query whose window is cut its own range, one key interval
each. Symmetrically, in the backward view every key whose queries are cut by the left window gets its
own segment. Queries (keys) the left window does not cut share ranges (segments) of at most
``_CHUNK`` tokens. The plan is exact, O(tokens) in size and built on the host; the per-query ranges run
one query row per kernel tile, so windowed attention runs well below the kernels' dense-tile speed.

Plain varlen attention (no window, or one that cuts nothing) goes through
:meth:`AttentionLayout.varlen <unigendet.ops.layout.AttentionLayout.varlen>` instead.
"""

from __future__ import annotations

import numpy as np
import torch

from ..ops import AttentionLayout, KernelPlan

__all__ = ["check_cu_host", "normalise_window", "window_layout"]

# Longest query range / key segment of the ranges the left window does not cut.
_CHUNK = 128


def normalise_window(window_size, causal: bool, max_seqlen_q: int, max_seqlen_k: int) -> tuple[int, int] | None:
    """``(left, right)`` with -1 for an unbounded side, or None when the window cuts nothing.

    ``causal`` sets ``right = 0``. A bound that no (query, key) pair of sequences of at most
    ``max_seqlen_q`` / ``max_seqlen_k`` tokens can reach is dropped, so a window at least as long as
    every sequence costs nothing.
    """
    try:
        left, right = (int(x) for x in window_size)
    except (TypeError, ValueError):
        raise ValueError(f"window_size must be a pair of ints (left, right), got {window_size!r}") from None
    left = -1 if left < 0 or left >= max_seqlen_k - 1 else left
    if causal:
        right = -1  # the causal bound is applied by the plan itself (right = 0)
    elif right < 0 or right >= max_seqlen_q - 1:
        right = -1
    if left < 0 and right < 0:
        return None
    return left, (0 if causal else right)


def check_cu_host(name: str, cu: list[int], total: int, max_seqlen: int, max_name: str) -> None:
    """flash-attn's contract for ``cu_seqlens`` values (host lists)."""
    if not cu or cu[0] != 0:
        raise ValueError(f"{name} must start at 0, got {cu[:1]}")
    lens = [b - a for a, b in zip(cu[:-1], cu[1:])]
    if any(x < 0 for x in lens):
        raise ValueError(f"{name} must be non-decreasing, got {cu}")
    if cu[-1] != total:
        raise ValueError(f"{name}[-1] = {cu[-1]} must equal the number of packed tokens ({total})")
    if lens and max(lens) > max_seqlen:
        raise ValueError(f"{max_name} = {max_seqlen} is smaller than the longest sequence in {name} ({max(lens)})")


def _chunks(n: int) -> tuple[np.ndarray, np.ndarray]:
    a = np.arange(0, n, _CHUNK, dtype=np.int64)
    return a, np.minimum(a + _CHUNK, n)


def _sequence(qs: int, lq: int, ks: int, lk: int, upper: int | None, lower: int | None, fwd: list, bwd: list):
    """Ranges and segments of one sequence: query i sees key j iff lower <= j - i <= upper (None: unbounded)."""
    if lq <= 0 or lk <= 0:
        return
    flag = 0 if upper is None else 1
    diag = 0 if upper is None else ks - qs + upper  # k - q <= diag in packed coordinates
    # Forward view. Queries [0, ia) see keys from 0 (the left window cuts nothing): shared ranges.
    ia = lq if lower is None else int(np.clip(1 - lower, 0, lq))
    a, b = _chunks(ia)
    kend = np.full_like(a, lk) if upper is None else np.clip(b + upper, 0, lk)
    keep = kend > 0
    fwd.append(np.stack([qs + a, qs + b, np.full_like(a, ks), ks + kend, np.full_like(a, diag),
                         np.full_like(a, flag)], 1)[keep])
    if ia < lq:  # one range per query whose window is cut on the left
        i = np.arange(ia, lq, dtype=np.int64)
        lo = i + lower
        hi = np.full_like(i, lk) if upper is None else np.minimum(i + upper + 1, lk)
        keep = hi > lo
        z = np.zeros_like(i)
        fwd.append(np.stack([qs + i, qs + i + 1, ks + lo, ks + hi, z, z], 1)[keep])
    # Backward view: key j is seen by queries [j - upper, j - lower] (clipped to the sequence).
    ja = 0 if lower is None else int(np.clip(lq - 1 + lower, 0, lk))
    if ja > 0:  # one segment per key whose queries are cut by the left window
        j = np.arange(ja, dtype=np.int64)
        qlo = np.zeros_like(j) if upper is None else np.maximum(j - upper, 0)
        qhi = np.minimum(j - lower + 1, lq)
        keep = qhi > qlo
        z = np.zeros_like(j)
        bwd.append(np.stack([ks + j, ks + j + 1, qs + qlo, qs + qhi, z, z], 1)[keep])
    a, b = _chunks(lk - ja)
    a, b = a + ja, b + ja
    qlo = np.zeros_like(a) if upper is None else np.maximum(a - upper, 0)
    keep = qlo < lq
    bwd.append(np.stack([ks + a, ks + b, qs + qlo, np.full_like(a, qs + lq), np.full_like(a, diag),
                         np.full_like(a, flag)], 1)[keep])


def window_layout(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, causal: bool, window: tuple[int, int],
                  total_q: int, total_k: int, device) -> AttentionLayout:
    """The exact layout of flash-attn's windowed varlen attention (``window`` from :func:`normalise_window`).

    ``cu_seqlens_*`` are read on the host (a device->host copy when they live on a GPU); the plan is
    moved to ``device`` and a host copy is kept for the reference backend.
    """
    left, right = window
    cu_q = cu_seqlens_q.detach().cpu().to(torch.int64).tolist()
    cu_k = cu_seqlens_k.detach().cpu().to(torch.int64).tolist()
    fwd: list = []
    bwd: list = []
    for b in range(len(cu_q) - 1):
        qs, lq, ks, lk = cu_q[b], cu_q[b + 1] - cu_q[b], cu_k[b], cu_k[b + 1] - cu_k[b]
        off = lk - lq  # bottom-right alignment
        upper = (off + right) if (causal or right >= 0) else None
        lower = (off - left) if left >= 0 else None
        _sequence(qs, lq, ks, lk, upper, lower, fwd, bwd)
    f = np.concatenate(fwd, 0) if fwd else np.zeros((0, 6), dtype=np.int64)
    g = np.concatenate(bwd, 0) if bwd else np.zeros((0, 6), dtype=np.int64)
    n, s = f.shape[0], g.shape[0]
    if max(total_q, total_k) >= 2**31 - 1:
        raise ValueError(f"packed lengths must fit in int32, got {max(total_q, total_k)}")

    def t(x):
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.int32))

    plan = KernelPlan(
        q_ranges=t(f[:, 0:2]), kv_ptr=t(np.arange(n + 1)), kv_entries=t(f[:, 2:6]),
        k_segments=t(np.stack([np.zeros(s, dtype=np.int64), g[:, 0], g[:, 1]], 1)), q_ptr=t(np.arange(s + 1)),
        q_entries=t(g[:, 2:6]),
        max_q_len=int((f[:, 1] - f[:, 0]).max()) if n else 0, max_k_len=int((g[:, 1] - g[:, 0]).max()) if s else 0,
        num_sources=1, total_q=int(total_q), total_k=(int(total_k),),
    )
    dev = torch.device(device)
    return AttentionLayout(plan.to(dev), plan)
