"""Packed-attention layouts: which keys every query of a packed batch may see.

An :class:`AttentionLayout` is built once per packed batch (on the host, typically in a data-loader
worker) and then reused by every attention layer, forward and backward, without host synchronisation.
It holds a :class:`KernelPlan`, a small set of integer tensors that the attention kernels walk:

Forward view (per query range)::

    q_ranges   int32 (R, 2)   [q_start, q_end) into the packed query dim; disjoint, sorted.
    kv_ptr     int32 (R+1,)   CSR offsets into kv_entries.
    kv_entries int32 (E, 4)   (k_start, k_end, diag, flags); flags bit 0 = causal, src = flags >> 1.
                              Query q sees key k of source src iff k_start <= k < k_end and
                              (not causal or k - q <= diag). Entries of one range are sorted by
                              (src, k_start) and never overlap: every key is counted once.

Backward view (per key segment)::

    k_segments int32 (S, 3)   (src, k_start, k_end): disjoint key segments covering every visible key,
                              aligned to the elementary intervals of all entry boundaries.
    q_ptr      int32 (S+1,)   CSR offsets into q_entries.
    q_entries  int32 (F, 4)   (q_start, q_end, diag, causal): the query ranges that see the segment,
                              with the same visibility rule.

Queries in no range produce a zero output and ``lse = -inf``. ``max_q_len`` / ``max_k_len`` are upper
bounds on the range / segment lengths (exact for layouts built by :meth:`AttentionLayout.from_splits`
and :meth:`AttentionLayout.from_ranges`; the caller's ``max_seqlen`` for ``varlen``/``smsa`` layouts).

Layouts built by ``from_splits``/``from_ranges`` are normalised: empty ranges and entries are dropped,
causal entries are trimmed to the keys some query of the range can see, fully visible causal entries
become non-causal, adjacent entries with the same visibility are merged (a non-causal prefix followed by
a causal split becomes one causal entry), and adjacent query ranges merge when one range's entries give
the other exactly its visibility (a question and its answer become one range). ``varlen``/``smsa``
layouts are built with tensor ops on the device of ``cu_seqlens`` (no host sync, traceable by
``torch.compile``) and may contain empty ranges and entries, which kernels must treat as no work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

__all__ = ["MODES", "AttentionLayout", "KernelPlan", "check_cu_seqlens", "check_plan_tensors", "prefix_visible",
           "smsa_plan_tensors", "varlen_plan_tensors"]

MODES = ("full", "causal", "noise")


def prefix_visible(modes: Sequence[str]) -> list[list[int]]:
    """BAGEL's packed-sequence rule for one sample of splits with attention ``modes``: split ``j`` sees every
    earlier split except the ``noise`` ones (a noisy image is hidden from everything after it). What a split sees
    of itself follows its own mode (full or causal) and is not listed."""
    return [[i for i in range(j) if modes[i] != "noise"] for j in range(len(modes))]

_PLAN_TENSORS = ("q_ranges", "kv_ptr", "kv_entries", "k_segments", "q_ptr", "q_entries")


@dataclass(frozen=True, eq=False)
class KernelPlan:
    """Integer tensors (all on one device) plus host ints describing a packed attention pattern."""

    q_ranges: torch.Tensor
    kv_ptr: torch.Tensor
    kv_entries: torch.Tensor
    k_segments: torch.Tensor
    q_ptr: torch.Tensor
    q_entries: torch.Tensor
    max_q_len: int
    max_k_len: int
    num_sources: int
    total_q: int
    total_k: tuple[int, ...]

    @property
    def device(self) -> torch.device:
        return self.q_ranges.device

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The six plan tensors in op-argument order."""
        return tuple(getattr(self, n) for n in _PLAN_TENSORS)

    def validate(self) -> KernelPlan:
        """Check the plan's values (see :func:`check_plan_tensors`; a GPU plan is copied to the host)."""
        for name in ("max_q_len", "max_k_len", "total_q"):
            v = getattr(self, name)
            if not isinstance(v, int) or not 0 <= v <= INT32_MAX:
                raise ValueError(f"plan.{name} must be an int in [0, 2**31 - 1], got {v!r}")
        check_plan_tensors(self.tensors(), self.total_q, self.total_k, self.num_sources)
        return self

    def to(self, device, non_blocking: bool = False) -> KernelPlan:
        device = torch.device(device)
        if self.device == device:
            return self
        moved = {n: getattr(self, n).to(device, non_blocking=non_blocking) for n in _PLAN_TENSORS}
        return replace(self, **moved)

    def pin_memory(self) -> KernelPlan:
        """A copy with page-locked host tensors (so ``to(cuda, non_blocking=True)`` is asynchronous)."""
        return replace(self, **{n: getattr(self, n).pin_memory() for n in _PLAN_TENSORS})

    def __repr__(self) -> str:
        return (f"KernelPlan(ranges={self.q_ranges.shape[0]}, entries={self.kv_entries.shape[0]}, "
                f"segments={self.k_segments.shape[0]}, q_entries={self.q_entries.shape[0]}, "
                f"max_q_len={self.max_q_len}, max_k_len={self.max_k_len}, num_sources={self.num_sources}, "
                f"total_q={self.total_q}, total_k={self.total_k}, device={self.device})")


# --------------------------------------------------------------------------------------------------
# Validation (host; every plan and cu_seqlens whose values are readable without a device synchronisation)
# --------------------------------------------------------------------------------------------------

INT32_MAX = 2**31 - 1


def check_cu_seqlens(name: str, cu, total: int | None = None, max_seqlen: int | None = None,
                     max_name: str = "max_seqlen") -> list[int]:
    """Check the values of a cu_seqlens tensor on the host: starts at 0, non-decreasing, ends at ``total`` (when
    given), longest sequence at most ``max_seqlen`` (when given). Returns the values. A GPU tensor is copied to
    the host (a synchronisation): callers check GPU tensors only when asked to."""
    v = [int(x) for x in (cu.tolist() if isinstance(cu, torch.Tensor) else cu)]
    if not v:
        raise ValueError(f"{name} must hold at least one value (batch + 1)")
    if v[0] != 0:
        raise ValueError(f"{name} must start at 0, got {v[0]}")
    lens = [b - a for a, b in zip(v[:-1], v[1:])]
    bad = next((i for i, n in enumerate(lens) if n < 0), None)
    if bad is not None:
        raise ValueError(f"{name} must be non-decreasing, but {name}[{bad + 1}] = {v[bad + 1]} < "
                         f"{name}[{bad}] = {v[bad]}")
    if total is not None and v[-1] != total:
        raise ValueError(f"{name}[-1] = {v[-1]} must equal the number of packed tokens ({total})")
    if v[-1] > INT32_MAX:
        raise ValueError(f"{name}: {v[-1]} packed tokens exceed int32")
    if max_seqlen is not None and lens and max(lens) > max_seqlen:
        raise ValueError(f"{max_name} = {max_seqlen} is smaller than the longest sequence in {name} ({max(lens)})")
    return v


def check_plan_tensors(tensors, total_q: int, total_k: Sequence[int], num_sources: int) -> None:
    """Check the values of the six plan tensors (host tensors) against the kernels' contract; ValueError names the
    field. Ranges and segments inside their buffers, CSR offsets consistent, sources known, the query ranges
    disjoint, the entries of one range disjoint per source, the key segments of one source disjoint."""
    q_ranges, kv_ptr, kv_entries, k_segments, q_ptr, q_entries = (np.asarray(t.cpu() if isinstance(t, torch.Tensor)
                                                                             else t, dtype=np.int64)
                                                                  for t in tensors)
    if not 1 <= num_sources <= 3 or len(total_k) != num_sources:
        raise ValueError(f"plan: num_sources must be 1..3 with one total_k each, got {num_sources}, {total_k}")
    tk = np.asarray(total_k, dtype=np.int64)
    for name, t, cols in (("q_ranges", q_ranges, 2), ("kv_entries", kv_entries, 4), ("k_segments", k_segments, 3),
                          ("q_entries", q_entries, 4)):
        if t.ndim != 2 or t.shape[1] != cols:
            raise ValueError(f"plan.{name} must have shape (n, {cols}), got {t.shape}")
    for name, ptr, n in (("kv_ptr", kv_ptr, len(kv_entries)), ("q_ptr", q_ptr, len(q_entries))):
        owners = len(q_ranges) if name == "kv_ptr" else len(k_segments)
        if ptr.ndim != 1 or len(ptr) != owners + 1 or ptr[0] != 0 or ptr[-1] != n or np.any(np.diff(ptr) < 0):
            raise ValueError(f"plan.{name} must be CSR offsets from 0 to {n}, non-decreasing, of length {owners + 1}")

    def in_bounds(name, lo, hi, limit):
        bad = np.flatnonzero((lo < 0) | (hi < lo) | (hi > limit))
        if len(bad):
            i = int(bad[0])
            lim = limit[i] if np.ndim(limit) else limit
            raise ValueError(f"plan.{name}[{i}] = [{int(lo[i])}, {int(hi[i])}) is not a range inside [0, {int(lim)}]")

    in_bounds("q_ranges", q_ranges[:, 0], q_ranges[:, 1], total_q)
    if len(q_ranges) > 1 and np.any(q_ranges[1:, 0] < q_ranges[:-1, 1]):
        raise ValueError("plan.q_ranges must be sorted and disjoint")
    in_bounds("q_entries", q_entries[:, 0], q_entries[:, 1], total_q)
    if np.any((q_entries[:, 3] != 0) & (q_entries[:, 3] != 1)):
        raise ValueError("plan.q_entries: the causal column must be 0 or 1")
    for name, src in (("kv_entries", kv_entries[:, 3] >> 1), ("k_segments", k_segments[:, 0])):
        bad = np.flatnonzero((src < 0) | (src >= num_sources))
        if len(bad):
            raise ValueError(f"plan.{name}[{int(bad[0])}]: source {int(src[bad[0]])} not in [0, {num_sources})")
    if np.any(kv_entries[:, 3] < 0):
        raise ValueError("plan.kv_entries: flags must be non-negative")
    in_bounds("kv_entries", kv_entries[:, 0], kv_entries[:, 1], tk[kv_entries[:, 3] >> 1])
    in_bounds("k_segments", k_segments[:, 1], k_segments[:, 2], tk[k_segments[:, 0]])
    # disjointness: entries of one range per source (every key counted once), segments of one source (one writer
    # per dK/dV row)
    owner = np.repeat(np.arange(len(q_ranges)), np.diff(kv_ptr))
    for name, grp, lo, hi in (("kv_entries", owner * 4 + (kv_entries[:, 3] >> 1), kv_entries[:, 0], kv_entries[:, 1]),
                              ("k_segments", k_segments[:, 0], k_segments[:, 1], k_segments[:, 2])):
        keep = hi > lo
        grp, lo, hi = grp[keep], lo[keep], hi[keep]
        order = np.lexsort((lo, grp))
        g, a, b = grp[order], lo[order], hi[order]
        if len(g) > 1 and np.any((g[1:] == g[:-1]) & (a[1:] < b[:-1])):
            raise ValueError(f"plan.{name} overlap" + (" within a range" if name == "kv_entries" else
                                                       " within a source"))


# --------------------------------------------------------------------------------------------------
# Host-side normalisation (pure Python / numpy; runs in data-loader workers)
# --------------------------------------------------------------------------------------------------

# An internal entry is (k_start, k_end, diag, causal, src) with diag an absolute offset: k - q <= diag.


def _trim(qs: int, qe: int, k0: int, k1: int, diag: int, causal: bool):
    """Restrict a causal piece to keys some query in [qs, qe) sees; None when nothing is visible."""
    if causal:
        k1 = min(k1, qe + diag)  # the last query sees keys up to qe - 1 + diag
        if k1 - 1 <= qs + diag:  # even the first query sees every key: no mask needed
            causal = False
    if k1 <= k0:
        return None
    return k0, k1, (diag if causal else 0), causal


def _normalise_range(qs: int, qe: int, entries: list) -> list:
    """Union of ``entries`` (k0, k1, diag, causal, src) for queries [qs, qe), as disjoint merged pieces."""
    out = []
    by_src: dict[int, list] = {}
    for k0, k1, diag, causal, src in entries:
        t = _trim(qs, qe, k0, k1, diag, causal)
        if t is not None:
            by_src.setdefault(src, []).append(t)
    for src in sorted(by_src):
        ents = by_src[src]
        bounds = sorted({b for e in ents for b in (e[0], e[1])})
        pieces = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            full, best = False, None
            for k0, k1, diag, causal in ents:
                if k0 <= a and b <= k1:
                    if not causal:
                        full = True
                        break
                    best = diag if best is None else max(best, diag)  # union of k - q <= d_i
            if not full and best is None:
                continue
            t = _trim(qs, qe, a, b, 0 if full else best, not full)
            if t is not None:
                pieces.append(t)
        merged: list = []
        for p in pieces:
            if merged and merged[-1][1] == p[0]:
                m = merged[-1]
                if m[3] == p[3] and (not p[3] or m[2] == p[2]):
                    merged[-1] = (m[0], p[1], m[2], m[3])
                    continue
                # a non-causal piece every query sees fully also obeys the causal neighbour's rule
                if not m[3] and p[3] and m[1] - 1 <= qs + p[2]:
                    merged[-1] = (m[0], p[1], p[2], True)
                    continue
                if m[3] and not p[3] and p[1] - 1 <= qs + m[2]:
                    merged[-1] = (m[0], p[1], m[2], True)
                    continue
            merged.append(p)
        out.extend((k0, k1, diag, causal, src) for k0, k1, diag, causal in merged)
    return out


def _build_plan_cpu(ranges: list, total_q: int, total_k: tuple[int, ...], num_sources: int) -> KernelPlan:
    """``ranges``: list of (qs, qe, entries) with disjoint query ranges. Returns a normalised CPU plan."""
    # Union over overlapping query ranges: split the query axis at every range boundary.
    srt = sorted((r for r in ranges if r[1] > r[0]), key=lambda r: r[0])
    if all(x[1] <= y[0] for x, y in zip(srt[:-1], srt[1:])):
        pieces = srt  # already disjoint (the common case): no union needed
    else:
        qb = sorted({b for qs, qe, _ in srt for b in (qs, qe)})
        pieces = [(a, b, [e for qs, qe, es in srt if qs <= a and b <= qe for e in es])
                  for a, b in zip(qb[:-1], qb[1:])]
    norm = []
    for a, b, ents in pieces:
        ents = _normalise_range(a, b, ents) if ents else []
        if ents:
            norm.append([a, b, ents])
    # Adjacent query ranges share one range when one's entries give the other exactly its own visibility
    # (the rule k - q <= diag is absolute): e.g. a question and its answer, or consecutive full splits
    # seeing the same keys. Longer ranges mean fewer partially filled query tiles in the kernels.
    merged: list = []
    for r in norm:
        if merged and merged[-1][1] == r[0]:
            m = merged[-1]
            if m[2] == r[2]:
                m[1] = r[1]
                continue
            if _normalise_range(m[0], m[1], r[2]) == m[2]:
                merged[-1] = [m[0], r[1], _normalise_range(m[0], r[1], r[2])]
                continue
            if _normalise_range(r[0], r[1], m[2]) == r[2]:
                merged[-1] = [m[0], r[1], _normalise_range(m[0], r[1], m[2])]
                continue
        merged.append(r)

    q_ranges = np.array([[a, b] for a, b, _ in merged], dtype=np.int64).reshape(-1, 2)
    counts = np.array([len(e) for _, _, e in merged], dtype=np.int64)
    kv_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    kv_entries = np.array([[k0, k1, d, int(c) | (s << 1)] for _, _, es in merged for k0, k1, d, c, s in es],
                          dtype=np.int64).reshape(-1, 4)

    # Backward view: elementary key segments per source and the query ranges that see each.
    seg_rows: list = []
    seg_q: list = []
    for src in range(num_sources):
        ents = [(a, b, k0, k1, d, c) for a, b, es in merged for k0, k1, d, c, s in es if s == src]
        if not ents:
            continue
        bounds = np.array(sorted({x for e in ents for x in (e[2], e[3])}), dtype=np.int64)
        lists: list[list] = [[] for _ in range(len(bounds) - 1)]
        for a, b, k0, k1, d, c in ents:
            i0, i1 = np.searchsorted(bounds, k0), np.searchsorted(bounds, k1)
            for i in range(i0, i1):
                s0, s1 = int(bounds[i]), int(bounds[i + 1])
                causal = c and s1 - 1 > a + d  # segment fully visible to the range -> no mask
                lists[i].append((a, b, d if causal else 0, int(causal)))
        prev = None
        for i, lst in enumerate(lists):
            if not lst:
                prev = None
                continue
            lst.sort()
            s0, s1 = int(bounds[i]), int(bounds[i + 1])
            if prev is not None and seg_rows[-1][2] == s0 and seg_q[-1] == lst:
                seg_rows[-1][2] = s1
            else:
                seg_rows.append([src, s0, s1])
                seg_q.append(lst)
            prev = i
    k_segments = np.array(seg_rows, dtype=np.int64).reshape(-1, 3)
    q_counts = np.array([len(x) for x in seg_q], dtype=np.int64)
    q_ptr = np.concatenate([[0], np.cumsum(q_counts)]).astype(np.int64)
    q_entries = np.array([row for lst in seg_q for row in lst], dtype=np.int64).reshape(-1, 4)

    max_q_len = int((q_ranges[:, 1] - q_ranges[:, 0]).max()) if len(q_ranges) else 0
    max_k_len = int((k_segments[:, 2] - k_segments[:, 1]).max()) if len(k_segments) else 0
    big = max([total_q, *total_k, 0])
    if big >= 2**31 - 1:
        raise ValueError(f"packed lengths must fit in int32, got {big}")

    def t(a):
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int32))

    return KernelPlan(t(q_ranges), t(kv_ptr), t(kv_entries), t(k_segments), t(q_ptr), t(q_entries),
                      max_q_len, max_k_len, num_sources, int(total_q), tuple(int(x) for x in total_k))


def _runs(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Maximal runs of equal labels: (starts, ends, label of each run)."""
    n = len(labels)
    if n == 0:
        e = np.zeros(0, dtype=np.int64)
        return e, e, e
    change = np.flatnonzero(labels[1:] != labels[:-1]) + 1
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change, [n]])
    return starts, ends, labels[starts]


def _as_int_list(x, name: str) -> list[int]:
    if isinstance(x, torch.Tensor):
        if x.dim() != 1 or x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
            raise ValueError(f"{name} must be a 1-D integer tensor, got {x.dtype} of shape {tuple(x.shape)}")
        return [int(v) for v in x.cpu().tolist()]
    arr = np.asarray(x)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        if arr.size == 0 and arr.ndim == 1:
            return []
        raise ValueError(f"{name} must be a 1-D sequence of ints")
    return [int(v) for v in arr.tolist()]


def _check_cu(cu, name: str) -> torch.Tensor:
    if not isinstance(cu, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise ValueError(f"{name} must be int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.shape[0] < 1:
        raise ValueError(f"{name} must be 1-D of shape (batch + 1,), got shape {tuple(cu.shape)}")
    return cu


def varlen_plan_tensors(cu_q: torch.Tensor, cu_k: torch.Tensor, causal: bool) -> tuple[torch.Tensor, ...]:
    """The six plan tensors of a varlen layout, built with tensor ops on ``cu_q``'s device (no host sync).

    Sample b is one query range [cu_q[b], cu_q[b+1]) with one entry [cu_k[b], cu_k[b+1]) and one key
    segment; a causal entry has ``diag = k_end - q_end`` (bottom-right alignment).
    """
    qs, qe, ks, ke = cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:]
    b = qs.shape[0]
    c = int(bool(causal))
    diag = (ke - qe) if c else torch.zeros_like(qe)
    flags = torch.full_like(qe, c)
    ptr = torch.arange(b + 1, dtype=torch.int32, device=cu_q.device)
    return (torch.stack([qs, qe], 1), ptr, torch.stack([ks, ke, diag, flags], 1),
            torch.stack([torch.zeros_like(ks), ks, ke], 1), ptr, torch.stack([qs, qe, diag, flags], 1))


def smsa_plan_tensors(cu_q: torch.Tensor, cu_kv: Sequence) -> tuple[torch.Tensor, ...]:
    """The six plan tensors of an SMSA layout (tensor ops on ``cu_q``'s device, no host sync).

    ``cu_kv`` holds one cu_seqlens tensor (or None when absent) per source. Sample b's query range has one
    non-causal entry per present source (sorted by source); segments are source-major, one per sample
    and present source, each seen by exactly that sample's query range.
    """
    dev = cu_q.device
    present = [(i, cu) for i, cu in enumerate(cu_kv) if cu is not None]
    b, n = cu_q.shape[0] - 1, len(present)
    qs, qe = cu_q[:-1], cu_q[1:]
    q_ranges = torch.stack([qs, qe], 1)
    if n == 0:
        z4 = torch.zeros(0, 4, dtype=torch.int32, device=dev)
        return (q_ranges, torch.zeros(b + 1, dtype=torch.int32, device=dev), z4,
                torch.zeros(0, 3, dtype=torch.int32, device=dev), torch.zeros(1, dtype=torch.int32, device=dev), z4)
    ks = torch.stack([cu[:-1] for _, cu in present], 1)  # (B, n)
    ke = torch.stack([cu[1:] for _, cu in present], 1)
    src = torch.tensor([i for i, _ in present], dtype=torch.int32, device=dev).expand(b, n)
    kv_entries = torch.stack([ks, ke, torch.zeros_like(ks), src * 2], 2).reshape(b * n, 4)
    k_segments = torch.stack([src.t(), ks.t(), ke.t()], 2).reshape(n * b, 3)
    q_entries = torch.stack([qs, qe, torch.zeros_like(qs), torch.zeros_like(qs)], 1).repeat(n, 1)
    kv_ptr = torch.arange(0, b * n + 1, n, dtype=torch.int32, device=dev)
    q_ptr = torch.arange(n * b + 1, dtype=torch.int32, device=dev)
    return q_ranges, kv_ptr, kv_entries, k_segments, q_ptr, q_entries


# --------------------------------------------------------------------------------------------------
# The layout
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class AttentionLayout:
    """Which keys each query of a packed batch sees. See the module docstring for the plan format.

    ``plan`` lives on the compute device; ``plan_cpu`` is a host copy (kept from construction when the
    layout was built on the host, otherwise copied on demand, which synchronises).
    """

    plan: KernelPlan
    host_plan: KernelPlan | None = None

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.plan.device

    @property
    def plan_cpu(self) -> KernelPlan:
        if self.host_plan is not None:
            return self.host_plan
        return self.plan.to("cpu")

    @property
    def num_sources(self) -> int:
        return self.plan.num_sources

    @property
    def total_q(self) -> int:
        return self.plan.total_q

    @property
    def total_k(self) -> tuple[int, ...]:
        return self.plan.total_k

    def to(self, device, non_blocking: bool = False) -> AttentionLayout:
        """The same layout with its plan on ``device`` (the host copy is kept)."""
        host = self.host_plan if self.host_plan is not None else (
            self.plan if self.plan.device.type == "cpu" else None)
        return AttentionLayout(self.plan.to(device, non_blocking=non_blocking), host)

    def pin_memory(self) -> AttentionLayout:
        """Page-locked copy of a host layout; ``DataLoader(pin_memory=True)`` calls this on batches."""
        if self.plan.device.type != "cpu":
            return self
        pinned = self.plan.pin_memory()
        return AttentionLayout(pinned, pinned)

    def __repr__(self) -> str:
        return f"AttentionLayout({self.plan!r})"

    @classmethod
    def _from_cpu_plan(cls, plan: KernelPlan, device) -> AttentionLayout:
        dev = torch.device(device) if device is not None else torch.device("cpu")
        return cls(plan.validate().to(dev), plan)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_ranges(cls, entries, total_q: int, total_k=None, num_sources: int = 1, device=None) -> AttentionLayout:
        """Explicit layout.

        Args:
            entries: list of ``(q_start, q_end, [(k_start, k_end, causal, src), ...])``. A causal key entry
                is bottom-right aligned to its query range: query ``q`` sees key ``k`` iff
                ``k - q <= k_end - q_end``. Overlapping ranges/entries are unioned.
            total_q: packed query length.
            total_k: packed key length per source (an int when ``num_sources == 1``); default ``total_q``.
            num_sources: number of separate key/value tensors.
        """
        if not isinstance(num_sources, int) or num_sources < 1:
            raise ValueError(f"num_sources must be a positive int, got {num_sources!r}")
        if not isinstance(total_q, int) or total_q < 0:
            raise ValueError(f"total_q must be a non-negative int, got {total_q!r}")
        if total_k is None:
            if num_sources != 1:
                raise ValueError("total_k is required when num_sources > 1")
            total_k = (total_q,)
        elif isinstance(total_k, int):
            total_k = (total_k,) * num_sources if num_sources == 1 else None
            if total_k is None:
                raise ValueError("total_k must be a sequence of num_sources ints when num_sources > 1")
        total_k = tuple(int(x) for x in total_k)
        if len(total_k) != num_sources or any(x < 0 for x in total_k):
            raise ValueError(f"total_k must hold {num_sources} non-negative ints, got {total_k}")
        ranges = []
        for i, item in enumerate(entries):
            try:
                qs, qe, kl = item
            except (TypeError, ValueError):
                raise ValueError(f"entries[{i}] must be (q_start, q_end, [key entries])") from None
            qs, qe = int(qs), int(qe)
            if not 0 <= qs <= qe <= total_q:
                raise ValueError(f"entries[{i}]: query range [{qs}, {qe}) out of bounds for total_q={total_q}")
            ents = []
            for j, ke in enumerate(kl):
                try:
                    k0, k1, causal, src = ke
                except (TypeError, ValueError):
                    raise ValueError(f"entries[{i}][2][{j}] must be (k_start, k_end, causal, src)") from None
                k0, k1, src = int(k0), int(k1), int(src)
                if not 0 <= src < num_sources:
                    raise ValueError(f"entries[{i}][2][{j}]: src {src} not in [0, {num_sources})")
                if not 0 <= k0 <= k1 <= total_k[src]:
                    raise ValueError(f"entries[{i}][2][{j}]: key range [{k0}, {k1}) out of bounds for "
                                     f"total_k[{src}]={total_k[src]}")
                ents.append((k0, k1, k1 - qe, bool(causal), src))
            ranges.append((qs, qe, ents))
        return cls._from_cpu_plan(_build_plan_cpu(ranges, total_q, total_k, num_sources), device)

    @classmethod
    def from_splits(cls, samples, device=None, order=None, visible=None) -> AttentionLayout:
        """BAGEL packed-sequence layout.

        Args:
            samples: one list per sample (packed consecutively) of ``(length, mode)`` splits, mode in
                ``{"full", "causal", "noise"}``. A query of split j sees every key of the earlier splits of
                its sample except keys of other "noise" splits (:func:`prefix_visible`); inside its own split
                all keys (full, noise) or the keys up to itself (causal). Samples never see each other. Empty
                splits are allowed.
            order: optional permutation ``order[new_position] = old_position`` of the packed tokens; the
                layout is then expressed in the new order. A causal split must stay contiguous and in
                increasing order under it.
            visible: optional per sample, per split, the other splits of the same sample that split sees,
                instead of :func:`prefix_visible` (e.g. :func:`unigendet.pack.visible_splits`'s SMSA rules).
        """
        split_start, split_len, split_mode, split_sample = [], [], [], []
        pos = 0
        if isinstance(samples, (str, bytes)) or not isinstance(samples, Sequence):
            raise ValueError("samples must be a list of lists of (length, mode)")
        for si, sample in enumerate(samples):
            if isinstance(sample, (str, bytes)) or not isinstance(sample, Sequence):
                raise ValueError(f"samples[{si}] must be a list of (length, mode)")
            for j, split in enumerate(sample):
                try:
                    length, mode = split
                except (TypeError, ValueError):
                    raise ValueError(f"samples[{si}][{j}] must be (length, mode)") from None
                if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 0:
                    raise ValueError(f"samples[{si}][{j}]: length must be an int >= 0, got {length!r}")
                if mode not in MODES:
                    raise ValueError(f"samples[{si}][{j}]: mode must be one of {MODES}, got {mode!r}")
                split_start.append(pos)
                split_len.append(int(length))
                split_mode.append(mode)
                split_sample.append(si)
                pos += int(length)
        total = pos
        n_split = len(split_len)
        starts = np.array(split_start, dtype=np.int64)
        lens = np.array(split_len, dtype=np.int64)
        # split id of every (old-order) token
        split_of_old = np.repeat(np.arange(n_split, dtype=np.int64), lens)

        if order is None:
            order_np = None
            labels = split_of_old
        else:
            order_np = np.asarray(_as_int_list(order, "order"), dtype=np.int64)
            if order_np.shape[0] != total or (total and not np.array_equal(np.sort(order_np), np.arange(total))):
                raise ValueError(f"order must be a permutation of range({total}) (the packed token count)")
            labels = split_of_old[order_np] if total else split_of_old
        r_start, r_end, r_split = _runs(labels)
        runs_of: list[list[tuple[int, int]]] = [[] for _ in range(n_split)]
        for a, b, s in zip(r_start.tolist(), r_end.tolist(), r_split.tolist()):
            runs_of[s].append((a, b))

        for s in range(n_split):
            if split_mode[s] != "causal" or lens[s] == 0 or order_np is None:
                continue
            runs = runs_of[s]
            a, b = runs[0]
            if len(runs) != 1 or not np.array_equal(order_np[a:b], np.arange(starts[s], starts[s] + lens[s])):
                raise ValueError(f"order: causal split {s} (sample {split_sample[s]}) must stay contiguous and in "
                                 "increasing token order")

        if visible is None:
            visible = [prefix_visible([m for _, m in sample]) for sample in samples]
        elif len(visible) != len(samples) or any(len(v) != len(sm) for v, sm in zip(visible, samples)):
            raise ValueError("visible must hold one list per split of every sample")
        ranges = []
        first_of_sample = 0
        for s in range(n_split):
            if s > 0 and split_sample[s] != split_sample[s - 1]:
                first_of_sample = s
            if lens[s] == 0:
                continue
            seen = visible[split_sample[s]][s - first_of_sample]
            n_in = len(samples[split_sample[s]])
            if any(isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < n_in
                   or i == s - first_of_sample for i in seen):
                raise ValueError(f"visible[{split_sample[s]}][{s - first_of_sample}] must list other splits of "
                                 f"its sample (0 <= index < {n_in}), got {list(seen)}")
            keys = [(a, b, 0, False, 0) for i in seen for a, b in runs_of[first_of_sample + i]]
            if split_mode[s] == "causal":
                (a, b), = runs_of[s]
                keys.append((a, b, 0, True, 0))  # k <= q: bottom-right with equal lengths
            else:
                keys.extend((a, b, 0, False, 0) for a, b in runs_of[s])
            for a, b in runs_of[s]:
                ranges.append((a, b, keys))
        return cls._from_cpu_plan(_build_plan_cpu(ranges, total, (total,), 1), device)

    @classmethod
    def varlen(cls, cu_seqlens_q, cu_seqlens_k, causal: bool, device=None, *, total_q: int | None = None,
               total_k: int | None = None, max_seqlen_q: int | None = None,
               max_seqlen_k: int | None = None, check: bool | None = None) -> AttentionLayout:
        """flash-attn varlen layout: sample b's queries [cu_q[b], cu_q[b+1]) see its keys [cu_k[b], cu_k[b+1]).

        ``causal`` is bottom-right aligned. Built with tensor ops on the device of ``cu_seqlens_q`` (or
        ``device``). The totals/maxima are read from the tensors when not given (a device->host copy
        when the tensors live on a GPU); pass them to avoid the synchronisation.

        ``check``: validate the values of ``cu_seqlens`` (start at 0, non-decreasing, the given totals and
        maxima); default: when they are CPU tensors. GPU ``cu_seqlens`` are, as in flash-attn, a contract the
        caller keeps (checking them would synchronise); ``check=True`` checks them anyway.
        """
        cu_q = _check_cu(cu_seqlens_q, "cu_seqlens_q")
        cu_k = _check_cu(cu_seqlens_k, "cu_seqlens_k")
        if cu_q.shape != cu_k.shape:
            raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same shape, got {tuple(cu_q.shape)} "
                             f"and {tuple(cu_k.shape)}")
        dev = torch.device(device) if device is not None else cu_q.device
        if check if check is not None else (cu_q.device.type == "cpu" and cu_k.device.type == "cpu"):
            vq = check_cu_seqlens("cu_seqlens_q", cu_q, total_q, max_seqlen_q, "max_seqlen_q")
            vk = check_cu_seqlens("cu_seqlens_k", cu_k, total_k, max_seqlen_k, "max_seqlen_k")
            total_q, total_k = vq[-1], vk[-1]
            max_seqlen_q = max([b - a for a, b in zip(vq[:-1], vq[1:])], default=0) if max_seqlen_q is None \
                else max_seqlen_q
            max_seqlen_k = max([b - a for a, b in zip(vk[:-1], vk[1:])], default=0) if max_seqlen_k is None \
                else max_seqlen_k
        for name, v in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
            if v is not None and not 0 <= int(v) <= INT32_MAX:
                raise ValueError(f"{name} must be in [0, 2**31 - 1], got {v}")
        cu_q, cu_k = cu_q.to(dev), cu_k.to(dev)
        if None in (total_q, total_k, max_seqlen_q, max_seqlen_k):
            hq, hk = cu_q.cpu(), cu_k.cpu()
            total_q = int(hq[-1]) if total_q is None else total_q
            total_k = int(hk[-1]) if total_k is None else total_k
            if max_seqlen_q is None:
                max_seqlen_q = int((hq[1:] - hq[:-1]).max()) if hq.shape[0] > 1 else 0
            if max_seqlen_k is None:
                max_seqlen_k = int((hk[1:] - hk[:-1]).max()) if hk.shape[0] > 1 else 0
        plan = KernelPlan(*varlen_plan_tensors(cu_q, cu_k, causal), max_q_len=int(max_seqlen_q),
                          max_k_len=int(max_seqlen_k), num_sources=1, total_q=int(total_q),
                          total_k=(int(total_k),))
        return cls(plan, plan if dev.type == "cpu" else None)

    @classmethod
    def smsa(cls, cu_seqlens_q, cu_seqlens_kv: Sequence, device=None, *, total_q: int | None = None,
             total_k: Sequence | None = None, max_seqlen_q: int | None = None,
             max_seqlen_k: Sequence | None = None, check: bool | None = None) -> AttentionLayout:
        """Symbiotic multimodal self-attention layout.

        Sample b's queries [cu_q[b], cu_q[b+1]) see (no mask) its keys of every present source:
        ``cu_seqlens_kv = [cu_gen, cu_det, cu_txt]`` are sources 0, 1, 2; ``None`` marks an absent source
        (no entries, ``total_k`` 0). Built with tensor ops like :meth:`varlen`; ``check`` as there.
        """
        cu_q = _check_cu(cu_seqlens_q, "cu_seqlens_q")
        names = ("cu_seqlens_gen", "cu_seqlens_det", "cu_seqlens_txt")
        cus = list(cu_seqlens_kv)
        if len(cus) != 3:
            raise ValueError(f"cu_seqlens_kv must hold 3 entries (gen, det, txt), got {len(cus)}")
        dev = torch.device(device) if device is not None else cu_q.device
        cu_q = cu_q.to(dev)
        present = []
        for i, cu in enumerate(cus):
            if cu is None:
                continue
            _check_cu(cu, names[i])
            if cu.shape != cu_q.shape:
                raise ValueError(f"{names[i]} must have the shape of cu_seqlens_q {tuple(cu_q.shape)}, "
                                 f"got {tuple(cu.shape)}")
            present.append((i, cu.to(dev)))
        if total_k is not None:
            total_k = tuple(int(x) for x in total_k)
            if len(total_k) != 3:
                raise ValueError("total_k must hold 3 ints (gen, det, txt)")
        on_host = all(c.device.type == "cpu" for c in [cu_seqlens_q, *(c for _, c in present)])
        if check if check is not None else on_host:
            check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, total_q, max_seqlen_q, "max_seqlen_q")
            for i, cu in present:
                check_cu_seqlens(names[i], cu, None if total_k is None else total_k[i],
                                 None if max_seqlen_k is None else tuple(max_seqlen_k)[i], f"max_seqlen_k[{i}]")
        if max_seqlen_k is not None:
            max_seqlen_k = tuple(int(x) for x in max_seqlen_k)
        if total_q is None or total_k is None or max_seqlen_q is None or max_seqlen_k is None:
            hq = cu_q.cpu()
            total_q = int(hq[-1]) if total_q is None else total_q
            if max_seqlen_q is None:
                max_seqlen_q = int((hq[1:] - hq[:-1]).max()) if hq.shape[0] > 1 else 0
            tk, mk = [0, 0, 0], [0, 0, 0]
            for i, cu in present:
                h = cu.cpu()
                tk[i] = int(h[-1])
                mk[i] = int((h[1:] - h[:-1]).max()) if h.shape[0] > 1 else 0
            total_k = tuple(tk) if total_k is None else total_k
            max_seqlen_k = tuple(mk) if max_seqlen_k is None else max_seqlen_k
        max_k = max([max_seqlen_k[i] for i, _ in present], default=0)
        by_src = dict(present)
        plan = KernelPlan(*smsa_plan_tensors(cu_q, [by_src.get(i) for i in range(3)]),
                          max_q_len=int(max_seqlen_q), max_k_len=int(max_k), num_sources=3,
                          total_q=int(total_q), total_k=tuple(int(x) for x in total_k))
        return cls(plan, plan if dev.type == "cpu" else None)

    # ------------------------------------------------------------------ debugging
    def dense_mask(self, src: int = 0) -> torch.Tensor:
        """Dense bool mask (total_q, total_k[src]) of the forward view, on the CPU. Tests/debugging only."""
        p = self.plan_cpu
        if not 0 <= src < p.num_sources:
            raise ValueError(f"src must be in [0, {p.num_sources}), got {src}")
        mask = torch.zeros(p.total_q, p.total_k[src], dtype=torch.bool)
        qr, ptr, ents = p.q_ranges.tolist(), p.kv_ptr.tolist(), p.kv_entries.tolist()
        for r, (qs, qe) in enumerate(qr):
            for k0, k1, diag, flags in ents[ptr[r]:ptr[r + 1]]:
                if flags >> 1 != src or k1 <= k0 or qe <= qs:
                    continue
                if flags & 1:
                    q = torch.arange(qs, qe).unsqueeze(1)
                    k = torch.arange(k0, k1).unsqueeze(0)
                    mask[qs:qe, k0:k1] |= (k - q) <= diag
                else:
                    mask[qs:qe, k0:k1] = True
        return mask

