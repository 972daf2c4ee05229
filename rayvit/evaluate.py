"""Evaluate an exported model folder on the test split; write metrics and plots.

This is the DVC ``evaluate`` stage. Outputs, in ``out_dir``:

- ``metrics.json``: test accuracy/loss, per-class accuracy, the DVC hash of the
  data evaluated on and what the model folder says it was trained on;
- ``confusion.csv``: one ``actual,predicted`` row per test image (DVC's
  ``confusion`` template) and ``confusion.png``;
- ``training_curve.csv``: ``epoch,train_loss,val_loss,val_accuracy`` of every epoch of
  the chosen run, as the export wrote it into the model folder.
"""

from __future__ import annotations

import csv
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rayvit.checkpoint import METRICS_FILE, write_json
from rayvit.config import DataConfig
from rayvit.dvc import data_fingerprint
from rayvit.errors import UserError
from rayvit.export import CURVE_FILE
from rayvit.plots import confusion_matrix, plot_confusion


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    confusion: np.ndarray
    labels: list[str]


def evaluate_model(
    model_dir: str | Path,
    data_path: str,
    test_limit: int | None = None,
    batch_size: int = 256,
) -> EvalResult:
    """Test-split loss/accuracy of an exported model folder with ``Predictor``."""
    from rayvit.data import open_source, plan_test
    from rayvit.predict import Predictor, confusion_report, evaluate, use_bf16

    predictor = Predictor(model_dir)
    data_cfg = DataConfig(path=data_path, test_limit=test_limit)
    source = open_source(data_cfg)
    names = list(source.class_names)
    if names != predictor.labels:
        raise UserError(
            f"model labels {predictor.labels} differ from the data set's class names {names} ({data_path})"
        )
    test = plan_test(data_cfg, predictor.pre.image_size, source=source).arrays(data_cfg)
    dev = predictor.device
    res = evaluate(
        predictor.model, predictor.pre, test.images, test.labels, batch_size, dev, use_bf16("auto", dev)
    )
    loss, acc = res.loss, res.accuracy
    cm = confusion_matrix(test.labels, res.predictions, len(names))
    report = confusion_report(cm, names)
    trained = predictor.metrics.get("data", {}) if isinstance(predictor.metrics.get("data"), dict) else {}
    metrics: dict[str, Any] = {
        "test_accuracy": acc,
        "test_loss": loss,
        "num_test": len(test),
        "macro_f1": report["macro_f1"],
        "per_class_accuracy": report["per_class_accuracy"],
        "data": {"path": data_path, "fingerprint": data_fingerprint(data_path)},
        "model": {
            "path": str(model_dir),
            "val_accuracy": predictor.metrics.get("val_accuracy"),
            "trained_on": trained.get("fingerprint"),
        },
    }
    return EvalResult(metrics, cm, names)


def write_reports(result: EvalResult, out_dir: str | Path, model_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / METRICS_FILE, result.metrics)
    with (out / "confusion.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["actual", "predicted"])
        for i, j in zip(*np.nonzero(result.confusion), strict=True):
            w.writerows([[result.labels[i], result.labels[j]]] * int(result.confusion[i, j]))
    curve = Path(model_dir) / CURVE_FILE
    if curve.is_file():
        shutil.copyfile(curve, out / CURVE_FILE)
    plot_confusion(result.confusion, result.labels, out / "confusion.png", "test confusion matrix")
    return out
