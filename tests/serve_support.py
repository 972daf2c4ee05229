"""Fixtures and helpers of the serving tests: tiny trained models, one Serve instance, image corpus."""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from support import ROOT as ROOT
from support import free_port as free_port
from support import require_data as data_dir

from rayvit.checkpoint import save_model_folder, write_json
from rayvit.config import DataConfig, load_config
from rayvit.data import load_test, load_train_val
from rayvit.model import build_model, build_preprocessor
from rayvit.preprocess import preprocess_arrays

TINY_MODEL = [
    "model.image_size=32",
    "model.arch.hidden_size=32",
    "model.arch.num_hidden_layers=2",
    "model.arch.num_attention_heads=2",
    "model.arch.intermediate_size=64",
]

#: Replicas import this checkout's code, whatever else the Python environment has installed.
CODE_ENV: dict[str, Any] = {"env_vars": {"PYTHONPATH": str(ROOT)}}

#: Small, fast replicas for tests: one replica, a quarter CPU, one torch thread.
TEST_OPTIONS: dict[str, Any] = {
    "autoscaling_config": {"min_replicas": 1, "max_replicas": 1, "initial_replicas": 1},
    "ray_actor_options": {"num_cpus": 0.25, "num_gpus": 0, "runtime_env": CODE_ENV},
    "user_config": {"torch_threads": 1, "max_batch_size": 16, "batch_wait_timeout_s": 0.002},
    "graceful_shutdown_wait_loop_s": 0.5,
    "graceful_shutdown_timeout_s": 10,
}


def train_tiny_model(dest: Path, name: str, version: str, seed: int, steps: int = 60) -> Path:
    """A tiny ViT trained for a few steps on CIFAR-10 (non-degenerate predictions) and exported."""
    cfg = load_config(ROOT / "configs" / "quick.yaml", [f"data.path={data_dir()}", *TINY_MODEL])
    data = load_train_val(DataConfig(path=str(data_dir()), train_limit=2048, val_limit=8), 0, 32)
    torch.manual_seed(seed)
    model: Any = build_model(cfg.model, data.class_names)
    pre = build_preprocessor(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    images = torch.from_numpy(data.train.images)
    labels = torch.from_numpy(data.train.labels)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(labels), (64,), generator=gen)
        loss: Any = torch.nn.functional.cross_entropy(
            model(pixel_values=pre(images[idx])).logits, labels[idx]
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    save_model_folder(model, pre, dest)
    write_json(dest / "metrics.json", {"name": name, "version": version, "steps": steps, "seed": seed})
    return dest


@dataclass
class Models:
    a: Path
    b: Path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    tmp = tmp_path_factory.mktemp("models")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and immune to a busy machine
    try:
        return Models(
            train_tiny_model(tmp / "model-a", "model-a", "1", seed=1),
            train_tiny_model(tmp / "model-b", "model-b", "2", seed=2, steps=40),
        )
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def serve_url(ray_cluster: None) -> Iterator[str]:
    """Serve for one test module, HTTP on 127.0.0.1 only; shut down after it, so later tests
    (training) get the whole cluster back."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, controller_options=controller_options())
    yield f"http://127.0.0.1:{port}"
    shutdown: Any = serve.shutdown
    shutdown()


def controller_options() -> dict[str, Any]:
    """``configs/serve.yaml``'s controller options: its proxy loads the retry middleware."""
    import yaml

    options: dict[str, Any] = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())[
        "controller_options"
    ]
    return options


def deploy(model_dir: Path, name: str, route_prefix: str, **overrides: Any) -> None:
    from ray import serve

    from serve_app import build_app
    from serve_app.settings import merge

    serve.run(
        build_app(model_dir, overrides=merge(TEST_OPTIONS, overrides)), name=name, route_prefix=route_prefix
    )


def serve_config(
    model_dir: Path, name: str = "rayvit", route_prefix: str = "/", **overrides: Any
) -> dict[str, Any]:
    """``configs/serve.yaml`` for one app, with the test options (and ``overrides``) merged in."""
    import yaml

    from serve_app.settings import merge

    raw = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
    app = raw["applications"][0]
    app.update(name=name, route_prefix=route_prefix, args={"model_dir": str(model_dir)}, runtime_env=CODE_ENV)
    app["deployments"] = [merge(app["deployments"][0], merge(TEST_OPTIONS, overrides))]
    return {"applications": [app]}


def deploy_config(config: dict[str, Any], timeout_s: float = 300) -> None:
    """Apply a Serve config as ``serve deploy`` / ``serve run FILE`` do, and wait until it runs."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    client = _get_global_client()
    assert client is not None, "Serve is not running"
    client.deploy_apps(ServeDeploySchema.model_validate(config))
    names = [a["name"] for a in config["applications"]]

    def running() -> bool:
        apps = serve.status().applications
        return all(n in apps and apps[n].status == "RUNNING" for n in names)

    assert wait_until(running, timeout_s), f"apps {names} not running: {serve.status().applications}"


@pytest.fixture(scope="module")
def classifier(serve_url: str, tiny_models: Models) -> Iterator[str]:
    """Model A deployed from ``configs/serve.yaml`` as app ``rayvit`` at ``/``; yields the base URL."""
    from ray import serve

    deploy_config(serve_config(tiny_models.a))
    yield serve_url
    serve.delete("rayvit")


@pytest.fixture(scope="session")
def cifar_test() -> tuple[np.ndarray, np.ndarray]:
    split = load_test(DataConfig(path=str(data_dir()), test_limit=100), 32)
    return split.images, split.labels


def encode(image: Image.Image | np.ndarray, fmt: str = "PNG", **kwargs: Any) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def offline_tensor(pre: Any, path: Path) -> torch.Tensor:
    """What training and offline evaluation compute for an image file: the data pipeline's decode
    (the function its Ray Data tasks run, here in this process) of an imagefolder holding only
    that file, then the ``Preprocessor``."""
    import shutil

    from rayvit.config import DataConfig
    from rayvit.data import decode_here, open_source

    folder = path.parent / f"{path.name}-imagefolder"
    (folder / "train" / "c").mkdir(parents=True, exist_ok=True)
    shutil.copy(path, folder / "train" / "c" / path.name)
    source = open_source(DataConfig(path=str(folder), cache_dir=None))
    images = decode_here(source, "train", np.arange(1), pre.image_size).images
    pixels: torch.Tensor = pre(torch.from_numpy(images))
    return pixels


def plain_pil_tensor(pre: Any, path: Path) -> torch.Tensor:
    """PIL open, ``to_uint8_array``, ``preprocess_arrays``: no reduction while decoding."""
    from rayvit.preprocess import to_uint8_array

    with Image.open(path) as im:
        return preprocess_arrays(pre, [to_uint8_array(im)])


def wait_until(cond: Callable[[], bool], timeout_s: float, interval_s: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval_s)
    return cond()
