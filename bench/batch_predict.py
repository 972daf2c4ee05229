"""Benchmark: the batch prediction job's images/s next to the in-process ceiling, side by side.

For each model, the same CIFAR-10 training images (an imagefolder of their PNG files) and the
same batch size:

- job: ``rayvit.batch_predict.run_batch`` on a local Ray cluster: the model actor pool (one
  actor holding every core; with no GPU it decodes its own units, Ray Data fusing the decode step
  into its tasks), Parquet written into a temporary folder by write tasks. Figures: the whole
  job (from the first block asked for to the last file written, so with the actors' start and model
  loading), its steady state (after the first results came back, files of the job's default 4096
  rows), and the seconds until those first results: the model actor's start, a fixed cost.
- ceiling: one process, every core: the same units read and decoded by the same function
  (``decode_unit``), then ``Predictor.probabilities`` and top-k in batches; nothing written.
  The model is loaded before the clock starts.

The job and the ceiling run back to back ``--rounds`` times (``--heavy-rounds`` for the heavy
model), their order alternating; each pair gives a ratio, and the figure is the median of those
ratios (odd counts by default, so the median is one pair's): a shared machine's speed drifts by
more than the margins asked for within minutes, and a pair run back to back sees the same drift.
Those jobs run on a cluster where Ray Data has run before, as a job submitted to a long-lived
cluster does. The quick model's job also runs once first, as the first job on a new cluster,
which also starts Ray Data's own helper actors (its stats actor, autoscaling coordinator and
actor location tracker, which outlive the job): that figure is printed beside the others,
against the median ceiling.

Models: the quick recipe's (``configs/quick.yaml``, 24 px, untrained) on each of ``--quick-images``
(50,000 images, a job of 26-33 s on 2 cores, and 200,000, 90-125 s: the fixed start is a smaller
share of the longer job, which is about as long as the heavy model's) and a compute-heavy one,
ViT-B/16 at 224 px untrained (``configs/train.yaml`` from scratch), on ``--heavy-images``. Goal:
job >= 0.8x the ceiling (quick) and >= 0.9x (heavy).

Run: ``python bench/batch_predict.py [--data DIR] [--quick-images N [N ...]] [--heavy-images N]
[--rounds N] [--heavy-rounds N] [--skip-quick] [--skip-heavy]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from rayvit.batch_predict import load_batch_config, run_batch
from rayvit.checkpoint import save_model_folder
from rayvit.cluster import init_ray
from rayvit.config import DataConfig, RayConfig, load_config
from rayvit.logs import quiet_libraries
from rayvit.model import build_model, build_preprocessor
from rayvit.predict import Predictor
from rayvit.readers import decode_unit, open_source, units_for

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def export(config: str, dest: Path) -> Path:
    cfg = load_config(ROOT / "configs" / config, ["model.pretrained=null"])
    torch.manual_seed(0)
    save_model_folder(build_model(cfg.model, CLASSES), build_preprocessor(cfg.model), dest)
    return dest


def imagefolder(data: str, dest: Path, images: int) -> str:
    """The first ``images`` CIFAR-10 training images as PNG files, ``train/<class>/<i>.png``: the
    usual input of batch prediction, ``FILES_PER_UNIT`` files a decode task. Training images: the
    test split is kept for final evaluation, and a throughput figure needs no held-out data. Past
    the 50,000 training images, they repeat under new names: a larger job, for the start's share."""
    import pyarrow.parquet as pq

    table = pq.read_table(Path(data) / "train-00000-of-00001.parquet").slice(0, images)
    pngs, labels = table.column("img").to_pylist(), table.column("label").to_pylist()
    for i in range(images):
        path = dest / "train" / CLASSES[labels[i % len(labels)]] / f"{i:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pngs[i % len(pngs)]["bytes"])
    return str(dest)


def ceiling(model_dir: Path, data: str, images: int, batch_size: int, top_k: int) -> float:
    """Decode + ``Predictor`` in this process: images/s."""
    predictor = Predictor(model_dir)
    side = predictor.pre.image_size
    source = open_source(DataConfig(path=data, cache_dir=None))
    units = units_for(source, "train", np.arange(images))
    t0, seen = time.perf_counter(), 0
    pending: list[np.ndarray] = []
    for unit in units:
        for block in decode_unit(unit, source, side, 256, errors=True):
            pending.extend(block["image"])
            while len(pending) >= batch_size:
                batch, pending = pending[:batch_size], pending[batch_size:]
                predictor.probabilities(batch).topk(top_k, dim=-1)
                seen += len(batch)
    if pending:
        predictor.probabilities(pending).topk(top_k, dim=-1)
        seen += len(pending)
    assert seen == images, seen
    return seen / (time.perf_counter() - t0)


def job(
    model_dir: Path, data: str, images: int, args: argparse.Namespace, out: Path, actor_cpus: float
) -> tuple[float, float, float]:
    """One batch prediction job: images/s of the whole job and of its steady state (0: not
    measured), and the seconds until its first results."""
    cfg = load_batch_config(
        [
            f"model_dir={model_dir}",
            f"input={data}",
            f"output={out}",
            "overwrite=true",
            "split=train",
            f"limit={images}",
            f"batch_size={args.batch_size}",
            "concurrency=[1,1]",
            f"actor_cpus={actor_cpus}",
            f"decode_cpus={args.decode_cpus}",
            "progress_s=1000",
        ]
    )
    report = run_batch(cfg, say=lambda line: None)
    return report["rows"] / report["wall_s"], report["steady_images_per_s"], report["first_results_s"]


def measure(
    model: Path, data: str, n: int, args: argparse.Namespace, out: Path, actor_cpus: float, rounds: int
) -> dict[str, Any]:
    """``rounds`` job/ceiling pairs, their order alternating: each pair's figures and ratios."""
    pairs = []
    for rnd in range(rounds):
        figures: dict[str, float] = {}
        for what in ("job", "ceiling")[:: 1 if rnd % 2 == 0 else -1]:
            if what == "job":
                figures["whole"], figures["steady"], figures["first_s"] = job(
                    model, data, n, args, out.with_name(f"{out.name}-{rnd}"), actor_cpus
                )
            else:
                figures["ceiling"] = ceiling(model, data, n, args.batch_size, 5)
        pairs.append(figures)
        print(
            json.dumps({"round": rnd, "images": n, **{k: round(v, 2) for k, v in figures.items()}}),
            flush=True,
        )
    return {
        "whole": statistics.median(p["whole"] for p in pairs),
        "steady": statistics.median(p["steady"] for p in pairs),
        "ceiling": statistics.median(p["ceiling"] for p in pairs),
        "first_s": statistics.median(p["first_s"] for p in pairs),
        "ratios": [p["whole"] / p["ceiling"] for p in pairs],
        "steady_ratios": [p["steady"] / p["ceiling"] for p in pairs],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10" / "plain_text"))
    ap.add_argument("--quick-images", type=int, nargs="+", default=[50_000, 200_000])
    ap.add_argument("--heavy-images", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--decode-cpus", type=float, default=1.0, help="a decode task's CPUs (GPU actors only)")
    ap.add_argument("--rounds", type=int, default=3, help="job/ceiling pairs of the quick model, each size")
    ap.add_argument("--heavy-rounds", type=int, default=3, help="job/ceiling pairs of the heavy model")
    ap.add_argument("--skip-quick", action="store_true")
    ap.add_argument("--skip-heavy", action="store_true")
    args = ap.parse_args()
    quiet_libraries()
    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    # One logical CPU more than the cores: write tasks run beside a model actor that holds every
    # core (and decodes: on CPUs Ray Data fuses decoding into the actor's tasks).
    init_ray(RayConfig(num_cpus=cores + 1))
    from rayvit.data import quiet_ray_data

    quiet_ray_data()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # The model actor's CPUs (its torch threads, and its decoding): every core, as the
        # in-process loop has them.
        cases = []
        if not args.skip_quick:
            cases += [("quick model, 24 px", "quick.yaml", n, cores, args.rounds) for n in args.quick_images]
        if not args.skip_heavy:
            cases.append(("ViT-B/16, 224 px", "train.yaml", args.heavy_images, cores, args.heavy_rounds))
        # One model and one image folder a config, of its largest job: smaller jobs take the
        # folder's first images (``limit``).
        most: dict[str, int] = {}
        for _, config, n, _, _ in cases:
            most[config] = max(n, most.get(config, 0))
        inputs = {
            c: (export(c, Path(tmp) / c), imagefolder(args.data, Path(tmp) / f"images-{c}", k))
            for c, k in most.items()
        }
        for i, (name, config, n, actor_cpus, rounds) in enumerate(cases):
            model, data = inputs[config]
            out = Path(tmp) / f"out-{config}-{n}"
            first = None
            if i == 0 and config == "quick.yaml":  # the first Ray Data job of this cluster
                first, _, _ = job(model, data, n, args, out.with_name(f"{out.name}-new"), actor_cpus)
            m = measure(model, data, n, args, out, actor_cpus, rounds)
            rows.append(
                {
                    "model": name,
                    "images": n,
                    "batch_size": args.batch_size,
                    "actor_cpus": actor_cpus,
                    "rounds": rounds,
                    "job_images_per_s": round(m["whole"], 2),
                    "job_images_per_s_new_cluster": round(first, 2) if first else "-",
                    # 0: too few written files to tell a rate after the first ones (and then
                    # the first results are all of them: no start to tell apart either)
                    "job_steady_images_per_s": round(m["steady"], 2) or "-",
                    "first_results_s": round(m["first_s"], 2) if m["steady"] else "-",
                    "ceiling_images_per_s": round(m["ceiling"], 2),
                    "ratio_whole": round(statistics.median(m["ratios"]), 3),
                    "ratio_whole_pairs": [round(r, 3) for r in m["ratios"]],
                    "ratio_whole_new_cluster": round(first / m["ceiling"], 3) if first else "-",
                    "ratio_steady": round(statistics.median(m["steady_ratios"]), 3) or "-",
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    print(
        "\n| model | images | job img/s: whole (new cluster) / steady | first results after s | "
        "in-process ceiling img/s | ratio whole: median of the pairs (pairs; new cluster) / steady |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        pairs = ", ".join(f"{x:.3f}" for x in r["ratio_whole_pairs"])
        print(
            f"| {r['model']} | {r['images']} | {r['job_images_per_s']} ({r['job_images_per_s_new_cluster']}) / "
            f"{r['job_steady_images_per_s']} | {r['first_results_s']} | {r['ceiling_images_per_s']} | "
            f"{r['ratio_whole']} ({pairs}; {r['ratio_whole_new_cluster']}) / {r['ratio_steady']} |"
        )
    print(
        "(img/s, first results and the ceiling: medians over the pairs; new cluster: one job, "
        "against the median ceiling)"
    )


if __name__ == "__main__":
    main()
