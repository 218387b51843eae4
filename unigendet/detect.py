"""Detect AI-generated images: ``python -m unigendet.detect IMAGE... --checkpoint DIR [--json]``.

Prints one line per image: the path, the detection-head verdict and its probability of "fake", the verdict parsed
from the answer, and the explanation. ``--json`` prints a JSON list instead.

An image that cannot be read (missing, a folder, not an image, truncated) is reported on stderr and skipped; the
others are still processed and the exit status is then 1. Bad options or checkpoint paths stop the command
before the model loads, with exit status 2.
"""

from __future__ import annotations

import json
import sys

from unigendet._cli import CommandParser, UsageError, add_debug_arg, run_command
from unigendet.inference.cli import (
    add_detection_args,
    add_model_args,
    check_detection_args,
    check_images,
    check_model_args,
    detector_from_args,
    load_from_args,
    resolve_prompt_style,
)

NAME = "unigendet.detect"
_NAMES = {0: "FAKE", 1: "REAL", -1: "?"}


def build_parser() -> CommandParser:
    p = CommandParser(prog="python -m unigendet.detect", description=__doc__.split("\n\n")[0])
    p.add_argument("images", nargs="+", help="image files")
    add_model_args(p)
    add_detection_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print JSON instead of lines")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_debug_arg(p)
    return p


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    check_detection_args(args)
    bad = dict(check_images(args.images))
    if len(bad) == len(args.images):
        path, why = next(iter(bad.items()))
        more = f" (and {len(bad) - 1} more unusable images)" if len(bad) > 1 else ""
        raise UsageError(f"image {path}: {why}{more}")
    info = check_model_args(args)
    for path, why in bad.items():
        print(f"{NAME}: error: image {path}: {why}; skipped", file=sys.stderr)
    good = [i for i, p in enumerate(args.images) if p not in bad]

    model, tok, packing = load_from_args(args)
    det = detector_from_args(model, tok, packing, args, resolve_prompt_style(args, info))
    results = det.detect([args.images[i] for i in good], batch_size=args.det_batch_size, seed=args.seed,
                         progress=not args.no_progress, skip_unreadable=True)
    by_index = dict(zip(good, results))
    failed = len(args.images) - len(good)
    for i, r in by_index.items():
        if r.error is not None:
            failed += 1
            print(f"{NAME}: error: image {args.images[i]}: {r.error}; skipped", file=sys.stderr)
    if args.json:
        out = []
        for i, path in enumerate(args.images):
            r = by_index.get(i)
            out.append({"path": path, **r.to_dict()} if r is not None else {"path": path, "error": bad[path]})
        json.dump(out, sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        for i, path in enumerate(args.images):
            r = by_index.get(i)
            if r is None or r.error is not None:
                continue
            answer = _NAMES[r.text_label].lower() if r.text_label != -1 else "unparseable"
            expl = r.explanation or r.text or "(empty answer)"
            print(f"{path}\t{_NAMES[r.label]}\tp_fake={r.prob_fake:.3f}\tanswer={answer}\t{expl}")
    if failed:
        print(f"{NAME}: {failed} of {len(args.images)} images could not be read", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    return run_command(NAME, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
