"""Host launchers of the Triton packed-attention kernels (``unigendet.kernels.attention``).

The launchers allocate the outputs, derive the tile lists and pick a launch configuration; they never synchronise
with the device. Triton is imported lazily, on the first launch. Two entries each way:

``packed_attention_fwd_triton(q, ks, vs, plan, softmax_scale) -> (out, lse)``
``packed_attention_bwd_triton(dout, q, ks, vs, out, lse, plan, softmax_scale, deterministic=True)
    -> (dq, dks, dvs)``
    for direct use: they validate what the kernels rely on, then launch; ``plan`` is a kernel plan (the ``plan``
    of an ``AttentionLayout``: int32 device tensors plus host ints).
``launch_fwd(q, ks, vs, plan_tensors, scale)``, ``launch_bwd(dout, q, ks, vs, out, lse, plan_tensors, scale,
    deterministic)``
    what the registered ops run: the same launches on arguments the public attention functions validated once,
    the plan as the op's six tensors (nothing is re-checked or rebuilt per call).

Shapes: ``q``/``out``/``dout`` (total_q, H, D); each ``ks[i]``/``vs[i]`` (total_k_i, Hkv, D), or None (or a
(0, Hkv, D) tensor) for an absent source; ``lse`` (H, total_q) float32, natural log, ``-inf`` where a query
sees no key. Query rows in no plan range get ``out = 0``, ``lse = -inf``, ``dq = 0``; keys seen by no query
get ``dk = dv = 0``.

Launch configurations (``UNIGENDET_TRITON_AUTOTUNE``):

``off`` (default)  each kernel runs its *first choice* for the dtype and head dim (``first_choice``): the same
                   tiles on every rank and in every run, nothing timed (safe under CUDA-graph capture), one
                   compile per kernel variant.
``on``             the candidates of ``unigendet.kernels.attention`` are timed once per (kernel, dtype, head
                   dim, sources) key; in a distributed run rank 0's choice is broadcast so every rank runs the
                   same tiles; a key first met while a CUDA graph is being captured keeps the first choice.

Under ``TRITON_INTERPRET=1`` a single 16 x 16 tile configuration is used.

Tile lists: the forward and dQ kernels walk the query tiles of ``q_ranges``, the dK/dV kernel the key tiles of
``k_segments``, both longest first; the lists are built on the plan's device with tensor ops (no host sync)
and cached per plan tensor and tile size, so every layer of a model reuses them.
"""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Sequence

import torch

__all__ = [
    "TRITON_DTYPES",
    "TRITON_HEAD_DIMS",
    "autotune_mode",
    "first_choice",
    "launch_bwd",
    "launch_fwd",
    "packed_attention_bwd_triton",
    "packed_attention_fwd_triton",
]

TRITON_HEAD_DIMS = (32, 40, 48, 64, 72, 80, 96, 112, 128)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_SOURCES = 3
AUTOTUNE_ENV = "UNIGENDET_TRITON_AUTOTUNE"
TMA_ENV = "UNIGENDET_TRITON_TMA"


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def _kernels():
    from unigendet.kernels import attention as kernels

    return kernels


def autotune_mode() -> str:
    """``off`` or ``on`` (``UNIGENDET_TRITON_AUTOTUNE``; see the module docstring)."""
    v = os.environ.get(AUTOTUNE_ENV, "off").strip().lower()
    if v in ("", "0", "off", "false", "no"):
        return "off"
    if v in ("1", "on", "true", "yes"):
        return "on"
    raise ValueError(f"{AUTOTUNE_ENV}={v!r} must be 'off' or 'on'")


# --------------------------------------------------------------------------------------------------
# Launch configurations
# --------------------------------------------------------------------------------------------------


def _arch(device: torch.device) -> int:
    if device.type != "cuda":
        return 90
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _candidates(name: str, dtype: torch.dtype, head_dim: int, num_sources: int = 1, arch: int = 90) -> list:
    """The candidate configurations of a kernel for a dtype, head dim and architecture, first choice first."""
    import triton

    k = _kernels()
    if dtype == torch.float32:
        bm, bn, w, s = k.FP32_CONFIG[name]
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)]
    cands = list(k.CONFIGS[name])
    i = k.first_choice_index(name, head_dim, num_sources, arch)
    return [cands[i], *cands[:i], *cands[i + 1:]]


def first_choice(name: str, dtype: torch.dtype, head_dim: int, num_sources: int = 1, arch: int = 90):
    """The configuration kernel ``name`` (``fwd``, ``dq``, ``dkdv``, ``dkdv_atomic``) runs when autotuning is off."""
    return _candidates(name, dtype, head_dim, num_sources, arch)[0]


_CHOSEN: dict[tuple, object] = {}


def _choose(name: str, q: torch.Tensor, head_dim: int, num_sources: int, launch):
    """The configuration to launch with; ``launch(config)`` runs the kernel (used to time candidates)."""
    first = first_choice(name, q.dtype, head_dim, num_sources, _arch(q.device))
    if autotune_mode() == "off":
        return first
    key = (name, q.dtype, head_dim, num_sources, q.device.index)
    if key in _CHOSEN:
        return _CHOSEN[key]
    if torch.cuda.is_current_stream_capturing():
        return first  # never time (or synchronise) inside a graph capture
    from triton.testing import do_bench

    cands = _candidates(name, q.dtype, head_dim, num_sources, _arch(q.device))
    times = []
    for c in cands:
        try:
            times.append(do_bench(lambda c=c: launch(c), warmup=5, rep=20))
        except Exception:  # a candidate that does not fit this GPU (shared memory): never chosen  # noqa: BLE001
            times.append(float("inf"))
    best = min(range(len(cands)), key=lambda i: times[i])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Every rank meets the same keys in the same order (SPMD): rank 0's choice for all.
        t = torch.tensor([best], device=q.device if torch.distributed.get_backend() == "nccl" else "cpu")
        torch.distributed.broadcast(t, src=0)
        best = int(t.item())
    _CHOSEN[key] = cands[best]
    return cands[best]


def _meta(config) -> dict:
    return dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def _interpret_meta(extra_blocks: dict | None = None) -> dict:
    k = _kernels()
    return {"BLOCK_M": k.INTERPRET_BLOCK_M, "BLOCK_N": k.INTERPRET_BLOCK_N, **(extra_blocks or {})}


# --------------------------------------------------------------------------------------------------
# Tile lists
# --------------------------------------------------------------------------------------------------

# id(plan tensor) -> (weak reference, its version, {key: tile list}); an entry dies with its tensor. (Tensors
# compare elementwise, so they cannot be the keys of a WeakKeyDictionary.)
_TILE_CACHE: dict[int, tuple] = {}


def _tile_list(starts: torch.Tensor, ends: torch.Tensor, work: torch.Tensor, total: int, block: int,
               reverse: bool) -> torch.Tensor:
    """(U, 2) int32 rows ``(index, first row)`` of every ``block``-sized tile of the intervals ``[starts, ends)``,
    heaviest interval first; ``reverse`` walks each interval's tiles from its end (causal ranges: the last query
    tiles see the most keys). ``U`` is a host-known bound (``total // block + len(starts) + 1``); rows past the
    real tile count hold index -1. Tensor ops only: no host synchronisation."""
    n = starts.shape[0]
    dev = starts.device
    upper = total // block + n + 1
    if n == 0:
        return torch.full((upper, 2), -1, dtype=torch.int32, device=dev)
    lens = (ends - starts).clamp_min(0).to(torch.int64)
    counts = (lens + block - 1) // block
    order = torch.argsort(work.to(torch.int64), descending=True, stable=True)
    counts_o = counts[order]
    cum = torch.cumsum(counts_o, 0)
    t = torch.arange(upper, device=dev, dtype=torch.int64)
    j = torch.searchsorted(cum, t, right=True)
    valid = j < n
    jc = j.clamp_max(n - 1)
    local = t - (cum[jc] - counts_o[jc])
    if reverse:
        local = counts_o[jc] - 1 - local
    idx = order[jc]
    first = starts.to(torch.int64)[idx] + local * block
    return torch.stack([torch.where(valid, idx, -1), torch.where(valid, first, 0)], 1).to(torch.int32).contiguous()


def _segment_sums(ptr: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """Sum of ``values[ptr[i]:ptr[i+1]]`` for each i < n (tensor ops)."""
    out = torch.zeros(n, dtype=torch.int64, device=values.device)
    if values.shape[0] == 0 or n == 0:
        return out
    owner = torch.searchsorted(ptr[1:].to(torch.int64), torch.arange(values.shape[0], device=values.device),
                               right=True).clamp_max(n - 1)
    return out.index_add_(0, owner, values.to(torch.int64))


def _cached(anchor: torch.Tensor, key: tuple, build):
    """``build()`` once per (plan tensor, key); the plan tensors are shared by every layer of a batch."""
    if torch.compiler.is_compiling():
        return build()
    slot = _TILE_CACHE.get(id(anchor))
    if slot is None or slot[0]() is not anchor or slot[1] != anchor._version:
        if slot is None or slot[0]() is not anchor:
            weakref.finalize(anchor, _TILE_CACHE.pop, id(anchor), None)
        slot = (weakref.ref(anchor), anchor._version, {})
        _TILE_CACHE[id(anchor)] = slot
    if key not in slot[2]:
        slot[2][key] = build()
    return slot[2][key]


def _query_tiles(q_ranges, kv_ptr, kv_entries, total_q: int, block: int) -> torch.Tensor:
    def build():
        work = _segment_sums(kv_ptr, (kv_entries[:, 1] - kv_entries[:, 0]).clamp_min(0), q_ranges.shape[0])
        return _tile_list(q_ranges[:, 0], q_ranges[:, 1], work * (q_ranges[:, 1] - q_ranges[:, 0]), total_q, block,
                          reverse=True)

    return _cached(q_ranges, ("q", block, kv_entries.data_ptr(), total_q), build)


def _key_tiles(k_segments, q_ptr, q_entries, total_k: int, block: int) -> torch.Tensor:
    def build():
        work = _segment_sums(q_ptr, (q_entries[:, 1] - q_entries[:, 0]).clamp_min(0), k_segments.shape[0])
        return _tile_list(k_segments[:, 1], k_segments[:, 2], work, total_k, block, reverse=False)

    return _cached(k_segments, ("k", block, q_entries.data_ptr(), total_k), build)


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


def _plan_tensors(plan, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The six checked plan tensors of ``plan`` in ``KernelPlan.tensors()`` order."""
    return tuple(_plan_tensor(plan, f, device, c) for f, c in (("q_ranges", 2), ("kv_ptr", None), ("kv_entries", 4),
                                                               ("k_segments", 3), ("q_ptr", None), ("q_entries", 4)))


def _check_qkv(q: torch.Tensor, ks: Sequence[torch.Tensor | None], vs: Sequence[torch.Tensor | None], plan):
    """Validate q and the K/V sources; return contiguous q, ks, vs (None sources kept) and (H, Hkv, D)."""
    q = _check_tensor("q", q, 3)
    if q.dtype not in TRITON_DTYPES:
        raise ValueError(f"q: dtype {q.dtype} unsupported (expected one of {TRITON_DTYPES})")
    if q.dtype == torch.bfloat16 and _interpret():
        raise ValueError("q: the Triton interpreter cannot multiply bfloat16 (its results would be garbage); use "
                         "float16/float32 or a GPU")
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
    # The kernels index rows with int32 offsets inside a tile and 64-bit tile bases; lengths must fit int32.
    if max([total_q, *(k.shape[0] for k in out_ks if k is not None)]) >= 2**31 - 1:
        raise ValueError("q/ks: packed lengths must be below 2**31 - 1")
    return q, out_ks, out_vs, (H, hkv, D)


def _source_args(ts: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
    """Three pointers for the kernels: absent sources alias a present one (never read)."""
    present = next(t for t in ts if t is not None)
    padded = [t if t is not None else present for t in ts]
    padded += [present] * (MAX_SOURCES - len(padded))
    return padded


def _common_meta(q: torch.Tensor, D: int, num_sources: int) -> dict:
    d0, d1 = _kernels().head_dim_split(D)
    return {
        "HEAD_DIM": D,
        "D0": d0,
        "D1": d1,
        "NUM_SOURCES": num_sources,
        "INPUT_PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
    }


def _check_scale(softmax_scale) -> float:
    s = float(softmax_scale)
    if not math.isfinite(s):
        raise ValueError(f"softmax_scale: must be finite, got {softmax_scale}")
    return s


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


# --------------------------------------------------------------------------------------------------
# TMA descriptors (forward K/V tiles)
# --------------------------------------------------------------------------------------------------


def _tma_descriptors(k: torch.Tensor, v: torch.Tensor, meta: dict, block_n: int):
    """Host tensor descriptors of K/V as (tokens, Hkv * D) for the column blocks, or None where TMA does not
    apply: Triton without descriptors, not Hopper or newer, ``UNIGENDET_TRITON_TMA=0``, padded column blocks
    (a box would reach into the next head's columns), several sources, or unaligned rows/bases."""
    if os.environ.get(TMA_ENV, "1").strip().lower() in ("0", "off", "false", "no") or _interpret():
        return None
    if meta["NUM_SOURCES"] != 1 or meta["D0"] + meta["D1"] != meta["HEAD_DIM"] or k.dtype == torch.float32:
        return None
    if not k.is_cuda or torch.cuda.get_device_capability(k.device)[0] < 9:
        return None
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        return None
    t, hkv, d = k.shape
    if (hkv * d * k.element_size()) % 16 or k.data_ptr() % 16 or v.data_ptr() % 16 or t == 0:
        return None
    d0, d1 = meta["D0"], meta["D1"]
    k2, v2 = k.view(t, hkv * d), v.view(t, hkv * d)
    kd0 = TensorDescriptor.from_tensor(k2, [block_n, d0])
    vd0 = TensorDescriptor.from_tensor(v2, [block_n, d0])
    kd1 = TensorDescriptor.from_tensor(k2, [block_n, d1]) if d1 else None
    vd1 = TensorDescriptor.from_tensor(v2, [block_n, d1]) if d1 else None
    return kd0, kd1, vd0, vd1


def _dq_descriptors(dq_acc: torch.Tensor, meta: dict, block_m: int):
    """Descriptors of the fp32 dQ sums as (total_q, H * D), for bulk tensor reductions (Hopper), or None."""
    if os.environ.get(TMA_ENV, "1").strip().lower() in ("0", "off", "false", "no") or _interpret():
        return None
    if not dq_acc.is_cuda or torch.cuda.get_device_capability(dq_acc.device)[0] < 9 or dq_acc.data_ptr() % 16:
        return None
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        return None
    t, h, d = dq_acc.shape
    a2 = dq_acc.view(t, h * d)
    d0, d1 = meta["D0"], meta["D1"]
    return (TensorDescriptor.from_tensor(a2, [block_m, d0]),
            TensorDescriptor.from_tensor(a2, [block_m, d1]) if d1 else None)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


def packed_attention_fwd_triton(q: torch.Tensor, ks: Sequence[torch.Tensor | None],
                                vs: Sequence[torch.Tensor | None], plan, softmax_scale: float):
    """Packed attention forward with the Triton kernels.

    Args:
        q: (total_q, H, D) fp16/bf16/fp32.
        ks, vs: one (total_k_i, Hkv, D) tensor per plan source (None for an absent source).
        plan: kernel plan (``q_ranges``, ``kv_ptr``, ``kv_entries``, ``num_sources``, ``total_q``, ...).
        softmax_scale: multiplier of ``q . k`` before the softmax.

    Returns:
        out (total_q, H, D) in q's dtype (0 for queries without a visible key) and
        lse (H, total_q) float32 (natural log, ``-inf`` for those queries).
    """
    q, ks, vs, _ = _check_qkv(q, ks, vs, plan)
    return launch_fwd(q, ks, vs, _plan_tensors(plan, q.device), _check_scale(softmax_scale))


def launch_fwd(q: torch.Tensor, ks: Sequence[torch.Tensor | None], vs: Sequence[torch.Tensor | None],
               plan_tensors: Sequence[torch.Tensor], scale: float):
    """:func:`packed_attention_fwd_triton` on arguments its checks would pass (contiguous q, ks, vs; the plan as its
    six int32 tensors on q's device, in ``KernelPlan.tensors()`` order): what the registered op runs, its caller
    (the public attention functions) having validated them once."""
    q_ranges, kv_ptr, kv_entries = plan_tensors[:3]
    total_q, H, D = q.shape
    hkv = next(k for k in ks if k is not None).shape[1]
    out = torch.zeros_like(q)
    lse = torch.full((H, total_q), float("-inf"), dtype=torch.float32, device=q.device)
    if q_ranges.shape[0] == 0 or kv_entries.shape[0] == 0 or total_q == 0:
        return out, lse
    K, V = _source_args(ks), _source_args(vs)
    meta = _common_meta(q, D, len(ks))
    k = _kernels()
    fn = k._packed_attention_fwd_kernel

    def launch(config):
        m = _interpret_meta() if config is None else _meta(config)
        tiles = _query_tiles(q_ranges, kv_ptr, kv_entries, total_q, m["BLOCK_M"])
        desc = None if config is None else _tma_descriptors(K[0], V[0], meta, m["BLOCK_N"])
        fn[(tiles.shape[0] * H,)](
            q, K[0], V[0], K[1], V[1], K[2], V[2], out, lse,
            *(desc if desc is not None else (None, None, None, None)),
            tiles, q_ranges, kv_ptr, kv_entries,
            total_q, H, hkv, scale * k.LOG2E,
            **meta, USE_TMA=desc is not None, **m,
        )

    if _interpret():
        launch(None)
    else:
        launch(_choose("fwd", q, D, len(ks), launch))
    return out, lse


def packed_attention_bwd_triton(dout: torch.Tensor, q: torch.Tensor, ks: Sequence[torch.Tensor | None],
                                vs: Sequence[torch.Tensor | None], out: torch.Tensor, lse: torch.Tensor, plan,
                                softmax_scale: float, deterministic: bool = True):
    """Packed attention backward with the Triton kernels.

    Args:
        dout: (total_q, H, D) gradient of the output, same dtype as q.
        q, ks, vs, plan, softmax_scale: as for :func:`packed_attention_fwd_triton`.
        out: (total_q, H, D) forward output; lse: (H, total_q) float32 forward log-sum-exp.
        deterministic: True: dQ by query tiles, bit-for-bit reproducible, no atomics (7 matmuls per tile pair);
            False: dQ accumulated by the dK/dV kernel with fp32 bulk reductions (5 matmuls per tile pair; the last
            bits of dQ vary between runs), on Hopper or newer (elsewhere the deterministic kernels run).

    Returns:
        dq (total_q, H, D), dks and dvs (lists with one tensor per source, None for an absent one),
        all in q's dtype; keys seen by no query get zero gradient.
    """
    q, ks, vs, (H, _, _) = _check_qkv(q, ks, vs, plan)
    for name, t in (("dout", dout), ("out", out)):
        _check_tensor(name, t, 3, q.device)
        if t.shape != q.shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)} does not match q's {tuple(q.shape)}")
        if t.dtype != q.dtype:
            raise ValueError(f"{name}: dtype {t.dtype} does not match q's {q.dtype}")
    lse = _check_tensor("lse", lse, 2, q.device)
    if lse.shape != (H, q.shape[0]) or lse.dtype != torch.float32:
        raise ValueError(f"lse: expected float32 of shape {(H, q.shape[0])}, got {lse.dtype} {tuple(lse.shape)}")
    return launch_bwd(dout.contiguous(), q, ks, vs, out.contiguous(), lse, _plan_tensors(plan, q.device),
                      _check_scale(softmax_scale), deterministic)


def launch_bwd(dout: torch.Tensor, q: torch.Tensor, ks: Sequence[torch.Tensor | None],
               vs: Sequence[torch.Tensor | None], out: torch.Tensor, lse: torch.Tensor,
               plan_tensors: Sequence[torch.Tensor], scale: float, deterministic: bool = True):
    """:func:`packed_attention_bwd_triton` on arguments its checks would pass (see :func:`launch_fwd`)."""
    q_ranges, kv_ptr, kv_entries, k_segments, q_ptr, q_entries = plan_tensors
    total_q, H, D = q.shape
    hkv = next(k for k in ks if k is not None).shape[1]

    dks = [torch.zeros_like(k) if k is not None else None for k in ks]
    dvs = [torch.zeros_like(v) if v is not None else None for v in vs]
    if total_q == 0 or kv_entries.shape[0] == 0:
        return torch.zeros_like(q), dks, dvs
    k = _kernels()
    meta = _common_meta(q, D, len(ks))
    K, V = _source_args(ks), _source_args(vs)
    DK, DV = _source_args(dks), _source_args(dvs)
    total_k = sum(t.shape[0] for t in ks if t is not None)

    # 1. delta = rowsum(dO * O) in fp32.
    delta = torch.empty((H, total_q), dtype=torch.float32, device=q.device)
    block_t = k.INTERPRET_BLOCK_M if _interpret() else k.PREPROCESS_BLOCK_T
    block_d = max(16, 1 << (D - 1).bit_length())
    k._packed_attention_bwd_preprocess_kernel[(_cdiv(total_q, block_t), H)](
        out, dout, delta, total_q, H, HEAD_DIM=D, BLOCK_D=block_d, BLOCK_T=block_t,
    )

    # 2. dQ: by query tiles (deterministic), or as fp32 sums from the dK/dV programs (atomic; Hopper or newer,
    #    and under the interpreter, which checks its logic on the CPU).
    atomic = not deterministic and (_interpret() or k.atomic_dq_supported(_arch(q.device)))
    if atomic:
        dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dq = None
    else:
        dq = torch.zeros_like(q)
        dq_acc = delta  # an fp32 pointer the kernel never touches
        fn_dq = k._packed_attention_bwd_dq_kernel

        def launch_dq(config):
            m = _interpret_meta() if config is None else _meta(config)
            tiles = _query_tiles(q_ranges, kv_ptr, kv_entries, total_q, m["BLOCK_M"])
            fn_dq[(tiles.shape[0] * H,)](
                q, K[0], V[0], K[1], V[1], K[2], V[2], dout, lse, delta, dq,
                tiles, q_ranges, kv_ptr, kv_entries,
                total_q, H, hkv, scale * k.LOG2E, scale,
                **meta, **m,
            )

        launch_dq(None if _interpret() else _choose("dq", q, D, len(ks), launch_dq))

    # 3. dK, dV: key tiles walking q_entries, GQA heads summed in-program.
    if k_segments.shape[0] > 0:
        fn_kv = k._packed_attention_bwd_dkdv_kernel

        def launch_dkdv(config):
            m = _interpret_meta() if config is None else _meta(config)
            tiles = _key_tiles(k_segments, q_ptr, q_entries, total_k, m["BLOCK_N"])
            desc = _dq_descriptors(dq_acc, meta, m["BLOCK_M"]) if atomic and config is not None else None
            fn_kv[(tiles.shape[0] * hkv,)](
                q, K[0], V[0], K[1], V[1], K[2], V[2], DK[0], DV[0], DK[1], DV[1], DK[2], DV[2], dout, lse, delta,
                dq_acc, *(desc if desc is not None else (None, None)), tiles, k_segments, q_ptr, q_entries,
                total_q, H, hkv, scale * k.LOG2E, scale,
                **meta, ATOMIC_DQ=atomic, USE_TMA=desc is not None, **m,
            )

        if _interpret():
            launch_dkdv(None)
        elif atomic:
            # Timing would add into dq_acc: the atomic form runs its first choice.
            launch_dkdv(first_choice("dkdv_atomic", q.dtype, D, len(ks), _arch(q.device)))
        else:
            launch_dkdv(_choose("dkdv", q, D, len(ks), launch_dkdv))
    if atomic:
        dq = dq_acc.to(q.dtype)
    return dq, dks, dvs
