"""Benchmark: Ray Train (1 worker) vs a bare PyTorch loop, same model, batch and threads.

Both train the quick recipe's ViT on the same real CIFAR-10 images with the same
preprocessing, optimizer and batch size; the figure is the steady-state training
images/s of the last epoch (the first one warms up). Goal: Ray Train >= 0.95 x bare.
Run: ``python bench/train_overhead.py [--data DIR] [--images N]``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.nn.functional as F

from rayvit.config import Config, load_config
from rayvit.data import load_train_val
from rayvit.model import build_model, build_preprocessor

ROOT = Path(__file__).resolve().parents[1]


def bare_loop(cfg: Config, images: np.ndarray, labels: np.ndarray, class_names: list[str]) -> float:
    """The baseline: the plainest loop a person would write around the same parts."""
    torch.set_num_threads(cfg.train.num_threads or int(cfg.scaling.cpus_per_worker))
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, class_names)
    pre = build_preprocessor(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    bs, rate = cfg.train.batch_size, 0.0
    gen = torch.Generator().manual_seed(0)
    for epoch in range(cfg.train.epochs):
        perm = np.random.default_rng(epoch).permutation(len(labels))
        model.train()
        t = time.perf_counter()
        for i in range(0, len(labels), bs):
            idx = np.sort(perm[i : i + bs])
            x = pre(torch.from_numpy(images[idx]), train=cfg.train.augment, generator=gen)
            loss = F.cross_entropy(model(pixel_values=x).logits, torch.from_numpy(labels[idx]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        rate = len(labels) / (time.perf_counter() - t)
    return rate


def ray_train(cfg: Config) -> float:
    import ray

    from rayvit.data import load_train_val as load
    from rayvit.run import init_ray, put_data, resolve_placement, trainer_for

    init_ray(cfg.ray)
    data = load(cfg.data, cfg.seed, cfg.model.image_size)
    storage = Path(cfg.output_dir)
    result = trainer_for(
        cfg,
        put_data(data),
        build_preprocessor(cfg.model),
        data.class_names,
        resolve_placement(cfg),
        storage,
        "bench",
    ).fit()
    ray.shutdown()
    return float((result.metrics or {})["images_per_s"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10"))
    ap.add_argument("--images", type=int, default=8192)
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="rayvit-bench-"))
    cfg = load_config(
        ROOT / "configs" / "quick.yaml",
        [
            f"data.path={args.data}",
            f"data.train_limit={args.images}",
            "data.val_limit=500",
            f"train.epochs={args.epochs}",
            "scaling.num_workers=1",
            "scaling.cpus_per_worker=2",
            "ray.num_cpus=2",
            f"output_dir={out}",
        ],
    )
    data = load_train_val(cfg.data, cfg.seed, cfg.model.image_size)
    bare = bare_loop(cfg, data.train.images, data.train.labels, data.class_names)
    ours = ray_train(cfg)
    shutil.rmtree(out, ignore_errors=True)
    print(
        f"training throughput, quick-recipe ViT, batch {cfg.train.batch_size}, "
        f"{int(cfg.scaling.cpus_per_worker)} threads, {args.images} images, last of {args.epochs} epochs"
    )
    print(f"  baseline bare PyTorch loop : {bare:8.1f} img/s")
    print(f"  Ray Train, 1 worker        : {ours:8.1f} img/s")
    print(f"  ratio                      : {ours / bare:8.3f}   (goal >= 0.95)")


if __name__ == "__main__":
    main()
