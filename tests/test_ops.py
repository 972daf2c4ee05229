"""Operations: DVC pipeline and remotes, data fingerprint, Dockerfile, cluster config, gates.

DVC runs for real in a temporary git + DVC repository built from the project's
files and a small prepared slice of the real CIFAR-10 copy; only the GCS remote
is never contacted. No Docker engine exists on the machines that run this, so
the Dockerfile is checked statically against ``pyproject.toml``.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT, require_data

from rayvit.dvc import data_fingerprint, dir_md5, file_md5, tracked_fingerprint
from rayvit.prepare import SUMS_FILE, prepare_data, read_sums, sha256, split_file, verify_sums

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
REPO_FILES = [
    "rayvit",
    "ray_jobs",
    "tuning",
    "configs",
    "dvc.yaml",
    "params.yaml",
    ".dvcignore",
    ".gitignore",
    ".dvc",
]
TRAIN_ROWS, TEST_ROWS = 256, 128


# ---------------------------------------------------------------- helpers


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DVC_NO_ANALYTICS="1",
        HF_HUB_OFFLINE="1",
        GIT_AUTHOR_NAME="rayvit tests",
        GIT_AUTHOR_EMAIL="tests@example.invalid",
        GIT_COMMITTER_NAME="rayvit tests",
        GIT_COMMITTER_EMAIL="tests@example.invalid",
        # Stage commands call `python`: the interpreter running the tests.
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    return env


def run(
    cmd: list[str], cwd: Path, check: bool = True, timeout: int = 300
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def dvc(repo: Path, *args: str, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", "dvc", *args], repo, check=check, timeout=timeout)


def make_repo(parent: Path, train_rows: int = TRAIN_ROWS, test_rows: int = TEST_ROWS) -> Path:
    """A git + DVC repository with the project's pipeline files, reading the local CIFAR-10 copy."""
    data_dir = require_data()
    repo = parent / "repo"
    repo.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "cache", "tmp", "config.local")
    for name in REPO_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, repo / name, ignore=ignore)
        else:
            shutil.copy2(src, repo / name)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["prepare"].update(source=str(data_dir), train_limit=train_rows, test_limit=test_rows)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-q", "-m", "project files"], repo)
    return repo


def lock_md5(repo: Path, stage: str, path: str) -> str:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    outs = {o["path"]: o["md5"] for o in lock["stages"][stage]["outs"]}
    return str(outs[path])


def tree_sha256(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dvc_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The temp repository after ``dvc repro prepare`` (a 256/128-row slice of CIFAR-10)."""
    repo = make_repo(tmp_path_factory.mktemp("dvc"))
    out = dvc(repo, "repro", "prepare")
    assert "Running stage 'prepare'" in out.stdout, out.stdout
    return repo


# ---------------------------------------------------------------- data preparation


def test_prepare_subset_keeps_schema_and_is_deterministic(cifar10: Path, tmp_path: Path) -> None:
    a = prepare_data(str(cifar10), tmp_path / "a", train_limit=50, test_limit=20)
    b = prepare_data(str(cifar10), tmp_path / "b", train_limit=50, test_limit=20)
    assert a.how == "subset" and a.rows == {"train": 50, "test": 20}
    assert verify_sums(a.dest) == [] and set(read_sums(a.dest)) == {split_file("train"), split_file("test")}
    assert data_fingerprint(a.dest) == data_fingerprint(b.dest)
    from rayvit.config import DataConfig
    from rayvit.data import class_names, load_dataset_dict, load_test

    ds = load_dataset_dict(str(a.dest))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert class_names(ds, DataConfig()) == names
    assert load_test(DataConfig(path=str(a.dest), cache_dir=None), 32).images.shape == (20, 32, 32, 3)


def test_prepare_full_copy_is_byte_identical(cifar10: Path, tmp_path: Path) -> None:
    res = prepare_data(str(cifar10), tmp_path / "cifar10")
    assert res.how == "copied" and res.rows == {"train": 50_000, "test": 10_000}
    assert (res.dest / SUMS_FILE).read_text() == (cifar10 / SUMS_FILE).read_text()
    assert verify_sums(res.dest) == []
    assert sorted(p.name for p in res.dest.iterdir()) == [SUMS_FILE, "plain_text"]


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("../no/such/folder", "error: source folder not found: ../no/such/folder"),
        ("nobody/no-such-dataset", "error: source: cannot load hub data set 'nobody/no-such-dataset'"),
    ],
)
def test_prepare_cli_bad_source_is_one_line(tmp_path: Path, source: str, expected: str) -> None:
    proc = run(
        [sys.executable, str(ROOT / "ray_jobs" / "prepare_data.py"), "--source", source, "--dest", "out"],
        tmp_path,
        check=False,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), proc.stderr
    assert not (tmp_path / "out").exists()


def test_data_fingerprint_of_hub_id_file_and_folder(tmp_path: Path) -> None:
    assert data_fingerprint("uoft-cs/cifar10") is None
    f = tmp_path / "x.txt"
    f.write_bytes(b"abc")
    assert data_fingerprint(f) == "900150983cd24fb0d6963f7d28e17f72"  # md5("abc")
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "sub" / "b").write_bytes(b"b")
    (tmp_path / "d" / "a").write_bytes(b"a")
    listing = json.dumps(
        [
            {"md5": file_md5(tmp_path / "d" / "a"), "relpath": "a"},
            {"md5": file_md5(tmp_path / "d/sub/b"), "relpath": "sub/b"},
        ],
        sort_keys=True,
    )
    import hashlib

    assert dir_md5(tmp_path / "d") == hashlib.md5(listing.encode()).hexdigest() + ".dir"
    assert tracked_fingerprint(tmp_path / "d") is None


# ---------------------------------------------------------------- DVC pipeline and remotes


def test_dvc_pipeline_is_prepare_train_evaluate(dvc_repo: Path) -> None:
    stages = dvc(dvc_repo, "stage", "list", "--name-only").stdout.split()
    assert stages == ["prepare", "train", "evaluate"]
    dot = dvc(dvc_repo, "dag", "--dot").stdout
    edges = set(re.findall(r'"(\w+)"\s*->\s*"(\w+)"', dot))
    assert {("prepare", "train"), ("train", "evaluate"), ("prepare", "evaluate")} <= edges, dot
    dry = dvc(dvc_repo, "repro", "--dry", "train").stdout
    assert "Stage 'prepare' didn't change, skipping" in dry
    assert (
        "python ray_jobs/train.py --config configs/quick.yaml data.path=data/cifar10 output_dir=models/quick"
        in dry
    )
    status = dvc(dvc_repo, "status").stdout
    assert "train:" in status and "evaluate:" in status and "prepare:" not in status
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    assert pipeline["stages"]["train"]["params"][0]["configs/quick.yaml"]
    assert "reports/metrics.json" in str(pipeline["stages"]["evaluate"]["metrics"])
    assert "reports/confusion.csv" in str(pipeline["stages"]["evaluate"]["plots"])


def test_dvc_hash_of_prepared_data_is_the_fingerprint(dvc_repo: Path) -> None:
    data = dvc_repo / "data" / "cifar10"
    recorded = lock_md5(dvc_repo, "prepare", "data/cifar10")
    assert recorded.endswith(".dir")
    assert data_fingerprint(data) == recorded
    assert tracked_fingerprint(data) == recorded
    assert read_sums(data) and verify_sums(data) == []


def test_dvc_push_pull_local_remote_restores_exact_data(dvc_repo: Path) -> None:
    data = dvc_repo / "data" / "cifar10"
    before = tree_sha256(data)
    remote = (dvc_repo.parent / "rayvit-dvc-remote").resolve()  # the documented offline remote
    assert "files pushed" in dvc(dvc_repo, "push", "-r", "local").stdout
    assert remote.is_dir() and any(remote.rglob("*"))
    shutil.rmtree(dvc_repo / ".dvc" / "cache")
    shutil.rmtree(data)
    dvc(dvc_repo, "pull", "-r", "local", "prepare")
    assert tree_sha256(data) == before
    assert verify_sums(data) == []
    assert data_fingerprint(data) == lock_md5(dvc_repo, "prepare", "data/cifar10")
    assert "up to date" in dvc(dvc_repo, "status", "prepare").stdout


def test_dvc_remotes_gcs_default_and_local(dvc_repo: Path) -> None:
    assert dvc(dvc_repo, "remote", "default").stdout.strip() == "gcs"
    remotes = dict(line.split()[:2] for line in dvc(dvc_repo, "remote", "list").stdout.splitlines())
    assert remotes["gcs"].startswith("gs://")
    assert Path(remotes["local"]).resolve() == (dvc_repo.parent / "rayvit-dvc-remote").resolve()
    assert re.search(r"\bgs \(gcsfs", dvc(dvc_repo, "version").stdout), "the GCS plugin is not installed"


def test_bucket_is_defined_in_one_place() -> None:
    config = (ROOT / ".dvc" / "config").read_text()
    bucket = re.search(r"url = gs://([^/\s]+)", config)
    assert bucket
    tracked = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    files = {ROOT / f for f in tracked.stdout.split()}
    holders = sorted(
        str(f.relative_to(ROOT))
        for f in files
        if f.is_file() and f.suffix not in {".parquet"} and bucket.group(1) in f.read_text(errors="ignore")
    )
    assert holders == [".dvc/config"]


# ---------------------------------------------------------------- Dockerfile


def _instructions(text: str) -> list[tuple[str, str]]:
    joined = re.sub(
        r"\\\n", " ", "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))
    )
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _pins() -> tuple[str, str, str]:
    deps = PYPROJECT["project"]["dependencies"]
    ray = next(re.search(r"==(\S+)", d) for d in deps if d.startswith("ray["))
    torch = next(re.search(r"==(\S+)", d) for d in deps if d.startswith("torch=="))
    assert ray and torch
    return ray.group(1), torch.group(1), PYPROJECT["tool"]["mypy"]["python_version"]


def test_dockerfile_base_image_matches_pyproject() -> None:
    ins = _instructions((ROOT / "Dockerfile").read_text())
    ray_pin, torch_pin, python = _pins()
    first_from = next(i for i, (w, _) in enumerate(ins) if w == "FROM")
    args = dict(rest.split("=", 1) for w, rest in ins[:first_from] if w == "ARG" and "=" in rest)
    assert args["RAY_VERSION"] == ray_pin
    assert args["PYTHON_TAG"] == "py" + python.replace(".", "")
    assert args["RAY_VARIANT"] == "gpu"
    base = ins[first_from][1]
    assert base == "rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-${RAY_VARIANT}"

    def tag(variant: str) -> str:
        return re.sub(r"\$\{(\w+)\}", lambda m: {**args, "RAY_VARIANT": variant}[m.group(1)], base)

    assert tag("gpu") == f"rayproject/ray:{ray_pin}-py311-gpu" and tag("cpu").endswith(f"{ray_pin}-py311-cpu")
    later_args = dict(rest.split("=", 1) for w, rest in ins[first_from:] if w == "ARG" and "=" in rest)
    assert later_args["TORCH_VERSION"] == torch_pin


def test_declared_python_versions_agree_with_the_tested_one() -> None:
    """requires-python, ruff's and mypy's target and the image's Python (checked above) name one
    version, and the tests run on it: the lowest version the project claims is the tested one."""
    python = PYPROJECT["tool"]["mypy"]["python_version"]
    assert PYPROJECT["project"]["requires-python"] == f">={python}"
    assert PYPROJECT["tool"]["ruff"]["target-version"] == "py" + python.replace(".", "")
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert running == python, f"tests run on Python {running}, the project declares {python}"


def test_dockerfile_runs_as_non_root_and_names_existing_files() -> None:
    text = (ROOT / "Dockerfile").read_text()
    ins = _instructions(text)
    users = [rest for w, rest in ins if w == "USER"]
    assert users and users[-1] == "ray"
    for w, rest in ins:
        if w == "COPY":
            srcs = [s for s in rest.split() if not s.startswith("--")][:-1]
            for s in srcs:
                assert (ROOT / s).exists(), f"COPY source {s} does not exist"
        if w == "RUN" and "pip install" in rest:
            for extra in re.findall(r'"\.\[([\w,]+)\]"', rest):
                for e in extra.split(","):
                    assert e in PYPROJECT["project"]["optional-dependencies"], e
    cmd = json.loads(next(rest for w, rest in ins if w == "CMD"))
    assert cmd[0] == "python"
    assert all((ROOT / a).is_file() for a in cmd if "/" in a), cmd
    # Files that the usage examples in the comments name.
    for path in sorted(set(re.findall(r"\b((?:ray_jobs|configs|bench)/[\w./-]+\.(?:py|yaml))", text))):
        if path == "configs/serve.yaml" and not (ROOT / "serve_app").is_dir():
            continue  # part of the Serve app, which lives in serve_app/
        assert (ROOT / path).is_file(), f"the Dockerfile names {path}, which does not exist"
    assert not any(w == "EXPOSE" and "8265" in rest for w, rest in ins), "never expose the dashboard"


def test_dockerignore_keeps_data_and_environments_out() -> None:
    entries = {
        ln.strip().rstrip("/")
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    }
    assert {"data", "runs", "models", ".venv", ".git", "wandb"} <= entries


# ---------------------------------------------------------------- cluster config


def _cluster() -> dict[str, Any]:
    cfg: dict[str, Any] = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    return cfg


def test_cluster_yaml_passes_ray_autoscaler_validation() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(_cluster()))
    validate_config(prepared)  # raises on any schema or consistency error

    broken = copy.deepcopy(_cluster())
    broken["available_node_types"]["ray_worker_gpu"]["min_workers"] = 99
    with pytest.raises(ValueError, match="max_workers"):
        validate_config(prepare_config(broken))
    typo = copy.deepcopy(_cluster())
    typo["docker"]["imag"] = "x"
    with pytest.raises(Exception, match="imag"):
        validate_config(prepare_config(typo))


def test_cluster_yaml_cpu_head_gpu_workers_project_image_private_dashboard() -> None:
    cfg = _cluster()
    assert cfg["provider"]["type"] == "gcp"
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert "GPU" not in head.get("resources", {}) and "guestAccelerators" not in head["node_config"]
    gpu = [
        t for name, t in types.items() if name != cfg["head_node_type"] and t["resources"].get("GPU", 0) > 0
    ]
    assert gpu and all(t.get("min_workers", 0) < t["max_workers"] for t in gpu), "GPU workers must autoscale"
    version = PYPROJECT["project"]["version"]
    assert cfg["docker"]["image"].endswith(f"/rayvit:{version}-gpu")
    assert cfg["docker"]["head_image"].endswith(f"/rayvit:{version}-cpu")
    assert cfg["file_mounts"] and cfg["setup_commands"]
    text = (ROOT / "cluster.yaml").read_text()
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in text and "firewall" not in text.replace("no firewall rule", "")


def test_cluster_yaml_bucket_set_once_idle_head_workers_from_zero_reach_the_full_recipe(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ray.serve.schema import ServeDeploySchema

    from rayvit.config import load_config
    from rayvit.deploy import STORAGE_ENV, serve_config, storage_from_cluster_yaml

    cfg = _cluster()
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"]["CPU"] == 0, "the head runs no training"
    workers = [t for name, t in types.items() if name != cfg["head_node_type"]]
    assert workers and all(t["min_workers"] == 0 for t in workers)
    recipe = load_config(ROOT / "configs" / "train.yaml")
    full = [
        t
        for t in workers
        if t["resources"].get("GPU", 0) * t["max_workers"] >= 8
        and t["resources"]["CPU"] >= t["resources"]["GPU"] * recipe.scaling.cpus_per_worker
    ]
    assert full, "a worker type reaches 8 GPUs with the recipe's CPUs per GPU"

    # The bucket: written once, given to every node, used by the job's output_dir and by serving.
    text = (ROOT / "cluster.yaml").read_text()
    assert text.count(f"{STORAGE_ENV}=") == 1
    storage = storage_from_cluster_yaml()
    assert storage.startswith("gs://") and f"--env {STORAGE_ENV}={storage}" in cfg["docker"]["run_options"]
    monkeypatch.setenv(STORAGE_ENV, storage)
    output_dir = load_config(ROOT / "configs" / "train.yaml").output_dir
    assert output_dir == f"{storage}/vit-b16-cifar10"
    serve = serve_config(storage)
    ServeDeploySchema.model_validate(serve)
    assert serve["applications"][0]["args"]["model_dir"] == f"{output_dir}/best"
    assert serve["http_options"]["host"] == "127.0.0.1"
    monkeypatch.delenv(STORAGE_ENV)
    assert load_config(ROOT / "configs" / "train.yaml").output_dir == "runs/vit-b16-cifar10"


# ---------------------------------------------------------------- quality gates and tooling


def test_gates_config_ci_precommit_makefile() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert "set -euo pipefail" in ci and '".[dev,ops]"' in ci
    for gate in ("ruff check .", "ruff format --check .", "mypy"):
        assert gate in ci
    run([sys.executable, "-m", "pre_commit", "validate-config", ".pre-commit-config.yaml"], ROOT)
    hooks = {
        h["id"]
        for r in yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())["repos"]
        for h in r["hooks"]
    }
    assert {"ruff", "ruff-format", "mypy"} <= hooks
    if shutil.which("make"):
        for target in (
            "install",
            "test",
            "test-full",
            "lint",
            "train-quick",
            "serve",
            "bench",
            "data",
            "repro",
        ):
            run(["make", "-n", target], ROOT)
        assert run(["make", "-n", "test"], ROOT).stdout.strip().endswith("-m pytest")
        assert run(["make", "-n", "test-full"], ROOT).stdout.strip().endswith("-m pytest --full")
    mypy_files = PYPROJECT["tool"]["mypy"]["files"]
    assert {"rayvit", "ray_jobs", "tests"} <= set(mypy_files)
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert any(d.startswith("dvc[gs]") for d in extras["ops"]) and any(
        d.startswith("pre-commit") for d in extras["dev"]
    )


# ---------------------------------------------------------------- the whole pipeline


@pytest.mark.slow
def test_dvc_repro_whole_pipeline_and_model_roundtrip(tmp_path: Path) -> None:
    """prepare -> train (real Ray Train, tiny model) -> evaluate, then the model through the remote."""
    repo = make_repo(tmp_path, train_rows=200, test_rows=100)
    quick = yaml.safe_load((repo / "configs" / "quick.yaml").read_text())
    quick["data"].update(train_limit=160, val_limit=40)
    quick["model"]["arch"].update(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    quick["train"].update(epochs=2, batch_size=32, eval_batch_size=100)
    quick["scaling"].update(num_workers=1, cpus_per_worker=1)
    quick["ray"] = {"num_cpus": 2}
    (repo / "configs" / "quick.yaml").write_text(yaml.safe_dump(quick, sort_keys=False))

    out = dvc(repo, "repro", timeout=600)
    for stage in ("prepare", "train", "evaluate"):
        assert f"Running stage '{stage}'" in out.stdout, out.stdout
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"prepare", "train", "evaluate"}
    assert lock["stages"]["train"]["params"]["configs/quick.yaml"]["train"]["epochs"] == 2

    metrics = json.loads((repo / "reports" / "metrics.json").read_text())
    assert metrics["num_test"] == 100
    # the reported accuracy is the one the per-image confusion rows give
    with (repo / "reports" / "confusion.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 100
    assert metrics["test_accuracy"] == pytest.approx(sum(r["actual"] == r["predicted"] for r in rows) / 100)
    assert metrics["data"]["fingerprint"] == lock_md5(repo, "prepare", "data/cifar10")
    exported = json.loads((repo / "models" / "quick" / "best" / "metrics.json").read_text())
    assert metrics["test_accuracy"] == pytest.approx(exported["test_accuracy"])
    curve = (repo / "reports" / "training_curve.csv").read_text().splitlines()
    assert curve[0] == "epoch,train_loss,val_loss,val_accuracy" and len(curve) == 3
    assert len((repo / "reports" / "confusion.csv").read_text().splitlines()) == 101
    shown = json.loads(dvc(repo, "metrics", "show", "--json").stdout)
    assert shown
    plots = json.loads(dvc(repo, "plots", "show", "--json").stdout)
    assert "Confusion matrix (test)" in plots["data"]

    # The model folder travels through the offline remote like the data.
    dvc(repo, "push", "-r", "local")
    best = repo / "models" / "quick" / "best"
    before = tree_sha256(best)
    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(best)
    dvc(repo, "pull", "-r", "local", "train")
    assert tree_sha256(best) == before
    from rayvit.checkpoint import check_model_folder

    check_model_folder(best)
    # The data stayed in the workspace (only the cache went), so training and evaluation are current.
    assert "Data and pipelines are up to date" in dvc(repo, "status", "train", "evaluate").stdout
    dvc(repo, "pull", "-r", "local")
    assert "Data and pipelines are up to date" in dvc(repo, "status").stdout
