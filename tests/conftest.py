"""Shared fixtures: the real CIFAR-10 copy, a shrunk quick config, one local Ray cluster."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from support import DATA_DIR as DATA_DIR  # the helpers tests import from here
from support import ROOT as ROOT
from support import require_data as require_data

from rayvit.config import Config, load_config

# Fixtures of the serving tests (tiny models, one Serve instance) live in tests/serve_support.py.
pytest_plugins = ["serve_support"]

_SLOW_LEFT_OUT = pytest.StashKey[int]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--full",
        action="store_true",
        help="the whole suite: the everyday tier and the tests marked slow",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``python -m pytest`` is the everyday tier: tests marked ``slow`` are left out unless
    ``--full`` is given or the command picks tests itself (``-m``, ``-k`` or a ``file::test`` id),
    so a slow test asked for by name still runs."""
    picked = bool(config.option.markexpr or config.option.keyword) or any("::" in a for a in config.args)
    if config.getoption("--full") or picked:
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        items[:] = [item for item in items if not item.get_closest_marker("slow")]
        config.hook.pytest_deselected(items=slow)
    config.stash[_SLOW_LEFT_OUT] = len(slow)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    left_out = config.stash.get(_SLOW_LEFT_OUT, 0)
    if left_out:
        terminalreporter.write_line(
            f"everyday tier: {left_out} slow tests not run; `python -m pytest --full` runs everything"
        )


# The quick recipe, shrunk: tiny ViT, a few hundred images, one epoch, 2 workers on 2 logical CPUs.
TINY = [
    f"data.path={DATA_DIR}",
    "data.train_limit=320",
    "data.val_limit=128",
    "data.test_limit=200",
    "model.arch.hidden_size=32",
    "model.arch.num_hidden_layers=2",
    "model.arch.num_attention_heads=2",
    "model.arch.intermediate_size=64",
    "train.epochs=1",
    "train.batch_size=32",
    "train.eval_batch_size=128",
    "train.lr=1e-3",
    "scaling.num_workers=2",
    "scaling.cpus_per_worker=0.5",
    "ray.num_cpus=2",
    "tune.lrs=null",
    "train.evals_per_epoch=1",  # tests that need mid-epoch validation ask for it
    "tune.grace_period=1",
    "wandb.mode=offline",
]


def tiny_config(tmp_path: Path, *extra: str) -> Config:
    """The shrunk quick recipe on the CIFAR-10 copy (skips the test without it)."""
    require_data()
    return load_config(ROOT / "configs" / "quick.yaml", [*TINY, f"output_dir={tmp_path / 'run'}", *extra])


@pytest.fixture
def cifar10() -> Path:
    """The CIFAR-10 copy (the test is skipped when it is missing)."""
    return require_data()


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """One real local Ray cluster for the in-process tests of this session, started as the job
    starts its own: with a dashboard whose state API Ray Train's placement-group cleaner asks,
    so every finished trial's workers are released for the next one."""
    import ray

    from rayvit.cluster import init_ray
    from rayvit.config import RayConfig

    saved = os.environ.get("RAY_API_SERVER_ADDRESS")
    init_ray(RayConfig(num_cpus=2))
    yield
    ray.shutdown()
    if saved is None:
        os.environ.pop("RAY_API_SERVER_ADDRESS", None)
    else:
        os.environ["RAY_API_SERVER_ADDRESS"] = saved


@pytest.fixture(scope="session")
def trained_run(ray_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-worker tiny run; several tests read its export."""
    from tuning import run_job

    tmp = tmp_path_factory.mktemp("trained")
    summary = run_job(tiny_config(tmp))
    return Path(summary.best_dir).parent


def train_cli_argv(args: list[str]) -> list[str]:
    """The command line ``ray_jobs/train.py --config configs/quick.yaml ARGS``."""
    return [
        sys.executable,
        str(ROOT / "ray_jobs" / "train.py"),
        "--config",
        str(ROOT / "configs" / "quick.yaml"),
        *args,
    ]


def run_train_cli(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The train CLI in a process (and local cluster) of its own."""
    return subprocess.run(
        train_cli_argv(args),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
