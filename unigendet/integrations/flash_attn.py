"""flash-attn 2's ``flash_attn_varlen_func`` and ``flash_attn_func`` on the unigendet attention.

Code written against flash-attn changes only its import::

    from unigendet.integrations.flash_attn import flash_attn_func, flash_attn_varlen_func

The signatures, argument names, defaults, shapes and return values are flash-attn 2's
(``flash_attn/flash_attn_interface.py``); the backend (Triton kernels on a GPU, the PyTorch reference
elsewhere) is chosen as for every unigendet op (``UNIGENDET_BACKEND``, see ``unigendet._backend``).

Coverage:

=====================  ==========================================================================
feature                here
=====================  ==========================================================================
GQA / MQA              supported (query head h uses key/value head ``h // (H // Hkv)``)
``causal``             supported, bottom-right aligned; rows that see no key output 0
``window_size``        supported, exactly flash-attn's rule: query i sees keys
                       ``[i + Lk - Lq - left, i + Lk - Lq + right]``; a left window gives each
                       query it cuts its own kernel range, so it runs below dense-tile speed
``softmax_scale``      supported (default ``1 / sqrt(headdim)``)
``deterministic``      as flash-attn: False (default) runs the backward whose dK/dV kernel sums dQ
                       with fp32 atomics (5 matmuls per tile pair, last bits vary between runs);
                       True the bit-for-bit reproducible one
dtypes                 fp16 and bf16 as in flash-attn, plus fp32 (and fp64 on the reference)
head dims              Triton: 32, 40, 48, 64, 72, 80, 96, 112, 128; other head dims run on the
                       PyTorch reference
``dropout_p`` > 0      ``NotImplementedError`` (the kernels have no attention dropout)
``softcap`` > 0        ``NotImplementedError`` (no logit soft-capping)
``alibi_slopes``       ``NotImplementedError`` (no ALiBi bias)
``block_table``        ``NotImplementedError`` (no paged KV cache)
``return_attn_probs``  ``ValueError``: flash-attn returns the probabilities for testing only (its
                       docstring says they may be wrongly scaled); use
                       ``unigendet.ops.packed_attention(..., return_lse=True)`` for the log-sum-exp
=====================  ==========================================================================

``max_seqlen_*`` must be Python ints, as in flash-attn (no host synchronisation is made for them). CPU
``cu_seqlens`` are validated on the host; GPU ones are not (no synchronisation), except with a left
window, whose plan is built on the host.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops import packed_attention, varlen_attention
from ._layouts import check_cu_host, normalise_window, window_layout

__all__ = ["flash_attn_func", "flash_attn_varlen_func"]


def _check_unsupported(fn: str, dropout_p, softcap, alibi_slopes, return_attn_probs, block_table=None) -> None:
    if return_attn_probs:
        raise ValueError(f"{fn}: return_attn_probs=True is not supported; flash-attn returns the attention "
                         "probabilities for testing only (possibly wrongly scaled). Use "
                         "unigendet.ops.packed_attention(..., return_lse=True) for the log-sum-exp")
    if dropout_p:
        raise NotImplementedError(f"{fn}: dropout_p={dropout_p} is not supported (no attention dropout); "
                                  "pass dropout_p=0.0")
    if softcap:
        raise NotImplementedError(f"{fn}: softcap={softcap} is not supported (no logit soft-capping); pass 0.0")
    if alibi_slopes is not None:
        raise NotImplementedError(f"{fn}: alibi_slopes is not supported (no ALiBi bias); pass None")
    if block_table is not None:
        raise NotImplementedError(f"{fn}: block_table is not supported (no paged KV cache); pass None")


def _max_int(name: str, x) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < 0:
        raise ValueError(f"{name} must be a non-negative Python int, got {x!r}")
    return x


def _windowed(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int, scale,
              causal: bool, window: tuple[int, int], deterministic: bool = False) -> Tensor:
    for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        if not isinstance(cu, Tensor) or cu.dtype != torch.int32 or cu.dim() != 1:
            raise ValueError(f"{name} must be a 1-D int32 tensor")
    if cu_q.shape != cu_k.shape:
        raise ValueError(f"cu_seqlens_k must have shape {tuple(cu_q.shape)} like cu_seqlens_q, got {tuple(cu_k.shape)}")
    for t, name in ((q, "q"), (k, "k")):
        if not isinstance(t, Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be a (tokens, heads, head_dim) tensor")
    check_cu_host("cu_seqlens_q", cu_q.cpu().tolist(), q.shape[0], max_q, "max_seqlen_q")
    check_cu_host("cu_seqlens_k", cu_k.cpu().tolist(), k.shape[0], max_k, "max_seqlen_k")
    layout = window_layout(cu_q, cu_k, causal, window, q.shape[0], k.shape[0], q.device)
    return packed_attention(q, k, v, layout, scale, deterministic=deterministic)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """flash-attn 2's ``flash_attn_varlen_func``.

    Args:
        q: (total_q, nheads, headdim); k, v: (total_k, nheads_k, headdim), nheads divisible by nheads_k.
        cu_seqlens_q, cu_seqlens_k: (batch_size + 1,) int32 cumulative sequence lengths.
        max_seqlen_q, max_seqlen_k: Python ints, upper bounds of the sequence lengths.
        dropout_p: must be 0.0.
        softmax_scale: scaling of QK^T before the softmax; default ``1 / sqrt(headdim)``.
        causal: causal mask aligned to the bottom right of each sequence's (Lq, Lk) score matrix.
        window_size: (left, right); query i sees keys [i + Lk - Lq - left, i + Lk - Lq + right]
            (-1: unbounded; causal sets right to 0).
        softcap, alibi_slopes, block_table: must be 0.0 / None / None.
        deterministic: False (flash-attn's default): the faster backward with atomic dQ sums; True: bit for bit
            reproducible.
        return_attn_probs: must be False.

    Returns:
        out: (total_q, nheads, headdim) in q's dtype.
    """
    fn = "flash_attn_varlen_func"
    _check_unsupported(fn, dropout_p, softcap, alibi_slopes, return_attn_probs, block_table)
    _max_int("max_seqlen_q", max_seqlen_q)
    _max_int("max_seqlen_k", max_seqlen_k)
    window = normalise_window(window_size, bool(causal), max_seqlen_q, max_seqlen_k)
    if window is None:
        return varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                softmax_scale=softmax_scale, causal=bool(causal), deterministic=deterministic)
    return _windowed(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, bool(causal),
                     window, deterministic)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash-attn 2's ``flash_attn_func``.

    Args:
        q: (batch_size, seqlen_q, nheads, headdim); k, v: (batch_size, seqlen_k, nheads_k, headdim).
        The other arguments are those of :func:`flash_attn_varlen_func`.

    Returns:
        out: (batch_size, seqlen_q, nheads, headdim) in q's dtype.
    """
    fn = "flash_attn_func"
    _check_unsupported(fn, dropout_p, softcap, alibi_slopes, return_attn_probs)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"{fn}: {name} must be a (batch_size, seqlen, nheads, headdim) tensor, got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    b, sq, h, d = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"{fn}: k and v must have q's batch size {b}, got {k.shape[0]} and {v.shape[0]}")
    sk = k.shape[1]
    # Built on q's device: no host->device copy, and no synchronisation on a GPU.
    seq = torch.arange(b + 1, dtype=torch.int32, device=q.device)
    cu_q, cu_k = seq * sq, seq * sk
    out = flash_attn_varlen_func(q.reshape(b * sq, h, d), k.reshape(b * sk, *k.shape[2:]),
                                 v.reshape(b * sk, *v.shape[2:]), cu_q, cu_k, sq, sk, 0.0, softmax_scale, causal,
                                 window_size, 0.0, None, deterministic)
    return out.view(b, sq, h, out.shape[-1])
