"""``python -m unigendet.ablate``: the paper's detection ablation, re-run on the tiny preset.

Three settings, each trained (or not) on the embedded data set and evaluated on its held-out split:

* ``full``      GDUF with SMSA (``smsa=paper``);
* ``no-smsa``   GDUF with the generative tokens invisible to the detection tokens (``smsa=off``);
* ``no-gduf``   the untuned base: no GDUF at all (for the tiny preset the base is the freshly initialised model,
                the analogue of the paper's zero-shot BAGEL).

Writes ``ablation.json`` and ``ablation.md`` (ours next to the paper's numbers, whatever the tiny scale shows) in
``--out-dir``. Extra training options go to every training run (e.g. ``--gduf.steps 200``; ``--overwrite`` to
replace the runs of an earlier ablation in the same folder).
"""

from __future__ import annotations

import json
import os
import sys

from unigendet._cli import CommandParser, UsageError, add_debug_arg, run_command

NAME = "unigendet.ablate"

#: Table 4 of the paper (Acc, F1, ROUGE-L, CSS on FakeClue, in %).
PAPER = {
    "full": {"accuracy": 98.0, "f1_macro": 97.7, "rouge_l": 56.3, "css": 79.8},
    "no-smsa": {"accuracy": 95.0, "f1_macro": 94.6, "rouge_l": 50.9, "css": 77.7},
    "no-gduf": {"accuracy": 40.5, "f1_macro": 34.1, "rouge_l": 23.9, "css": 46.2},
}
SETTINGS = {"full": {"smsa": "paper"}, "no-smsa": {"smsa": "off"}, "no-gduf": {"smsa": "paper"}}
_METRICS = ("accuracy", "f1_macro", "rouge_l", "css")


def _pct(x):
    return None if x is None else 100.0 * float(x)


def run_setting(name: str, out_dir: str, overrides: list[str], progress: bool = True) -> dict:
    """Train (GDUF only; DIGA does not change the detector) and evaluate one setting; returns its metrics."""
    from unigendet.train.config import load_config
    from unigendet.train.loop import Trainer

    opts = [f"--smsa={SETTINGS[name]['smsa']}", "--stage=gduf", f"--out-dir={os.path.join(out_dir, name)}",
            "--sample_images=0", *overrides]
    cfg = load_config("tiny", opts)
    trainer = Trainer(cfg, progress=progress)
    if name == "no-gduf":
        os.makedirs(cfg.out_dir, exist_ok=True)
        det = trainer.evaluate_detection(trainer.test_records[: cfg.eval_samples])
    else:
        det = trainer.run()["detection"]
    rep = det["report"]
    return {"head_accuracy": _pct(det["head_accuracy"]), "n": det["n"],
            **{m: _pct(rep.get(m)) for m in _METRICS}, "unparseable": rep.get("num_unparseable")}


def markdown(results: dict) -> str:
    lines = ["# Ablation (tiny preset on the embedded data set) next to the paper (BAGEL-7B on FakeClue)", "",
             "| setting | Acc | F1 | ROUGE-L | CSS | head Acc | paper Acc | paper F1 | paper ROUGE-L | paper CSS |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]

    def f(x):
        return "-" if x is None else f"{x:.1f}"

    for name, r in results.items():
        p = PAPER[name]
        lines.append(f"| {name} | {f(r['accuracy'])} | {f(r['f1_macro'])} | {f(r['rouge_l'])} | {f(r['css'])} | "
                     f"{f(r['head_accuracy'])} | {p['accuracy']} | {p['f1_macro']} | {p['rouge_l']} | {p['css']} |")
    lines += ["", "Acc/F1 are over answers that state a verdict (unparseable answers are excluded and counted in "
              "ablation.json); head Acc uses the detection head. The tiny scale is not expected to reproduce the "
              "paper's absolute numbers."]
    return "\n".join(lines) + "\n"


def _main(argv: list[str]) -> int:
    from unigendet.train.__main__ import config_overrides
    from unigendet.train.checks import out_dir_problem
    from unigendet.train.config import load_config

    p = CommandParser(prog="python -m unigendet.ablate", description=__doc__.splitlines()[0],
                      epilog="Any other option is a training option (see python -m unigendet.train --help).")
    p.add_argument("--out-dir", default="runs/ablation")
    p.add_argument("--settings", default="full,no-smsa,no-gduf", help="comma-separated subset of the settings")
    p.add_argument("--no-progress", action="store_true")
    add_debug_arg(p)
    args, rest = p.parse_known_args(argv)
    overrides = config_overrides(rest)
    names = [s.strip() for s in args.settings.split(",") if s.strip()]
    bad = [n for n in names if n not in SETTINGS]
    if bad:
        raise UsageError(f"--settings: unknown settings {bad}; choose from {list(SETTINGS)}")
    for n in names:  # every run's options and folder are checked before the first one starts
        cfg = load_config("tiny", [f"--out-dir={os.path.join(args.out_dir, n)}", *overrides])
        problem = out_dir_problem(cfg)
        if problem is not None:
            raise UsageError(problem)
    os.makedirs(args.out_dir, exist_ok=True)
    results = {n: run_setting(n, args.out_dir, overrides, progress=not args.no_progress) for n in names}
    with open(os.path.join(args.out_dir, "ablation.json"), "w") as f:
        json.dump({"ours": results, "paper": {n: PAPER[n] for n in names}}, f, indent=2)
    table = markdown(results)
    with open(os.path.join(args.out_dir, "ablation.md"), "w") as f:
        f.write(table)
    print(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(NAME, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
