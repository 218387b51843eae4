"""Argument helpers shared by the ``python -m unigendet.detect / generate / evaluate`` commands."""

from __future__ import annotations

import argparse
import json
import os

import torch

__all__ = [
    "add_detection_args",
    "add_generation_args",
    "add_model_args",
    "detector_from_args",
    "generator_from_args",
    "load_from_args",
    "parse_size",
    "read_prompts",
]

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", required=True,
                   help="checkpoint folder (save_checkpoint output plus tokenizer files), or fine-tuned weights "
                        "when --base is given")
    g.add_argument("--base", default=None, help="base folder (e.g. BAGEL-7B-MoT) under the fine-tuned --checkpoint")
    g.add_argument("--tokenizer", default=None, help="'tiny' or a tokenizer folder (default: the checkpoint's)")
    g.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    g.add_argument("--dtype", default=None, choices=sorted(_DTYPES), help="default: bfloat16 on cuda, float32 on cpu")
    g.add_argument("--packing", default="auto", choices=("auto", "bagel", "tiny"), help="image-size preset")


def load_from_args(args):
    from .loading import load_for_inference

    return load_for_inference(
        args.checkpoint, base=args.base, tokenizer=args.tokenizer, device=args.device,
        dtype=_DTYPES[args.dtype] if args.dtype else None, packing=args.packing,
    )


def add_detection_args(p: argparse.ArgumentParser, *, max_new_tokens: int = 256) -> None:
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
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    g.add_argument("--smsa", default=None, choices=("reference", "paper", "off"),
                   help="SMSA rule (default: the model configuration's)")
    g.add_argument("--question", default=None, help="prompt after the image (default: FakeClue's question)")
    g.add_argument("--det-batch-size", type=int, default=8, help="images per packed prefill")


def detector_from_args(model, tok, packing, args):
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
    return Detector(model, tok, packing, smsa=args.smsa, sampling=sampling, max_new_tokens=args.max_new_tokens,
                    question=args.question or DEFAULT_QUESTION)


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


def generator_from_args(model, tok, packing, args):
    from .generate import ImageGenerator

    return ImageGenerator(model, tok, packing, steps=args.steps, shift=args.shift, cfg_text_scale=args.cfg_scale,
                          cfg_img_scale=args.cfg_img_scale, cfg_interval=tuple(args.cfg_interval),
                          renorm_min=args.renorm_min)


def read_prompts(sources) -> list[str]:
    """Prompts from files (``.txt``: one per line; ``.json``/``.jsonl``: records with ``prompt``/``caption``/``text``
    or plain strings) or, for an argument that is not a file, the argument itself."""
    out: list[str] = []
    for src in sources:
        if not os.path.isfile(src):
            out.append(src)
            continue
        with open(src, encoding="utf-8") as f:
            text = f.read()
        if src.endswith((".json", ".jsonl")):
            try:
                recs = json.loads(text)
                recs = recs if isinstance(recs, list) else [recs]
            except json.JSONDecodeError:
                recs = [json.loads(line) for line in text.splitlines() if line.strip()]
            for r in recs:
                if isinstance(r, str):
                    out.append(r)
                elif isinstance(r, dict):
                    val = next((r[k] for k in ("prompt", "caption", "text") if isinstance(r.get(k), str)), None)
                    if val is None:
                        raise ValueError(f"{src}: record without a prompt/caption/text string: {r!r}")
                    out.append(val)
                else:
                    raise ValueError(f"{src}: records must be strings or objects, got {type(r).__name__}")
        else:
            out += [line.strip() for line in text.splitlines() if line.strip()]
    return out
