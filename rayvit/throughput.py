"""The job's training step timed on a Ray Train worker (``bench/gpu_train.py`` runs it): the
images per second, MFU and the share of time the host waited for the next batch."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from rayvit.config import Config
from rayvit.model import build_model, build_preprocessor
from rayvit.perf import mfu, peak_flops, vit_train_flops_per_image
from rayvit.predict import use_bf16
from rayvit.train_loop import (
    TRAIN,
    Stepper,
    _all_reduce,
    make_optimizer,
    prepare,
    synchronize,
    train_batches,
    warmup_cosine,
    worker_threads,
)

CLASSES = [f"c{i}" for i in range(10)]


class _Timed:
    """The batches, timing how long the host waits for each after the warm-up ones."""

    def __init__(self, batches: Iterable[Any], warmup: int, steps: int, device: torch.device) -> None:
        self.batches, self.warmup, self.steps, self.device = batches, warmup, steps, device
        self.wait = 0.0
        self.t0 = 0.0

    def __iter__(self) -> Iterator[Any]:
        it = iter(self.batches)
        for step in range(self.warmup + self.steps):
            if step == self.warmup:
                synchronize(self.device)
                self.t0 = time.perf_counter()
            t = time.perf_counter()
            batch = next(it, None)
            if batch is None:
                return
            if step >= self.warmup:
                self.wait += time.perf_counter() - t
            yield batch


def step_throughput_loop(config: dict[str, Any]) -> None:
    """One worker: the job's model, DDP wrapping, optimizer and steps on its Ray Data shard."""
    import ray.train
    import ray.train.torch

    cfg: Config = config["cfg"]
    warmup, steps = config["warmup"], config["steps"]
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device()
    torch.set_num_threads(worker_threads(cfg))
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, CLASSES)
    ddp_model = prepare(model, cfg, device)
    forward: Any = torch.compile(ddp_model) if cfg.train.compile else ddp_model
    optimizer = make_optimizer(ddp_model, cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup + steps, 0.0))
    bf16 = use_bf16(cfg.train.precision, device)
    stepper = Stepper(
        forward, ddp_model, optimizer, scheduler, build_preprocessor(cfg.model), cfg, bf16, device
    )
    shard = ray.train.get_dataset_shard(TRAIN)
    gen = torch.Generator(device=device).manual_seed(rank)
    timed = _Timed(_epochs(shard, cfg, rank, device), warmup, steps, device)
    ddp_model.train()
    totals = stepper.epoch(timed, gen)
    synchronize(device)
    elapsed = time.perf_counter() - timed.t0
    timed_images = totals.seen * steps / max(1, warmup + steps)
    images, slowest, waited = (
        _all_reduce([timed_images], device)[0],
        *_all_reduce([elapsed, timed.wait / max(elapsed, 1e-9)], device, torch.distributed.ReduceOp.MAX),
    )
    if rank == 0:
        rate = images / max(slowest, 1e-9)
        peak = peak_flops(device)
        util = mfu(rate / ctx.get_world_size(), vit_train_flops_per_image(model.config), peak)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        Path(config["out"]).write_text(
            json.dumps({"images_per_s": rate, "mfu": util, "data_wait_share": waited, "device": name})
        )


def _epochs(shard: Any, cfg: Config, rank: int, device: torch.device) -> Iterator[Any]:
    """Epoch after epoch of the shard, as the job reads them, for as many steps as asked."""
    epoch = 1
    while True:
        yield from train_batches(shard, cfg, epoch, rank, device)
        epoch += 1
