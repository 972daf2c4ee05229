"""Ray Tune sweep over any config keys, in which every trial is a full Ray Train run.

``tune.search_space`` maps dotted config keys to Tune distributions; a trial gets its values
as typed config overrides. Ray 2.60 runs Train V2, so a trial is a small driver function
that builds and fits a ``TorchTrainer`` whose ``TuneReportCallback`` forwards each epoch's
metrics (and checkpoint path) to Tune; a searcher (Tune's variant generator or Optuna's TPE)
proposes the values and ASHA stops weak trials early on ``tune.metric``. The best trial is
chosen on that validation metric only; the test split is read once, afterwards, for the
chosen checkpoint.

Population-based training is not offered: it exploits a trial by restarting another from its
Tune checkpoint with mutated values, but under Train V2 a trial's checkpoints belong to its
Ray Train run (``TuneReportCallback`` forwards their paths as metrics, not as Tune
checkpoints), so Tune has nothing to clone a trial from.
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
from ray.tune.search import Searcher

from rayvit.checkpoint import METRICS_FILE
from rayvit.cli import until_interrupted
from rayvit.cluster import Placement, cluster_capacity, waits_for_train_controllers
from rayvit.config import Config, Distribution
from rayvit.errors import UserError
from rayvit.export import Chosen, RunSummary, evaluate_on_test, export_best, test_split
from rayvit.job import BEST_DIR, SWEEP_DIR, Job, is_finished, open_storage, start_job
from rayvit.logs import quiet_libraries
from rayvit.train_loop import WORST

SWEEP_CSV = "sweep.csv"
FAILED = "failed"
"""A trial's last report when Ray Train gave up on its run (the reason)."""


def search_space(cfg: Config) -> dict[str, Distribution]:
    """The searched keys and their distributions (the lr shorthands included)."""
    return cfg.tune.space


def trial_count(cfg: Config) -> int:
    """Trials the sweep runs: grid points times samples (with the grid searcher), else samples."""
    space = search_space(cfg)
    if cfg.tune.search_alg != "grid":
        return cfg.tune.num_samples if space else 1
    grid = math.prod(len(d.args) for d in space.values() if d.kind == "grid")
    sampled = any(d.kind != "grid" for d in space.values())
    return grid * (cfg.tune.num_samples if sampled else 1)


def samples(cfg: Config) -> int:
    """Tune's ``num_samples``: the grid searcher runs a grid of fixed values once."""
    space = search_space(cfg)
    only_grid = all(d.kind == "grid" for d in space.values())
    return 1 if cfg.tune.search_alg == "grid" and only_grid else cfg.tune.num_samples


def is_sweep(cfg: Config) -> bool:
    return trial_count(cfg) > 1


def param_space(cfg: Config) -> dict[str, Any]:
    """Tune's ``param_space``: dotted config key -> Tune distribution (a grid is a choice for
    the random and optuna searchers)."""
    out: dict[str, Any] = {}
    for key, d in search_space(cfg).items():
        kind = "choice" if d.kind == "grid" and cfg.tune.search_alg != "grid" else d.kind
        if kind == "grid":
            out[key] = tune.grid_search(d.args)
        elif kind == "choice":
            out[key] = tune.choice(d.args)
        else:
            out[key] = getattr(tune, kind)(*d.args)
    return out


def search_alg(cfg: Config, concurrent: int) -> Any:
    """The searcher, seeded: Tune's variant generator (grid, random), which holds the concurrency
    limit itself, or Optuna's TPE (which ``TuneConfig.max_concurrent_trials`` wraps in a
    ``ConcurrencyLimiter``)."""
    if cfg.tune.search_alg == "optuna" and search_space(cfg):
        try:
            import optuna
            from ray.tune.search.optuna import OptunaSearch
        except ImportError as exc:
            raise UserError("tune.search_alg=optuna needs optuna: pip install 'rayvit[tune]'") from exc
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created" line
        return OptunaSearch(seed=cfg.seed)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=cfg.seed, max_concurrent=concurrent)


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
        return max(1, trial_count(cfg))
    per_trial_cpu = placement.max_workers * placement.resources_per_worker["CPU"] + cfg.tune.driver_cpus
    fits = int(cap.cpus // per_trial_cpu + 1e-9)
    if placement.use_gpu:
        fits = min(fits, cap.gpus // placement.max_workers)
    return max(1, fits)


@waits_for_train_controllers
def _train_driver(config: dict[str, Any], job: Job) -> None:
    """One Tune trial: fit the job's TorchTrainer with this trial's searched values.

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
        job.fit(dict(config), trial_id, callbacks=[TuneReportCallback()], fixed_world=is_sweep(job.cfg))
    except RayActorError:
        raise  # the controller's process or node is gone: Tune reruns the trial, which resumes
    except Exception as exc:
        # The worst value of every metric ranks the trial last for the scheduler; `failed` says why.
        tune.report({"epoch": 0.0, **WORST, FAILED: _one_line(exc)})


def _one_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:200]


def build_tuner(job: Job) -> tune.Tuner:
    """The Tuner: search space and searcher, ASHA (FIFO for a single run), concurrency;
    restored, searcher state included, when the job's storage holds its state."""
    cfg = job.cfg
    scheduler = (
        ASHAScheduler(
            time_attr="epoch",
            max_t=cfg.train.epochs,
            grace_period=min(cfg.tune.grace_period, cfg.train.epochs),  # type: ignore[arg-type]  # floats work
            reduction_factor=cfg.tune.reduction_factor,
        )
        if is_sweep(cfg) and cfg.tune.scheduler == "asha"
        else FIFOScheduler()
    )
    # The trial driver only waits on its TorchTrainer: a sliver of CPU, so that a
    # trial's workers can still take whole cores.
    trainable = tune.with_resources(
        tune.with_parameters(_train_driver, job=job), {"CPU": cfg.tune.driver_cpus}
    )
    concurrent = max_concurrent_trials(cfg, job.placement)
    searcher = search_alg(cfg, concurrent)
    fs, path = job.storage.filesystem(), job.storage.fs_path(SWEEP_DIR)
    if tune.Tuner.can_restore(path, storage_filesystem=fs):
        print(f"resuming from {job.storage.uri(SWEEP_DIR)}", flush=True)
        return tune.Tuner.restore(path, trainable=trainable, resume_errored=True, storage_filesystem=fs)
    return tune.Tuner(
        trainable,
        param_space=param_space(cfg),
        tune_config=tune.TuneConfig(
            metric=cfg.tune.metric,
            mode=cfg.tune.resolved_mode,
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=samples(cfg),
            # Only a Searcher takes Tune's limit; the variant generator holds its own.
            max_concurrent_trials=concurrent if isinstance(searcher, Searcher) else None,
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
    params: dict[str, Any]
    """The trial's searched values, by dotted config key."""
    epochs_completed: float
    best_score: float
    """The best value of ``tune.metric`` (NaN without one)."""
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

    def as_csv(self, best: bool, metric: str) -> dict[str, Any]:
        return {
            "trial_id": self.trial_id,
            **{k: _show(v) for k, v in self.params.items()},
            "epochs_completed": f"{self.epochs_completed:g}",
            f"best_{metric}": f"{self.best_score:.4f}" if not math.isnan(self.best_score) else "",
            "best_epoch": self.best_epoch or "",
            "stopped_early": self.stopped_early,
            "status": self.status,
            "error": self.error,
            "best": best,
        }

    @property
    def label(self) -> str:
        """Names the trial by its values in curves and errors."""
        return (
            ", ".join(f"{k.rsplit('.', 1)[-1]}={_show(v)}" for k, v in self.params.items()) or self.trial_id
        )


def _show(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _sort_key(row: TrialRow) -> tuple[str, ...]:
    return tuple(f"{v:020.10f}" if isinstance(v, (int, float)) else str(v) for v in row.params.values())


def trial_rows(results: Any, cfg: Config) -> list[TrialRow]:
    """One row per trial from its metrics history: the best *checkpointed* result on
    ``tune.metric`` (what can be exported), else the best mid-epoch one (a trial stopped before
    its first checkpoint), and how far it got."""
    metric, sign = cfg.tune.metric, 1.0 if cfg.tune.resolved_mode == "max" else -1.0
    keys = list(search_space(cfg))
    rows = []
    for r in results:
        df = r.metrics_dataframe
        history = df.to_dict("records") if df is not None and len(df) else []
        diverged = next((str(h["diverged"]) for h in history if isinstance(h.get("diverged"), str)), "")
        failed = next((str(h[FAILED]) for h in history if isinstance(h.get(FAILED), str)), "")
        with_val = [
            h
            for h in history
            if isinstance(h.get(metric), (int, float))
            and not h.get("diverged")
            and not isinstance(h.get(FAILED), str)
        ]
        with_ckpt = [
            h for h in with_val if isinstance(h.get("checkpoint_path"), str) and h["checkpoint_path"]
        ]
        # Equal scores: the later checkpoint, the one Ray Train keeps (``num_to_keep`` ranks the
        # later of two equal checkpoints higher and deletes the other).
        best = max(with_ckpt or with_val, key=lambda h: (sign * h[metric], h["epoch"])) if with_val else None
        done = float(max((h.get("epoch", 0) for h in with_val), default=0))
        status = "ERROR" if r.error is not None or failed else "DIVERGED" if diverged else "OK"
        err = _one_line(r.error) if r.error is not None else failed or diverged
        config = r.config or {}
        rows.append(
            TrialRow(
                trial_id=str((r.metrics or {}).get("trial_id") or r.path.rstrip("/").rsplit("/", 1)[-1]),
                params={k: _plain(config.get(k)) for k in keys},
                epochs_completed=done,
                best_score=float(best[metric]) if best else float("nan"),
                best_epoch=int(best["epoch"]) if best else 0,
                stopped_early=status == "OK" and done < cfg.train.epochs,
                status=status,
                error=err,
                checkpoint_path=str(best["checkpoint_path"]) if best and best in with_ckpt else "",
                checkpoint_metrics=dict(best) if best and best in with_ckpt else {},
                history=_per_epoch(with_val),
            )
        )
    return rows


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def _per_epoch(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Whole-epoch reports only, the last one of each epoch (a resumed epoch reports again)."""
    by_epoch = {int(h["epoch"]): h for h in history if float(h["epoch"]).is_integer()}
    return [by_epoch[e] for e in sorted(by_epoch)]


def select_best(rows: list[TrialRow], mode: str = "max") -> TrialRow:
    """Best validation score on ``tune.metric`` (ties: earlier epoch); the test split plays no part."""
    sign = 1.0 if mode == "max" else -1.0
    ok = [r for r in rows if r.status == "OK" and r.checkpoint_path and not math.isnan(r.best_score)]
    if not ok:
        if len(rows) == 1:
            r = rows[0]
            raise UserError(
                f"training {'diverged' if r.status == 'DIVERGED' else 'failed'}: {r.error or 'no checkpoint'}"
            )
        lines = "; ".join(f"trial {r.trial_id} ({r.label}): {r.error or 'no checkpoint'}" for r in rows)
        raise UserError(f"every trial failed: {lines}")
    return max(ok, key=lambda r: (sign * r.best_score, -r.best_epoch))


def sweep_csv(rows: list[TrialRow], best: TrialRow | None, metric: str) -> str:
    fields = list(rows[0].as_csv(False, metric)) if rows else ["trial_id"]
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=fields)
    w.writeheader()
    for r in sorted(rows, key=_sort_key):
        w.writerow(r.as_csv(best is not None and r.trial_id == best.trial_id, metric))
    return out.getvalue()


def format_table(rows: list[TrialRow], best: TrialRow | None, metric: str) -> str:
    """The sweep as a console table: one column per searched key."""
    keys = list(rows[0].params) if rows else []
    widths = [max(len(k), *(len(_show(r.params[k])) for r in rows)) for k in keys]
    head = f"best {metric}"
    lines = [
        f"{'trial':<12} "
        + " ".join(f"{k:>{w}}" for k, w in zip(keys, widths, strict=True))
        + f" {'epochs':>6} {head:>{len(head)}} {'early stop':>10}  status"
    ]
    for r in sorted(rows, key=_sort_key):
        mark = " *" if best is not None and r.trial_id == best.trial_id else ""
        score = "-" if math.isnan(r.best_score) else f"{r.best_score:.4f}"
        values = " ".join(f"{_show(r.params[k]):>{w}}" for k, w in zip(keys, widths, strict=True))
        lines.append(
            f"{r.trial_id:<12} {values} {r.epochs_completed:>6g} {score:>{len(head)}} "
            f"{r.stopped_early!s:>10}  {r.status}{mark}"
        )
    return "\n".join(lines)


def run_job(cfg: Config) -> RunSummary:
    """Run every trial of the search space (none: a single run), select on ``tune.metric``, test
    the chosen checkpoint once, export. Rerunning the same command resumes; a finished job answers
    at once."""
    quiet_libraries()
    storage = open_storage(cfg)
    if is_finished(cfg, storage):
        metrics = json.loads(storage.read_text(BEST_DIR, METRICS_FILE))
        return RunSummary(storage.uri(BEST_DIR), metrics, resumed_finished=True)
    job = start_job(cfg, storage)
    if is_sweep(cfg):
        space = ", ".join(f"{k} {d.kind} {d.args}" for k, d in search_space(cfg).items())
        print(
            f"sweep over {space} ({cfg.tune.search_alg}, {cfg.tune.scheduler}, {trial_count(cfg)} trials), "
            f"{job.placement.max_workers} worker(s) per trial (global batch {global_batch(cfg, job.placement.max_workers)}), "
            f"up to {max_concurrent_trials(cfg, job.placement)} trial(s) at once",
            flush=True,
        )
    results = until_interrupted(build_tuner(job).fit)
    rows = trial_rows(results, cfg)
    metric = cfg.tune.metric
    try:
        best = select_best(rows, cfg.tune.resolved_mode)
    except UserError:
        storage.write_text(sweep_csv(rows, None, metric), SWEEP_CSV)
        if len(rows) > 1:
            print(format_table(rows, None, metric), flush=True)
        raise
    table = sweep_csv(rows, best, metric)
    storage.write_text(table, SWEEP_CSV)
    if len(rows) > 1:
        print(format_table(rows, best, metric), flush=True)
    chosen = Chosen(
        ray.train.Checkpoint(best.checkpoint_path, filesystem=storage.filesystem()),
        best.checkpoint_metrics,
        best.params,
        best.trial_id,
        best.history,
    )
    test = evaluate_on_test(job, chosen, test_split(cfg))
    return export_best(
        job,
        chosen,
        test,
        {r.label: r.history for r in rows},
        extra_files={SWEEP_CSV: table.encode()},
        extra_metrics={
            "sweep": {
                "trials": len(rows),
                "best_trial": best.trial_id,
                "metric": metric,
                "mode": cfg.tune.resolved_mode,
                "search_alg": cfg.tune.search_alg,
                "scheduler": cfg.tune.scheduler,
            }
        },
    )
