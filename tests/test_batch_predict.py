"""Offline batch prediction (``ray_jobs/predict.py``, ``rayvit.batch_predict``).

Unit tests (no Ray): error rows of bad files, the flat-folder reader, the rerun rules, the
written rows. End to end (slow): 1,000 CIFAR-10 test images and 5 bad files on the session's
local cluster, output in the local S3 server, checked against the offline ``Predictor`` and
the test evaluation's own code.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.dataset as pads
import pytest
from cluster_support import S3Server, s3_server  # noqa: F401  # a fixture
from serve_support import Models
from support import ROOT, bad_image_files, write_cifar_imagefolder

from rayvit.batch_predict import (
    JOB_FILE,
    PREDICTIONS,
    SUMMARY_FILE,
    PredictBatch,
    _claim_output,
    _write,
    actor_rows,
    load_batch_config,
)
from rayvit.config import DataConfig
from rayvit.errors import UserError
from rayvit.readers import decode_unit, open_source, units_for
from rayvit.storage import Storage

BAD_REASONS = {
    "corrupt.png": "not a decodable image",
    "truncated.png": "truncated",
    "not-an-image.jpg": "not a decodable image",
    "pixel-bomb.png": "over the limit of 25000000 pixels",
    "scan-bomb.jpg": "scans, over the limit of 64",
}


def _folder_with_bad_files(root: Path) -> Path:
    """An imagefolder of two good PNGs and one file of each bad kind, all in class ``b``."""
    from PIL import Image

    for i, cls in enumerate(("a", "b")):
        (root / "test" / cls).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 30), (60 * i, 90, 10)).save(root / "test" / cls / f"good{i}.png")
    for name, data in bad_image_files().items():
        (root / "test" / "b" / name).write_bytes(data)
    return root


def test_bad_files_become_error_rows_naming_their_reason(tmp_path: Path) -> None:
    source = open_source(DataConfig(path=str(_folder_with_bad_files(tmp_path / "in"))))
    (unit,) = units_for(source, "test", np.arange(source.split("test").num_rows))
    (block,) = decode_unit(unit, source, 16, 64, errors=True)
    reasons = dict(zip(block["source"].tolist(), block["error"].tolist(), strict=True))
    assert reasons.pop("test/a/good0.png") == "" and reasons.pop("test/b/good1.png") == ""
    assert {s.rsplit("/", 1)[-1] for s in reasons} == set(BAD_REASONS)
    for where, reason in reasons.items():
        assert BAD_REASONS[where.rsplit("/", 1)[-1]] in reason, (where, reason)
    assert block["image"].shape == (7, 16, 16, 3) and block["label"].tolist() == [0] + [1] * 6
    # Training's decode (no ``errors``) stops at the first bad file, naming it.
    with pytest.raises(UserError, match=r"image .*test/b/\S+ cannot be decoded"):
        list(decode_unit(unit, source, 16, 64))


def test_a_flat_folder_of_images_is_read_unlabelled(tmp_path: Path) -> None:
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / f"{i}.png")
    source = open_source(DataConfig(path=str(tmp_path)), unlabelled=True)
    assert source.kind == "images" and not source.labelled and source.split("images").num_rows == 3
    blocks = [
        b
        for u in units_for(source, "images", np.arange(3))
        for b in decode_unit(u, source, 8, 2, errors=True)
    ]
    assert [s for b in blocks for s in b["source"]] == ["0.png", "1.png", "2.png"]
    assert all((b["label"] == -1).all() for b in blocks)
    with pytest.raises(UserError, match="no <class>/<image> folders"):
        open_source(DataConfig(path=str(tmp_path)))  # training needs labels


def _job(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "model_dir": "m", "input": "in", "split": None, "limit": None, **extra}


def test_reruns_never_duplicate_and_another_model_is_refused(tmp_path: Path) -> None:
    cfg = load_batch_config(["model_dir=m", "input=in", f"output={tmp_path / 'out'}"])
    out = Storage.from_setting(cfg.output, key="--output")
    assert _claim_output(cfg, out, _job("aaa")) is None
    (tmp_path / "out" / PREDICTIONS / "part-1.parquet").write_bytes(b"rows")
    # Unfinished: the same job starts over, from an empty predictions folder.
    assert _claim_output(cfg, out, _job("aaa")) is None
    assert not list((tmp_path / "out" / PREDICTIONS).iterdir())
    (tmp_path / "out" / SUMMARY_FILE).write_text(json.dumps({"rows": 7}))
    assert _claim_output(cfg, out, _job("aaa")) == {"rows": 7}  # finished: nothing to do
    with pytest.raises(UserError) as err:
        _claim_output(cfg, out, _job("bbb"))
    assert str(err.value).count("\n") == 0
    assert "holds predictions of another job (model 'aaa')" in str(err.value) and "--overwrite" in str(
        err.value
    )
    forced = load_batch_config(["model_dir=m", "input=in", f"output={out.root}", "overwrite=true"])
    assert _claim_output(forced, out, _job("bbb")) is None
    assert json.loads((tmp_path / "out" / JOB_FILE).read_text())["model"] == "bbb"
    assert not (tmp_path / "out" / SUMMARY_FILE).exists()
    # A folder of something else is never written into (nor emptied) without --overwrite.
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    cfg2 = load_batch_config(["model_dir=m", "input=in", f"output={other}"])
    with pytest.raises(UserError, match="not empty and holds no batch predictions"):
        _claim_output(cfg2, Storage.from_setting(str(other)), _job("aaa"))
    with pytest.raises(UserError, match=r"unknown key 'batch_sise' \(did you mean 'batch_size'\?\)"):
        load_batch_config(["model_dir=m", "input=in", "output=o", "batch_sise=3"])


def test_written_rows_say_label_probabilities_truth_and_error(tmp_path: Path) -> None:
    out = Storage.from_setting(str(tmp_path))
    (tmp_path / PREDICTIONS).mkdir()
    job = {
        "labels": ["cat", "dog", "fox"],
        "num_labels": 3,
        "labelled": True,
        "source_names": ["dog", "cat"],  # the input's own class order
        "truth_map": [1, 0],
        "model": "f00d",
    }
    batch = {
        "source": np.asarray(["d/1.png", "c/2.png", "c/bad.png"], dtype=object),
        "split": np.asarray(["test"] * 3, dtype=object),
        "index": np.asarray([0, 1, 2]),
        "true": np.asarray([0, 1, 1]),
        "pred": np.asarray([1, 2, -1]),
        "top_i": np.asarray([[1, 0], [2, 0], [0, 0]]),
        "top_p": np.asarray([[0.7, 0.2], [0.5, 0.4], [0, 0]], dtype=np.float32),
        "error": np.asarray(["", "", "truncated"], dtype=object),
    }
    counts = _write(batch, out, job)
    assert counts["rows"].tolist() == [3] and counts["errors"].tolist() == [1]
    assert counts["cm"].reshape(3, 3)[1, 1] == 1 and counts["cm"].reshape(3, 3)[0, 2] == 1
    rows = pads.dataset(str(tmp_path / PREDICTIONS)).to_table().to_pylist()
    assert [r["label"] for r in rows] == ["dog", "fox", None]
    assert [r["true_label"] for r in rows] == ["dog", "cat", "cat"]
    assert [r["correct"] for r in rows] == [True, False, None]
    assert rows[0]["top_labels"] == ["dog", "cat"] and rows[0]["probability"] == pytest.approx(0.7)
    assert rows[2]["error"] == "truncated" and rows[2]["top_labels"] is None
    assert {r["model"] for r in rows} == {"f00d"}


@pytest.mark.slow
def test_cifar_subset_with_bad_files_matches_the_offline_predictor(
    s3_server: S3Server,  # noqa: F811
    tiny_models: Models,
    tmp_path: Path,
) -> None:
    """1,000 CIFAR-10 test images and 5 bad files, output in the bucket: every label is the
    offline ``Predictor``'s, every bad file an error row, the accuracy the test evaluation's."""
    from rayvit.imageio import decode_to_side
    from rayvit.predict import Predictor, evaluate, use_bf16

    files = write_cifar_imagefolder(tmp_path / "in", "test", 1000)
    for name, data in bad_image_files().items():
        (tmp_path / "in" / "test" / "cat" / name).write_bytes(data)
    output = f"s3://{s3_server.bucket}/batch/cifar"
    args = [
        f"--model-dir={tiny_models.a}",
        f"--input={tmp_path / 'in'}",
        f"--output={output}",
        f"endpoint_url={s3_server.endpoint}",
        "ray.num_cpus=2",
        "concurrency=[1,2]",
        "actor_cpus=0.5",
        "decode_cpus=0.5",
        "write_rows=512",
    ]
    proc = _predict_cli(args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "done: 1005 images" in proc.stdout and "5 errors" in proc.stdout, proc.stdout
    report = json.loads(s3_server.get("batch/cifar/summary.json"))
    assert report["rows"] == 1005 and report["errors"] == 5 and report["predicted"] == 1000
    assert 0 < report["first_results_s"] <= report["wall_s"], report

    fs = Storage.from_setting(output, s3_server.endpoint).filesystem()
    table = pads.dataset(
        f"{s3_server.bucket}/batch/cifar/{PREDICTIONS}", filesystem=fs, format="parquet"
    ).to_table()
    rows = {r["source"]: r for r in table.to_pylist()}
    assert len(rows) == table.num_rows == 1005
    for name, reason in BAD_REASONS.items():
        bad = rows[f"test/cat/{name}"]
        assert reason in bad["error"] and bad["label"] is None, bad

    predictor = Predictor(tiny_models.a)
    side = predictor.pre.image_size
    images = np.stack([decode_to_side(path.read_bytes(), side) for path, _ in files])
    labels = np.asarray([label for _, label in files])
    offline = [p.label for i in range(0, 1000, 250) for p in predictor.predict(list(images[i : i + 250]))]
    got = [rows[path.relative_to(tmp_path / "in").as_posix()]["label"] for path, _ in files]
    assert got == offline
    dev = predictor.device
    res = evaluate(predictor.model, predictor.pre, images, labels, 256, dev, use_bf16("auto", dev))
    assert report["accuracy"] == pytest.approx(res.accuracy, abs=1e-12)
    metrics = json.loads(s3_server.get("batch/cifar/metrics.json"))
    assert metrics["accuracy"] == report["accuracy"] and metrics["evaluated"] == 1000
    assert json.loads(s3_server.get("batch/cifar/confusion.json"))["labels"] == predictor.labels
    assert s3_server.get("batch/cifar/confusion.png")[:4] == b"\x89PNG"

    # The same command again adds nothing; another model into the same output is refused.
    keys = s3_server.keys("batch/cifar/")
    again = _predict_cli(args)
    assert again.returncode == 0 and again.stdout.startswith("already finished"), again.stdout + again.stderr
    assert s3_server.keys("batch/cifar/") == keys
    refused = _predict_cli([f"--model-dir={tiny_models.b}", *args[1:]])
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert refused.stderr.startswith(f"error: --output: {output} holds predictions of another job")


def _predict_cli(args: list[str]) -> subprocess.CompletedProcess[str]:
    """``ray_jobs/predict.py`` in a process (and local cluster) of its own."""
    cmd = [sys.executable, str(ROOT / "ray_jobs" / "predict.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_input_classes_the_model_lacks_mean_predictions_without_accuracy(tmp_path: Path) -> None:
    from rayvit.batch_predict import plan_input

    args = ["model_dir=m", f"input={_folder_with_bad_files(tmp_path / 'in')}", "output=o"]
    cfg = load_batch_config(args)
    plan = plan_input(cfg, ("b", "a", "c"))
    assert plan.truth_map == [1, 0] and plan.total == 7 and not plan.note  # the model's order
    other = plan_input(cfg, ("x", "y"))
    assert other.truth_map is None and "classes ['a', 'b'] are not the model's labels" in other.note
    with pytest.raises(UserError, match="no 'val' split"):
        plan_input(load_batch_config([*args, "split=val"]), ("a", "b"))


def test_a_model_actor_task_runs_in_model_batches_without_the_error_rows(tmp_path: Path) -> None:
    """A task holds several model batches (up to ``actor_rows`` images): each good row gets what
    the ``Predictor`` gives for its image alone; error rows stay out of every model batch."""
    import torch

    from rayvit.checkpoint import save_model_folder
    from rayvit.config import load_config
    from rayvit.model import build_model, build_preprocessor

    cfg = load_config(ROOT / "configs" / "quick.yaml", ["model.pretrained=null"])
    torch.manual_seed(0)
    save_model_folder(build_model(cfg.model, ["a", "b", "c"]), build_preprocessor(cfg.model), tmp_path / "m")
    actor = PredictBatch(str(tmp_path / "m"), str(tmp_path / "cache"), None, top_k=2, batch_size=3)
    side = actor.predictor.pre.image_size
    images = np.random.default_rng(0).integers(0, 256, (8, side, side, 3), dtype=np.uint8)
    error = np.array(["", "bad", "", "", "", "bad", "", ""], dtype=object)
    out = actor(
        {
            "image": images,
            "error": error,
            "index": np.arange(8),
            "source": np.array([f"f{i}" for i in range(8)], dtype=object),
            "split": np.full(8, "test", dtype=object),
            "label": np.full(8, -1),
        }
    )
    for i, img in enumerate(images):
        if error[i]:
            assert out["pred"][i] == -1 and not out["top_p"][i].any()
            continue
        alone = actor.predictor.probabilities([img])[0].topk(2)
        assert out["top_i"][i].tolist() == alone.indices.tolist() and out["pred"][i] == alone.indices[0]
        np.testing.assert_allclose(out["top_p"][i], alone.values.numpy(), rtol=1e-4, atol=1e-6)
    # Whole model batches, up to 1,024 images and 16 MiB; at least one model batch.
    assert actor_rows(64, 24 * 24 * 3 + 256) == 1024
    assert actor_rows(64, 224 * 224 * 3 + 256) == 64
    assert actor_rows(256, 224 * 224 * 3 + 256) == 256


def test_decoding_runs_in_the_model_actors_on_cpus_and_in_tasks_of_its_own_beside_gpus(
    ray_cluster: None, tiny_models: Models, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without GPUs the actors' cores decode and then run the model (Ray Data fuses the two
    steps, a unit a task); with GPUs decoding stays in CPU tasks, so the device never waits."""
    from rayvit.batch_predict import build_dataset, model_info, plan_input

    write_cifar_imagefolder(tmp_path / "in", "test", 20)
    folder = tmp_path / "in"
    plans = {}
    for gpus in ("0", "0.5"):
        cfg = load_batch_config(
            [
                f"model_dir={tiny_models.a}",
                f"input={folder}",
                f"output={tmp_path / 'out'}",
                f"num_gpus={gpus}",
            ]
        )
        model = model_info(cfg)
        ds = build_dataset(cfg, plan_input(cfg, model.labels), model, Storage.from_setting(cfg.output))
        capsys.readouterr()
        ds.explain()
        plans[gpus] = capsys.readouterr().out.split("Physical Plan (Optimized)")[1]
    assert "ActorPoolMapOperator[MapBatches(_decode)->MapBatches(PredictBatch)]" in plans["0"], plans["0"]
    assert "TaskPoolMapOperator[MapBatches(_decode)]" in plans["0.5"], plans["0.5"]
    assert "ActorPoolMapOperator[MapBatches(PredictBatch)]" in plans["0.5"], plans["0.5"]
