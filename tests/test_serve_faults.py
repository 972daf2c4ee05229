"""Faults while serving: a replica's process killed under load loses no request; storage down at
replica start gives one clear line and an unhealthy deployment, not a hang."""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from cluster_support import S3_ENV, S3Server
from cluster_support import s3_server as s3_server  # a fixture
from serve_support import CODE_ENV, Models, deploy, deploy_config, encode, free_port, serve_config, wait_until

from rayvit.storage import Storage
from serve_app.retry import RETRIES_HEADER

CLIENTS = 16
MAX_REQUESTS_PER_CLIENT = 3_000
LOAD_BEFORE_KILL_S = 4.0
LOAD_AFTER_KILL_S = 10.0
#: A kill whose requests Serve's router re-sent itself is followed by another, up to this many.
MAX_KILLS = 3
MAX_LOAD_S = 240.0
APP = "faults"


def _replica_pids(app: str, count: int, timeout_s: float = 60) -> set[int]:
    """The processes of the app's replicas, asked through a handle until ``count`` answered."""
    from ray import serve

    handle: Any = serve.get_app_handle(app)
    pids: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while len(pids) < count and time.monotonic() < deadline:
        pids.add(int(handle.replica_info.remote().result(timeout_s=30)["pid"]))
    return pids


def _running_replicas(app: str) -> int:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None:
        return 0
    dep = status.deployments["ImageClassifier"]
    return sum(n for state, n in dep.replica_states.items() if state == "RUNNING")


@dataclass
class Outcome:
    t: float
    status: int  # 0: connection error or timeout
    retries: int = 0
    retry_after: str | None = None
    json: bool = False
    error: str = ""


@dataclass
class Load:
    url: str
    body: bytes
    outcomes: list[Outcome] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def client(self, deadline: float) -> None:
        session = requests.Session()  # keep-alive, as the clients
        for _ in range(MAX_REQUESTS_PER_CLIENT):
            if self.stop.is_set() or time.monotonic() > deadline:
                return
            try:
                r = session.post(self.url, data=self.body, headers={"Content-Type": "image/png"}, timeout=60)
                out = Outcome(
                    time.monotonic(),
                    r.status_code,
                    int(r.headers.get(RETRIES_HEADER.decode(), "0")),
                    r.headers.get("Retry-After"),
                    r.headers.get("content-type", "").startswith("application/json"),
                    "" if r.status_code == 200 else r.text[:200],
                )
            except requests.RequestException as exc:
                out = Outcome(time.monotonic(), 0, error=f"{type(exc).__name__}: {str(exc)[:200]}")
            self.outcomes.append(out)


@pytest.mark.slow
def test_a_replica_killed_under_load_loses_no_request(
    serve_url: str, tiny_models: Models, cifar_test: tuple[np.ndarray, np.ndarray]
) -> None:
    """A replica is killed under load until a kill catches requests it had accepted.

    Serve's router itself re-sends a request whose replica died before accepting it; only
    requests the replica had accepted reach the proxy's retry. Which ones a kill catches is
    timing, so the replica is killed again (a replacement, up to ``MAX_KILLS`` times) until
    the proxy retried one; no kill may lose a request.
    """
    from ray import serve

    deploy(
        tiny_models.a,
        APP,
        f"/{APP}",
        autoscaling_config={"min_replicas": 2, "max_replicas": 2, "initial_replicas": 2},
        ray_actor_options={"num_cpus": 0.25},
    )
    try:
        pids = _replica_pids(APP, 2)
        assert len(pids) == 2, f"two replicas expected, found processes {pids}"
        load = Load(f"{serve_url}/{APP}/predict", encode(cifar_test[0][0]))
        deadline = time.monotonic() + MAX_LOAD_S
        threads = [
            threading.Thread(target=load.client, args=(deadline,), daemon=True) for _ in range(CLIENTS)
        ]
        for t in threads:
            t.start()
        victims: list[int] = []
        replaced_after: list[float] = []
        try:
            time.sleep(LOAD_BEFORE_KILL_S)
            before = len(load.outcomes)
            killed_at = time.monotonic()
            for _ in range(MAX_KILLS):
                victim = min(pids - set(victims))
                kill_at = time.monotonic()
                os.kill(victim, signal.SIGKILL)
                victims.append(victim)
                time.sleep(LOAD_AFTER_KILL_S)
                replaced = wait_until(lambda: _running_replicas(APP) == 2, 120, interval_s=0.2)
                replaced_after.append(time.monotonic() - kill_at)
                assert replaced, (
                    f"Serve did not replace the killed replica: {serve.status().applications.get(APP)}"
                )
                pids = _replica_pids(APP, 2)
                assert len(pids) == 2 and not pids & set(victims), (pids, victims)
                if any(o.retries for o in load.outcomes):
                    break
        finally:
            load.stop.set()
            for t in threads:
                t.join(timeout=90)

        outcomes = load.outcomes
        errors = [o for o in outcomes if o.status == 0]
        bad = [o for o in outcomes if o.status >= 500 and not (o.status == 503 and o.retry_after and o.json)]
        others = [o for o in outcomes if o.status not in (0, 200, 503)]
        unavailable = [o for o in outcomes if o.status == 503]
        retried = [o for o in outcomes if o.retries]
        not_ok = [o.t for o in outcomes if o.status != 200 or o.retries]
        recovered_after = (max(not_ok) - killed_at) if not_ok else 0.0
        print(
            f"\nreplica killed under load {len(victims)} time(s): {len(outcomes)} requests "
            f"({len(outcomes) - before} after the first kill), "
            f"{sum(o.retries for o in outcomes)} retries in {len(retried)} requests, {len(unavailable)} x 503, "
            f"{len(errors)} connection errors, {len(bad)} other 5xx; last retried or failed request "
            f"{recovered_after:.2f} s after the first kill; replaced after "
            + ", ".join(f"{s:.1f} s" for s in replaced_after)
        )
        assert not errors, errors[:3]
        assert not bad, bad[:3]
        assert not others, others[:3]
        assert retried, f"no request was retried in {MAX_KILLS} kills: none caught a request in flight"
        assert len(outcomes) - before > CLIENTS * len(victims), "the load stopped after a kill"
    finally:
        serve.delete(APP)


@pytest.mark.slow
def test_storage_down_at_replica_start_fails_the_replica_with_one_line(
    serve_url: str, tiny_models: Models, s3_server: S3Server, tmp_path: Path
) -> None:
    """The app is built while the bucket answers; its replicas see an endpoint where nothing listens."""
    from ray import serve

    uri = f"s3://{s3_server.bucket}/runs/storage-down/best"
    Storage.from_setting(uri, s3_server.endpoint).upload_dir(tiny_models.a)
    dead = f"http://127.0.0.1:{free_port()}"
    config = serve_config(Path("unused"), name="storage-down", route_prefix="/storage-down")
    app = config["applications"][0]
    app["args"] = {"model_dir": uri}
    env = {**CODE_ENV["env_vars"], **S3_ENV, "RAYVIT_CACHE": str(tmp_path / "cache")}
    app["runtime_env"] = {"env_vars": {**env, "AWS_ENDPOINT_URL": s3_server.endpoint}}
    (dep,) = app["deployments"]
    dep["ray_actor_options"]["runtime_env"] = {"env_vars": {**env, "AWS_ENDPOINT_URL": dead}}
    t0 = time.monotonic()
    with pytest.raises(AssertionError):
        deploy_config(config, timeout_s=5)  # it never runs
    try:

        def failed() -> bool:
            status = serve.status().applications.get("storage-down")
            return status is not None and status.status in ("DEPLOY_FAILED", "UNHEALTHY")

        assert wait_until(failed, 180), serve.status().applications.get("storage-down")
        elapsed = time.monotonic() - t0
        status = serve.status().applications["storage-down"]
        message = status.deployments["ImageClassifier"].message
        lines = [ln for ln in message.splitlines() if "storage unreachable" in ln]
        print(f"\nstorage down: {status.status} after {elapsed:.1f} s: {lines}")
        assert lines, message[-2000:]
        assert lines[0].count(uri) == 1 and dead.split("//")[1] in lines[0], lines[0]
        assert elapsed < 180
    finally:
        serve.delete("storage-down")
