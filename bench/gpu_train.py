"""The training job's own step on GPUs: throughput, MFU and the share of time spent waiting for data.

    python bench/gpu_train.py                       # the full recipe: ViT-B/16 at 224 px, one worker per GPU
    python bench/gpu_train.py --workers 8 --steps 100
    python bench/gpu_train.py --recipe configs/quick.yaml --images 256 --steps 4 --warmup 1   # CPU smoke run

What runs is the job's step, not a model in isolation: a Ray Train run of ``--workers`` DDP
workers (``prepare``: bucket views, static graph, compile as the recipe says), fed by Ray Data
shards of the CIFAR-10 copy decoded as the job decodes them (``start_job``'s ``datasets``:
32 px in the full recipe, materialized) through ``train_batches`` (prefetch, device shuffle,
pinned copies), in batches of the recipe's ``train.batch_size``, through ``Stepper`` (the
``Preprocessor`` on the device, ``train_step``, the scheduler, checks every
``train.log_every_steps``). The model is initialised at random (no download).

Reported over the timed steps: images/s over all workers, MFU (model FLOPs, ``rayvit.perf``,
over the devices' dense bf16 peak; n/a on CPUs) and the share of the time the host waited for
the next batch (the slowest worker's). The first ``--warmup`` steps (compilation) are not timed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rayvit.config import Config, RayConfig, load_config  # noqa: E402
from rayvit.data import plan_train_val, quiet_ray_data, stored_side  # noqa: E402
from rayvit.throughput import step_throughput_loop  # noqa: E402
from rayvit.train_loop import TRAIN  # noqa: E402


def measure(cfg: Config, workers: int, use_gpu: bool, steps: int, warmup: int) -> dict[str, Any]:
    """A Ray Train run of ``workers`` on the job's training data; the figures of ``bench_loop``."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from rayvit.job import Ingest, datasets

    quiet_ray_data()
    side = stored_side(cfg.data, cfg.model.image_size)
    train, val, _ = plan_train_val(cfg.data, cfg.seed, side)
    train_data, _, streamed = datasets(cfg, train, val)
    out = Path(tempfile.mkdtemp(prefix="rayvit-gpu-bench-"))
    resources = {"CPU": cfg.scaling.cpus_per_worker, **({"GPU": 1.0} if use_gpu else {})}
    TorchTrainer(
        step_throughput_loop,
        train_loop_config={"cfg": cfg, "steps": steps, "warmup": warmup, "out": str(out / "figures.json")},
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        datasets={TRAIN: train_data},
        dataset_config=Ingest(streamed=streamed),
        run_config=ray.train.RunConfig(storage_path=str(out / "run")),
    ).fit()
    found: dict[str, Any] = json.loads((out / "figures.json").read_text())
    found.update(
        workers=workers, batch=cfg.train.batch_size, side=cfg.model.image_size, compiled=cfg.train.compile
    )
    return found


def model_overrides(model: str | None) -> list[str]:
    """The recipe's architecture built untrained, or ``--model``: a hub id or folder
    (``AutoModelForImageClassification``, weights loaded) or a ``model_type`` built untrained."""
    if model is None:
        return ["model.pretrained=null"]
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    if model in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES:
        return ["model.pretrained=null", f"model.model_type={model}", "model.attn_implementation=auto"]
    return [f"model.pretrained={model}", "model.attn_implementation=auto"]


def describe(f: dict[str, Any]) -> str:
    util = f"MFU {100 * f['mfu']:.1f}%" if f.get("mfu") is not None else "MFU n/a"
    return (
        f"{f['workers']} x {f['device']}, batch {f['batch']} per worker at {f['side']} px"
        f"{', compiled' if f['compiled'] else ''}: {f['images_per_s']:.1f} img/s, {util}, "
        f"waiting for data {100 * f['data_wait_share']:.1f}% of the time"
    )


def main() -> None:
    from rayvit.cluster import init_ray

    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument(
        "--recipe", default=str(ROOT / "configs" / "train.yaml"), help="the config whose step is timed"
    )
    ap.add_argument(
        "--data", default=str(ROOT.parent / "shared" / "data" / "cifar10"), help="the CIFAR-10 copy"
    )
    ap.add_argument(
        "--workers", type=int, default=0, help="DDP workers; 0 = one per GPU (one CPU worker without)"
    )
    ap.add_argument("--images", type=int, default=20_000, help="training images decoded for the run")
    ap.add_argument("--steps", type=int, default=50, help="timed steps per worker")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation happens here)")
    ap.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of the local Ray cluster")
    ap.add_argument(
        "--model",
        default=None,
        help="hub id, folder or model_type to time (default: the recipe's, untrained)",
    )
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. train.batch_size=128")
    args = ap.parse_args()
    gpus = torch.cuda.device_count()
    workers = args.workers or max(1, gpus)
    cfg = load_config(
        args.recipe,
        [
            f"data.path={args.data}",
            *model_overrides(args.model),
            f"data.train_limit={args.images}",
            "data.val_limit=1",
            "wandb.mode=disabled",
            *args.overrides,
        ],
    )
    init_ray(RayConfig(num_cpus=args.num_cpus))
    print(describe(measure(cfg, workers, gpus > 0, args.steps, args.warmup)))


if __name__ == "__main__":
    main()
