"""Evaluate a checkpoint.

``python -m unigendet.evaluate det --checkpoint DIR --data ROOT [--split test] [--limit N]``
    FakeClue-style detection: accuracy and macro-F1 over parseable answers and over the detection-head verdicts,
    ROUGE-L, CSS, per-category tables and the unparseable count (``unigendet.eval.evaluate_detection``).

``python -m unigendet.evaluate gen --checkpoint DIR --prompts P... --reference-dir D``
    Text-to-image: generates one image per prompt, the FID against the reference images (bundled Inception, see
    ``unigendet.eval.fid``) and the share of generated images the model's own detector calls fake.

Both write ``<out-dir>/<name>.json`` and ``<out-dir>/<name>.md`` and print the Markdown.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

from unigendet.inference.cli import (
    add_detection_args,
    add_generation_args,
    add_model_args,
    detector_from_args,
    generator_from_args,
    load_from_args,
    read_prompts,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m unigendet.evaluate", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="task", required=True)

    d = sub.add_parser("det", help="detection and explanation metrics on a FakeClue-style split")
    d.add_argument("--data", required=True, help="FakeClue root (holding data_json/), or a folder with fakeclue/")
    d.add_argument("--split", default="test")
    d.add_argument("--limit", type=int, default=None, help="evaluate the first N records")
    d.add_argument("--balance", action="store_true", help="balance real/fake (seeded, as the reference loader)")
    d.add_argument("--label-source", default="text", choices=("text", "logits"),
                   help="verdict of the headline accuracy/F1 (both are always reported)")
    d.add_argument("--css-model", default=None, help="local sentence-embedding model folder for CSS (default TF-IDF)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out-dir", default="eval_results")
    d.add_argument("--no-progress", action="store_true")
    add_model_args(d)
    add_detection_args(d)

    g = sub.add_parser("gen", help="FID of generated images and the detector's fake rate on them")
    g.add_argument("--prompts", nargs="+", required=True,
                   help="prompt files (.txt / .json / .jsonl) or prompts given directly")
    g.add_argument("--reference-dir", required=True, help="real images (or a .npz of Inception statistics)")
    g.add_argument("--limit", type=int, default=None, help="use the first N prompts")
    g.add_argument("--fid-model", default=None,
                   help="TorchScript feature network (default: the bundled Inception); needs --trust-fid-model")
    g.add_argument("--trust-fid-model", action="store_true",
                   help="allow --fid-model: a TorchScript file is code and runs when loaded")
    g.add_argument("--fid-batch-size", type=int, default=50)
    g.add_argument("--no-detect", action="store_true", help="skip the detector's fake rate")
    g.add_argument("--out-dir", default="eval_results")
    g.add_argument("--no-progress", action="store_true")
    add_model_args(g)
    add_generation_args(g)
    add_detection_args(g, max_new_tokens=64)
    return p


def _fakeclue_root(path: str) -> str:
    if os.path.isdir(os.path.join(path, "data_json")):
        return path
    if os.path.isdir(os.path.join(path, "fakeclue", "data_json")):
        return os.path.join(path, "fakeclue")
    raise FileNotFoundError(f"no FakeClue data_json/ under {path!r} (nor under {path!r}/fakeclue)")


def _write(result: dict, out_dir: str, name: str, kind: str, title: str) -> str:
    from unigendet.eval.report import detection_markdown, generation_markdown, write_json_report

    os.makedirs(out_dir, exist_ok=True)
    write_json_report(result, os.path.join(out_dir, f"{name}.json"))
    text = detection_markdown(result, title) if kind == "detection" else generation_markdown(result, title)
    with open(os.path.join(out_dir, f"{name}.md"), "w", encoding="utf-8") as f:
        f.write(text)
    return text


def run_det(args) -> int:
    from unigendet.data import read_fakeclue
    from unigendet.eval import evaluate_detection

    root = _fakeclue_root(args.data)
    records = read_fakeclue(root, args.split, balance=args.balance, strict=False)
    if args.limit is not None:
        records = records[: args.limit]
    if not records:
        raise SystemExit(f"no usable records in {root!r} split {args.split!r}")
    model, tok, packing = load_from_args(args)
    det = detector_from_args(model, tok, packing, args)
    t0 = time.perf_counter()
    results = det.detect([r.image for r in records], batch_size=args.det_batch_size, seed=args.seed,
                         progress=not args.no_progress,
                         questions=None if args.question else [r.question for r in records])
    elapsed = time.perf_counter() - t0
    preds = [{"text": r.text, "logits": list(r.logits)} for r in results]
    res = evaluate_detection(records, preds, label_source=args.label_source,
                             css_backend="sentence" if args.css_model else "tfidf", css_model_path=args.css_model,
                             return_samples=True)
    res["settings"] = {
        "checkpoint": args.checkpoint, "data": root, "split": args.split, "limit": args.limit,
        "smsa": det.smsa, "sampling": dataclasses.asdict(det.sampling),
        "max_new_tokens": det.max_new_tokens, "seed": args.seed, "seconds": elapsed,
        "num_cut_at_limit": sum(1 for r in results if not r.finished),
    }
    name = f"detection_{args.split}"
    print(_write(res, args.out_dir, name, "detection", f"Detection ({args.split}, {len(records)} images)"))
    print(f"reports: {os.path.join(args.out_dir, name)}.json / .md")
    return 0


def run_gen(args) -> int:
    from unigendet.eval import fid_from_folders
    from unigendet.inference.generate import tensor_to_pil

    if args.fid_model is not None and not args.trust_fid_model:  # refuse before any image is generated
        raise SystemExit(f"--fid-model {args.fid_model}: a TorchScript file runs as code when loaded; add "
                         "--trust-fid-model if you trust it, or omit --fid-model to use the bundled Inception")
    prompts = read_prompts(args.prompts)
    if args.limit is not None:
        prompts = prompts[: args.limit]
    if len(prompts) < 2:
        raise SystemExit(f"FID needs at least 2 generated images, got {len(prompts)} prompt(s)")
    model, tok, packing = load_from_args(args)
    gen = generator_from_args(model, tok, packing, args)
    img_dir = os.path.join(args.out_dir, "generated")
    os.makedirs(img_dir, exist_ok=True)
    t0 = time.perf_counter()
    images = gen.generate(prompts, size=args.size, seed=args.seed, batch_size=args.batch_size,
                          progress=not args.no_progress)
    gen_seconds = time.perf_counter() - t0
    paths = []
    for i, img in enumerate(images):
        paths.append(os.path.join(img_dir, f"{i:05d}.png"))
        tensor_to_pil(img).save(paths[-1])
    fid = fid_from_folders(img_dir, args.reference_dir, model_path=args.fid_model, batch_size=args.fid_batch_size,
                           device=str(model.device), progress=not args.no_progress,
                           trust_code=args.trust_fid_model)
    res: dict = {"fid": float(fid), "num_generated": len(images), "generation_seconds": gen_seconds}
    if not args.no_detect:
        det = detector_from_args(model, tok, packing, args)
        results = det.detect(paths, batch_size=args.det_batch_size, seed=args.seed, progress=not args.no_progress)
        res["detector_fake_rate_head"] = sum(r.label == 0 for r in results) / len(results)
        parsed = [r for r in results if r.text_label != -1]
        res["detector_fake_rate_text"] = (sum(r.text_label == 0 for r in parsed) / len(parsed)) if parsed else None
        res["detector_num_unparseable"] = len(results) - len(parsed)
        res["detector_mean_prob_fake"] = sum(r.prob_fake for r in results) / len(results)
    res["settings"] = {
        "checkpoint": args.checkpoint, "reference_dir": args.reference_dir, "steps": args.steps,
        "cfg_scale": args.cfg_scale, "cfg_img_scale": args.cfg_img_scale, "cfg_interval": list(args.cfg_interval),
        "shift": args.shift, "size": list(args.size) if args.size else list(gen.default_size()), "seed": args.seed,
    }
    print(_write(res, args.out_dir, "generation", "generation", f"Generation ({len(images)} images)"))
    print(f"reports: {os.path.join(args.out_dir, 'generation')}.json / .md")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_det(args) if args.task == "det" else run_gen(args)


if __name__ == "__main__":
    sys.exit(main())
