"""Quieter third-party logging for job output that people actually read."""

from __future__ import annotations

import os
import sys


def quiet_libraries() -> None:
    """Silence progress bars and chatty INFO logs of HF libraries in this process."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def say(line: str) -> None:
    """One line on stdout, which Ray streams from a worker to the driver.

    Not ``print``: Train V2 replaces ``print`` in its workers with a version that logs the
    line and, since Ray's worker has swapped ``sys.stdout``, also prints it: every line twice.
    """
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
