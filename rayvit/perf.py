"""Model FLOPs and utilisation (MFU) of ViT training."""

from __future__ import annotations

from typing import Any

import torch


def vit_train_flops_per_image(config: Any) -> float:
    """Training FLOPs per image (3x the forward pass) of a ViT from its HF config."""
    side, patch, d = int(config.image_size), int(config.patch_size), int(config.hidden_size)
    layers, mlp = int(config.num_hidden_layers), int(config.intermediate_size)
    tokens = (side // patch) ** 2 + 1
    embed = 2 * (tokens - 1) * (3 * patch * patch) * d
    per_layer = 2 * tokens * (4 * d * d + 2 * d * mlp) + 2 * 2 * tokens * tokens * d
    head = 2 * d * int(getattr(config, "num_labels", 10))
    return 3.0 * (embed + layers * per_layer + head)


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of a known GPU, else None (no MFU on CPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12)):
        if key in name:
            return peak
    return None


def mfu(images_per_s: float, flops_per_image: float, peak: float) -> float:
    return images_per_s * flops_per_image / peak
