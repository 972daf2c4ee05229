"""Training throughput and model FLOPs utilisation of ViT-B/16 at 224 px on one GPU.

    python bench/gpu_train.py                      # ViT-B/16, 224 px, batch 128, bf16, eager and compiled
    python bench/gpu_train.py --batch 256 --steps 50
    python bench/gpu_train.py --recipe configs/quick.yaml --device cpu --steps 5   # a smoke run anywhere

Random initialisation (no download), synthetic uint8 images, and the training job's own code:
``build_model``, the ``Preprocessor`` on the device, bf16 autocast, fused AdamW with the job's
parameter groups and ``train_step`` (loss, backward, clipping, the divergence check). MFU is
model FLOPs (3x the forward pass, ``rayvit.perf``) over the GPU's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rayvit.config import load_config  # noqa: E402
from rayvit.model import build_model, build_preprocessor  # noqa: E402
from rayvit.perf import mfu, peak_flops, train_flops_per_image  # noqa: E402
from rayvit.predict import use_bf16  # noqa: E402
from rayvit.train_loop import param_groups, train_step  # noqa: E402

CLASSES = [f"c{i}" for i in range(10)]


def model_overrides(model: str | None) -> list[str]:
    """The recipe's architecture built untrained, or ``--model``: a hub id or folder
    (``AutoModelForImageClassification``, weights loaded) or a ``model_type`` built untrained."""
    if model is None:
        return ["model.pretrained=null"]
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    if model in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES:
        return ["model.pretrained=null", f"model.model_type={model}", "model.attn_implementation=auto"]
    return [f"model.pretrained={model}", "model.attn_implementation=auto"]


def measure(
    recipe: str,
    overrides: list[str],
    device: torch.device,
    batch: int,
    steps: int,
    warmup: int,
    compiled: bool,
) -> float:
    """Images per second over ``steps`` training steps after ``warmup`` ones."""
    cfg = load_config(recipe, [*overrides, f"train.batch_size={batch}"])
    torch.manual_seed(0)
    model: Any = build_model(cfg.model, CLASSES).to(device)  # type: ignore[arg-type]
    pre = build_preprocessor(cfg.model)
    forward = torch.compile(model) if compiled else model
    opt = torch.optim.AdamW(
        param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr, fused=device.type == "cuda"
    )
    bf16 = use_bf16(cfg.train.precision, device)
    side = cfg.model.image_size
    images = torch.randint(0, 256, (batch, side, side, 3), dtype=torch.uint8, device=device)
    labels = torch.randint(0, len(CLASSES), (batch,), device=device)
    model.train()
    t0 = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            _sync(device)
            t0 = time.perf_counter()
        x = pre(images, train=cfg.train.augment)
        train_step(forward, model, opt, x, labels, cfg, bf16)
    _sync(device)
    return batch * steps / (time.perf_counter() - t0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--recipe", default=str(ROOT / "configs" / "train.yaml"), help="config whose model is timed"
    )
    ap.add_argument(
        "--model",
        default=None,
        help="hub id, folder or model_type to time (default: the recipe's, untrained)",
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps (compilation happens here)")
    ap.add_argument("--no-compile", action="store_true", help="eager only")
    args = ap.parse_args()
    device = torch.device(args.device)
    overrides = model_overrides(args.model)
    cfg = load_config(args.recipe, overrides)
    model = build_model(cfg.model, CLASSES)
    pre = build_preprocessor(cfg.model)
    flops = train_flops_per_image(model.config, pre.image_size)
    peak = peak_flops(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"{type(model).__name__} {pre.image_size}px, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
        f"parameters on {name}: {flops / 1e9:.1f} GFLOPs per trained image, batch {args.batch}, "
        f"{'bf16' if use_bf16(cfg.train.precision, device) else 'fp32'}"
    )
    del model
    for compiled in [False] if args.no_compile else [False, True]:
        rate = measure(args.recipe, overrides, device, args.batch, args.steps, args.warmup, compiled)
        util_ = mfu(rate, flops, peak)
        util = (
            f"MFU {100 * util_:.1f}% of {(peak or 0) / 1e12:.0f} TFLOP/s" if util_ is not None else "MFU n/a"
        )
        print(f"  {'torch.compile' if compiled else 'eager':<13}: {rate:8.1f} img/s  {util}")


if __name__ == "__main__":
    main()
