"""Loading a checkpoint folder for inference, and the image-size settings that go with a model configuration."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

__all__ = ["CheckpointInfo", "check_checkpoint", "default_device", "load_for_inference", "packing_for"]

_CONFIG_FILES = ("llm_config.json", "vit_config.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass
class CheckpointInfo:
    """What :func:`check_checkpoint` found: the folder holding the configuration, its model configuration (read
    from the JSON files only), and whether it is an official (BAGEL-layout) checkpoint rather than one this package
    exported (``unigendet_config.json``)."""

    folder: str
    config: object
    official: bool


def _is_model_folder(path: str) -> bool:
    return all(os.path.isfile(os.path.join(path, n)) for n in _CONFIG_FILES)


def _has_weights(path: str) -> bool:
    return any(n.endswith((".safetensors", ".index.json")) and n != "ae.safetensors" for n in os.listdir(path))


def _not_a_model_hint(path: str) -> str:
    """Why ``path`` (an existing folder) is not a model folder, and where the model probably is."""
    final = os.path.join(path, "final")
    if _is_model_folder(final):
        return f"{path} is a training run folder, not a checkpoint: did you mean {final}?"
    if os.path.isdir(os.path.join(path, "checkpoints")) or os.path.isfile(os.path.join(path, "train.jsonl")):
        return (f"{path} is a training run folder without an exported model ({final} is written when the run "
                "finishes; its checkpoints/ only resume training with --resume)")
    if os.path.isfile(os.path.join(path, "trainer_state.json")):
        hint = os.path.join(os.path.dirname(os.path.dirname(path.rstrip(os.sep))) or ".", "final")
        if _is_model_folder(hint):
            return f"{path} is a training checkpoint (it resumes training with --resume): did you mean {hint}?"
        return f"{path} is a training checkpoint (it resumes training with --resume), not an exported model"
    subs = sorted(d for d in os.listdir(path) if _is_model_folder(os.path.join(path, d)))
    if subs:
        return f"{path} holds no model itself: did you mean {os.path.join(path, subs[0])}?"
    return (f"{path} is not a checkpoint folder (no {' / '.join(_CONFIG_FILES)}); pass the final/ folder of a "
            "training run, or a BAGEL-7B-MoT download")


def _missing_hint(path: str) -> str:
    import difflib

    parent = os.path.dirname(os.path.abspath(path))
    msg = f"checkpoint folder not found: {path}"
    if os.path.isdir(parent):
        close = difflib.get_close_matches(os.path.basename(path.rstrip(os.sep)), os.listdir(parent), n=1)
        if close:
            msg += f" (did you mean {os.path.join(os.path.dirname(path.rstrip(os.sep)), close[0])}?)"
    return msg


def check_checkpoint(checkpoint: str, *, base: str | None = None, tokenizer: str | None = None) -> CheckpointInfo:
    """Check a checkpoint (and base / tokenizer) argument without loading any weights.

    Raises ``FileNotFoundError`` or ``ValueError`` with a message that names what is wrong and, where it can tell,
    the path that was probably meant (``runs/tiny`` -> ``did you mean runs/tiny/final?``).
    """
    from unigendet.models.config import load_config

    if base is not None:
        if not os.path.exists(checkpoint) and "," not in checkpoint:
            raise FileNotFoundError(f"--checkpoint not found: {checkpoint}")
        folder = base
    else:
        folder = checkpoint
    label = "--base" if base is not None else "--checkpoint"
    if not os.path.exists(folder):
        raise FileNotFoundError(_missing_hint(folder).replace("checkpoint folder", f"{label} folder"))
    if not os.path.isdir(folder):
        if folder.endswith(".safetensors"):
            raise ValueError(f"{label} {folder} is a weights file: pass the folder holding it and its "
                             f"{' / '.join(_CONFIG_FILES)}, or fine-tuned weights as --checkpoint with --base FOLDER")
        raise NotADirectoryError(f"{label} {folder} is not a folder")
    if not _is_model_folder(folder):
        raise FileNotFoundError(_not_a_model_hint(folder))
    if not _has_weights(folder):
        raise FileNotFoundError(f"{label} {folder} holds no *.safetensors weights")
    if tokenizer is None:
        if not any(os.path.isfile(os.path.join(folder, f)) for f in _TOKENIZER_FILES):
            raise FileNotFoundError(
                f"{folder} holds no tokenizer files ({' / '.join(_TOKENIZER_FILES)}); pass --tokenizer tiny for a "
                "model trained with this package's tiny tokenizer, or --tokenizer FOLDER")
    elif tokenizer != "tiny" and not os.path.exists(tokenizer):
        raise FileNotFoundError(f"--tokenizer not found: {tokenizer} (use 'tiny' or a tokenizer folder)")
    config = load_config(folder)
    official = base is not None or not os.path.isfile(os.path.join(folder, "unigendet_config.json"))
    return CheckpointInfo(folder=folder, config=config, official=official)


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
    folder = check_checkpoint(checkpoint, base=base, tokenizer=tokenizer).folder
    loaded = load_pretrained(folder, checkpoint if base is not None else None, dtype=dtype, device=dev,
                             load_tokenizer=tokenizer is None)
    tok = loaded.tokenizer if tokenizer is None else load_tokenizer(tokenizer)
    if tok.vocab_size > loaded.model.config.llm.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} ids but the model only {loaded.model.config.llm.vocab_size}")
    model = loaded.model.eval()
    return model, tok, packing_for(model.config, packing)
