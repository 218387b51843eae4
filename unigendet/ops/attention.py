"""Packed (variable-length, multi-source) attention.

Layers, top to bottom:

1. the pure-PyTorch reference (backend ``torch``): per query range, gather that range's keys, one small
   matmul/softmax in fp32 (fp64 for fp64 inputs); memory is bounded by the largest range, never a
   whole-pack dense mask. It is also the CPU path.
2. the registered ops ``unigendet::packed_attention_fwd`` / ``unigendet::packed_attention_bwd`` (with fake
   kernels, so they work under ``torch.compile(fullgraph=True)``); the backend name is an argument and the
   Triton launchers (``unigendet.ops.attention_triton``) are imported lazily inside.
3. :class:`PackedAttentionFunction`, the autograd wrapper around the two ops.
4. the public functions :func:`varlen_attention` (drop-in for ``flash_attn_varlen_func``),
   :func:`packed_attention` (any :class:`~unigendet.ops.layout.AttentionLayout`) and
   :func:`smsa_attention` (queries over three separate key/value sources), and their modules.

Determinism: the forward is always deterministic, and so is the ``torch`` backend's backward (it accumulates
key gradients range by range in a fixed order). The Triton backward has two forms: ``deterministic=True`` (the
default here) computes dQ in its own kernel, bit for bit reproducible without atomics; ``deterministic=False``
(flash-attn's default) lets the dK/dV kernel accumulate dQ with fp32 atomics, which saves two of seven matmuls
per tile pair but varies in the last bits (``torch.use_deterministic_algorithms(True)`` overrides it).

Host synchronisation: :func:`packed_attention` never synchronises (the layout is prebuilt).
:func:`varlen_attention` and :func:`smsa_attention` build their plan from ``cu_seqlens`` with tensor ops
on the device, with no device->host copy. The values of ``cu_seqlens`` are validated on the host only when
they are CPU tensors (and not while being traced by ``torch.compile``); CUDA ``cu_seqlens`` are not
validated, to avoid a synchronisation. The ``torch`` backend reads the plan on the host, so on a GPU it
synchronises once per call (it is the reference, not the fast path).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import operator
import os
import weakref
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .. import _backend
from .layout import (
    _PLAN_TENSORS,
    INT32_MAX,
    AttentionLayout,
    KernelPlan,
    check_cu_seqlens,
    check_plan_tensors,
    smsa_plan_tensors,
    varlen_plan_tensors,
)

__all__ = [
    "PackedAttention",
    "PackedAttentionFunction",
    "SMSAAttention",
    "VarlenAttention",
    "packed_attention",
    "packed_attention_reference",
    "smsa_attention",
    "varlen_attention",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Elements of one fp32 score block in the reference (queries are processed in chunks of this budget).
_REF_BLOCK_ELEMS = 1 << 24
# The reference splits a plan into connected blocks (in a pack: samples). A block whose score matrix (heads x
# queries x keys) has at most this many entries runs as one masked attention (a few large matmuls instead of one
# small call per range); larger blocks go range by range, so the reference's memory stays bounded either way.
_REF_DENSE_ELEMS = 1 << 24  # 64 MB of fp32 scores


# --------------------------------------------------------------------------------------------------
# Reference implementation (backend "torch")
# --------------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _host_lists(*tensors: Tensor) -> list[list]:
    # One device->host copy per plan tensor when the plan lives on a GPU (reference path only).
    return [t.tolist() for t in tensors]


def _range_keys(q_start, q_end, ents, ks, vs, cdt):
    """Gather one range's keys/values: (Hkv, Lk, D) each, plus the column mask parameters.

    Returns None when the range sees no key, else (k, v, pieces, col_pos, col_diag): ``pieces`` lists
    (src, k0, k1, offset in the gathered keys, diag, causal); ``col_pos``/``col_diag`` give every gathered
    column's key position and diag (None when no entry is causal, so no mask is built).
    """
    pieces, off, k_parts, v_parts, causal = [], 0, [], [], False
    for k0, k1, diag, flags in ents:
        if k1 <= k0:
            continue
        src = flags >> 1
        pieces.append((src, k0, k1, off, diag, flags & 1))
        k_parts.append(ks[src][k0:k1])
        v_parts.append(vs[src][k0:k1])
        causal |= bool(flags & 1)
        off += k1 - k0
    if not pieces:
        return None
    k = torch.cat(k_parts, 0).to(cdt).transpose(0, 1)
    v = torch.cat(v_parts, 0).to(cdt).transpose(0, 1)
    col_pos = col_diag = None
    if causal:
        dev = k.device
        col_pos = torch.cat([torch.arange(k0, k1, device=dev) for _, k0, k1, _, _, _ in pieces])
        big = torch.iinfo(torch.int64).max // 4  # non-causal columns: always visible
        col_diag = torch.cat([torch.full((k1 - k0,), diag if c else big, device=dev, dtype=torch.int64)
                              for _, k0, k1, _, diag, c in pieces])
    return k, v, pieces, col_pos, col_diag


def _scores(qc, k, q0, col_pos, col_diag, scale, hkv, vis=None):
    """Masked scores (Hkv, G*Lq, Lk) of the query chunk ``qc`` (Lq, H, D) starting at row ``q0``.

    The mask is either given (``vis``, bool (Lq, Lk)) or derived from the columns' positions and diags.
    """
    lq, h, d = qc.shape
    g = h // hkv
    qg = qc.permute(1, 0, 2).reshape(hkv, g * lq, d)
    s = torch.matmul(qg, k.transpose(1, 2)) * scale
    if vis is None and col_pos is not None:
        qpos = torch.arange(q0, q0 + lq, device=qc.device)
        vis = (col_pos.unsqueeze(0) - qpos.unsqueeze(1)) <= col_diag.unsqueeze(0)  # (Lq, Lk)
    if vis is not None:
        s = s.masked_fill(~vis.repeat(g, 1).unsqueeze(0), float("-inf"))
    return s, qg


def _softmax(s):
    """Row softmax and logsumexp with fully masked rows giving p = 0, lse = -inf."""
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    l = p.sum(-1, keepdim=True)
    lse = (m + torch.log(l)).squeeze(-1)
    p = p / torch.where(l == 0, torch.ones_like(l), l)
    return p, lse


def _chunks(lq: int, h: int, lk: int):
    step = max(1, _REF_BLOCK_ELEMS // max(1, h * lk))
    return range(0, lq, step), step


def _blocks(qr, ptr, ents):
    """Connected blocks of a plan: query ranges that (transitively) share keys, with their key pieces.

    Returns ``[(ranges, pieces)]``: the block's query-range indices and its key pieces ``(src, k0, k1)``, disjoint
    and sorted; every entry of a block's ranges lies inside exactly one of its pieces. In a pack, a block is one
    sample (or less), so dense attention per block never scores keys of other samples.
    """
    parent = list(range(len(qr)))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    by_src: dict[int, list] = {}
    for r, (qs, qe) in enumerate(qr):
        if qe <= qs:
            continue
        for k0, k1, _, flags in ents[ptr[r]:ptr[r + 1]]:
            if k1 > k0:
                by_src.setdefault(flags >> 1, []).append((k0, k1, r))
    merged = []  # (src, k0, k1, ranges): overlapping key intervals merged into one piece
    for src, ivs in by_src.items():
        ivs.sort()
        cur = None
        for k0, k1, r in ivs:
            if cur is not None and k0 < cur[1]:
                cur[1] = max(cur[1], k1)
                cur[2].append(r)
            else:
                if cur is not None:
                    merged.append((src, *cur))
                cur = [k0, k1, [r]]
        if cur is not None:
            merged.append((src, *cur))
    for _, _, _, rs in merged:
        for r in rs[1:]:
            parent[find(r)] = find(rs[0])
    blocks: dict[int, tuple[set, list]] = {}
    for src, k0, k1, rs in merged:
        ranges, pieces = blocks.setdefault(find(rs[0]), (set(), []))
        ranges.update(rs)
        pieces.append((src, k0, k1))
    return [(sorted(rs), sorted(pcs)) for rs, pcs in blocks.values()]


def _block_mask(qr, ptr, ents, ranges, pieces, device=None):
    """The visibility mask (Lq, Lk) of one block with its queries (the ranges, in order) as rows and its key
    pieces as columns; also ``rows`` (range -> row offset) and ``cols`` ([(src, k0, k1, column offset)])."""
    rows, off = {}, 0
    for r in ranges:
        rows[r] = off
        off += qr[r][1] - qr[r][0]
    lq = off
    cols, off = [], 0
    for src, k0, k1 in pieces:
        cols.append((src, k0, k1, off))
        off += k1 - k0
    vis = torch.zeros(lq, off, dtype=torch.bool, device=device)
    for r in ranges:
        qs, qe = qr[r]
        r0 = rows[r]
        for k0, k1, diag, flags in ents[ptr[r]:ptr[r + 1]]:
            if k1 <= k0:
                continue
            src = flags >> 1
            c0 = next(c + k0 - a for s_, a, b, c in cols if s_ == src and a <= k0 and k1 <= b)
            if flags & 1:
                vis[r0:r0 + qe - qs, c0:c0 + k1 - k0] = (
                    torch.arange(k0, k1, device=device).unsqueeze(0) - torch.arange(qs, qe, device=device).unsqueeze(1)
                ) <= diag
            else:
                vis[r0:r0 + qe - qs, c0:c0 + k1 - k0] = True
    return vis, rows, cols


def _block_too_large(h: int, qr, ranges, pieces) -> bool:
    lq = sum(qr[r][1] - qr[r][0] for r in ranges)
    lk = sum(k1 - k0 for _, k0, k1 in pieces)
    return h * lq * lk > _REF_DENSE_ELEMS


def _block_dense(q, ks, vs, qr, ptr, ents, ranges, pieces, cdt):
    """Gathered queries (Lq, H, D), keys/values (Hkv, Lk, D) and the visibility mask (Lq, Lk) of one block,
    or None when its score matrix is larger than ``_REF_DENSE_ELEMS``. ``rows``/``cols`` give each range's row
    offset and each piece's column offset in the gathered tensors."""
    if _block_too_large(q.shape[1], qr, ranges, pieces):
        return None
    vis, rows, cols = _block_mask(qr, ptr, ents, ranges, pieces, q.device)
    qb = torch.cat([q[qr[r][0]:qr[r][1]] for r in ranges]).to(cdt)
    kb = torch.cat([ks[src][k0:k1] for src, k0, k1 in pieces]).to(cdt).transpose(0, 1)
    vb = torch.cat([vs[src][k0:k1] for src, k0, k1 in pieces]).to(cdt).transpose(0, 1)
    return qb, kb, vb, vis, rows, cols


def _reference_fwd(q, ks, vs, q_ranges, kv_ptr, kv_entries, scale):
    total_q, h, d = q.shape
    cdt = _compute_dtype(q.dtype)
    out = torch.zeros(total_q, h, vs[0].shape[-1] if vs else d, dtype=q.dtype, device=q.device)
    lse = torch.full((h, total_q), float("-inf"), dtype=torch.float32, device=q.device)
    qr, ptr, ents = _host_lists(q_ranges, kv_ptr, kv_entries)
    for ranges, pieces in _blocks(qr, ptr, ents):
        dense = _block_dense(q, ks, vs, qr, ptr, ents, ranges, pieces, cdt)
        if dense is not None:  # the block as one masked attention
            qb, kb, vb, vis, rows, _ = dense
            lq = qb.shape[0]
            s, _ = _scores(qb, kb, 0, None, None, scale, kb.shape[0], vis)
            p, l = _softmax(s)
            ob = torch.matmul(p, vb).reshape(h, lq, -1).transpose(0, 1)
            lb = l.reshape(h, lq)
            for r in ranges:
                (qs, qe), r0 = qr[r], rows[r]
                out[qs:qe] = ob[r0:r0 + qe - qs].to(q.dtype)
                lse[:, qs:qe] = lb[:, r0:r0 + qe - qs].to(torch.float32)
            continue
        for r in ranges:  # a large block: range by range, in query chunks
            qs, qe = qr[r]
            g = _range_keys(qs, qe, ents[ptr[r]:ptr[r + 1]], ks, vs, cdt)
            if g is None:
                continue
            k, v, _, col_pos, col_diag = g
            hkv = k.shape[0]
            starts, step = _chunks(qe - qs, h, k.shape[1])
            for c0 in starts:
                a, b = qs + c0, min(qe, qs + c0 + step)
                s, _ = _scores(q[a:b].to(cdt), k, a, col_pos, col_diag, scale, hkv)
                p, l = _softmax(s)
                o = torch.matmul(p, v)  # (Hkv, G*Lq, Dv)
                out[a:b] = o.reshape(h, b - a, -1).transpose(0, 1).to(q.dtype)
                lse[:, a:b] = l.reshape(h, b - a).to(torch.float32)
    return out, lse


def _grads(qg, k, v, p, do, scale):
    """Softmax-attention gradients of one score block: ``(dq (Hkv, G*Lq, D), dk (Hkv, Lk, D), dv)``."""
    dv = torch.matmul(p.transpose(1, 2), do)
    dp = torch.matmul(do, v.transpose(1, 2))
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))
    return torch.matmul(ds, k) * scale, torch.matmul(ds.transpose(1, 2), qg) * scale, dv


def _reference_bwd(dout, q, ks, vs, q_ranges, kv_ptr, kv_entries, scale):
    total_q, h, d = q.shape
    cdt = _compute_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    dk_acc = [torch.zeros(k.shape, dtype=cdt, device=k.device) for k in ks]
    dv_acc = [torch.zeros(v.shape, dtype=cdt, device=v.device) for v in vs]
    qr, ptr, ents = _host_lists(q_ranges, kv_ptr, kv_entries)
    for ranges, pieces in _blocks(qr, ptr, ents):
        dense = _block_dense(q, ks, vs, qr, ptr, ents, ranges, pieces, cdt)
        if dense is not None:
            qb, kb, vb, vis, rows, cols = dense
            hkv, lq = kb.shape[0], qb.shape[0]
            # Recompute the softmax in the compute dtype (more accurate than the fp32 lse for fp64 inputs).
            s, qg = _scores(qb, kb, 0, None, None, scale, hkv, vis)
            p, _ = _softmax(s)
            dob = torch.cat([dout[qr[r][0]:qr[r][1]] for r in ranges]).to(cdt)
            dqb, dkb, dvb = _grads(qg, kb, vb, p, dob.permute(1, 0, 2).reshape(hkv, -1, dout.shape[-1]), scale)
            dqb = dqb.reshape(h, lq, d).transpose(0, 1)
            for r in ranges:
                (qs, qe), r0 = qr[r], rows[r]
                dq[qs:qe] = dqb[r0:r0 + qe - qs].to(q.dtype)
            for src, k0, k1, c in cols:
                dk_acc[src][k0:k1] += dkb[:, c:c + k1 - k0].transpose(0, 1)
                dv_acc[src][k0:k1] += dvb[:, c:c + k1 - k0].transpose(0, 1)
            continue
        for r in ranges:
            qs, qe = qr[r]
            g = _range_keys(qs, qe, ents[ptr[r]:ptr[r + 1]], ks, vs, cdt)
            if g is None:
                continue
            k, v, pieces_r, col_pos, col_diag = g
            hkv = k.shape[0]
            dk_r = torch.zeros_like(k)
            dv_r = torch.zeros_like(v)
            starts, step = _chunks(qe - qs, h, k.shape[1])
            for c0 in starts:
                a, b = qs + c0, min(qe, qs + c0 + step)
                s, qg = _scores(q[a:b].to(cdt), k, a, col_pos, col_diag, scale, hkv)
                p, _ = _softmax(s)
                do = dout[a:b].to(cdt).permute(1, 0, 2).reshape(hkv, -1, dout.shape[-1])
                dq_c, dk_c, dv_c = _grads(qg, k, v, p, do, scale)
                dq[a:b] = dq_c.reshape(h, b - a, d).transpose(0, 1).to(q.dtype)
                dk_r += dk_c
                dv_r += dv_c
            for src, k0, k1, off, _, _ in pieces_r:
                dk_acc[src][k0:k1] += dk_r[:, off:off + k1 - k0].transpose(0, 1)
                dv_acc[src][k0:k1] += dv_r[:, off:off + k1 - k0].transpose(0, 1)
    return dq, [x.to(k.dtype) for x, k in zip(dk_acc, ks)], [x.to(v.dtype) for x, v in zip(dv_acc, vs)]


def packed_attention_reference(q: Tensor, ks: Sequence[Tensor], vs: Sequence[Tensor], plan: KernelPlan,
                               softmax_scale: float) -> tuple[Tensor, Tensor]:
    """Reference forward: ``(out (total_q, H, D) q.dtype, lse (H, total_q) float32)``, no autograd."""
    return _reference_fwd(q, list(ks), list(vs), plan.q_ranges, plan.kv_ptr, plan.kv_entries, softmax_scale)


# --------------------------------------------------------------------------------------------------
# Triton backend (imported lazily: a missing or broken Triton never breaks this module's import)
# --------------------------------------------------------------------------------------------------


@functools.cache
def _triton_module_reason() -> str | None:
    """Why the Triton launchers or their kernels cannot be imported (None: both import)."""
    for mod in ("unigendet.ops.attention_triton", "unigendet.kernels.attention"):
        try:
            if importlib.util.find_spec(mod) is None:
                return f"{mod} is not available"
            importlib.import_module(mod)
        except Exception as e:  # report, don't raise: the torch backend still works
            return f"{mod} failed to import: {type(e).__name__}: {e}"
    return None


def _triton_available() -> str | None:
    return _backend.triton_unavailable_reason() or _triton_module_reason()


def _triton_check(info: _backend.CallInfo) -> list[str]:
    from . import attention_triton

    dims = tuple(getattr(attention_triton, "TRITON_HEAD_DIMS", ()))
    if info.head_dim is not None and info.head_dim not in dims:
        return [f"head dim {info.head_dim} not supported (supports {list(dims)})"]
    if info.dtype == torch.bfloat16 and _backend.triton_interpret():
        return ["the Triton interpreter cannot multiply bfloat16 (use float16/float32, or a GPU)"]
    return []


def _triton_sources(ts: list[Tensor]) -> list[Tensor | None]:
    # Empty sources (absent SMSA sources) are passed as None: no entry references them, and the
    # launchers then never see a zero-size (null) pointer.
    return [None if t.shape[0] == 0 else t for t in ts]


def _no_key_outputs(q: Tensor, vs: list[Tensor]) -> tuple[Tensor, Tensor]:
    dv = vs[0].shape[-1] if vs else q.shape[-1]
    out = torch.zeros(q.shape[0], q.shape[1], dv, dtype=q.dtype, device=q.device)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
    return out, lse


# --------------------------------------------------------------------------------------------------
# Registered ops
# --------------------------------------------------------------------------------------------------


# id(q_ranges) -> (weak reference, versions of the plan tensors, totals): plans already checked (every layer of a
# model reuses one plan; checking it once is enough).
_CHECKED: dict[int, tuple] = {}


def _check_op_plan(q: Tensor, ks: list[Tensor], plan_tensors, backend: str) -> None:
    """The plan given to a registered op, checked once per plan (every layer of a model reuses one plan): int32
    tensors of the kernels' shapes on q's device (or on the host for the backends that read it there), and, when
    they are on the host (readable without a synchronisation), their values against q's and the sources' lengths.
    Device plans' values are a contract of the caller, as flash-attn's cu_seqlens (the layouts check theirs when
    built). The public functions validated q, k and v before the op is called; the op does not check them again."""
    anchor = plan_tensors[0]
    key = (tuple(t._version for t in plan_tensors), tuple(t.data_ptr() for t in plan_tensors), q.shape[0],
           tuple(k.shape[0] for k in ks), q.device, backend)
    seen = _CHECKED.get(id(anchor))
    if seen is not None and seen[0]() is anchor and seen[1] == key:
        return
    for name, t, cols in zip(_PLAN_TENSORS, plan_tensors, (2, None, 4, 3, None, 4)):
        if t.dtype != torch.int32 or t.dim() != (1 if cols is None else 2) or (cols and t.shape[1] != cols):
            shape = "(n,)" if cols is None else f"(n, {cols})"
            raise ValueError(f"plan.{name} must be an int32 tensor of shape {shape}, got {t.dtype} {tuple(t.shape)}")
        if t.device != q.device and (backend == "triton" or t.device.type != "cpu"):
            raise ValueError(f"plan.{name} lives on {t.device} but q is on {q.device}")
    if all(t.device.type == "cpu" for t in plan_tensors):
        check_plan_tensors(plan_tensors, q.shape[0], [k.shape[0] for k in ks], len(ks))
    if seen is None or seen[0]() is not anchor:
        weakref.finalize(anchor, _CHECKED.pop, id(anchor), None)
    _CHECKED[id(anchor)] = (weakref.ref(anchor), key)



@torch.library.custom_op("unigendet::packed_attention_fwd", mutates_args=())
def _packed_attention_fwd(q: Tensor, ks: list[Tensor], vs: list[Tensor], q_ranges: Tensor, kv_ptr: Tensor,
                          kv_entries: Tensor, k_segments: Tensor, q_ptr: Tensor, q_entries: Tensor,
                          max_q_len: int, max_k_len: int, softmax_scale: float,
                          backend: str) -> tuple[Tensor, Tensor]:
    plan = (q_ranges, kv_ptr, kv_entries, k_segments, q_ptr, q_entries)
    _check_op_plan(q, ks, plan, backend)
    if backend == "triton":
        from . import attention_triton

        tks, tvs = _triton_sources(ks), _triton_sources(vs)
        if all(k is None for k in tks):  # no keys at all: nothing to launch
            return _no_key_outputs(q, vs)
        return attention_triton.launch_fwd(q, tks, tvs, plan, softmax_scale)
    if backend == "sdpa":
        from .attention_sdpa import packed_attention_fwd_sdpa

        return packed_attention_fwd_sdpa(q, ks, vs, plan, softmax_scale)
    if backend != "torch":
        raise ValueError(f"backend must be 'torch', 'sdpa' or 'triton', got {backend!r}")
    return _reference_fwd(q, ks, vs, q_ranges, kv_ptr, kv_entries, softmax_scale)


@_packed_attention_fwd.register_fake
def _(q, ks, vs, q_ranges, kv_ptr, kv_entries, k_segments, q_ptr, q_entries, max_q_len, max_k_len,
      softmax_scale, backend):
    dv = vs[0].shape[-1] if len(vs) else q.shape[-1]
    out = q.new_empty((q.shape[0], q.shape[1], dv))
    lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("unigendet::packed_attention_bwd", mutates_args=())
def _packed_attention_bwd(dout: Tensor, q: Tensor, ks: list[Tensor], vs: list[Tensor], out: Tensor, lse: Tensor,
                          q_ranges: Tensor, kv_ptr: Tensor, kv_entries: Tensor, k_segments: Tensor, q_ptr: Tensor,
                          q_entries: Tensor, max_q_len: int, max_k_len: int, softmax_scale: float,
                          backend: str, deterministic: bool) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    plan = (q_ranges, kv_ptr, kv_entries, k_segments, q_ptr, q_entries)
    _check_op_plan(q, ks, plan, backend)
    if backend == "triton":
        from . import attention_triton

        tks, tvs = _triton_sources(ks), _triton_sources(vs)
        if all(k is None for k in tks):
            return torch.zeros_like(q), [torch.zeros_like(k) for k in ks], [torch.zeros_like(v) for v in vs]
        dq, dks, dvs = attention_triton.launch_bwd(dout, q, tks, tvs, out, lse, plan, softmax_scale,
                                                   deterministic=deterministic)
        # absent (empty) sources come back as None
        dks = [torch.zeros_like(k) if d is None else d for d, k in zip(dks, ks)]
        dvs = [torch.zeros_like(v) if d is None else d for d, v in zip(dvs, vs)]
        return dq, dks, dvs
    if backend == "sdpa":
        from .attention_sdpa import packed_attention_bwd_sdpa

        return packed_attention_bwd_sdpa(dout, q, ks, vs, out, lse, plan, softmax_scale)
    if backend != "torch":
        raise ValueError(f"backend must be 'torch', 'sdpa' or 'triton', got {backend!r}")
    return _reference_bwd(dout, q, ks, vs, q_ranges, kv_ptr, kv_entries, softmax_scale)


@_packed_attention_bwd.register_fake
def _(dout, q, ks, vs, out, lse, q_ranges, kv_ptr, kv_entries, k_segments, q_ptr, q_entries, max_q_len,
      max_k_len, softmax_scale, backend, deterministic):
    return torch.empty_like(q), [torch.empty_like(k) for k in ks], [torch.empty_like(v) for v in vs]


# --------------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------------


class PackedAttentionFunction(torch.autograd.Function):
    """``apply(index, max_q_len, max_k_len, softmax_scale, backend, num_sources, deterministic, *tensors)``.

    The logical tensor arguments are ``[q, *plan_tensors (6), *ks, *vs]``; ``tensors`` holds each distinct
    tensor once and ``index[i]`` names the distinct tensor of logical argument i (``torch.compile`` cannot
    trace a Function that receives one tensor twice, e.g. ``k is v``). Gradients of repeated tensors are
    summed. Returns ``(out, lse)``; ``lse`` is not differentiable.
    """

    @staticmethod
    def forward(ctx, index, max_q_len, max_k_len, softmax_scale, backend, num_sources, deterministic, *uniq):
        args = [uniq[i] for i in index]
        q, plan, kv = args[0], args[1:7], args[7:]
        ks, vs = list(kv[:num_sources]), list(kv[num_sources:])
        out, lse = torch.ops.unigendet.packed_attention_fwd(q, ks, vs, *plan, max_q_len, max_k_len,
                                                            softmax_scale, backend)
        ctx.save_for_backward(out, lse, *uniq)
        ctx.meta = (index, max_q_len, max_k_len, softmax_scale, backend, num_sources, deterministic)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        out, lse, *uniq = ctx.saved_tensors
        index, max_q_len, max_k_len, softmax_scale, backend, n, deterministic = ctx.meta
        args = [uniq[i] for i in index]
        q, plan, kv = args[0], args[1:7], args[7:]
        dq, dks, dvs = torch.ops.unigendet.packed_attention_bwd(
            dout.contiguous(), q, list(kv[:n]), list(kv[n:]), out, lse, *plan, max_q_len, max_k_len,
            softmax_scale, backend, deterministic)
        grads = [None] * len(uniq)
        for pos, g in [(0, dq), *((7 + i, g) for i, g in enumerate([*dks, *dvs]))]:
            j = index[pos]
            grads[j] = g if grads[j] is None else grads[j] + g
        return (None, None, None, None, None, None, None, *grads)


# --------------------------------------------------------------------------------------------------
# Backend registration
# --------------------------------------------------------------------------------------------------


def _specs() -> list[_backend.BackendSpec]:
    return [
        _backend.BackendSpec(
            name="triton", devices=("cuda",), dtypes=(torch.float16, torch.bfloat16, torch.float32),
            available=_triton_available, check=_triton_check, auto=_backend.triton_auto,
            description="Triton kernels walking the layout plan (unigendet.ops.attention_triton)",
        ),
        _backend.BackendSpec(
            name="sdpa", devices=("cpu",), dtypes=(torch.float16, torch.bfloat16, torch.float32),
            available=_sdpa_available,
            description="PyTorch's CPU flash-attention kernels, one connected block (sample) per call, masks cached "
                        "per layout (unigendet.ops.attention_sdpa)",
        ),
        _backend.BackendSpec(
            name="torch", devices=("cpu", "cuda"), dtypes=_FLOAT_DTYPES,
            description="pure-PyTorch per-range reference (fp32/fp64 accumulation)",
        ),
    ]


def _sdpa_available() -> str | None:
    from .attention_sdpa import sdpa_unavailable_reason

    return sdpa_unavailable_reason()


_OPS = ("varlen_attention", "packed_attention", "smsa_attention")
for _op in _OPS:
    _backend.register_op(_op, _specs(), example_head_dim=128)


# (op, device, dtype, head dim, backend argument, the environment variables selection reads) -> backend name: the
# selection of a call like the last ones is a dictionary lookup (every layer of a model asks the same question).
_SELECTED: dict[tuple, str] = {}


def _select_backend_impl(op: str, device_type: str, device_index: int, dtype: torch.dtype, head_dim: int,
                         backend: str | None) -> str:
    env = os.environ
    key = (op, device_type, device_index, dtype, head_dim, backend, env.get(_backend.ENV_VAR),
           env.get("TRITON_INTERPRET"), _backend.get_dispatcher(op))
    hit = _SELECTED.get(key)
    if hit is not None:
        return hit
    info = _backend.CallInfo(device=torch.device(device_type, device_index) if device_index >= 0
                             else torch.device(device_type), dtype=dtype, head_dim=head_dim)
    name = _backend.get_dispatcher(op).select(info, backend)  # raises when nothing can run: never cached
    _SELECTED[key] = name
    return name


# Selection reads environment variables and cached probes; under torch.compile it is evaluated once at
# trace time and its (string) result becomes a constant of the graph.
_select_backend = torch.compiler.assume_constant_result(_select_backend_impl)


def _choose(op: str, q: Tensor, backend: str | None) -> str:
    dev = q.device
    index = -1 if dev.index is None else dev.index
    # operator.index specialises a symbolic head dim (torch.compile(dynamic=True)) to a constant with a
    # guard, so the selection stays a trace-time constant; the head dim picks kernels anyway.
    return _select_backend(op, dev.type, index, q.dtype, operator.index(q.shape[-1]), backend)


# --------------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------------


def _check_qkv(name: str, t, *, q: Tensor | None = None) -> Tensor:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 3:
        raise ValueError(f"{name} must have shape (tokens, heads, head_dim), got {tuple(t.shape)}")
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if q is not None:
        if t.dtype != q.dtype:
            raise ValueError(f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on the device of q ({q.device}), got {t.device}")
        if t.shape[-1] != q.shape[-1]:
            raise ValueError(f"{name} must have the head dim of q ({q.shape[-1]}), got {t.shape[-1]}")
    if t.shape[-1] < 1 or t.shape[1] < 1:
        raise ValueError(f"{name} must have at least one head and head_dim >= 1, got {tuple(t.shape)}")
    return t


def _autocast(*ts):
    """Cast float inputs to the autocast dtype when autocast is on for their device (as SDPA does under autocast).

    Under mixed precision with fp32 master weights, q/k may leave an fp32 norm while v leaves a bf16 matmul; the
    kernels need one dtype. float64 is never cast (autocast leaves it alone too).
    """
    t0 = next((t for t in ts if isinstance(t, Tensor)), None)
    if t0 is None or not torch.is_autocast_enabled(t0.device.type):
        return ts
    dt = torch.get_autocast_dtype(t0.device.type)
    return tuple(t.to(dt) if isinstance(t, Tensor) and t.dtype in (torch.float16, torch.bfloat16, torch.float32)
                 else t for t in ts)


def _check_pair(kname: str, vname: str, k: Tensor, v: Tensor, q: Tensor) -> None:
    _check_qkv(kname, k, q=q)
    _check_qkv(vname, v, q=q)
    if k.shape != v.shape:
        raise ValueError(f"{vname} must have the shape of {kname} {tuple(k.shape)}, got {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"{kname}: number of query heads ({q.shape[1]}) must be divisible by the number of "
                         f"key/value heads ({k.shape[1]})")


def _scale(softmax_scale, d: int) -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)) or \
            not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale must be a finite float or None, got {softmax_scale!r}")
    return float(softmax_scale)


def _check_int(name: str, x) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x <= INT32_MAX:
        raise ValueError(f"{name} must be a Python int in [0, 2**31 - 1], got {x!r}")
    return x


def _check_cu(name: str, cu, batch: int | None, q: Tensor) -> Tensor:
    if not isinstance(cu, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise ValueError(f"{name} must be int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.shape[0] < 1:
        raise ValueError(f"{name} must be 1-D of shape (batch + 1,), got {tuple(cu.shape)}")
    if batch is not None and cu.shape[0] != batch + 1:
        raise ValueError(f"{name} must have shape ({batch + 1},) like cu_seqlens_q, got {tuple(cu.shape)}")
    if cu.device.type != "cpu" and cu.device != q.device:
        raise ValueError(f"{name} must be on the CPU or on the device of q ({q.device}), got {cu.device}")
    return cu


def _check_cu_values(name: str, cu: Tensor, total: int, max_seqlen: int, max_name: str) -> None:
    """Host-side value checks; only for CPU tensors outside torch.compile tracing (no sync)."""
    if cu.device.type != "cpu" or torch.compiler.is_compiling():
        return
    check_cu_seqlens(name, cu, total, max_seqlen, max_name)


def _plan_for(layout: AttentionLayout, q: Tensor, backend: str) -> KernelPlan:
    if backend in ("torch", "sdpa"):
        # The reference reads the plan on the host: use the host copy when the layout kept one.
        return layout.host_plan if layout.host_plan is not None else layout.plan
    if layout.plan.device != q.device:
        raise ValueError(f"layout lives on {layout.plan.device} but q is on {q.device}; "
                         f"use layout.to(q.device) once per batch")
    return layout.plan


def _deterministic(deterministic) -> bool:
    if not isinstance(deterministic, bool):
        raise ValueError(f"deterministic must be a bool, got {deterministic!r}")
    return deterministic or torch.are_deterministic_algorithms_enabled()


def _run(q: Tensor, ks: list[Tensor], vs: list[Tensor], plan_tensors, max_q_len: int, max_k_len: int,
         scale: float, backend: str, deterministic: bool) -> tuple[Tensor, Tensor]:
    q, ks, vs = q.contiguous(), [t.contiguous() for t in ks], [t.contiguous() for t in vs]
    if not (torch.is_grad_enabled() and (q.requires_grad or any(t.requires_grad for t in (*ks, *vs)))):
        # nothing to differentiate (inference, no_grad): the forward op alone, without the autograd wrapper
        return torch.ops.unigendet.packed_attention_fwd(q, ks, vs, *plan_tensors, max_q_len, max_k_len, scale,
                                                        backend)
    tensors = [q, *plan_tensors, *ks, *vs]
    uniq: list[Tensor] = []
    index = []
    for t in tensors:
        for j, u in enumerate(uniq):
            if u is t:
                index.append(j)
                break
        else:
            index.append(len(uniq))
            uniq.append(t)
    return PackedAttentionFunction.apply(tuple(index), max_q_len, max_k_len, scale, backend, len(ks),
                                         _deterministic(deterministic), *uniq)


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def packed_attention(q: Tensor, k, v, layout: AttentionLayout, softmax_scale: float | None = None,
                     deterministic: bool = True, return_lse: bool = False, *, backend: str | None = None):
    """Attention over a packed batch with an arbitrary :class:`AttentionLayout`.

    Args:
        q: (total_q, H, D) queries in the token order the layout was built for.
        k, v: (total_k, Hkv, D) keys/values, or a list with one tensor per layout source (all with the
            same Hkv). GQA: query head h uses key/value head ``h // (H // Hkv)``.
        layout: an :class:`AttentionLayout` (on q's device for the Triton backend; no host sync per call).
        softmax_scale: defaults to ``1 / sqrt(D)``.
        deterministic: a bit-for-bit reproducible backward (default); False: the faster backward with atomic dQ
            sums (see the module docstring).
        return_lse: also return the log-sum-exp (H, total_q) float32 (``-inf`` for queries with no key).
        backend: ``auto`` (default, or ``UNIGENDET_BACKEND``), ``triton`` or ``torch``.

    Returns:
        out (total_q, H, D) in q's dtype (zero for queries that see no key), or ``(out, lse)``.
    """
    _check_qkv("q", q)
    if not isinstance(layout, AttentionLayout):
        raise ValueError(f"layout must be an AttentionLayout, got {type(layout).__name__}")
    ks = list(k) if isinstance(k, (list, tuple)) else [k]
    vs = list(v) if isinstance(v, (list, tuple)) else [v]
    q, *kv = _autocast(q, *ks, *vs)
    ks, vs = list(kv[:len(ks)]), list(kv[len(ks):])
    n = layout.num_sources
    if len(ks) != n or len(vs) != n:
        raise ValueError(f"k and v must hold one tensor per layout source ({n}), got {len(ks)} and {len(vs)}")
    for i, (kk, vv) in enumerate(zip(ks, vs)):
        kn, vn = ("k", "v") if n == 1 else (f"k[{i}]", f"v[{i}]")
        _check_pair(kn, vn, kk, vv, q)
        if kk.shape[1] != ks[0].shape[1]:
            raise ValueError(f"{kn} must have the key/value heads of k[0] ({ks[0].shape[1]}), got {kk.shape[1]}")
        if kk.shape[0] != layout.total_k[i]:
            raise ValueError(f"{kn} has {kk.shape[0]} tokens but the layout expects {layout.total_k[i]}")
    if q.shape[0] != layout.total_q:
        raise ValueError(f"q has {q.shape[0]} tokens but the layout expects {layout.total_q}")
    scale = _scale(softmax_scale, q.shape[-1])
    be = _choose("packed_attention", q, backend)
    plan = _plan_for(layout, q, be)
    out, lse = _run(q, ks, vs, plan.tensors(), plan.max_q_len, plan.max_k_len, scale, be, deterministic)
    return (out, lse) if return_lse else out


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
                     max_seqlen_k: int, dropout_p: float = 0.0, softmax_scale: float | None = None,
                     causal: bool = False, window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                     alibi_slopes: Tensor | None = None, deterministic: bool = True,
                     return_attn_probs: bool = False, *, backend: str | None = None):
    """Drop-in for ``flash_attn_varlen_func``.

    Args:
        q: (total_q, H, D); k, v: (total_k, Hkv, D), H divisible by Hkv (query head h uses kv head
            ``h // (H // Hkv)``).
        cu_seqlens_q, cu_seqlens_k: int32 (B + 1,) cumulative sequence lengths, on q's device or the CPU.
            CPU tensors are validated on the host; device tensors are not (no synchronisation).
        max_seqlen_q, max_seqlen_k: Python ints, upper bounds of the sequence lengths.
        causal: bottom-right aligned causal mask (query i of a sequence sees key j iff j <= i + Lk - Lq).
            Query rows that see no key output 0.
        dropout_p, window_size, softcap, alibi_slopes: only the defaults are supported.
        deterministic: a bit-for-bit reproducible backward (default); False: the faster backward with atomic dQ
            sums (see the module docstring).
        return_attn_probs: return ``(out, softmax_lse (H, total_q) float32, None)`` like flash-attn.

    Returns:
        out (total_q, H, D), or ``(out, lse, None)``.
    """
    _check_qkv("q", q)
    q, k, v = _autocast(q, k, v)
    _check_pair("k", "v", k, v, q)
    if dropout_p != 0.0:
        raise ValueError(f"dropout_p={dropout_p} is unsupported (only 0.0)")
    if tuple(window_size) != (-1, -1):
        raise ValueError(f"window_size={tuple(window_size)} is unsupported (only (-1, -1))")
    if softcap != 0.0:
        raise ValueError(f"softcap={softcap} is unsupported (only 0.0)")
    if alibi_slopes is not None:
        raise ValueError("alibi_slopes is unsupported (only None)")
    _check_cu("cu_seqlens_q", cu_seqlens_q, None, q)
    _check_cu("cu_seqlens_k", cu_seqlens_k, cu_seqlens_q.shape[0] - 1, q)
    _check_int("max_seqlen_q", max_seqlen_q)
    _check_int("max_seqlen_k", max_seqlen_k)
    _check_cu_values("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, "max_seqlen_q")
    _check_cu_values("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, "max_seqlen_k")
    scale = _scale(softmax_scale, q.shape[-1])
    be = _choose("varlen_attention", q, backend)
    # The reference reads the plan on the host: keep it where cu_seqlens already are.
    dev = cu_seqlens_q.device if be in ("torch", "sdpa") else q.device
    plan = varlen_plan_tensors(cu_seqlens_q.to(dev), cu_seqlens_k.to(dev), bool(causal))
    out, lse = _run(q, [k], [v], plan, max_seqlen_q, max_seqlen_k, scale, be, deterministic)
    return (out, lse, None) if return_attn_probs else out


def smsa_attention(q: Tensor, k_gen: Tensor | None, v_gen: Tensor | None, k_det: Tensor | None,
                   v_det: Tensor | None, k_txt: Tensor | None, v_txt: Tensor | None, cu_seqlens_q: Tensor,
                   cu_seqlens_gen: Tensor | None, cu_seqlens_det: Tensor | None, cu_seqlens_txt: Tensor | None,
                   max_seqlen_q: int, max_seqlen_gen: int, max_seqlen_det: int, max_seqlen_txt: int,
                   softmax_scale: float | None = None, deterministic: bool = True, return_lse: bool = False, *,
                   backend: str | None = None):
    """Symbiotic multimodal self-attention over three separate key/value sources.

    The queries of sample b (``q[cu_seqlens_q[b]:cu_seqlens_q[b+1]]``) attend without a mask to the union
    of sample b's generative-latent, detection and text keys/values, which stay in three packed tensors
    (never concatenated). A source may be None (k, v and its cu_seqlens all None): it is absent.

    Args:
        q: (total_q, H, D).
        k_gen, v_gen / k_det, v_det / k_txt, v_txt: (total_src, Hkv, D) each, one Hkv for all sources.
        cu_seqlens_*: int32 (B + 1,), on q's device or the CPU (CPU ones are validated on the host).
        max_seqlen_*: Python ints, upper bounds (an absent source's value is ignored).
        softmax_scale: defaults to ``1 / sqrt(D)``.
        deterministic: a bit-for-bit reproducible backward (default); False: the faster backward with atomic dQ
            sums (see the module docstring).
        return_lse: also return lse (H, total_q) float32.

    Returns:
        out (total_q, H, D) (zero for samples with no keys), or ``(out, lse)``. Gradients reach q and every
        present k/v.
    """
    _check_qkv("q", q)
    q, k_gen, v_gen, k_det, v_det, k_txt, v_txt = _autocast(q, k_gen, v_gen, k_det, v_det, k_txt, v_txt)
    _check_cu("cu_seqlens_q", cu_seqlens_q, None, q)
    _check_int("max_seqlen_q", max_seqlen_q)
    _check_cu_values("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, "max_seqlen_q")
    batch = cu_seqlens_q.shape[0] - 1
    srcs = (("gen", k_gen, v_gen, cu_seqlens_gen, max_seqlen_gen), ("det", k_det, v_det, cu_seqlens_det,
            max_seqlen_det), ("txt", k_txt, v_txt, cu_seqlens_txt, max_seqlen_txt))
    present, hkv, max_k = [], None, 0
    for name, kk, vv, cu, ms in srcs:
        given = [x is not None for x in (kk, vv, cu)]
        if any(given) and not all(given):
            raise ValueError(f"k_{name}, v_{name} and cu_seqlens_{name} must be all given or all None")
        if kk is None:
            continue
        _check_pair(f"k_{name}", f"v_{name}", kk, vv, q)
        if hkv is not None and kk.shape[1] != hkv:
            raise ValueError(f"k_{name} must have the key/value heads of the other sources ({hkv}), "
                             f"got {kk.shape[1]}")
        hkv = kk.shape[1]
        _check_cu(f"cu_seqlens_{name}", cu, batch, q)
        _check_int(f"max_seqlen_{name}", ms)
        _check_cu_values(f"cu_seqlens_{name}", cu, kk.shape[0], ms, f"max_seqlen_{name}")
        present.append(name)
        max_k = max(max_k, ms)
    if not present:
        raise ValueError("at least one key/value source (k_gen, k_det, k_txt) must be given")
    scale = _scale(softmax_scale, q.shape[-1])
    be = _choose("smsa_attention", q, backend)
    dev = cu_seqlens_q.device if be in ("torch", "sdpa") else q.device
    cus = [None if cu is None else cu.to(dev) for _, _, _, cu, _ in srcs]
    plan = smsa_plan_tensors(cu_seqlens_q.to(dev), cus)
    empty = q.new_empty((0, hkv, q.shape[-1]))
    ks = [empty if kk is None else kk for _, kk, _, _, _ in srcs]
    vs = [empty if vv is None else vv for _, _, vv, _, _ in srcs]
    out, lse = _run(q, ks, vs, plan, max_seqlen_q, max_k, scale, be, deterministic)
    return (out, lse) if return_lse else out


# --------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------


class PackedAttention(nn.Module):
    """``forward(q, k, v, layout) -> out``: :func:`packed_attention` with fixed options."""

    def __init__(self, softmax_scale: float | None = None, deterministic: bool = True, backend: str | None = None):
        super().__init__()
        self.softmax_scale, self.deterministic, self.backend = softmax_scale, deterministic, backend

    def forward(self, q: Tensor, k, v, layout: AttentionLayout) -> Tensor:
        return packed_attention(q, k, v, layout, self.softmax_scale, self.deterministic, backend=self.backend)

    def extra_repr(self) -> str:
        return f"softmax_scale={self.softmax_scale}, backend={self.backend}"


class VarlenAttention(nn.Module):
    """``forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> out``."""

    def __init__(self, causal: bool = False, softmax_scale: float | None = None, deterministic: bool = True,
                 backend: str | None = None):
        super().__init__()
        self.causal, self.softmax_scale, self.deterministic, self.backend = causal, softmax_scale, deterministic, \
            backend

    def forward(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int) -> Tensor:
        return varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                softmax_scale=self.softmax_scale, causal=self.causal,
                                deterministic=self.deterministic, backend=self.backend)

    def extra_repr(self) -> str:
        return f"causal={self.causal}, softmax_scale={self.softmax_scale}, backend={self.backend}"


class SMSAAttention(nn.Module):
    """``forward(q, k_gen, v_gen, k_det, v_det, k_txt, v_txt, cu_seqlens..., max_seqlens...) -> out``."""

    def __init__(self, softmax_scale: float | None = None, deterministic: bool = True, backend: str | None = None):
        super().__init__()
        self.softmax_scale, self.deterministic, self.backend = softmax_scale, deterministic, backend

    def forward(self, *args) -> Tensor:
        return smsa_attention(*args, softmax_scale=self.softmax_scale, deterministic=self.deterministic,
                              backend=self.backend)

    def extra_repr(self) -> str:
        return f"softmax_scale={self.softmax_scale}, backend={self.backend}"
