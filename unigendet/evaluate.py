"""Evaluate a checkpoint.

``python -m unigendet.evaluate det --checkpoint DIR --data ROOT [--split test] [--limit N]``
    FakeClue-style detection: accuracy and macro-F1 over parseable answers and over the detection-head verdicts,
    ROUGE-L, CSS, per-category tables and the unparseable count (``unigendet.eval.evaluate_detection``).

``python -m unigendet.evaluate gen --checkpoint DIR --prompts FILE... --reference-dir D``
    Text-to-image: generates one image per prompt, the FID against the reference images (bundled Inception, see
    ``unigendet.eval.fid``) and the share of generated images the model's own detector calls fake.

Both write ``<out>/<name>.json`` and ``<out>/<name>.md`` and print the Markdown. ``--out`` defaults to ``eval/``
in the checkpoint's training run folder (``runs/tiny/final`` -> ``runs/tiny/eval``), or in the checkpoint folder
itself when it is not part of a run. Every argument is checked before the model is loaded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

from unigendet._cli import CommandParser, UsageError, add_debug_arg, run_command
from unigendet.inference.cli import (
    add_detection_args,
    add_generation_args,
    add_model_args,
    check_detection_args,
    check_generation_args,
    check_model_args,
    detector_from_args,
    generator_from_args,
    load_from_args,
    read_prompts,
    resolve_prompt_style,
)

NAME = "unigendet.evaluate"


def _add_out_arg(p) -> None:
    p.add_argument("--out", "--out-dir", dest="out", default=None,
                   help="report folder (default: eval/ in the checkpoint's training run folder, e.g. runs/tiny/eval "
                        "for runs/tiny/final; else CHECKPOINT/eval)")


def build_parser() -> CommandParser:
    p = CommandParser(prog="python -m unigendet.evaluate", description=__doc__.split("\n\n")[0])
    add_debug_arg(p)
    sub = p.add_subparsers(dest="task", required=True, parser_class=CommandParser)

    d = sub.add_parser("det", help="detection and explanation metrics on a FakeClue-style split")
    d.add_argument("--data", required=True,
                   help="FakeClue root (holding data_json/), a folder with fakeclue/, or 'embedded' (the embedded "
                        "data set the tiny preset trains on; its test split is held out)")
    d.add_argument("--split", default="test")
    d.add_argument("--limit", type=int, default=None, help="evaluate the first N records")
    d.add_argument("--balance", action="store_true", help="balance real/fake (seeded, as the reference loader)")
    d.add_argument("--label-source", default="text", choices=("text", "logits"),
                   help="verdict of the headline accuracy/F1 (both are always reported)")
    d.add_argument("--css-model", default=None, help="local sentence-embedding model folder for CSS (default TF-IDF)")
    d.add_argument("--seed", type=int, default=0)
    _add_out_arg(d)
    d.add_argument("--no-progress", action="store_true")
    add_model_args(d)
    add_detection_args(d)
    add_debug_arg(d)

    g = sub.add_parser("gen", help="FID and prompt score of generated images, and the detector's fake rate on them")
    g.add_argument("--data", default=None, choices=("embedded",),
                   help="'embedded': the held-out scenes of the embedded data set are the prompts and the FID "
                        "reference (the tiny preset's generation domain; also reports the prompt score)")
    g.add_argument("--prompts", nargs="+", default=[], metavar="FILE",
                   help="prompt files (.txt: one per line; .json / .jsonl: prompt/caption/text records)")
    g.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeatable)")
    g.add_argument("--reference-dir", default=None,
                   help="real images (or a .npz of Inception statistics); required unless --data is given")
    g.add_argument("--limit", type=int, default=None, help="use the first N prompts")
    g.add_argument("--fid-model", default=None,
                   help="TorchScript feature network (default: the bundled Inception); needs --trust-fid-model")
    g.add_argument("--trust-fid-model", action="store_true",
                   help="allow --fid-model: a TorchScript file is code and runs when loaded")
    g.add_argument("--fid-batch-size", type=int, default=50)
    g.add_argument("--no-detect", action="store_true", help="skip the detector's fake rate")
    _add_out_arg(g)
    g.add_argument("--no-progress", action="store_true")
    add_model_args(g)
    add_generation_args(g)
    add_detection_args(g, max_new_tokens=64)
    add_debug_arg(g)
    return p


def _fakeclue_root(path: str) -> str:
    if path == "embedded":
        from unigendet.data import embedded_dataset

        return embedded_dataset().fakeclue_root  # built on first use, as training does
    if not os.path.isdir(path):
        raise UsageError(f"--data {path}: no such folder")
    if os.path.isdir(os.path.join(path, "data_json")):
        return path
    if os.path.isdir(os.path.join(path, "fakeclue", "data_json")):
        return os.path.join(path, "fakeclue")
    raise UsageError(f"--data {path}: no FakeClue data_json/ folder in it (nor in {os.path.join(path, 'fakeclue')})")


def default_out_dir(checkpoint: str) -> str:
    """``eval`` in the checkpoint's training run folder (the parent of ``final/``), else in the checkpoint folder."""
    folder = checkpoint if os.path.isdir(checkpoint) else os.path.dirname(checkpoint) or "."
    parent = os.path.dirname(os.path.abspath(folder))
    if any(os.path.exists(os.path.join(parent, n)) for n in ("train.jsonl", "summary.json", "checkpoints")):
        return os.path.join(os.path.dirname(os.path.normpath(folder)) or ".", "eval")
    return os.path.join(folder, "eval")


def _resolve_out(args) -> str:
    out = args.out or default_out_dir(args.checkpoint)
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} is a file, not a folder")
    probe = os.path.abspath(out)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.access(probe, os.W_OK):
        raise UsageError(f"cannot write the reports to {out} ({probe} is not writable); pass --out DIR")
    return out


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
    from unigendet.data.readers import SkipStats
    from unigendet.eval import evaluate_detection

    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be >= 1, got {args.limit}")
    check_detection_args(args)
    if args.css_model is not None and not os.path.isdir(args.css_model):
        raise UsageError(f"--css-model {args.css_model}: no such folder (a local sentence-embedding model)")
    root = _fakeclue_root(args.data)
    split_json = os.path.join(root, "data_json", f"{args.split}.json")
    if not os.path.isfile(split_json):
        have = sorted(n[:-5] for n in os.listdir(os.path.join(root, "data_json")) if n.endswith(".json"))
        raise UsageError(f"--split {args.split}: {split_json} not found (splits here: {', '.join(have) or 'none'})")
    stats = SkipStats()
    records = read_fakeclue(root, args.split, balance=args.balance, strict=False, stats=stats)
    if args.limit is not None:
        records = records[: args.limit]
    if not records:
        raise UsageError(f"--data {args.data}: no usable records in split {args.split!r} (skipped: "
                         f"{dict(stats.counts) or 'none'})")
    info = check_model_args(args)
    out_dir = _resolve_out(args)
    style = resolve_prompt_style(args, info)
    model, tok, packing = load_from_args(args)
    det = detector_from_args(model, tok, packing, args, style)
    t0 = time.perf_counter()
    results = det.detect([r.image for r in records], batch_size=args.det_batch_size, seed=args.seed,
                         progress=not args.no_progress,
                         questions=None if args.question else [r.question for r in records], skip_unreadable=True)
    elapsed = time.perf_counter() - t0
    preds = [{"error": r.error} if r.error is not None else {"text": r.text, "logits": list(r.logits)}
             for r in results]
    res = evaluate_detection(records, preds, label_source=args.label_source,
                             css_backend="sentence" if args.css_model else "tfidf", css_model_path=args.css_model,
                             return_samples=True)
    res["settings"] = {
        "checkpoint": args.checkpoint, "data": root, "split": args.split, "limit": args.limit,
        "smsa": det.smsa, "sampling": dataclasses.asdict(det.sampling), "prompt_style": style,
        "max_new_tokens": det.max_new_tokens, "seed": args.seed, "seconds": elapsed,
        "num_cut_at_limit": sum(1 for r in results if r.error is None and not r.finished),
        "records_skipped": dict(stats.counts),
    }
    name = f"detection_{args.split}"
    print(_write(res, out_dir, name, "detection", f"Detection ({args.split}, {len(records)} images)"))
    print(f"reports: {os.path.join(out_dir, name)}.json / .md")
    return 0


def run_gen(args) -> int:
    from unigendet.eval.generation import score_generation
    from unigendet.inference.generate import tensor_to_pil

    if args.fid_model is not None and not args.trust_fid_model:  # refuse before any image is generated
        raise UsageError(f"--fid-model {args.fid_model}: a TorchScript file runs as code when loaded; add "
                         "--trust-fid-model if you trust it, or omit --fid-model to use the bundled Inception")
    prompts = read_prompts(args.prompts, option="--prompts") + list(args.prompt)
    if args.data == "embedded":
        from unigendet.data.embedded import embedded_dataset

        emb = embedded_dataset()
        if not prompts:
            with open(emb.generation_test_manifest, encoding="utf-8") as f:
                prompts = [r["prompt"] for r in json.load(f)]
        if args.reference_dir is None:
            args.reference_dir = os.path.join(emb.laion_root, "test")
    elif args.reference_dir is None:
        raise UsageError("--reference-dir is required (real images to compute FID against), or --data embedded")
    if args.limit is not None:
        prompts = prompts[: args.limit]
    if len(prompts) < 2:
        raise UsageError(f"FID needs at least 2 generated images, got {len(prompts)} prompt(s) "
                         "(give --prompts FILE or several --prompt TEXT)")
    _check_reference(args.reference_dir)
    if args.fid_model is not None and not os.path.isfile(args.fid_model):
        raise UsageError(f"--fid-model {args.fid_model}: no such file")
    if args.fid_batch_size < 1:
        raise UsageError(f"--fid-batch-size must be >= 1, got {args.fid_batch_size}")
    if not args.no_detect:
        check_detection_args(args)
    info = check_model_args(args)
    check_generation_args(args, info)
    args.prompt_style = resolve_prompt_style(args, info)  # for the detector's fake rate
    args.out_dir = out_dir = _resolve_out(args)
    model, tok, packing = load_from_args(args)
    gen = generator_from_args(model, tok, packing, args)
    img_dir = os.path.join(out_dir, "generated")
    os.makedirs(img_dir, exist_ok=True)
    t0 = time.perf_counter()
    images = gen.generate(prompts, size=args.size, seed=args.seed, batch_size=args.batch_size,
                          progress=not args.no_progress)
    gen_seconds = time.perf_counter() - t0
    paths = []
    for i, img in enumerate(images):
        paths.append(os.path.join(img_dir, f"{i:05d}.png"))
        tensor_to_pil(img).save(paths[-1])
    from unigendet.eval.fid import InceptionFeatureExtractor

    ext = InceptionFeatureExtractor(args.fid_model, device=str(model.device), trust_code=args.trust_fid_model)
    res: dict = score_generation(images, prompts, reference=args.reference_dir, extractor=ext,
                                 batch_size=args.fid_batch_size, progress=not args.no_progress)
    res.update(num_generated=len(images), generation_seconds=gen_seconds)
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


def _check_reference(path: str) -> None:
    """``--reference-dir``: a folder with at least two images, or a ``.npz`` of Inception statistics."""
    if os.path.isfile(path):
        if not path.endswith(".npz"):
            raise UsageError(f"--reference-dir {path}: a file that is not a .npz of Inception statistics")
        return
    if not os.path.isdir(path):
        raise UsageError(f"--reference-dir {path}: no such folder")
    exts = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
    n = 0
    for _, _, files in os.walk(path):
        n += sum(f.lower().endswith(exts) for f in files)
        if n >= 2:
            return
    raise UsageError(f"--reference-dir {path}: FID needs at least 2 reference images, found {n}")


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    return run_det(args) if args.task == "det" else run_gen(args)


def main(argv=None) -> int:
    return run_command(NAME, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
