"""``python -m unigendet.train [CONFIG] [--stage gduf|diga|all] [--rounds N] [--resume|--overwrite] [--key value ...]``

CONFIG is a preset (``tiny``, the default, or ``bagel-7b-mot``) or a JSON/YAML file; every field of
:class:`unigendet.train.TrainConfig` is an option (``--lr 3e-4`` or ``--lr=3e-4``, ``--gduf.steps 200``,
``--data.num_workers=2``; ``--help`` lists them all with their types and defaults). With no arguments it trains
the tiny preset on the embedded data set, on the GPU if there is one, else the CPU. A run refuses to write into a
non-empty out_dir unless it is given ``--resume`` or ``--overwrite``. Under ``torchrun`` every process runs this
same command.
"""

from __future__ import annotations

import argparse
import sys

from unigendet._cli import CommandParser, UsageError, add_debug_arg, run_command

from .config import PRESETS, field_docs, get_value, load_config, preset

NAME = "unigendet.train"
_SECTIONS = {"": "run", "gduf": "stage 1 (GDUF)", "diga": "stage 2 (DIGA)", "optim": "optimizer",
             "data": "data"}
_BOOL_WORDS = {"1", "0", "true", "false", "yes", "no", "on", "off"}


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """``--optim.lr, --lr FLOAT`` instead of argparse's ``--optim.lr FLOAT, --lr FLOAT``."""

    def _format_action_invocation(self, action):
        if not action.option_strings or action.nargs == 0:
            return super()._format_action_invocation(action)
        metavar = self._format_args(action, self._get_default_metavar_for_optional(action))
        return ", ".join(action.option_strings) + " " + metavar


def _show(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(_show(v) for v in value)
    return str(value)


def build_parser() -> CommandParser:
    tiny, big = preset("tiny"), preset("bagel-7b-mot")
    about = __doc__.split("\n\n")[1].replace("``", "").replace(":class:`unigendet.train.TrainConfig`", "TrainConfig")
    p = CommandParser(prog="python -m unigendet.train", description=about, formatter_class=_Formatter,
                      usage="%(prog)s [CONFIG] [--OPTION VALUE ...]",
                      epilog="Defaults are the tiny preset's; the bagel-7b-mot preset's are shown where they differ.\n"
                             "Options may also be spelled with dashes (--out-dir) or set in a YAML/JSON CONFIG file.")
    p.add_argument("config", nargs="?", default="tiny",
                   help=f"preset ({', '.join(PRESETS)}) or a JSON/YAML file (default: tiny)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to train.jsonl)")
    add_debug_arg(p)
    docs = field_docs(tiny)
    leaves: dict[str, list[str]] = {}
    for d in docs:
        sec, _, leaf = d.key.rpartition(".")
        leaves.setdefault(leaf, []).append(sec)
    groups = {sec: p.add_argument_group(f"{title} options") for sec, title in _SECTIONS.items()}
    for d in docs:
        sec, _, leaf = d.key.rpartition(".")
        names = [f"--{d.key}"]
        if sec and leaves[leaf] == [sec]:  # a section field whose name is unique: --lr means --optim.lr
            names.append(f"--{leaf}")
        default, other = get_value(tiny, d.key), get_value(big, d.key)
        text = d.help + f" (default: {_show(default)}"
        text += f"; bagel-7b-mot: {_show(other)})" if other != default else ")"
        kw = dict(dest=d.key, default=argparse.SUPPRESS, metavar=d.type, help=text.replace("%", "%%"))
        if d.is_bool:
            kw.update(nargs="?", const="true")
        groups[sec].add_argument(*names, **kw)
    return p


def _normalise(argv: list[str], p: argparse.ArgumentParser) -> list[str]:
    """Make the command line unambiguous for argparse:

    * ``--out-dir`` -> ``--out_dir`` (field options are spelled with underscores);
    * a bare boolean option followed by a non-boolean word (``--resume my.yaml``) -> ``--resume=true``;
    * an unknown option followed by a value (``--steps 5``) -> ``--steps=5``, so that the value is not taken for
      CONFIG and the configuration reports the option itself (here: ambiguous between gduf and diga).
    """
    known = set(p._option_string_actions)
    bools = {o for o, a in p._option_string_actions.items() if a.nargs == "?"}
    out, i = [], 0
    while i < len(argv):
        tok = argv[i]
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        i += 1
        if not tok.startswith("--") or tok == "--":
            out.append(tok)
            continue
        key, eq, value = tok.partition("=")
        if key not in known and key.replace("-", "_") in known:
            key = "--" + key[2:].replace("-", "_")
        if not eq and nxt is not None and not nxt.startswith("-"):
            if key in bools and nxt.lower() not in _BOOL_WORDS:
                out.append(key + "=true")
                continue
            if key not in known:
                out.append(f"{key}={nxt}")
                i += 1
                continue
        out.append(key + eq + value)
    return out


def _leftover(rest: list[str]) -> list[str]:
    """Options argparse did not know, for the configuration's own (more helpful) error messages."""
    for tok in rest:
        if not tok.startswith("--"):
            raise UsageError(f"unexpected argument {tok!r}")
    return [tok if "=" in tok else f"{tok}=true" for tok in rest]


def _parse_args(argv: list[str]):
    p = build_parser()
    args, rest = p.parse_known_args(_normalise(list(argv), p))
    overrides = [f"--{k}={v}" for k, v in vars(args).items() if k not in ("config", "no_progress", "debug")]
    return args, overrides + _leftover(rest)


def parse(argv: list[str]):
    """``(TrainConfig, progress)`` from the command line; raises ``UsageError`` / ``ValueError`` on bad input."""
    args, overrides = _parse_args(argv)
    return load_config(args.config, overrides), not args.no_progress


def config_overrides(argv: list[str]) -> list[str]:
    """TrainConfig options in any accepted spelling (``--lr 3e-4``, ``--out-dir=x``) as ``--key=value`` strings,
    for commands that pass them on to :func:`load_config` (``python -m unigendet.ablate``)."""
    args, overrides = _parse_args(argv)
    if args.config != "tiny" or args.no_progress:
        raise UsageError(f"unexpected argument {args.config!r}" if args.config != "tiny" else
                         "--no-progress is an option of this command, not of the training runs")
    return overrides


def _main(argv) -> int:
    cfg, progress = parse(argv)
    from .checks import check_inputs, out_dir_problem

    check_inputs(cfg)
    problem = out_dir_problem(cfg)
    if problem is not None:
        raise UsageError(problem)
    from .distributed import shutdown_distributed
    from .loop import Trainer

    trainer = Trainer(cfg, progress=progress)
    try:
        summary = trainer.run()
    except SystemExit:  # a signal: every rank stopped at the same step and saved; no waiting
        shutdown_distributed(trainer.dist, wait=False)
        raise
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


def main(argv: list[str] | None = None) -> int:
    return run_command(NAME, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
