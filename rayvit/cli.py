"""Command-line front for the training job: config file, overrides, one-line errors.

``--help`` lists every config key from the config models themselves (type, bounds,
default, docstring), so it cannot drift from what the job accepts. ``python -m rayvit.cli``
prints the same text as Markdown for ``docs/config.md``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from rayvit.config import Config, config_help, load_config
from rayvit.errors import UserError

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[1]
TRAIN_PROG = "ray_jobs/train.py"
TRAIN_DESCRIPTION = "Sweep, train and export a ViT image classifier on Ray."
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


def run_cli(main: Callable[[], T]) -> T:
    """Run ``main``; a ``UserError`` becomes one line on stderr and exit code 2."""
    try:
        return main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume from the last checkpoint", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    sys.stdout.write(config_markdown())
