"""Loading a checkpoint folder for inference, and the image-size settings that go with a model configuration."""

from __future__ import annotations

import os

import torch

__all__ = ["default_device", "load_for_inference", "packing_for"]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def packing_for(config, name: str = "auto", **overrides):
    """The :class:`~unigendet.data.PackingConfig` matching a model configuration.

    ``name``: ``bagel`` (ViT 980/224/14, VAE 1024/512/16), ``tiny`` (ViT 56/28/14, VAE 64/32/16) or ``auto``:
    the preset whose position-table sizes are the model's, otherwise sizes derived from the tables (longest side
    = the table, shortest = half of it). Detection packs the VAE image when the model has a generation path.
    """
    from unigendet.data import PackingConfig
    from unigendet.data.transforms import ImageTransform

    overrides.setdefault("det_use_vae", bool(config.visual_gen))
    vit_patch = config.vit.patch_size
    stride = config.latent_downsample
    vit_side = config.vit_max_num_patch_per_side * vit_patch
    vae_side = config.max_latent_size * stride
    # A preset applies only when its position-table sizes are the model's (position ids are row * side + col).
    geometry = (config.vit_max_num_patch_per_side, config.max_latent_size, vit_patch, stride)
    if name == "bagel" or (name == "auto" and geometry == (70, 64, 14, 16)):
        return PackingConfig.bagel(**overrides)
    if name == "tiny" or (name == "auto" and geometry == (4, 4, 14, 16)):
        return PackingConfig.tiny(**overrides)
    if name != "auto":
        raise ValueError(f"packing must be 'auto', 'bagel' or 'tiny', got {name!r}")

    def half(side, s):
        return max(s, (side // 2) // s * s)

    args = dict(
        vit=ImageTransform(vit_side, half(vit_side, vit_patch), vit_patch),
        vae=ImageTransform(vae_side, half(vae_side, stride), stride),
        vit_max_patches_per_side=config.vit_max_num_patch_per_side,
        max_latent_size=config.max_latent_size,
        expected_num_tokens=32768,
        max_num_tokens=36864,
        max_num_tokens_per_sample=16384,
    )
    args.update(overrides)
    return PackingConfig(**args)


def load_for_inference(
    checkpoint: str,
    *,
    base: str | None = None,
    tokenizer: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    packing: str = "auto",
):
    """Load ``(model, tokenizer, packing)`` for inference.

    Args:
        checkpoint: a folder written by :func:`unigendet.models.save_checkpoint` (plus the tokenizer files); or,
            with ``base``, fine-tuned weights overlaid on the base folder (see
            :func:`unigendet.models.load_pretrained`).
        base: a base folder (BAGEL download) when ``checkpoint`` holds only fine-tuned weights.
        tokenizer: ``"tiny"`` or a tokenizer folder; default: the tokenizer files of the (base) folder.
        device: default CUDA when available.
        dtype: default bfloat16 on CUDA, float32 on the CPU.
        packing: see :func:`packing_for`.
    """
    from unigendet.models import load_pretrained
    from unigendet.tokenizer import load_tokenizer

    dev = torch.device(device) if device is not None else default_device()
    if dtype is None:
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    folder = base if base is not None else checkpoint
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"checkpoint folder not found: {folder!r}")
    has_tok = any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer.json", "tokenizer_config.json"))
    if tokenizer is None and not has_tok:
        raise FileNotFoundError(f"{folder!r} holds no tokenizer files; pass a tokenizer ('tiny' or a folder)")
    loaded = load_pretrained(folder, checkpoint if base is not None else None, dtype=dtype, device=dev,
                             load_tokenizer=tokenizer is None)
    tok = loaded.tokenizer if tokenizer is None else load_tokenizer(tokenizer)
    if tok.vocab_size > loaded.model.config.llm.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} ids but the model only {loaded.model.config.llm.vocab_size}")
    model = loaded.model.eval()
    return model, tok, packing_for(model.config, packing)
