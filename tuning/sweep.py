"""Ray Tune learning-rate sweep in which every trial is a full Ray Train run.

Ray 2.60 runs Train V2, so a trial is a small driver function that builds and
fits a ``TorchTrainer`` whose ``TuneReportCallback`` forwards each epoch's
metrics (and checkpoint path) to Tune; ASHA stops weak trials early on
validation accuracy. The best trial is chosen on validation accuracy only; the
test split is read once, afterwards, for the chosen checkpoint.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from typing import Any

import ray
import ray.train
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from rayvit.checkpoint import METRICS_FILE
from rayvit.cli import until_interrupted
from rayvit.cluster import Placement, cluster_capacity, waits_for_train_controllers
from rayvit.config import Config
from rayvit.errors import UserError
from rayvit.export import Chosen, RunSummary, evaluate_on_test, export_best, test_split
from rayvit.job import BEST_DIR, SWEEP_DIR, Job, is_finished, open_storage, start_job
from rayvit.logs import quiet_libraries

SWEEP_CSV = "sweep.csv"
METRIC = "val_accuracy"
FAILED = "failed"
"""A trial's last report when Ray Train gave up on its run (the reason)."""


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


def global_batch(cfg: Config, workers: int) -> int:
    """Images per optimizer step over all workers: what ``train.lr`` is set for."""
    return cfg.train.batch_size * cfg.train.grad_accum_steps * workers


def max_concurrent_trials(cfg: Config, placement: Placement) -> int:
    """How many trials fit side by side: CPUs (and GPUs) up now over one trial's workers; on an
    autoscaling cluster every trial may run at once (the autoscaler adds nodes for them)."""
    if cfg.tune.max_concurrent_trials != "auto":
        return int(cfg.tune.max_concurrent_trials)
    cap = cluster_capacity()
    if cap.autoscaler is not None:
        return max(1, len(learning_rates(cfg) or []) or cfg.tune.num_samples)
    per_trial_cpu = placement.max_workers * placement.resources_per_worker["CPU"] + cfg.tune.driver_cpus
    fits = int(cap.cpus // per_trial_cpu + 1e-9)
    if placement.use_gpu:
        fits = min(fits, cap.gpus // placement.max_workers)
    return max(1, fits)


@waits_for_train_controllers
def _train_driver(config: dict[str, Any], job: Job) -> None:
    """One Tune trial: fit the job's TorchTrainer at this trial's learning rate.

    Two layers of fault tolerance meet here. Ray Train restarts lost *workers* from the run's
    last checkpoint (``train.max_failures``). This driver and the Train controller that Ray Train
    pins to its node are not covered by that: when their node is lost, Tune sees the trial's
    actor die and reruns the trial (``tune.FailureConfig``, the same budget); the new driver
    fits a trainer of the same name in the same storage, and Ray Train resumes it from the
    checkpoints it finds there. A run that Ray Train itself gave up on (a bug, an unreadable
    checkpoint, workers lost more often than allowed) would only fail again, so it is reported
    as a failed trial instead of raised: Tune retries nothing but lost processes and nodes.
    """
    from ray.exceptions import RayActorError
    from ray.tune.integration.ray_train import TuneReportCallback

    quiet_libraries()
    trial_id = tune.get_context().get_trial_id()
    try:
        job.trainer(
            float(config["lr"]), trial_id, callbacks=[TuneReportCallback()], fixed_world=is_sweep(job.cfg)
        ).fit()
    except RayActorError:
        raise  # the controller's process or node is gone: Tune reruns the trial, which resumes
    except Exception as exc:
        # val_accuracy 0 ranks the trial last for the scheduler; `failed` says why.
        tune.report({"epoch": 0.0, METRIC: 0.0, FAILED: _one_line(exc)})


def _one_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:200]


def build_tuner(job: Job) -> tune.Tuner:
    """The Tuner: search space, ASHA (FIFO for a single run), concurrency; restored when the
    job's storage holds its state."""
    cfg = job.cfg
    scheduler = (
        ASHAScheduler(
            time_attr="epoch",
            max_t=cfg.train.epochs,
            grace_period=min(cfg.tune.grace_period, cfg.train.epochs),  # type: ignore[arg-type]  # floats work
            reduction_factor=cfg.tune.reduction_factor,
        )
        if is_sweep(cfg)
        else FIFOScheduler()
    )
    # The trial driver only waits on its TorchTrainer: a sliver of CPU, so that a
    # trial's workers can still take whole cores.
    trainable = tune.with_resources(
        tune.with_parameters(_train_driver, job=job), {"CPU": cfg.tune.driver_cpus}
    )
    fs, path = job.storage.filesystem(), job.storage.fs_path(SWEEP_DIR)
    if tune.Tuner.can_restore(path, storage_filesystem=fs):
        print(f"resuming from {job.storage.uri(SWEEP_DIR)}", flush=True)
        return tune.Tuner.restore(path, trainable=trainable, resume_errored=True, storage_filesystem=fs)
    return tune.Tuner(
        trainable,
        param_space=param_space(cfg),
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode="max",
            scheduler=scheduler,
            num_samples=1 if learning_rates(cfg) is not None else cfg.tune.num_samples,
            max_concurrent_trials=max_concurrent_trials(cfg, job.placement),
        ),
        run_config=tune.RunConfig(
            name=SWEEP_DIR,
            storage_path=job.storage.fs_path(),
            storage_filesystem=fs,
            # A trial whose driver (and with it its Train controller) lost its node is rerun and
            # resumes from its last checkpoint; the budget is the one Ray Train has for workers.
            failure_config=tune.FailureConfig(max_failures=cfg.train.max_failures),
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
    """OK, ERROR or DIVERGED."""
    error: str
    checkpoint_path: str
    checkpoint_metrics: dict[str, Any]
    """What the chosen checkpoint reported (empty without one)."""
    history: list[dict[str, Any]]
    """Per-epoch metrics (the last report of each whole epoch)."""

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
        diverged = next((str(h["diverged"]) for h in history if isinstance(h.get("diverged"), str)), "")
        failed = next((str(h[FAILED]) for h in history if isinstance(h.get(FAILED), str)), "")
        with_val = [
            h
            for h in history
            if isinstance(h.get(METRIC), (int, float))
            and not h.get("diverged")
            and not isinstance(h.get(FAILED), str)
        ]
        with_ckpt = [
            h for h in with_val if isinstance(h.get("checkpoint_path"), str) and h["checkpoint_path"]
        ]
        best = max(with_ckpt or with_val, key=lambda h: (h[METRIC], -h["epoch"])) if with_val else None
        done = float(max((h.get("epoch", 0) for h in with_val), default=0))
        status = "ERROR" if r.error is not None or failed else "DIVERGED" if diverged else "OK"
        err = _one_line(r.error) if r.error is not None else failed or diverged
        rows.append(
            TrialRow(
                trial_id=str((r.metrics or {}).get("trial_id") or r.path.rstrip("/").rsplit("/", 1)[-1]),
                lr=float(r.config.get("lr", float("nan"))),
                epochs_completed=done,
                best_val_accuracy=float(best[METRIC]) if best else float("nan"),
                best_epoch=int(best["epoch"]) if best else 0,
                stopped_early=status == "OK" and done < epochs,
                status=status,
                error=err,
                checkpoint_path=str(best["checkpoint_path"]) if best and best in with_ckpt else "",
                checkpoint_metrics=dict(best) if best and best in with_ckpt else {},
                history=_per_epoch(with_val),
            )
        )
    return rows


def _per_epoch(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Whole-epoch reports only, the last one of each epoch (a resumed epoch reports again)."""
    by_epoch = {int(h["epoch"]): h for h in history if float(h["epoch"]).is_integer()}
    return [by_epoch[e] for e in sorted(by_epoch)]


def select_best(rows: list[TrialRow]) -> TrialRow:
    """Highest validation accuracy (ties: earlier epoch); the test split plays no part."""
    ok = [r for r in rows if r.status == "OK" and r.checkpoint_path and not math.isnan(r.best_val_accuracy)]
    if not ok:
        if len(rows) == 1:
            r = rows[0]
            raise UserError(
                f"training {'diverged' if r.status == 'DIVERGED' else 'failed'}: {r.error or 'no checkpoint'}"
            )
        lines = "; ".join(f"trial {r.trial_id} (lr={r.lr:.3g}): {r.error or 'no checkpoint'}" for r in rows)
        raise UserError(f"every trial failed: {lines}")
    return max(ok, key=lambda r: (r.best_val_accuracy, -r.best_epoch))


def sweep_csv(rows: list[TrialRow], best: TrialRow | None) -> str:
    fields = list(rows[0].as_csv(False)) if rows else ["trial_id"]
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=fields)
    w.writeheader()
    for r in sorted(rows, key=lambda r: r.lr):
        w.writerow(r.as_csv(best is not None and r.trial_id == best.trial_id))
    return out.getvalue()


def format_table(rows: list[TrialRow], best: TrialRow | None) -> str:
    lines = [f"{'trial':<12} {'lr':>10} {'epochs':>6} {'best val acc':>12} {'early stop':>10}  status"]
    for r in sorted(rows, key=lambda r: r.lr):
        mark = " *" if best is not None and r.trial_id == best.trial_id else ""
        acc = "-" if math.isnan(r.best_val_accuracy) else f"{r.best_val_accuracy:.4f}"
        lines.append(
            f"{r.trial_id:<12} {r.lr:>10.3g} {r.epochs_completed:>6g} {acc:>12} {r.stopped_early!s:>10}  {r.status}{mark}"
        )
    return "\n".join(lines)


def run_job(cfg: Config) -> RunSummary:
    """Train every learning rate (one is a single run), select on validation accuracy, test the
    chosen checkpoint once, export. Rerunning the same command resumes; a finished job answers
    at once."""
    quiet_libraries()
    storage = open_storage(cfg)
    if is_finished(cfg, storage):
        metrics = json.loads(storage.read_text(BEST_DIR, METRICS_FILE))
        return RunSummary(storage.uri(BEST_DIR), metrics, resumed_finished=True)
    job = start_job(cfg, storage)
    if is_sweep(cfg):
        print(
            f"sweep over lr {cfg.tune.lrs or (cfg.tune.lr_min, cfg.tune.lr_max)}, "
            f"{job.placement.max_workers} worker(s) per trial (global batch {global_batch(cfg, job.placement.max_workers)}), "
            f"up to {max_concurrent_trials(cfg, job.placement)} trial(s) at once",
            flush=True,
        )
    results = until_interrupted(build_tuner(job).fit)
    rows = trial_rows(results, cfg.train.epochs)
    try:
        best = select_best(rows)
    except UserError:
        storage.write_text(sweep_csv(rows, None), SWEEP_CSV)
        if len(rows) > 1:
            print(format_table(rows, None), flush=True)
        raise
    table = sweep_csv(rows, best)
    storage.write_text(table, SWEEP_CSV)
    if len(rows) > 1:
        print(format_table(rows, best), flush=True)
    chosen = Chosen(
        ray.train.Checkpoint(best.checkpoint_path, filesystem=storage.filesystem()),
        best.checkpoint_metrics,
        best.lr,
        best.trial_id,
        best.history,
    )
    test = evaluate_on_test(job, chosen, test_split(cfg))
    return export_best(
        job,
        chosen,
        test,
        {f"lr={r.lr:.2g}": r.history for r in rows},
        extra_files={SWEEP_CSV: table.encode()},
        extra_metrics={"sweep": {"trials": len(rows), "best_trial": best.trial_id}},
    )
