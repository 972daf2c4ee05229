"""A job's output is the project's lines, warnings and errors: no library chatter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import TINY, require_data, run_train_cli
from support import RAY_NOTICES, TEARDOWN, strip_ansi


def test_a_short_run_exits_cleanly(tmp_path: Path) -> None:
    """One short run of the CLI: exit code 0, its result as the last line, and no teardown
    traceback or Ray notice anywhere in its output."""
    require_data()
    out = run_train_cli([*TINY, f"output_dir={tmp_path / 'run'}"], timeout=600)
    log = strip_ansi(out.stdout + out.stderr)
    assert out.returncode == 0, log[-3000:]
    assert [ln for ln in log.splitlines() if TEARDOWN.search(ln)] == [], log[-3000:]
    assert [ln for ln in log.splitlines() if any(n in ln for n in RAY_NOTICES)] == []
    assert out.stdout.strip().splitlines()[-1].startswith(f"exported: {tmp_path / 'run' / 'best'}")


def _python(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``script`` run by a fresh interpreter, as a Ray worker process starts."""
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120)


def test_a_prefetch_cut_off_by_a_stopping_worker_prints_nothing() -> None:
    """Ray Data's prefetcher thread logs a traceback when the raylet connection closes under its
    ``ray.wait`` (a worker stopped as ASHA ends its trial, seen in a quick-start sweep): dropped
    in the job's processes. Any other error of that thread still prints with its traceback."""
    script = (
        "import logging\n"
        "from rayvit.logs import setup_ray_worker\n"
        "setup_ray_worker()\n"
        "log = logging.getLogger('ray.data._internal.block_batching.util')\n"
        "for exc in (OSError('Failed to read data from the socket: End of file'), ValueError('other')):\n"
        "    try:\n"
        "        raise exc\n"
        "    except Exception:\n"
        "        log.exception('Error in prefetcher thread.')\n"
    )
    done = _python(script)
    assert done.returncode == 0, done.stderr
    assert "Failed to read data from the socket" not in done.stderr, done.stderr
    assert done.stderr.count("Error in prefetcher thread.") == 1 and "ValueError: other" in done.stderr


def test_torch_s_read_only_batch_warning_is_dropped_in_the_job_s_processes() -> None:
    """Ray Data hides torch's warning about a batch in the object store's read-only memory in a
    ``catch_warnings()`` that its converting threads race on; it reached a sweep's output. The
    job's processes drop it; a fresh process without their setup still prints it."""
    script = (
        "import sys, warnings\n"
        "import numpy as np, torch\n"
        "if sys.argv[1:] == ['quiet']:\n"
        "    from rayvit.logs import quiet_libraries\n"
        "    quiet_libraries()\n"
        "a = np.zeros((2, 3), np.uint8)\n"
        "a.setflags(write=False)\n"
        "torch.as_tensor(a)\n"
        "warnings.warn('another warning still shown')\n"
    )
    for mode in ("plain", "quiet"):
        done = _python(script, mode)
        assert done.returncode == 0, done.stderr
        assert ("The given NumPy array is not writable" in done.stderr) == (mode == "plain"), done.stderr
        assert "another warning still shown" in done.stderr


def test_a_worker_killed_while_it_unpickles_a_dataset_prints_nothing() -> None:
    """A split coordinator created as ``ray job stop`` lands: the half-built Dataset's ``__del__``
    error is dropped by the job's worker setup hook; any other unraisable error still prints."""
    script = (
        "import gc, sys\n"
        "from ray.data.dataset import Dataset\n"
        "from rayvit.logs import setup_ray_worker\n"
        "setup_ray_worker()\n"
        "torn = Dataset.__new__(Dataset)\n"
        "del torn\n"
        "gc.collect()\n"
        "class Other:\n"
        "    def __del__(self):\n"
        "        raise AttributeError('still reported')\n"
        "other = Other()\n"
        "del other\n"
    )
    done = _python(script)
    assert done.returncode == 0, done.stderr
    assert "Dataset.__del__" not in done.stderr
    assert "_current_executor" not in done.stderr
    assert "still reported" in done.stderr


def test_a_worker_told_to_exit_inside_a_finalizer_exits_quietly() -> None:
    """Ray's SIGTERM handler raises SystemExit wherever the worker is; in a weakref callback
    Python would print a traceback and go on running. The worker setup hook ends it there."""
    script = (
        "import gc, weakref\n"
        "from rayvit.logs import setup_ray_worker\n"
        "setup_ray_worker()\n"
        "class Thing:\n"
        "    pass\n"
        "def killed(_):\n"
        "    raise SystemExit(1)  # what Ray's SIGTERM handler raises\n"
        "thing = Thing()\n"
        "ref = weakref.ref(thing, killed)\n"
        "del thing\n"
        "gc.collect()\n"
        "print('still running')\n"
    )
    done = _python(script)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "still running" not in done.stdout
    assert not TEARDOWN.search(done.stderr), done.stderr


def test_a_worker_group_not_placed_in_time_is_one_warning_line() -> None:
    """Ray Train's controller logs its routine, retried placement timeout as an unexpected
    error with a traceback; in the job's processes it is one warning line. Other errors of the
    controller keep their traceback."""
    script = (
        "import logging\n"
        "from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError\n"
        "from rayvit.logs import setup_ray_worker\n"
        "setup_ray_worker()\n"
        "log = logging.getLogger('ray.train.v2._internal.execution.controller.controller')\n"
        "for exc in (WorkerGroupStartupTimeoutError(num_workers=2), ValueError('other')):\n"
        "    try:\n"
        "        raise exc\n"
        "    except Exception as e:\n"
        "        log.exception('Error in control loop iteration: %s', e)\n"
    )
    done = _python(script)
    assert done.returncode == 0, done.stderr
    first = done.stderr.splitlines()[0]
    assert "WARNING" in first and first.endswith(
        "2 training worker(s) not placed in time (nodes still starting, or a lost node still "
        "counted): Ray Train decides the worker count again and retries"
    ), done.stderr
    assert "WorkerGroupStartupTimeoutError" not in done.stderr
    assert done.stderr.count("Traceback") == 1 and "ValueError: other" in done.stderr


#: A worker's output as Ray's log monitor sent it to a quick-start sweep's driver: a worker
#: still starting up when Ray stopped it (its owner, a finished trial's worker, had exited).
SIGTERM_DUMP = [
    "*** SIGTERM received at time=1796130958 on cpu 0 ***",
    "PC: @     0x7fc0b057c2a3  (unknown)  func_traverse",
    "    @     0x7fc0b025a050  175887152  (unknown)",
    "    @ 0x8948555374400000  (unknown)  (unknown)",
    "[2026-12-01 13:15:58,432 E 9484 9484] logging.cc:474: *** SIGTERM received at time=1796130958 on cpu 0 ***",
    "[2026-12-01 13:15:58,432 E 9484 9484] logging.cc:474: PC: @     0x7fc0b057c2a3  (unknown)  func_traverse",
    "[2026-12-01 13:15:58,434 E 9484 9484] logging.cc:474:     @     0x7fc0b025a050  175887152  (unknown)",
    "[2026-12-01 13:15:58,437 E 9484 9484] logging.cc:474:     @ 0x8948555374400000  (unknown)  (unknown)",
]


def test_the_driver_drops_the_stack_dump_of_a_worker_ray_stopped_but_not_a_crash() -> None:
    """Ray stops workers with SIGTERM and its C++ signal handler dumps a stack for it, which the
    driver printed among the job's lines (seen after a quick-start sweep's table). The driver's
    worker-output handler drops that dump, however Ray batches its lines, and Ray's notices; a
    crash's dump and the worker's own lines still print."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    from rayvit.logs import filter_worker_output

    printed: list[str] = []
    dispatcher.add_handler("ray_print_logs", lambda data: printed.extend(data["lines"]))
    try:
        filter_worker_output()
        filter_worker_output()  # once wrapped is enough: ray.init may run it again
        segv = [ln.replace("SIGTERM", "SIGSEGV") for ln in SIGTERM_DUMP]
        notice = "Actor with class name: 'PreemptionWatcher' has constructor arguments in the object store"
        batches = [
            (1, SIGTERM_DUMP[:3]),
            (2, ["epoch 1/3  train_loss 2.1"]),
            (1, SIGTERM_DUMP[3:]),
            (1, ["a line of the worker's own", notice]),
            (3, segv),
        ]
        for pid, lines in batches:
            dispatcher.emit({"ip": "127.0.0.1", "pid": pid, "lines": lines, "is_err": True})
    finally:
        dispatcher.remove_handler("ray_print_logs")
    assert printed == ["epoch 1/3  train_loss 2.1", "a line of the worker's own", *segv]
