"""The training job on a multi-node autoscaling cluster, its output in an S3 bucket.

The head offers no CPUs, worker nodes scale from zero; the job is submitted through the job
API, like ``ray job submit``. Storage is a moto S3 server on 127.0.0.1, reached through the
same pyarrow filesystem code that ``gs://`` uses.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cluster_support import (
    S3_ENV,
    FakeCluster,
    S3Server,
    s3_server,  # noqa: F401  # a fixture
    start_fake_cluster,
    stop_fake_cluster,
    submit_job,
    wait_for_job,
)
from conftest import ROOT, TINY, run_train_cli
from support import bad_image_files, untrained_model_folder, write_cifar_imagefolder

from rayvit.storage import Storage

pytestmark = pytest.mark.slow

BUCKET_PREFIX = "jobs/quick"


@pytest.fixture(scope="module")
def fake_cluster(s3_server: S3Server) -> Iterator[FakeCluster]:  # noqa: F811
    # 2 CPUs a node: one trial's two 0.5-CPU workers fit on one (node types take whole CPUs).
    cluster = start_fake_cluster(worker_cpus=2, max_workers=2, extra_env={**S3_ENV}, autoscaler_v2=True)
    try:
        yield cluster
    finally:
        stop_fake_cluster(cluster.temp_dir)


def _submit_and_wait(
    cluster: FakeCluster, s3: S3Server, timeout: float = 900, while_running: Callable[[], None] | None = None
) -> tuple[str, str]:
    overrides = [o for o in TINY if not o.startswith("ray.")]
    entrypoint = " ".join(
        [
            f"python {ROOT / 'ray_jobs' / 'train.py'} --config {ROOT / 'configs' / 'quick.yaml'}",
            *overrides,
            "'tune.lrs=[1e-3,3e-3]'",
            "tune.max_concurrent_trials=2",
            f"output_dir=s3://{s3.bucket}/{BUCKET_PREFIX}",
            f"storage.endpoint_url={s3.endpoint}",
        ]
    )
    job_id = submit_job(cluster, entrypoint)
    run = wait_for_job(cluster, job_id, timeout, while_running)
    assert run.status == "SUCCEEDED", run.logs[-4000:]
    return job_id, run.logs


def test_batch_prediction_runs_on_autoscaled_nodes_from_bucket_to_bucket(
    fake_cluster: FakeCluster,
    s3_server: S3Server,  # noqa: F811
    tmp_path: Path,
) -> None:
    """``ray_jobs/predict.py`` through the job API: model and images in the bucket, the model
    actors on worker nodes the autoscaler starts, the predictions back in the bucket; then the
    idle nodes are removed again, within seconds.

    This module's first job: after a training job the nodes stay until Ray Train's resource
    request with the autoscaler expires (up to 180 s, Ray's constant; measured 131-147 s)."""
    bucket = Storage.from_setting(f"s3://{s3_server.bucket}/batch", s3_server.endpoint)
    bucket.upload_dir(untrained_model_folder(tmp_path / "model"), "model")
    write_cifar_imagefolder(tmp_path / "in", "test", 60)
    (tmp_path / "in" / "test" / "cat" / "truncated.png").write_bytes(bad_image_files()["truncated.png"])
    bucket.upload_dir(tmp_path / "in", "in", last=None)
    entrypoint = " ".join(
        [
            f"python {ROOT / 'ray_jobs' / 'predict.py'}",
            f"--model-dir {bucket.uri('model')} --input {bucket.uri('in')} --output {bucket.uri('out')}",
            f"endpoint_url={s3_server.endpoint} cache_dir={tmp_path / 'cache'}",
            "'concurrency=[1,1]' actor_cpus=0.5 decode_cpus=0.5",
        ]
    )
    run = wait_for_job(fake_cluster, submit_job(fake_cluster, entrypoint), timeout=600)
    assert run.status == "SUCCEEDED", run.logs[-4000:]
    assert "done: 61 images" in run.logs and "1 errors" in run.logs, run.logs[-2000:]
    summary = json.loads(s3_server.get("batch/out/summary.json"))
    assert summary["rows"] == 61 and summary["errors"] == 1 and "accuracy" in summary
    assert any(k.startswith("batch/out/predictions/part-") for k in s3_server.keys("batch/out/"))
    (head,) = [n["node_id"] for n in fake_cluster.nodes() if n["is_head_node"]]
    # No GPUs: decoding is fused into the model actors' tasks.
    actors = fake_cluster.actors("MapWorker(MapBatches(_decode)->MapBatches(PredictBatch))")
    assert actors and head not in {a["node_id"] for a in actors}, actors
    print(
        f"\nbatch prediction on the fake cluster: {run.duration_s:.0f}s, {summary['images_per_s']} images/s"
    )

    # Idle worker nodes are removed again (the autoscaler's idle timeout is 6 s here).
    t0 = time.time()
    alive = fake_cluster.wait_for_no_worker_nodes(60)
    assert not alive, f"worker nodes still up: {[n['node_id'][-5:] for n in alive]}"
    print(f"worker nodes removed {time.time() - t0:.0f}s after the job")


def test_job_on_autoscaling_cluster_writes_to_bucket_and_resumes(
    fake_cluster: FakeCluster,
    s3_server: S3Server,  # noqa: F811
) -> None:
    head = [n for n in fake_cluster.nodes() if n["is_head_node"]]
    assert len(head) == 1 and not fake_cluster.worker_nodes_alive()  # (the last test's are gone)
    head_id = head[0]["node_id"]

    # The trials' worker groups seen training at once: placement group -> its live workers' nodes.
    together: list[dict[str, list[str]]] = []

    def sample() -> None:
        alive = [a for a in fake_cluster.actors("RayTrainWorker") if a["state"] == "ALIVE"]
        groups: dict[str, list[str]] = {}
        for a in alive:
            groups.setdefault(a["placement_group_id"], []).append(a["node_id"])
        if not together and len(groups) >= 2 and all(len(nodes) == 2 for nodes in groups.values()):
            together.append(groups)

    _, logs = _submit_and_wait(fake_cluster, s3_server, while_running=sample)
    assert "exported: s3://" in logs
    assert "2 worker(s) per trial (global batch 64), up to 2 trial(s) at once" in logs, logs[-3000:]

    # The autoscaler launched worker nodes, and every trainer ran on them.
    workers = fake_cluster.worker_nodes_alive()
    assert workers, "the autoscaler launched no worker node"
    trainers = fake_cluster.actors("RayTrainWorker")
    assert len(trainers) >= 4  # 2 trials x 2 workers
    per_node = Counter(a["node_id"] for a in trainers)
    assert head_id not in per_node, per_node
    assert set(per_node) <= {n["node_id"] for n in workers}
    print(f"\nnodes: head ...{head_id[-5:]} + {len(workers)} worker node(s); RayTrainWorker actors per node:")
    for node_id, count in sorted(per_node.items()):
        print(f"  ...{node_id[-5:]}: {count}")
    # Both trials trained at the same time, each with the sweep's 2 workers (so the same global
    # batch) packed onto one node.
    assert together, "the two trials never trained at the same time"
    groups = together[0]
    assert len(groups) == 2 and all(len(nodes) == 2 for nodes in groups.values()), groups
    assert all(len(set(nodes)) == 1 for nodes in groups.values()), groups
    print(
        "trials at once, workers per node:",
        [f"...{nodes[0][-5:]} x{len(nodes)}" for nodes in groups.values()],
    )

    # Everything of the run is in the bucket.
    keys = s3_server.keys(BUCKET_PREFIX)
    assert any("/trials/" in k and "/checkpoint_" in k and k.endswith("model.safetensors") for k in keys)
    assert f"{BUCKET_PREFIX}/sweep.csv" in keys
    assert f"{BUCKET_PREFIX}/sweep/" in "".join(k[: len(BUCKET_PREFIX) + 7] for k in keys)
    metrics = json.loads(s3_server.get(f"{BUCKET_PREFIX}/best/metrics.json"))
    assert metrics["sweep"]["trials"] == 2
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "config.yaml"):
        assert f"{BUCKET_PREFIX}/best/{name}" in keys
    # ... and nothing of it on a local disk (the job's working copy or the cluster's folders).
    local = [p for p in (*fake_cluster.temp_dir.rglob("sweep.csv"), *ROOT.glob("s3*")) if p.exists()]
    assert not local, local

    # A second submission finds the finished job in the bucket and trains nothing.
    _, again = _submit_and_wait(fake_cluster, s3_server, timeout=300)
    assert "already finished: s3://" in again
    assert "epoch 1/1" not in again
    assert json.loads(s3_server.get(f"{BUCKET_PREFIX}/best/metrics.json")) == metrics


def test_unreachable_storage_fails_fast_naming_output_dir(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{_closed_port()}"
    t0 = time.monotonic()
    proc = run_train_cli([*TINY, "output_dir=s3://nowhere/run", f"storage.endpoint_url={dead}"], timeout=120)
    took = time.monotonic() - t0
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: output_dir: cannot write to s3://nowhere/run")
    assert took < 30, took


def test_unwritable_output_dir_fails_naming_it(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    proc = run_train_cli([*TINY, f"output_dir={blocker}/run"], timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().startswith(f"error: output_dir: cannot write to {blocker}/run")


def _closed_port() -> int:
    from support import free_port

    return free_port()
