"""Image transforms: BAGEL's NaViT resize rule, normalisation to [-1, 1] and ViT patchify.

The resize rule (``MaxLongEdgeMinShortEdgeResize`` in BAGEL) keeps the aspect ratio, bounds the long side by
``max_size`` and the short side from below by ``min_size``, and rounds each side to a multiple of ``stride`` so that
the image tiles exactly into patches (ViT) or latent patches (VAE). Everything here uses PIL and torch only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = [
    "ImageTransform",
    "patchify",
    "pil_to_tensor",
    "resize_tensor",
    "target_size",
    "vae_transform",
    "vit_transform",
]

# BAGEL's default pixel cap: 14 * 14 * 9 * 1024.
DEFAULT_MAX_PIXELS = 14 * 14 * 9 * 1024


def _make_divisible(value: float, stride: int) -> int:
    return max(stride, int(round(value / stride) * stride))


def _apply_scale(width: float, height: float, scale: float, stride: int) -> tuple[int, int]:
    return _make_divisible(round(width * scale), stride), _make_divisible(round(height * scale), stride)


def target_size(
    width: int, height: int, max_size: int, min_size: int, stride: int, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[int, int]:
    """Output ``(width, height)`` of the NaViT resize rule for an input of ``width`` x ``height`` pixels.

    1. ``scale = min(max_size / long_side, 1)``, then raised to at least ``min_size / short_side``;
    2. each side is scaled, rounded, and rounded to a multiple of ``stride`` (at least ``stride``);
    3. if the area exceeds ``max_pixels`` the result is shrunk by ``sqrt(max_pixels / area)`` (area-preserving
       form of the cap) and re-rounded; then, if the long side exceeds ``max_size``, it is shrunk to it.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive, got {width}x{height}")
    if not (stride > 0 and min_size > 0 and max_size >= min_size):
        raise ValueError(f"need stride > 0 and max_size >= min_size > 0, got {max_size=} {min_size=} {stride=}")
    scale = min(max_size / max(width, height), 1.0)
    scale = max(scale, min_size / min(width, height))
    new_w, new_h = _apply_scale(width, height, scale, stride)
    if new_w * new_h > max_pixels:
        new_w, new_h = _apply_scale(new_w, new_h, math.sqrt(max_pixels / (new_w * new_h)), stride)
    if max(new_w, new_h) > max_size:
        new_w, new_h = _apply_scale(new_w, new_h, max_size / max(new_w, new_h), stride)
    return new_w, new_h


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 tensor (3, H, W) in [0, 1]."""
    if img.mode != "RGB":
        raise ValueError(f"img must be an RGB image, got mode {img.mode!r}")
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def resize_tensor(x: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Bicubic, antialiased resize of ``x`` (3, H, W) in [0, 1] to (3, height, width), clamped to [0, 1]."""
    if x.dim() != 3:
        raise ValueError(f"x must have shape (3, H, W), got {tuple(x.shape)}")
    if (x.shape[1], x.shape[2]) == (height, width):
        return x.clone()
    out = F.interpolate(x[None], size=(height, width), mode="bicubic", antialias=True, align_corners=False)[0]
    return out.clamp_(0.0, 1.0)


@dataclass(frozen=True)
class ImageTransform:
    """NaViT resize + ``Normalize(0.5, 0.5)``: PIL RGB image -> float32 (3, H, W) in [-1, 1].

    ``H`` and ``W`` are multiples of ``stride``. Presets: :func:`vit_transform` (980/224/14) and
    :func:`vae_transform` (1024/512/16); small sizes for tests and tiny models are just other arguments.
    """

    max_size: int
    min_size: int
    stride: int
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self):
        target_size(self.stride, self.stride, self.max_size, self.min_size, self.stride, self.max_pixels)

    def size_for(self, width: int, height: int) -> tuple[int, int]:
        """Output ``(width, height)`` for an input of that size."""
        return target_size(width, height, self.max_size, self.min_size, self.stride, self.max_pixels)

    def grid_for(self, width: int, height: int) -> tuple[int, int]:
        """Patch grid ``(rows, cols)`` = (H // stride, W // stride) of the output for an input of that size."""
        w, h = self.size_for(width, height)
        return h // self.stride, w // self.stride

    def __call__(self, img: Image.Image | torch.Tensor) -> torch.Tensor:
        """img: RGB PIL image, or float tensor (3, H, W) in [0, 1] -> float32 (3, H', W') in [-1, 1]."""
        x = pil_to_tensor(img) if isinstance(img, Image.Image) else img
        w, h = self.size_for(x.shape[2], x.shape[1])
        return resize_tensor(x, w, h).mul_(2.0).sub_(1.0)


def vit_transform(max_size: int = 980, min_size: int = 224, stride: int = 14, max_pixels: int = 2_007_040):
    """The detection ViT transform (BAGEL/UniGenDet: 980/224/14, max_pixels 2,007,040)."""
    return ImageTransform(max_size, min_size, stride, max_pixels)


def vae_transform(max_size: int = 1024, min_size: int = 512, stride: int = 16, max_pixels: int = DEFAULT_MAX_PIXELS):
    """The VAE transform (1024/512/16: 8x VAE downsampling times a 2x2 latent patch)."""
    return ImageTransform(max_size, min_size, stride, max_pixels)


def patchify(image: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(3, H, W) -> (H/P * W/P, P*P*3), patches row-major, pixels in (row-in-patch, col-in-patch, channel) order."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must have shape (3, H, W), got {tuple(image.shape)}")
    c, h, w = image.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not a multiple of patch_size={p}")
    x = image.reshape(c, h // p, p, w // p, p).permute(1, 3, 2, 4, 0)
    return x.reshape((h // p) * (w // p), p * p * c)
