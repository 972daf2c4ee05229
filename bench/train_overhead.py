"""Benchmark: Ray Train (1 worker) vs a bare PyTorch loop, same model, batch and threads.

Both train the quick recipe's ViT on the same real CIFAR-10 images with the same
preprocessing, optimizer and batch size; the figure is the steady-state training
images/s of the last epoch (the first one warms up). Goal: Ray Train >= 0.95 x bare.

The default thread count is the quick recipe's per worker (``scaling.cpus_per_worker``
0.99 -> 1 torch thread). The two take turns for ``--rounds`` rounds and each keeps its
best round, so a slow minute of a shared machine does not decide the ratio.
``--threads 2`` gives the whole 2-core machine to the loop; then Ray's own processes
(GCS, raylet, dashboard, the Train controller) compete with it for the same cores.
Run: ``python bench/train_overhead.py [--data DIR] [--images N] [--threads T] [--rounds R]``.
"""

from __future__ import annotations

import argparse
import os
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
from rayvit.train_loop import worker_threads

ROOT = Path(__file__).resolve().parents[1]


def bare_loop(cfg: Config, images: np.ndarray, labels: np.ndarray, class_names: list[str]) -> float:
    """The baseline: the plainest loop a person would write around the same parts."""
    torch.set_num_threads(worker_threads(cfg))
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
    """One Ray Train run built exactly as the job builds each trial's."""
    import ray

    from rayvit.job import open_storage, start_job

    job = start_job(cfg, open_storage(cfg))
    result = job.trainer({}, "bench").fit()
    ray.shutdown()
    return float((result.metrics or {})["images_per_s"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10"))
    ap.add_argument("--images", type=int, default=8192)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of both loops")
    ap.add_argument("--rounds", type=int, default=2, help="bare and Ray Train take turns this often")
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="rayvit-bench-"))
    cfg = load_config(
        ROOT / "configs" / "quick.yaml",
        [
            f"data.path={args.data}",
            f"data.train_limit={args.images}",
            "data.val_limit=500",
            f"train.epochs={args.epochs}",
            "train.evals_per_epoch=1",
            f"train.num_threads={args.threads}",
            "scaling.num_workers=1",
            f"scaling.cpus_per_worker={args.threads}",
            f"ray.num_cpus={max(2, args.threads)}",
            f"output_dir={out}",
        ],
    )
    data = load_train_val(cfg.data, cfg.seed, cfg.model.image_size)
    bare: list[float] = []
    ours: list[float] = []
    for _ in range(max(1, args.rounds)):
        bare.append(bare_loop(cfg, data.train.images, data.train.labels, data.class_names))
        ours.append(ray_train(cfg))
        shutil.rmtree(out, ignore_errors=True)
    print(
        f"training throughput, quick-recipe ViT, batch {cfg.train.batch_size}, {args.threads} torch "
        f"thread(s) on {os.cpu_count()} cores, {args.images} images, last of {args.epochs} epochs, "
        f"best of {len(bare)} alternating rounds"
    )
    print(f"  baseline bare PyTorch loop : {max(bare):8.1f} img/s   (rounds: {rounds(bare)})")
    print(f"  Ray Train, 1 worker        : {max(ours):8.1f} img/s   (rounds: {rounds(ours)})")
    print(f"  ratio                      : {max(ours) / max(bare):8.3f}   (goal >= 0.95)")


def rounds(values: list[float]) -> str:
    return ", ".join(f"{v:.1f}" for v in values)


if __name__ == "__main__":
    main()
