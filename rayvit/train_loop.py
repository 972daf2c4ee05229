"""The per-worker training function that Ray Train runs on every worker.

Each worker gets one frozen ``WorkerSpec`` (config, preprocessor, class names,
where the run lives) and its shards of the job's Ray Data datasets
(``ray.train.get_dataset_shard``): it trains on its training shard each epoch
(decoded uint8 batches, prefetched; all pixel work after that is the batched
``Preprocessor`` on the worker's device), validates on its part of the validation
split, reduces metrics over all workers, and rank 0 reports a full checkpoint
every epoch.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from rayvit.checkpoint import load_training_checkpoint, model_without_weights, save_training_checkpoint
from rayvit.config import Config
from rayvit.logs import quiet_libraries, say
from rayvit.model import build_model
from rayvit.perf import mfu, peak_flops, train_flops_per_image
from rayvit.predict import EvalResult, class_counts, evaluate_batches, macro_f1, use_bf16
from rayvit.preprocess import Preprocessor
from rayvit.storage import Storage
from rayvit.tracking import start_run

FAULT_MARKER = ".fault_injected"
#: Ray Train's record of the checkpoints it has registered, in the run's folder.
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
#: Names of the job's datasets in ``TorchTrainer(datasets=...)``.
TRAIN, VAL = "train", "val"
#: What a trial that failed or diverged reports: the worst value of every selection metric.
WORST: dict[str, float] = {"val_accuracy": 0.0, "val_macro_f1": 0.0, "val_loss": 1e30}


@dataclass(frozen=True)
class WandbSpec:
    mode: str
    group: str
    name: str
    dir: str


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a training worker needs, typed, as it crosses into Ray Train."""

    cfg: Config
    pre: Preprocessor
    class_names: tuple[str, ...]
    num_train: int
    """Images of the training split (each rank trains on ``num_train // world`` an epoch)."""
    class_weights: tuple[float, ...] | None
    run: Storage
    """This run's folder (Ray Train's ``storage_path/name``)."""
    wandb: WandbSpec


def warmup_cosine(total_steps: int, warmup_fraction: float) -> Any:
    """LR multiplier: linear warmup, then cosine decay to zero."""
    warmup = int(total_steps * warmup_fraction)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


#: Modules whose own parameters are never decayed: normalisation layers of every kind.
NO_DECAY_MODULES: tuple[type[torch.nn.Module], ...] = (
    torch.nn.modules.batchnorm._NormBase,
    torch.nn.LayerNorm,
    torch.nn.GroupNorm,
    torch.nn.LocalResponseNorm,
    torch.nn.RMSNorm,
    torch.nn.Embedding,
)
#: ... and transformers' own modules of those kinds, by the ends of their class names: a family's
#: ``*LayerNorm``/``*RMSNorm``, the ``*Embeddings`` module that holds the class token and position
#: embeddings, Swin's and BEiT's ``*RelativePositionBias`` tables.
NO_DECAY_KINDS = ("Norm", "Embeddings", "PositionBias")


def decays(module: torch.nn.Module, param_name: str, p: torch.nn.Parameter) -> bool:
    """Weight decay for a parameter, chosen by the module that owns it, for any architecture:
    none on norm layers, embedding tables and the tokens an ``*Embeddings`` module holds itself
    (class token, position embeddings), relative position tables, biases and any other 1-D
    parameter (layer scales)."""
    return not (
        isinstance(module, NO_DECAY_MODULES)
        or type(module).__name__.endswith(NO_DECAY_KINDS)
        or param_name == "bias"
        or p.ndim < 2
    )


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW's two groups: decayed weights, and everything ``decays`` exempts."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                (decay if decays(module, name, p) else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def worker_threads(cfg: Config) -> int:
    return cfg.train.num_threads or max(1, int(cfg.scaling.cpus_per_worker))


@dataclass(frozen=True)
class Shard:
    """This rank's part of each epoch: Ray Train's equal split of the training set.

    Every rank gets ``per_rank = n // world`` images an epoch, so all ranks take the same number
    of steps; the ``n % world`` images left over, and the ``per_rank % batch_size`` that do not
    fill a last batch, differ from epoch to epoch.
    """

    n: int
    world: int
    batch_size: int
    """Rows of one optimizer step (``step_rows``)."""

    @property
    def per_rank(self) -> int:
        return self.n // self.world

    @property
    def steps(self) -> int:
        """Whole batches only (``train_batches`` leaves the rest out)."""
        return max(1, self.per_rank // self.batch_size)


def train_batches(shard: Any, cfg: Config, epoch: int, rank: int, device: torch.device) -> Iterator[Any]:
    """One epoch of this rank's training shard as dicts of tensors (``image`` uint8 NHWC,
    ``label``, ``index``) on ``device``, in batches of ``batch_size x grad_accum_steps`` rows.

    Ray Data hands over windows of ``data.shuffle_buffer`` rows (a multiple of the batch size),
    prefetched ``data.prefetch_batches`` training batches ahead, copied from pinned host memory
    to a GPU; each window's rows are put in an order seeded by (seed, epoch, rank), drawn on the
    device, and cut into batches by one gather per batch. That is the windowed shuffle Ray
    Data's ``local_shuffle_buffer_size`` gives, at a fraction of its per-batch cost in the
    prefetch thread, which competes with the step on a small host.

    Every batch has the same shape (``torch.compile`` compiles once): the rows of an epoch that
    do not fill a last batch are left out (which ones changes every epoch), unless they are
    all there is.
    """
    bs = step_rows(cfg)
    window = max(1, cfg.data.shuffle_buffer // bs) * bs
    ahead = -(-cfg.data.prefetch_batches * bs // window)
    gen = torch.Generator(device=device).manual_seed((cfg.seed * 1_000_003 + epoch * 1009 + rank) % 2**63)
    yielded = False
    for rows in shard.iter_torch_batches(
        batch_size=window, prefetch_batches=ahead, device=device, pin_memory=device.type == "cuda"
    ):
        n = len(rows["label"])
        full = n - n % bs if (yielded or n >= bs) else n
        order = torch.randperm(n, generator=gen, device=device) if cfg.data.shuffle_buffer else None
        for start in range(0, full, bs):
            if order is None:
                yield {k: v[start : start + bs] for k, v in rows.items()}
            else:
                pick = order[start : start + bs]
                yield {k: v.index_select(0, pick) for k, v in rows.items()}
            yielded = True


def step_rows(cfg: Config) -> int:
    """Rows of one optimizer step on one worker."""
    return cfg.train.batch_size * cfg.train.grad_accum_steps


def val_batches(shard: Any, cfg: Config, device: torch.device) -> Iterator[Any]:
    """An evaluation split (this rank's validation shard, or the test dataset), in order,
    ``train.eval_batch_size`` at a time."""
    return iter(
        shard.iter_torch_batches(
            batch_size=cfg.train.eval_batch_size, prefetch_batches=cfg.data.prefetch_batches, device=device
        )
    )


class DivergedError(Exception):
    """The loss or the gradients stopped being finite (at 0-based ``step`` of the epoch)."""

    def __init__(self, step: int) -> None:
        super().__init__(f"non-finite gradient norm at step {step + 1}")
        self.step = step


def with_fault(batches: Iterable[Any], spec: WorkerSpec, epoch: int, steps: int) -> Iterator[Any]:
    """Chaos testing: the last rank dies once, midway through the epoch after
    ``train.inject_fault_epoch``, once Ray Train has registered that epoch's checkpoint."""
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    target = spec.cfg.train.inject_fault_epoch
    if target is None or target + 1 != epoch or rank != world - 1 or spec.run.exists(FAULT_MARKER):
        yield from batches
        return
    for step, batch in enumerate(batches):
        if step == steps // 2:
            _wait_for_registered_checkpoint(spec.run, target)
            spec.run.write_text(f"worker rank {rank} killed during epoch {epoch}\n", FAULT_MARKER)
            say(f"[fault injection] killing worker rank {rank} during epoch {epoch}")
            os._exit(1)
        yield batch


def registered_epoch(run: Storage) -> int:
    """The epoch of the latest checkpoint Ray Train's controller has registered for the run in
    ``run`` (what a restart resumes from); 0 when there is none (yet)."""
    import json

    try:
        latest = json.loads(run.read_text(SNAPSHOT_FILE)).get("latest_checkpoint_result") or {}
        return int(latest.get("metrics", {}).get("epoch", 0))
    except Exception:  # no snapshot yet, or read while being replaced
        return 0


def _wait_for_registered_checkpoint(run: Storage, epoch: int, timeout_s: float = 60.0) -> None:
    """Block until the controller's snapshot names the checkpoint of ``epoch`` (what a restart
    resumes from), so the injected fault tests a resume, not a restart from scratch."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and registered_epoch(run) < epoch:
        time.sleep(0.2)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    spec: WorkerSpec = loop_config["spec"]
    cfg = spec.cfg
    quiet_libraries()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(worker_threads(cfg))
    torch.manual_seed(cfg.seed)
    bf16 = use_bf16(cfg.train.precision, device)
    train_shard = ray.train.get_dataset_shard(TRAIN)

    model, state = restore(ray.train.get_checkpoint(), spec, rank, world)
    ddp_model = prepare(model, cfg, device)  # DDP sends rank 0's weights to every rank
    state = _from_rank0(state, world)
    forward: Any = torch.compile(ddp_model) if cfg.train.compile else ddp_model

    shard = Shard(spec.num_train, world, step_rows(cfg))
    class_weight = (
        torch.tensor(spec.class_weights, dtype=torch.float32, device=device) if spec.class_weights else None
    )
    optimizer = make_optimizer(ddp_model, cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(shard.steps * cfg.train.epochs, cfg.train.warmup_fraction)
    )
    start_epoch, elapsed_before = 1, 0.0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = int(state["epoch"]) + 1
        elapsed_before = float(state.get("elapsed_s", 0.0))
        if rank == 0:
            # The world size may differ from the interrupted run's (an elastic range after a
            # lost node): the user sees with how many workers training goes on.
            say(f"resuming from checkpoint after epoch {state['epoch']} on {world} worker(s)")

    tracker = None
    if rank == 0 and spec.wandb.mode != "disabled":
        w = spec.wandb
        tracker = start_run(cfg, w.group, w.name, Path(w.dir).expanduser(), w.mode)

    progress = _Progress(
        cfg,
        rank,
        tracker,
        _Validator(model, spec.pre, ray.train.get_dataset_shard(VAL), cfg, device, bf16),
        peak_flops(device),
        train_flops_per_image(model.config, spec.pre.image_size),
        len(spec.class_names),
    )
    stepper = Stepper(
        forward,
        ddp_model,
        optimizer,
        scheduler,
        spec.pre,
        cfg,
        bf16,
        device,
        cfg.train.compile and rank == 0,
        class_weight,
    )
    evals = min(cfg.train.evals_per_epoch, shard.steps)
    mid_epoch_evals = frozenset(round(shard.steps * k / evals) for k in range(1, evals))
    t_start = time.perf_counter() - elapsed_before
    for epoch in range(start_epoch, cfg.train.epochs + 1):
        gen = torch.Generator(device=device).manual_seed(cfg.seed * 100_003 + epoch * 1009 + rank)
        ddp_model.train()
        t0, eval_time = time.perf_counter(), 0.0

        def on_check(done: int, totals: EpochTotals, epoch: int = epoch, t0: float = t0) -> None:
            nonlocal eval_time
            if done not in mid_epoch_evals:
                if tracker is not None:
                    running = float(totals.loss_sum) / max(1, totals.seen)
                    tracker.log({"epoch": epoch - 1 + done / shard.steps, "train_loss_running": running})
                return
            # An early look for ASHA: metrics only; checkpoints stay at epoch ends.
            t_eval = time.perf_counter()
            progress.report(
                epoch - 1 + done / shard.steps,
                totals.loss_sum,
                totals.seen,
                t_eval - t0 - eval_time,
                scheduler,
                t_eval - t_start,
            )
            ddp_model.train()
            eval_time += time.perf_counter() - t_eval

        batches = with_fault(train_batches(train_shard, cfg, epoch, rank, device), spec, epoch, shard.steps)
        try:
            totals = stepper.epoch(batches, gen, mid_epoch_evals, on_check)
        except DivergedError as exc:
            _report_divergence(cfg, epoch, exc.step, scheduler, rank, tracker)
            return
        synchronize(device)
        metrics = progress.metrics(
            epoch,
            totals.loss_sum,
            totals.seen,
            time.perf_counter() - t0 - eval_time,
            scheduler,
            time.perf_counter() - t_start,
        )
        # From the optimizer's own state: a resumed run continues the count, a restart would not.
        metrics["optimizer_steps"] = _optimizer_steps(optimizer)
        report_checkpoint(metrics, rank, model, spec.pre, optimizer, scheduler, epoch, cfg)
    if tracker is not None:
        tracker.finish()


def restore(checkpoint: Any, spec: WorkerSpec, rank: int, world: int) -> tuple[Any, dict[str, Any] | None]:
    """The model, and the training state to resume from (None: start fresh).

    Only rank 0 reads the checkpoint; the other ranks build the same architecture from its
    ``config.json`` and get the weights from DDP's broadcast when the model is wrapped, and the
    training state from ``_from_rank0``: one read of the bucket per resume, not one per rank.
    """
    cfg = spec.cfg
    if checkpoint is None:
        return build_model(cfg.model, list(spec.class_names)), None
    if rank == 0 or world == 1:
        restored = load_training_checkpoint(checkpoint, cfg.model.attn_implementation)
        assert restored is not None
        return restored.model, restored.state
    return model_without_weights(checkpoint, cfg.model.attn_implementation), None


def _from_rank0(state: dict[str, Any] | None, world: int) -> dict[str, Any] | None:
    """Rank 0's training state on every rank (they all hold the same optimizer state)."""
    if world == 1 or not dist.is_initialized():
        return state
    box = [state]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def report_checkpoint(
    metrics: dict[str, Any],
    rank: int,
    model: torch.nn.Module,
    pre: Preprocessor,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    epoch: int,
    cfg: Config,
) -> None:
    """The epoch's metrics from every rank, its checkpoint from rank 0 only, uploaded in the
    background (Ray Train's asynchronous upload, ``train.checkpoint_upload``): training goes on
    while the bucket is written; Ray Train registers the checkpoint once it is complete, and
    deletes the local copy."""
    ckpt = None
    if rank == 0:
        folder = Path(tempfile.mkdtemp(prefix="rayvit-ckpt-"))
        save_training_checkpoint(folder, model, pre, optimizer, scheduler, epoch, metrics, cfg)  # type: ignore[arg-type]
        ckpt = ray.train.Checkpoint.from_directory(str(folder))
    ray.train.report(
        metrics,
        checkpoint=ckpt,
        checkpoint_upload_mode=upload_mode(cfg),
        delete_local_checkpoint_after_upload=True,
    )


def upload_mode(cfg: Config) -> ray.train.CheckpointUploadMode:
    """Ray Train's upload mode for ``train.checkpoint_upload``; every report of a run uses it,
    since Ray keeps reports in order and a synchronous one waits for the uploads before it."""
    mode = ray.train.CheckpointUploadMode
    return mode.ASYNC if cfg.train.checkpoint_upload == "async" else mode.SYNC


def train_step(
    forward: Any,
    ddp_model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: Config,
    bf16: bool,
    class_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on ``x, y`` in ``train.grad_accum_steps`` micro-batches: the mean loss
    and whether the gradient norm is finite, both left on the device (the host never waits).

    Gradients are summed locally over the micro-batches and all-reduced once, with the last.
    The norm is taken after DDP's all-reduce, so every rank sees the same value; a non-finite
    loss on any rank makes it non-finite. A non-finite step still updates the parameters (they
    become non-finite); the caller stops at its next check, before any checkpoint.
    """
    n = len(y)
    xs, ys = x.split(cfg.train.batch_size), y.split(cfg.train.batch_size)
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=x.device)
    for i, (xi, yi) in enumerate(zip(xs, ys, strict=True)):
        share = len(yi) / n
        with _no_sync(ddp_model) if i < len(xs) - 1 else contextlib.nullcontext():
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = forward(pixel_values=xi).logits
            loss = F.cross_entropy(
                logits.float(), yi, weight=class_weight, label_smoothing=cfg.train.label_smoothing
            )
            (loss * share if share != 1 else loss).backward()
        total += loss.detach() * share
    norm = torch.nn.utils.clip_grad_norm_(ddp_model.parameters(), cfg.train.grad_clip or math.inf)
    optimizer.step()
    return total, torch.isfinite(norm)


def _no_sync(model: torch.nn.Module) -> Any:
    """DDP's ``no_sync`` (gradients kept local), or nothing for a single worker's bare model."""
    return model.no_sync() if isinstance(model, DistributedDataParallel) else contextlib.nullcontext()


def make_optimizer(model: torch.nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with the job's parameter groups; fused (one kernel, its step counts on the device,
    no ``.item()`` per step) where torch has the fused kernel."""
    return torch.optim.AdamW(
        param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr, fused=device.type in ("cuda", "cpu")
    )


def ddp_options(cfg: Config, device: torch.device) -> dict[str, Any]:
    """``DistributedDataParallel`` settings: gradients in place in the all-reduce buckets (no
    copy, less memory), a static graph where it holds (no micro-batches, which skip the
    all-reduce, and no compile, whose graph splitting DDP's static graph does not know)."""
    static = cfg.train.ddp_static_graph and cfg.train.grad_accum_steps == 1 and not cfg.train.compile
    return {"gradient_as_bucket_view": True, "static_graph": static}


def prepare(model: torch.nn.Module, cfg: Config, device: torch.device) -> torch.nn.Module:
    """The worker's model, on its device, in DDP when the group has more than one worker, with
    activation checkpointing and bf16 gradient compression when configured."""
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    ddp_model: torch.nn.Module = ray.train.torch.prepare_model(
        model, parallel_strategy_kwargs=ddp_options(cfg, device)
    )
    if cfg.train.ddp_bf16_grads and device.type == "cuda" and isinstance(ddp_model, DistributedDataParallel):
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        ddp_model.register_comm_hook(None, default_hooks.bf16_compress_hook)
    return ddp_model


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """transformers' activation checkpointing, non-reentrant (works with DDP and compile)."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})  # type: ignore[operator]


@dataclass
class EpochTotals:
    """What an epoch has summed so far, on the device: read only at checks."""

    loss_sum: torch.Tensor
    seen: int
    first_bad: torch.Tensor
    """0-based step of the first non-finite gradient norm this epoch, -1 while there is none."""


@dataclass
class Stepper:
    """The training steps of one worker, as the job and the benchmarks run them.

    ``epoch`` runs one epoch's batches through the ``Preprocessor`` and ``train_step`` and only
    looks at the device (a sync) every ``train.log_every_steps`` steps, at the steps ``extra``
    names and at the epoch's end; there it raises ``DivergedError`` if a step was not finite.
    """

    forward: Any
    ddp_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    pre: Preprocessor
    cfg: Config
    bf16: bool
    device: torch.device
    report_compile: bool = False
    """Say how long the first step took (compilation included), once."""
    class_weight: torch.Tensor | None = None
    """Per-class loss weights (``train.class_weights``), on the device."""

    def epoch(
        self,
        batches: Iterable[Any],
        generator: torch.Generator | None,
        extra: frozenset[int] = frozenset(),
        on_check: Any = None,
    ) -> EpochTotals:
        t = EpochTotals(
            torch.zeros((), device=self.device), 0, torch.full((), -1, dtype=torch.long, device=self.device)
        )
        every = self.cfg.train.log_every_steps
        for step, batch in enumerate(batches):
            t_first = time.perf_counter() if self.report_compile else 0.0
            x = self.pre(batch["image"], train=self.cfg.train.augment, generator=generator)
            y = batch["label"]
            loss, finite = train_step(
                self.forward, self.ddp_model, self.optimizer, x, y, self.cfg, self.bf16, self.class_weight
            )
            self.scheduler.step()
            t.loss_sum += loss * len(y)
            t.seen += len(y)
            t.first_bad = torch.where(finite | (t.first_bad >= 0), t.first_bad, step)
            done = step + 1
            if self.report_compile:
                self.report_compile = False
                synchronize(self.device)
                say(f"torch.compile: first step {time.perf_counter() - t_first:.1f}s, compilation included")
            if done % every == 0 or done in extra:
                check_finite(t)
                if on_check is not None:
                    on_check(done, t)
        check_finite(t)
        return t


def check_finite(t: EpochTotals) -> None:
    """Raise ``DivergedError`` (on every rank alike) when a step of the epoch was not finite."""
    op = dist.ReduceOp.MAX if dist.is_initialized() else None
    (bad,) = _all_reduce([float(t.first_bad)], t.loss_sum.device, op)
    if bad >= 0:
        raise DivergedError(int(bad))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _optimizer_steps(optimizer: torch.optim.Optimizer) -> int:
    for state in optimizer.state.values():
        return int(state["step"])
    return 0


def _report_divergence(cfg: Config, epoch: int, step: int, scheduler: Any, rank: int, tracker: Any) -> None:
    """One line, one last report that marks the run as diverged (no checkpoint), then stop."""
    lr = float(scheduler.get_last_lr()[0])
    reason = f"non-finite loss at step {step + 1} of epoch {epoch} (learning rate {lr:.3g})"
    if rank == 0:
        say(f"error: training diverged: {reason}")
    # The worst value of every selection metric ranks a diverged trial last; `diverged` says why.
    ray.train.report({"epoch": epoch - 1 + 1e-3, **WORST, "diverged": reason})
    if tracker is not None:
        tracker.finish()


@dataclass
class _Validator:
    """Validation on this rank's shard of the validation split (the shards of all ranks hold
    every validation image exactly once)."""

    model: torch.nn.Module
    pre: Preprocessor
    shard: Any
    cfg: Config
    device: torch.device
    bf16: bool

    def run(self) -> EvalResult:
        batches = ((b["image"], b["label"]) for b in val_batches(self.shard, self.cfg, self.device))
        return evaluate_batches(self.model, self.pre, batches, self.device, self.bf16)

    def sums(self, num_classes: int) -> list[float]:
        """Loss sum, correct, count, then per class: true positives, predictions, images."""
        r = self.run()
        return [r.loss_sum, float(r.correct), float(r.count), *class_counts(r, num_classes)]


def _all_reduce(values: list[float], device: torch.device, op: Any = None) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return [float(v) for v in t.tolist()]


@dataclass
class _Progress:
    """Validation, metrics reduced over all ranks, the progress line and wandb."""

    cfg: Config
    rank: int
    tracker: Any
    validator: _Validator
    peak: float | None
    flops_per_image: float
    num_classes: int

    def metrics(
        self,
        epoch: float,
        loss_sum: torch.Tensor,
        seen_here: int,
        train_time: float,
        scheduler: Any,
        elapsed: float,
    ) -> dict[str, Any]:
        c = self.num_classes
        device = self.validator.device
        total_loss, seen, v_loss, v_correct, v_n, *per_class = _all_reduce(
            [float(loss_sum), seen_here * 1.0, *self.validator.sums(c)], device
        )
        (max_time,) = _all_reduce([train_time], device, dist.ReduceOp.MAX if dist.is_initialized() else None)
        img_s = seen / max(1e-9, max_time)
        metrics: dict[str, Any] = {
            "epoch": round(epoch, 4),
            "train_loss": total_loss / max(1.0, seen),
            "val_loss": v_loss / max(1.0, v_n),
            "val_accuracy": v_correct / max(1.0, v_n),
            "val_macro_f1": macro_f1(per_class[:c], per_class[c : 2 * c], per_class[2 * c :]),
            "images_per_s": img_s,
            "lr": float(scheduler.get_last_lr()[0]),
            "elapsed_s": elapsed,
        }
        world = dist.get_world_size() if dist.is_initialized() else 1
        util = mfu(img_s / world, self.flops_per_image, self.peak)
        if util is not None:
            metrics["mfu"] = util
        self._log(metrics)
        return metrics

    def report(self, *args: Any) -> None:
        # A metrics-only report waits for the reports before it to land; in the upload's own mode
        # it waits in the upload thread, so an epoch's upload still in flight does not stall the
        # step here.
        ray.train.report(self.metrics(*args), checkpoint_upload_mode=upload_mode(self.cfg))

    def _log(self, m: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        line = (
            f"epoch {m['epoch']:g}/{self.cfg.train.epochs}  train_loss {m['train_loss']:.4f}  "
            f"val_loss {m['val_loss']:.4f}  val_acc {m['val_accuracy']:.4f}  "
            f"{m['images_per_s']:.0f} img/s"
        )
        if "mfu" in m:
            line += f"  MFU {100 * m['mfu']:.1f}%"
        say(f"{line}  elapsed {m['elapsed_s']:.0f}s")
        if self.tracker is not None:
            self.tracker.log(m)
