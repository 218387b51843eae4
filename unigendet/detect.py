"""Detect AI-generated images: ``python -m unigendet.detect IMAGE... --checkpoint DIR [--json]``.

Prints one line per image: the path, the detection-head verdict and its probability of "fake", the verdict parsed
from the answer, and the explanation. ``--json`` prints a JSON list instead.
"""

from __future__ import annotations

import argparse
import json
import sys

from unigendet.inference.cli import add_detection_args, add_model_args, detector_from_args, load_from_args

_NAMES = {0: "FAKE", 1: "REAL", -1: "?"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m unigendet.detect", description=__doc__.split("\n\n")[0])
    p.add_argument("images", nargs="+", help="image files")
    add_model_args(p)
    add_detection_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print JSON instead of lines")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    model, tok, packing = load_from_args(args)
    det = detector_from_args(model, tok, packing, args)
    results = det.detect(args.images, batch_size=args.det_batch_size, seed=args.seed, progress=not args.no_progress)
    if args.json:
        out = [{"path": path, **r.to_dict()} for path, r in zip(args.images, results)]
        json.dump(out, sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
        return 0
    for path, r in zip(args.images, results):
        answer = _NAMES[r.text_label].lower() if r.text_label != -1 else "unparseable"
        expl = r.explanation or r.text or "(empty answer)"
        print(f"{path}\t{_NAMES[r.label]}\tp_fake={r.prob_fake:.3f}\tanswer={answer}\t{expl}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
