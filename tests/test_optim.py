"""The optimizer's schedule and parameter groups, on their own (no Ray, no data)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from rayvit.config import ModelConfig
from rayvit.model import FAMILIES, build_model
from rayvit.train_loop import param_groups, warmup_cosine


def test_warmup_then_cosine_to_zero() -> None:
    total, warmup = 100, 10  # warmup_fraction 0.1
    f = warmup_cosine(total, 0.1)
    assert f(0) == pytest.approx(1 / warmup)  # the first step already moves, at 1/10 of the peak
    assert f(warmup // 2) == pytest.approx(0.6)
    assert f(warmup - 1) == pytest.approx(1.0)  # end of warmup: the peak
    assert f(warmup) == pytest.approx(1.0)  # the cosine starts at the peak
    middle = warmup + (total - warmup) // 2
    assert f(middle) == pytest.approx(0.5)
    assert f(total) == pytest.approx(0.0, abs=1e-12)
    assert f(total + 50) == pytest.approx(0.0, abs=1e-12)  # stays at zero past the end
    values = [f(s) for s in range(warmup, total + 1)]
    assert all(a >= b for a, b in itertools.pairwise(values))  # never rises after warmup
    assert f(warmup + 30) == pytest.approx(0.5 * (1 + math.cos(math.pi * 30 / 90)))


def test_no_warmup_starts_at_the_peak() -> None:
    f = warmup_cosine(50, 0.0)
    assert f(0) == pytest.approx(1.0)
    assert f(25) == pytest.approx(0.5)
    assert f(50) == pytest.approx(0.0, abs=1e-12)


def test_schedule_drives_the_optimizer_lr() -> None:
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(20, 0.25))
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx(1e-3 / 5) and seen[4] == pytest.approx(1e-3)
    assert max(seen) == pytest.approx(1e-3) and seen[-1] < 1e-4


def test_param_groups_decay_weights_only() -> None:
    cfg = ModelConfig(
        pretrained=None,
        image_size=16,
        arch=dict(
            patch_size=4, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
        ),
    )
    model = build_model(cfg, ["a", "b", "c"])
    model.get_parameter("vit.embeddings.patch_embeddings.projection.bias").requires_grad_(False)  # frozen
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # every trainable parameter exactly once, the frozen one nowhere
    assert len(decay["params"]) + len(no_decay["params"]) == len(trainable)
    assert decayed | kept == trainable and not decayed & kept
    assert "vit.embeddings.patch_embeddings.projection.bias" not in decayed | kept
    # no decay: biases, every LayerNorm parameter, the class token and position embeddings
    norms = {
        f"{mod_name}.{n}"
        for mod_name, mod in model.named_modules()
        if isinstance(mod, torch.nn.LayerNorm)
        for n, _ in mod.named_parameters()
    }
    expected_kept = {
        n for n in trainable if n.endswith((".bias", "cls_token", "position_embeddings")) or n in norms
    }
    assert kept == expected_kept and decayed == trainable - expected_kept
    assert {"vit.embeddings.cls_token", "vit.embeddings.position_embeddings", "classifier.bias"} <= kept
    assert len(norms) >= 2 * 2 * 2 and norms <= kept  # two norms (weight, bias) per block, at least
    assert "classifier.weight" in decayed and "vit.embeddings.patch_embeddings.projection.weight" in decayed
    assert sum(1 for n in decayed if n.endswith("weight")) == len(decayed) >= 2 * 6 + 2  # q k v o fc1 fc2


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_param_groups_by_module_type_in_every_family(family: str) -> None:
    """Norm layers (BatchNorm, LayerNorm and a family's own), biases and the tokens an embeddings
    module holds get no decay in every family; convolution and linear weights do."""
    cfg = ModelConfig(pretrained=None, model_type=family, image_size=32, arch=FAMILIES[family].tiny)
    model = build_model(cfg, ["a", "b", "c"])
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decayed | kept == set(names.values()) and not decayed & kept
    owner = {
        f"{m}.{n}".lstrip("."): mod
        for m, mod in model.named_modules()
        for n, _ in mod.named_parameters(recurse=False)
    }
    for name in kept:
        kind = type(owner[name]).__name__
        assert model.get_parameter(name).ndim < 2 or kind.endswith(("Norm", "Embeddings", "PositionBias"))
    for name in decayed:
        kind = type(owner[name]).__name__
        assert isinstance(owner[name], (torch.nn.Linear, torch.nn.Conv2d)), (name, kind)
    assert any("classifier" in n and n.endswith("weight") for n in decayed)
