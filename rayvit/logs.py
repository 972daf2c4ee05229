"""Quieter third-party logging for job output that people actually read.

A job prints its own lines, warnings and errors. What libraries add on top (progress
bars, INFO lines, Tune's experiment banner, Ray Train's per-report log) is silenced
here, in every process that calls ``quiet_libraries``: the driver and each Ray worker.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

# Notices that Ray logs at WARNING level although nothing is wrong.
_RAY_NOTICES = (
    "Token authentication is enabled for this Ray cluster",
    "Progress bars disabled",  # Ray Data, in every process that runs a dataset
    "Progress bars for operators disabled",
    # Ray Train's placement-group cleaner, once per finished run whose controller it saw end
    # before the run's placement group was gone: Ray cleaning up after itself.
    "Detected that the Ray Train controller actor",
    # Tune on an interrupted run (the job says so itself, in one line, and how to resume) ...
    "Stop signal received",
    "Experiment has been interrupted",
    # ... and on trials that failed or were interrupted (the job's table and error line say which).
    "Trials did not complete",
)
# Lines of Ray's C++ core in a worker's output, streamed to the driver as text (no Python
# logger to filter): Ray Train's preemption watcher is an actor with max_restarts=-1 whose
# arguments are worker handles, which Ray warns about for every worker group it starts.
_RAY_STREAM_NOTICES = ("Actor with class name: 'PreemptionWatcher'",)
# Ray stops a worker with SIGTERM (a trial's end releases the workers it leased, some of them
# still starting up) and Ray's C++ failure-signal handler, which owns SIGTERM until the worker's
# task loop takes it over, dumps a stack trace for it: a header line, then one line a frame,
# each also repeated through Ray's logger (``[time E pid tid] logging.cc:474: ...``).
_SIGTERM_DUMP = re.compile(r"\*\*\* SIGTERM received at time=\d+")
_DUMP_FRAME = re.compile(r"^(?:\[[^\]]*\] \S+\.cc:\d+: )?(?:PC: )?\s*@ ")
#: Ray's ``worker_process_setup_hook`` for the job's cluster (``rayvit.cluster.init_ray``).
WORKER_SETUP_HOOK = "rayvit.logs.setup_ray_worker"


class _RayNoticeFilter(logging.Filter):
    """Drops Ray's routine notices only (any level passes otherwise)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_RAY_NOTICES)


class _RayConsoleFilter(_RayNoticeFilter):
    """Lets through Ray's warnings and errors, not its INFO lines or routine notices."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING and super().filter(record)


class _StartTimeoutLine(logging.Filter):
    """Ray Train's controller logs a worker group that was not placed in time as an unexpected
    error, with a traceback, although it is routine and retried: nodes the autoscaler is still
    adding, or an elastic run sized on a view that still counted a node just lost. One line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if type(exc).__name__ == "WorkerGroupStartupTimeoutError":
            n = getattr(exc, "num_workers", "?")
            record.msg = (
                f"{n} training worker(s) not placed in time (nodes still starting, or a lost node "
                "still counted): Ray Train decides the worker count again and retries"
            )
            record.args, record.exc_info, record.exc_text = (), None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


class _PrefetcherAtExit(logging.Filter):
    """Ray Data's block prefetcher (a thread of every worker that iterates a dataset) logs an
    error with a traceback when its ``ray.wait`` finds the connection to the raylet closed: the
    worker is being stopped (a trial ASHA ended, a finished run's workers released) while the
    thread waits. Nothing is lost then; any other error of the thread still prints."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        closed = isinstance(exc, OSError) and "Failed to read data from the socket" in str(exc)
        return not (closed and record.getMessage() == "Error in prefetcher thread.")


_RAY_FILTER = _RayConsoleFilter()
#: Filters on loggers of Ray's, applied where the records are made: in processes of Ray's whose
#: console handlers the job never configures (the placement-group cleaner is a detached actor,
#: the prefetcher a thread of each worker), and to rewrite a record rather than drop it.
_RAY_LOGGER_FILTERS: dict[str, logging.Filter] = {
    "ray.train.v2._internal.execution.controller.placement_group_cleaner": _RayNoticeFilter(),
    "ray.train.v2._internal.execution.controller.controller": _StartTimeoutLine(),
    "ray.data._internal.block_batching.util": _PrefetcherAtExit(),
}


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
    # DDP's gradient layout check compares the strides of a depthwise convolution's weight
    # gradient with its bucket's, including a size-1 dimension whose stride means nothing: a
    # ConvNeXt warned once per worker about nothing.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    # Ray Data's iter_torch_batches gives torch zero-copy views of the object store's read-only
    # memory and hides torch's warning about it inside ``warnings.catch_warnings()``, which is
    # not thread-safe: with its prefetch threads converting batches side by side, one thread
    # restores the filters while another converts, and the warning (with a second line, its
    # source) reached a sweep's output once per worker. A filter set here, before any batch,
    # is part of every state those threads restore. The loop only reads its batches (slices,
    # gathers, preprocessing into new tensors), never writes them in place.
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
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


def setup_ray_worker() -> None:
    """Every Ray worker process of the job (``WORKER_SETUP_HOOK``): quiet, and silent when it
    is killed.

    Ray's worker answers SIGTERM by raising ``SystemExit``. A worker that is already exiting
    (its task loop done, the interpreter finalizing) and then gets the SIGTERM of a kill
    raises it inside whatever finalizer runs, and prints ``Exception ignored in ...`` and a
    traceback into the job's output. Once the exit has begun, SIGTERM does what it does by
    default: end the process. Before that, a SIGTERM that lands in a finalizer ends the
    process there (``_on_unraisable``).
    """
    quiet_ray_worker()
    atexit.register(signal.signal, signal.SIGTERM, signal.SIG_DFL)
    if sys.unraisablehook is not _on_unraisable:
        _on_unraisable.previous = sys.unraisablehook  # type: ignore[attr-defined]
        sys.unraisablehook = _on_unraisable


def _on_unraisable(unraisable: Any) -> None:
    """What a kill does to a Ray worker inside a finalizer, without the traceback it prints.

    - Ray's SIGTERM handler raises ``SystemExit`` wherever the worker is; inside a finalizer (a
      weakref callback, a ``__del__`` run by the garbage collector) Python prints ``Exception
      ignored in ...`` and a traceback, and drops the exit. The worker exits here instead, as it
      was told to.
    - A kill that cuts short the unpickling of a Ray Data ``Dataset`` (a split coordinator
      created as the job is stopped) leaves a half-built object whose ``__del__`` reads an
      attribute ``__setstate__`` never set: dropped.

    Anything else is reported as before."""
    exc, obj = unraisable.exc_value, unraisable.object
    if isinstance(exc, SystemExit):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exc.code if isinstance(exc.code, int) else 1)
    torn = (
        isinstance(exc, AttributeError)
        and getattr(obj, "__qualname__", "") == "Dataset.__del__"
        and getattr(obj, "__module__", "") == "ray.data.dataset"
    )
    if not torn:
        _on_unraisable.previous(unraisable)  # type: ignore[attr-defined]


def filter_worker_output() -> None:
    """Drop Ray's C++ notices, and the stack dump of a worker that Ray stopped with SIGTERM, from
    the worker output that the driver prints.

    Ray streams each worker's stdout and stderr to the driver, which prints them through
    handlers of ``ray._private.ray_logging.global_worker_stdstream_dispatcher`` (``ray.init``
    adds the one named ``ray_print_logs``). Lines that Ray's C++ core writes there pass no
    Python logger, so this wraps that handler. The dump of a SIGTERM stays in the worker's log
    file; a crash's (SIGSEGV, SIGABRT, ...) still prints. Call after ``ray.init``.
    """
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    name = "ray_print_logs"
    with dispatcher._lock:
        for i, (hname, handler) in enumerate(dispatcher.handlers):
            if hname == name and not getattr(handler, "_rayvit_filtered", False):
                dispatcher.handlers[i] = (name, _without_notices(handler))


def _without_notices(handler: Any) -> Any:
    dumping: set[tuple[Any, Any]] = set()  # (ip, pid) of the workers whose SIGTERM dump runs on

    def keep(source: tuple[Any, Any], line: str) -> bool:
        if _SIGTERM_DUMP.search(line):
            dumping.add(source)
            return False
        if source in dumping:
            if _DUMP_FRAME.match(line):
                return False
            dumping.discard(source)
        return not any(n in line for n in _RAY_STREAM_NOTICES)

    def emit(data: dict[str, Any]) -> None:
        source = (data.get("ip"), data.get("pid"))
        lines = [ln for ln in data.get("lines", []) if keep(source, ln)]
        if lines or not data.get("lines"):
            handler({**data, "lines": lines})

    emit._rayvit_filtered = True  # type: ignore[attr-defined]
    return emit


def quiet_ray_worker() -> None:
    """Runs in every worker process of the job (``setup_ray_worker``) and the driver, so that the
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
    for name, log_filter in _RAY_LOGGER_FILTERS.items():
        logger = logging.getLogger(name)
        if log_filter not in logger.filters:
            logger.addFilter(log_filter)
    warnings.filterwarnings("ignore", message=r"`ExecutionOptions.exclude_resources` is deprecated")


def say(line: str) -> None:
    """One line on stdout, which Ray streams from a worker to the driver.

    Not ``print``: Train V2 replaces ``print`` in its workers with a version that logs the
    line and, since Ray's worker has swapped ``sys.stdout``, also prints it: every line twice.
    """
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
