"""Image autoencoders: the FLUX AE (through diffusers ``AutoencoderKL``) and parameter-free pixel-space stand-ins.

Both expose ``encode(images (B, 3, H, W) in [-1, 1], generator=None) -> (B, z, H/d, W/d)`` already scaled
(``scale * (z - shift)``) and ``decode(latents) -> images``. Neither is part of the model's checkpoint key space:
the FLUX weights live in their own file (``ae.safetensors``) in FLUX's original key format, converted on load by
:func:`flux_ae_to_diffusers` (inverse: :func:`diffusers_to_flux_ae`).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from .config import VAEConfig

__all__ = [
    "DCTVAE",
    "FluxVAE",
    "SpaceToDepthVAE",
    "build_vae",
    "flux_ae_to_diffusers",
    "flux_encoder_flops",
    "diffusers_to_flux_ae",
]


class SpaceToDepthVAE(nn.Module):
    """Exactly invertible, parameter-free stand-in: latent = pixel_unshuffle(image, d) (3*d*d channels).

    Used by the ``tiny`` preset so tests exercise the real latent plumbing (patchify, flow targets, decode)
    without VAE weights; it is not a learned autoencoder and makes no attempt to compress.
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        z = F.pixel_unshuffle(images, self.config.downsample)
        return self.config.scale_factor * (z - self.config.shift_factor)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents / self.config.scale_factor + self.config.shift_factor
        return F.pixel_shuffle(z, self.config.downsample)


def dct_basis(block: int, keep: int) -> torch.Tensor:
    """The ``keep`` x ``keep`` lowest-frequency 2-D DCT-II basis images of a ``block`` x ``block`` block.

    Returns ``(keep * keep, block, block)`` float64, orthonormal (each image has unit norm, pairwise orthogonal).
    """
    n = torch.arange(block, dtype=torch.float64)
    k = torch.arange(keep, dtype=torch.float64)
    c = torch.cos(torch.pi * (n[None, :] + 0.5) * k[:, None] / block)  # (keep, block)
    c = c * torch.where(k == 0, (1.0 / block) ** 0.5, (2.0 / block) ** 0.5)[:, None]
    return torch.einsum("ux,vy->uvxy", c, c).reshape(keep * keep, block, block)


class DCTVAE(nn.Module):
    """Parameter-free low-pass autoencoder: each ``d`` x ``d`` block of each colour channel is kept as its
    ``k`` x ``k`` lowest-frequency DCT-II coefficients (``z_channels = 3 * k * k``, ``d = downsample``).

    Frequency ``(u, v)`` is stored as its orthonormal coefficient times ``1 / d`` for ``(0, 0)`` (the block mean)
    and ``u + v`` otherwise, so that every latent channel has a comparable spread (on the scenes of the embedded
    data set: standard deviations 0.35-0.8 before ``scale_factor``); without it the high frequencies would be
    tiny next to the unit noise of the flow, and any error the model makes there would show as block noise.

    ``decode(encode(x))`` is the orthogonal projection of ``x`` onto those frequencies (a low-pass image, exact
    for images already in that subspace), and ``encode(decode(z)) == z``. It plays the FLUX AE's part for the
    ``tiny`` preset: a latent much smaller than the pixels (12 numbers per 8 x 8 x 3 block at k = 2), so that a model
    whose hidden size is below the pixel dimension of a token can still carry the noise through the flow. Latent
    channels are ordered colour-major, then frequency (row-major over ``k`` x ``k``).
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        keep = int(round((config.z_channels // 3) ** 0.5))
        self.keep = keep
        # Not a buffer: a model built on the meta device and loaded (or copied with ``to_empty``) must not lose it.
        self._basis: dict[torch.device, torch.Tensor] = {}

    def basis(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(analysis, synthesis)`` ``(k*k, d, d)``: encode with the first, decode with the second."""
        if device not in self._basis:
            d, k = self.config.downsample, self.keep
            b = dct_basis(d, k)
            u, v = torch.meshgrid(torch.arange(k), torch.arange(k), indexing="ij")
            w = (u + v).double().reshape(-1)
            w[0] = 1.0 / d
            self._basis[device] = ((b * w[:, None, None]).float().to(device), (b / w[:, None, None]).float().to(device))
        return self._basis[device]

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        b, c, h, w = images.shape
        d = self.config.downsample
        blocks = images.float().reshape(b, c, h // d, d, w // d, d)
        z = torch.einsum("bcyixj,kij->bckyx", blocks, self.basis(images.device)[0]).reshape(b, -1, h // d, w // d)
        return (self.config.scale_factor * (z - self.config.shift_factor)).to(images.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        b, _, hh, ww = latents.shape
        d = self.config.downsample
        z = (latents.float() / self.config.scale_factor + self.config.shift_factor).reshape(b, 3, -1, hh, ww)
        blocks = torch.einsum("bckyx,kij->bcyixj", z, self.basis(latents.device)[1])
        return blocks.reshape(b, 3, hh * d, ww * d).to(latents.dtype)


class FluxVAE(nn.Module):
    """FLUX AE (ch 128, mult 1-2-4-4, 2 res blocks, z 16, no quant convs) as a diffusers ``AutoencoderKL``.

    ``encode`` samples the diagonal Gaussian posterior when ``config.sample_posterior`` (as BAGEL trains) and
    returns ``scale_factor * (z - shift_factor)``; ``decode`` inverts that scaling first.
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        from diffusers import AutoencoderKL

        n = len(config.block_out_channels)
        self.config = config
        self.model = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=tuple(config.block_out_channels),
            layers_per_block=config.layers_per_block,
            act_fn="silu",
            latent_channels=config.z_channels,
            norm_num_groups=config.norm_num_groups,
            scaling_factor=config.scale_factor,
            shift_factor=config.shift_factor,
            use_quant_conv=False,
            use_post_quant_conv=False,
            mid_block_add_attention=True,
        )

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        dist = self.model.encode(images.to(self.model.dtype)).latent_dist
        z = dist.sample(generator) if self.config.sample_posterior else dist.mode()
        return self.config.scale_factor * (z - self.config.shift_factor)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents / self.config.scale_factor + self.config.shift_factor
        return self.model.decode(z.to(self.model.dtype)).sample


def flux_encoder_flops(config: VAEConfig, height: int, width: int) -> float:
    """FLOPs of one FLUX AE encoder pass over a ``height`` x ``width`` image, counted analytically (no diffusers).

    The count is what ``torch.utils.flop_counter`` reports for diffusers' ``AutoencoderKL.encode`` (convolutions,
    the mid-block attention's projections and its two matmuls; normalisations and activations count zero):
    ``conv_in``; per level ``layers_per_block`` ResNet blocks (two 3x3 convolutions, a 1x1 shortcut when the
    width changes) and a stride-2 3x3 downsampling convolution except at the last level; the mid block (ResNet,
    single-head self-attention over the latent grid, ResNet); ``conv_out`` to ``2 * z_channels``.
    """
    if config.kind != "flux":
        return 0.0

    def conv(cin, cout, k, h, w):
        return 2.0 * cin * cout * k * k * h * w

    chans = config.block_out_channels
    h, w = height, width
    flops = conv(3, chans[0], 3, h, w)
    cin = chans[0]
    for level, cout in enumerate(chans):
        for j in range(config.layers_per_block):
            c0 = cin if j == 0 else cout
            flops += conv(c0, cout, 3, h, w) + conv(cout, cout, 3, h, w)
            if c0 != cout:
                flops += conv(c0, cout, 1, h, w)
        cin = cout
        if level < len(chans) - 1:
            h, w = h // 2, w // 2  # diffusers pads (0, 1, 0, 1), then a 3x3 convolution with stride 2
            flops += conv(cout, cout, 3, h, w)
    c, n = chans[-1], h * w
    resnet = 2 * conv(c, c, 3, h, w)
    attention = 4 * 2.0 * n * c * c + 2 * 2.0 * n * n * c  # q, k, v, out projections; QK^T and PV
    flops += 2 * resnet + attention
    flops += conv(c, 2 * config.z_channels, 3, h, w)
    return flops


def build_vae(config: VAEConfig) -> nn.Module:
    """The autoencoder named by ``config.kind``; its parameters are frozen (never trained here)."""
    vae = {"flux": FluxVAE, "dct": DCTVAE, "space_to_depth": SpaceToDepthVAE}[config.kind](config)
    vae.requires_grad_(False)
    return vae


# --------------------------------------------------------------------------------------------------
# FLUX original <-> diffusers key conversion
# --------------------------------------------------------------------------------------------------

_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTN_INV = {v: k for k, v in _ATTN.items()}
_RESNET_INV = {v: k for k, v in _RESNET.items()}


def _mid_to_diffusers(rest: str) -> str:
    m = re.fullmatch(r"block_([12])\.(\w+)\.(weight|bias)", rest)
    if m:
        return f"mid_block.resnets.{int(m[1]) - 1}.{_RESNET[m[2]]}.{m[3]}"
    m = re.fullmatch(r"attn_1\.(\w+)\.(weight|bias)", rest)
    if m:
        return f"mid_block.attentions.0.{_ATTN[m[1]]}.{m[2]}"
    raise KeyError(rest)


def _one_to_diffusers(key: str, num_levels: int) -> str:
    part, rest = key.split(".", 1)
    if part not in ("encoder", "decoder"):
        raise KeyError(key)
    simple = {"conv_in": "conv_in", "conv_out": "conv_out", "norm_out": "conv_norm_out"}
    head, tail = rest.split(".", 1)
    if head in simple:
        return f"{part}.{simple[head]}.{tail}"
    if head == "mid":
        return f"{part}.{_mid_to_diffusers(tail)}"
    if part == "encoder" and head == "down":
        m = re.fullmatch(r"(\d+)\.block\.(\d+)\.(\w+)\.(weight|bias)", tail)
        if m:
            return f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{_RESNET[m[3]]}.{m[4]}"
        m = re.fullmatch(r"(\d+)\.downsample\.conv\.(weight|bias)", tail)
        if m:
            return f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"
    if part == "decoder" and head == "up":
        # FLUX runs decoder.up in reverse order (up.{n-1} first); diffusers stores up_blocks in execution order.
        m = re.fullmatch(r"(\d+)\.block\.(\d+)\.(\w+)\.(weight|bias)", tail)
        if m:
            return f"decoder.up_blocks.{num_levels - 1 - int(m[1])}.resnets.{m[2]}.{_RESNET[m[3]]}.{m[4]}"
        m = re.fullmatch(r"(\d+)\.upsample\.conv\.(weight|bias)", tail)
        if m:
            return f"decoder.up_blocks.{num_levels - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"
    raise KeyError(key)


def _num_levels(keys, prefix: str) -> int:
    levels = {int(m[1]) for k in keys if (m := re.match(prefix + r"(\d+)\.", k))}
    if not levels:
        raise ValueError(f"no '{prefix}N.' keys found; not a FLUX/diffusers AE state dict")
    return max(levels) + 1


def flux_ae_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert an original FLUX ``ae.safetensors`` state dict to diffusers ``AutoencoderKL`` names.

    The mid-block attention's 1x1 convolutions (q, k, v, proj_out) become Linear weights (C, C).
    Raises ``KeyError`` naming any key that does not belong to the FLUX AE format.
    """
    n = _num_levels(state, r"encoder\.down\.")
    out = {}
    for key, value in state.items():
        new = _one_to_diffusers(key, n)
        if ".attentions.0." in new and new.endswith(".weight") and value.dim() == 4:
            value = value.reshape(value.shape[0], value.shape[1])
        out[new] = value
    return out


def diffusers_to_flux_ae(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`flux_ae_to_diffusers` (diffusers ``AutoencoderKL`` names -> FLUX format)."""
    n = _num_levels(state, r"encoder\.down_blocks\.")
    out = {}
    for key, value in state.items():
        part, rest = key.split(".", 1)
        simple = {"conv_in": "conv_in", "conv_out": "conv_out", "conv_norm_out": "norm_out"}
        head, tail = rest.split(".", 1)
        if head in simple:
            new = f"{part}.{simple[head]}.{tail}"
        elif m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(\w+)\.(weight|bias)", rest):
            new = f"{part}.mid.block_{int(m[1]) + 1}.{_RESNET_INV[m[2]]}.{m[3]}"
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(\w+(?:\.0)?)\.(weight|bias)", rest):
            new = f"{part}.mid.attn_1.{_ATTN_INV[m[1]]}.{m[2]}"
            if m[1] != "group_norm" and m[2] == "weight":
                value = value.reshape(*value.shape, 1, 1)
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(weight|bias)", rest):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{_RESNET_INV[m[3]]}.{m[4]}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)", rest):
            new = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(weight|bias)", rest):
            new = f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}.{_RESNET_INV[m[3]]}.{m[4]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)", rest):
            new = f"decoder.up.{n - 1 - int(m[1])}.upsample.conv.{m[2]}"
        else:
            raise KeyError(key)
        out[new] = value
    return out
