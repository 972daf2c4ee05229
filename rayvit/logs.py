"""Quieter third-party logging for job output that people actually read.

A job prints its own lines, warnings and errors. What libraries add on top (progress
bars, INFO lines, Tune's experiment banner, Ray Train's per-report log) is silenced
here, in every process that calls ``quiet_libraries``: the driver and each Ray worker.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

# Notices that Ray logs at WARNING level although nothing is wrong.
_RAY_NOTICES = (
    "Token authentication is enabled for this Ray cluster",
    "Progress bars disabled",  # Ray Data, in every process that runs a dataset
    "Progress bars for operators disabled",
)
#: Ray's ``worker_process_setup_hook`` for the job's cluster (``rayvit.cluster.init_ray``).
WORKER_SETUP_HOOK = "rayvit.logs.quiet_ray_worker"


class _RayConsoleFilter(logging.Filter):
    """Lets through Ray's warnings and errors, not its INFO lines or routine notices."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING and not record.getMessage().startswith(_RAY_NOTICES)


_RAY_FILTER = _RayConsoleFilter()


def quiet_libraries() -> None:
    """Silence progress bars and chatty INFO logs of HF libraries and Ray in this process."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import datasets
    import huggingface_hub
    import transformers

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    # e.g. "Repo card metadata block was not found" for a local data set without a README
    huggingface_hub.utils.logging.set_verbosity_error()
    _quiet_ray()


def _quiet_ray() -> None:
    import ray

    # Tune's console reporter prints an experiment banner and result paths whatever its
    # verbosity; the legacy reporter, at the verbose=0 the sweep asks for, prints nothing.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # ray.init sets the "ray" logger back to INFO; a filter on its console handler stays.
    for handler in logging.getLogger("ray").handlers:
        if _RAY_FILTER not in handler.filters:
            handler.addFilter(_RAY_FILTER)
    # Some Ray Train V2 modules name their logger by file path (``getLogger(__file__)``), not
    # "ray.train.<module>", so RunConfig's LoggingConfig(log_level=...) misses them and their
    # INFO lines reach the console through the root logger Train configures at INFO: one
    # "Reporting training result ..." line per ray.train.report on every worker.
    with contextlib.suppress(ImportError):
        import ray.train.v2._internal.execution.context  # creates that logger
    ray_dir = f"{Path(ray.__file__).parent}{os.sep}"
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if name.startswith(ray_dir) and isinstance(logger, logging.Logger):
            logger.setLevel(logging.WARNING)
    quiet_ray_worker()


def quiet_ray_worker() -> None:
    """Ray runs this in every worker process of the job (``WORKER_SETUP_HOOK``), so that the
    processes no project code runs in (Ray Data's split coordinators, Ray Train's dataset
    manager) print no more than the driver: Ray Data's INFO lines ("Dataset ... execution
    finished", one per epoch and split) and notices go to its log file only, and Ray's own
    deprecation warning about options that Ray Train itself sets is dropped."""
    import warnings

    import ray.data  # noqa: F401  # configures its loggers on import: filter them after

    for handler in logging.getLogger("ray.data").handlers:
        console = isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
        if console and _RAY_FILTER not in handler.filters:
            handler.addFilter(_RAY_FILTER)
    warnings.filterwarnings("ignore", message=r"`ExecutionOptions.exclude_resources` is deprecated")


def say(line: str) -> None:
    """One line on stdout, which Ray streams from a worker to the driver.

    Not ``print``: Train V2 replaces ``print`` in its workers with a version that logs the
    line and, since Ray's worker has swapped ``sys.stdout``, also prints it: every line twice.
    """
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
