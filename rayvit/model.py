"""One model builder for fine-tuning a pretrained ViT or training one from scratch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import ViTConfig, ViTForImageClassification

from rayvit.config import ModelConfig
from rayvit.errors import UserError
from rayvit.preprocess import DEFAULT_MEAN, DEFAULT_STD, Preprocessor


def label_maps(class_names: list[str]) -> tuple[dict[int, str], dict[str, int]]:
    id2label = dict(enumerate(class_names))
    return id2label, {name: i for i, name in id2label.items()}


def build_model(cfg: ModelConfig, class_names: list[str]) -> ViTForImageClassification:
    """``from_pretrained`` with a fresh head, or a fresh ``ViTConfig`` when not pretrained."""
    id2label, label2id = label_maps(class_names)
    if cfg.pretrained is None:
        # image_size/patch_size and hidden_size/num_heads are checked by ModelConfig.
        arch: dict[str, Any] = dict(
            image_size=cfg.image_size,
            patch_size=cfg.patch_size,
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            intermediate_size=cfg.mlp_dim,
            hidden_dropout_prob=cfg.dropout,
            attention_probs_dropout_prob=cfg.dropout,
            num_labels=len(class_names),
            id2label=id2label,
            label2id=label2id,
        )
        vit_cfg = ViTConfig(**arch)
        vit_cfg._attn_implementation = cfg.attn_implementation
        return ViTForImageClassification(vit_cfg)
    try:
        model = ViTForImageClassification.from_pretrained(
            cfg.pretrained,
            num_labels=len(class_names),
            id2label=id2label,
            label2id=label2id,
            ignore_mismatched_sizes=True,
            attn_implementation=cfg.attn_implementation,
        )
    except OSError as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"model.pretrained: cannot load '{cfg.pretrained}': {first}") from exc
    if model.config.image_size != cfg.image_size:
        raise UserError(
            f"model.image_size={cfg.image_size} does not match the pretrained model's "
            f"{model.config.image_size}; set model.image_size={model.config.image_size}"
        )
    return model


def _pretrained_processor(pretrained: str) -> dict[str, Any]:
    local = Path(pretrained).expanduser() / "preprocessor_config.json"
    if local.is_file():
        return dict(json.loads(local.read_text()))
    if Path(pretrained).expanduser().is_dir():
        return {}
    from transformers import AutoImageProcessor

    try:
        return dict(AutoImageProcessor.from_pretrained(pretrained).to_dict())
    except OSError:
        return {}


def build_preprocessor(cfg: ModelConfig) -> Preprocessor:
    """Normalization from config, else the pretrained model's processor, else 0.5/0.5."""
    mean: tuple[float, ...] = DEFAULT_MEAN
    std: tuple[float, ...] = DEFAULT_STD
    if cfg.pretrained is not None:
        proc = _pretrained_processor(cfg.pretrained)
        mean = tuple(proc.get("image_mean", mean))
        std = tuple(proc.get("image_std", std))
    if cfg.image_mean is not None:
        mean = tuple(cfg.image_mean)
    if cfg.image_std is not None:
        std = tuple(cfg.image_std)
    if len(mean) != 3 or len(std) != 3:
        raise UserError("model.image_mean and model.image_std need exactly 3 values (RGB)")
    return Preprocessor(cfg.image_size, (mean[0], mean[1], mean[2]), (std[0], std[1], std[2]))
