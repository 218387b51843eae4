"""Generate images from text: ``python -m unigendet.generate --prompt TEXT -o FILE.png --checkpoint DIR``.

Several prompts: ``--prompts-file F --out-dir D`` (``.txt`` one prompt per line, or ``.json``/``.jsonl`` records
with a ``prompt``/``caption``/``text`` field); images are written as ``D/00000.png``, ... with ``D/prompts.json``.
"""

from __future__ import annotations

import json
import os
import sys

from unigendet._cli import CommandParser, UsageError, add_debug_arg, run_command
from unigendet.inference.cli import (
    add_generation_args,
    add_model_args,
    check_generation_args,
    check_model_args,
    generator_from_args,
    load_from_args,
    read_prompts,
)

NAME = "unigendet.generate"


def build_parser() -> CommandParser:
    p = CommandParser(prog="python -m unigendet.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("-o", "--output", default=None, help="output PNG (exactly one prompt)")
    p.add_argument("--prompts-file", default=None, help="file of prompts (.txt, .json, .jsonl)")
    p.add_argument("--out-dir", default=None, help="output folder for several prompts")
    p.add_argument("--no-progress", action="store_true")
    add_model_args(p)
    add_generation_args(p)
    add_debug_arg(p)
    return p


def _check_writable(path: str, option: str) -> None:
    """``path`` (a file or folder to be written) can be created: its nearest existing parent is a writable folder."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UsageError(f"{option} {path}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK):
        raise UsageError(f"{option} {path}: {probe} is not writable")


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += read_prompts([args.prompts_file], option="--prompts-file")
    if not prompts:
        raise UsageError("give --prompt TEXT or --prompts-file F")
    if args.output and len(prompts) != 1:
        raise UsageError(f"-o/--output takes exactly one prompt, got {len(prompts)}; use --out-dir")
    if not args.output and not args.out_dir:
        raise UsageError("give -o FILE.png (one prompt) or --out-dir D")
    if args.output:
        if os.path.isdir(args.output):
            raise UsageError(f"-o/--output {args.output} is a folder; give a file name such as out.png")
        _check_writable(args.output, "-o/--output")
    else:
        if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
            raise UsageError(f"--out-dir {args.out_dir} is a file, not a folder")
        _check_writable(args.out_dir, "--out-dir")
    check_generation_args(args, check_model_args(args))
    model, tok, packing = load_from_args(args)
    gen = generator_from_args(model, tok, packing, args)
    from unigendet.inference.generate import tensor_to_pil

    images = gen.generate(prompts, size=args.size, seed=args.seed, batch_size=args.batch_size,
                          progress=not args.no_progress)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        tensor_to_pil(images[0]).save(args.output)
        print(args.output)
        return 0
    os.makedirs(args.out_dir, exist_ok=True)
    meta = []
    for i, (prompt, img) in enumerate(zip(prompts, images)):
        name = f"{i:05d}.png"
        tensor_to_pil(img).save(os.path.join(args.out_dir, name))
        meta.append({"image": name, "prompt": prompt, "seed": args.seed, "index": i})
    with open(os.path.join(args.out_dir, "prompts.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1, ensure_ascii=False)
    print(f"wrote {len(images)} images to {args.out_dir}")
    return 0


def main(argv=None) -> int:
    return run_command(NAME, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
