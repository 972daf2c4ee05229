"""Driver side of a training run: cluster checks, data, TorchTrainer, export."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchTrainer

from rayvit.checkpoint import CONFIG_FILE, METRICS_FILE, export_model, read_metrics
from rayvit.config import Config, RayConfig
from rayvit.data import TrainValData, fingerprint, load_test, load_train_val
from rayvit.dvc import data_fingerprint
from rayvit.errors import UserError
from rayvit.logs import quiet_libraries
from rayvit.model import build_preprocessor
from rayvit.plots import confusion_matrix, plot_confusion, plot_curves
from rayvit.preprocess import Preprocessor
from rayvit.tracking import log_final, resolve_mode
from rayvit.train_loop import read_history, train_loop_per_worker

BEST_DIR = "best"
TRAIN_NAME = "train"


def init_ray(rc: RayConfig) -> None:
    """Connect to the configured or ambient cluster, else start a local one."""
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"log_to_driver": True}
    if rc.address:
        kwargs["address"] = rc.address
    elif not os.environ.get("RAY_ADDRESS"):
        # A fresh local cluster; a stale "current cluster" file must not be joined.
        kwargs["address"] = "local"
        if rc.num_cpus is not None:
            kwargs["num_cpus"] = rc.num_cpus
        # Ray Train's placement-group cleaner asks the state API whether its controller lives;
        # without this it may ask another (or a dead) cluster on the same machine. The cluster's
        # processes inherit this environment.
        port = _free_port(8265)
        kwargs["dashboard_port"] = port
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    try:
        ray.init(**kwargs)
    except ConnectionError as exc:
        raise UserError(f"ray.address: cannot connect to the Ray cluster: {exc}") from exc


def _free_port(preferred: int) -> int:
    """``preferred`` when nothing listens there, else a free port the OS picks."""
    for port in (preferred, 0):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise UserError("no free TCP port for the Ray dashboard")


@dataclass
class Placement:
    num_workers: int
    use_gpu: bool
    resources_per_worker: dict[str, float]


def resolve_placement(cfg: Config) -> Placement:
    """Turn ``auto`` scaling settings into numbers and check the cluster can place them."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = float(resources.get("CPU", 0))
    sc = cfg.scaling
    use_gpu = gpus > 0 if sc.use_gpu == "auto" else bool(sc.use_gpu)
    if use_gpu and gpus == 0 and sc.check_resources:
        raise UserError(
            "scaling.use_gpu=true but the Ray cluster has no GPUs (set scaling.use_gpu=auto or false)"
        )
    if sc.num_workers == "auto":
        num_workers = max(1, gpus) if use_gpu else 1
    else:
        num_workers = int(sc.num_workers)
        if num_workers < 1:
            raise UserError(f"scaling.num_workers must be >= 1 or 'auto' (got {num_workers})")
    per_worker: dict[str, float] = {"CPU": sc.cpus_per_worker}
    if use_gpu:
        per_worker["GPU"] = 1.0
    if sc.check_resources:
        need_cpu = num_workers * sc.cpus_per_worker
        if need_cpu > cpus + 1e-9:
            raise UserError(
                f"scaling.num_workers={num_workers} x scaling.cpus_per_worker={sc.cpus_per_worker} "
                f"needs {need_cpu:g} CPUs but the Ray cluster has {cpus:g}"
            )
        if use_gpu and num_workers > gpus:
            raise UserError(
                f"scaling.num_workers={num_workers} needs {num_workers} GPUs but the Ray cluster has {gpus}"
            )
    return Placement(num_workers, use_gpu, per_worker)


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
            timeout=10,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("GIT_COMMIT", "unknown")


def trainer_for(
    cfg: Config,
    data_refs: dict[str, Any],
    pre: Preprocessor,
    class_names: list[str],
    placement: Placement,
    storage: Path,
    name: str,
    callbacks: list[Any] | None = None,
    wandb_group: str | None = None,
) -> TorchTrainer:
    """The ``TorchTrainer`` of one training run (also one Tune trial)."""
    loop_config = {
        "config": cfg.to_dict(),
        "run_dir": str(storage / name),
        "mean": list(pre.mean),
        "std": list(pre.std),
        "class_names": class_names,
        "wandb": {
            "mode": resolve_mode(cfg),
            "group": wandb_group or Path(cfg.output_dir).name,
            "name": name,
            "dir": str(Path(cfg.output_dir).resolve()),
        },
        **data_refs,
    }
    (storage / name).mkdir(parents=True, exist_ok=True)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=placement.num_workers,
            use_gpu=placement.use_gpu,
            resources_per_worker=placement.resources_per_worker,
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=str(storage),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.train.keep_checkpoints,
                checkpoint_score_attribute="val_accuracy",
                checkpoint_score_order="max",
            ),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=callbacks,
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),  # type: ignore[call-arg]  # Train V2's RunConfig; the stubs show V1's
    )


def put_data(data: TrainValData) -> dict[str, Any]:
    """Put the arrays into the object store once; workers map them zero-copy."""
    return {
        "train_images": ray.put(data.train.images),
        "train_labels": ray.put(data.train.labels),
        "val_images": ray.put(data.val.images),
        "val_labels": ray.put(data.val.labels),
    }


def best_checkpoint(result: Any) -> tuple[ray.train.Checkpoint, dict[str, Any]]:
    """The kept checkpoint with the highest validation accuracy (never test)."""
    candidates = list(result.best_checkpoints or [])
    if not candidates:
        raise UserError(f"training produced no checkpoint (see the log under {result.path})")
    best: tuple[ray.train.Checkpoint, dict[str, Any]] = max(
        candidates, key=lambda cm: (cm[1]["val_accuracy"], -cm[1]["epoch"])
    )
    return best


def evaluate_on_test(checkpoint: ray.train.Checkpoint, cfg: Config, placement: Placement) -> dict[str, Any]:
    """Final evaluation of one checkpoint on the test split, as a Ray task on a worker's resources."""
    opts: dict[str, Any] = {"num_cpus": placement.resources_per_worker["CPU"]}
    if placement.use_gpu:
        opts["num_gpus"] = 1
    out: dict[str, Any] = ray.get(_evaluate_task.options(**opts).remote(checkpoint, cfg.to_dict()))
    return out


@ray.remote
def _evaluate_task(checkpoint: ray.train.Checkpoint, cfg_dict: dict[str, Any]) -> dict[str, Any]:
    import torch

    from rayvit.config import config_from_dict
    from rayvit.predict import Predictor, evaluate_arrays, pick_device
    from rayvit.train_loop import worker_threads

    cfg = config_from_dict(cfg_dict)
    quiet_libraries()
    torch.set_num_threads(worker_threads(cfg))
    test = load_test(cfg.data, cfg.model.image_size)
    with checkpoint.as_directory() as d:
        predictor = Predictor(Path(d) / "model", pick_device())
        loss, acc, pred = evaluate_arrays(
            predictor.model,
            predictor.pre,
            test.images,
            test.labels,
            cfg.train.eval_batch_size,
            predictor.device,
        )
    return {
        "test_loss": loss,
        "test_accuracy": acc,
        "test_predictions": pred.tolist(),
        "test_labels": test.labels.tolist(),
        "test_fingerprint": fingerprint(test),
        "num_test": len(test),
    }


@dataclass
class RunSummary:
    best_dir: Path
    metrics: dict[str, Any]
    resumed_finished: bool = False


def finished_summary(cfg: Config) -> RunSummary | None:
    """A run whose export is complete is not trained again."""
    best = Path(cfg.output_dir).resolve() / BEST_DIR
    if (best / METRICS_FILE).is_file():
        return RunSummary(best, read_metrics(best), resumed_finished=True)
    return None


def export_best(
    cfg: Config,
    checkpoint: ray.train.Checkpoint,
    ckpt_metrics: dict[str, Any],
    test: dict[str, Any],
    data: TrainValData,
    train_fp: str,
    histories: dict[str, list[dict[str, Any]]],
    wandb_run: tuple[str, str],
    extra_files: list[Path] | None = None,
    extra_metrics: dict[str, Any] | None = None,
) -> RunSummary:
    """Write ``<output_dir>/best``: model, metrics.json, curves and the test confusion matrix.

    ``wandb_run`` is the (group, name) of the chosen run, which gets the final test metrics.
    """
    out = Path(cfg.output_dir).resolve()
    metrics: dict[str, Any] = {
        "val_accuracy": ckpt_metrics["val_accuracy"],
        "val_loss": ckpt_metrics["val_loss"],
        "test_accuracy": test["test_accuracy"],
        "test_loss": test["test_loss"],
        "learning_rate": cfg.train.lr,
        "epochs": cfg.train.epochs,
        "best_epoch": ckpt_metrics["epoch"],
        "data": {
            "source": data.source,
            # DVC's hash of the data folder when it is one (so the model names the exact
            # DVC-tracked data), else the content hash of the pixels and labels.
            "fingerprint": data_fingerprint(data.source) or f"{train_fp}-{test['test_fingerprint']}",
            "content_fingerprint": f"{train_fp}-{test['test_fingerprint']}",
            "num_train": len(data.train),
            "num_val": len(data.val),
            "num_test": test["num_test"],
            "class_names": data.class_names,
        },
        "model": {"pretrained": cfg.model.pretrained, "image_size": cfg.model.image_size},
        "checkpoint": checkpoint.path,
        "git_commit": git_commit(),
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **(extra_metrics or {}),
    }
    plots_dir = out / ".plots"
    plots_dir.mkdir(exist_ok=True)
    curves = plot_curves(histories, plots_dir / "training_curves.png")
    cm = confusion_matrix(test["test_labels"], test["test_predictions"], len(data.class_names))
    cm_png = plot_confusion(
        cm, data.class_names, plots_dir / "confusion_matrix.png", f"test accuracy {test['test_accuracy']:.3f}"
    )
    (plots_dir / "confusion_matrix.json").write_text(
        json.dumps({"labels": data.class_names, "matrix": cm.tolist()})
    )
    files = [curves, cm_png, plots_dir / "confusion_matrix.json", *(extra_files or [])]
    with checkpoint.as_directory() as d:
        best = export_model(Path(d), out / BEST_DIR, metrics, files)
    log_final(cfg, wandb_run[0], wandb_run[1], out, resolve_mode(cfg), metrics, [curves, cm_png])
    return RunSummary(best, metrics)


@dataclass
class JobSetup:
    """What a training run and a sweep both start from."""

    out: Path
    placement: Placement
    pre: Preprocessor
    data: TrainValData
    train_fp: str


def setup_job(cfg: Config) -> JobSetup:
    """Cluster, placement checks, preprocessing, train/val data; the run's config saved."""
    quiet_libraries()
    out = Path(cfg.output_dir).resolve()
    init_ray(cfg.ray)
    placement = resolve_placement(cfg)
    pre = build_preprocessor(cfg.model)
    t0 = time.perf_counter()
    data = load_train_val(cfg.data, cfg.seed, cfg.model.image_size)
    train_fp = fingerprint(data.train, data.val)
    print(
        f"data: {len(data.train)} train / {len(data.val)} val images, {len(data.class_names)} classes "
        f"from {cfg.data.path} ({time.perf_counter() - t0:.1f}s); "
        f"{placement.num_workers} worker(s) per run, {'GPU' if placement.use_gpu else 'CPU'}",
        flush=True,
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(cfg.to_yaml())
    return JobSetup(out, placement, pre, data, train_fp)


def run_training(cfg: Config) -> RunSummary:
    """Train (or resume), pick the best checkpoint by validation accuracy, test it once, export."""
    done = finished_summary(cfg)
    if done is not None:
        return done
    job = setup_job(cfg)
    out, placement, pre, data, train_fp = job.out, job.placement, job.pre, job.data, job.train_fp
    group = out.name
    trainer = trainer_for(
        cfg, put_data(data), pre, data.class_names, placement, out, TRAIN_NAME, wandb_group=group
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise UserError(
            f"training failed: {_short(exc)} (checkpoints kept under {out / TRAIN_NAME})"
        ) from exc
    ckpt, ckpt_metrics = best_checkpoint(result)
    test = evaluate_on_test(ckpt, cfg, placement)
    histories = {TRAIN_NAME: read_history(out / TRAIN_NAME)}
    return export_best(cfg, ckpt, ckpt_metrics, test, data, train_fp, histories, (group, TRAIN_NAME))


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__
