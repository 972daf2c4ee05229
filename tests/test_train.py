"""End-to-end training against a real local Ray cluster and the real CIFAR-10 copy."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from cluster_support import S3Server, s3_server  # noqa: F401  # a fixture
from conftest import DATA_DIR, ROOT, TINY, require_data, run_train_cli, tiny_config, train_cli_argv
from support import TEARDOWN, in_session, kill_processes

from rayvit.checkpoint import check_model_folder
from rayvit.config import DataConfig, load_config
from rayvit.data import load_test, load_train_val
from rayvit.job import TRIALS_DIR
from rayvit.predict import Predictor
from tuning import run_job


def _trial_dir(run_dir: Path) -> Path:
    """The Ray Train run of a single-learning-rate job (its one Tune trial)."""
    trials = sorted((run_dir / TRIALS_DIR).iterdir()) if (run_dir / TRIALS_DIR).is_dir() else []
    return trials[0] if trials else run_dir / TRIALS_DIR / "none-yet"


def _registered_epoch(run_dir: Path) -> int:
    """Epoch of the latest checkpoint Ray Train has registered (what a restart resumes from)."""
    snap = _trial_dir(run_dir) / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snap.read_text()).get("latest_checkpoint_result")
    except (OSError, ValueError):
        return 0
    return int(latest["metrics"]["epoch"]) if latest else 0


def _kill_session(sid: int) -> None:
    """SIGKILL every process of the session: the driver and the Ray processes it started.

    Ray workers and actors sit in process groups of their own, so killing the driver's group
    alone leaves them training (and checkpointing) for a while after the "crash".
    """
    kill_processes(in_session(sid), pause_s=0.2)


def test_two_worker_run_writes_checkpoint_and_export(trained_run: Path) -> None:
    best = trained_run / "best"
    check_model_folder(best)
    metrics = json.loads((best / "metrics.json").read_text())
    for key in (
        "val_accuracy",
        "test_accuracy",
        "learning_rate",
        "epochs",
        "data",
        "git_commit",
        "created_at",
    ):
        assert key in metrics, key
    assert metrics["searched"] == {}  # a single run searches nothing
    assert 0.0 <= metrics["val_macro_f1"] <= 1.0 and 0.0 <= metrics["test_macro_f1"] <= 1.0
    per_class = metrics["test_per_class_accuracy"]
    assert list(per_class) == metrics["data"]["class_names"] and all(
        0.0 <= v <= 1.0 for v in per_class.values()
    )
    assert metrics["data"]["source"] == str(DATA_DIR)
    assert len(metrics["data"]["fingerprint"]) > 16
    assert metrics["data"]["num_train"] == 320 and metrics["data"]["num_test"] == 200
    # the recorded test accuracy is the exported model's, on the same 200 test images
    cfg_used = tiny_config(trained_run.parent)
    test = load_test(cfg_used.data, cfg_used.model.image_size)
    pred = Predictor(best).probabilities(list(test.images)).argmax(-1).numpy()
    assert metrics["test_accuracy"] == pytest.approx(float((pred == test.labels).mean()), abs=1 / 200)
    cfg = json.loads((best / "config.json").read_text())
    assert cfg["id2label"]["0"] == "airplane" and cfg["label2id"]["truck"] == 9
    proc = json.loads((best / "preprocessor_config.json").read_text())
    side = tiny_config(trained_run).model.image_size  # the preprocessing the model was trained with
    assert proc["size"] == {"height": side, "width": side}
    assert proc["image_mean"] == pytest.approx([0.4914, 0.4822, 0.4465])
    assert (best / "model.safetensors").stat().st_size > 10_000
    assert load_config(best / "config.yaml") == cfg_used  # the exact config, loadable again
    # every kept checkpoint holds model, optimizer/scheduler state and the config
    ckpts = list(_trial_dir(trained_run).glob("checkpoint_2*"))
    assert ckpts
    for c in ckpts:
        assert (c / "training_state.pt").is_file() and (c / "config.yaml").is_file()
        assert (c / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize("model", ["ray_export", "trained_tiny"])
def test_pipeline_agrees_with_predictor(model: str, request: pytest.FixtureRequest) -> None:
    """transformers' own pipeline reads an export as we do: same classes, same probabilities.

    Also on a model trained enough to tell images apart (the tiny run may predict one class,
    where agreeing labels prove little).
    """
    from PIL import Image
    from transformers import pipeline

    if model == "ray_export":
        best = request.getfixturevalue("trained_run") / "best"
    else:
        best = request.getfixturevalue("tiny_models").a
    test = load_test(DataConfig(path=str(require_data()), test_limit=40, cache_dir=None), 32)
    images = [Image.fromarray(a) for a in test.images]
    pipe = pipeline("image-classification", model=str(best), device="cpu")
    theirs = pipe(images, top_k=3)
    ours = Predictor(best).predict([np.asarray(im) for im in images], top_k=3)
    assert [[o["label"] for o in t] for t in theirs] == [[lbl for lbl, _ in p.top_k] for p in ours]
    for t, p in zip(theirs, ours, strict=True):
        assert [o["score"] for o in t] == pytest.approx([v for _, v in p.top_k], abs=1e-4)
    if model == "trained_tiny":
        assert len({p.label for p in ours}) >= 3, "the model predicts (almost) one class"


def test_rerun_of_finished_run_does_not_train_again(trained_run: Path) -> None:
    before = (trained_run / "best" / "metrics.json").read_text()
    summary = run_job(tiny_config(trained_run.parent))
    assert summary.resumed_finished
    assert (trained_run / "best" / "metrics.json").read_text() == before


def test_rerun_with_other_settings_names_what_changed(trained_run: Path) -> None:
    """A finished run is not answered with its old result when the command asks for another."""
    before = (trained_run / "best" / "metrics.json").read_text()
    out = run_train_cli([*TINY, f"output_dir={trained_run}", "train.lr=5e-4", "train.epochs=2"])
    assert out.returncode == 2, out.stdout[-2000:]
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"error: output_dir {trained_run} holds a run with other settings (")
    assert "train.epochs: 1 -> 2" in lines[0] and "train.lr: 0.001 -> 0.0005" in lines[0]
    assert "restart=true" in lines[0]
    assert "already finished" not in out.stdout
    assert (trained_run / "best" / "metrics.json").read_text() == before


@pytest.mark.slow
def test_a_diverging_run_stops_at_once_with_one_line(tmp_path: Path) -> None:
    out = run_train_cli([*TINY, f"output_dir={tmp_path / 'run'}", "train.lr=1e30", "train.grad_clip=null"])
    assert out.returncode == 2, out.stderr[-2000:]
    # (Ray's own C++ notice about Train's preemption watcher may precede it on stderr)
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, out.stderr
    # nothing of a Ray process killed during its own exit (the shutdown race of issue 19)
    assert not re.search(r"Traceback|Exception ignored|SystemExit", out.stdout + out.stderr), out.stderr
    assert lines[0] == out.stderr.strip().splitlines()[-1]  # the error is the job's last line
    assert re.fullmatch(
        r"error: training diverged: non-finite loss at step \d+ of epoch 1 \(learning rate [\d.e+-]+\)",
        lines[0],
    ), lines[0]
    assert "epoch 1/1  train_loss" not in out.stdout  # stopped inside the first epoch
    assert not (tmp_path / "run" / "best").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train.lrr=1"], "unknown config key 'train.lrr' (did you mean 'train.lr'?)"),
        (
            ["tune.search_space.train.batch_size.uniform=[16,64]"],
            "tune.search_space['train.batch_size']: uniform gives 16.0: Input should be a valid integer",
        ),
        # these start Ray first (30-60 s each on a busy machine): the full suite checks them
        pytest.param(
            ["data.path=/nonexistent/cifar"],
            "data.path: no such folder: /nonexistent/cifar",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            ["scaling.use_gpu=true", "scaling.num_workers=1", "ray.num_cpus=1"],
            "the Ray cluster has no GPUs",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            ["scaling.num_workers=8", "ray.num_cpus=1"],
            "needs 7.92 CPUs but the Ray cluster has 1",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_cli_errors_are_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    out = run_train_cli([f"output_dir={tmp_path / 'run'}", f"data.path={DATA_DIR}", *args])
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    assert not (tmp_path / "run" / "best").exists()


@pytest.mark.slow
def test_interrupted_run_resumes_on_rerun(tmp_path: Path) -> None:
    """A run stopped after a checkpoint resumes from it when the command is run again: after a
    crash of the whole machine (every process SIGKILLed, nothing gets to clean up), the rerun
    resumes and trains no finished epoch again; Ctrl-C (SIGINT to the job's process group) then
    ends that rerun at once, with exit code 130 and one line saying how to go on, its last
    checkpoint registered for the next rerun (``ray job stop`` and its rerun: test_job_submit)."""
    require_data()
    run_dir = tmp_path / "run"
    # A warm epoch takes about a second here, so an epoch may finish between a checkpoint and the
    # signal's effect: enough epochs that both interruptions land before the last one.
    epochs = 5
    args = [
        *TINY,
        f"output_dir={run_dir}",
        f"train.epochs={epochs}",
        "data.train_limit=640",
        "scaling.num_workers=1",
        "scaling.cpus_per_worker=1",
    ]

    def start_and_wait_for_epoch_past(done: int) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            train_cli_argv(args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},  # what a crash cuts off was printed already
        )
        deadline = time.time() + 420  # a busy machine takes minutes to start Ray and decode
        while time.time() < deadline and _registered_epoch(run_dir) <= done:
            time.sleep(0.2)
        assert _registered_epoch(run_dir) > done, "no new checkpoint before the deadline"
        return proc

    # The machine crashes after the first checkpoint.
    proc = start_and_wait_for_epoch_past(0)
    _kill_session(proc.pid)
    proc.communicate(timeout=60)
    assert not (run_dir / "best").exists()
    after_crash = _registered_epoch(run_dir)
    assert after_crash < epochs - 1

    # The rerun resumes there; Ctrl-C after its next checkpoint.
    proc = start_and_wait_for_epoch_past(after_crash)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends
    stdout, stderr = proc.communicate(timeout=180)
    log = stdout + stderr
    assert proc.returncode == 130, log[-3000:]
    assert f"resuming from checkpoint after epoch {after_crash}" in log, log[-3000:]
    assert f"epoch {after_crash}/{epochs}" not in log  # finished epochs are not trained again
    assert stderr.strip().splitlines()[-1] == (
        "interrupted (SIGINT): rerun the same command to resume from the last checkpoint"
    ), stderr[-3000:]
    noise = [
        ln
        for ln in log.splitlines()
        if TEARDOWN.search(ln) or re.search(r"interrupted \(|been interrupted|Stop signal", ln)
    ]
    assert len(noise) == 1, "\n".join(noise)
    assert not (run_dir / "best").exists()
    assert after_crash < _registered_epoch(run_dir) < epochs


@pytest.mark.slow
def test_a_tiny_run_learns_and_a_lost_worker_resumes_from_its_checkpoint(
    ray_cluster: None, tmp_path: Path
) -> None:
    """The quick recipe's model on 4000 real images for 3 epochs, with a training worker killed
    during epoch 2: Ray Train restarts the workers from epoch 1's checkpoint, not from scratch,
    and the run learns: validation accuracy far above what the data gives for free (always
    answering its most common class)."""
    cfg = tiny_config(
        tmp_path,
        "data.train_limit=4000",
        "data.val_limit=500",
        "data.test_limit=1000",
        "model.arch.hidden_size=96",
        "model.arch.num_hidden_layers=4",
        "model.arch.num_attention_heads=3",
        "model.arch.intermediate_size=192",
        "train.epochs=3",
        "train.batch_size=64",
        "train.lr=2e-3",
        "train.inject_fault_epoch=1",
    )
    summary = run_job(cfg)
    trial = _trial_dir(Path(cfg.output_dir))
    assert (trial / ".fault_injected").is_file()  # the worker really died, during epoch 2
    # The optimizer went on from its saved state: a restart from scratch would count only the
    # steps since the fault. (Each of the 2 workers takes whole batches of 64 from its 2000 images.)
    last = sorted(trial.glob("checkpoint_2*"))[-1]
    steps = json.loads((last / "metrics.json").read_text())["optimizer_steps"]
    assert steps == 3 * ((4000 // 2) // 64)
    assert torch.load(last / "training_state.pt", weights_only=True)["epoch"] == 3
    assert summary.metrics["epochs"] == 3

    val = load_train_val(cfg.data, cfg.seed, cfg.model.image_size).val
    test = load_test(cfg.data, cfg.model.image_size)
    val_baseline = np.bincount(val.labels).max() / len(val)
    test_baseline = np.bincount(test.labels).max() / len(test)
    assert val_baseline < 0.15 and test_baseline < 0.15  # ten classes, roughly balanced
    # measured: val 0.282 and test 0.282 against baselines of 0.116 and 0.109
    assert summary.metrics["val_accuracy"] >= max(0.22, 2 * val_baseline), summary.metrics
    assert summary.metrics["test_accuracy"] >= max(0.2, 2 * test_baseline), summary.metrics


@pytest.mark.slow
def test_a_slow_bucket_does_not_hold_training_up(s3_server: S3Server, tmp_path: Path) -> None:  # noqa: F811
    """Each epoch's checkpoint goes to the bucket through a 1 MB/s link, where one upload takes
    longer than an epoch: with the asynchronous upload, epoch 2 (and its mid-epoch report, which
    Ray keeps behind epoch 1's upload) runs while epoch 1's checkpoint is still on its way, and
    both checkpoints land whole."""
    from bench.checkpoint_upload import SlowProxy

    rate = 1e6
    proxy = SlowProxy(int(s3_server.endpoint.rsplit(":", 1)[1]), rate)
    prefix = "slow-link"
    out = run_train_cli(
        [
            *TINY,
            f"output_dir=s3://{s3_server.bucket}/{prefix}",
            f"storage.endpoint_url=http://127.0.0.1:{proxy.port}",
            "model.arch.hidden_size=128",  # ~0.6 M parameters: a 7 MB checkpoint with AdamW's state
            "model.arch.num_hidden_layers=4",
            "model.arch.num_attention_heads=4",
            "model.arch.intermediate_size=256",
            "train.epochs=2",
            "train.evals_per_epoch=2",
            "train.keep_checkpoints=2",
            "scaling.num_workers=1",
            "scaling.cpus_per_worker=1",
            "wandb.mode=disabled",
        ]
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    sizes = s3_server.sizes(prefix)
    checkpoints: dict[int, tuple[float, int]] = {}  # epoch: (elapsed_s, bytes)
    for key in sizes:
        if re.search(r"/checkpoint_[^/]+/metrics\.json$", key):
            folder = key.rsplit("/", 1)[0] + "/"
            metrics = json.loads(s3_server.get(key))
            names = {k.rsplit("/", 1)[1]: n for k, n in sizes.items() if k.startswith(folder)}
            assert names["model.safetensors"] > 1e6 and names["training_state.pt"] > 2e6, names
            checkpoints[int(metrics["epoch"])] = (float(metrics["elapsed_s"]), sum(names.values()))
    assert sorted(checkpoints) == [1, 2], sorted(sizes)
    upload_s = checkpoints[1][1] / rate
    epoch_2_s = checkpoints[2][0] - checkpoints[1][0]
    print(f"epoch 2: {epoch_2_s:.1f} s; epoch 1's upload at {rate / 1e6:g} MB/s: {upload_s:.1f} s")
    assert upload_s > 5, checkpoints  # the link really is slower than an epoch
    # A report that waited for epoch 1's upload would make epoch 2 last at least the upload.
    assert epoch_2_s < upload_s / 2, (epoch_2_s, upload_s)
