"""Packed attention on the CPU through PyTorch's fused SDPA kernels, one connected block (a sample) at a time.

The backend ``sdpa``: what a CPU run picks by default. A plan splits into connected blocks (query ranges that share
keys: in a pack, one sample each, see ``attention._blocks``); each block is one call of PyTorch's CPU flash
attention (``aten::_scaled_dot_product_flash_attention_for_cpu``, which also returns the log-sum-exp) with the
block's visibility as an additive mask, and one call of its backward. This is the official code's own per-sample
SDPA path, with the masks built once per layout (cached, reused by every layer) and the K/V heads of a GQA group
expanded per block. Computation is in fp32 whatever the input dtype (as the ``torch`` reference); blocks whose
score matrix would exceed the reference's dense limit, and float64 inputs, go to the ``torch`` reference.

``packed_attention_fwd_sdpa(q, ks, vs, plan_tensors, scale) -> (out, lse)``
``packed_attention_bwd_sdpa(dout, q, ks, vs, out, lse, plan_tensors, scale) -> (dq, dks, dvs)``
"""

from __future__ import annotations

import weakref

import torch

__all__ = ["packed_attention_bwd_sdpa", "packed_attention_fwd_sdpa", "sdpa_unavailable_reason"]

_FWD = "_scaled_dot_product_flash_attention_for_cpu"
_BWD = "_scaled_dot_product_flash_attention_for_cpu_backward"


def sdpa_unavailable_reason() -> str | None:
    if not (hasattr(torch.ops.aten, _FWD) and hasattr(torch.ops.aten, _BWD)):
        return "this torch has no CPU flash-attention kernels (aten::" + _FWD + ")"
    return None


class _Block:
    """One connected block: its query rows, its key pieces and its additive mask (0 visible, -inf not).

    ``q_span`` is ``(start, end)`` when the query rows are one contiguous range (sliced, not gathered)."""

    __slots__ = ("q_idx", "q_span", "pieces", "mask", "empty_rows")

    def __init__(self, q_idx, pieces, mask):
        self.q_idx, self.pieces, self.mask = q_idx, pieces, mask
        n = q_idx.numel()
        first = int(q_idx[0]) if n else 0
        self.q_span = (first, first + n) if n and int(q_idx[-1]) == first + n - 1 else None
        self.empty_rows = torch.isinf(mask).all(1) if mask.shape[1] else torch.ones(mask.shape[0], dtype=torch.bool)

    def rows(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """The block's query rows of ``t`` along ``dim`` (a view when contiguous)."""
        if self.q_span is not None:
            return t.narrow(dim, self.q_span[0], self.q_span[1] - self.q_span[0])
        return t.index_select(dim, self.q_idx)

    def put(self, dst: torch.Tensor, src: torch.Tensor, dim: int = 0) -> None:
        if self.q_span is not None:
            dst.narrow(dim, self.q_span[0], self.q_span[1] - self.q_span[0]).copy_(src)
        else:
            dst.index_copy_(dim, self.q_idx, src.to(dst.dtype))


# id(q_ranges) -> (weak reference, key, blocks or None when a block is too large for a dense mask)
_CACHE: dict[int, tuple] = {}


def _plan_blocks(plan_tensors, num_heads: int):
    from . import attention as A

    q_ranges = plan_tensors[0]
    key = (tuple(t._version for t in plan_tensors), tuple(t.data_ptr() for t in plan_tensors), num_heads)
    hit = _CACHE.get(id(q_ranges))
    if hit is not None and hit[0]() is q_ranges and hit[1] == key:
        return hit[2]
    qr, ptr, ents = (t.tolist() for t in plan_tensors[:3])
    blocks = []
    for ranges, pieces in A._blocks(qr, ptr, ents):
        if A._block_too_large(num_heads, qr, ranges, pieces):
            blocks = None
            break
        vis, _, _ = A._block_mask(qr, ptr, ents, ranges, pieces)
        mask = torch.zeros(vis.shape).masked_fill_(~vis, float("-inf"))
        q_idx = torch.cat([torch.arange(qr[r][0], qr[r][1]) for r in ranges])
        blocks.append(_Block(q_idx, pieces, mask))
    if hit is None or hit[0]() is not q_ranges:
        weakref.finalize(q_ranges, _CACHE.pop, id(q_ranges), None)
    _CACHE[id(q_ranges)] = (weakref.ref(q_ranges), key, blocks)
    return blocks


def _gather(blk: _Block, ks, vs, h: int):
    """The block's keys and values, fp32, heads expanded to the query heads: (1, H, Lk, D) each."""
    if len(blk.pieces) == 1:
        src, k0, k1 = blk.pieces[0]
        k, v = ks[src][k0:k1].float(), vs[src][k0:k1].float()
    else:
        k = torch.cat([ks[src][k0:k1] for src, k0, k1 in blk.pieces]).float()
        v = torch.cat([vs[src][k0:k1] for src, k0, k1 in blk.pieces]).float()
    g = h // k.shape[1]
    if g > 1:
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    return k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)


def packed_attention_fwd_sdpa(q, ks, vs, plan_tensors, scale: float):
    from . import attention as A

    total_q, h, _ = q.shape
    blocks = _plan_blocks(plan_tensors, h) if q.dtype != torch.float64 else None
    if blocks is None:
        return A._reference_fwd(q, ks, vs, *plan_tensors[:3], scale)
    out = torch.zeros(total_q, h, vs[0].shape[-1] if vs else q.shape[-1], dtype=q.dtype)
    lse = torch.full((h, total_q), float("-inf"), dtype=torch.float32)
    fwd = getattr(torch.ops.aten, _FWD)
    for blk in blocks:
        qb = blk.rows(q).float().transpose(0, 1).unsqueeze(0)
        kb, vb = _gather(blk, ks, vs, h)
        o, l_ = fwd(qb, kb, vb, attn_mask=blk.mask, scale=scale)
        blk.put(out, o[0].transpose(0, 1))
        blk.put(lse, l_[0].masked_fill(blk.empty_rows.unsqueeze(0), float("-inf")), 1)
    return out, lse


def packed_attention_bwd_sdpa(dout, q, ks, vs, out, lse, plan_tensors, scale: float):
    from . import attention as A

    total_q, h, d = q.shape
    blocks = _plan_blocks(plan_tensors, h) if q.dtype != torch.float64 else None
    if blocks is None:
        return A._reference_bwd(dout, q, ks, vs, *plan_tensors[:3], scale)
    bwd = getattr(torch.ops.aten, _BWD)
    dq = torch.zeros(q.shape, dtype=q.dtype)
    dk_acc = [torch.zeros(k.shape, dtype=torch.float32) for k in ks]
    dv_acc = [torch.zeros(v.shape, dtype=torch.float32) for v in vs]
    for blk in blocks:
        qb = blk.rows(q).float().transpose(0, 1).unsqueeze(0)
        kb, vb = _gather(blk, ks, vs, h)
        ob = blk.rows(out).float().transpose(0, 1).unsqueeze(0)
        dob = blk.rows(dout).float().transpose(0, 1).unsqueeze(0)
        # rows that see no key: lse 0 (what the kernel's forward returns) makes their P exactly 0
        lb = blk.rows(lse, 1).masked_fill(blk.empty_rows.unsqueeze(0), 0.0).unsqueeze(0)
        g_q, g_k, g_v = bwd(dob, qb, kb, vb, ob, lb, 0.0, False, attn_mask=blk.mask, scale=scale)
        blk.put(dq, g_q[0].transpose(0, 1))
        hkv = ks[blk.pieces[0][0]].shape[1]
        g_k = g_k[0].reshape(hkv, h // hkv, -1, d).sum(1).transpose(0, 1)  # (Lk, Hkv, D): GQA heads summed
        g_v = g_v[0].reshape(hkv, h // hkv, -1, g_v.shape[-1]).sum(1).transpose(0, 1)
        off = 0
        for src, k0, k1 in blk.pieces:
            dk_acc[src][k0:k1] += g_k[off:off + k1 - k0]
            dv_acc[src][k0:k1] += g_v[off:off + k1 - k0]
            off += k1 - k0
    return dq, [a.to(k.dtype) for a, k in zip(dk_acc, ks)], [a.to(v.dtype) for a, v in zip(dv_acc, vs)]
