"""The per-worker training function that Ray Train runs on every worker.

Each worker gets the config (unchanged, as a dict) and object-store references
to the uint8 train/val arrays; it reads only its shard of each epoch, reduces
metrics over all workers, and rank 0 reports a full checkpoint every epoch.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F

from rayvit.checkpoint import (
    MODEL_DIR,
    STATE_FILE,
    save_training_checkpoint,
)
from rayvit.config import Config, config_from_dict
from rayvit.logs import quiet_libraries, say
from rayvit.model import build_model
from rayvit.preprocess import Preprocessor
from rayvit.tracking import start_run

FAULT_MARKER = ".fault_injected"
HISTORY_FILE = "history.jsonl"


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    """Per-epoch metrics of a run, last report per epoch winning (a resumed epoch re-reports)."""
    f = run_dir / HISTORY_FILE
    by_epoch: dict[int, dict[str, Any]] = {}
    if f.is_file():
        for line in f.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                by_epoch[int(rec["epoch"])] = rec
    return [by_epoch[e] for e in sorted(by_epoch)]


def warmup_cosine(total_steps: int, warmup_fraction: float) -> Any:
    """LR multiplier: linear warmup, then cosine decay to zero."""
    warmup = int(total_steps * warmup_fraction)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases, norms, embeddings' tokens (1-D or token params)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or name.endswith(("cls_token", "position_embeddings")):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def worker_threads(cfg: Config) -> int:
    return cfg.train.num_threads or max(1, int(cfg.scaling.cpus_per_worker))


def _all_reduce(values: list[float], device: torch.device, op: Any = None) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return [float(v) for v in t.tolist()]


def _maybe_inject_fault(cfg: Config, run_dir: Path, epoch: int, rank: int, world: int) -> None:
    """Chaos test hook: the last rank dies once, midway through the epoch after
    ``inject_fault_epoch`` (whose checkpoint then has to carry the run)."""
    if cfg.train.inject_fault_epoch is None or cfg.train.inject_fault_epoch + 1 != epoch or rank != world - 1:
        return
    marker = run_dir / FAULT_MARKER
    if marker.exists():
        return
    marker.write_text(f"worker rank {rank} killed during epoch {epoch}\n")
    say(f"[fault injection] killing worker rank {rank} during epoch {epoch}")
    time.sleep(2.0)  # let the controller register the previous epoch's checkpoint first
    os._exit(1)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    quiet_libraries()
    cfg = config_from_dict(loop_config["config"])
    run_dir = Path(loop_config["run_dir"])
    pre = Preprocessor(cfg.model.image_size, tuple(loop_config["mean"]), tuple(loop_config["std"]))
    class_names: list[str] = loop_config["class_names"]
    train_x, train_y = ray.get(loop_config["train_images"]), ray.get(loop_config["train_labels"])
    val_x, val_y = ray.get(loop_config["val_images"]), ray.get(loop_config["val_labels"])

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(worker_threads(cfg))
    torch.manual_seed(cfg.seed)
    use_bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")

    checkpoint = ray.train.get_checkpoint()
    state: dict[str, Any] | None = None
    if checkpoint is None:
        model = build_model(cfg.model, class_names)
    else:
        # from_pretrained, not load_state_dict: transformers maps its saved key names.
        from transformers import ViTForImageClassification

        with checkpoint.as_directory() as d:
            model = ViTForImageClassification.from_pretrained(
                Path(d) / MODEL_DIR, attn_implementation=cfg.model.attn_implementation
            )
            state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)
    ddp_model: torch.nn.Module = ray.train.torch.prepare_model(model)

    per_rank = len(train_y) // world
    bs = cfg.train.batch_size
    steps_per_epoch = max(1, math.ceil(per_rank / bs))
    optimizer = torch.optim.AdamW(param_groups(ddp_model, cfg.train.weight_decay), lr=cfg.train.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(steps_per_epoch * cfg.train.epochs, cfg.train.warmup_fraction)
    )
    start_epoch, elapsed_before = 1, 0.0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = int(state["epoch"]) + 1
        elapsed_before = float(state.get("elapsed_s", 0.0))
        if rank == 0:
            say(f"resuming from checkpoint after epoch {state['epoch']}")

    wb = loop_config.get("wandb") or {}
    tracker = None
    if rank == 0 and wb:
        tracker = start_run(cfg, wb["group"], wb["name"], Path(wb["dir"]), wb["mode"])

    ctx_eval = _EvalContext(
        model, pre, val_x, val_y, rank, world, cfg.train.eval_batch_size, device, use_bf16
    )
    evals = min(cfg.train.evals_per_epoch, steps_per_epoch)
    mid_epoch_evals = {round(steps_per_epoch * k / evals) for k in range(1, evals)}
    t_start = time.perf_counter()
    for epoch in range(start_epoch, cfg.train.epochs + 1):
        # Same permutation on every rank; each rank reads only its strided shard.
        perm = np.random.default_rng([cfg.seed, epoch]).permutation(len(train_y))
        shard = perm[rank::world][:per_rank]
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch * 1009 + rank)
        ddp_model.train()
        loss_sum = torch.zeros((), device=device)
        t0, eval_time = time.perf_counter(), 0.0
        for step in range(steps_per_epoch):
            idx = np.sort(shard[step * bs : (step + 1) * bs])
            x = torch.from_numpy(train_x[idx]).to(device, non_blocking=True)
            y = torch.from_numpy(train_y[idx]).to(device, non_blocking=True)
            x = pre(x, train=cfg.train.augment, generator=gen)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                logits = ddp_model(pixel_values=x).logits
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.train.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.train.grad_clip:
                torch.nn.utils.clip_grad_norm_(ddp_model.parameters(), cfg.train.grad_clip)
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach() * len(idx)
            if step == steps_per_epoch // 2:
                _maybe_inject_fault(cfg, run_dir, epoch, rank, world)
            if step + 1 in mid_epoch_evals:
                # An early look for ASHA: metrics only; checkpoints stay at epoch ends.
                t_eval = time.perf_counter()
                done = step + 1
                metrics = _epoch_metrics(
                    ctx_eval,
                    epoch - 1 + done / steps_per_epoch,
                    loss_sum,
                    min(per_rank, done * bs),
                    t_eval - t0 - eval_time,
                    scheduler,
                    elapsed_before + t_eval - t_start,
                )
                _log_progress(metrics, cfg, rank, tracker)
                ray.train.report(metrics)
                ddp_model.train()
                eval_time += time.perf_counter() - t_eval
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_time = time.perf_counter() - t0 - eval_time
        metrics = _epoch_metrics(
            ctx_eval,
            epoch,
            loss_sum,
            per_rank,
            train_time,
            scheduler,
            elapsed_before + time.perf_counter() - t_start,
        )
        _log_progress(metrics, cfg, rank, tracker)
        if rank == 0:
            with (run_dir / HISTORY_FILE).open("a") as f:
                f.write(json.dumps(metrics) + "\n")
        with tempfile.TemporaryDirectory(prefix="rayvit-ckpt-") as tmp:
            ckpt = None
            if rank == 0:
                save_training_checkpoint(
                    Path(tmp),
                    model,
                    pre,
                    optimizer,
                    scheduler,
                    epoch,
                    metrics,
                    cfg,
                )
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)
    if tracker is not None:
        tracker.finish()


@dataclass
class _EvalContext:
    """What a validation pass needs; the same for mid-epoch and end-of-epoch passes."""

    model: torch.nn.Module
    pre: Preprocessor
    x: np.ndarray
    y: np.ndarray
    rank: int
    world: int
    batch_size: int
    device: torch.device
    use_bf16: bool


def _epoch_metrics(
    ev: _EvalContext,
    epoch: float,
    loss_sum: torch.Tensor,
    seen_here: int,
    train_time: float,
    scheduler: Any,
    elapsed: float,
) -> dict[str, Any]:
    """Validate on every rank's shard and reduce train loss, validation and speed over all ranks."""
    val_loss, val_correct, val_n = _evaluate_shard(
        ev.model, ev.pre, ev.x, ev.y, ev.rank, ev.world, ev.batch_size, ev.device, ev.use_bf16
    )
    total_loss, seen, v_loss, v_correct, v_n = _all_reduce(
        [float(loss_sum), seen_here * 1.0, val_loss, val_correct, val_n], ev.device
    )
    (max_time,) = _all_reduce([train_time], ev.device, dist.ReduceOp.MAX if dist.is_initialized() else None)
    return {
        "epoch": round(epoch, 4),
        "train_loss": total_loss / max(1.0, seen),
        "val_loss": v_loss / max(1.0, v_n),
        "val_accuracy": v_correct / max(1.0, v_n),
        "images_per_s": seen / max(1e-9, max_time),
        "lr": float(scheduler.get_last_lr()[0]),
        "elapsed_s": elapsed,
    }


def _log_progress(metrics: dict[str, Any], cfg: Config, rank: int, tracker: Any) -> None:
    if rank != 0:
        return
    say(
        f"epoch {metrics['epoch']:g}/{cfg.train.epochs}  train_loss {metrics['train_loss']:.4f}  "
        f"val_loss {metrics['val_loss']:.4f}  val_acc {metrics['val_accuracy']:.4f}  "
        f"{metrics['images_per_s']:.0f} img/s  elapsed {metrics['elapsed_s']:.0f}s"
    )
    if tracker is not None:
        tracker.log(metrics)


@torch.inference_mode()
def _evaluate_shard(
    model: torch.nn.Module,
    pre: Preprocessor,
    x_all: np.ndarray,
    y_all: np.ndarray,
    rank: int,
    world: int,
    batch_size: int,
    device: torch.device,
    use_bf16: bool,
) -> tuple[float, float, float]:
    """Summed loss, correct count and count over this rank's strided slice of the data."""
    model.eval()
    idx_all = np.arange(rank, len(y_all), world)
    loss_sum, correct = 0.0, 0.0
    for i in range(0, len(idx_all), batch_size):
        idx = idx_all[i : i + batch_size]
        x = pre(torch.from_numpy(x_all[idx]).to(device))
        y = torch.from_numpy(y_all[idx]).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(pixel_values=x).logits.float()
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += float((logits.argmax(-1) == y).sum())
    return loss_sum, correct, float(len(idx_all))
