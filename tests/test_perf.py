"""Model FLOPs and MFU (rayvit.perf): the formula against torch's own FLOP counter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import ROOT
from torch.utils.flop_counter import FlopCounterMode

from rayvit.config import ModelConfig, load_config
from rayvit.model import build_model
from rayvit.perf import mfu, peak_flops, peak_flops_of, vit_forward_flops_per_image, vit_train_flops_per_image

CLASSES = [f"c{i}" for i in range(10)]


def test_vit_b16_224_is_35_gflops_forward_and_3x_trained() -> None:
    vit_b = ModelConfig()  # the defaults are ViT-B/16 at 224 px
    fwd = vit_forward_flops_per_image(vit_b, num_labels=1000)
    assert fwd == pytest.approx(35.1e9, rel=0.005)
    assert vit_train_flops_per_image(vit_b, num_labels=1000) == pytest.approx(3 * fwd)
    # a transformers ViTConfig works too and gives the same count
    from transformers import ViTConfig

    hf = ViTConfig()
    hf.num_labels = 1000
    assert vit_forward_flops_per_image(hf) == pytest.approx(fwd)


@pytest.mark.parametrize(
    "sizes",
    [
        dict(image_size=32, patch_size=4, hidden_size=48, num_layers=2, num_heads=3, mlp_dim=96),
        dict(image_size=24, patch_size=8, hidden_size=64, num_layers=3, num_heads=4, mlp_dim=256),
    ],
)
def test_formula_matches_torch_flop_counter(sizes: dict[str, int]) -> None:
    cfg = ModelConfig.model_validate({"pretrained": None, "attn_implementation": "eager", **sizes})
    model = build_model(cfg, CLASSES)
    x = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    with FlopCounterMode(display=False) as fwd_counter:
        model(pixel_values=x).logits.sum()
    per_image = fwd_counter.get_total_flops() / 2
    assert vit_forward_flops_per_image(cfg, len(CLASSES)) == pytest.approx(per_image, rel=1e-9)

    with FlopCounterMode(display=False) as train_counter:
        model(pixel_values=x).logits.sum().backward()
    trained = train_counter.get_total_flops() / 2
    # backward is twice the forward, less the input gradient of the patch embedding
    assert 2.9 * per_image < trained <= vit_train_flops_per_image(cfg, len(CLASSES))


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_peak_flops_by_name(name: str, peak: float | None) -> None:
    assert peak_flops_of(name) == peak


def test_no_peak_and_no_mfu_on_cpu() -> None:
    assert peak_flops("cpu") is None
    assert peak_flops(torch.device("cpu")) is None
    assert mfu(1000.0, 105e9, None) is None


def test_mfu() -> None:
    assert mfu(3000.0, 105e9, 989e12) == pytest.approx(3000 * 105e9 / 989e12)
    assert mfu(0.0, 105e9, 989e12) == 0.0


@pytest.mark.slow  # a Ray Train run: ~30 s on an idle machine
def test_gpu_bench_runs_the_jobs_own_step_as_a_smoke_test_on_cpu(ray_cluster: None, cifar10: Path) -> None:
    """bench/gpu_train.py, tiny, on the CPU: a Ray Train run of the job's step fed by Ray Data,
    with figures that mean something (images/s, the share of time waiting for data)."""
    from bench.gpu_train import describe, measure

    cfg = load_config(
        ROOT / "configs" / "quick.yaml",
        [
            f"data.path={cifar10}",
            "data.train_limit=96",
            "data.val_limit=1",
            "model.hidden_size=32",
            "model.num_layers=1",
            "model.num_heads=2",
            "model.mlp_dim=64",
            "train.batch_size=16",
            "train.log_every_steps=2",
            "scaling.cpus_per_worker=1",
            "wandb.mode=disabled",
        ],
    )
    figures = measure(cfg, workers=1, use_gpu=False, steps=4, warmup=1)
    assert figures["images_per_s"] > 0 and figures["mfu"] is None and figures["device"] == "CPU"
    assert 0 <= figures["data_wait_share"] < 1
    assert "img/s, MFU n/a, waiting for data" in describe(figures)
