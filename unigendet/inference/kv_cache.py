"""A static, preallocated key/value cache for batched incremental decoding.

Every layer owns one key and one value buffer of shape ``(total_capacity, Hkv, D)``. Sequence ``b`` of the batch
owns the slots ``[base[b], base[b] + capacity[b])`` of every buffer, and its first ``length[b]`` slots hold valid
keys. A decoding step writes one token per sequence in place (``index_copy_`` at ``base + length``) and attends
with :func:`unigendet.ops.packed_attention` over each sequence's valid prefix, described by an
:class:`~unigendet.ops.AttentionLayout` whose plan tensors live on the device and are updated in place (no
re-allocation of the cache, no host synchronisation per step).

The cache is indifferent to the order of keys inside a sequence's prefix (a decoded token sees all of them), so the
prefill may store the visible prompt tokens in any order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["StaticKVCache"]


class StaticKVCache:
    """Per-layer K/V buffers for ``len(capacities)`` sequences packed back to back.

    Args:
        num_layers: decoder layers.
        capacities: slots per sequence (prompt tokens kept + tokens to decode).
        num_kv_heads, head_dim: key/value geometry.
        dtype, device: of the buffers (the model's activation dtype and device).
    """

    def __init__(
        self,
        num_layers: int,
        capacities: Sequence[int],
        num_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        caps = [int(c) for c in capacities]
        if not caps or any(c < 1 for c in caps):
            raise ValueError(f"capacities must be a non-empty list of positive ints, got {list(capacities)}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.num_layers = num_layers
        self.batch = len(caps)
        self.capacities = caps
        self.base_host = [0]
        for c in caps[:-1]:
            self.base_host.append(self.base_host[-1] + c)
        self.total = sum(caps)
        self.device = torch.device(device)
        shape = (num_layers, self.total, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=dtype, device=self.device)
        self.base = torch.tensor(self.base_host, dtype=torch.int64, device=self.device)
        self.lengths = torch.zeros(self.batch, dtype=torch.int64, device=self.device)
        # Host mirror of the lengths: every step adds one token to every sequence, so the host always knows
        # them without reading the device (used only for capacity checks).
        self._lengths_host = [0] * self.batch
        self._write_idx = self.base.clone()
        self._layout = self._make_layout()

    # ------------------------------------------------------------------ prefill
    def fill(self, layer: int, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor) -> None:
        """Write prompt keys/values ``(n, Hkv, D)`` of one layer into absolute ``slots`` (n,) int64."""
        self.k[layer].index_copy_(0, slots, keys.to(self.k.dtype))
        self.v[layer].index_copy_(0, slots, values.to(self.v.dtype))

    def set_prefix_lengths(self, lengths: Sequence[int]) -> None:
        """Declare how many slots of each sequence the prefill filled (host ints)."""
        lens = [int(x) for x in lengths]
        if len(lens) != self.batch:
            raise ValueError(f"lengths must hold {self.batch} values, got {len(lens)}")
        for b, (n, c) in enumerate(zip(lens, self.capacities)):
            if not 0 <= n <= c:
                raise ValueError(f"lengths[{b}] = {n} is outside [0, capacity {c}]")
        self._lengths_host = lens
        self.lengths.copy_(torch.tensor(lens, dtype=torch.int64))

    # ------------------------------------------------------------------ decoding
    def begin_step(self) -> None:
        """Reserve one slot per sequence (at ``base + length``) and let attention see it."""
        for b, (n, c) in enumerate(zip(self._lengths_host, self.capacities)):
            if n >= c:
                raise ValueError(f"KV cache of sequence {b} is full ({c} slots)")
        torch.add(self.base, self.lengths, out=self._write_idx)
        ends = (self._write_idx + 1).to(torch.int32)
        plan = self._layout.plan
        plan.kv_entries[:, 1].copy_(ends)
        plan.k_segments[:, 2].copy_(ends)

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store this step's ``(B, Hkv, D)`` keys/values of ``layer`` in the reserved slots."""
        self.k[layer].index_copy_(0, self._write_idx, keys.to(self.k.dtype))
        self.v[layer].index_copy_(0, self._write_idx, values.to(self.v.dtype))

    def attend(self, layer: int, q: torch.Tensor, softmax_scale: float | None = None) -> torch.Tensor:
        """Attention of this step's queries ``(B, H, D)`` over each sequence's cached prefix -> ``(B, H, D)``."""
        from unigendet.ops import packed_attention

        if q.shape[0] != self.batch:
            raise ValueError(f"q must hold one query per sequence ({self.batch}), got {q.shape[0]}")
        return packed_attention(q, self.k[layer], self.v[layer], self._layout, softmax_scale)

    def end_step(self) -> None:
        """Commit the reserved slots (every sequence grew by one token)."""
        self.lengths += 1
        self._lengths_host = [n + 1 for n in self._lengths_host]

    @property
    def lengths_host(self) -> list[int]:
        return list(self._lengths_host)

    # ------------------------------------------------------------------ layout
    def _make_layout(self):
        """One query range per sequence, one key entry ``[base, base + length)``; ends are updated in place."""
        from unigendet.ops import AttentionLayout, KernelPlan

        dev, b = self.device, self.batch
        i32 = torch.int32
        ar = torch.arange(b + 1, dtype=i32, device=dev)
        q_ranges = torch.stack([ar[:-1], ar[1:]], 1).contiguous()
        base = self.base.to(i32)
        zeros = torch.zeros(b, dtype=i32, device=dev)
        kv_entries = torch.stack([base, base, zeros, zeros], 1).contiguous()
        k_segments = torch.stack([zeros, base, base], 1).contiguous()
        q_entries = torch.stack([ar[:-1], ar[1:], zeros, zeros], 1).contiguous()
        plan = KernelPlan(
            q_ranges=q_ranges,
            kv_ptr=ar.clone(),
            kv_entries=kv_entries,
            k_segments=k_segments,
            q_ptr=ar.clone(),
            q_entries=q_entries,
            max_q_len=1,
            max_k_len=max(self.capacities),
            num_sources=1,
            total_q=b,
            total_k=(self.total,),
        )
        # No host copy: the plan is mutated in place every step, so the reference backend must read the live one.
        return AttentionLayout(plan, None)
