"""``python -m unigendet.ablate``: the paper's ablations, re-run on the tiny preset over several seeds.

``--study detection`` (default): three settings, each trained (or not) on the embedded data set and evaluated on its
held-out split:

* ``full``      GDUF with SMSA (``smsa=paper``);
* ``no-smsa``   GDUF with the generative tokens invisible to the detection tokens (``smsa=off``);
* ``no-gduf``   the untuned base: no GDUF at all (for the tiny preset the base is the freshly initialised model,
                the analogue of the paper's zero-shot BAGEL).

``--study generation``: DIGA's effect on the generator. Per seed, one GDUF run, then from its final model two
second stages of the same length on the same generation packs: ``diga`` (flow loss + alignment to the frozen GDUF
detector, ``w_diga`` as configured) and ``control`` (the same stage with ``w_diga=0``: plain flow training). Each
model's held-out prompt score and FID are reported.

Writes ``ablation.json`` and ``ablation.md`` (detection: ours next to the paper's numbers, whatever the tiny scale
shows; generation: ``generation.json`` / ``generation.md``) in ``--out-dir``, mean and standard deviation over
``--seeds``. Extra training options go to every training run (e.g. ``--gduf.steps 200``; ``--overwrite`` to replace
the runs of an earlier ablation in the same folder).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

from unigendet._cli import CommandParser, UsageError, add_debug_arg, run_command

NAME = "unigendet.ablate"

#: Table 4 of the paper (Acc, F1, ROUGE-L, CSS on FakeClue, in %).
PAPER = {
    "full": {"accuracy": 98.0, "f1_macro": 97.7, "rouge_l": 56.3, "css": 79.8},
    "no-smsa": {"accuracy": 95.0, "f1_macro": 94.6, "rouge_l": 50.9, "css": 77.7},
    "no-gduf": {"accuracy": 40.5, "f1_macro": 34.1, "rouge_l": 23.9, "css": 46.2},
}
SETTINGS = {"full": {"smsa": "paper"}, "no-smsa": {"smsa": "off"}, "no-gduf": {"smsa": "paper"}}
GEN_SETTINGS = ("gduf", "diga", "control")
_METRICS = ("accuracy", "f1_macro", "rouge_l", "css", "head_accuracy")
_GEN_METRICS = ("prompt_score", "exact", "fid")


def _pct(x):
    return None if x is None else 100.0 * float(x)


def _train(opts: list[str], progress: bool) -> dict:
    from unigendet.train.config import load_config
    from unigendet.train.loop import Trainer

    return Trainer(load_config("tiny", opts), progress=progress).run()


def run_setting(name: str, out_dir: str, overrides: list[str], progress: bool = True) -> dict:
    """Train (GDUF only; DIGA does not change the detector) and evaluate one setting; returns its metrics."""
    from unigendet.train.config import load_config
    from unigendet.train.loop import Trainer

    opts = [f"--smsa={SETTINGS[name]['smsa']}", "--stage=gduf", f"--out-dir={out_dir}", "--sample_images=0",
            "--gen_eval_samples=0", *overrides]
    cfg = load_config("tiny", opts)
    trainer = Trainer(cfg, progress=progress)
    if name == "no-gduf":
        os.makedirs(cfg.out_dir, exist_ok=True)
        det = trainer.evaluate_detection(trainer.test_records[: cfg.eval_samples])
    else:
        det = trainer.run()["detection"]
    rep = det["report"]
    return {"head_accuracy": _pct(det["head_accuracy"]), "n": det["n"],
            **{m: _pct(rep.get(m)) for m in _METRICS if m != "head_accuracy"},
            "unparseable": rep.get("num_unparseable")}


def run_generation_seed(out_dir: str, seed: int, overrides: list[str], progress: bool = True) -> dict:
    """GDUF, then DIGA and the plain-flow control from the same GDUF model; their ``generation`` summaries."""
    common = [f"--seed={seed}", "--eval_samples=0", *overrides]
    gduf_dir = os.path.join(out_dir, "gduf")
    res = {"gduf": _train(["--stage=gduf", f"--out-dir={gduf_dir}", *common], progress)["generation"]}
    start = os.path.join(gduf_dir, "final")
    for name, extra in (("diga", []), ("control", ["--diga.w_diga=0"])):
        opts = ["--stage=diga", f"--model={start}", f"--out-dir={os.path.join(out_dir, name)}", *common, *extra]
        res[name] = _train(opts, progress)["generation"]
    return res


def _mean_std(values: list) -> dict:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "values": values}
    return {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
            "values": values}


def aggregate(per_seed: dict[int, dict[str, dict]], metrics) -> dict:
    """``{seed: {setting: {metric: value}}}`` -> ``{setting: {metric: {mean, std, values}}}``."""
    settings = list(next(iter(per_seed.values())))
    return {s: {m: _mean_std([per_seed[seed][s].get(m) for seed in per_seed]) for m in metrics} for s in settings}


def _f(cell: dict, digits: int = 1) -> str:
    if cell["mean"] is None:
        return "-"
    return f"{cell['mean']:.{digits}f} ± {cell['std']:.{digits}f}"


def markdown(results: dict, seeds: list[int]) -> str:
    lines = ["# Ablation (tiny preset on the embedded data set) next to the paper (BAGEL-7B on FakeClue)", "",
             f"Mean ± standard deviation over seeds {', '.join(map(str, seeds))}.", "",
             "| setting | Acc | F1 | ROUGE-L | CSS | head Acc | paper Acc | paper F1 | paper ROUGE-L | paper CSS |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in results.items():
        p = PAPER[name]
        lines.append(f"| {name} | {_f(r['accuracy'])} | {_f(r['f1_macro'])} | {_f(r['rouge_l'])} | {_f(r['css'])} | "
                     f"{_f(r['head_accuracy'])} | {p['accuracy']} | {p['f1_macro']} | {p['rouge_l']} | {p['css']} |")
    lines += ["", "Acc/F1 are over answers that state a verdict (unparseable answers are excluded and counted in "
              "ablation.json); head Acc uses the detection head. The tiny scale is not expected to reproduce the "
              "paper's absolute numbers."]
    return "\n".join(lines) + "\n"


def generation_markdown(results: dict, seeds: list[int], chance: float | None) -> str:
    lines = ["# DIGA's effect on the generator (tiny preset, held-out scene prompts)", "",
             f"Mean ± standard deviation over seeds {', '.join(map(str, seeds))}; prompt score chance = "
             f"{'-' if chance is None else f'{chance:.4f}'}.", "",
             "| after | prompt score | all four attributes right | FID |", "| --- | ---: | ---: | ---: |"]
    label = {"gduf": "GDUF", "diga": "GDUF + DIGA", "control": "GDUF + the same steps of plain flow training"}
    for name, r in results.items():
        lines.append(f"| {label[name]} | {_f(r['prompt_score'], 3)} | {_f(r['exact'], 3)} | {_f(r['fid'], 1)} |")
    return "\n".join(lines) + "\n"


def _parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds must name at least one seed, each once, got {text!r}")
    return seeds


def _main(argv: list[str]) -> int:
    from unigendet.train.__main__ import config_overrides
    from unigendet.train.checks import out_dir_problem
    from unigendet.train.config import load_config

    p = CommandParser(prog="python -m unigendet.ablate", description=__doc__.splitlines()[0],
                      epilog="Any other option is a training option (see python -m unigendet.train --help).")
    p.add_argument("--study", default="detection", choices=("detection", "generation"))
    p.add_argument("--out-dir", default=None, help="default runs/ablation (detection) or runs/diga-effect")
    p.add_argument("--settings", default="full,no-smsa,no-gduf",
                   help="detection study: comma-separated subset of the settings")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    p.add_argument("--no-progress", action="store_true")
    add_debug_arg(p)
    args, rest = p.parse_known_args(argv)
    overrides = config_overrides(rest)
    seeds = _parse_seeds(args.seeds)
    out_dir = args.out_dir or ("runs/ablation" if args.study == "detection" else "runs/diga-effect")
    names = [s.strip() for s in args.settings.split(",") if s.strip()] if args.study == "detection" else ["gduf"]
    bad = [n for n in names if n not in SETTINGS and args.study == "detection"]
    if bad:
        raise UsageError(f"--settings: unknown settings {bad}; choose from {list(SETTINGS)}")
    folders = {(seed, n): os.path.join(out_dir, f"seed{seed}", n) for seed in seeds
               for n in (names if args.study == "detection" else GEN_SETTINGS)}
    for folder in folders.values():  # every run's options and folder are checked before the first one starts
        problem = out_dir_problem(load_config("tiny", [f"--out-dir={folder}", *overrides]))
        if problem is not None:
            raise UsageError(problem)
    os.makedirs(out_dir, exist_ok=True)
    progress = not args.no_progress
    if args.study == "detection":
        per_seed = {seed: {n: run_setting(n, folders[(seed, n)], [f"--seed={seed}", *overrides], progress)
                           for n in names} for seed in seeds}
        results = aggregate(per_seed, _METRICS)
        with open(os.path.join(out_dir, "ablation.json"), "w") as f:
            json.dump({"seeds": seeds, "ours": results, "per_seed": per_seed,
                       "paper": {n: PAPER[n] for n in names}}, f, indent=2)
        table = markdown(results, seeds)
        with open(os.path.join(out_dir, "ablation.md"), "w") as f:
            f.write(table)
    else:
        per_seed = {seed: run_generation_seed(os.path.join(out_dir, f"seed{seed}"), seed, overrides, progress)
                    for seed in seeds}
        results = aggregate(per_seed, _GEN_METRICS)
        chance = next(iter(per_seed.values()))["gduf"].get("chance")
        with open(os.path.join(out_dir, "generation.json"), "w") as f:
            json.dump({"seeds": seeds, "results": results, "per_seed": per_seed, "chance": chance}, f, indent=2)
        table = generation_markdown(results, seeds, chance)
        with open(os.path.join(out_dir, "generation.md"), "w") as f:
            f.write(table)
    print(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(NAME, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
