"""A local S3-compatible server and a local autoscaling Ray cluster, for the cluster tests.

The cluster is Ray's fake multi-node autoscaler (provider ``fake_multinode``, as in Ray's
own autoscaler tests): ``ray start --head --autoscaling-config`` with ``RAY_FAKE_CLUSTER=1``;
worker "nodes" are raylets on this machine that the autoscaler launches and removes. Unlike
``ray.cluster_utils.AutoscalingCluster.start`` (which runs ``ray stop --force``, ending every
Ray cluster on the machine) it has its own temp folder and ports and stops only its own
processes. Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import cmdline_has, kill_processes
from support import free_port as free_port

FIXTURES = Path(__file__).resolve().parent / "fixtures"
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass
class S3Server:
    endpoint: str
    bucket: str

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, **_boto_credentials())

    def keys(self, prefix: str = "") -> list[str]:
        return list(self.sizes(prefix))

    def sizes(self, prefix: str = "") -> dict[str, int]:
        """Every key under ``prefix`` and its size in bytes."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}

    def get(self, key: str) -> bytes:
        body: bytes = self.client().get_object(Bucket=self.bucket, Key=key)["Body"].read()
        return body


def _boto_credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": S3_ENV["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": S3_ENV["AWS_SECRET_ACCESS_KEY"],
        "region_name": S3_ENV["AWS_DEFAULT_REGION"],
    }


@pytest.fixture(scope="module")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 server (what Ray's own storage tests use) on 127.0.0.1, with one bucket."""
    from moto.server import ThreadedMotoServer

    for key, value in S3_ENV.items():
        os.environ.setdefault(key, value)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    s3 = S3Server(f"http://127.0.0.1:{port}", "rayvit-test")
    s3.client().create_bucket(Bucket=s3.bucket)
    yield s3
    server.stop()


@dataclass
class FakeCluster:
    """A running head of the fake autoscaling cluster."""

    api: str
    """The dashboard / job API address."""
    gcs: str
    """The GCS address (what ``ray.init(address=...)`` takes)."""
    temp_dir: Path
    env: dict[str, str]

    def nodes(self) -> list[dict[str, Any]]:
        from ray.util.state import list_nodes

        return [_as_dict(n) for n in list_nodes(address=self.api, detail=True, limit=10_000)]

    def worker_nodes_alive(self) -> list[dict[str, Any]]:
        return [n for n in self.nodes() if not n["is_head_node"] and n["state"] == "ALIVE"]

    def wait_for_no_worker_nodes(self, timeout: float) -> list[dict[str, Any]]:
        """Poll until the autoscaler has removed every worker node (or ``timeout``); the worker
        nodes still up (the autoscaler's idle timeout here is 6 s)."""
        deadline = time.time() + timeout
        while (alive := self.worker_nodes_alive()) and time.time() < deadline:
            time.sleep(2)
        return alive

    def actors(self, class_name: str) -> list[dict[str, Any]]:
        from ray.util.state import list_actors

        found = list_actors(
            address=self.api, filters=[("class_name", "=", class_name)], limit=10_000, detail=True
        )
        return [_as_dict(a) for a in found]


def _as_dict(item: Any) -> dict[str, Any]:
    return dict(vars(item)) if hasattr(item, "__dict__") else {str(k): v for k, v in item.items()}


#: The fake head's node id, which the fake provider (and autoscaler v2) expect.
FAKE_HEAD_NODE_ID = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"


def dashboard_up(api: str, timeout_s: float = 120) -> bool:
    """Wait until a head's dashboard (and job API) at ``api`` answers."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{api}/api/version", timeout=2)
            return True
        except OSError:
            time.sleep(1)
    return False


def _install_provider_defaults() -> None:
    """Ray's autoscaler fills a ``fake_multinode`` config from the provider's defaults file,
    which Ray's pip wheel does not ship; ours (every key the autoscaler needs) stands in."""
    import ray.autoscaler._private.fake_multi_node as fake

    target = Path(fake.__file__).parent / "example.yaml"
    if not target.is_file():
        target.write_text((FIXTURES / "fake_multinode.yaml").read_text())


def start_fake_cluster(
    worker_cpus: int,
    max_workers: int,
    extra_env: dict[str, str],
    autoscaler_v2: bool = True,
    fixed_nodes: bool = False,
) -> FakeCluster:
    """Autoscaler v2 (as KubeRay runs it) reports its node types to the GCS, so a job can
    tell what the cluster can grow to.

    ``fixed_nodes``: no autoscaler; ``max_workers`` worker nodes started by hand (``ray start
    --address``), as on a cluster at its full size, where a lost node is not replaced."""
    _install_provider_defaults()
    bin_dir = Path(sys.executable).parent
    gcs_port, dash_port = free_port(), free_port()
    config = yaml.safe_load((FIXTURES / "fake_multinode.yaml").read_text())
    config["provider"]["gcs_address"] = f"127.0.0.1:{gcs_port}"
    config["max_workers"] = max_workers
    worker = config["available_node_types"]["cpu_worker"]
    worker["resources"]["CPU"] = worker_cpus
    worker["max_workers"] = max_workers
    temp_dir = Path(tempfile.mkdtemp(prefix="rvt"))  # short: Ray's socket paths live under it
    env = {
        **os.environ,
        **extra_env,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "RAY_FAKE_CLUSTER": "1",
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        # Every node on 127.0.0.1 (the fake nodes would otherwise take the machine's address).
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "disabled",
    }
    if autoscaler_v2:
        config["provider"]["launch_multiple"] = True
        config["provider"]["head_node_id"] = FAKE_HEAD_NODE_ID
        env.update(
            {
                "RAY_enable_autoscaler_v2": "1",
                "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
                "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID,
            }
        )
    if fixed_nodes:  # nodes joined by hand: each is told its address (127.0.0.1) itself
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "1"
    env.pop("RAY_ADDRESS", None)
    # Ray Train's placement-group cleaner asks the state API whether a run's controller lives:
    # the cluster's processes must ask this cluster's dashboard (on a real head, the default).
    env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dash_port}"
    config_file = temp_dir / "autoscaler.yaml"
    config_file.write_text(json.dumps(config))

    def ray_start(*args: str) -> None:
        # Ports of its own: another cluster on this machine may hold the default ones.
        ports = [
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
        ]
        common = ["--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}", *ports]
        cmd = [str(bin_dir / "ray"), "start", *args, *common]
        subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=180)

    autoscaling = [] if fixed_nodes else [f"--autoscaling-config={config_file}"]
    ray_start(
        "--head",
        *autoscaling,
        "--num-cpus=0",
        f"--port={gcs_port}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash_port}",
    )
    api = f"http://127.0.0.1:{dash_port}"
    if not dashboard_up(api):
        stop_fake_cluster(temp_dir)
        pytest.fail(f"the dashboard at {api} did not come up")
    for _ in range(max_workers if fixed_nodes else 0):
        ray_start(f"--address=127.0.0.1:{gcs_port}", f"--num-cpus={worker_cpus}")
    return FakeCluster(api, f"127.0.0.1:{gcs_port}", temp_dir, env)


def stop_fake_cluster(temp_dir: Path) -> None:
    """SIGKILL every process that belongs to this cluster (its temp folder is in their command
    line); other Ray clusters on the machine are left alone."""
    kill_processes(cmdline_has(str(temp_dir)))
    shutil.rmtree(temp_dir, ignore_errors=True)


def submit_job(cluster: FakeCluster, entrypoint: str, env: dict[str, str] | None = None) -> str:
    """Submit ``entrypoint`` through the job API (as ``ray job submit`` does); its id.

    No working_dir: the fake nodes share one session folder, and a node that no longer needs
    the job's package would delete it under the driver. The project is installed in the
    environment every node runs.
    """
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(cluster.api)
    deadline = time.time() + 120
    while True:  # the head's job agent comes up a little after the dashboard
        try:
            job_id: str = client.submit_job(
                entrypoint=entrypoint, runtime_env={"env_vars": {**S3_ENV, **(env or {})}}
            )
            return job_id
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.time() > deadline:
                raise
            time.sleep(2)


@dataclass
class JobRun:
    """A submitted job once it stopped: its status, logs and wall time on the cluster."""

    status: str
    logs: str
    duration_s: float


def wait_for_job(
    cluster: FakeCluster, job_id: str, timeout: float = 900, while_running: Callable[[], None] | None = None
) -> JobRun:
    """Poll until the job ends (or ``timeout``), calling ``while_running`` at every poll; its
    duration is the job API's own start-to-end time, so the polling does not add to it."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(cluster.api)
    deadline = time.time() + timeout
    info = client.get_job_info(job_id)
    while time.time() < deadline and not info.status.is_terminal():
        if while_running is not None:
            while_running()
        time.sleep(2)
        info = client.get_job_info(job_id)
    end = info.end_time or int(time.time() * 1000)
    return JobRun(info.status.value, client.get_job_logs(job_id), (end - (info.start_time or end)) / 1000)
