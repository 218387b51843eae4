"""Argument helpers shared by the ``python -m unigendet.detect / generate / evaluate`` commands.

Every ``check_*`` function validates arguments WITHOUT loading a model (files, folders, numeric ranges, image
sizes against the checkpoint's configuration) and raises :class:`unigendet._cli.UsageError` (or
``FileNotFoundError``) with a one-line message naming the argument, so a command fails in a second instead of
after the model has loaded.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from unigendet._cli import UsageError

__all__ = [
    "add_detection_args",
    "add_generation_args",
    "add_model_args",
    "check_detection_args",
    "check_generation_args",
    "check_images",
    "check_model_args",
    "detector_from_args",
    "generator_from_args",
    "load_from_args",
    "parse_size",
    "read_prompts",
    "resolve_prompt_style",
]

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


# --------------------------------------------------------------------------------------------------- model


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", required=True,
                   help="checkpoint folder (a run's final/ folder, or a BAGEL-layout download), or fine-tuned "
                        "weights when --base is given")
    g.add_argument("--base", default=None, help="base folder (e.g. BAGEL-7B-MoT) under the fine-tuned --checkpoint")
    g.add_argument("--tokenizer", default=None, help="'tiny' or a tokenizer folder (default: the checkpoint's)")
    g.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    g.add_argument("--dtype", default=None, choices=sorted(_DTYPES), help="default: bfloat16 on cuda, float32 on cpu")
    g.add_argument("--packing", default="auto", choices=("auto", "bagel", "tiny"), help="image-size preset")


def check_model_args(args):
    """Check ``--checkpoint/--base/--tokenizer/--device``; returns the :class:`CheckpointInfo`."""
    from .loading import check_checkpoint

    if args.device is not None:
        try:
            dev = torch.device(args.device)
        except RuntimeError:
            raise UsageError(f"--device: not a device: {args.device!r} (e.g. cpu, cuda, cuda:1)") from None
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise UsageError(f"--device {args.device}: CUDA is not available on this machine")
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise UsageError(f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s)")
    return check_checkpoint(args.checkpoint, base=args.base, tokenizer=args.tokenizer)


def load_from_args(args):
    from .loading import load_for_inference

    return load_for_inference(
        args.checkpoint, base=args.base, tokenizer=args.tokenizer, device=args.device,
        dtype=_DTYPES[args.dtype] if args.dtype else None, packing=args.packing,
    )


# --------------------------------------------------------------------------------------------------- detection


def add_detection_args(p: argparse.ArgumentParser, *, max_new_tokens: int | None = None) -> None:
    from unigendet.prompts import DETECTION_PROMPT_STYLES

    from .detect import DEFAULT_MAX_NEW_TOKENS

    g = p.add_argument_group("detection")
    m = g.add_mutually_exclusive_group()
    m.add_argument("--greedy", dest="sample", action="store_false", help="greedy decoding (default)")
    m.add_argument("--sample", dest="sample", action="store_true",
                   help="sample with the paper's settings (T 0.7, top-p 0.8, top-k 20, repetition penalty 1.05)")
    p.set_defaults(sample=False)
    g.add_argument("--temperature", type=float, default=None, help="override the sampling temperature")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    limit = DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens
    g.add_argument("--max-new-tokens", type=int, default=limit,
                   help=f"answer length limit; decoding stops earlier at the end of every answer (default {limit})")
    g.add_argument("--smsa", default=None, choices=("reference", "paper", "off"),
                   help="SMSA rule (default: the model configuration's)")
    g.add_argument("--question", default=None, help="question after the image (default: FakeClue's question)")
    g.add_argument("--prompt-style", default="auto", choices=("auto", *DETECTION_PROMPT_STYLES),
                   help="fakeclue: the question as trained; official: followed by the official evaluation's "
                        "output-format block; auto (default): official for official checkpoints (--base, or a "
                        "folder without unigendet_config.json), else fakeclue")
    g.add_argument("--det-batch-size", type=int, default=8, help="images per packed prefill")


def check_detection_args(args) -> None:
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.det_batch_size < 1:
        raise UsageError(f"--det-batch-size must be >= 1, got {args.det_batch_size}")
    if args.temperature is not None and not args.temperature > 0:
        raise UsageError(f"--temperature must be > 0, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k is not None and args.top_k < 0:
        raise UsageError(f"--top-k must be >= 0, got {args.top_k}")
    if args.repetition_penalty is not None and not args.repetition_penalty > 0:
        raise UsageError(f"--repetition-penalty must be > 0, got {args.repetition_penalty}")


def resolve_prompt_style(args, info) -> str:
    """``--prompt-style``, with ``auto`` resolved: ``official`` for official checkpoints, else ``fakeclue``."""
    if args.prompt_style != "auto":
        return args.prompt_style
    return "official" if info.official else "fakeclue"


def detector_from_args(model, tok, packing, args, prompt_style: str | None = None):
    """A :class:`Detector` with the command's decoding settings; ``prompt_style`` defaults to ``args.prompt_style``
    once resolved (see :func:`resolve_prompt_style`), ``fakeclue`` while it is still ``auto``."""
    from unigendet.sampling import SamplingConfig

    from .detect import DEFAULT_QUESTION, Detector

    if args.sample:
        base = SamplingConfig.paper()
        sampling = SamplingConfig(
            do_sample=True,
            temperature=base.temperature if args.temperature is None else args.temperature,
            top_k=base.top_k if args.top_k is None else args.top_k,
            top_p=base.top_p if args.top_p is None else args.top_p,
            repetition_penalty=base.repetition_penalty if args.repetition_penalty is None else args.repetition_penalty,
        )
    else:
        penalty = 1.0 if args.repetition_penalty is None else args.repetition_penalty
        sampling = SamplingConfig(do_sample=False, repetition_penalty=penalty)
    if prompt_style is None:
        prompt_style = "fakeclue" if getattr(args, "prompt_style", "auto") == "auto" else args.prompt_style
    return Detector(model, tok, packing, smsa=args.smsa, sampling=sampling, max_new_tokens=args.max_new_tokens,
                    question=args.question or DEFAULT_QUESTION, prompt_style=prompt_style)


def check_images(paths) -> list[tuple[str, str]]:
    """``(path, problem)`` for every path that is not a usable image file, from the file headers (no decoding:
    a truncated file is found only when it is decoded, and then skipped by ``Detector.detect``)."""
    from unigendet.data.readers import DataError, image_size

    bad = []
    for path in paths:
        try:
            image_size(path, strict=True)
        except DataError as e:
            bad.append((path, e.describe()))
    return bad


# --------------------------------------------------------------------------------------------------- generation


def parse_size(text: str | None) -> tuple[int, int] | None:
    """``"512"`` -> (512, 512); ``"HxW"`` -> (H, W); None stays None."""
    if text is None:
        return None
    parts = text.lower().replace(",", "x").split("x")
    try:
        vals = [int(v) for v in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be N or HxW, got {text!r}") from None
    if len(vals) == 1:
        return vals[0], vals[0]
    if len(vals) == 2:
        return vals[0], vals[1]
    raise argparse.ArgumentTypeError(f"size must be N or HxW, got {text!r}")


def add_generation_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--steps", type=int, default=50, help="schedule points (steps - 1 Euler steps)")
    g.add_argument("--shift", type=float, default=3.0)
    g.add_argument("--cfg-scale", type=float, default=4.0, help="text guidance scale")
    g.add_argument("--cfg-img-scale", type=float, default=None, help="image guidance scale (off by default)")
    g.add_argument("--cfg-interval", type=float, nargs=2, default=(0.0, 1.0), metavar=("LO", "HI"))
    g.add_argument("--renorm-min", type=float, default=0.0)
    g.add_argument("--size", type=parse_size, default=None, help="N or HxW pixels (default: the model's largest)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch-size", type=int, default=4, help="prompts per packed forward")


def check_generation_args(args, info) -> None:
    """Generation settings, and ``--size`` against the checkpoint's latent grid (read from its configuration)."""
    config = info.config
    if not config.visual_gen:
        raise UsageError(f"{info.folder} has no generation path (visual_gen is false)")
    if args.steps < 2:
        raise UsageError(f"--steps must be >= 2, got {args.steps}")
    if not args.shift > 0:
        raise UsageError(f"--shift must be > 0, got {args.shift}")
    lo, hi = args.cfg_interval
    if not lo <= hi:
        raise UsageError(f"--cfg-interval must be LO HI with LO <= HI, got {lo} {hi}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.size is not None:
        h, w = args.size
        s = config.latent_downsample
        top = config.max_latent_size * s
        if h <= 0 or w <= 0 or h % s or w % s or h > top or w > top:
            raise UsageError(f"--size {h}x{w}: height and width must be multiples of {s} between {s} and {top} "
                             f"for this model (e.g. --size {top} or --size {max(s, top // 2)}x{top})")


def generator_from_args(model, tok, packing, args):
    from .generate import ImageGenerator

    return ImageGenerator(model, tok, packing, steps=args.steps, shift=args.shift, cfg_text_scale=args.cfg_scale,
                          cfg_img_scale=args.cfg_img_scale, cfg_interval=tuple(args.cfg_interval),
                          renorm_min=args.renorm_min)


def read_prompts(sources, *, option: str = "--prompts") -> list[str]:
    """Prompts from files: ``.txt`` one per line; ``.json``/``.jsonl`` records with ``prompt``/``caption``/``text``
    or plain strings. A source that is not a file is an error naming ``option``."""
    out: list[str] = []
    for src in sources:
        if os.path.isdir(src):
            raise UsageError(f"{option} {src}: a folder, not a prompt file (.txt, .json or .jsonl)")
        if not os.path.isfile(src):
            raise UsageError(f"{option} {src}: no such file (give prompt files; a single prompt goes in --prompt)")
        with open(src, encoding="utf-8") as f:
            text = f.read()
        if src.endswith((".json", ".jsonl")):
            try:
                recs = json.loads(text)
                recs = recs if isinstance(recs, list) else [recs]
            except json.JSONDecodeError:
                try:
                    recs = [json.loads(line) for line in text.splitlines() if line.strip()]
                except json.JSONDecodeError as e:
                    raise UsageError(f"{option} {src}: not JSON or JSON lines ({e})") from None
            for r in recs:
                if isinstance(r, str):
                    out.append(r)
                elif isinstance(r, dict):
                    val = next((r[k] for k in ("prompt", "caption", "text") if isinstance(r.get(k), str)), None)
                    if val is None:
                        raise UsageError(f"{option} {src}: a record without a prompt/caption/text string: {r!r:.80}")
                    out.append(val)
                else:
                    raise UsageError(f"{option} {src}: records must be strings or objects, got {type(r).__name__}")
        else:
            out += [line.strip() for line in text.splitlines() if line.strip()]
    return out
