"""Quieter third-party logging for job output that people actually read."""

from __future__ import annotations

import os


def quiet_libraries() -> None:
    """Silence progress bars and chatty INFO logs of HF libraries in this process."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
