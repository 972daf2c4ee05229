"""The end of a job: the chosen checkpoint tested once, then exported to ``<output_dir>/best``.

Both steps read the checkpoint from the run's storage, so they work wherever they
run: the test evaluation is a Ray task placed like a training worker that reads the
test split through the same Ray Data reader as training, and the export is built in a
local temporary folder and uploaded with ``metrics.json`` last (a ``best/`` without it
is incomplete).
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train

from rayvit.checkpoint import CONFIG_FILE, METRICS_FILE, MODEL_DIR, write_json
from rayvit.config import Config, with_overrides
from rayvit.data import SplitPlan, plan_test, stored_side
from rayvit.dvc import data_fingerprint
from rayvit.job import BEST_DIR, Job, wandb_dir
from rayvit.logs import quiet_libraries
from rayvit.plots import confusion_matrix, plot_confusion, plot_curves
from rayvit.predict import class_report
from rayvit.tracking import log_final, resolve_mode

CURVE_FILE = "training_curve.csv"
CURVE_COLUMNS = ("epoch", "train_loss", "val_loss", "val_accuracy")


@dataclass(frozen=True)
class TestResult:
    loss: float
    accuracy: float
    predictions: tuple[int, ...]
    labels: tuple[int, ...]
    fingerprint: str


@dataclass(frozen=True)
class Chosen:
    """The checkpoint picked on the validation metric, and what it is."""

    checkpoint: ray.train.Checkpoint
    metrics: dict[str, Any]
    params: dict[str, Any]
    """Its trial's searched values, by dotted config key (empty for a single run)."""
    run_name: str
    history: list[dict[str, Any]]
    """The run's per-epoch metrics."""


@dataclass
class RunSummary:
    best_dir: str
    metrics: dict[str, Any]
    resumed_finished: bool = False


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
            timeout=10,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("GIT_COMMIT", "unknown")


def evaluate_on_test(job: Job, chosen: Chosen, test: SplitPlan) -> TestResult:
    """Final evaluation of the chosen checkpoint on the test split, as a Ray task with a
    training worker's resources, wherever the cluster has them. A test split that fits
    ``data.max_in_memory_bytes`` is decoded first, on every CPU; a larger one streams."""
    opts: dict[str, Any] = {"num_cpus": job.placement.resources_per_worker["CPU"]}
    if job.placement.use_gpu:
        opts["num_gpus"] = 1
    data = test.dataset(job.cfg.data)
    if test.decoded_bytes <= job.cfg.data.max_in_memory_bytes:
        data = data.materialize()
    result: TestResult = ray.get(
        _evaluate_task.options(**opts).remote(chosen.checkpoint, job.cfg, data, test.fingerprint)
    )
    return result


@ray.remote
def _evaluate_task(checkpoint: ray.train.Checkpoint, cfg: Config, data: Any, fingerprint: str) -> TestResult:
    import torch

    from rayvit.predict import Predictor, evaluate_batches, pick_device, use_bf16
    from rayvit.train_loop import val_batches, worker_threads

    quiet_libraries()
    torch.set_num_threads(worker_threads(cfg))
    device = pick_device()
    with checkpoint.as_directory() as d:
        predictor = Predictor(Path(d) / MODEL_DIR, device)
    batches = ((b["image"], b["label"]) for b in val_batches(data, cfg, device))
    res = evaluate_batches(
        predictor.model, predictor.pre, batches, device, use_bf16(cfg.train.precision, device)
    )
    return TestResult(
        res.loss,
        res.accuracy,
        tuple(int(p) for p in res.predictions),
        tuple(int(v) for v in res.labels),
        fingerprint,
    )


def test_split(cfg: Config) -> SplitPlan:
    """The held-out split, through the same reader as the training data."""
    return plan_test(cfg.data, stored_side(cfg.data, cfg.model.image_size), cfg.storage.endpoint_url)


def export_best(
    job: Job,
    chosen: Chosen,
    test: TestResult,
    histories: dict[str, list[dict[str, Any]]],
    extra_files: dict[str, bytes] | None = None,
    extra_metrics: dict[str, Any] | None = None,
) -> RunSummary:
    """Write ``<output_dir>/best``: model, config, metrics.json, curves and the test confusion
    matrix; the chosen run's wandb run gets the test metrics and plots."""
    cfg = with_overrides(job.cfg, chosen.params)
    names = list(job.class_names)
    report = class_report(np.asarray(test.labels), np.asarray(test.predictions), names)
    metrics: dict[str, Any] = {
        "val_accuracy": chosen.metrics["val_accuracy"],
        "val_loss": chosen.metrics["val_loss"],
        "val_macro_f1": chosen.metrics.get("val_macro_f1"),
        "test_accuracy": test.accuracy,
        "test_loss": test.loss,
        "test_macro_f1": report["macro_f1"],
        "test_per_class_accuracy": report["per_class_accuracy"],
        "learning_rate": cfg.train.lr,
        "searched": dict(chosen.params),
        "epochs": cfg.train.epochs,
        "best_epoch": chosen.metrics["epoch"],
        "data": {
            "source": cfg.data.path,
            # DVC's hash of the data folder when it is one (so the model names the exact
            # DVC-tracked data), else the reader's fingerprint of the files and rows read.
            "fingerprint": data_fingerprint(cfg.data.path) or f"{job.data_fingerprint}-{test.fingerprint}",
            "content_fingerprint": f"{job.data_fingerprint}-{test.fingerprint}",
            "num_train": job.num_train,
            "num_val": job.num_val,
            "num_test": len(test.labels),
            "class_names": list(job.class_names),
        },
        "model": {
            "pretrained": cfg.model.pretrained,
            "model_type": cfg.model.model_type if cfg.model.pretrained is None else None,
            "arch": dict(cfg.model.arch) if cfg.model.pretrained is None else {},
            "image_size": cfg.model.image_size,
        },
        "checkpoint": chosen.checkpoint.path,
        "run": chosen.run_name,
        "git_commit": git_commit(),
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **(extra_metrics or {}),
    }
    with tempfile.TemporaryDirectory(prefix="rayvit-export-") as tmp_name:
        tmp = Path(tmp_name) / BEST_DIR
        with chosen.checkpoint.as_directory() as d:
            shutil.copytree(Path(d) / MODEL_DIR, tmp)
            shutil.copy2(Path(d) / CONFIG_FILE, tmp / CONFIG_FILE)
        curves = plot_curves(histories, tmp / "training_curves.png")
        _write_curve_csv(chosen.history, tmp / CURVE_FILE)
        cm = confusion_matrix(test.labels, test.predictions, len(names))
        cm_png = plot_confusion(cm, names, tmp / "confusion_matrix.png", f"test accuracy {test.accuracy:.3f}")
        (tmp / "confusion_matrix.json").write_text(json.dumps({"labels": names, "matrix": cm.tolist()}))
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        write_json(tmp / METRICS_FILE, metrics)
        best = job.storage.upload_dir(tmp, BEST_DIR)
        mode = resolve_mode(cfg)
        log_final(
            cfg,
            job.group,
            chosen.run_name,
            Path(wandb_dir(cfg, job.storage)),
            mode,
            metrics,
            [curves, cm_png],
        )
    return RunSummary(best, metrics)


def _write_curve_csv(history: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(CURVE_COLUMNS), extrasaction="ignore")
        w.writeheader()
        for row in history:
            w.writerow({**{k: row.get(k) for k in CURVE_COLUMNS}, "epoch": int(row["epoch"])})
