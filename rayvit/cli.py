"""Command-line front for the training job: config file, overrides, one-line errors.

``--help`` lists every config key from the config models themselves (type, bounds,
default, docstring), so it cannot drift from what the job accepts. ``python -m rayvit.cli``
prints the same text as Markdown for ``docs/config.md``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import NoReturn, TypeVar

from rayvit.config import Config, config_help, load_config
from rayvit.errors import UserError

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[1]
TRAIN_PROG = "ray_jobs/train.py"
TRAIN_DESCRIPTION = "Sweep, train and export an image classifier on Ray."
HELP_WIDTH = 100


def _shown(path: str | None) -> str | None:
    """A default config path as the user would type it from the project root."""
    if path is None:
        return None
    try:
        return Path(path).resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return path


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Fixed width: the help text is also docs/config.md, which must not depend on a terminal."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=HELP_WIDTH)


def build_parser(
    default_config: str | None, description: str, prog: str | None = None
) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog="config keys (defaults are the built-in ones; --config and key=value override them):\n\n"
        + config_help(HELP_WIDTH - 6),
        formatter_class=_HelpFormatter,
    )
    parser.add_argument(
        "--config",
        default=default_config,
        help=f"YAML config file (default: {_shown(default_config)})",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=1e-4"
    )
    return parser


def parse_config(
    argv: Sequence[str] | None, default_config: str | None, description: str, prog: str | None = None
) -> Config:
    args = build_parser(default_config, description, prog).parse_args(argv)
    return load_config(args.config, args.overrides)


def train_help() -> str:
    """``python ray_jobs/train.py --help``, exactly."""
    return build_parser(str(ROOT / "configs" / "train.yaml"), TRAIN_DESCRIPTION, TRAIN_PROG).format_help()


def config_markdown() -> str:
    """The content of ``docs/config.md``: the training job's ``--help``."""
    return (
        "# Configuration reference\n\n"
        "Every key of the training job's config, generated from `rayvit/config.py`\n"
        "(regenerate with `python -m rayvit.cli > docs/config.md`; a test checks it is current).\n"
        "Set keys in a YAML file given with `--config`, or as `key=value` overrides on the command line.\n\n"
        f"```text\n$ python {TRAIN_PROG} --help\n{train_help()}```\n"
    )


RESUME_HINT = "rerun the same command to resume from the last checkpoint"


class JobInterruptedError(Exception):
    """The job was stopped by a signal: Ctrl-C (SIGINT) or ``ray job stop`` (SIGTERM)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def run_cli(main: Callable[[], T]) -> T:
    """Run ``main``; a ``UserError`` becomes one line on stderr and exit code 2, an interrupt
    one line and 128 + the signal's number (130 for Ctrl-C, 143 for ``ray job stop``)."""
    try:
        return main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except (KeyboardInterrupt, JobInterruptedError) as exc:
        signum = exc.signum if isinstance(exc, JobInterruptedError) else signal.SIGINT
        _interrupted(signum)
    except SystemExit as exc:
        # Ray's driver answers SIGTERM with sys.exit(SIGTERM) (ray.init installs the handler).
        if exc.code == signal.SIGTERM:
            _interrupted(signal.SIGTERM)
        raise


def _interrupted(signum: int) -> NoReturn:
    name = signal.Signals(signum).name
    print(f"interrupted ({name}): {RESUME_HINT}", file=sys.stderr, flush=True)
    raise SystemExit(128 + signum) from None


def until_interrupted(fit: Callable[[], T]) -> T:
    """Run Tune's ``fit`` so that Ctrl-C and ``ray job stop`` end it as Tune ends a run on its
    own stop signal (SIGUSR1): trials stop, the experiment state is saved, ``fit`` returns;
    then ``JobInterruptedError`` is raised, so that nothing of a partial run is selected or exported.

    ``ray job stop`` sends SIGTERM to the driver (Ray's job supervisor, then SIGKILL after
    ``RAY_JOB_STOP_WAIT_TIME_S``), which Tune does not handle; Tune's own SIGINT handler
    would end ``fit`` without telling the caller. A second signal stops at once.
    """
    if threading.current_thread() is not threading.main_thread():
        return fit()
    received: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        tune_stop = signal.getsignal(signal.SIGUSR1)
        if len(received) > 1 or not callable(tune_stop):  # Tune's handler not (yet) there
            raise JobInterruptedError(signum)
        tune_stop(signal.SIGUSR1, frame)

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    saved_env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        result = fit()
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        if saved_env is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = saved_env
    if received:
        raise JobInterruptedError(received[0])
    return result


if __name__ == "__main__":
    sys.stdout.write(config_markdown())
