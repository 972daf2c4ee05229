"""Model FLOPs and utilisation (MFU): how much of the accelerator's peak a run uses.

FLOPs are counted as 2 per multiply-add of the matrix products and convolutions (what the
peak figures count); norms, softmax, GELU and biases are left out, as usual for MFU. Any
model's count comes from torch's FLOP counter (``torch.utils.flop_counter``) over one
forward pass of a copy built on the meta device (no memory, no arithmetic); the ViT formula
below is its cross-check. One trained image costs about 3x its forward pass (forward, and a
backward pass of twice that). ViT-B/16 at 224 px: about 35.1 GFLOPs forward, 105 per
trained image.
"""

from __future__ import annotations

from typing import Any

import torch

TRAIN_TO_FORWARD = 3.0

# bf16 dense tensor-core peak (no sparsity) from the vendors' data sheets, by device name.
# More specific names first: "H100 PCIe" must not match the SXM entry.
_PEAK_BF16: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H200", 989e12),
    ("H100", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
)


def _arch(model_config: Any) -> dict[str, int]:
    """The sizes that matter, from a transformers ViT-family config."""

    def first(*names: str, default: int | None = None) -> int:
        for n in names:
            v = getattr(model_config, n, None)
            if v is not None:
                return int(v)
        if default is None:
            raise ValueError(f"model config has none of {names}")
        return default

    return {
        "image": first("image_size"),
        "patch": first("patch_size"),
        "channels": first("num_channels", default=3),
        "hidden": first("hidden_size"),
        "layers": first("num_hidden_layers"),
        "mlp": first("intermediate_size"),
        "labels": first("num_labels", default=1000),
    }


def forward_flops_per_image(model_config: Any, image_size: int) -> float:
    """Forward FLOPs of one ``image_size`` image through the image classifier that the
    transformers config ``model_config`` describes, counted by torch on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForImageClassification

    with torch.device("meta"):
        model = AutoModelForImageClassification.from_config(model_config)
        x = torch.empty(1, int(getattr(model_config, "num_channels", 3)), image_size, image_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(pixel_values=x)
    return float(counter.get_total_flops())


def train_flops_per_image(model_config: Any, image_size: int) -> float:
    """FLOPs of one trained image of any model: forward plus backward (twice the forward)."""
    return TRAIN_TO_FORWARD * forward_flops_per_image(model_config, image_size)


def vit_forward_flops_per_image(model_config: Any, num_labels: int | None = None) -> float:
    """Forward FLOPs of one image through a ViT classifier (a transformers ViT config): the
    cross-check of ``forward_flops_per_image``."""
    a = _arch(model_config)
    patches = (a["image"] // a["patch"]) ** 2
    tokens = patches + 1  # + CLS
    d, m = a["hidden"], a["mlp"]
    labels = num_labels if num_labels is not None else a["labels"]
    embed = 2 * patches * (a["channels"] * a["patch"] ** 2) * d
    qkv = 2 * tokens * d * 3 * d
    proj = 2 * tokens * d * d
    scores_and_mix = 2 * 2 * tokens * tokens * d  # Q K^T and softmax(.) V over all heads
    mlp = 2 * 2 * tokens * d * m
    head = 2 * d * labels  # on the CLS token only
    return float(embed + a["layers"] * (qkv + proj + scores_and_mix + mlp) + head)


def vit_train_flops_per_image(model_config: Any, num_labels: int | None = None) -> float:
    """FLOPs of one trained image: forward plus backward (twice the forward)."""
    return TRAIN_TO_FORWARD * vit_forward_flops_per_image(model_config, num_labels)


def peak_flops_of(name: str) -> float | None:
    """bf16 dense peak FLOP/s of an accelerator by its name, or None when not known."""
    return next((peak for key, peak in _PEAK_BF16 if key.lower() in name.lower()), None)


def peak_flops(device: torch.device | str) -> float | None:
    """bf16 dense peak FLOP/s of a CUDA device; None for CPUs and unknown GPUs (no MFU then)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return peak_flops_of(torch.cuda.get_device_name(device))


def mfu(images_per_s: float, flops_per_image: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak (per device), None without a peak."""
    if peak is None or peak <= 0:
        return None
    return images_per_s * flops_per_image / peak
