"""Packed attention on the CPU through PyTorch's fused SDPA kernels, one connected block (a sample) at a time.

The backend ``sdpa``: what a CPU run picks by default. A plan splits into connected blocks (query ranges that share
keys: in a pack, one sample each, see ``attention._blocks``); each block is one or two calls of PyTorch's CPU flash
attention (``aten::_scaled_dot_product_flash_attention_for_cpu``, which also returns the log-sum-exp) and as many of
its backward. This is the official code's per-sample SDPA path with less work:

* the block structure, the calls and their masks are built once per layout (cached, reused by every layer);
* a block's queries that see all of its keys (in a BAGEL pack: the noised latents, half the sample) form a call of
  their own without a mask, and the block's other queries attend only to the span of keys they can see (in a pack:
  the sample's clean prefix); a call whose queries see all its keys needs no mask, a square causal one uses the
  kernel's causal path;
* queries, keys and outputs are strided views of the packed tensors where they are contiguous (in a pack, always),
  not gathered copies;
* the forward kernel reads grouped K/V heads (GQA) itself when this torch's kernel does (probed once); the backward
  kernel runs about twice as fast on heads expanded to the query heads (it parallelises over K/V heads), so the
  backward expands them, once per call for all blocks;
* outputs and gradients are written once into buffers left uninitialised where the blocks cover them (in a pack
  every row and every key belongs to exactly one block), not zero-filled and accumulated.

Computation is in fp32 whatever the input dtype (as the ``torch`` reference); blocks whose score matrix would exceed
the reference's dense limit, and float64 inputs, go to the ``torch`` reference.

``packed_attention_fwd_sdpa(q, ks, vs, plan_tensors, scale) -> (out, lse)``
``packed_attention_bwd_sdpa(dout, q, ks, vs, out, lse, plan_tensors, scale) -> (dq, dks, dvs)``
"""

from __future__ import annotations

import functools
import weakref

import torch

__all__ = ["packed_attention_bwd_sdpa", "packed_attention_fwd_sdpa", "sdpa_unavailable_reason"]

_FWD = "_scaled_dot_product_flash_attention_for_cpu"
_BWD = "_scaled_dot_product_flash_attention_for_cpu_backward"

# A block's queries that see all of its keys get a call of their own when there are at least this many of them
# (below it the second call's overhead outweighs the masked work it saves).
_SPLIT_MIN_ROWS = 32


def sdpa_unavailable_reason() -> str | None:
    if not (hasattr(torch.ops.aten, _FWD) and hasattr(torch.ops.aten, _BWD)):
        return "this torch has no CPU flash-attention kernels (aten::" + _FWD + ")"
    return None


@functools.cache
def _native_gqa() -> bool:
    """Whether this torch's CPU flash forward takes fewer K/V heads than query heads (grouped, as SDPA's
    ``enable_gqa``); checked once on a small case against expanded heads."""
    fwd = getattr(torch.ops.aten, _FWD)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 5, 8, generator=g) for h in (4, 2, 2))
    try:
        o, _ = fwd(q, k, v)
        o_ref, _ = fwd(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
    except RuntimeError:
        return False
    return o.shape == o_ref.shape and torch.allclose(o, o_ref, atol=1e-6)


def _span_or_index(idx: torch.Tensor):
    """``(start, end)`` when the int64 indices ``idx`` are one ascending contiguous range, else ``idx``."""
    n = idx.numel()
    first = int(idx[0]) if n else 0
    return (first, first + n) if n and int(idx[-1]) == first + n - 1 else idx


def _rows(t: torch.Tensor, rows, dim: int) -> torch.Tensor:
    """The rows ``rows`` (a span: a view; else indices: a gather) of ``t`` along ``dim``."""
    if isinstance(rows, tuple):
        return t.narrow(dim, rows[0], rows[1] - rows[0])
    return t.index_select(dim, rows)


class _Call:
    """One kernel call: some of a block's query rows (global ``rows``: a span or indices) against the block's key
    columns ``[c0, c1)``. ``mask`` is the additive mask (0 visible, -inf not), or None when every query sees every
    key (``causal`` False) or exactly the keys up to its own position in a square call (``causal`` True)."""

    __slots__ = ("rows", "c0", "c1", "mask", "causal", "empty_rows")

    def __init__(self, rows, c0: int, c1: int, vis: torch.Tensor):
        self.rows, self.c0, self.c1 = rows, c0, c1
        lq, lk = vis.shape
        self.mask, self.causal = None, False
        if not bool(vis.all()):
            if lq == lk and torch.equal(vis, torch.ones(lq, lk, dtype=torch.bool).tril_()):
                self.causal = True
            else:
                self.mask = torch.zeros(vis.shape).masked_fill_(~vis, float("-inf"))
        empty = ~vis.any(1) if lk else torch.ones(lq, dtype=torch.bool)
        self.empty_rows = empty if bool(empty.any()) else None  # rows that see no key (their lse is -inf)


class _Block:
    """One connected block: its key pieces ``[(src, k0, k1)]`` and its calls. The first call spans all the block's
    key columns; a second (when the block splits) only the span its queries see."""

    __slots__ = ("pieces", "calls")

    def __init__(self, q_idx: torch.Tensor, pieces, vis: torch.Tensor):
        self.pieces = pieces
        self.calls = [_Call(_span_or_index(q_idx), 0, vis.shape[1], vis)]
        split = self._split(vis)
        if split is not None:
            (r0, r1), rest, (c0, c1) = split
            self.calls = [_Call(_span_or_index(q_idx[r0:r1]), 0, vis.shape[1], vis[r0:r1]),
                          _Call(_span_or_index(q_idx[rest]), c0, c1, vis[rest][:, c0:c1])]

    @staticmethod
    def _split(vis: torch.Tensor):
        """``((r0, r1), rest rows, (c0, c1))`` when the rows that see every key are a prefix or suffix ``[r0, r1)`` of
        at least ``_SPLIT_MIN_ROWS`` rows and the other rows see some key (``[c0, c1)``: the span they see)."""
        lq = vis.shape[0]
        full = vis.all(1)
        nf = int(full.sum())
        if not _SPLIT_MIN_ROWS <= nf < lq:
            return None
        idx = torch.nonzero(full).flatten()
        r0, r1 = int(idx[0]), int(idx[-1]) + 1
        if r1 - r0 != nf or (r0 != 0 and r1 != lq):
            return None
        rest = torch.arange(r1, lq) if r0 == 0 else torch.arange(0, r0)
        seen = torch.nonzero(vis[rest].any(0)).flatten()
        if seen.numel() == 0:
            return None
        return (r0, r1), rest, (int(seen[0]), int(seen[-1]) + 1)


class _BlockPlan:
    """A plan's blocks, and whether their calls cover every query row (``covers_q``) and the blocks every key of
    each source exactly once (``direct[src]``): then outputs and gradients are written, not zero-filled and summed."""

    __slots__ = ("blocks", "covers_q", "direct")

    def __init__(self, blocks: list[_Block], total_q: int, total_k: list[int]):
        self.blocks = blocks
        rows = 0
        for b in blocks:
            for c in b.calls:
                rows += c.rows[1] - c.rows[0] if isinstance(c.rows, tuple) else c.rows.numel()
        self.covers_q = rows == total_q  # calls' rows are disjoint
        self.direct = []
        for src, n in enumerate(total_k):
            spans = sorted((k0, k1) for b in blocks for s, k0, k1 in b.pieces if s == src)
            pos, ok = 0, True
            for k0, k1 in spans:
                ok &= k0 == pos
                pos = k1
            self.direct.append(ok and pos == n)


# id(q_ranges) -> (weak reference, key, _BlockPlan or None when a block is too large for a dense mask)
_CACHE: dict[int, tuple] = {}


def _plan_blocks(plan_tensors, num_heads: int, total_q: int, total_k: list[int]) -> _BlockPlan | None:
    from . import attention as A

    q_ranges = plan_tensors[0]
    key = (tuple(t._version for t in plan_tensors), tuple(t.data_ptr() for t in plan_tensors), num_heads, total_q,
           tuple(total_k))
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
        q_idx = torch.cat([torch.arange(qr[r][0], qr[r][1]) for r in ranges])
        blocks.append(_Block(q_idx, pieces, vis))
    plan = None if blocks is None else _BlockPlan(blocks, total_q, total_k)
    if hit is None or hit[0]() is not q_ranges:
        weakref.finalize(q_ranges, _CACHE.pop, id(q_ranges), None)
    _CACHE[id(q_ranges)] = (weakref.ref(q_ranges), key, plan)
    return plan


def _heads(t: torch.Tensor) -> torch.Tensor:
    """(L, H, D) -> the kernels' (1, H, L, D) in fp32, as a strided view (the kernels take any strides)."""
    return t.float().transpose(0, 1).unsqueeze(0)


def _block_keys(blk: _Block, srcs: list[torch.Tensor]) -> torch.Tensor:
    """The block's keys (or values) from the per-source (1, heads, Lk_src, D) views: a view for one piece."""
    if len(blk.pieces) == 1:
        src, k0, k1 = blk.pieces[0]
        return srcs[src].narrow(2, k0, k1 - k0)
    return torch.cat([srcs[src].narrow(2, k0, k1 - k0) for src, k0, k1 in blk.pieces], 2)


def _setup(q, ks, plan_tensors):
    if q.dtype == torch.float64:
        return None
    return _plan_blocks(plan_tensors, q.shape[1], q.shape[0], [k.shape[0] for k in ks])


def _put(dst: torch.Tensor, rows, src: torch.Tensor, dim: int) -> None:
    if isinstance(rows, tuple):
        dst.narrow(dim, rows[0], rows[1] - rows[0]).copy_(src)
    else:
        dst.index_copy_(dim, rows, src.to(dst.dtype))


def packed_attention_fwd_sdpa(q, ks, vs, plan_tensors, scale: float):
    from . import attention as A

    total_q, h, _ = q.shape
    bp = _setup(q, ks, plan_tensors)
    if bp is None:
        return A._reference_fwd(q, ks, vs, *plan_tensors[:3], scale)
    dv = vs[0].shape[-1] if vs else q.shape[-1]
    if bp.covers_q:
        out = torch.empty(total_q, h, dv, dtype=q.dtype)
        lse = torch.empty(h, total_q, dtype=torch.float32)
    else:
        out = torch.zeros(total_q, h, dv, dtype=q.dtype)
        lse = torch.full((h, total_q), float("-inf"), dtype=torch.float32)
    fwd = getattr(torch.ops.aten, _FWD)
    grouped = _native_gqa()
    g = h // ks[0].shape[1]
    kh = [_heads(k if grouped or g == 1 else k.repeat_interleave(g, 1)) for k in ks]
    vh = [_heads(v if grouped or g == 1 else v.repeat_interleave(g, 1)) for v in vs]
    qh = _heads(q)
    for blk in bp.blocks:
        kb, vb = _block_keys(blk, kh), _block_keys(blk, vh)
        for c in blk.calls:
            o, l_ = fwd(_rows(qh, c.rows, 2), kb.narrow(2, c.c0, c.c1 - c.c0), vb.narrow(2, c.c0, c.c1 - c.c0),
                        is_causal=c.causal, attn_mask=c.mask, scale=scale)
            _put(out, c.rows, o[0].transpose(0, 1), 0)
            if c.empty_rows is not None:
                l_ = l_.masked_fill(c.empty_rows, float("-inf"))
            _put(lse, c.rows, l_[0], 1)
    return out, lse


def packed_attention_bwd_sdpa(dout, q, ks, vs, out, lse, plan_tensors, scale: float):
    from . import attention as A

    total_q, h, d = q.shape
    bp = _setup(q, ks, plan_tensors)
    if bp is None:
        return A._reference_bwd(dout, q, ks, vs, *plan_tensors[:3], scale)
    bwd = getattr(torch.ops.aten, _BWD)
    dq = (torch.empty if bp.covers_q else torch.zeros)(q.shape, dtype=q.dtype)
    hkv = ks[0].shape[1]
    g = h // hkv
    # The heads expanded to the query heads (the backward kernel runs about twice as fast so); the key gradients
    # are gathered per query head in the kernel's (1, H, Lk, D) layout and each group summed once at the end.
    kh = [_heads(k if g == 1 else k.repeat_interleave(g, 1)) for k in ks]
    vh = [_heads(v if g == 1 else v.repeat_interleave(g, 1)) for v in vs]
    dkh = [(torch.empty if direct else torch.zeros)(1, h, k.shape[0], d) for k, direct in zip(ks, bp.direct)]
    dvh = [(torch.empty if direct else torch.zeros)(1, h, v.shape[0], v.shape[-1]) for v, direct in zip(vs, bp.direct)]
    qh, oh, doh = _heads(q), _heads(out), _heads(dout)
    for blk in bp.blocks:
        kb, vb = _block_keys(blk, kh), _block_keys(blk, vh)
        one = len(blk.pieces) == 1
        if one:  # the block's key gradients are a slice of the source's
            src, k0, _ = blk.pieces[0]
            gk_dst, gv_dst, base, first_write = dkh[src], dvh[src], k0, bp.direct[src]
        else:
            gk_dst, gv_dst, base, first_write = torch.zeros_like(kb), torch.zeros_like(vb), 0, False
        for i, c in enumerate(blk.calls):
            lb = _rows(lse, c.rows, 1)
            if c.empty_rows is not None:  # rows that see no key: lse 0 (what the forward kernel gives) makes P 0
                lb = lb.masked_fill(c.empty_rows, 0.0)
            n = c.c1 - c.c0
            g_q, g_k, g_v = bwd(_rows(doh, c.rows, 2), _rows(qh, c.rows, 2), kb.narrow(2, c.c0, n),
                                vb.narrow(2, c.c0, n), _rows(oh, c.rows, 2), lb.unsqueeze(0), 0.0, c.causal,
                                attn_mask=c.mask, scale=scale)
            _put(dq, c.rows, g_q[0].transpose(0, 1), 0)
            # the first call spans all the block's keys: it writes them when nothing else touches them
            if i == 0 and first_write:
                gk_dst.narrow(2, base, n).copy_(g_k)
                gv_dst.narrow(2, base, n).copy_(g_v)
            else:
                gk_dst.narrow(2, base + c.c0, n).add_(g_k)
                gv_dst.narrow(2, base + c.c0, n).add_(g_v)
        if not one:
            off = 0
            for src, k0, k1 in blk.pieces:  # a piece belongs to one block: written once when its source is direct
                for dst, gb in ((dkh[src], gk_dst), (dvh[src], gv_dst)):
                    part = dst.narrow(2, k0, k1 - k0)
                    (part.copy_ if bp.direct[src] else part.add_)(gb.narrow(2, off, k1 - k0))
                off += k1 - k0

    def per_kv_head(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """(1, H, Lk, D) per query head -> (Lk, Hkv, D) in the input's dtype, each group of heads summed."""
        t = t[0].view(hkv, g, t.shape[2], t.shape[3]).sum(1) if g > 1 else t[0]
        return t.transpose(0, 1).to(like.dtype).contiguous()

    return dq, [per_kv_head(a, k) for a, k in zip(dkh, ks)], [per_kv_head(a, v) for a, v in zip(dvh, vs)]
