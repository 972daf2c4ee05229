"""Inference from an exported model folder: used by evaluation and serving."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rayvit.checkpoint import PROCESSOR_FILE, check_model_folder, read_metrics
from rayvit.model import load_model
from rayvit.plots import confusion_matrix
from rayvit.preprocess import Preprocessor, preprocess_arrays


def pick_device(prefer_gpu: bool = True) -> torch.device:
    """The accelerator when there is one, else the CPU; never hard-coded."""
    if prefer_gpu and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


@dataclass
class Prediction:
    label: str
    probability: float
    top_k: list[tuple[str, float]]


class Predictor:
    """Loads ``config.json``, ``model.safetensors`` and ``preprocessor_config.json``."""

    def __init__(self, model_dir: str | Path, device: torch.device | None = None) -> None:
        self.path = check_model_folder(model_dir)
        self.device = device or pick_device()
        model = load_model(self.path)
        # On a GPU the weights are cast to bf16 once, here, not by autocast on every batch.
        self.dtype = torch.bfloat16 if use_bf16("auto", self.device) else torch.float32
        self.model: torch.nn.Module = model.to(self.device, self.dtype).eval()  # type: ignore[arg-type]
        proc = json.loads((self.path / PROCESSOR_FILE).read_text())
        self.pre = Preprocessor.from_processor_config(proc)
        id2label = self.model.config.id2label
        self.labels = [id2label[i] for i in range(len(id2label))]
        self.metrics: dict[str, Any] = read_metrics(self.path)

    @torch.inference_mode()
    def logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model(pixel_values=pixel_values.to(self.device, self.dtype)).logits
        return out.float()

    def probabilities(self, arrays: list[np.ndarray]) -> torch.Tensor:
        """``(N, num_labels)`` softmax probabilities for uint8 ``(H, W, 3)`` images."""
        return torch.softmax(self.logits(preprocess_arrays(self.pre, arrays, self.device)), dim=-1).cpu()

    def predict(self, arrays: list[np.ndarray], top_k: int = 3) -> list[Prediction]:
        probs = self.probabilities(arrays)
        k = max(1, min(top_k, probs.shape[1]))
        values, indices = probs.topk(k, dim=-1)
        out = []
        for vals, idxs in zip(values.tolist(), indices.tolist(), strict=True):
            pairs = [(self.labels[i], float(v)) for v, i in zip(vals, idxs, strict=True)]
            out.append(Prediction(pairs[0][0], pairs[0][1], pairs))
        return out


def use_bf16(precision: str, device: torch.device) -> bool:
    """The one autocast rule of training, evaluation and serving: ``auto`` = bf16 on GPUs."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


@dataclass
class EvalResult:
    loss_sum: float
    correct: int
    count: int
    predictions: np.ndarray
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    """The labels in the order evaluated (batches from a stream come in any order)."""

    @property
    def loss(self) -> float:
        return self.loss_sum / max(1, self.count)

    @property
    def accuracy(self) -> float:
        return self.correct / max(1, self.count)


def class_counts(r: EvalResult, num_classes: int) -> list[float]:
    """Per class: true positives, predictions, images (what macro-F1 is summed from)."""
    hit = np.bincount(r.labels[r.predictions == r.labels], minlength=num_classes)
    pred = np.bincount(r.predictions, minlength=num_classes)
    true = np.bincount(r.labels, minlength=num_classes)
    return [float(v) for v in (*hit[:num_classes], *pred[:num_classes], *true[:num_classes])]


def macro_f1(tp: list[float], pred: list[float], true: list[float]) -> float:
    """Mean over classes of 2TP / (predicted + actual); a class with neither scores 0."""
    return sum(2 * t / (p + n) if p + n else 0.0 for t, p, n in zip(tp, pred, true, strict=True)) / max(
        1, len(tp)
    )


def class_report(labels: np.ndarray, predictions: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """Macro-F1 and each class's accuracy (its recall), for ``metrics.json``."""
    return confusion_report(confusion_matrix(labels, predictions, len(class_names)), class_names)


def confusion_report(cm: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 and each class's accuracy (its recall) of a ``cm[true, predicted]``
    confusion matrix: the reports of the test evaluation, the export and batch prediction."""
    tp, pred, true = (list(map(float, v)) for v in (cm.diagonal(), cm.sum(axis=0), cm.sum(axis=1)))
    return {
        "accuracy": sum(tp) / max(1.0, float(cm.sum())),
        "macro_f1": macro_f1(tp, pred, true),
        "per_class_accuracy": {
            c: (t / m if m else 0.0) for c, t, m in zip(class_names, tp, true, strict=True)
        },
    }


def evaluate(
    model: torch.nn.Module,
    pre: Preprocessor,
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    device: torch.device,
    bf16: bool,
) -> EvalResult:
    """``evaluate_batches`` over uint8 arrays, in fixed-size batches."""
    # A copy: arrays from the object store are read-only, which torch warns about.
    batches = (
        (torch.tensor(images[i : i + batch_size]), torch.tensor(labels[i : i + batch_size]))
        for i in range(0, len(labels), batch_size)
    )
    return evaluate_batches(model, pre, batches, device, bf16)


@torch.inference_mode()
def evaluate_batches(
    model: torch.nn.Module,
    pre: Preprocessor,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    bf16: bool,
) -> EvalResult:
    """Summed loss, correct count and predictions over (uint8 images, labels) batches.

    Validation during training, the final test evaluation and the evaluate stage all call this.
    """
    model.eval()
    loss_sum, preds, seen = 0.0, [], []
    for images, labels in batches:
        x = pre(images.to(device))
        y = labels.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(pixel_values=x).logits.float()
        loss_sum += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
        preds.append(logits.argmax(-1).cpu().numpy())
        seen.append(labels.cpu().numpy())
    pred = np.concatenate(preds) if preds else np.zeros(0, dtype=np.int64)
    truth = np.concatenate(seen) if seen else np.zeros(0, dtype=np.int64)
    return EvalResult(loss_sum, int((pred == truth).sum()), len(truth), pred, truth)
