"""Benchmark: the project's batched preprocessing vs ``ViTImageProcessor`` at 224 px.

Both start from the same uint8 CIFAR-10 images and end with the normalized
``(N, 3, 224, 224)`` float tensor the model takes. Goal: >= 2x the images/s of
the HF processor. Run: ``python bench/preprocess_bench.py [--data DIR]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from PIL import Image

from rayvit.config import DataConfig
from rayvit.data import load_train_val
from rayvit.preprocess import Preprocessor


def _rate(fn: object, n_images: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()  # type: ignore[operator]
        best = min(best, time.perf_counter() - t)
    return n_images / best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10")
    )
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import ViTImageProcessor

    data = load_train_val(DataConfig(path=args.data, train_limit=args.images, val_limit=1), 0, 32)
    arrays = data.train.images
    pre = Preprocessor(224)
    proc = ViTImageProcessor(
        **{k: v for k, v in pre.processor_config().items() if k != "image_processor_type"}
    )
    pil = [Image.fromarray(a) for a in arrays]

    ours = _rate(lambda: pre(torch.from_numpy(arrays)), len(arrays), args.repeats)
    theirs = _rate(lambda: proc(images=pil, return_tensors="pt"), len(arrays), args.repeats)
    diff = (
        (pre(torch.from_numpy(arrays)) - proc(images=pil, return_tensors="pt")["pixel_values"]).abs().mean()
    )
    print(f"preprocess 224px, {len(arrays)} CIFAR-10 images, {args.threads} threads")
    print(f"  baseline ViTImageProcessor : {theirs:10.0f} img/s")
    print(f"  rayvit Preprocessor        : {ours:10.0f} img/s")
    print(f"  speed-up                   : {ours / theirs:10.2f}x   (goal >= 2x)")
    print(f"  mean |difference|          : {float(diff):10.4f}  (normalized units)")


if __name__ == "__main__":
    main()
