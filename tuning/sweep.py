"""Ray Tune learning-rate sweep in which every trial is a full Ray Train run.

Ray 2.60 runs Train V2, so a trial is a small driver function that builds and
fits a ``TorchTrainer`` whose ``TuneReportCallback`` forwards each epoch's
metrics (and checkpoint path) to Tune; ASHA stops weak trials early on
validation accuracy. The best trial is chosen on validation accuracy only; the
test split is read once, afterwards, for the chosen checkpoint.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from rayvit.config import Config, config_from_dict
from rayvit.errors import UserError
from rayvit.logs import quiet_libraries
from rayvit.run import (
    Placement,
    RunSummary,
    evaluate_on_test,
    export_best,
    finished_summary,
    put_data,
    setup_job,
    trainer_for,
)
from rayvit.train_loop import read_history

SWEEP_NAME = "sweep"
TRIALS_DIR = "trials"
SWEEP_CSV = "sweep.csv"
METRIC = "val_accuracy"


def learning_rates(cfg: Config) -> list[float] | None:
    """The grid, or None for a log-uniform search; a single rate means no sweep."""
    t = cfg.tune
    if t.lrs is not None:
        if not t.lrs:
            raise UserError("tune.lrs is empty: give at least one learning rate")
        if any(lr <= 0 for lr in t.lrs):
            raise UserError(f"tune.lrs must be positive (got {t.lrs})")
        return list(t.lrs)
    if t.lr_min is None and t.lr_max is None:
        return [cfg.train.lr]
    if t.lr_min is None or t.lr_max is None or t.lr_min >= t.lr_max:
        raise UserError(
            f"tune.lr_min and tune.lr_max must both be set with lr_min < lr_max (got {t.lr_min}, {t.lr_max})"
        )
    return None


def is_sweep(cfg: Config) -> bool:
    lrs = learning_rates(cfg)
    return lrs is None or len(lrs) > 1


def param_space(cfg: Config) -> dict[str, Any]:
    lrs = learning_rates(cfg)
    if lrs is not None:
        return {"lr": tune.grid_search(lrs)}
    assert cfg.tune.lr_min is not None and cfg.tune.lr_max is not None
    return {"lr": tune.loguniform(cfg.tune.lr_min, cfg.tune.lr_max)}


def max_concurrent_trials(cfg: Config, placement: Placement) -> int:
    """How many trials fit side by side: cluster CPUs (and GPUs) over one trial's workers."""
    if cfg.tune.max_concurrent_trials != "auto":
        return int(cfg.tune.max_concurrent_trials)
    res = ray.cluster_resources()
    per_trial_cpu = placement.num_workers * placement.resources_per_worker["CPU"] + cfg.tune.driver_cpus
    fits = int(float(res.get("CPU", 0)) // per_trial_cpu + 1e-9)
    if placement.use_gpu:
        fits = min(fits, int(res.get("GPU", 0)) // placement.num_workers)
    return max(1, fits)


def _train_driver(config: dict[str, Any], base: dict[str, Any], shared: dict[str, Any]) -> None:
    """One Tune trial: fit a TorchTrainer at this trial's learning rate."""
    from ray.tune.integration.ray_train import TuneReportCallback

    quiet_libraries()
    raw = dict(base)
    raw["train"] = {**raw["train"], "lr": float(config["lr"])}
    cfg = config_from_dict(raw)
    trial_id = tune.get_context().get_trial_id()
    trainer = trainer_for(
        cfg,
        shared["data_refs"],
        shared["pre"],
        shared["class_names"],
        shared["placement"],
        Path(shared["trials_dir"]),
        trial_id,
        callbacks=[TuneReportCallback()],
        wandb_group=shared["sweep_id"],
    )
    trainer.fit()


def build_tuner(cfg: Config, trainable: Any, placement: Placement, out: Path, restore: bool) -> tune.Tuner:
    """The Tuner: search space, ASHA, concurrency from the cluster; restored when possible."""
    scheduler = ASHAScheduler(
        time_attr="epoch",
        max_t=cfg.train.epochs,
        grace_period=min(cfg.tune.grace_period, cfg.train.epochs),  # type: ignore[arg-type]  # floats work
        reduction_factor=cfg.tune.reduction_factor,
    )
    # The trial driver only waits on its TorchTrainer: a sliver of CPU, so that a
    # trial's workers can still take whole cores.
    trainable = tune.with_resources(trainable, {"CPU": cfg.tune.driver_cpus})
    sweep_path = out / SWEEP_NAME
    if restore and tune.Tuner.can_restore(str(sweep_path)):
        print(f"resuming sweep from {sweep_path}", flush=True)
        return tune.Tuner.restore(str(sweep_path), trainable=trainable, resume_errored=True)
    return tune.Tuner(
        trainable,
        param_space=param_space(cfg),
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode="max",
            scheduler=scheduler,
            num_samples=1 if cfg.tune.lrs is not None else cfg.tune.num_samples,
            max_concurrent_trials=max_concurrent_trials(cfg, placement),
        ),
        run_config=tune.RunConfig(
            name=SWEEP_NAME,
            storage_path=str(out),
            failure_config=tune.FailureConfig(max_failures=0),
            verbose=0,
        ),
    )


@dataclass
class TrialRow:
    trial_id: str
    lr: float
    epochs_completed: float
    best_val_accuracy: float
    best_epoch: int
    stopped_early: bool
    status: str
    error: str
    checkpoint_path: str

    def as_csv(self, best: bool) -> dict[str, Any]:
        return {
            "trial_id": self.trial_id,
            "lr": f"{self.lr:.6g}",
            "epochs_completed": f"{self.epochs_completed:g}",
            "best_val_accuracy": f"{self.best_val_accuracy:.4f}"
            if not math.isnan(self.best_val_accuracy)
            else "",
            "best_epoch": self.best_epoch or "",
            "stopped_early": self.stopped_early,
            "status": self.status,
            "error": self.error,
            "best": best,
        }


def trial_rows(results: Any, epochs: int) -> list[TrialRow]:
    """One row per trial from its metrics history: the best *checkpointed* validation result
    (what can be exported), else the best mid-epoch one (a trial stopped before its first
    checkpoint), and how far it got."""
    rows = []
    for r in results:
        df = r.metrics_dataframe
        history = df.to_dict("records") if df is not None and len(df) else []
        with_val = [h for h in history if isinstance(h.get(METRIC), (int, float))]
        with_ckpt = [
            h for h in with_val if isinstance(h.get("checkpoint_path"), str) and h["checkpoint_path"]
        ]
        best = max(with_ckpt or with_val, key=lambda h: (h[METRIC], -h["epoch"])) if with_val else None
        done = float(max((h.get("epoch", 0) for h in history), default=0))
        err = "" if r.error is None else str(r.error).strip().splitlines()[-1][:200]
        rows.append(
            TrialRow(
                trial_id=r.path.rstrip("/").split("/")[-1].split("_")[-1] if not r.config else _trial_id(r),
                lr=float(r.config.get("lr", float("nan"))),
                epochs_completed=done,
                best_val_accuracy=float(best[METRIC]) if best else float("nan"),
                best_epoch=int(best["epoch"]) if best else 0,
                stopped_early=r.error is None and done < epochs,
                status="ERROR" if r.error is not None else "OK",
                error=err,
                checkpoint_path=str(best["checkpoint_path"]) if best and best in with_ckpt else "",
            )
        )
    return rows


def _trial_id(result: Any) -> str:
    metrics = result.metrics or {}
    return str(metrics.get("trial_id") or Path(result.path).name)


def select_best(rows: list[TrialRow]) -> TrialRow:
    """Highest validation accuracy (ties: earlier epoch); the test split plays no part."""
    ok = [r for r in rows if r.status == "OK" and r.checkpoint_path and not math.isnan(r.best_val_accuracy)]
    if not ok:
        lines = "; ".join(f"trial {r.trial_id} (lr={r.lr:.3g}): {r.error or 'no checkpoint'}" for r in rows)
        raise UserError(f"every trial failed: {lines}")
    return max(ok, key=lambda r: (r.best_val_accuracy, -r.best_epoch))


def write_sweep_csv(rows: list[TrialRow], best: TrialRow | None, path: Path) -> Path:
    fields = list(rows[0].as_csv(False)) if rows else ["trial_id"]
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in sorted(rows, key=lambda r: r.lr):
            w.writerow(r.as_csv(best is not None and r.trial_id == best.trial_id))
    tmp.replace(path)
    return path


def format_table(rows: list[TrialRow], best: TrialRow | None) -> str:
    lines = [f"{'trial':<12} {'lr':>10} {'epochs':>6} {'best val acc':>12} {'early stop':>10}  status"]
    for r in sorted(rows, key=lambda r: r.lr):
        mark = " *" if best is not None and r.trial_id == best.trial_id else ""
        acc = "-" if math.isnan(r.best_val_accuracy) else f"{r.best_val_accuracy:.4f}"
        lines.append(
            f"{r.trial_id:<12} {r.lr:>10.3g} {r.epochs_completed:>6g} {acc:>12} {r.stopped_early!s:>10}  {r.status}{mark}"
        )
    return "\n".join(lines)


def run_sweep(cfg: Config) -> RunSummary:
    """Sweep, select on validation accuracy, evaluate the winner once on test, export."""
    done = finished_summary(cfg)
    if done is not None:
        return done
    job = setup_job(cfg)
    out, placement, pre, data, train_fp = job.out, job.placement, job.pre, job.data, job.train_fp
    concurrency = max_concurrent_trials(cfg, placement)
    print(
        f"sweep over lr {cfg.tune.lrs or (cfg.tune.lr_min, cfg.tune.lr_max)}, "
        f"{placement.num_workers} worker(s) per trial, up to {concurrency} trial(s) at once",
        flush=True,
    )
    shared = {
        "data_refs": put_data(data),
        "pre": pre,
        "class_names": data.class_names,
        "placement": placement,
        "trials_dir": str(out / TRIALS_DIR),
        "sweep_id": f"{out.name}-{train_fp[:8]}",
    }
    trainable = tune.with_parameters(_train_driver, base=cfg.to_dict(), shared=shared)
    tuner = build_tuner(cfg, trainable, placement, out, restore=True)
    results = tuner.fit()
    rows = trial_rows(results, cfg.train.epochs)
    try:
        best = select_best(rows)
    except UserError:
        write_sweep_csv(rows, None, out / SWEEP_CSV)
        print(format_table(rows, None), flush=True)
        raise
    csv_path = write_sweep_csv(rows, best, out / SWEEP_CSV)
    print(format_table(rows, best), flush=True)
    best_cfg = cfg.model_copy(deep=True)
    best_cfg.train.lr = best.lr
    ckpt = ray.train.Checkpoint(best.checkpoint_path)
    from rayvit.checkpoint import read_metrics

    ckpt_metrics = read_metrics(best.checkpoint_path)
    test = evaluate_on_test(ckpt, best_cfg, placement)
    histories = {f"lr={r.lr:.2g}": read_history(out / TRIALS_DIR / r.trial_id) for r in rows}
    return export_best(
        best_cfg,
        ckpt,
        ckpt_metrics,
        test,
        data,
        train_fp,
        histories,
        (str(shared["sweep_id"]), best.trial_id),
        extra_files=[csv_path],
        extra_metrics={"sweep": {"trials": len(rows), "best_trial": best.trial_id}},
    )
