"""The learning-rate sweep: real Ray Tune trials, each a real Ray Train run."""

from __future__ import annotations

import csv
import json
import struct
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import TINY, require_data, run_train_cli, tiny_config
from support import assert_only_project_output

import tuning.sweep as sweep
from rayvit.config import load_config
from rayvit.errors import UserError
from tuning.sweep import TrialRow, select_best


@pytest.fixture(scope="module")
def sweep_run(ray_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A finished sweep: a sane learning rate and an absurd one (known outcome). Its tests are
    in the slow tier (the sweep is 3-4 minutes on a busy 2-core machine); the everyday tier's
    training tests run the same Tune path with one learning rate.

    ASHA's first rung is at the last epoch, so no trial is stopped early and each trains both
    epochs whatever order Tune runs them in (early stopping has a test of its own).
    """
    tmp = tmp_path_factory.mktemp("sweep")
    cfg = tiny_config(
        tmp,
        "tune.lrs=[1e-3,50.0]",
        "tune.search_space.train.label_smoothing.choice=[0.1]",  # a second searched key
        "train.epochs=2",
        "tune.grace_period=2",
        "scaling.num_workers=1",
    )
    calls: list[str] = []
    from rayvit.export import evaluate_on_test as original

    def recording(job: Any, chosen: Any, test: Any) -> Any:
        calls.append(chosen.checkpoint.path)
        return original(job, chosen, test)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sweep, "evaluate_on_test", recording)
        summary = sweep.run_job(cfg)
    return {"out": Path(cfg.output_dir), "summary": summary, "test_calls": calls, "cfg": cfg}


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_best_trial_is_chosen_by_validation_accuracy(sweep_run: dict[str, Any]) -> None:
    out = sweep_run["out"]
    rows = _rows(out / "sweep.csv")
    assert sorted(float(r["train.lr"]) for r in rows) == [1e-3, 50.0]
    assert [r["train.label_smoothing"] for r in rows] == ["0.1", "0.1"]  # every searched key, a column
    best = [r for r in rows if r["best"] == "True"]
    assert len(best) == 1 and float(best[0]["train.lr"]) == 1e-3
    assert float(best[0]["best_val_accuracy"]) == max(float(r["best_val_accuracy"]) for r in rows)
    for r in rows:
        assert {"trial_id", "epochs_completed", "stopped_early"} <= set(r)
    metrics = json.loads((out / "best" / "metrics.json").read_text())
    assert metrics["learning_rate"] == 1e-3
    assert metrics["searched"] == {"train.lr": 1e-3, "train.label_smoothing": 0.1}
    assert 0.0 <= metrics["test_macro_f1"] <= 1.0 and len(metrics["test_per_class_accuracy"]) == 10
    exported = yaml.safe_load((out / "best" / "config.yaml").read_text())
    assert exported["train"]["lr"] == 1e-3 and exported["train"]["label_smoothing"] == 0.1
    assert metrics["sweep"]["trials"] == 2
    assert _rows(out / "best" / "sweep.csv") == rows  # lineage travels with the model
    for png in ("training_curves.png", "confusion_matrix.png"):
        assert (out / "best" / png).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_test_split_is_read_once_after_selection(sweep_run: dict[str, Any]) -> None:
    calls = sweep_run["test_calls"]
    assert len(calls) == 1  # only the chosen checkpoint ever meets the test split
    best_trial = json.loads((sweep_run["out"] / "best" / "metrics.json").read_text())["sweep"]["best_trial"]
    assert best_trial in calls[0]


def test_selection_ignores_everything_but_validation() -> None:
    def row(tid: str, lr: float, acc: float, epoch: int = 2, path: str = "x") -> TrialRow:
        return TrialRow(tid, {"train.lr": lr}, epoch, acc, epoch, False, "OK", "", path, {"epoch": epoch}, [])

    assert select_best([row("a", 1e-3, 0.4), row("b", 1e-2, 0.6), row("c", 1.0, 0.1)]).trial_id == "b"
    # a loss is minimised: the same rows, the other way round
    assert select_best([row("a", 1e-3, 0.4), row("b", 1e-2, 0.6), row("c", 1.0, 0.1)], "min").trial_id == "c"
    # a tie goes to the earlier epoch; a trial without checkpoint is never chosen
    assert select_best([row("a", 1e-3, 0.5, 3), row("b", 1e-2, 0.5, 1)]).trial_id == "b"
    assert select_best([row("a", 1e-3, 0.9, path=""), row("b", 1e-2, 0.2)]).trial_id == "b"


def test_a_trial_s_equal_scores_pick_the_checkpoint_ray_train_keeps() -> None:
    """Ray Train's ``num_to_keep`` keeps the later of two equally scored checkpoints and deletes
    the other: the trial's row must name the kept one (a run resumed on a tiny model reported
    the same validation accuracy three epochs in a row)."""
    import pandas as pd
    from ray.tune import Result

    history = [
        {"epoch": e, "val_accuracy": 0.25, "checkpoint_path": f"ckpt_{e}", "trial_id": "t"} for e in (1, 2, 3)
    ]
    result = Result(
        metrics={**history[-1], "config": {"train.lr": 1e-3}},
        checkpoint=None,
        error=None,
        path="trials/t",
        metrics_dataframe=pd.DataFrame(history),
    )
    (row,) = sweep.trial_rows([result], load_config(None, ["train.epochs=3"]))
    assert (row.checkpoint_path, row.best_epoch) == ("ckpt_3", 3)


def _wandb_history(run_file: Path) -> list[dict[str, Any]]:
    """Read history records of an offline ``.wandb`` file (a LevelDB-style record log)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    pos, block, buf, history = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            break
        buf += data[pos : pos + length]
        pos += length
        if kind in (1, 4):
            rec = pb.Record()  # type: ignore[attr-defined]
            rec.ParseFromString(buf)
            buf = b""
            if rec.WhichOneof("record_type") == "history":
                history.append(
                    {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in rec.history.item}
                )
    return history


@pytest.mark.slow
def test_offline_wandb_run_per_trial_with_epoch_metrics(sweep_run: dict[str, Any]) -> None:
    out = sweep_run["out"]
    run_dirs = sorted((out / "wandb").glob("offline-run-*"))
    trial_ids = {r["trial_id"] for r in _rows(out / "sweep.csv")}
    by_trial: dict[str, list[dict[str, Any]]] = {}
    for d in run_dirs:
        tid = next(t for t in trial_ids if d.name.endswith(t))
        for f in d.glob("*.wandb"):
            by_trial.setdefault(tid, []).extend(_wandb_history(f))
    assert set(by_trial) == trial_ids  # one wandb run (id) per trial
    for tid, history in by_trial.items():
        epochs = [h for h in history if "epoch" in h]
        assert [h["epoch"] for h in epochs] == [1, 2], tid
        assert all("train_loss" in h for h in epochs)
        # the same figures the sweep table was built from: its best is wandb's best epoch
        best_row = next(r for r in _rows(out / "sweep.csv") if r["trial_id"] == tid)
        best_logged = max(h["val_accuracy"] for h in epochs)
        assert best_logged == pytest.approx(float(best_row["best_val_accuracy"]), abs=5e-5), tid
    # the chosen trial's run also got the final test metrics
    best = next(r["trial_id"] for r in _rows(out / "sweep.csv") if r["best"] == "True")
    assert any(k.startswith("confusion_matrix") for h in by_trial[best] for k in h)


@pytest.mark.slow
def test_rerun_resumes_and_skips_finished_trials(sweep_run: dict[str, Any]) -> None:
    import shutil

    out, cfg = sweep_run["out"], sweep_run["cfg"]
    checkpoints = sorted(p.relative_to(out) for p in (out / "trials").glob("*/checkpoint_2*"))
    assert len({p.parts[1] for p in checkpoints}) == 2
    shutil.rmtree(out / "best")  # as if the job died after the sweep, before the export
    summary = sweep.run_job(cfg)
    assert (Path(summary.best_dir) / "metrics.json").is_file()
    # no trial trained again: no checkpoint was added or replaced
    assert sorted(p.relative_to(out) for p in (out / "trials").glob("*/checkpoint_2*")) == checkpoints
    assert summary.metrics["learning_rate"] == 1e-3


@pytest.mark.slow
def test_every_trial_failing_is_one_clear_error(ray_cluster: None, tmp_path: Path) -> None:
    cfg = tiny_config(
        tmp_path,
        # Optuna's TPE through OptunaSearch: a real sweep of its proposals, at no extra cost
        "tune.search_alg=optuna",
        "tune.num_samples=2",
        "tune.search_space.train.lr.choice=[1e-3,2e-3]",
        "train.epochs=2",
        "train.inject_fault_epoch=1",
        "train.max_failures=0",
        "tune.grace_period=2",  # ASHA must not stop a trial before its fault in epoch 2
        "scaling.num_workers=1",
    )
    with pytest.raises(UserError, match=r"every trial failed: trial \S+ \(lr=0\.00[12]\)"):
        sweep.run_job(cfg)
    rows = _rows(Path(cfg.output_dir) / "sweep.csv")
    assert len(rows) == 2 and all(r["status"] == "ERROR" for r in rows)
    assert not (Path(cfg.output_dir) / "best").exists()


@pytest.mark.slow
def test_asha_stops_a_weak_trial_at_a_mid_epoch_validation(tmp_path: Path) -> None:
    """Through the CLI, on a cluster of its own: a stopped trial's resources are released by Ray
    Train's placement-group cleaner, which needs the dashboard the job's local cluster has. The
    sweep's output, the stopped trial's workers included, is the project's lines only."""
    require_data()
    out = tmp_path / "run"
    args = [
        *TINY,
        f"output_dir={out}",
        "tune.lrs=[1e-3,50.0]",
        "train.epochs=2",
        "train.evals_per_epoch=2",
        "tune.grace_period=0.5",
        "tune.max_concurrent_trials=1",  # trials in grid order: the absurd one meets a recorded rung
        "scaling.num_workers=1",
    ]
    run = run_train_cli(args, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    log = run.stdout + run.stderr
    assert_only_project_output(log)
    assert "epoch 0.5/2  train_loss" in log and "exported: " in log
    rows = {float(r["train.lr"]): r for r in _rows(out / "sweep.csv")}
    assert rows[50.0]["epochs_completed"] == "0.5" and rows[50.0]["stopped_early"] == "True"
    assert rows[1e-3]["epochs_completed"] == "2" and rows[1e-3]["best"] == "True"
    assert json.loads((out / "best" / "metrics.json").read_text())["learning_rate"] == 1e-3
    # checkpoints stay per epoch; the curves show whole epochs only
    epochs = {
        json.loads(f.read_text())["epoch"] for f in (out / "trials").glob("*/checkpoint_2*/metrics.json")
    }
    assert epochs and epochs <= {1, 2}
    curve = (out / "best" / "training_curve.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in curve[1:]] == ["1", "2"]


def test_sweep_trials_have_a_fixed_world_size_single_runs_stay_elastic(
    ray_cluster: None, tmp_path: Path
) -> None:
    """On an elastic range, a sweep's trial asks Ray Train for the range's upper end, fixed (every
    trial the same global batch), a single run for the range; both packed onto one node."""
    import ray.data

    from rayvit.cluster import Placement
    from rayvit.config import Config
    from rayvit.job import Job
    from rayvit.preprocess import Preprocessor
    from rayvit.storage import Storage

    ds = ray.data.range(4)
    placement = Placement((1, 4), False, {"CPU": 1.0})
    cfg = Config.model_validate({"train": {"batch_size": 16, "grad_accum_steps": 2}})
    job = Job(
        cfg,
        Storage.from_setting(str(tmp_path)),
        placement,
        Preprocessor(32),
        ("a",),
        ds,
        ds,
        False,
        "fp",
        4,
        1,
        "g",
    )
    single, trial = job.trainer({}, "one"), job.trainer({"train.lr": 1e-3}, "two", fixed_world=True)
    assert single.scaling_config.num_workers == (1, 4)  # type: ignore[comparison-overlap]  # V2 takes (min, max)
    assert trial.scaling_config.num_workers == 4
    assert single.scaling_config.placement_strategy == trial.scaling_config.placement_strategy == "PACK"
    assert sweep.global_batch(cfg, 4) == 16 * 2 * 4
