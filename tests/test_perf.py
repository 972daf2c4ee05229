"""Model FLOPs and MFU (rayvit.perf): the formula against torch's own FLOP counter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ROOT
from torch.utils.flop_counter import FlopCounterMode

from rayvit.config import ModelConfig, load_config
from rayvit.model import FAMILIES, architecture_config, build_model
from rayvit.perf import (
    forward_flops_per_image,
    mfu,
    peak_flops,
    peak_flops_of,
    train_flops_per_image,
    vit_forward_flops_per_image,
    vit_train_flops_per_image,
)

CLASSES = [f"c{i}" for i in range(10)]


def test_vit_b16_224_is_35_gflops_forward_and_3x_trained() -> None:
    vit_b = architecture_config(ModelConfig(pretrained=None), 1000)  # the defaults: ViT-B/16 at 224 px
    fwd = vit_forward_flops_per_image(vit_b)
    assert fwd == pytest.approx(35.1e9, rel=0.005)
    assert vit_train_flops_per_image(vit_b) == pytest.approx(3 * fwd)
    # torch's counter on the meta device agrees with the formula (its cross-check)
    assert forward_flops_per_image(vit_b, 224) == pytest.approx(fwd, rel=1e-6)
    assert train_flops_per_image(vit_b, 224) == pytest.approx(3 * fwd, rel=1e-6)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_any_family_is_counted_like_a_real_forward_pass(family: str) -> None:
    """The meta-device count of any family (with its default attention kernel) equals torch's
    count of a real forward pass with the plain attention: on the CPU torch's counter has no
    formula for SDPA's CPU kernel, so a real SDPA pass would leave attention out."""
    arch = FAMILIES[family].tiny
    eager = ModelConfig(
        pretrained=None, model_type=family, image_size=32, arch=arch, attn_implementation="eager"
    )
    model = build_model(eager, CLASSES).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(pixel_values=torch.randn(1, 3, 32, 32))
    default = build_model(eager.model_copy(update={"attn_implementation": "auto"}), CLASSES)
    counted = forward_flops_per_image(default.config, 32)
    assert counted > 0 and counted == pytest.approx(counter.get_total_flops(), rel=1e-9)


@pytest.mark.parametrize(
    "sizes",
    [
        (
            32,
            dict(
                patch_size=4, hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96
            ),
        ),
        (
            24,
            dict(
                patch_size=8,
                hidden_size=64,
                num_hidden_layers=3,
                num_attention_heads=4,
                intermediate_size=256,
            ),
        ),
    ],
)
def test_formula_matches_torch_flop_counter(sizes: tuple[int, dict[str, Any]]) -> None:
    side, arch = sizes
    cfg = ModelConfig(pretrained=None, attn_implementation="eager", image_size=side, arch=arch)
    model = build_model(cfg, CLASSES)
    x = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    with FlopCounterMode(display=False) as fwd_counter:
        model(pixel_values=x).logits.sum()
    per_image = fwd_counter.get_total_flops() / 2
    assert vit_forward_flops_per_image(model.config) == pytest.approx(per_image, rel=1e-9)

    with FlopCounterMode(display=False) as train_counter:
        model(pixel_values=x).logits.sum().backward()
    trained = train_counter.get_total_flops() / 2
    # backward is twice the forward, less the input gradient of the patch embedding
    assert 2.9 * per_image < trained <= vit_train_flops_per_image(model.config)


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
            "model.arch.hidden_size=32",
            "model.arch.num_hidden_layers=1",
            "model.arch.num_attention_heads=2",
            "model.arch.intermediate_size=64",
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
