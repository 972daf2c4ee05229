"""The training step on its own: no host-device syncs between checks, gradient accumulation,
activation checkpointing, one compilation (no Ray Train; the feed is a real Ray Data shard)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from support import ROOT
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from rayvit.config import Config, load_config
from rayvit.data import SplitPlan, plan_train_val, stored_side
from rayvit.job import streams
from rayvit.model import build_model, build_preprocessor
from rayvit.train_loop import (
    DivergedError,
    Shard,
    Stepper,
    enable_gradient_checkpointing,
    make_optimizer,
    step_rows,
    train_batches,
    train_step,
    warmup_cosine,
)

CLASSES = [f"c{i}" for i in range(10)]
TINY_MODEL = {
    "pretrained": None,
    "image_size": 16,
    "arch": {
        "patch_size": 4,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
    },
    "attn_implementation": "eager",
}

#: Tensor methods that make the host wait for the device (on a GPU), whatever the tensor.
SYNCING_METHODS = {"item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"}


def _config(**train: Any) -> Config:
    return Config.model_validate(
        {
            "model": TINY_MODEL,
            "train": {"batch_size": 8, "augment": True, "lr": 1e-3, **train},
            "data": {"shuffle_buffer": 32, "prefetch_batches": 2},
        }
    )


@dataclass
class SyncLog:
    """Where each device->host sync happened: ("feed", s) while batch s is fetched, ("step", s)
    while it is trained on (1-based), ("end", 0) after the last batch."""

    where: tuple[str, int] = ("setup", 0)
    syncs: list[tuple[tuple[str, int], str]] = field(default_factory=list)

    def counted(self, batches: Iterable[Any]) -> Iterator[Any]:
        it, step = iter(batches), 0
        while True:
            self.where = ("feed", step + 1)
            try:
                batch = next(it)
            except StopIteration:
                self.where = ("end", 0)
                return
            step += 1
            self.where = ("step", step)
            yield batch


class _FunctionSyncs(TorchFunctionMode):
    """Python-level calls that sync: ``.item()``, ``bool(t)``, ``.tolist()``, ``.cpu()`` ..."""

    def __init__(self, log: SyncLog) -> None:
        super().__init__()
        self.log = log

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = getattr(func, "__name__", "")
        if name in SYNCING_METHODS:
            self.log.syncs.append((self.log.where, name))
        return func(*args, **(kwargs or {}))


class _DispatchSyncs(TorchDispatchMode):
    """Kernels that sync, whoever calls them: a scalar read of a tensor's value, a data-dependent
    check, and copies from an accelerator to the host."""

    def __init__(self, log: SyncLog) -> None:
        super().__init__()
        self.log = log

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        out = func(*args, **kwargs)
        if name in ("_local_scalar_dense", "is_nonzero", "equal", "nonzero"):
            self.log.syncs.append((self.log.where, name))
        elif name in ("_to_copy", "copy_") and isinstance(out, torch.Tensor) and args:
            src = args[1] if name == "copy_" else args[0]
            if out.device.type == "cpu" and isinstance(src, torch.Tensor) and src.device.type != "cpu":
                self.log.syncs.append((self.log.where, f"{name} to host"))
        return out


def _stepper(cfg: Config, steps: int) -> Stepper:
    torch.manual_seed(0)
    model = build_model(cfg.model, CLASSES)
    optimizer = make_optimizer(model, cfg, torch.device("cpu"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, 0.1))
    forward: Any = torch.compile(model) if cfg.train.compile else model
    return Stepper(
        forward, model, optimizer, scheduler, build_preprocessor(cfg.model), cfg, False, torch.device("cpu")
    )


def _shard(n: int, side: int = 12) -> Any:
    """A real Ray Data iterator over ``n`` decoded images stored smaller than the model's side."""
    import ray.data

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (n, side, side, 3), dtype=np.uint8)
    items = [{"image": images[i], "label": i % len(CLASSES), "index": i} for i in range(n)]
    return ray.data.from_items(items).iterator()


def test_no_host_device_sync_inside_a_step_between_checks(ray_cluster: None) -> None:
    """Ten steps with augmentation, the shuffle and an injected evaluation at step 7: the host
    reads the device only at the checks (every 4 steps, step 7, the epoch's end), never while a
    batch is fetched or trained on in between. (On a GPU the same modes see CUDA syncs.)"""
    cfg = _config(log_every_steps=4)
    shard = _shard(84)  # 10 whole batches of 8 and 4 rows left out
    steps = Shard(84, 1, step_rows(cfg)).steps
    assert steps == 10
    stepper = _stepper(cfg, steps)
    log = SyncLog()
    checks: list[int] = []
    batches = log.counted(train_batches(shard, cfg, 1, 0, torch.device("cpu")))
    gen = torch.Generator(device="cpu").manual_seed(0)
    with _FunctionSyncs(log), _DispatchSyncs(log):
        totals = stepper.epoch(batches, gen, frozenset({7}), lambda done, t: checks.append(done))
    assert checks == [4, 7, 8]
    assert totals.seen == 80  # every step had the same shape; the remainder was left out
    allowed = {("step", 4), ("step", 7), ("step", 8), ("end", 0)}
    outside = [s for s in log.syncs if s[0] not in allowed]
    assert not outside, outside
    # the recorder does see syncs: the checks' own reads
    assert {w for w, _ in log.syncs} == allowed, log.syncs


def test_a_non_finite_step_stops_the_epoch_at_the_next_check() -> None:
    cfg = _config(log_every_steps=3, lr=1e30, grad_clip=None)
    stepper = _stepper(cfg, 9)
    images = torch.randint(0, 255, (8, 12, 12, 3), dtype=torch.uint8)
    images[0, 0, 0, 0] = 255
    batches = [{"image": images, "label": torch.arange(8) % 10} for _ in range(9)]
    seen: list[int] = []

    def poison(done: int, t: Any) -> None:
        seen.append(done)

    # step 2 gets a non-finite loss: the model's weights are poisoned after the first step
    def feed() -> Iterator[Any]:
        for i, b in enumerate(batches):
            if i == 1:
                with torch.no_grad():
                    next(stepper.ddp_model.parameters()).fill_(float("nan"))
            yield b

    with pytest.raises(DivergedError) as err:
        stepper.epoch(feed(), None, frozenset(), poison)
    assert err.value.step == 1  # 0-based: the second step
    assert seen == []  # raised at the first check (step 3), before its callback


def _params(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_k_micro_batches_give_the_parameters_of_one_batch_k_times_the_size() -> None:
    """grad_accum_steps=4 with micro-batches of 8 against one batch of 32: the same parameters
    after 3 optimizer steps, to 1e-5 (fp32; only the summation order differs)."""
    x = torch.randn(32, 3, 16, 16)
    y = torch.arange(32) % 10
    results = []
    for batch_size, k in ((32, 1), (8, 4)):
        cfg = _config(batch_size=batch_size, grad_accum_steps=k)
        stepper = _stepper(cfg, 3)
        for _ in range(3):
            loss, finite = train_step(stepper.forward, stepper.ddp_model, stepper.optimizer, x, y, cfg, False)
            assert bool(finite)
        results.append((_params(stepper.ddp_model), float(loss)))
    (one, loss_one), (accum, loss_accum) = results
    assert loss_accum == pytest.approx(loss_one, abs=1e-5)
    torch.testing.assert_close(accum, one, atol=1e-5, rtol=0)
    assert not torch.equal(accum, _params(build_model(_config().model, CLASSES)))  # they did train


def test_activation_checkpointing_keeps_loss_and_gradients() -> None:
    """The tiny model with and without activation checkpointing: the same loss and gradients
    (to 1e-6), and the checkpointed blocks really recompute in the backward pass."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    cfg = _config()
    x = torch.randn(8, 3, 16, 16)
    y = torch.arange(8) % 10
    grads, losses, forwards = [], [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg.model, CLASSES)
        if checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
        calls = [0]
        block = next(m for m in model.modules() if isinstance(m, GradientCheckpointingLayer))
        inner = next(m for m in block.modules() if isinstance(m, torch.nn.Linear))
        inner.register_forward_hook(lambda *_, c=calls: c.__setitem__(0, c[0] + 1))
        loss = torch.nn.functional.cross_entropy(model(pixel_values=x).logits, y)
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        forwards.append(calls[0])
    assert losses[1] == pytest.approx(losses[0], abs=1e-6)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=0)
    assert forwards == [1, 2]  # the block ran again in the backward pass


@pytest.mark.slow  # inductor compiles forward and backward on the CPU: ~30-60 s on a busy machine
def test_compiled_training_compiles_once_over_two_epochs(ray_cluster: None) -> None:
    """train.compile=true, two epochs of a real Ray Data feed with a ragged remainder: dynamo
    compiles one frame once, and never again (no recompiles)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    cfg = _config(compile=True, log_every_steps=2)
    shard = _shard(44)  # 5 whole batches of 8 and 4 rows that would make a ragged last batch
    stepper = _stepper(cfg, 10)
    compiled_after = []
    for epoch in (1, 2):
        gen = torch.Generator().manual_seed(epoch)
        totals = stepper.epoch(train_batches(shard, cfg, epoch, 0, torch.device("cpu")), gen)
        assert totals.seen == 40
        compiled_after.append(counters["stats"]["unique_graphs"])
    assert compiled_after[0] >= 1 and compiled_after[1] == compiled_after[0]
    assert not counters["recompiles"], dict(counters["recompiles"])
    assert counters["frames"]["ok"] == 1, dict(counters["frames"])


def _full_recipe(cifar10: Path) -> Config:
    """configs/train.yaml on the CIFAR-10 copy, from scratch (no download)."""
    return load_config(ROOT / "configs" / "train.yaml", [f"data.path={cifar10}", "model.pretrained=null"])


def test_full_recipe_keeps_cifar10_at_32px_in_memory(cifar10: Path) -> None:
    """The full recipe's 50,000 decoded train+val images are kept at 32 px, 0.15 GB, within
    data.max_in_memory_bytes: decoded once, not every epoch; a side above the model's is never
    stored."""
    cfg = _full_recipe(cifar10)
    assert cfg.model.image_size == 224 and cfg.train.compile
    side = stored_side(cfg.data, cfg.model.image_size)
    assert side == 32
    assert stored_side(cfg.data.model_copy(update={"image_size": 512}), 224) == 224
    assert stored_side(cfg.data.model_copy(update={"image_size": None}), 224) == 224
    train, val, _ = plan_train_val(cfg.data, cfg.seed, side)
    assert len(train) + len(val) == 50_000
    assert train.decoded_bytes + val.decoded_bytes < 0.16e9 < cfg.data.max_in_memory_bytes
    assert not streams(cfg, train, val)
    at_model_side = plan_train_val(cfg.data, cfg.seed, cfg.model.image_size)
    assert streams(cfg, *at_model_side[:2])  # what 224 px would have cost: 7.5 GB, streamed


@pytest.mark.slow  # ViT-B/16's initialisation alone takes ~10 s on a CPU
def test_full_recipe_trains_a_224px_step_from_32px_images(cifar10: Path) -> None:
    """One ViT-B/16 training step at 224 px, on the CPU, from two of the recipe's 32-px images
    brought to 224 px by the Preprocessor."""
    cfg = _full_recipe(cifar10)
    side = stored_side(cfg.data, cfg.model.image_size)
    train, _, names = plan_train_val(cfg.data, cfg.seed, side)
    few = SplitPlan(train.source, "train", train.rows[:2], side).arrays(cfg.data)
    assert few.images.shape == (2, 32, 32, 3)
    torch.manual_seed(0)
    model = build_model(cfg.model, list(names))
    x = build_preprocessor(cfg.model)(torch.from_numpy(few.images), train=True)
    assert x.shape == (2, 3, 224, 224)
    optimizer = make_optimizer(model, cfg, torch.device("cpu"))
    loss, finite = train_step(model, model, optimizer, x, torch.from_numpy(few.labels), cfg, False)
    assert bool(finite) and 0 < loss.item() < 10
