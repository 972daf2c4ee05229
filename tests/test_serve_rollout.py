"""Swapping the served model: replicas roll while requests keep succeeding."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import requests
from serve_support import Models, deploy, encode, wait_until

MAX_REQUESTS_PER_CLIENT = 20_000
MAX_SECONDS = 420


@pytest.mark.slow
def test_model_swap_without_downtime(
    serve_url: str, tiny_models: Models, cifar_test: tuple[np.ndarray, np.ndarray]
) -> None:
    from ray import serve

    deploy(tiny_models.a, "swap", "/swap")
    url = f"{serve_url}/swap/predict"
    body = encode(cifar_test[0][0])
    results: list[tuple[float, int, str]] = []
    lock = threading.Lock()
    stop = threading.Event()
    deadline = time.monotonic() + MAX_SECONDS

    def client() -> None:
        session = requests.Session()
        for _ in range(MAX_REQUESTS_PER_CLIENT):
            if stop.is_set() or time.monotonic() > deadline:
                return
            try:
                r = session.post(url, data=body, headers={"Content-Type": "image/png"}, timeout=60)
                what = r.json()["model"]["name"] if r.status_code == 200 else r.text[:200]
                status = r.status_code
            except (requests.RequestException, ValueError) as exc:
                status, what = 0, repr(exc)
            with lock:
                results.append((time.monotonic(), status, what))

    def count(name: str, since: float = 0.0) -> int:
        with lock:
            return sum(1 for t, s, n in results if s == 200 and n == name and t >= since)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(3)]
    try:
        for t in threads:
            t.start()
        assert wait_until(lambda: count("model-a") >= 10, 60, 0.1), results[-5:]
        deploy(tiny_models.b, "swap", "/swap")  # returns once model B's replica serves
        swapped = time.monotonic()
        assert wait_until(lambda: count("model-b", swapped) >= 20, 60, 0.1), results[-5:]
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=90)
        serve.delete("swap")
    failed = [r for r in results if r[1] != 200]
    assert not failed, f"{len(failed)} of {len(results)} requests failed during the swap: {failed[:5]}"
    names = [n for _, _, n in results]
    assert names[0] == "model-a" and set(names) == {"model-a", "model-b"}
    assert names[-10:] == ["model-b"] * 10
