"""Benchmark: the Ray Data pipeline's decode throughput, and training fed by Ray Data vs by an
in-memory array, side by side in one Ray Train run.

1. Decode: the quick recipe's train + validation images (CIFAR-10 parquet, 50,000 PNGs)
   read, decoded by ``decode_image`` and resized to 24 px in Ray Data tasks on the local
   cluster's CPUs, materialized into the object store (what ``start_job`` does): images/s.
2. Training: the quick recipe's model, batch and 2 single-threaded DDP workers; each round
   trains one epoch of ``--images`` images twice, once from the job's Ray Data training shards
   (``train_batches``: prefetched, windowed shuffle) and once from the same decoded images as a
   uint8 array in each worker's memory (a seeded permutation strided by rank); same
   ``Preprocessor``, ``train_step`` and optimizer. The two alternate, and each keeps its best
   round, so a slow minute of a shared machine does not decide the ratio. Goal: >= 0.95 x.

Run: ``python bench/data_ingest.py [--data DIR] [--images N] [--rounds R]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import ray
import ray.train
import torch

from rayvit.cluster import init_ray
from rayvit.config import Config, RayConfig, load_config
from rayvit.data import plan_train_val, quiet_ray_data
from rayvit.job import Ingest, datasets
from rayvit.logs import quiet_libraries
from rayvit.model import build_model, build_preprocessor
from rayvit.train_loop import TRAIN, _all_reduce, param_groups, train_batches, train_step, worker_threads

ROOT = Path(__file__).resolve().parents[1]
MODES = ("in-memory array", "Ray Data")


def _array_batches(images: np.ndarray, labels: np.ndarray, cfg: Config, epoch: int) -> Any:
    """The baseline feed: a seeded permutation shared by all ranks, strided by rank."""
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    per_rank, bs = len(labels) // world, cfg.train.batch_size
    idx = np.random.default_rng([cfg.seed, epoch]).permutation(len(labels))[rank::world][:per_rank]
    for s in range(0, per_rank, bs):
        b = np.sort(idx[s : s + bs])
        yield torch.from_numpy(images[b]), torch.from_numpy(labels[b])


def bench_loop(config: dict[str, Any]) -> None:
    """Both feeds into the same training step, alternating; rates are over all workers."""
    cfg: Config = config["cfg"]
    images, labels = ray.get(config["arrays"])
    rank = ray.train.get_context().get_world_rank()
    torch.set_num_threads(worker_threads(cfg))
    torch.manual_seed(cfg.seed)
    device = ray.train.torch.get_device()
    pre = build_preprocessor(cfg.model)
    model = ray.train.torch.prepare_model(build_model(cfg.model, config["class_names"]))
    optimizer = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr)
    shard = ray.train.get_dataset_shard(TRAIN)
    gen = torch.Generator().manual_seed(rank)
    rates: dict[str, list[float]] = {m: [] for m in MODES}
    first: dict[str, list[float]] = {m: [] for m in MODES}
    for rnd in range(config["rounds"]):
        for mode in MODES if rnd % 2 == 0 else MODES[::-1]:
            if mode == "Ray Data":
                feed = ((b["image"], b["label"]) for b in train_batches(shard, cfg, rnd + 1, rank, device))
            else:
                feed = _array_batches(images, labels, cfg, rnd + 1)
            model.train()
            t0, seen = time.perf_counter(), 0
            for x, y in feed:
                if not seen:
                    first[mode].append(time.perf_counter() - t0)
                x = pre(x.to(device), train=cfg.train.augment, generator=gen)
                train_step(model, model, optimizer, x, y.to(device), cfg, False)
                seen += len(y)
            total, (slowest,) = (
                _all_reduce([seen], device)[0],
                _all_reduce([time.perf_counter() - t0], device, torch.distributed.ReduceOp.MAX),
            )
            rates[mode].append(total / slowest)
    if rank == 0:
        Path(config["out"]).write_text(json.dumps({"rates": rates, "first_batch_s": first}))


def decode_throughput(cfg: Config) -> tuple[float, int]:
    train, val, _ = plan_train_val(cfg.data, cfg.seed, cfg.model.image_size)
    t0 = time.perf_counter()
    kept = [train.dataset(cfg.data).materialize(), val.dataset(cfg.data).materialize()]
    n = sum(k.count() for k in kept)
    return n / (time.perf_counter() - t0), n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10"))
    ap.add_argument("--images", type=int, default=45_000, help="an epoch; 45,000 = the quick recipe's")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--skip-decode", action="store_true", help="only the training comparison")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. data.shuffle_buffer=0")
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="rayvit-bench-"))
    base = [f"data.path={args.data}", "wandb.mode=disabled", f"output_dir={out}", "ray.num_cpus=2"]
    quick = ROOT / "configs" / "quick.yaml"
    init_ray(RayConfig(num_cpus=2))
    quiet_libraries()
    quiet_ray_data()
    rate, n = (0.0, 0) if args.skip_decode else decode_throughput(load_config(quick, base))
    cfg = load_config(quick, [*base, f"data.train_limit={args.images}", "data.val_limit=1", *args.overrides])
    train, val, names = plan_train_val(cfg.data, cfg.seed, cfg.model.image_size)
    train_data, _, streamed = datasets(cfg, train, val)
    arrays = train.arrays(cfg.data)
    from ray import cloudpickle
    from ray.train.torch import TorchTrainer

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers do not import bench/
    TorchTrainer(
        bench_loop,
        train_loop_config={
            "cfg": cfg,
            "arrays": ray.put((arrays.images, arrays.labels)),
            "class_names": list(names),
            "rounds": args.rounds,
            "out": str(out / "rates.json"),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=2, resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}
        ),
        datasets={TRAIN: train_data},
        dataset_config=Ingest(streamed=streamed),
        run_config=ray.train.RunConfig(storage_path=str(out / "bench")),
    ).fit()
    ray.shutdown()
    found = json.loads((out / "rates.json").read_text())
    arr, rd = found["rates"][MODES[0]], found["rates"][MODES[1]]
    print(
        f"decode, Ray Data map_batches on {os.cpu_count()} cores (2 logical CPUs): {n} CIFAR-10 PNGs -> "
        f"{cfg.model.image_size}px uint8, materialized: {rate:8.0f} images/s"
    )
    print(
        f"training throughput, quick recipe (2 DDP workers x {worker_threads(cfg)} thread, batch "
        f"{cfg.train.batch_size}), {args.images} images an epoch, best of {len(arr)} alternating rounds"
    )
    print(f"  baseline in-memory uint8 array : {max(arr):8.1f} img/s   (rounds: {_fmt(arr)})")
    print(f"  Ray Data shards (iter_torch)   : {max(rd):8.1f} img/s   (rounds: {_fmt(rd)})")
    print(f"  ratio                          : {max(rd) / max(arr):8.3f}   (goal >= 0.95)")
    wait = found["first_batch_s"][MODES[1]]
    print(f"  Ray Data epoch start (first batch): {_fmt(wait)} s, included above")


def _fmt(values: list[float]) -> str:
    return ", ".join(f"{v:.1f}" for v in values)


if __name__ == "__main__":
    main()
