"""One training job: storage, placement, data and preprocessing, set up once.

A single run and a sweep are the same job: a single run is a sweep of one
trial. ``start_job`` does the driver-side work once (cluster, the run's
storage, the data's Ray Data pipeline, the resume check); the frozen ``Job`` it
returns crosses into every Tune trial, whose driver builds its ``TorchTrainer``
from it, with the train and validation datasets that Ray Train shards over its workers.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchTrainer

# Ray Train's setting, read from the environment of the process that fits a trainer: how long its
# controller waits for the workers' placement group before it gives up and decides again.
from ray.train.v2._internal.constants import WORKER_GROUP_START_TIMEOUT_S_ENV_VAR as START_TIMEOUT_ENV

from rayvit.checkpoint import CONFIG_FILE
from rayvit.cluster import Placement, init_ray, resolve_placement
from rayvit.config import Config, with_overrides
from rayvit.data import SplitPlan, epoch_seed, label_counts, plan_train_val, quiet_ray_data, stored_side
from rayvit.errors import UserError
from rayvit.logs import quiet_libraries
from rayvit.model import build_preprocessor
from rayvit.preprocess import Preprocessor
from rayvit.storage import COMPLETE_MARKER, Storage
from rayvit.tracking import resolve_mode
from rayvit.train_loop import TRAIN, VAL, WandbSpec, WorkerSpec, registered_epoch, train_loop_per_worker

BEST_DIR = "best"
TRIALS_DIR = "trials"
SWEEP_DIR = "sweep"
"""Tune's experiment state (what a rerun resumes from)."""
JOB_FILE = "job.json"
#: That wait for an elastic run. Ray's default (60 s) suits a fixed worker count that waits for
#: nodes the autoscaler is adding. An elastic run sizes itself from the nodes that are up and
#: waits only when that view was stale: a node lost a moment ago still counted (the GCS needs a
#: few health checks to declare it dead), so the placement never comes. Then the sooner it
#: decides again, the sooner it goes on with the workers that fit.
ELASTIC_START_TIMEOUT_S = 15.0

#: Settings that change where or how fast a run goes, not what it computes: a rerun may change
#: them and still resume.
RESUME_IGNORES = (
    "output_dir",
    "local_dir",
    "restart",
    "ray",
    "wandb",
    "storage",
    "data.cache_dir",
    "data.max_in_memory_bytes",
    "data.decode_cpus",
    "data.decode_batch_size",
    "data.prefetch_batches",
    "scaling.check_resources",
    "train.num_threads",
    "train.max_failures",
    "train.inject_fault_epoch",
    "train.compile",
    "train.checkpoint_upload",
    "train.log_every_steps",
    "tune.max_concurrent_trials",
    "tune.driver_cpus",
)


@dataclass(frozen=True)
class Job:
    """What every trial of the job shares; typed and frozen, it crosses Ray boundaries as is."""

    cfg: Config
    storage: Storage
    placement: Placement
    pre: Preprocessor
    class_names: tuple[str, ...]
    train_data: Any
    """The training ``ray.data.Dataset``: decoded once and kept (``materialize``) when it fits
    ``data.max_in_memory_bytes``, else decoded as it streams; its block order is reseeded
    every epoch."""
    val_data: Any
    streamed: bool
    data_fingerprint: str
    num_train: int
    num_val: int
    group: str
    """The wandb group of the job's runs."""
    class_counts: tuple[int, ...] = ()
    """Training images per class, when a run weighs classes (``train.class_weights``)."""

    def fit(
        self,
        overrides: dict[str, Any],
        name: str,
        callbacks: list[Any] | None = None,
        fixed_world: bool = False,
    ) -> ray.train.Result:
        """Fit one run (``trainer``) in this process, a Tune trial's driver; an elastic run
        waits ``ELASTIC_START_TIMEOUT_S`` for a placement (unless ``START_TIMEOUT_ENV`` is set)."""
        if not fixed_world and self.placement.min_workers < self.placement.max_workers:
            os.environ.setdefault(START_TIMEOUT_ENV, f"{ELASTIC_START_TIMEOUT_S:g}")
        return self.trainer(overrides, name, callbacks, fixed_world).fit()

    def trainer(
        self,
        overrides: dict[str, Any],
        name: str,
        callbacks: list[Any] | None = None,
        fixed_world: bool = False,
    ) -> TorchTrainer:
        """The ``TorchTrainer`` of one run (one Tune trial): the job's config with the trial's
        searched values (dotted keys) set.

        ``fixed_world`` (a sweep's trials): the run keeps one worker count, the upper end of an
        elastic range, so that every trial has the same global batch and schedule and ASHA
        compares like with like; a single run keeps the elastic range. Either way the workers
        are packed onto one node when they fit there (Ray's PACK placement)."""
        cfg = with_overrides(self.cfg, overrides) if overrides else self.cfg
        pre = self.pre if cfg.model == self.cfg.model else build_preprocessor(cfg.model)
        trials = self.storage.child(TRIALS_DIR)
        spec = WorkerSpec(
            cfg=cfg,
            pre=pre,
            class_names=self.class_names,
            num_train=self.num_train,
            class_weights=balanced_weights(self.class_counts)
            if cfg.train.class_weights == "balanced"
            else None,
            run=trials.child(name),
            wandb=WandbSpec(resolve_mode(cfg), self.group, name, wandb_dir(cfg, self.storage)),
        )
        tc = cfg.train
        quiet_ray_data()
        return TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"spec": spec},
            datasets={TRAIN: self.train_data, VAL: self.val_data},
            dataset_config=Ingest(streamed=self.streamed, run=trials.child(name)),
            scaling_config=ray.train.ScalingConfig(
                num_workers=self.placement.max_workers if fixed_world else self.placement.num_workers,  # type: ignore[arg-type]  # V2 takes (min, max)
                use_gpu=self.placement.use_gpu,
                resources_per_worker=dict(self.placement.resources_per_worker),
                placement_strategy="PACK",
            ),
            run_config=ray.train.RunConfig(
                name=name,
                storage_path=trials.fs_path(),
                storage_filesystem=trials.filesystem(),
                checkpoint_config=ray.train.CheckpointConfig(
                    num_to_keep=tc.keep_checkpoints,
                    checkpoint_score_attribute=cfg.tune.metric,
                    checkpoint_score_order=cfg.tune.resolved_mode,
                ),
                failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
                callbacks=callbacks,
                logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            ),  # type: ignore[call-arg]  # Train V2's RunConfig; the stubs show V1's
        )


def wandb_dir(cfg: Config, storage: Storage) -> str:
    """Where wandb makes its ``wandb/`` folder of offline runs: the run's folder when it is local,
    else ``local_dir``."""
    if storage.is_local:
        return storage.root
    return str(Path(cfg.local_dir).expanduser())


def open_storage(cfg: Config) -> Storage:
    """The run's storage, checked writable (within seconds, naming ``output_dir``)."""
    storage = Storage.from_setting(cfg.output_dir, cfg.storage.endpoint_url)
    storage.check_writable()
    return storage


def check_resume(cfg: Config, storage: Storage, data_fp: str | None = None) -> None:
    """A rerun into a folder that holds a run must be the same run, or say what changed.

    Without ``data_fp`` only the config is compared (a finished run is answered before any
    data is read); with it the data fingerprint too.
    """
    if cfg.restart or not storage.is_file(JOB_FILE):
        return
    saved = json.loads(storage.read_text(JOB_FILE))
    changes = _diff(_resume_view(saved.get("config", {})), _resume_view(cfg.to_dict()))
    if data_fp is not None and saved.get("data_fingerprint") not in (None, data_fp):
        changes.append(f"data fingerprint {saved['data_fingerprint']} -> {data_fp}")
    if changes:
        shown = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
        raise UserError(
            f"output_dir {storage.root} holds a run with other settings ({shown}): rerun with the "
            "same settings to resume, choose another output_dir, or set restart=true to start over"
        )


def _resume_view(raw: dict[str, Any]) -> dict[str, Any]:
    flat = _flatten(raw)
    return {k: v for k, v in flat.items() if not any(k == i or k.startswith(f"{i}.") for i in RESUME_IGNORES)}


def _flatten(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
        for k in sorted(old.keys() | new.keys())
        if old.get(k) != new.get(k)
    ]


def is_finished(cfg: Config, storage: Storage) -> bool:
    """The job's export is complete (and, checked first, was made with these settings)."""
    check_resume(cfg, storage)
    return not cfg.restart and storage.is_file(BEST_DIR, COMPLETE_MARKER)


def start_job(cfg: Config, storage: Storage) -> Job:
    """Cluster, placement checks, preprocessing, the train/val Ray Data pipeline (decoded once
    here when it fits); the job's config and data fingerprint saved next to its runs."""
    quiet_libraries()
    init_ray(cfg.ray)
    quiet_ray_data()
    placement = resolve_placement(cfg)
    pre = build_preprocessor(cfg.model)
    t0 = time.perf_counter()
    side = stored_side(cfg.data, cfg.model.image_size)
    train, val, class_names = plan_train_val(cfg.data, cfg.seed, side, cfg.storage.endpoint_url)
    data_fp = hashlib.sha256(f"{train.fingerprint}|{val.fingerprint}".encode()).hexdigest()[:16]
    check_resume(cfg, storage, data_fp)
    if cfg.restart:
        for part in (TRIALS_DIR, SWEEP_DIR, BEST_DIR, JOB_FILE):
            storage.delete(part)
    storage.write_text(json.dumps({"config": cfg.to_dict(), "data_fingerprint": data_fp}, indent=2), JOB_FILE)
    storage.write_text(cfg.to_yaml(), CONFIG_FILE)
    train_data, val_data, streamed = datasets(cfg, train, val)
    weighs = cfg.train.class_weights == "balanced" or "train.class_weights" in cfg.tune.space
    counts = tuple(int(c) for c in label_counts(train)) if weighs else ()
    how = "streamed, decoded every epoch" if streamed else "decoded once, kept in the object store"
    print(
        f"data: {len(train)} train / {len(val)} val images at {side}px, {len(class_names)} classes "
        f"from {cfg.data.path}, {how} ({time.perf_counter() - t0:.1f}s); {placement.describe()}",
        flush=True,
    )
    return Job(
        cfg=cfg,
        storage=storage,
        placement=placement,
        pre=pre,
        class_names=class_names,
        train_data=train_data,
        val_data=val_data,
        streamed=streamed,
        data_fingerprint=data_fp,
        num_train=len(train),
        num_val=len(val),
        group=f"{storage.name}-{data_fp[:8]}",
        class_counts=counts,
    )


def balanced_weights(counts: tuple[int, ...]) -> tuple[float, ...]:
    """``images / (classes * images of the class)`` per class (scikit-learn's "balanced"); a
    class without training images gets 0 (it has no loss to weigh)."""
    total, k = sum(counts), len(counts)
    return tuple(total / (k * c) if c else 0.0 for c in counts)


def datasets(cfg: Config, train: SplitPlan, val: SplitPlan) -> tuple[Any, Any, bool]:
    """The train and validation datasets, and whether they stream.

    Decoded data that fits ``data.max_in_memory_bytes`` is decoded now, on every CPU of the
    cluster (no trainer holds any yet), and reused every epoch; the training set's blocks are
    then reordered every epoch. Larger data streams: the units' order is reseeded every epoch
    and decoding runs alongside training, within Ray Data's object-store budget.
    """
    if streams(cfg, train, val):
        return train.dataset(cfg.data, shuffle_seed=cfg.seed), val.dataset(cfg.data), True
    kept = train.dataset(cfg.data)
    # Blocks kept in the order of their units (not of their decode tasks' finishing): a rerun of
    # the plan (a trial retried after its driver's node was lost) keeps the same seeded epochs.
    kept.context.execution_options.preserve_order = True
    try:
        kept_train, kept_val = kept.materialize(), val.dataset(cfg.data).materialize()
    except Exception as exc:
        raise _decode_error(exc) from exc
    return kept_train.randomize_block_order(seed=epoch_seed(cfg.seed)), kept_val, False


def streams(cfg: Config, train: SplitPlan, val: SplitPlan) -> bool:
    """Whether the decoded train and validation images pass ``data.max_in_memory_bytes`` (and are
    decoded again every epoch) instead of being decoded once and kept."""
    return train.decoded_bytes + val.decoded_bytes > cfg.data.max_in_memory_bytes


def _decode_error(exc: Exception) -> Exception:
    """A decode task's ``UserError`` as one line; anything else as it is."""
    line = next((ln.strip() for ln in str(exc).splitlines() if ln.strip().startswith("data.")), None)
    return UserError(line.split("UserError: ", 1)[-1]) if line else exc


class Ingest(ray.train.DataConfig):
    """How Ray Train shards the job's datasets: ``train`` in equal shards (every rank takes the
    same number of steps, DDP needs it; at most ``world - 1`` images an epoch are left out),
    ``val`` in shards that together hold every image exactly once.

    Kept (not streamed) training data is dealt the same way whether or not the run was
    interrupted, so a run resumed after a lost node or worker trains as the uninterrupted one
    would: without locality hints Ray Data hands the epoch's blocks, in their seeded order, to
    the rank with the fewest rows so far (the same rows for each rank whichever node holds which
    block), and the seeded block order of epoch ``e`` is execution ``e - 1`` of the dataset also
    when a restarted worker group starts at the epoch after the run's last checkpoint (Ray Data
    counts executions per split coordinator, which a restart makes anew). Streamed data keeps
    the hints: its blocks come from decode tasks wherever they ran, in no fixed order anyway."""

    def __init__(self, streamed: bool, run: Storage | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.streamed = streamed
        self.run = run

    def configure(
        self,
        datasets: dict[str, Any],
        world_size: int,
        worker_handles: Any,
        worker_node_ids: Any,
        **kwargs: Any,
    ) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            if ds.name is None:
                ds.set_name(name)
            ds = ds.copy(ds)
            ds.context.execution_options = self._resolve_execution_options(name)
            hints = worker_node_ids
            if name == TRAIN and not self.streamed:
                hints = None
                # Ray Data's own execution counter (what its per-execution reseeding reads).
                ds.context._execution_idx = registered_epoch(self.run) if self.run else 0
            splits = ds.streaming_split(world_size, equal=name == TRAIN, locality_hints=hints)
            for rank, split in enumerate(splits):
                out[rank][name] = split
        return out
