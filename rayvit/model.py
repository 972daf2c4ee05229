"""One model builder for any image classifier transformers knows: pretrained or built from config.

``model.pretrained`` is anything ``AutoModelForImageClassification`` loads (a hub id, a local
folder, a ``timm/...`` model through transformers' timm wrapper); with it null, the model is
built untrained from ``model.model_type`` and the sizes in ``model.arch``
(``AutoConfig.for_model``). Either way the classification head is new, sized for the data's
classes, with ``id2label``/``label2id``. ``FAMILIES`` is the one place that names architecture
classes: the families the docs list and the tests build tiny; any other ``model_type`` with an
image-classification head works the same way.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rayvit.config import ModelConfig
from rayvit.errors import UserError
from rayvit.preprocess import DEFAULT_MEAN, DEFAULT_STD, Preprocessor
from rayvit.storage import fetch_dir, is_uri

if TYPE_CHECKING:
    from transformers import PreTrainedConfig, PreTrainedModel


@dataclass(frozen=True)
class Family:
    """A model family the docs list: its classification class and sizes of a tiny build."""

    classifier: str
    """The class ``AutoModelForImageClassification`` builds for this ``model_type``."""
    tiny: dict[str, Any] = field(default_factory=dict)
    """``model.arch`` of a model small enough for a unit test (at 32 px)."""


#: A tiny encoder in the names the ViT-like families share.
_TINY_ENCODER: dict[str, Any] = dict(patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)

FAMILIES: dict[str, Family] = {
    "vit": Family("ViTForImageClassification", {**_TINY_ENCODER, "intermediate_size": 64}),
    "deit": Family("DeiTForImageClassification", {**_TINY_ENCODER, "intermediate_size": 64}),
    "beit": Family("BeitForImageClassification", {**_TINY_ENCODER, "intermediate_size": 64}),
    "dinov2": Family("Dinov2ForImageClassification", {**_TINY_ENCODER, "mlp_ratio": 2}),
    "swin": Family(
        "SwinForImageClassification",
        dict(patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4),
    ),
    "convnext": Family(
        "ConvNextForImageClassification",
        dict(num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], patch_size=2),
    ),
    "resnet": Family(
        "ResNetForImageClassification",
        dict(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic"),
    ),
}


def label_maps(class_names: list[str]) -> tuple[dict[int, str], dict[str, int]]:
    id2label = dict(enumerate(class_names))
    return id2label, {name: i for i, name in id2label.items()}


def attn_kwargs(attn_implementation: str) -> dict[str, Any]:
    """``attn_implementation`` for ``from_pretrained``/``from_config``; none for ``auto`` (the
    family's best, or what it has: a ConvNet has no attention to choose)."""
    return {} if attn_implementation == "auto" else {"attn_implementation": attn_implementation}


def architecture_config(cfg: ModelConfig, num_labels: int = 2) -> PreTrainedConfig:
    """The transformers config of an untrained build: the family's defaults, ``model.arch`` on
    top, ``model.image_size`` where the family has an input size."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    arch = AutoConfig.for_model(cfg.model_type, **cfg.arch)
    if hasattr(arch, "image_size"):
        arch.image_size = cfg.image_size
    arch.num_labels = num_labels
    if not arch.architectures:  # a family with several heads (DeiT's teacher one): the plain one
        names = MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES[cfg.model_type]
        arch.architectures = [names if isinstance(names, str) else names[0]]
    return arch


def pretrained_source(pretrained: str) -> str:
    """A hub id or local folder as it is; a storage URI (``s3://``, ``gs://``: an exported model,
    e.g. an earlier run's ``best/``) as this node's cached copy of it."""
    if not is_uri(pretrained):
        return pretrained
    cache = os.environ.get("RAYVIT_CACHE", "~/.cache/rayvit")
    return str(fetch_dir(pretrained, cache, key="model.pretrained"))


def build_model(cfg: ModelConfig, class_names: list[str]) -> PreTrainedModel:
    """``from_pretrained`` with a fresh head, or a fresh model from ``model_type`` + ``arch``."""
    from transformers import AutoModelForImageClassification

    id2label, label2id = label_maps(class_names)
    if cfg.pretrained is None:
        arch = architecture_config(cfg, len(class_names))
        arch.id2label, arch.label2id = id2label, label2id
        try:
            built: PreTrainedModel = AutoModelForImageClassification.from_config(
                arch, **attn_kwargs(cfg.attn_implementation)
            )
            return built
        except ValueError as exc:  # e.g. an attention kernel the family does not have
            reason = _first_line(exc).split(". ")[0]
            raise UserError(
                f"model: cannot build '{cfg.model_type}': {reason} (model.attn_implementation=auto fits any family)"
            ) from exc
    try:
        loaded: PreTrainedModel = AutoModelForImageClassification.from_pretrained(
            pretrained_source(cfg.pretrained),
            num_labels=len(class_names),
            id2label=id2label,
            label2id=label2id,
            ignore_mismatched_sizes=True,
            **attn_kwargs(cfg.attn_implementation),
        )
        return loaded
    except (OSError, ValueError) as exc:
        raise UserError(f"model.pretrained: cannot load '{cfg.pretrained}': {_first_line(exc)}") from exc


def load_model(folder: str | Path, attn_implementation: str = "auto") -> PreTrainedModel:
    """A saved classifier (checkpoint or export) as it was trained, whatever its family."""
    from transformers import AutoModelForImageClassification

    model: PreTrainedModel = AutoModelForImageClassification.from_pretrained(
        folder, **attn_kwargs(attn_implementation)
    )
    return model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _pretrained_processor(pretrained: str) -> dict[str, Any]:
    local = Path(pretrained).expanduser() / "preprocessor_config.json"
    if local.is_file():
        return dict(json.loads(local.read_text()))
    if Path(pretrained).expanduser().is_dir():
        return {}
    from transformers import AutoImageProcessor

    try:
        return dict(AutoImageProcessor.from_pretrained(pretrained).to_dict())
    except (OSError, ValueError):
        return {}


def build_preprocessor(cfg: ModelConfig) -> Preprocessor:
    """The pretrained model's own processor (size, crop, resample, mean, std), with
    ``model.image_mean``/``image_std`` on top; from scratch a resize to ``model.image_size``
    with those (else 0.5/0.5)."""
    mean: tuple[float, ...] = DEFAULT_MEAN
    std: tuple[float, ...] = DEFAULT_STD
    base = Preprocessor(cfg.image_size)
    if cfg.pretrained is not None:
        proc = _pretrained_processor(pretrained_source(cfg.pretrained))
        if proc:
            base = Preprocessor.from_processor_config(proc)
            mean, std = base.mean, base.std
            if base.image_size != cfg.image_size:
                raise UserError(
                    f"model.image_size={cfg.image_size} does not match the pretrained model's "
                    f"{base.image_size}; set model.image_size={base.image_size}"
                )
    if cfg.image_mean is not None:
        mean = tuple(cfg.image_mean)
    if cfg.image_std is not None:
        std = tuple(cfg.image_std)
    if len(mean) != 3 or len(std) != 3:
        raise UserError("model.image_mean and model.image_std need exactly 3 values (RGB)")
    return Preprocessor(
        base.image_size,
        (mean[0], mean[1], mean[2]),
        (std[0], std[1], std[2]),
        base.resize_side,
        base.shortest_edge,
        base.resample,
    )
