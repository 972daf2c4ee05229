"""Checkpoint and export folders that describe themselves.

A training checkpoint is ``model/`` (an HF ``save_pretrained`` folder with its
``preprocessor_config.json``), ``training_state.pt`` (optimizer, scheduler,
epoch), ``config.yaml`` and ``metrics.json``. The exported model folder is the
``model/`` part of the best checkpoint plus ``metrics.json`` and ``config.yaml``
(see ``rayvit.export``): serving needs nothing else.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rayvit.config import Config
from rayvit.errors import UserError
from rayvit.logs import say
from rayvit.model import load_model
from rayvit.preprocess import Preprocessor

if TYPE_CHECKING:
    from transformers import PreTrainedModel

MODEL_DIR = "model"
STATE_FILE = "training_state.pt"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
PROCESSOR_FILE = "preprocessor_config.json"


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically so a crash never leaves a truncated file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def save_model_folder(model: PreTrainedModel, pre: Preprocessor, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    write_json(folder / PROCESSOR_FILE, pre.processor_config())


def save_training_checkpoint(
    folder: Path,
    model: PreTrainedModel,
    pre: Preprocessor,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    epoch: int,
    metrics: dict[str, Any],
    cfg: Config,
) -> None:
    save_model_folder(model, pre, folder / MODEL_DIR)
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch,
            "elapsed_s": float(metrics.get("elapsed_s", 0.0)),
        },
        folder / STATE_FILE,
    )
    (folder / CONFIG_FILE).write_text(cfg.to_yaml())
    write_json(folder / METRICS_FILE, metrics)


@dataclass
class Restored:
    model: PreTrainedModel
    state: dict[str, Any]
    """optimizer, scheduler, epoch, elapsed_s"""


def load_training_checkpoint(checkpoint: Any, attn_implementation: str) -> Restored | None:
    """What ``save_training_checkpoint`` wrote, from a Ray Train checkpoint (None: start fresh).

    A checkpoint that cannot be read (a torn upload, a corrupt file) is reported and the
    previous one kept beside it in the run's folder is tried instead.
    """
    if checkpoint is None:
        return None
    for candidate in _newest_first(checkpoint):
        try:
            with candidate.as_directory() as d:
                # from_pretrained, not load_state_dict: transformers maps its saved key names.
                model = load_model(Path(d) / MODEL_DIR, attn_implementation)
                state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
            return Restored(model, state)
        except Exception as exc:
            say(
                f"warning: checkpoint {candidate.path} cannot be read ({_reason(exc)}); trying the previous one"
            )
    raise UserError(f"no readable checkpoint in {Path(checkpoint.path).parent} to resume from")


def model_without_weights(checkpoint: Any, attn_implementation: str) -> Any:
    """The checkpoint's architecture, freshly initialised, from its small ``config.json`` alone:
    for the ranks that get the weights and the training state from rank 0 instead of reading
    the whole checkpoint again."""
    from transformers import AutoConfig, AutoModelForImageClassification

    fs, path = checkpoint.filesystem, checkpoint.path.rstrip("/")
    with fs.open_input_stream(f"{path}/{MODEL_DIR}/config.json") as f:
        raw = json.loads(f.read())
    config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    return AutoModelForImageClassification.from_config(config, attn_implementation=attn_implementation)


def _newest_first(checkpoint: Any) -> list[Any]:
    """``checkpoint`` and then the older ``checkpoint_*`` folders beside it, newest first."""
    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    fs, path = checkpoint.filesystem, checkpoint.path.rstrip("/")
    parent, name = path.rsplit("/", 1)
    try:
        infos = fs.get_file_info(pafs.FileSelector(parent))
    except OSError:
        infos = []
    older = sorted(
        (
            i.base_name
            for i in infos
            if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")
        ),
        reverse=True,
    )
    return [checkpoint] + [Checkpoint(f"{parent}/{n}", filesystem=fs) for n in older if n < name]


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def check_model_folder(folder: str | Path) -> Path:
    """Fail with one line naming the path unless it is a complete exported model."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise UserError(f"model folder not found: {path}")
    missing = [n for n in ("config.json", "model.safetensors", PROCESSOR_FILE) if not (path / n).is_file()]
    if missing:
        raise UserError(f"model folder {path} is incomplete: missing {', '.join(missing)}")
    try:
        cfg = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"model folder {path}: config.json is not valid JSON ({exc})") from exc
    if not cfg.get("id2label"):
        raise UserError(f"model folder {path}: config.json has no id2label")
    return path


def read_metrics(folder: str | Path) -> dict[str, Any]:
    f = Path(folder) / METRICS_FILE
    return dict(json.loads(f.read_text())) if f.is_file() else {}


def model_identity(folder: str | Path, metrics: dict[str, Any] | None = None) -> tuple[str, str]:
    """``(name, version)`` of an exported model folder.

    ``name`` and ``version`` from ``metrics.json`` when it has them; else the
    folder's name and the first 12 hex digits of the weights' SHA-256, so two
    different models never share a version.
    """
    path = Path(folder)
    metrics = read_metrics(path) if metrics is None else metrics
    name = str(metrics.get("name") or path.resolve().name)
    version = metrics.get("version")
    if not version:
        digest = hashlib.sha256()
        with (path / "model.safetensors").open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        version = digest.hexdigest()[:12]
    return name, str(version)


def verify_model_folder(folder: str | Path) -> Path:
    """``check_model_folder`` plus the cheap reads a server does at build time.

    The weights' header and the preprocessor config are read (not the tensors),
    so a corrupt export fails before anything is deployed, naming the path.
    """
    path = check_model_folder(folder)
    try:
        json.loads((path / PROCESSOR_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"model folder {path}: {PROCESSOR_FILE} is not valid JSON ({exc})") from exc
    from safetensors import safe_open

    try:
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            if not list(f.keys()):
                raise UserError(f"model folder {path}: model.safetensors holds no tensors")
    except UserError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"model folder {path}: model.safetensors cannot be read ({first})") from exc
    metrics = path / METRICS_FILE
    if metrics.exists():
        try:
            json.loads(metrics.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"model folder {path}: {METRICS_FILE} is not valid JSON ({exc})") from exc
    return path
