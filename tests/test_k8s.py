"""KubeRay manifests (k8s/): Ray's Serve schema, Kubernetes pod schemas, the documented command, the recipe.

Unit tests: no Kubernetes cluster and no Ray cluster. Pod templates are checked against the
Kubernetes OpenAPI schemas that ``kubernetes-validate`` ships (offline, strict: unknown fields fail).
"""

from __future__ import annotations

import copy
import re
import shlex
import subprocess
import sys
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from conftest import ROOT
from pydantic import BaseModel
from ray.serve.schema import ServeDeploySchema

from rayvit import deploy
from rayvit.config import load_config

K8S = ROOT / "k8s"
DOCS = ROOT / "docs" / "cluster.md"
#: Kubernetes version the pod templates are checked against (a current GKE release).
K8S_VERSION = "1.33"
#: The full recipe's largest worker group: one training worker per GPU on up to 8 GPUs.
FULL_RECIPE_GPUS = 8
STORAGE_REF = {"configMapKeyRef": {"name": "rayvit-storage", "key": deploy.STORAGE_ENV}}


def _load(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((K8S / name).read_text())
    return doc


def _cluster_spec(manifest: dict[str, Any]) -> dict[str, Any]:
    spec = manifest["spec"]
    out: dict[str, Any] = spec.get("rayClusterSpec") or spec["rayClusterConfig"]
    return out


def _pod_templates(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = _cluster_spec(manifest)
    return [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]


def _quantity(q: str | int) -> float:
    """A Kubernetes CPU/GPU quantity ("8", "500m") as a number."""
    s = str(q)
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


def _gpu_group(manifest: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The worker group with GPUs and the limits of its Ray container."""
    (group,) = [
        g
        for g in _cluster_spec(manifest)["workerGroupSpecs"]
        if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]
    ]
    resources = group["template"]["spec"]["containers"][0]["resources"]
    assert resources["requests"] == resources["limits"], "guaranteed pods: requests equal limits"
    return group, resources["limits"]


def documented_job_commands(text: str) -> list[str]:
    """The commands after `--` of every `ray job submit` in ``text`` (continuation lines joined)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [m.group(1).strip() for m in re.finditer(r"ray job submit [^\n]*? -- ([^\n#`]+)", joined)]


# ---------------------------------------------------------------- Serve config


def _unknown_keys(model: type[BaseModel], data: Any, where: str = "") -> list[str]:
    """Keys of ``data`` that are no field of ``model`` (Ray's Serve schema accepts and ignores them)."""
    if not isinstance(data, dict):
        return []
    unknown: list[str] = []
    for key, value in data.items():
        field = model.model_fields.get(key)
        if field is None:
            unknown.append(f"{where}{key}")
            continue
        for sub in _models_in(field.annotation):
            items = value if isinstance(value, list) else [value]
            for i, item in enumerate(items):
                unknown += _unknown_keys(
                    sub, item, f"{where}{key}[{i}]." if isinstance(value, list) else f"{where}{key}."
                )
    return unknown


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is not None:
        return [m for a in typing.get_args(annotation) for m in _models_in(a)]
    return []


def _serve_config_v2() -> dict[str, Any]:
    cfg: dict[str, Any] = yaml.safe_load(_load("rayservice.yaml")["spec"]["serveConfigV2"])
    return cfg


def test_rayservice_serve_config_validates_with_ray_serve_schema() -> None:
    cfg = _serve_config_v2()
    schema = ServeDeploySchema.model_validate(cfg)
    assert _unknown_keys(ServeDeploySchema, cfg) == []
    (app,) = schema.applications
    assert app.import_path == "serve_app:app"
    assert schema.http_options.host == "0.0.0.0", "KubeRay's Service reaches the proxy on the pod's address"

    bad = copy.deepcopy(cfg)
    bad["applications"][0]["deployments"][0]["ray_actor_options"]["num_gpus"] = -1
    with pytest.raises(ValueError, match="num_gpus"):
        ServeDeploySchema.model_validate(bad)
    typo = copy.deepcopy(cfg)
    typo["applications"][0]["deployments"][0]["max_ongoing_request"] = 1
    assert _unknown_keys(ServeDeploySchema, typo) == ["applications[0].deployments[0].max_ongoing_request"]


def test_rayservice_serve_config_is_generated_from_serve_yaml_and_storage() -> None:
    text = (K8S / "rayservice.yaml").read_text()
    storage = deploy.storage_from_k8s()
    assert deploy.render_rayservice(text, storage) == text, "run: python -m rayvit.deploy"
    cfg = _serve_config_v2()
    serve_yaml = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
    # Everything but the model, the listening address and the replica resources is configs/serve.yaml.
    (app,) = cfg["applications"]
    (src_app,) = serve_yaml["applications"]
    assert app["args"]["model_dir"] == f"{storage}/vit-b16-cifar10/best"
    assert {k: v for k, v in app.items() if k not in ("args", "deployments")} == {
        k: v for k, v in src_app.items() if k not in ("args", "deployments")
    }
    for dep, src in zip(app["deployments"], src_app["deployments"], strict=True):
        assert dep["ray_actor_options"]["num_gpus"] == 1
        assert {k: v for k, v in dep.items() if k != "ray_actor_options"} == {
            k: v for k, v in src.items() if k != "ray_actor_options"
        }

    # A stale manifest (another model, an edited setting) is rewritten; the rest of the file is kept.
    stale = text.replace("model_dir: gs://", "model_dir: s3://").replace(
        "max_batch_size: 32", "max_batch_size: 8"
    )
    assert stale != text and deploy.render_rayservice(stale, storage) == text
    other = deploy.render_rayservice(text, "s3://elsewhere/prefix")
    assert "model_dir: s3://elsewhere/prefix/vit-b16-cifar10/best" in other
    assert other.replace("s3://elsewhere/prefix", storage) == text

    check = subprocess.run(
        [sys.executable, "-m", "rayvit.deploy", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stderr


def test_rayservice_gpu_replicas_fit_the_worker_group() -> None:
    manifest = _load("rayservice.yaml")
    (dep,) = _serve_config_v2()["applications"][0]["deployments"]
    group, limits = _gpu_group(manifest)
    per_pod = _quantity(limits["nvidia.com/gpu"]) // dep["ray_actor_options"]["num_gpus"]
    assert per_pod >= 1 and _quantity(limits["cpu"]) >= per_pod * dep["ray_actor_options"]["num_cpus"]
    assert (
        group["minReplicas"] == 0
        and group["maxReplicas"] * per_pod >= dep["autoscaling_config"]["max_replicas"]
    )
    assert _cluster_spec(manifest)["enableInTreeAutoscaling"] is True
    head = _cluster_spec(manifest)["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert ports["serve"] == _serve_config_v2()["http_options"]["port"]


# ---------------------------------------------------------------- pod templates


@pytest.mark.parametrize("name", ["rayjob.yaml", "rayservice.yaml", "rayjob-predict.yaml"])
def test_pod_templates_validate_as_kubernetes_pod_templates(name: str) -> None:
    manifest = _load(name)
    assert manifest["apiVersion"] == "ray.io/v1"
    templates = _pod_templates(manifest)
    assert len(templates) >= 2
    for i, template in enumerate(templates):
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"t{i}"}}
        kubernetes_validate.validate({**pod_template, "template": template}, K8S_VERSION, strict=True)

        broken = copy.deepcopy(template)
        broken["spec"]["containers"][0]["resources"]["limit"] = {"cpu": "1"}
        with pytest.raises(kubernetes_validate.ValidationError, match="limit"):
            kubernetes_validate.validate({**pod_template, "template": broken}, K8S_VERSION, strict=True)


def test_storage_manifest_validates_and_every_pod_reads_the_one_bucket_setting() -> None:
    docs = [d for d in yaml.safe_load_all((K8S / "storage.yaml").read_text()) if d]
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    assert {d["kind"] for d in docs} == {"ConfigMap", "ServiceAccount"}
    storage = deploy.storage_from_k8s()
    assert re.fullmatch(r"(gs|s3)://[\w.-]+(/[\w.-]+)*", storage), storage
    account = next(d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount")
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for name in ("rayjob.yaml", "rayservice.yaml", "rayjob-predict.yaml"):
        text = (K8S / name).read_text()
        assert "gs://" not in text.replace(f"model_dir: {storage}/", ""), (
            f"{name}: the bucket belongs in storage.yaml"
        )
        assert "LoadBalancer" not in text, "dashboard and Serve stay inside the cluster"
        for template in _pod_templates(_load(name)):
            spec = template["spec"]
            assert spec["serviceAccountName"] == account
            for container in spec["containers"]:
                env = {e["name"]: e for e in container["env"]}
                assert env[deploy.STORAGE_ENV]["valueFrom"] == STORAGE_REF
                assert container["workingDir"] == "/home/ray/app" == env["PYTHONPATH"]["value"]
                assert re.search(rf"/rayvit:{version}-(cpu|gpu)$", container["image"]), container["image"]


# ---------------------------------------------------------------- the training job


def test_rayjob_entrypoint_is_the_documented_job_command() -> None:
    manifest = _load("rayjob.yaml")
    assert manifest["kind"] == "RayJob"
    documented = documented_job_commands(DOCS.read_text())
    in_cluster_yaml = documented_job_commands((ROOT / "cluster.yaml").read_text())
    assert documented and in_cluster_yaml, "docs/cluster.md and cluster.yaml show the job submission"
    entrypoint = manifest["spec"]["entrypoint"]
    assert entrypoint == documented[0] == in_cluster_yaml[0]
    assert (ROOT / entrypoint.split()[1]).is_file()
    assert documented_job_commands(
        "ray job submit --address X --working-dir . -- \\\n    python a.py k=v\n"
    ) == ["python a.py k=v"]


def test_rayjob_resources_match_the_full_recipe(monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = _load("rayjob.yaml")
    spec = manifest["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = _cluster_spec(manifest)
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", "the head runs no training"
    head_limits = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in head_limits
    assert all(g["minReplicas"] == 0 == g["replicas"] for g in cluster["workerGroupSpecs"])

    recipe = load_config(ROOT / "configs" / "train.yaml")
    assert recipe.scaling.use_gpu in ("auto", True) and recipe.train.precision in ("auto", "bf16")
    group, limits = _gpu_group(manifest)
    gpus = int(_quantity(limits["nvidia.com/gpu"]))
    assert gpus * group["maxReplicas"] >= FULL_RECIPE_GPUS
    # One training worker per GPU, each with the recipe's CPUs for data decoding.
    assert _quantity(limits["cpu"]) >= gpus * recipe.scaling.cpus_per_worker
    workers: Any = recipe.scaling.num_workers
    if workers != "auto":
        assert max(workers if isinstance(workers, list) else [workers]) <= gpus * group["maxReplicas"]

    # The job's output follows the pods' RAYVIT_STORAGE.
    monkeypatch.setenv(deploy.STORAGE_ENV, deploy.storage_from_k8s())
    assert (
        load_config(ROOT / "configs" / "train.yaml").output_dir
        == f"{deploy.storage_from_k8s()}/vit-b16-cifar10"
    )


# ---------------------------------------------------------------- batch prediction


def test_predict_rayjob_is_the_documented_command_and_fits_its_gpu_group(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from rayvit.batch_predict import parse_argv

    manifest = _load("rayjob-predict.yaml")
    assert manifest["kind"] == "RayJob" and manifest["spec"]["shutdownAfterJobFinishes"] is True
    entrypoint = manifest["spec"]["entrypoint"]
    assert entrypoint in documented_job_commands((ROOT / "docs" / "batch.md").read_text())
    storage = deploy.storage_from_k8s()
    argv = shlex.split(entrypoint.replace("$RAYVIT_STORAGE", storage))
    assert argv[:2] == ["python", "ray_jobs/predict.py"] and (ROOT / argv[1]).is_file()
    cfg = parse_argv(argv[2:])
    # The model is the one the training job (k8s/rayjob.yaml) exports to the same bucket.
    monkeypatch.setenv(deploy.STORAGE_ENV, storage)
    assert cfg.model_dir == load_config(ROOT / "configs" / "train.yaml").output_dir + "/best"
    assert cfg.input.startswith(storage) and cfg.output.startswith(storage)
    cluster = _cluster_spec(manifest)
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", "the head runs no actor"
    group, limits = _gpu_group(manifest)
    gpus, cpus = _quantity(limits["nvidia.com/gpu"]), _quantity(limits["cpu"])
    assert cfg.num_gpus is not None and 0 < cfg.num_gpus <= gpus
    per_pod = int(gpus / cfg.num_gpus)
    assert cfg.concurrency[1] <= per_pod * group["maxReplicas"], "every actor the pool may start fits"
    assert per_pod * cfg.actor_cpus + cfg.decode_cpus <= cpus, "room for a decode task beside the actors"


def test_deploy_cli_errors_name_the_setting(tmp_path: Path) -> None:
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    cluster["docker"]["run_options"] = [
        o for o in cluster["docker"]["run_options"] if deploy.STORAGE_ENV not in o
    ]
    bad = tmp_path / "cluster.yaml"
    bad.write_text(yaml.safe_dump(cluster))
    proc = subprocess.run(
        [sys.executable, "-m", "rayvit.deploy", "--serve-config", str(bad)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"error: {bad}: docker.run_options must set --env {deploy.STORAGE_ENV}=URI exactly once"
    ]
