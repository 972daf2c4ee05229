"""Autoscaling: under load the replica count rises above the minimum, then falls back."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import requests
from serve_support import Models, deploy, encode, wait_until

CLIENTS = 6
MAX_REQUESTS_PER_CLIENT = 5_000
MAX_LOAD_SECONDS = 180


def _running_replicas(app: str) -> int:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None:
        return 0
    dep = status.deployments["ImageClassifier"]
    return sum(n for state, n in dep.replica_states.items() if state == "RUNNING")  # a str enum


@pytest.mark.slow
def test_replicas_scale_up_under_load_and_back_down(
    serve_url: str, tiny_models: Models, cifar_test: tuple[np.ndarray, np.ndarray]
) -> None:
    from ray import serve

    deploy(
        tiny_models.a,
        "scale",
        "/scale",
        autoscaling_config={
            "min_replicas": 1,
            "max_replicas": 2,
            "initial_replicas": 1,
            "target_ongoing_requests": 1,
            "upscale_delay_s": 1,
            "downscale_delay_s": 3,
            "look_back_period_s": 2,
            "metrics_interval_s": 0.5,
        },
        ray_actor_options={"num_cpus": 0.1},
        # a longer batch window keeps each request open ~50 ms, so a few clients mean many ongoing
        user_config={"torch_threads": 1, "max_batch_size": 16, "batch_wait_timeout_s": 0.05},
    )
    assert _running_replicas("scale") == 1
    url = f"{serve_url}/scale/predict"
    body = encode(cifar_test[0][0])
    statuses: list[int] = []
    stop = threading.Event()
    deadline = time.monotonic() + MAX_LOAD_SECONDS

    def client() -> None:
        session = requests.Session()
        for _ in range(MAX_REQUESTS_PER_CLIENT):
            if stop.is_set() or time.monotonic() > deadline:
                return
            try:
                code = session.post(
                    url, data=body, headers={"Content-Type": "image/png"}, timeout=60
                ).status_code
            except requests.RequestException:
                code = 0
            statuses.append(code)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(CLIENTS)]
    try:
        for t in threads:
            t.start()
        scaled_up = wait_until(lambda: _running_replicas("scale") >= 2, MAX_LOAD_SECONDS - 10)
        peak = _running_replicas("scale")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=90)
    try:
        assert scaled_up, f"replicas stayed at {peak} under load ({len(statuses)} requests sent)"
        assert wait_until(lambda: _running_replicas("scale") == 1, 120), "replicas did not fall back to 1"
        assert statuses and all(s == 200 for s in statuses), {s for s in statuses if s != 200}
    finally:
        serve.delete("scale")
