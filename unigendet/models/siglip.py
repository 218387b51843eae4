"""SigLIP so400m NaViT vision tower (BAGEL's ``vit_model``), variable resolution, packed images.

Images arrive as packed patches ``(n_tokens, 3*P*P)`` flattened in (row-in-patch, col-in-patch, channel) order,
which is why the patch embedding is a Linear rather than BAGEL's original Conv2d (BAGEL converts it the same way
and stores the Linear weight in its checkpoints). Position embedding is a learned table indexed by
``row * max_patches_per_side + col``; attention is non-causal within each image (``cu_seqlens``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .config import ViTConfig

__all__ = ["SiglipVisionModel", "VarlenAttnFn", "conv_patch_weight_to_linear", "varlen_attention_of_batch"]

# varlen_attn_fn(q, k, v (T, H, D), cu_seqlens int32 (B+1,), max_seqlen int) -> (T, H, D)
VarlenAttnFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def varlen_attention_of_batch(cu_seqlens: torch.Tensor, max_seqlen: int, total: int) -> VarlenAttnFn:
    """The default attention of a batch of images: one varlen layout built once (no host synchronisation: the
    totals are given) and reused by every layer."""
    from unigendet.ops import AttentionLayout, packed_attention

    layout = AttentionLayout.varlen(cu_seqlens, cu_seqlens, False, total_q=total, total_k=total,
                                    max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen)

    def attn(q, k, v, cu_seqlens, max_seqlen):
        return packed_attention(q, k, v, layout)

    return attn


def conv_patch_weight_to_linear(weight: torch.Tensor) -> torch.Tensor:
    """Conv2d patch weight (out, C, P, P) -> Linear weight (out, P*P*C) in (row, col, channel) pixel order."""
    if weight.dim() != 4:
        raise ValueError(f"weight must be (out, C, P, P), got shape {tuple(weight.shape)}")
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def _act(name: str):
    return (lambda x: F.gelu(x, approximate="tanh")) if name == "gelu_pytorch_tanh" else F.gelu


class SiglipVisionEmbeddings(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.patch_embedding = nn.Linear(config.patch_dim, config.hidden_size, bias=True)
        self.position_embedding = nn.Embedding(config.max_patches_per_side**2, config.hidden_size)

    def forward(self, patches: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.patch_embedding(patches) + self.position_embedding(position_ids)


class SiglipAttention(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        h = config.hidden_size
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.q_proj = nn.Linear(h, h)
        self.k_proj = nn.Linear(h, h)
        self.v_proj = nn.Linear(h, h)
        self.out_proj = nn.Linear(h, h)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, attn_fn: VarlenAttnFn):
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(t, self.num_heads, self.head_dim)
        v = self.v_proj(x).view(t, self.num_heads, self.head_dim)
        return self.out_proj(attn_fn(q, k, v, cu_seqlens, max_seqlen).reshape(t, -1))


class SiglipMLP(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = _act(config.hidden_act)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.self_attn = SiglipAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = SiglipMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x, cu_seqlens, max_seqlen, attn_fn):
        x = x + self.self_attn(self.layer_norm1(x), cu_seqlens, max_seqlen, attn_fn)
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(config) for _ in range(config.num_layers))


class SiglipVisionTransformer(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.embeddings = SiglipVisionEmbeddings(config)
        self.encoder = SiglipEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class SiglipVisionModel(nn.Module):
    """``vit_model``: keys ``vision_model.embeddings.*``, ``vision_model.encoder.layers.N.*``,
    ``vision_model.post_layernorm.*`` (BAGEL's truncated tower: ``config.num_layers`` layers)."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        self.vision_model = SiglipVisionTransformer(config)
        self.gradient_checkpointing = False

    def forward(
        self,
        patches: torch.Tensor,
        position_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        attn_fn: VarlenAttnFn | None = None,
    ) -> torch.Tensor:
        """Encode packed images.

        Args:
            patches: (T, 3*P*P) float pixels in [-1, 1], (row, col, channel) order within each patch.
            position_ids: (T,) int64 ``row * max_patches_per_side + col``.
            cu_seqlens: (n_img + 1,) int32 cumulative token counts per image.
            max_seqlen: host int, the largest image token count.
            attn_fn: varlen attention (default: :func:`varlen_attention_of_batch`, non-causal, one layout per call).
        Returns:
            (T, hidden) post-layernormed features.
        """
        cfg = self.config
        if patches.dim() != 2 or patches.shape[1] != cfg.patch_dim:
            raise ValueError(f"patches must be (T, {cfg.patch_dim}), got {tuple(patches.shape)}")
        if position_ids.shape != patches.shape[:1]:
            raise ValueError(f"position_ids must be ({patches.shape[0]},), got {tuple(position_ids.shape)}")
        attn_fn = attn_fn or varlen_attention_of_batch(cu_seqlens, max_seqlen, patches.shape[0])
        vm = self.vision_model
        x = vm.embeddings(patches.to(vm.embeddings.patch_embedding.weight.dtype), position_ids)
        for layer in vm.encoder.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, cu_seqlens, max_seqlen, attn_fn, use_reentrant=False)
            else:
                x = layer(x, cu_seqlens, max_seqlen, attn_fn)
        return vm.post_layernorm(x)
