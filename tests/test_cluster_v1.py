"""Clusters whose autoscaler is Ray's older v1 (hand-started heads, older KubeRay).

Every Ray head runs the v1 monitor unless autoscaler v2 is on; what tells an autoscaling v1
cluster from a fixed one is the status that monitor writes to the GCS: with a cluster config its
node types are the config's names, without one (a laptop, ``ray start`` by hand) one
``node_<node id>`` type per node, and it adds nothing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from cluster_support import (
    FakeCluster,
    S3Server,
    s3_server,  # noqa: F401  # a fixture
    start_fake_cluster,
    stop_fake_cluster,
    submit_job,
    wait_for_job,
)
from conftest import ROOT, TINY

from rayvit.cluster import FIXED_HINT, Capacity, Placement, _check_fits, classify_v1_status
from rayvit.errors import UserError

HEAD_ID = "f" * 51 + "00000"
NODE_ID = "3a" * 28


def _status(report: dict[str, object]) -> dict[str, object]:
    """The shape of the v1 monitor's ``__autoscaling_status`` (``autoscaler_report`` part)."""
    base: dict[str, object] = {
        "active_nodes": {},
        "idle_nodes": None,
        "pending_nodes": [],
        "pending_launches": {},
        "failed_nodes": [],
        "node_type_mapping": {},
        "legacy": True,
    }
    return {"time": time.time(), "autoscaler_report": {**base, **report}, "load_metrics_report": {}}


def test_a_v1_monitor_with_a_cluster_config_is_an_autoscaler() -> None:
    # a head of the cluster config, no worker yet (as the fake cluster below reports it)
    head_only = _status(
        {"active_nodes": {"ray.head.default": 1}, "node_type_mapping": {HEAD_ID: "ray.head.default"}}
    )
    assert classify_v1_status(head_only) == "v1"
    # a KubeRay worker group being launched
    launching = _status({"active_nodes": {"headgroup": 1}, "pending_launches": {"workergroup": 2}})
    assert classify_v1_status(launching) == "v1"


def test_a_v1_monitor_without_a_config_is_a_fixed_cluster() -> None:
    # a laptop's ray.init() or a hand-started head: the read-only provider, one type per node
    laptop = _status(
        {"active_nodes": {f"node_{NODE_ID}": 1}, "node_type_mapping": {NODE_ID: f"node_{NODE_ID}"}}
    )
    assert classify_v1_status(laptop) is None
    assert classify_v1_status(None) is None  # no monitor has reported (yet)
    assert classify_v1_status({"time": 0.0}) is None  # a monitor without an autoscaler
    assert classify_v1_status(json.loads(json.dumps(_status({})))) is None


def test_a_fixed_cluster_that_cannot_place_says_what_it_found_and_how_to_go_on() -> None:
    cap = Capacity(cpus=0.0, gpus=0, max_cpus_per_node=0.0, autoscaler=None)
    with pytest.raises(UserError) as err:
        _check_fits(Placement(2, False, {"CPU": 0.99}), cap)
    line = str(err.value)
    assert "\n" not in line
    assert line.startswith(
        "scaling.cpus_per_worker=0.99 is more than any node of the Ray cluster has (0 CPUs;"
    )
    assert FIXED_HINT in line and "scaling.check_resources=false" in line


@pytest.fixture(scope="module")
def v1_cluster(s3_server: S3Server) -> Iterator[FakeCluster]:  # noqa: F811
    """The fake autoscaling cluster (head without CPUs, 1-CPU workers from zero) on autoscaler v1."""
    cluster = start_fake_cluster(worker_cpus=1, max_workers=2, extra_env={}, autoscaler_v2=False)
    try:
        yield cluster
    finally:
        stop_fake_cluster(cluster.temp_dir)


@pytest.mark.slow
def test_a_job_on_a_v1_autoscaling_cluster_waits_for_the_nodes_it_adds(
    v1_cluster: FakeCluster,
    s3_server: S3Server,  # noqa: F811
) -> None:
    """The request of issue 19 (two workers of 0.99 CPUs, a head with none): the job no longer
    refuses; the v1 autoscaler adds two worker nodes and the run finishes on them."""
    assert [n for n in v1_cluster.nodes() if not n["is_head_node"]] == []
    overrides = [o for o in TINY if not o.startswith(("ray.", "scaling."))]
    entrypoint = " ".join(
        [
            f"python {ROOT / 'ray_jobs' / 'train.py'} --config {ROOT / 'configs' / 'quick.yaml'}",
            *overrides,
            "scaling.num_workers=2",
            "scaling.cpus_per_worker=0.99",
            f"output_dir=s3://{s3_server.bucket}/v1",
            f"storage.endpoint_url={s3_server.endpoint}",
        ]
    )
    run = wait_for_job(v1_cluster, submit_job(v1_cluster, entrypoint), timeout=900)
    assert run.status == "SUCCEEDED", run.logs[-4000:]
    assert "is more than any node" not in run.logs
    assert f"exported: s3://{s3_server.bucket}/v1/best" in run.logs
    assert "Traceback" not in run.logs
    workers = [n for n in v1_cluster.nodes() if not n["is_head_node"]]
    assert len(workers) >= 2, workers  # one 0.99-CPU worker per 1-CPU node
    trainers = {a["node_id"] for a in v1_cluster.actors("RayTrainWorker")}
    assert len(trainers) == 2 and trainers <= {n["node_id"] for n in workers}
    print(f"\nv1 autoscaler: {len(workers)} worker node(s) added; job took {run.duration_s:.0f}s")
