"""A literal, slow re-statement of BAGEL's training-time decoder, used to check the fast path.

It works in BAGEL's original token order with boolean expert masks: every layer gathers each expert's tokens,
applies that expert's weights and scatters back into zero tensors (``PackedAttentionMoT.forward_train`` /
``Qwen2MoTDecoderLayer.forward_train``), and attention is a per-sample SDPA over a dense mask built directly from
the split list (``data_utils.prepare_attention_mask_per_sample``). Nothing here uses the layout machinery.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .qwen2_mot import MoTDecoderLayer, Qwen2MoTModel, apply_rope, rope_cos_sin

__all__ = ["bagel_dense_mask", "dense_attention", "reference_decoder"]


def bagel_dense_mask(splits: list[list[tuple[int, str]]]) -> list[torch.Tensor]:
    """Per-sample bool masks (L, L) in BAGEL order: earlier splits + own split (causal or full), noise hidden."""
    masks = []
    for sample in splits:
        n = sum(length for length, _ in sample)
        m = torch.zeros(n, n, dtype=torch.bool)
        pos = 0
        for length, mode in sample:
            e = pos + length
            m[pos:e, :pos] = True
            if mode == "causal":
                m[pos:e, pos:e] = torch.ones(length, length, dtype=torch.bool).tril()
            else:
                m[pos:e, pos:e] = True
            pos = e
        pos = 0
        for length, mode in sample:
            e = pos + length
            if mode == "noise":
                keep = m[pos:e, pos:e].clone()
                m[:, pos:e] = False
                m[pos:e, pos:e] = keep
            pos = e
        masks.append(m)
    return masks


def dense_attention(q, k, v, masks: list[torch.Tensor]) -> torch.Tensor:
    """Per-sample SDPA with explicit masks; GQA by repeating K/V (as the reference code does)."""
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    outs, pos = [], 0
    for m in masks:
        n = m.shape[0]
        qs, ks, vs = (x[pos : pos + n].transpose(0, 1) for x in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=m.to(q.device))
        outs.append(o.transpose(0, 1))
        pos += n
    return torch.cat(outs)


def _layer(layer: MoTDecoderLayer, h, und, gen, cos, sin, attn):
    a = layer.self_attn
    s = h.shape[0]

    def merge(a, b, shape):
        # scatter both experts' outputs back into token order (in their common dtype: under autocast a matmul
        # gives bf16 and a norm with fp32 weights fp32)
        y = a.new_zeros(shape, dtype=torch.promote_types(a.dtype, b.dtype))
        y[und] = a
        y[gen] = b
        return y

    def route(fn_und, fn_gen, x, width):
        return merge(fn_und(x[und]), fn_gen(x[gen]), (s, width))

    x = route(layer.input_layernorm, layer.input_layernorm_moe_gen, h, h.shape[1])
    q = route(a.q_proj, a.q_proj_moe_gen, x, a.num_heads * a.head_dim).view(s, a.num_heads, a.head_dim)
    k = route(a.k_proj, a.k_proj_moe_gen, x, a.num_kv_heads * a.head_dim).view(s, a.num_kv_heads, a.head_dim)
    v = route(a.v_proj, a.v_proj_moe_gen, x, a.num_kv_heads * a.head_dim).view(s, a.num_kv_heads, a.head_dim)
    qn = merge(a.q_norm(q[und]), a.q_norm_moe_gen(q[gen]), q.shape)
    kn = merge(a.k_norm(k[und]), a.k_norm_moe_gen(k[gen]), k.shape)
    o = attn(apply_rope(qn, cos, sin), apply_rope(kn, cos, sin), v).reshape(s, -1)
    h = h + route(a.o_proj, a.o_proj_moe_gen, o, h.shape[1])
    x = route(layer.post_attention_layernorm, layer.post_attention_layernorm_moe_gen, h, h.shape[1])
    return h + route(layer.mlp, layer.mlp_moe_gen, x, h.shape[1])


def reference_decoder(
    model: Qwen2MoTModel,
    h_und: torch.Tensor,
    h_gen: torch.Tensor,
    batch,
    num_layers: int | None = None,
    final_norm: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the decoder BAGEL's way on the batch's embeddings; returns ``(und, gen)`` states (final-normed).

    The inputs are in the batch's expert-contiguous order; they are permuted back to BAGEL order with
    ``batch.order``, processed with gather/scatter routing and dense masks (rebuilt on every call, as the
    reference does), and permuted forward again. Differentiable (the training-step benchmark times it).
    """
    order = batch.order.to(h_und.device)
    s = order.shape[0]
    nu = h_und.shape[0]
    h = torch.empty(s, h_und.shape[1], dtype=h_und.dtype, device=h_und.device)
    h = h.index_put((order,), torch.cat([h_und, h_gen]))
    is_gen = torch.zeros(s, dtype=torch.bool, device=h.device)
    is_gen[order[nu:]] = True
    und, gen = (~is_gen).nonzero().squeeze(1), is_gen.nonzero().squeeze(1)
    pos = torch.empty_like(batch.position_ids)
    pos[order] = batch.position_ids
    cfg = model.config
    cos, sin = rope_cos_sin(pos.to(h.device), cfg.head_dim, cfg.rope_theta, h.dtype)
    masks = bagel_dense_mask(batch.splits)

    def attn(q, k, v):
        return dense_attention(q, k, v, masks)

    n = len(model.layers) if num_layers is None else num_layers
    for layer in model.layers[:n]:
        h = _layer(layer, h, und, gen, cos, sin, attn)
    if final_norm:
        out = torch.zeros_like(h)
        out = out.index_put((und,), model.norm(h[und])).index_put((gen,), model.norm_moe_gen(h[gen]))
    else:
        out = h
    out = out[order]
    return out[:nu], out[nu:]
