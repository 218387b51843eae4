"""``python -m unigendet.train [CONFIG] [--stage gduf|diga|all] [--rounds N] [--resume [--allow-config-change]]
[--key=value ...]``

CONFIG is a preset (``tiny``, the default, or ``bagel-7b-mot``) or a JSON/YAML file; any field of
:class:`unigendet.train.TrainConfig` can be overridden with ``--key=value`` (``--lr=3e-4``,
``--gduf.steps=200``, ``--data.num_workers=2``). With no arguments it trains the tiny preset on the embedded
data set, on the GPU if there is one, else the CPU. Under ``torchrun`` every process runs this same command.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .config import load_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m unigendet.train", description=__doc__.splitlines()[0],
                                epilog="Other options: --key=value for any TrainConfig field.")
    p.add_argument("config", nargs="?", default="tiny", help="preset name or JSON/YAML file (default: tiny)")
    p.add_argument("--stage", choices=["gduf", "diga", "all"], default=None)
    p.add_argument("--rounds", type=int, default=None, help="co-evolution rounds of GDUF then DIGA")
    p.add_argument("--resume", nargs="?", const="true", default=None, metavar="BOOL",
                   help="continue from the newest checkpoint in out_dir (--resume, --resume=true|false)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="with --resume: continue even if the options differ from the checkpoint's (logged)")
    p.add_argument("--out-dir", default=None)
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to train.jsonl)")
    args, rest = p.parse_known_args(argv)
    overrides = list(rest)
    for name in ("stage", "rounds", "out_dir"):
        value = getattr(args, name)
        if value is not None:
            overrides.append(f"--{name}={value}")
    if args.resume is not None:
        overrides.append(f"--resume={args.resume}")
    if args.allow_config_change:
        overrides.append("--allow_config_change=true")
    try:
        cfg = load_config(args.config, overrides)
    except ValueError as e:
        p.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .._integrity import CheckpointError
    from ..models.config import ConfigError
    from .distributed import shutdown_distributed
    from .loop import Trainer, TrainingAborted
    from .resume import ResumeError

    try:
        trainer = Trainer(cfg, progress=not args.no_progress)
        try:
            summary = trainer.run()
        except SystemExit:  # a signal: every rank stopped at the same step and saved; no waiting
            shutdown_distributed(trainer.dist, wait=False)
            raise
    except (CheckpointError, ConfigError, ResumeError, TrainingAborted) as e:
        # Corrupt or unwritable files, a refused resume, an aborted run: one line naming the file or option.
        print(f"error: {e}", file=sys.stderr)
        return 1
    shutdown_distributed(trainer.dist)
    if not trainer.dist.is_main:  # under torchrun only rank 0 reports
        return 0
    det = summary.get("detection") or {}
    thr = summary.get("throughput") or {}
    print(f"done: {summary['global_step']} steps in {summary['train_seconds']:.0f}s"
          + (f", held-out detection accuracy (head) {det['head_accuracy']:.3f}" if det else "")
          + (f", {thr['tokens_per_s']:.0f} tokens/s" if thr else "")
          + f"; outputs in {cfg.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
