"""A job's output is the project's lines, warnings and errors: no library chatter."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY, require_data, run_train_cli

# Lines seen before rayvit.logs silenced them (Ray, Tune, HF hub, wandb's teardown).
CHATTER = [
    "Reporting training result",  # Ray Train V2, once per report on every worker
    "Fatal Python error",  # wandb's service teardown at a Ray worker's exit
    "Traceback",
    "Configuration for experiment",  # Tune's banner
    "View detailed results here",
    "To visualize your results with TensorBoard",
    "Wrote the latest version of all result files",
    "Started a local Ray instance",
    "Token authentication is enabled for this Ray cluster",
    "Repo card metadata block was not found",
    "wandb:",
]

# The project's own lines.
PROJECT = [
    r"data: \d+ train / \d+ val images( at \d+px)?, 10 classes from .*",
    r"sweep over \S+ .*, \d+ worker\(s\) per trial \(global batch \d+\), up to \d+ trial\(s\) at once",
    r"(\(RayTrainWorker pid=\d+\) )?epoch [\d.]+/\d+  train_loss .*",
    r"trial +train\.lr +epochs +best val_accuracy +early stop +status",
    r"\w+_\d{5} +[\d.e-]+ +[\d.]+ +[\d.]+ +(True|False) +\w+( \*)?",
    r"exported: .*  test_accuracy [\d.]+  val_accuracy [\d.]+",
]
# Warnings and errors pass: Python's "WARNING"/"ERROR", Ray's C++ " W "/" E " lines.
WARNING_OR_ERROR = re.compile(r"\b(WARNING|ERROR|warning|error)\b|\[\d{4}-\d\d-\d\d [\d:,]+ [WE] \d+ \d+\]")
# What a process killed during its own exit prints (Ray's SIGTERM handler raising SystemExit
# in a finalizer), and Ray's two notices that every run used to carry.
TEARDOWN = re.compile(r"Traceback|Exception ignored|SystemExit")
RAY_NOTICES = ["PreemptionWatcher", "Detected that the Ray Train controller actor"]


def test_a_short_run_exits_cleanly(tmp_path: Path) -> None:
    """One short run of the CLI: exit code 0, its result as the last line, and no teardown
    traceback or Ray notice anywhere in its output (the shutdown race of issue 19)."""
    require_data()
    out = run_train_cli([*TINY, f"output_dir={tmp_path / 'run'}"], timeout=600)
    log = re.sub(r"\x1b\[[0-9;]*m", "", out.stdout + out.stderr)
    assert out.returncode == 0, log[-3000:]
    assert [ln for ln in log.splitlines() if TEARDOWN.search(ln)] == [], log[-3000:]
    assert [ln for ln in log.splitlines() if any(n in ln for n in RAY_NOTICES)] == []
    assert out.stdout.strip().splitlines()[-1].startswith(f"exported: {tmp_path / 'run' / 'best'}")


@pytest.mark.slow
def test_sweep_prints_only_project_lines_warnings_and_errors(tmp_path: Path) -> None:
    require_data()
    out = run_train_cli(
        [
            *TINY,
            f"output_dir={tmp_path / 'run'}",
            "tune.lrs=[1e-3,2e-3]",
            "train.evals_per_epoch=2",
            "scaling.num_workers=1",
        ],
        timeout=600,
    )
    log = re.sub(r"\x1b\[[0-9;]*m", "", out.stdout + out.stderr)
    assert out.returncode == 0, log[-3000:]
    for line in CHATTER + RAY_NOTICES:
        assert line not in log, f"library chatter in the job's output: {line!r}"
    assert not TEARDOWN.search(log), log[-3000:]
    # (Ray folds equal-looking lines of several workers into one "[repeated Nx ...]": no counts)
    assert "epoch 0.5/1  train_loss" in log and "epoch 1/1  train_loss" in log
    assert "exported: " in log
    other = [
        ln
        for ln in log.splitlines()
        if ln.strip()
        and not any(re.fullmatch(p, ln.strip()) for p in PROJECT)
        and not WARNING_OR_ERROR.search(ln)
    ]
    assert other == [], "\n".join(other)


def _python(script: str) -> subprocess.CompletedProcess[str]:
    """``script`` run by a fresh interpreter, as a Ray worker process starts."""
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)


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
