"""The packed batch a training step consumes.

Tokens are in *expert-contiguous* order: positions ``[0, num_und)`` belong to the understanding expert (all text
tokens, including every vision start/end marker, and all ViT tokens), positions ``[num_und, seq_len)`` to the
generation expert (all VAE-latent tokens). Within each block tokens keep BAGEL's sample-major order; ``order`` maps
a new position to its original (BAGEL-order) position. All index tensors are int64 positions in the new order.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["DigaTeacherBatch", "PackedBatch"]


def _move(value: Any, device, non_blocking: bool) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=non_blocking)
    if isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
        return [v.to(device, non_blocking=non_blocking) for v in value]
    if hasattr(value, "to") and not isinstance(value, (str, bytes)) and not isinstance(value, type):
        try:
            return value.to(device, non_blocking=non_blocking)
        except TypeError:
            return value.to(device)
    return value


@dataclass
class PackedBatch:
    """One token-budgeted pack of detection and generation samples (see the module docstring for the order).

    Shapes: ``S`` = ``seq_len``; ``P`` = ViT patch size; ``n_*`` = number of tokens of each kind.
    """

    seq_len: int
    num_und: int
    order: torch.Tensor  # int64 (S,): order[new_pos] = BAGEL-order position
    sample_lens: list[int]
    splits: list[list[tuple[int, str]]]  # per sample, BAGEL order: (length, "full" | "causal" | "noise")
    position_ids: torch.Tensor  # int64 (S,) 1-D RoPE ids
    layout: Any  # unigendet.ops.layout.AttentionLayout, built for `order`
    text_ids: torch.Tensor  # int64 (n_text,)
    text_indexes: torch.Tensor  # int64 (n_text,)
    ce_indexes: torch.Tensor  # int64 (n_ce,)
    ce_labels: torch.Tensor  # int64 (n_ce,) next-token targets
    det_indexes: torch.Tensor  # int64 (n_det,) the answer's <|im_start|> position
    det_labels: torch.Tensor  # int64 (n_det,) 0 = fake, 1 = real
    vit_patches: torch.Tensor  # float32 (n_vit_tok, 3*P*P), (row-in-patch, col-in-patch, channel), [-1, 1]
    vit_indexes: torch.Tensor  # int64 (n_vit_tok,)
    vit_position_ids: torch.Tensor  # int64 (n_vit_tok,) row * vit_max_patches_per_side + col
    vit_cu_seqlens: torch.Tensor  # int32 (n_vit_img + 1,)
    vit_max_seqlen: int
    vit_grids: list[tuple[int, int]]
    vae_images: list[torch.Tensor]  # float32 (3, H, W) in [-1, 1]
    vae_latent_grids: list[tuple[int, int]]  # (H // stride, W // stride)
    vae_indexes: torch.Tensor  # int64 (n_lat,)
    vae_position_ids: torch.Tensor  # int64 (n_lat,) row * max_latent_size + col
    vae_image_of_token: torch.Tensor  # int64 (n_lat,)
    vae_noise_logit: torch.Tensor  # float32 (n_vae_img,) N(0, 1) for noisy images, -inf for clean ones
    mse_indexes: torch.Tensor  # int64 (n_mse,)
    sample_kind: list[str]  # "det" | "gen" (| "diga" in a teacher batch)
    diga: DigaTeacherBatch | None = None
    # per sample, per split: the token kind, "text" | "answer" | "vit" | "gen" (unigendet.pack.SPLIT_KINDS)
    split_kinds: list[list[str]] = field(default_factory=list)
    sample_ids: list[str] = field(default_factory=list)  # record id per sample (for logging / sharding checks)
    pack_id: tuple[int, int] | None = None  # (shard, index of the pack in that shard's stream)
    skipped: dict = field(default_factory=dict)  # reason -> count of records skipped while building this pack
    # the SMSA mode `layout` was built under (unigendet.pack.visibility)
    smsa: str = "reference"

    @property
    def num_gen(self) -> int:
        return self.seq_len - self.num_und

    def to(self, device, non_blocking: bool = False) -> PackedBatch:
        """A copy with every tensor (and the layout, and the teacher batch) on ``device``."""
        changes = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor) or f.name in ("layout", "diga"):
                changes[f.name] = _move(v, device, non_blocking) if v is not None else None
            elif f.name == "vae_images":
                changes[f.name] = [t.to(device, non_blocking=non_blocking) for t in v]
        return dataclasses.replace(self, **changes)

    def pin_memory(self) -> PackedBatch:
        """Pinned copies of the host tensors (called by DataLoader with ``pin_memory=True``)."""
        changes = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                changes[f.name] = v.pin_memory()
            elif f.name == "vae_images":
                changes[f.name] = [t.pin_memory() for t in v]
            elif f.name in ("diga", "layout") and v is not None:
                changes[f.name] = v.pin_memory()
        return dataclasses.replace(self, **changes)


@dataclass
class DigaTeacherBatch(PackedBatch):
    """The DIGA teacher pack: per generation image, [VAE clean, full] -> [forensic prompt, causal] -> [ViT, full].

    ``student_image_ids[i]``: which ``vae_images`` entry of the student batch teacher image ``i`` comes from;
    ``student_grids[i]`` its latent grid there; ``teacher_grids[i]`` its ViT grid here; ``teacher_vit_indexes``:
    positions of the teacher's ViT tokens (same as ``vit_indexes``), row-major per image.
    """

    student_image_ids: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    student_grids: list[tuple[int, int]] = field(default_factory=list)
    teacher_grids: list[tuple[int, int]] = field(default_factory=list)
    teacher_vit_indexes: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
