"""Qwen2 decoder with BAGEL's Mixture-of-Transformers (MoT) experts.

Every decoder layer holds two full copies of the per-token weights: the understanding expert (text and ViT
tokens; BAGEL's plain names) and the generation expert (VAE-latent tokens; the ``*_moe_gen`` names). Embeddings,
``lm_head``, RoPE and the attention itself (one softmax over all tokens of a sample) are shared.

The fast path relies on *expert-contiguous* packing: the packed sequence is ordered ``[und | gen]`` so each expert
projection is one dense matmul over a slice and the residual stream is carried as two tensors ``(h_und, h_gen)``.
Only q/k/v are concatenated (once per layer) for the shared attention call. Module and parameter names follow
BAGEL exactly (``language_model.model.layers.N.self_attn.q_proj_moe_gen.weight`` ...), so BAGEL checkpoints load
without renaming.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .config import LLMConfig

__all__ = [
    "RMSNorm",
    "Qwen2MLP",
    "MoTAttention",
    "MoTDecoderLayer",
    "Qwen2MoTModel",
    "Qwen2MoTForCausalLM",
    "rope_cos_sin",
    "apply_rope",
    "AttnFn",
]

# attn_fn(q (S, H, D), k (S, Hkv, D), v (S, Hkv, D)) -> (S, H, D): the shared attention over the whole pack.
AttnFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class RMSNorm(nn.Module):
    """Qwen2 RMSNorm: normalise in fp32, cast back, then scale (same op order as Hugging Face)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D rotate-half RoPE tables for ``position_ids`` (S,) -> cos, sin (S, head_dim) in ``dtype``.

    Computed in fp32 like Hugging Face's Qwen2 rotary embedding, then cast to the activation dtype.
    """
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float() / head_dim)
    )
    freqs = position_ids.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (S, H, D), cos/sin (S, D) -> x rotated (rotate-half convention)."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


class Qwen2MLP(nn.Module):
    """SwiGLU MLP without biases: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoTAttention(nn.Module):
    """Self-attention projections of both experts (``self_attn`` in BAGEL's key space)."""

    def __init__(self, config: LLMConfig):
        super().__init__()
        h, nh, nkv, d = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = nh, nkv, d
        self.q_proj = nn.Linear(h, nh * d, bias=True)
        self.k_proj = nn.Linear(h, nkv * d, bias=True)
        self.v_proj = nn.Linear(h, nkv * d, bias=True)
        self.o_proj = nn.Linear(nh * d, h, bias=False)
        self.q_proj_moe_gen = nn.Linear(h, nh * d, bias=True)
        self.k_proj_moe_gen = nn.Linear(h, nkv * d, bias=True)
        self.v_proj_moe_gen = nn.Linear(h, nkv * d, bias=True)
        self.o_proj_moe_gen = nn.Linear(nh * d, h, bias=False)
        if not config.qk_norm:
            raise ValueError("qk_norm=False is not supported (BAGEL-7B-MoT uses QK-norm)")
        self.q_norm = RMSNorm(d, config.rms_norm_eps)
        self.k_norm = RMSNorm(d, config.rms_norm_eps)
        self.q_norm_moe_gen = RMSNorm(d, config.rms_norm_eps)
        self.k_norm_moe_gen = RMSNorm(d, config.rms_norm_eps)

    def qkv(self, x: torch.Tensor, gen: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One expert's q (n, H, D), k, v (n, Hkv, D); QK-norm applied (before RoPE)."""
        n = x.shape[0]
        sfx = "_moe_gen" if gen else ""
        q = getattr(self, "q_proj" + sfx)(x).view(n, self.num_heads, self.head_dim)
        k = getattr(self, "k_proj" + sfx)(x).view(n, self.num_kv_heads, self.head_dim)
        v = getattr(self, "v_proj" + sfx)(x).view(n, self.num_kv_heads, self.head_dim)
        q = getattr(self, "q_norm" + sfx)(q)
        k = getattr(self, "k_norm" + sfx)(k)
        return q, k, v


class MoTDecoderLayer(nn.Module):
    """One Qwen2 MoT decoder layer (pre-norm attention and SwiGLU MLP, per-expert weights)."""

    def __init__(self, config: LLMConfig):
        super().__init__()
        self.self_attn = MoTAttention(config)
        self.mlp = Qwen2MLP(config)
        self.mlp_moe_gen = Qwen2MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.input_layernorm_moe_gen = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm_moe_gen = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        h_und: torch.Tensor,
        h_gen: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_fn: AttnFn,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert-contiguous forward.

        Args:
            h_und: (n_und, hidden) residual stream of the understanding tokens (positions ``[0, n_und)``).
            h_gen: (n_gen, hidden) residual stream of the generation tokens (positions ``[n_und, S)``).
            cos, sin: (S, head_dim) RoPE tables for the whole pack.
            attn_fn: shared attention over the pack, ``(q, k, v) -> out``.
        Returns:
            the updated ``(h_und, h_gen)``.
        """
        a = self.self_attn
        n_und = h_und.shape[0]
        qu, ku, vu = a.qkv(self.input_layernorm(h_und), gen=False)
        qg, kg, vg = a.qkv(self.input_layernorm_moe_gen(h_gen), gen=True)
        q = apply_rope(torch.cat((qu, qg)), cos, sin)
        k = apply_rope(torch.cat((ku, kg)), cos, sin)
        v = torch.cat((vu, vg))
        o = attn_fn(q, k, v).flatten(1)
        h_und = h_und + a.o_proj(o[:n_und])
        h_gen = h_gen + a.o_proj_moe_gen(o[n_und:])
        h_und = h_und + self.mlp(self.post_attention_layernorm(h_und))
        h_gen = h_gen + self.mlp_moe_gen(self.post_attention_layernorm_moe_gen(h_gen))
        return h_und, h_gen


class Qwen2MoTModel(nn.Module):
    """``language_model.model``: embeddings, MoT layers and one final norm per expert."""

    def __init__(self, config: LLMConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MoTDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.norm_moe_gen = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # Activation checkpointing of whole layers (non-reentrant), as the reference trains.
        self.gradient_checkpointing = False

    def forward(
        self,
        h_und: torch.Tensor,
        h_gen: torch.Tensor,
        position_ids: torch.Tensor,
        attn_fn: AttnFn,
        num_layers: int | None = None,
        capture_layer: int | None = None,
        final_norm: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Run the decoder on an expert-contiguous pack.

        Args:
            h_und: (n_und, hidden) input embeddings of the understanding tokens.
            h_gen: (n_gen, hidden) input embeddings of the generation tokens.
            position_ids: (n_und + n_gen,) int64 1-D RoPE positions in pack order.
            attn_fn: shared attention ``(q, k, v) -> out`` for this pack.
            num_layers: run only the first ``num_layers`` layers (default: all).
            capture_layer: also return the raw residual stream after this many layers (1-based), un-normalised.
            final_norm: apply ``norm`` / ``norm_moe_gen`` to the outputs.
        Returns:
            dict with ``und`` (n_und, hidden), ``gen`` (n_gen, hidden) and, with ``capture_layer``,
            ``captured_und`` / ``captured_gen``.
        """
        cfg = self.config
        n = len(self.layers) if num_layers is None else num_layers
        if not 0 <= n <= len(self.layers):
            raise ValueError(f"num_layers must be in [0, {len(self.layers)}], got {num_layers}")
        if position_ids.shape != (h_und.shape[0] + h_gen.shape[0],):
            raise ValueError(
                f"position_ids must have shape ({h_und.shape[0] + h_gen.shape[0]},), got {tuple(position_ids.shape)}"
            )
        cos, sin = rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, h_und.dtype)
        out: dict[str, torch.Tensor] = {}
        for i in range(n):
            layer = self.layers[i]
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h_und, h_gen = torch.utils.checkpoint.checkpoint(
                    layer, h_und, h_gen, cos, sin, attn_fn, use_reentrant=False
                )
            else:
                h_und, h_gen = layer(h_und, h_gen, cos, sin, attn_fn)
            if capture_layer is not None and i + 1 == capture_layer:
                out["captured_und"], out["captured_gen"] = h_und, h_gen
        if final_norm:
            h_und, h_gen = self.norm(h_und), self.norm_moe_gen(h_gen)
        out["und"], out["gen"] = h_und, h_gen
        return out


class Qwen2MoTForCausalLM(nn.Module):
    """``language_model``: the decoder (``model``) plus the untied ``lm_head``."""

    def __init__(self, config: LLMConfig):
        super().__init__()
        self.config = config
        self.model = Qwen2MoTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
