"""One training job: storage, placement, data and preprocessing, set up once.

A single run and a sweep are the same job: a single run is a sweep of one
learning rate. ``start_job`` does the driver-side work once (cluster, the run's
storage, data into the object store, the resume check); the frozen ``Job`` it
returns crosses into every Tune trial, whose driver builds its ``TorchTrainer``
from it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchTrainer

from rayvit.checkpoint import CONFIG_FILE
from rayvit.cluster import Placement, init_ray, resolve_placement
from rayvit.config import Config
from rayvit.data import fingerprint, load_train_val
from rayvit.errors import UserError
from rayvit.logs import quiet_libraries
from rayvit.model import build_preprocessor
from rayvit.preprocess import Preprocessor
from rayvit.storage import COMPLETE_MARKER, Storage
from rayvit.tracking import resolve_mode
from rayvit.train_loop import DataRefs, WandbSpec, WorkerSpec, train_loop_per_worker

BEST_DIR = "best"
TRIALS_DIR = "trials"
SWEEP_DIR = "sweep"
"""Tune's experiment state (what a rerun resumes from)."""
JOB_FILE = "job.json"

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
    "scaling.check_resources",
    "train.num_threads",
    "train.max_failures",
    "train.inject_fault_epoch",
    "train.compile",
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
    data: DataRefs
    data_fingerprint: str
    num_train: int
    num_val: int
    group: str
    """The wandb group of the job's runs."""

    def trainer(self, lr: float, name: str, callbacks: list[Any] | None = None) -> TorchTrainer:
        """The ``TorchTrainer`` of one run at learning rate ``lr`` (one Tune trial)."""
        cfg = self.cfg.model_copy(update={"train": self.cfg.train.model_copy(update={"lr": lr})})
        trials = self.storage.child(TRIALS_DIR)
        spec = WorkerSpec(
            cfg=cfg,
            pre=self.pre,
            class_names=self.class_names,
            data=self.data,
            run=trials.child(name),
            wandb=WandbSpec(resolve_mode(cfg), self.group, name, wandb_dir(cfg, self.storage)),
        )
        tc = cfg.train
        return TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"spec": spec},
            scaling_config=ray.train.ScalingConfig(
                num_workers=self.placement.num_workers,  # type: ignore[arg-type]  # V2 takes (min, max)
                use_gpu=self.placement.use_gpu,
                resources_per_worker=dict(self.placement.resources_per_worker),
            ),
            run_config=ray.train.RunConfig(
                name=name,
                storage_path=trials.fs_path(),
                storage_filesystem=trials.filesystem(),
                checkpoint_config=ray.train.CheckpointConfig(
                    num_to_keep=tc.keep_checkpoints,
                    checkpoint_score_attribute="val_accuracy",
                    checkpoint_score_order="max",
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
    """Cluster, placement checks, preprocessing, train/val data in the object store; the job's
    config and data fingerprint saved next to its runs."""
    quiet_libraries()
    init_ray(cfg.ray)
    placement = resolve_placement(cfg)
    pre = build_preprocessor(cfg.model)
    t0 = time.perf_counter()
    data = load_train_val(cfg.data, cfg.seed, cfg.model.image_size)
    data_fp = fingerprint(data.train, data.val)
    print(
        f"data: {len(data.train)} train / {len(data.val)} val images, {len(data.class_names)} classes "
        f"from {cfg.data.path} ({time.perf_counter() - t0:.1f}s); {placement.describe()}",
        flush=True,
    )
    check_resume(cfg, storage, data_fp)
    if cfg.restart:
        for part in (TRIALS_DIR, SWEEP_DIR, BEST_DIR, JOB_FILE):
            storage.delete(part)
    storage.write_text(json.dumps({"config": cfg.to_dict(), "data_fingerprint": data_fp}, indent=2), JOB_FILE)
    storage.write_text(cfg.to_yaml(), CONFIG_FILE)
    refs = DataRefs(
        ray.put(data.train.images),
        ray.put(data.train.labels),
        ray.put(data.val.images),
        ray.put(data.val.labels),
    )
    job = Job(
        cfg=cfg,
        storage=storage,
        placement=placement,
        pre=pre,
        class_names=tuple(data.class_names),
        data=refs,
        data_fingerprint=data_fp,
        num_train=len(data.train),
        num_val=len(data.val),
        group=f"{storage.name}-{data_fp[:8]}",
    )
    return job
