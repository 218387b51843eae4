"""Checkpoint IO in BAGEL's key space (safetensors only; pickles are never loaded).

A *base folder* is a BAGEL-7B-MoT download (or one written by :func:`save_checkpoint` plus ``ae.safetensors``):
``llm_config.json``, ``vit_config.json``, optionally ``unigendet_config.json``, ``ema.safetensors`` (the model),
``ae.safetensors`` (the FLUX AE in FLUX's own key format) and the tokenizer files.

A *fine-tuned checkpoint* may be one ``.safetensors`` file, an ``*.index.json`` (Hugging Face sharded format), a
folder holding either, or a comma-separated list of shard files. Keys it lacks (frozen parameters are often
omitted) come from the base folder's ``ema.safetensors``, as the reference loader does.

Keys: exactly BAGEL's (``language_model.model.layers.N.self_attn.q_proj_moe_gen.weight``, ``vit_model.vision_model.
...``, ``connector.fc1.weight``, ``fake_cls_head.1.weight``, ...). The VAE is never part of this key space.
Some stored keys are deliberately ignored rather than reported as unexpected: the fixed sin-cos tables
(``vit_pos_embed.pos_embed``, ``latent_pos_embed.pos_embed``; regenerated), the reference code's unused
``latent_to_vit_connector.*``, and ViT layers beyond the truncated tower.

Loading checks what it reads: an index must be valid JSON naming files inside its own folder, a safetensors file
that cannot be read is named, every loaded weight must be finite (:class:`NonFiniteWeightsError` lists the first
bad keys), a folder written by :func:`save_checkpoint` is verified against its ``checksums.json``, and a
configuration whose model would not fit in the device's memory is refused before anything is allocated.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from .._integrity import (
    CheckpointError,
    NonFiniteWeightsError,
    atomic_folder,
    check_finite,
    has_checksums,
    safe_open_checked,
    verify_checksums,
)
from .config import ConfigError, UniGenDetConfig, load_config, save_config
from .qwen2_mot import RMSNorm
from .siglip import conv_patch_weight_to_linear
from .unigendet import UniGenDet
from .vae import flux_ae_to_diffusers

__all__ = [
    "CheckpointError",
    "NonFiniteWeightsError",
    "LoadReport",
    "Loaded",
    "build_model",
    "checkpoint_state_dict",
    "load_pretrained",
    "load_weights",
    "load_vae_weights",
    "resolve_checkpoint",
    "save_checkpoint",
    "INDEX_NAME",
]

INDEX_NAME = "model.safetensors.index.json"
_FIXED_KEYS = ("vit_pos_embed.pos_embed", "latent_pos_embed.pos_embed")
_UNUSED_PREFIXES = ("latent_to_vit_connector.",)


@dataclass
class LoadReport:
    """What a load did: keys the model expected but no file held (freshly initialised), keys files held that the
    model does not have, keys deliberately ignored, and the number of tensors copied."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    loaded: int = 0
    sources: dict[str, int] = field(default_factory=dict)  # file -> number of tensors taken from it

    @property
    def complete(self) -> bool:
        return not self.missing and not self.unexpected

    def __str__(self) -> str:
        def few(xs):
            return ", ".join(xs[:8]) + (f", ... ({len(xs)} total)" if len(xs) > 8 else "")

        lines = [f"loaded {self.loaded} tensors from {len(self.sources)} file(s)"]
        if self.missing:
            lines.append(f"missing ({len(self.missing)}, freshly initialised): {few(self.missing)}")
        if self.unexpected:
            lines.append(f"unexpected ({len(self.unexpected)}): {few(self.unexpected)}")
        if self.ignored:
            lines.append(f"ignored ({len(self.ignored)}): {few(self.ignored)}")
        return "\n".join(lines)


@dataclass
class Loaded:
    model: UniGenDet
    tokenizer: object | None
    report: LoadReport


# ------------------------------------------------------------------ key space


def checkpoint_state_dict(model: UniGenDet) -> dict[str, torch.Tensor]:
    """The model's state in BAGEL's key space (everything except the ``vae.`` submodule)."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith("vae.")}


def _ignore_reason(key: str, model: UniGenDet) -> bool:
    if key in _FIXED_KEYS or key.startswith(_UNUSED_PREFIXES):
        return True
    m = re.match(r"vit_model\.vision_model\.encoder\.layers\.(\d+)\.", key)
    return bool(m and int(m[1]) >= model.config.vit.num_layers)


def build_model(config: UniGenDetConfig, *, device="meta", dtype: torch.dtype | None = None) -> UniGenDet:
    """Build the model. On ``device="meta"`` nothing is allocated (use :func:`materialize` or a loader next)."""
    with torch.device(device):
        model = UniGenDet(config)
    if dtype is not None:
        model.to(dtype)
    return model


# ------------------------------------------------------------------ resolving files


def resolve_checkpoint(path: str) -> dict[str, str]:
    """Map every tensor key to the safetensors file holding it.

    Accepts a ``.safetensors`` file, an ``*.index.json``, a folder (its ``model.safetensors.index.json``, else
    any ``*.index.json``, else ``ema.safetensors``, else every ``*.safetensors`` except ``ae.safetensors``), or
    a comma-separated list of shard files.
    """
    def keys_of(f):
        with safe_open_checked(f) as h:
            return list(h.keys())

    def from_files(files: Iterable[str]) -> dict[str, str]:
        out: dict[str, str] = {}
        for f in files:
            for k in keys_of(f):
                if k in out:
                    raise ValueError(f"key {k!r} appears in both {out[k]!r} and {f!r}")
                out[k] = f
        return out

    if "," in path:
        files = [p.strip() for p in path.split(",") if p.strip()]
        for f in files:
            if not os.path.isfile(f):
                raise FileNotFoundError(f"checkpoint shard not found: {f!r}")
        return from_files(files)
    if os.path.isdir(path):
        cands = [os.path.join(path, INDEX_NAME)]
        cands += sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".index.json"))
        for c in cands:
            if os.path.isfile(c):
                return _from_index(c)
        ema = os.path.join(path, "ema.safetensors")
        if os.path.isfile(ema):
            return from_files([ema])
        files = sorted(
            os.path.join(path, n) for n in os.listdir(path) if n.endswith(".safetensors") and n != "ae.safetensors"
        )
        if not files:
            raise FileNotFoundError(f"no safetensors checkpoint in folder {path!r}")
        return from_files(files)
    if path.endswith(".json"):
        return _from_index(path)
    if path.endswith(".safetensors"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint not found: {path!r}")
        return from_files([path])
    raise ValueError(f"checkpoint path must be a .safetensors file, an index .json or a folder, got {path!r}")


def _from_index(index_path: str) -> dict[str, str]:
    from .._shards import read_index

    out = {}
    for k, full in read_index(index_path).items():  # validated: inside the index's folder
        if os.path.basename(full) == "ae.safetensors":
            continue  # BAGEL's index lists the VAE file too; the VAE is loaded separately
        if not os.path.isfile(full):
            raise FileNotFoundError(f"{index_path!r} points {k!r} at a missing file {full!r}")
        out[k] = full
    return out


# ------------------------------------------------------------------ loading


@torch.no_grad()
def load_weights(
    model: UniGenDet,
    key_files: dict[str, str],
    *,
    report: LoadReport | None = None,
    only_missing_from: set[str] | None = None,
) -> tuple[LoadReport, set[str]]:
    """Copy tensors into ``model`` (cast to each parameter's dtype, on its device). Shape mismatch -> ValueError;
    a NaN or infinite value (also one the cast produced) -> :class:`NonFiniteWeightsError` naming the keys.

    Args:
        key_files: key -> file, from :func:`resolve_checkpoint`.
        only_missing_from: if given, only keys *not* in this set are copied (merging from a base checkpoint).
    Returns:
        the report and the set of keys copied.
    """
    report = report or LoadReport()
    targets = checkpoint_state_dict(model)
    by_file: dict[str, list[str]] = {}
    for k, f in key_files.items():
        if only_missing_from is not None and k in only_missing_from:
            continue
        if k not in targets:
            if _ignore_reason(k, model):
                report.ignored.append(k)
            else:
                report.unexpected.append(k)
            continue
        if k in _FIXED_KEYS:
            report.ignored.append(k)
            continue
        by_file.setdefault(f, []).append(k)
    copied: set[str] = set()
    for f, keys in by_file.items():
        with safe_open_checked(f) as h:
            for k in keys:
                t = h.get_tensor(k)
                dst = targets[k]
                if k.endswith("embeddings.patch_embedding.weight") and t.dim() == 4:
                    t = conv_patch_weight_to_linear(t)  # a SigLIP Conv2d patch weight from an unconverted file
                if tuple(t.shape) != tuple(dst.shape):
                    raise ValueError(f"{k}: checkpoint shape {tuple(t.shape)} != model shape {tuple(dst.shape)}")
                dst.copy_(t)
                copied.add(k)
        check_finite({k: targets[k] for k in keys}, f)
        report.sources[f] = report.sources.get(f, 0) + len(keys)
    report.loaded += len(copied)
    return report, copied


@torch.no_grad()
def _init_missing(model: UniGenDet, missing: list[str], std: float = 0.02) -> None:
    """Fresh initialisation of parameters no checkpoint provided (e.g. ``fake_cls_head`` on BAGEL weights)."""
    for key in missing:
        mod_name, _, pname = key.rpartition(".")
        mod = model.get_submodule(mod_name)
        t = getattr(mod, pname)
        if isinstance(mod, (nn.LayerNorm, RMSNorm)):
            (t.fill_(1.0) if pname == "weight" else t.zero_())
        elif pname == "bias" or mod_name == "llm2vae":
            t.zero_()
        else:
            t.normal_(0.0, std)


@torch.no_grad()
def load_vae_weights(model: UniGenDet, ae_path: str) -> None:
    """Load a FLUX-format ``ae.safetensors`` into ``model.vae`` (strict: every key must match)."""
    from .._integrity import load_safetensors

    if model.vae is None or model.config.vae.kind != "flux":
        raise ValueError("model has no FLUX VAE to load into")
    raw = load_safetensors(ae_path)
    check_finite(raw, ae_path)
    state = flux_ae_to_diffusers(raw)
    target = model.vae.model.state_dict()
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    if missing or unexpected:
        raise ValueError(f"{ae_path}: VAE keys do not match (missing {missing[:5]}, unexpected {unexpected[:5]})")
    for k, t in state.items():
        if tuple(t.shape) != tuple(target[k].shape):
            raise ValueError(f"{ae_path}: {k} has shape {tuple(t.shape)}, expected {tuple(target[k].shape)}")
        target[k].copy_(t)


def load_pretrained(
    base: str,
    ckpt: str | None = None,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device="cpu",
    config: UniGenDetConfig | None = None,
    load_tokenizer: bool = True,
    vae_dtype: torch.dtype | None = None,
    strict: bool = False,
    verify: bool = True,
) -> Loaded:
    """Build a model from a base folder, optionally overlay a fine-tuned checkpoint, return it with a report.

    The model is built on the meta device, cast to ``dtype`` there, materialised once on ``device`` with
    ``to_empty``, and then filled tensor by tensor from safetensors (no intermediate full copy).

    Args:
        base: the base folder (configs, ``ema.safetensors``, ``ae.safetensors``, tokenizer).
        ckpt: fine-tuned weights (see :func:`resolve_checkpoint`); keys it lacks come from ``base``.
        dtype: parameter dtype of the model (the VAE uses ``vae_dtype``, default the same).
        config: overrides the folder's JSON configuration.
        load_tokenizer: also load ``unigendet.tokenizer.load_tokenizer(base)``.
        strict: raise ``ValueError`` if any key is missing or unexpected.
        verify: check the folders that carry a ``checksums.json`` (those :func:`save_checkpoint` writes) first.
    """
    if not os.path.isdir(base):
        raise FileNotFoundError(f"base folder not found: {base!r}")
    if verify:
        for folder in {base, ckpt} if ckpt is not None else {base}:
            if os.path.isdir(folder) and has_checksums(folder):
                verify_checksums(folder)
    config = config or load_config(base)
    need = []
    if config.visual_gen and config.vae.kind == "flux":
        need.append("ae.safetensors")
    for n in need:
        if not os.path.isfile(os.path.join(base, n)):
            raise FileNotFoundError(f"{n} not found in base folder {base!r}")
    tokenizer = None
    if load_tokenizer:
        from unigendet.tokenizer import load_tokenizer as _load_tok

        tokenizer = _load_tok(base)
        if tokenizer.vocab_size > config.llm.vocab_size:
            raise ValueError(
                f"tokenizer has {tokenizer.vocab_size} ids but the embedding table only {config.llm.vocab_size}"
            )

    model = build_model(config, device="meta", dtype=dtype)
    if model.vae is not None and vae_dtype is not None:
        model.vae.to(vae_dtype)
    _check_fits(model, device, base)
    model.to_empty(device=device)

    report = LoadReport()
    copied: set[str] = set()
    if ckpt is not None:
        report, copied = load_weights(model, resolve_checkpoint(ckpt), report=report)
    base_files = resolve_checkpoint(base)
    if ckpt is None:
        report, copied = load_weights(model, base_files, report=report)
    else:
        report, more = load_weights(model, base_files, report=report, only_missing_from=copied)
        copied |= more
    expected = [k for k in checkpoint_state_dict(model) if k not in _FIXED_KEYS]
    report.missing = sorted(k for k in expected if k not in copied)
    report.unexpected = sorted(set(report.unexpected))
    report.ignored = sorted(set(report.ignored))
    _init_missing(model, report.missing)
    model.reset_fixed_buffers()
    if config.visual_gen and config.vae.kind == "flux":
        load_vae_weights(model, os.path.join(base, "ae.safetensors"))
    if strict and not report.complete:
        raise ValueError(f"incomplete load:\n{report}")
    return Loaded(model=model, tokenizer=tokenizer, report=report)


def _device_memory(device) -> int | None:
    dev = torch.device(device)
    try:
        if dev.type == "cuda":
            return torch.cuda.get_device_properties(dev).total_memory
        if dev.type == "cpu":
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, RuntimeError, AssertionError):
        return None
    return None


def _check_fits(model: nn.Module, device, source: str) -> None:
    """Refuse a model (built on the meta device) whose weights alone exceed the device's memory."""
    need = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    have = _device_memory(device)
    if have is not None and need > have:
        raise ConfigError(f"{source}: the configured model needs {need / 2**30:.1f} GiB for its weights, more than "
                          f"the {have / 2**30:.1f} GiB of {torch.device(device)} memory; check llm_config.json and "
                          "vit_config.json")


# ------------------------------------------------------------------ saving


def save_checkpoint(
    model: UniGenDet,
    folder: str,
    *,
    max_shard_bytes: int = 5 * 1024**3,
    dtype: torch.dtype | None = None,
    write_config: bool = True,
) -> list[str]:
    """Save the model in BAGEL's key space as sharded safetensors plus ``model.safetensors.index.json``.

    Written into a temporary sibling folder with a ``checksums.json`` and renamed into place
    (:func:`unigendet._integrity.atomic_folder`), so ``folder`` is either the old complete checkpoint or the new
    complete one, never a partial write (``unigendet.train.state.clean_stale_temporaries`` removes what a kill
    left in a run folder). Non-finite weights
    raise :class:`NonFiniteWeightsError` before anything is written. Returns the shard file names.
    """
    from .._shards import save_sharded

    state = checkpoint_state_dict(model)
    check_finite(state, f"export {folder}")
    with atomic_folder(folder) as tmp:
        names = save_sharded(state, tmp, "model", max_shard_bytes=max_shard_bytes, dtype=dtype)
        if write_config:
            save_config(model.config, tmp)
    return names

