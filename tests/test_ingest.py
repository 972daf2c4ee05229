"""Ray Data ingestion: how the job's datasets reach the workers, and bounded memory."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import ROOT, TINY, tiny_config, train_cli_argv

from rayvit.data import plan_train_val
from rayvit.job import Ingest, open_storage, start_job
from rayvit.train_loop import TRAIN, VAL, train_batches, val_batches


def _imagefolder(root: Path, n: int, size: tuple[int, int] | None = None, classes: int = 3) -> Path:
    """``train/<class>/<i>.png`` (mixed sizes unless ``size``), plus a small ``test`` split."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("test", 6)):
        for i in range(count):
            d = root / split / f"c{i % classes}"
            d.mkdir(parents=True, exist_ok=True)
            w, h = size or (12 + i % 9, 10 + i % 7)
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / f"{i:04d}.png")
    return root


def _record_ids(loop_config: dict[str, Any]) -> None:
    """Two epochs of this rank's training shard and two validation passes, as the training
    loop reads them; every row's index written to a file per rank."""
    import ray.train
    import torch

    cfg, out = loop_config["cfg"], Path(loop_config["out"])
    rank = ray.train.get_context().get_world_rank()
    train, val = ray.train.get_dataset_shard(TRAIN), ray.train.get_dataset_shard(VAL)
    seen: dict[str, list[int] | list[list[int]]] = {}
    for epoch in (1, 2):
        batches = list(train_batches(train, cfg, epoch, rank, torch.device("cpu")))
        seen[f"train{epoch}"] = [int(i) for b in batches for i in b["index"]]
        seen[f"steps{epoch}"] = [len(batches)]
        seen[f"val{epoch}"] = [int(i) for b in val_batches(val, cfg, torch.device("cpu")) for i in b["index"]]
    (out / f"rank{rank}.json").write_text(json.dumps(seen))


@pytest.mark.slow  # the everyday tier's 2-worker training run reads the same shards
@pytest.mark.parametrize("streamed", [False, True], ids=["materialized", "streamed"])
def test_two_worker_shards_are_disjoint_and_validation_is_seen_once(
    ray_cluster: None, tmp_path: Path, streamed: bool
) -> None:
    import sys

    import ray.train
    from ray import cloudpickle
    from ray.train.torch import TorchTrainer

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    data = _imagefolder(tmp_path / "data", 101)
    cfg = tiny_config(
        tmp_path,
        f"data.path={data}",
        "data.train_limit=null",
        "data.val_limit=null",
        "data.val_fraction=0.2",
        "data.decode_batch_size=8",
        "data.shuffle_buffer=16",
        "train.batch_size=8",
        "train.eval_batch_size=8",
        f"data.max_in_memory_bytes={0 if streamed else 1 << 30}",
    )
    job = start_job(cfg, open_storage(cfg))
    assert job.streamed is streamed
    out = tmp_path / "ids"
    out.mkdir()
    TorchTrainer(
        _record_ids,
        train_loop_config={"cfg": cfg, "out": str(out)},
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        datasets={TRAIN: job.train_data, VAL: job.val_data},
        dataset_config=Ingest(streamed=job.streamed),
        run_config=ray.train.RunConfig(storage_path=str(tmp_path / "train")),
    ).fit()
    train, val, _ = plan_train_val(cfg.data, cfg.seed, cfg.model.image_size)
    assert (len(train), len(val)) == (81, 20) == (job.num_train, job.num_val)
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    for epoch in (1, 2):
        a, b = r0[f"train{epoch}"], r1[f"train{epoch}"]
        # Equal shards: 81 // 2 = 40 images each, the same number of steps; 81 % 2 = 1 left out.
        assert len(a) == len(b) == 40 and r0[f"steps{epoch}"] == r1[f"steps{epoch}"] == [5]
        assert len(set(a)) == 40 and not set(a) & set(b)
        assert set(a) | set(b) <= set(train.rows.tolist())
        assert len(set(train.rows.tolist()) - set(a) - set(b)) == 1
        # Validation: every image exactly once over both ranks, never a training image.
        both = r0[f"val{epoch}"] + r1[f"val{epoch}"]
        assert sorted(both) == sorted(val.rows.tolist())
    # The order is reshuffled every epoch.
    assert r0["train1"] + r1["train1"] != r0["train2"] + r1["train2"]


def _peak_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


@pytest.mark.slow
def test_streamed_epoch_on_data_far_larger_than_memory(tmp_path: Path) -> None:
    """162 JPEG photos of up to 2400x1800 px (1.9 GB decoded at full size, 20 times the object
    store) train for one epoch on a local cluster with a 96 MiB object store, then batch prediction labels them; neither
    driver ever holds more than a few hundred MB, whatever the data's size."""
    from PIL import Image

    rng = np.random.default_rng(0)
    data = tmp_path / "photos"
    full_size = 0
    for split, count in (("train", 150), ("test", 12)):
        for i in range(count):
            w, h = (2400, 1800) if i % 2 else (1800, 2000)
            full_size += w * h * 3
            d = data / split / f"c{i % 4}"
            d.mkdir(parents=True, exist_ok=True)
            small = rng.integers(0, 255, (h // 40, w // 40, 3), dtype=np.uint8)
            Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC).save(d / f"{i}.jpg", quality=90)
    assert full_size > 1.8e9
    args = [
        *TINY,
        f"data.path={data}",
        "data.train_limit=null",
        "data.val_limit=null",
        "data.test_limit=null",
        "data.max_in_memory_bytes=0",  # stream, however small
        "data.decode_batch_size=16",
        "model.image_size=64",
        "model.arch.patch_size=16",
        "scaling.num_workers=1",
        "scaling.cpus_per_worker=1",
        "ray.num_cpus=3",
        f"ray.object_store_memory={96 * 1024 * 1024}",
        f"output_dir={tmp_path / 'run'}",
    ]
    log, peak = _run_measuring_peak_rss(train_cli_argv(args))
    assert "streamed, decoded every epoch" in log
    metrics = json.loads((tmp_path / "run" / "best" / "metrics.json").read_text())
    assert metrics["data"]["num_train"] == 135 and metrics["data"]["num_test"] == 12
    # The driver's own imports (torch, Ray, transformers) take about 600 MB; nothing decoded adds to it.
    assert 0 < peak < 1000, f"driver peak RSS {peak:.0f} MB"

    # Batch prediction of the same 162 photos with the exported model, in the same bounds: the
    # driver plans from the listing and receives one row of counts per written Parquet file.
    predict = [
        sys.executable,
        str(ROOT / "ray_jobs" / "predict.py"),
        f"--model-dir={tmp_path / 'run' / 'best'}",
        f"--input={data}",
        f"--output={tmp_path / 'labels'}",
        "ray.num_cpus=3",
        f"ray.object_store_memory={96 * 1024 * 1024}",
        "decode_batch_size=16",
        "batch_size=16",
        "concurrency=[1,1]",
    ]
    log, peak = _run_measuring_peak_rss(predict)
    summary = json.loads((tmp_path / "labels" / "summary.json").read_text())
    assert summary["rows"] == 162 and summary["errors"] == 0, log[-3000:]
    assert 0 < peak < 1000 and summary["driver_peak_rss_mib"] < 1000, f"driver peak RSS {peak:.0f} MB"
    print(f"\nbatch prediction: driver peak RSS {peak:.0f} MB, {summary['images_per_s']} images/s")


def _run_measuring_peak_rss(argv: list[str]) -> tuple[str, float]:
    """Run a job's command line; its output and the driver's peak RSS (MB), sampled every 0.2 s."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, _peak_rss_mb(proc.pid))
        time.sleep(0.2)
    log = proc.stdout.read() if proc.stdout else ""
    assert proc.returncode == 0, log[-3000:]
    return log, peak


def test_ray_data_tasks_decode_the_pixels_the_server_decodes(ray_cluster: None, tmp_path: Path) -> None:
    """Awkward files (alpha, EXIF rotation, CMYK, 16-bit, palette with transparency, a JPEG large
    enough to be reduced while decoding) through the Ray Data decode tasks give exactly the
    pixels that the server computes for the same bytes (``decode_to_side``)."""
    from PIL import Image

    from rayvit.config import DataConfig
    from rayvit.data import open_source, read_dataset
    from rayvit.imageio import decode_to_side

    rng = np.random.default_rng(3)
    base = Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    files: dict[str, tuple[Image.Image, dict[str, Any]]] = {
        "a_rgba.png": (base.convert("RGBA"), {}),
        "b_rotated.jpg": (base, {"exif": exif.tobytes()}),
        "c_cmyk.jpg": (base.convert("CMYK"), {}),
        "d_gray16.png": (Image.fromarray(rng.integers(0, 65535, (30, 20), dtype=np.uint16)), {}),
        "e_palette.png": (base.convert("P"), {"transparency": 0}),
        "f_large.jpg": (base.resize((900, 700)), {"quality": 90}),
    }
    folder = tmp_path / "mixed" / "train" / "c"
    folder.mkdir(parents=True)
    for name, (image, kwargs) in files.items():
        image.save(folder / name, **kwargs)
    cfg = DataConfig(path=str(tmp_path / "mixed"), cache_dir=None)
    source = open_source(cfg)
    rows = read_dataset(source, "train", np.arange(len(files)), cfg, 32).take_all()
    decoded = {int(r["index"]): r["image"] for r in rows}
    for i, name in enumerate(sorted(files)):
        served = decode_to_side((folder / name).read_bytes(), 32)
        assert decoded[i].shape == served.shape == (32, 32, 3), name
        assert np.array_equal(decoded[i], served), name
