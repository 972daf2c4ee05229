"""Command-line front for the training job: config file, overrides, one-line errors."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

from rayvit.config import Config, load_config
from rayvit.errors import UserError

T = TypeVar("T")


def parse_config(argv: Sequence[str] | None, default_config: str | None, description: str) -> Config:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--config",
        default=default_config,
        help=f"YAML config file (default: {default_config})",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=1e-4"
    )
    args = parser.parse_args(argv)
    return load_config(args.config, args.overrides)


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
