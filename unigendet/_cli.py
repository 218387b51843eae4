"""What every ``python -m unigendet.<command>`` shares: one-line errors, ``--debug``, quiet third-party logs.

A user mistake (a bad option, a missing file, an unusable checkpoint path) is reported as ONE line on stderr,
``unigendet.detect: error: <what is wrong>``, and the command exits with status 2 before any model is loaded. An
unexpected failure is reported the same way with exit status 1. ``--debug`` adds the Python traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence

__all__ = ["CommandParser", "UsageError", "add_debug_arg", "configure_logging", "run_command"]


class UsageError(Exception):
    """A problem with what the user asked for: reported as one line, exit status 2."""


class CommandParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors raise :class:`UsageError` (one line, no usage dump) and that takes no
    abbreviated options (``--gduf.step`` is an error, not ``--gduf.steps``)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # noqa: D401  (argparse's hook)
        raise UsageError(f"{message} (see --help)")


def add_debug_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="print the Python traceback of an error")


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (it may be replaced after set-up)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:
            self.handleError(record)


#: Third-party loggers that log routine INFO lines (font caches, tokenizer choices) at import or first use.
_NOISY = ("matplotlib", "PIL", "absl", "fontTools", "h5py", "urllib3", "filelock", "httpx", "huggingface_hub")


def configure_logging(level: int = logging.INFO) -> None:
    """Our own loggers (``unigendet.*``) at ``level`` on stderr; everybody else's at WARNING.

    ``UNIGENDET_LOG_LEVEL=DEBUG`` (or ``INFO``, ``WARNING``) overrides ``level`` for our loggers.
    """
    env = os.environ.get("UNIGENDET_LOG_LEVEL")
    if env:
        level = getattr(logging, env.upper(), level)
    root = logging.getLogger()
    if not root.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("unigendet").setLevel(level)
    for name in _NOISY:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:  # absl keeps its own verbosity, which it may set to INFO when first used
        import absl.logging as absl_logging

        absl_logging.set_verbosity(absl_logging.WARNING)
    except ImportError:
        pass


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, KeyError) and exc.args:
        text = str(exc.args[0])
    if isinstance(exc, OSError) and exc.filename and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}"
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return "; ".join(lines) or type(exc).__name__


#: What a bad input raises (``unigendet.data.readers.DataError`` is a ``ValueError``): exit status 2.
_USER_ERRORS = (UsageError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, ValueError)


def run_command(name: str, main: Callable[[Sequence[str]], int], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)`` with the shared error handling; returns the exit status.

    ``UsageError`` and the errors a bad input produces (``FileNotFoundError``, ``ValueError``, ...) exit with 2,
    anything else with 1; both as one line ``<name>: error: ...``, with the traceback only under ``--debug``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    configure_logging()
    try:
        return int(main(argv) or 0)
    except _USER_ERRORS as e:
        if debug:
            traceback.print_exc()
        print(f"{name}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # an unexpected failure: still one line unless asked for the traceback
        if debug:
            traceback.print_exc()
        print(f"{name}: error: {type(e).__name__}: {_one_line(e)} (run again with --debug for the traceback)",
              file=sys.stderr)
        return 1
