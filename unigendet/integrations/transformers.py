"""The unigendet attention as a Hugging Face transformers attention implementation.

    import unigendet.integrations.transformers  # registers "unigendet" (or call register())
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="unigendet")

Any model that dispatches through transformers' ``AttentionInterface`` (Llama, Qwen2, Mistral and the
other decoders whose attention calls ``ALL_ATTENTION_FUNCTIONS``) then runs its attention on
:func:`unigendet.ops.packed_attention`. A matching mask function is registered with
``AttentionMaskInterface``, so the model never builds a dense 4-D mask: like flash-attention it gets
the 2-D padding mask (or None), and the attention works out which keys each query sees:

- padding (``attention_mask`` with zeros): padded tokens are dropped, as in transformers'
  flash-attention path; their output rows are 0. With a KV cache the queries are the last
  ``q_len`` positions (left padding).
- packed sequences (no padding mask, ``position_ids`` restarting at their minimum, usually 0, inside
  a row; every row starts a new sequence): each document attends only to itself. Explicit
  ``cu_seq_lens_q/k`` and ``max_length_q/k`` keyword arguments (``DataCollatorWithFlattening``)
  are used as given.
- causal or bidirectional (``module.is_causal`` or the ``is_causal`` argument); with ``q_len < kv_len``
  (a KV cache) the causal mask is bottom-right aligned.
- GQA: key/value heads are never repeated.
- sliding windows (``sliding_window`` from the model, causal): exact, query q sees keys
  ``(q - sliding_window, q]`` of its sequence, as transformers' flash-attention path does.

Not supported, each with a clear error: attention dropout during training, logit soft-capping
(``softcap``), attention sinks (``s_aux``), bidirectional sliding windows, custom 4-D masks, and mask
overlays (``or_mask_function`` / ``and_mask_function``, block or chunked attention). Attention weights
(``output_attentions=True``) are not returned.

The batch geometry (gather indices, ``cu_seqlens`` and the layout) is computed once per forward (from
the mask or ``position_ids``, one device->host copy) and reused by every layer. Backend selection is
that of every unigendet op (``UNIGENDET_BACKEND``: ``auto``, ``triton``, ``torch``).
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from ..ops import AttentionLayout, packed_attention
from ._layouts import check_cu_host, normalise_window, window_layout

__all__ = ["NAME", "register", "unigendet_attention_forward", "unigendet_mask"]

NAME = "unigendet"

# Mask functions transformers composes that this implementation reproduces (by qualified name). Any other
# function in a mask's composition is an overlay it cannot express, and raises.
_SUPPORTED_MASK_FUNCTIONS = {
    "causal_mask_function": None,
    "bidirectional_mask_function": None,
    "and_masks.<locals>.and_mask": None,
    "sliding_window_overlay.<locals>.inner_mask": None,
    "padding_mask_function.<locals>.inner_mask": None,
    "packed_sequence_mask_function.<locals>.inner_mask": None,
    "remap_positions_for_packed_sequence.<locals>.inner_mask": None,
    "add_offsets_to_mask_function.<locals>.inner_mask": None,
}
_UNSUPPORTED_MASK_FUNCTIONS = {
    "or_masks.<locals>.or_mask": "mask unions (or_mask_function or block_sequence_ids, e.g. bidirectional "
                                 "image-token blocks)",
    "blockwise_overlay.<locals>.inner_mask": "blockwise attention (block_sequence_ids)",
    "chunked_overlay.<locals>.inner_mask": "chunked attention (attention_chunk_size)",
    "sliding_window_bidirectional_overlay.<locals>.inner_mask": "bidirectional sliding windows",
}


def _mask_functions(fn, seen: set):
    """``fn`` and every function it closes over (transformers composes masks as closures)."""
    if id(fn) in seen:
        return
    seen.add(id(fn))
    yield fn
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        items = value if isinstance(value, (tuple, list)) else (value,)
        for item in items:
            if callable(item) and hasattr(item, "__qualname__") and not isinstance(item, (type, torch.nn.Module)):
                yield from _mask_functions(item, seen)


def _check_mask_function(mask_function, use_vmap: bool) -> None:
    if use_vmap:
        raise NotImplementedError(f"attn_implementation={NAME!r}: custom mask functions (or_mask_function / "
                                  "and_mask_function) are not supported; use 'sdpa' or 'flex_attention'")
    for f in _mask_functions(mask_function, set()):
        name = getattr(f, "__qualname__", repr(f))
        if name in _SUPPORTED_MASK_FUNCTIONS:
            continue
        what = _UNSUPPORTED_MASK_FUNCTIONS.get(name, f"the mask function {name}")
        raise NotImplementedError(f"attn_implementation={NAME!r}: {what} is not supported; use 'sdpa' or "
                                  "'flex_attention' for this model")


def unigendet_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                   mask_function=None, attention_mask: Tensor | None = None, **kwargs) -> Tensor | None:
    """``AttentionMaskInterface`` entry: the 2-D padding mask (sliced to the keys), or None without padding.

    Like transformers' flash-attention mask, no 4-D mask is built; mask compositions this implementation
    cannot reproduce raise ``NotImplementedError``.
    """
    if mask_function is not None:
        _check_mask_function(mask_function, bool(kwargs.get("use_vmap", False)))
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:]
    if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None
    return attention_mask


# --------------------------------------------------------------------------------------------------
# Batch geometry: which packed tokens form which sequence, computed once per forward
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Geometry:
    idx_q: Tensor | None  # flat (batch * q_len) indices of the kept queries (None: all, in order)
    idx_k: Tensor | None
    layout: AttentionLayout


_NO_VERSION = object()


class _GeometryCache:
    """The last few geometries, keyed on the identity and version of the tensors they were computed from.

    Every layer of one forward receives the same mask / ``position_ids`` objects, so each geometry is
    computed by the first layer that needs it (full-attention and sliding-window layers need one each)
    and reused by the others. A tensor modified in place (new version) or freed misses; inference-mode
    tensors (no version counter) and traced code are never cached.
    """

    def __init__(self, size: int = 4):
        self.size = size
        self._entries: list = []  # (refs, key, value), most recent last

    @staticmethod
    def _version(t: Tensor | None):
        if t is None:
            return None
        try:
            return t._version
        except RuntimeError:  # inference tensors have no version counter
            return _NO_VERSION

    def get(self, tensors: tuple, meta: tuple, build):
        if torch.compiler.is_compiling():
            return build()
        versions = tuple(self._version(t) for t in tensors)
        if any(v is _NO_VERSION for v in versions):
            return build()
        key = (meta, versions)
        for i, (refs, k, value) in enumerate(self._entries):
            if k == key and len(refs) == len(tensors) and all(
                    (r is None and t is None) or (r is not None and r() is t) for r, t in zip(refs, tensors)):
                self._entries.append(self._entries.pop(i))
                return value
        value = build()
        self._entries.append((tuple(None if t is None else weakref.ref(t) for t in tensors), key, value))
        del self._entries[:-self.size]
        return value


_CACHE = _GeometryCache()


def _cu_from_lengths(lengths: Tensor) -> Tensor:
    return torch.nn.functional.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))


def _layout(cu_q: Tensor, cu_k: Tensor, total_q: int, total_k: int, max_q: int, max_k: int, causal: bool,
            window, device) -> AttentionLayout:
    w = None if window is None else normalise_window(window, causal, max_q, max_k)
    if w is not None:
        return window_layout(cu_q, cu_k, causal, w, total_q, total_k, device)
    return AttentionLayout.varlen(cu_q, cu_k, causal, device=device, total_q=total_q, total_k=total_k,
                                  max_seqlen_q=max_q, max_seqlen_k=max_k)


def _from_padding(mask: Tensor, b: int, q_len: int, kv_len: int, causal: bool, window, device) -> _Geometry:
    mk = mask.detach().to(device="cpu", dtype=torch.bool)
    if q_len == kv_len:
        mq = mk
    elif q_len == 1:
        mq = torch.ones(b, 1, dtype=torch.bool)
    else:
        mq = mk[:, -q_len:]  # the queries are the last positions (left padding)
    lq, lk = mq.sum(1, dtype=torch.int32), mk.sum(1, dtype=torch.int32)
    cu_q, cu_k = _cu_from_lengths(lq), _cu_from_lengths(lk)
    idx_q = torch.nonzero(mq.reshape(-1)).reshape(-1)
    idx_k = torch.nonzero(mk.reshape(-1)).reshape(-1)
    layout = _layout(cu_q, cu_k, int(cu_q[-1]), int(cu_k[-1]), int(lq.max()), int(lk.max()), causal, window, device)
    return _Geometry(idx_q.to(device), idx_k.to(device), layout)


def _from_positions(position_ids: Tensor, b: int, s: int, causal: bool, window, device) -> _Geometry:
    pos = position_ids.detach()
    if pos.dim() == 1:
        pos = pos.unsqueeze(0)
    if pos.dim() != 2 or pos.shape[-1] != s or pos.shape[0] not in (1, b):
        raise ValueError(f"attn_implementation={NAME!r}: position_ids must have shape ({b}, {s}) or (1, {s}) to "
                         f"detect packed sequences, got {tuple(position_ids.shape)}")
    pos = pos.to("cpu").expand(b, s)
    start = pos == pos.min()
    start[:, 0] = True  # rows never attend to each other
    starts = torch.nonzero(start.reshape(-1)).reshape(-1).to(torch.int32)
    cu = torch.cat([starts, torch.tensor([b * s], dtype=torch.int32)])
    max_len = int((cu[1:] - cu[:-1]).max())
    return _Geometry(None, None, _layout(cu, cu, b * s, b * s, max_len, max_len, causal, window, device))


def _from_cu(cu_q: Tensor, cu_k: Tensor, max_q, max_k, total_q: int, total_k: int, causal: bool, window,
             device) -> _Geometry:
    max_q, max_k = int(max_q), int(max_k)
    for name, cu, total, mx in (("cu_seq_lens_q", cu_q, total_q, max_q), ("cu_seq_lens_k", cu_k, total_k, max_k)):
        if not isinstance(cu, Tensor) or cu.dim() != 1 or cu.dtype.is_floating_point:
            raise ValueError(f"{name} must be a 1-D integer tensor")
        if cu.device.type == "cpu":  # device tensors are not read (no synchronisation)
            check_cu_host(name, cu.tolist(), total, mx, name.replace("cu_seq_lens", "max_length"))
    cu_q = cu_q.to(device=device, dtype=torch.int32)
    cu_k = cu_k.to(device=device, dtype=torch.int32)
    return _Geometry(None, None, _layout(cu_q, cu_k, total_q, total_k, max_q, max_k, causal, window, device))


def _rows(b: int, q_len: int, kv_len: int, causal: bool, window, device) -> _Geometry:
    """One sequence per row (no padding, no packing): built on the device, no host synchronisation."""
    seq = torch.arange(b + 1, dtype=torch.int32, device=device)
    return _Geometry(None, None, _layout(seq * q_len, seq * kv_len, b * q_len, b * kv_len, q_len, kv_len, causal,
                                         window, device))


# --------------------------------------------------------------------------------------------------
# The attention function
# --------------------------------------------------------------------------------------------------


def _unsupported(what: str, hint: str):
    return NotImplementedError(f"attn_implementation={NAME!r}: {what} is not supported; {hint}")


def unigendet_attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                                attention_mask: Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                                sliding_window: int | None = None, softcap: float | None = None,
                                is_causal: bool | None = None, s_aux: Tensor | None = None,
                                **kwargs) -> tuple[Tensor, None]:
    """``AttentionInterface`` entry.

    Args:
        module: the calling attention module (``is_causal`` is read from it unless given).
        query: (batch, heads, q_len, head_dim); key, value: (batch, kv_heads, kv_len, head_dim).
        attention_mask: what :func:`unigendet_mask` returned: a 2-D padding mask or None.
        scaling: softmax scale (default ``1 / sqrt(head_dim)``).
        sliding_window: causal window size in tokens (query q sees keys ``(q - sliding_window, q]``).
        kwargs: ``position_ids`` (packed sequences), ``cu_seq_lens_q/k`` and ``max_length_q/k``.

    Returns:
        ``(attn_output (batch, q_len, heads, head_dim), None)``.
    """
    if dropout:
        raise _unsupported(f"attention dropout (dropout={dropout})",
                           "set config.attention_dropout = 0.0 or call model.eval()")
    if softcap:
        raise _unsupported(f"logit soft-capping (softcap={softcap})", "use 'sdpa' or 'eager' for this model")
    if s_aux is not None:
        raise _unsupported("attention sinks (s_aux)", "use 'sdpa' or 'eager' for this model")
    if kwargs.get("block_table") is not None:
        raise _unsupported("paged attention (block_table)", "use a non-paged cache")
    if kwargs.get("output_attentions"):
        warnings.warn(f"attn_implementation={NAME!r} does not return attention weights (output_attentions=True)",
                      stacklevel=2)
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    window = None
    if sliding_window is not None:
        if not causal:
            raise _unsupported("bidirectional sliding windows", "use 'sdpa' for this model")
        if sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
        window = (int(sliding_window) - 1, 0)

    b, h, q_len, d = query.shape
    kv_len = key.shape[2]
    dv = value.shape[-1]
    scale = float(scaling) if scaling is not None else d**-0.5
    device = query.device

    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(f"attn_implementation={NAME!r} expects a 2-D padding mask (batch, kv_len), got a "
                             f"{attention_mask.dim()}-D mask of shape {tuple(attention_mask.shape)}; custom 4-D "
                             "masks are not supported (pass padding as a 2-D mask, packing as position_ids)")
        if kv_len > attention_mask.shape[1]:  # a static cache longer than the tokens seen so far
            key, value = key[:, :, :attention_mask.shape[1]], value[:, :, :attention_mask.shape[1]]
            kv_len = key.shape[2]
        elif kv_len < attention_mask.shape[1]:
            attention_mask = attention_mask[:, -kv_len:]
        geo = _CACHE.get((attention_mask,), ("mask", b, q_len, kv_len, causal, window, device),
                         lambda: _from_padding(attention_mask, b, q_len, kv_len, causal, window, device))
    elif all(kwargs.get(n) is not None for n in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")):
        cu_q, cu_k = kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"]
        geo = _CACHE.get((cu_q, cu_k), ("cu", b, q_len, kv_len, causal, window, device),
                         lambda: _from_cu(cu_q, cu_k, kwargs["max_length_q"], kwargs["max_length_k"], b * q_len,
                                          b * kv_len, causal, window, device))
    elif kwargs.get("position_ids") is not None and q_len == kv_len and q_len > 1:
        pos = kwargs["position_ids"]
        geo = _CACHE.get((pos,), ("pos", b, q_len, causal, window, device),
                         lambda: _from_positions(pos, b, q_len, causal, window, device))
    else:
        geo = _rows(b, q_len, kv_len, causal, window, device)

    # (batch, heads, len, dim) -> packed (tokens, heads, dim)
    q = query.transpose(1, 2).reshape(b * q_len, h, d)
    k = key.transpose(1, 2).reshape(b * kv_len, key.shape[1], d)
    v = value.transpose(1, 2).reshape(b * kv_len, value.shape[1], dv)
    if dv < d:  # e.g. MLA: pad the values (zero columns give zero outputs), crop below
        v = torch.nn.functional.pad(v, (0, d - dv))
    elif dv > d:  # pad queries and keys: zero columns leave the scores unchanged
        q, k = torch.nn.functional.pad(q, (0, dv - d)), torch.nn.functional.pad(k, (0, dv - d))
    if geo.idx_q is not None:
        q = q.index_select(0, geo.idx_q)
    if geo.idx_k is not None:
        k, v = k.index_select(0, geo.idx_k), v.index_select(0, geo.idx_k)
    out = packed_attention(q, k, v, geo.layout, scale)
    if geo.idx_q is not None:
        out = out.new_zeros(b * q_len, h, out.shape[-1]).index_copy(0, geo.idx_q, out)
    out = out.view(b, q_len, h, out.shape[-1])
    if out.shape[-1] != dv:
        out = out[..., :dv]
    return out.contiguous(), None


def register() -> str:
    """Register ``attn_implementation="unigendet"`` (attention and mask functions); idempotent. Returns the name."""
    if AttentionInterface().get(NAME) is not unigendet_attention_forward:
        AttentionInterface.register(NAME, unigendet_attention_forward)
    if AttentionMaskInterface().get(NAME) is not unigendet_mask:
        AttentionMaskInterface.register(NAME, unigendet_mask)
    return NAME


register()
