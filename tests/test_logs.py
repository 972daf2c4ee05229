"""A job's output is the project's lines, warnings and errors: no library chatter."""

from __future__ import annotations

import re
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
    r"sweep over lr .*",
    r"(\(RayTrainWorker pid=\d+\) )?epoch [\d.]+/\d+  train_loss .*",
    r"trial +lr +epochs +best val acc +early stop +status",
    r"\w+_\d{5} +[\d.e-]+ +[\d.]+ +[\d.]+ +(True|False) +\w+( \*)?",
    r"exported: .*  test_accuracy [\d.]+  val_accuracy [\d.]+",
]
# Warnings and errors pass: Python's "WARNING"/"ERROR", Ray's C++ " W "/" E " lines.
WARNING_OR_ERROR = re.compile(r"\b(WARNING|ERROR|warning|error)\b|\[\d{4}-\d\d-\d\d [\d:,]+ [WE] \d+ \d+\]")
# Ray Train's placement-group cleaner reports each finished run's controller as dead, at
# WARNING level but through a handler that prints no level: Ray's, in a process of Ray's.
RAY_OWN = ["Detected that the Ray Train controller actor"]


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
    for line in CHATTER:
        assert line not in log, f"library chatter in the job's output: {line!r}"
    # (Ray folds equal-looking lines of several workers into one "[repeated Nx ...]": no counts)
    assert "epoch 0.5/1  train_loss" in log and "epoch 1/1  train_loss" in log
    assert "exported: " in log
    other = [
        ln
        for ln in log.splitlines()
        if ln.strip()
        and not any(re.fullmatch(p, ln.strip()) for p in PROJECT)
        and not WARNING_OR_ERROR.search(ln)
        and not any(s in ln for s in RAY_OWN)
    ]
    assert other == [], "\n".join(other)
