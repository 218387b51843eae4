"""Host launchers of the Triton packed-attention kernels (``unigendet.kernels.attention``).

The launchers validate what the kernels rely on, allocate the outputs and compute the grids. They take
a kernel plan (the ``plan`` of an ``AttentionLayout``: int32 device tensors plus host ints) and never
synchronise with the device. Triton is imported lazily, on the first launch.

``packed_attention_fwd_triton(q, ks, vs, plan, softmax_scale) -> (out, lse)``
``packed_attention_bwd_triton(dout, q, ks, vs, out, lse, plan, softmax_scale) -> (dq, dks, dvs)``

Shapes: ``q``/``out``/``dout`` (total_q, H, D); each ``ks[i]``/``vs[i]`` (total_k_i, Hkv, D), or None (or a
(0, Hkv, D) tensor) for an absent source; ``lse`` (H, total_q) float32, natural log, ``-inf`` where a query
sees no key. Query rows in no plan range get ``out = 0``, ``lse = -inf``, ``dq = 0``; keys seen by no query
get ``dk = dv = 0``.

On GPU each kernel is autotuned over a small static config list, keyed on the head dim, the number of
sources and the dtypes (the first call's shapes pick the config); under ``TRITON_INTERPRET=1`` a single
16 x 16 tile configuration is used.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch

__all__ = [
    "TRITON_DTYPES",
    "TRITON_HEAD_DIMS",
    "packed_attention_bwd_triton",
    "packed_attention_fwd_triton",
]

TRITON_HEAD_DIMS = (32, 40, 48, 64, 72, 80, 96, 112, 128)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_SOURCES = 3


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def _kernels():
    from unigendet.kernels import attention as kernels

    return kernels


_TUNED: dict[str, object] = {}


def _tuned(name: str):
    """The autotuned variant of a kernel (built once; compiled mode only)."""
    if name not in _TUNED:
        import triton

        k = _kernels()
        configs = {
            "fwd": k.FWD_CONFIGS,
            "dq": k.BWD_DQ_CONFIGS,
            "dkdv": k.BWD_DKDV_CONFIGS,
        }[name]
        fn = {
            "fwd": k._packed_attention_fwd_kernel,
            "dq": k._packed_attention_bwd_dq_kernel,
            "dkdv": k._packed_attention_bwd_dkdv_kernel,
        }[name]
        _TUNED[name] = triton.autotune(configs=configs, key=k.AUTOTUNE_KEY)(fn)
    return _TUNED[name]


def _launch(name: str, plain, grid_fn, *args, **constexprs):
    """Launch ``plain`` with the interpreter's single small config, or its autotuned variant on GPU."""
    if _interpret():
        k = _kernels()
        meta = {"BLOCK_M": k.INTERPRET_BLOCK_M, "BLOCK_N": k.INTERPRET_BLOCK_N}
        plain[grid_fn(meta)](*args, **constexprs, **meta)
    else:
        _tuned(name)[grid_fn](*args, **constexprs)


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def _check_tensor(name: str, t: torch.Tensor, ndim: int, device: torch.device | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected device {device}, got {t.device}")
    return t.contiguous()


def _plan_tensor(plan, field: str, device: torch.device, cols: int | None) -> torch.Tensor:
    t = getattr(plan, field, None)
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"plan.{field}: expected a tensor")
    if t.dtype != torch.int32:
        raise ValueError(f"plan.{field}: expected int32, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"plan.{field}: expected device {device} (the inputs' device), got {t.device}")
    if cols is not None and (t.dim() != 2 or t.shape[1] != cols):
        raise ValueError(f"plan.{field}: expected shape (n, {cols}), got {tuple(t.shape)}")
    return t.contiguous()


def _check_qkv(q: torch.Tensor, ks: Sequence[torch.Tensor | None], vs: Sequence[torch.Tensor | None], plan):
    """Validate q and the K/V sources; return contiguous q, ks, vs (None sources kept) and (H, Hkv, D)."""
    q = _check_tensor("q", q, 3)
    if q.dtype not in TRITON_DTYPES:
        raise ValueError(f"q: dtype {q.dtype} unsupported (expected one of {TRITON_DTYPES})")
    total_q, H, D = q.shape
    if D not in TRITON_HEAD_DIMS:
        raise ValueError(f"q: head dim {D} unsupported by the Triton kernels (supported: {TRITON_HEAD_DIMS})")
    if not isinstance(ks, (list, tuple)) or not isinstance(vs, (list, tuple)):
        raise ValueError("ks/vs: expected lists of tensors (None for an absent source)")
    num_sources = int(getattr(plan, "num_sources", len(ks)))
    if len(ks) != num_sources or len(vs) != num_sources:
        raise ValueError(f"ks/vs: expected {num_sources} sources (plan.num_sources), got {len(ks)} and {len(vs)}")
    if not 1 <= num_sources <= MAX_SOURCES:
        raise ValueError(f"plan.num_sources: expected 1..{MAX_SOURCES}, got {num_sources}")
    total_k = tuple(getattr(plan, "total_k", ()))
    out_ks, out_vs, hkv = [], [], None
    for i, (k, v) in enumerate(zip(ks, vs)):
        if (k is None) != (v is None):
            raise ValueError(f"ks[{i}]/vs[{i}]: both or neither must be None")
        if k is None:
            out_ks.append(None)
            out_vs.append(None)
            continue
        k = _check_tensor(f"ks[{i}]", k, 3, q.device)
        v = _check_tensor(f"vs[{i}]", v, 3, q.device)
        for name, t in ((f"ks[{i}]", k), (f"vs[{i}]", v)):
            if t.dtype != q.dtype:
                raise ValueError(f"{name}: dtype {t.dtype} does not match q's {q.dtype}")
        if k.shape != v.shape:
            raise ValueError(f"vs[{i}]: shape {tuple(v.shape)} does not match ks[{i}]'s {tuple(k.shape)}")
        if k.shape[2] != D:
            raise ValueError(f"ks[{i}]: head dim {k.shape[2]} does not match q's {D}")
        if hkv is None:
            hkv = k.shape[1]
        elif k.shape[1] != hkv:
            raise ValueError(f"ks[{i}]: {k.shape[1]} kv heads, but an earlier source has {hkv}")
        if i < len(total_k) and k.shape[0] != total_k[i]:
            raise ValueError(f"ks[{i}]: {k.shape[0]} tokens, but the plan expects {total_k[i]}")
        out_ks.append(k)
        out_vs.append(v)
    if hkv is None:
        raise ValueError("ks: at least one K/V source must be given")
    if hkv == 0 or H % hkv != 0:
        raise ValueError(f"q: {H} query heads is not a multiple of the {hkv} kv heads")
    if int(getattr(plan, "total_q", total_q)) != total_q:
        raise ValueError(f"q: {total_q} tokens, but the plan expects {plan.total_q}")
    return q, out_ks, out_vs, (H, hkv, D)


def _source_args(ts: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
    """Three pointers for the kernels: absent sources alias a present one (never read)."""
    present = next(t for t in ts if t is not None)
    padded = [t if t is not None else present for t in ts]
    padded += [present] * (MAX_SOURCES - len(padded))
    return padded


def _common_meta(q: torch.Tensor, D: int, num_sources: int) -> dict:
    return {
        "HEAD_DIM": D,
        "BLOCK_D": max(16, _next_pow2(D)),
        "NUM_SOURCES": num_sources,
        "INPUT_PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
    }


def _next_pow2(n: int) -> int:
    return 1 << (int(n) - 1).bit_length()


def _check_scale(softmax_scale) -> float:
    s = float(softmax_scale)
    if not math.isfinite(s):
        raise ValueError(f"softmax_scale: must be finite, got {softmax_scale}")
    return s


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


def packed_attention_fwd_triton(q: torch.Tensor, ks: Sequence[torch.Tensor | None],
                                vs: Sequence[torch.Tensor | None], plan, softmax_scale: float):
    """Packed attention forward with the Triton kernels.

    Args:
        q: (total_q, H, D) fp16/bf16/fp32.
        ks, vs: one (total_k_i, Hkv, D) tensor per plan source (None for an absent source).
        plan: kernel plan (``q_ranges``, ``kv_ptr``, ``kv_entries``, ``max_q_len``, ``num_sources``, ...).
        softmax_scale: multiplier of ``q . k`` before the softmax.

    Returns:
        out (total_q, H, D) in q's dtype (0 for queries without a visible key) and
        lse (H, total_q) float32 (natural log, ``-inf`` for those queries).
    """
    q, ks, vs, (H, hkv, D) = _check_qkv(q, ks, vs, plan)
    scale = _check_scale(softmax_scale)
    q_ranges = _plan_tensor(plan, "q_ranges", q.device, 2)
    kv_ptr = _plan_tensor(plan, "kv_ptr", q.device, None)
    kv_entries = _plan_tensor(plan, "kv_entries", q.device, 4)
    total_q = q.shape[0]
    out = torch.zeros_like(q)
    lse = torch.full((H, total_q), float("-inf"), dtype=torch.float32, device=q.device)
    R = q_ranges.shape[0]
    max_q_len = int(plan.max_q_len)
    if R == 0 or max_q_len == 0 or kv_entries.shape[0] == 0 or total_q == 0:
        return out, lse
    k0 = next(k for k in ks if k is not None)
    K = _source_args(ks)
    V = _source_args(vs)
    meta = _common_meta(q, D, len(ks))
    k = _kernels()

    def grid(m):
        return (R, _cdiv(max_q_len, m["BLOCK_M"]), H)

    _launch(
        "fwd", k._packed_attention_fwd_kernel, grid,
        q, K[0], V[0], K[1], V[1], K[2], V[2], out, lse,
        q_ranges, kv_ptr, kv_entries,
        q.stride(0), q.stride(1), k0.stride(0), k0.stride(1), out.stride(0), out.stride(1), lse.stride(0),
        scale * k.LOG2E, H // hkv,
        **meta,
    )
    return out, lse


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def packed_attention_bwd_triton(dout: torch.Tensor, q: torch.Tensor, ks: Sequence[torch.Tensor | None],
                                vs: Sequence[torch.Tensor | None], out: torch.Tensor, lse: torch.Tensor, plan,
                                softmax_scale: float):
    """Packed attention backward with the Triton kernels (deterministic: no atomics).

    Args:
        dout: (total_q, H, D) gradient of the output, same dtype as q.
        q, ks, vs, plan, softmax_scale: as for :func:`packed_attention_fwd_triton`.
        out: (total_q, H, D) forward output; lse: (H, total_q) float32 forward log-sum-exp.

    Returns:
        dq (total_q, H, D), dks and dvs (lists with one tensor per source, None for an absent one),
        all in q's dtype; keys seen by no query get zero gradient.
    """
    q, ks, vs, (H, hkv, D) = _check_qkv(q, ks, vs, plan)
    scale = _check_scale(softmax_scale)
    for name, t in (("dout", dout), ("out", out)):
        _check_tensor(name, t, 3, q.device)
        if t.shape != q.shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)} does not match q's {tuple(q.shape)}")
        if t.dtype != q.dtype:
            raise ValueError(f"{name}: dtype {t.dtype} does not match q's {q.dtype}")
    dout = dout.contiguous()
    out = out.contiguous()
    total_q = q.shape[0]
    lse = _check_tensor("lse", lse, 2, q.device)
    if lse.shape != (H, total_q) or lse.dtype != torch.float32:
        raise ValueError(f"lse: expected float32 of shape {(H, total_q)}, got {lse.dtype} {tuple(lse.shape)}")
    q_ranges = _plan_tensor(plan, "q_ranges", q.device, 2)
    kv_ptr = _plan_tensor(plan, "kv_ptr", q.device, None)
    kv_entries = _plan_tensor(plan, "kv_entries", q.device, 4)
    k_segments = _plan_tensor(plan, "k_segments", q.device, 3)
    q_ptr = _plan_tensor(plan, "q_ptr", q.device, None)
    q_entries = _plan_tensor(plan, "q_entries", q.device, 4)

    dq = torch.zeros_like(q)
    dks = [torch.zeros_like(k) if k is not None else None for k in ks]
    dvs = [torch.zeros_like(v) if v is not None else None for v in vs]
    if total_q == 0 or kv_entries.shape[0] == 0:
        return dq, dks, dvs
    k = _kernels()
    meta = _common_meta(q, D, len(ks))
    k0 = next(t for t in ks if t is not None)
    K, V = _source_args(ks), _source_args(vs)
    DK, DV = _source_args(dks), _source_args(dvs)

    # 1. delta = rowsum(dO * O) in fp32.
    delta = torch.empty((H, total_q), dtype=torch.float32, device=q.device)
    block_t = k.INTERPRET_BLOCK_M if _interpret() else k.PREPROCESS_BLOCK_T
    k._packed_attention_bwd_preprocess_kernel[(_cdiv(total_q, block_t), H)](
        out, dout, delta, total_q,
        out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), delta.stride(0),
        HEAD_DIM=D, BLOCK_D=meta["BLOCK_D"], BLOCK_T=block_t,
    )

    # 2. dQ: query tiles walking kv_entries (the forward's grid).
    R = q_ranges.shape[0]
    max_q_len = int(plan.max_q_len)
    if R > 0 and max_q_len > 0:
        def grid_dq(m):
            return (R, _cdiv(max_q_len, m["BLOCK_M"]), H)

        _launch(
            "dq", k._packed_attention_bwd_dq_kernel, grid_dq,
            q, K[0], V[0], K[1], V[1], K[2], V[2], dout, lse, delta, dq,
            q_ranges, kv_ptr, kv_entries,
            q.stride(0), q.stride(1), k0.stride(0), k0.stride(1), dout.stride(0), dout.stride(1),
            dq.stride(0), dq.stride(1), lse.stride(0),
            scale * k.LOG2E, scale, H // hkv,
            **meta,
        )

    # 3. dK, dV: key tiles walking q_entries, GQA heads summed in-program.
    S = k_segments.shape[0]
    max_k_len = int(plan.max_k_len)
    if S > 0 and max_k_len > 0:
        def grid_dkdv(m):
            return (S, _cdiv(max_k_len, m["BLOCK_N"]), hkv)

        _launch(
            "dkdv", k._packed_attention_bwd_dkdv_kernel, grid_dkdv,
            q, K[0], V[0], K[1], V[1], K[2], V[2], DK[0], DV[0], DK[1], DV[1], DK[2], DV[2], dout, lse, delta,
            k_segments, q_ptr, q_entries,
            q.stride(0), q.stride(1), k0.stride(0), k0.stride(1), dout.stride(0), dout.stride(1), lse.stride(0),
            scale * k.LOG2E, scale, H // hkv,
            **meta,
        )
    return dq, dks, dvs
