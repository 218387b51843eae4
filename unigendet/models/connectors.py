"""Connectors between the encoders and the LLM, the heads, and latent patchify helpers (BAGEL names)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MLPconnector",
    "TimestepEmbedder",
    "PositionEmbedding",
    "sincos_2d_table",
    "timestep_embedding",
    "shift_timesteps",
    "latent_patchify",
    "latent_unpatchify",
    "fake_cls_head",
    "diga_mlp",
]


class MLPconnector(nn.Module):
    """ViT -> LLM connector: Linear, gelu (tanh approximation), Linear (keys ``connector.fc1/fc2``)."""

    def __init__(self, in_dim: int, out_dim: int, act: str = "gelu_pytorch_tanh"):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)
        self.approximate = "tanh" if act == "gelu_pytorch_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """DiT sinusoidal embedding ``[cos(t w), sin(t w)]``, w_k = max_period^(-k/half); t (N,) -> (N, dim) fp32.

    BAGEL feeds t in [0, 1] directly (no x1000 scaling).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """``time_embedder``: sinusoid(256) of ``scale * t`` -> Linear -> SiLU -> Linear (keys ``mlp.0``, ``mlp.2``).

    ``scale`` 1 is BAGEL's (t in [0, 1] as it is); see ``UniGenDetConfig.timestep_embed_scale``.
    """

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, scale: float = 1.0):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.scale = float(scale)
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t * self.scale if self.scale != 1.0 else t, self.frequency_embedding_size)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


def sincos_2d_table(grid_size: int, dim: int) -> torch.Tensor:
    """Fixed MAE-style 2-D sin-cos table (grid_size**2, dim), row index ``row * grid_size + col``.

    Each row is ``[sin(col w), cos(col w), sin(row w), cos(row w)]`` (each dim/4 wide), w_k = 10000^(-k/(dim/4)).
    Computed in float64 and rounded to float32, as BAGEL does with numpy.
    """
    if dim % 4:
        raise ValueError(f"dim must be a multiple of 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    pos = torch.arange(grid_size, dtype=torch.float64)
    ang = pos[:, None] * omega[None]  # (G, quarter)
    one_d = torch.cat([ang.sin(), ang.cos()], dim=1)  # (G, dim/2)
    col = one_d[None, :, :].expand(grid_size, grid_size, dim // 2)
    row = one_d[:, None, :].expand(grid_size, grid_size, dim // 2)
    return torch.cat([col, row], dim=-1).reshape(grid_size * grid_size, dim).float()


class PositionEmbedding(nn.Module):
    """Fixed 2-D sin-cos table (key ``pos_embed``), indexed by flattened position id.

    Stored as a persistent buffer so the key exists in saved checkpoints (as in BAGEL), but never trained;
    loaders regenerate it instead of trusting stored values.
    """

    def __init__(self, max_num_patch_per_side: int, hidden_size: int):
        super().__init__()
        self.grid, self.hidden = max_num_patch_per_side, hidden_size
        self.register_buffer("pos_embed", torch.empty(max_num_patch_per_side**2, hidden_size), persistent=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.pos_embed.device.type != "meta":
            with torch.no_grad():
                self.pos_embed.copy_(sincos_2d_table(self.grid, self.hidden))

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return self.pos_embed[position_ids]


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Timestep shift ``s t / (1 + (s - 1) t)`` (identity for s = 1)."""
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def latent_patchify(latent: torch.Tensor, p: int) -> torch.Tensor:
    """(C, H, W) latent -> (H/p * W/p, p*p*C) tokens, row-major, ``chpwq -> hwpqc`` (channel fastest)."""
    c, hh, ww = latent.shape
    if hh % p or ww % p:
        raise ValueError(f"latent spatial size {(hh, ww)} must be a multiple of the patch size {p}")
    h, w = hh // p, ww // p
    x = latent.reshape(c, h, p, w, p).permute(1, 3, 2, 4, 0)
    return x.reshape(h * w, p * p * c)


def latent_unpatchify(tokens: torch.Tensor, h: int, w: int, p: int, c: int) -> torch.Tensor:
    """Inverse of :func:`latent_patchify`: (h*w, p*p*c) -> (c, h*p, w*p)."""
    if tokens.shape != (h * w, p * p * c):
        raise ValueError(f"tokens must be ({h * w}, {p * p * c}), got {tuple(tokens.shape)}")
    x = tokens.reshape(h, w, p, p, c).permute(4, 0, 2, 1, 3)
    return x.reshape(c, h * p, w * p)


def fake_cls_head(hidden_size: int, act: str = "relu") -> nn.Sequential:
    """Real/fake head: LayerNorm, Linear(h, h/4), activation, Linear(h/4, 2) (keys ``fake_cls_head.0/1/3``).

    UniGenDet uses ReLU. ``act="gelu"`` (parameter-free, same keys) avoids the units dying together when the head's
    input barely varies between samples early in training, which stalls small models trained from scratch.
    """
    acts = {"relu": nn.ReLU, "gelu": nn.GELU}
    if act not in acts:
        raise ValueError(f"fake_cls_head activation must be one of {sorted(acts)}, got {act!r}")
    return nn.Sequential(
        nn.LayerNorm(hidden_size), nn.Linear(hidden_size, hidden_size // 4), acts[act](),
        nn.Linear(hidden_size // 4, 2),
    )


def diga_mlp(hidden_size: int, ratio: int = 4) -> nn.Sequential:
    """DIGA projector: Linear(h, r*h), GELU, Linear(r*h, h) (keys ``diga_mlp.0/2``)."""
    return nn.Sequential(
        nn.Linear(hidden_size, ratio * hidden_size), nn.GELU(), nn.Linear(ratio * hidden_size, hidden_size)
    )
