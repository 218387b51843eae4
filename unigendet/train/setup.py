"""What a run builds before its first step: the compute dtype, the seeds, the model and tokenizer, the packing
geometry (from the model's own position tables) and the records."""

from __future__ import annotations

import dataclasses
import logging
import random

import numpy as np
import torch

from .config import TrainConfig

log = logging.getLogger("unigendet.train")

__all__ = ["build_model", "compute_dtype_of", "load_run_records", "packing_config", "seed_everything"]


def compute_dtype_of(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (``None``: fp32 compute): bf16 on GPUs and fp32 on CPUs for ``dtype="auto"``."""
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[cfg.dtype]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002  (third-party code may draw from the global RNG)
    torch.manual_seed(seed)


def build_model(cfg: TrainConfig, device: torch.device, amp_dtype: torch.dtype | None, *, is_main: bool = True):
    """``(tokenizer, model)``: a preset built from scratch, or a checkpoint folder loaded with fp32 master weights
    (compute runs in ``amp_dtype`` under autocast or FSDP2's mixed precision; the frozen VAE is stored in it)."""
    from unigendet.models import UniGenDet, get_config, load_pretrained
    from unigendet.models.config import PRESETS as MODEL_PRESETS
    from unigendet.tokenizer import load_tokenizer

    overrides = {"smsa_mode": cfg.smsa, "timestep_shift": cfg.timestep_shift}
    if cfg.diga.diga_layer is not None:
        overrides["diga_layer"] = cfg.diga.diga_layer
    if cfg.model in MODEL_PRESETS and cfg.model_path is None:
        tokenizer = load_tokenizer("tiny")
        mcfg = get_config(cfg.model, **overrides)
        if tokenizer.vocab_size > mcfg.llm.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids, the model's table {mcfg.llm.vocab_size}")
        model = UniGenDet(mcfg).to(device)
    else:
        from unigendet.models.config import load_config as load_model_config

        base = cfg.model_path or cfg.model
        mcfg = dataclasses.replace(load_model_config(base), **overrides)
        loaded = load_pretrained(base, config=mcfg, dtype=torch.float32, device=device,
                                 vae_dtype=amp_dtype or torch.float32)
        if is_main:
            log.info("loaded %s: %s", base, loaded.report)
        model, tokenizer = loaded.model, loaded.tokenizer
    if model.vae is not None:
        model.vae.requires_grad_(False)
    model.set_gradient_checkpointing(cfg.grad_checkpointing)
    return tokenizer, model


def packing_config(cfg: TrainConfig, model_config):
    """The run's :class:`~unigendet.data.PackingConfig`: the geometry follows the model's position tables (a tiny
    checkpoint folder packs as the tiny preset), the mix, budgets, prompts and SMSA mode the run's settings."""
    from unigendet.inference.loading import packing_for

    d = cfg.data
    kw = dict(gen_weight=d.gen_ratio, det_weight=d.det_ratio, text_cond_dropout_prob=d.cfg_text_dropout,
              diga_prompt=cfg.diga_prompt, smsa=cfg.smsa)
    for key, value in (("expected_num_tokens", d.expected_tokens), ("max_num_tokens", d.max_tokens),
                       ("max_num_tokens_per_sample", d.max_tokens_per_sample)):
        if value is not None:
            kw[key] = value
    return packing_for(model_config, **kw)


def load_run_records(cfg: TrainConfig):
    """``(detection, generation, held-out detection)`` records of the configured data source."""
    from unigendet.data import load_records

    d = cfg.data
    if d.source == "embedded":
        det, gen = load_records(balance=d.balance_classes)
        test, _ = load_records(split="test")
    else:
        det, gen = load_records(d.fakeclue_root, d.laion_manifest, balance=d.balance_classes)
        test, _ = load_records(d.fakeclue_root, None, split="test") if d.fakeclue_root else ([], [])
    return det, gen, test
