"""Serving a model folder from a storage URI (an S3 bucket on a local moto server)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from cluster_support import S3_ENV, S3Server
from cluster_support import s3_server as s3_server  # a fixture
from serve_support import CODE_ENV, Models, deploy_config, encode, serve_config

from rayvit.predict import Predictor
from rayvit.storage import Storage

PREFIX = "runs/served/best"


@pytest.fixture(scope="module")
def model_uri(s3_server: S3Server, tiny_models: Models) -> str:
    uri = f"s3://{s3_server.bucket}/{PREFIX}"
    Storage.from_setting(uri, s3_server.endpoint).upload_dir(tiny_models.a)
    return uri


@pytest.fixture(scope="module")
def uri_classifier(serve_url: str, model_uri: str, s3_server: S3Server) -> Iterator[str]:
    from ray import serve

    config = serve_config(Path("unused"), name="from-bucket", route_prefix="/bucket")
    app = config["applications"][0]
    app["args"] = {"model_dir": model_uri}
    app["runtime_env"] = {
        "env_vars": {
            **CODE_ENV["env_vars"],
            **S3_ENV,
            "AWS_ENDPOINT_URL": s3_server.endpoint,
            "RAYVIT_CACHE": _cache_dir(),
        }
    }
    deploy_config(config)
    yield f"{serve_url}/bucket"
    serve.delete("from-bucket")


def _cache_dir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="rayvit-cache-")


@pytest.mark.slow
def test_serving_from_a_bucket_matches_the_offline_predictor(
    uri_classifier: str, model_uri: str, tiny_models: Models, cifar_test: tuple[np.ndarray, np.ndarray]
) -> None:
    images, _ = cifar_test
    offline = Predictor(tiny_models.a).predict(list(images[:8]), top_k=1)
    served: list[Any] = []
    for image in images[:8]:
        r = requests.post(
            f"{uri_classifier}/predict",
            data=encode(image),
            headers={"Content-Type": "image/png"},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        served.append(r.json())
    assert [s["label"] for s in served] == [p.label for p in offline]
    for s, p in zip(served, offline, strict=True):
        assert s["probability"] == pytest.approx(p.probability, abs=1e-4)


def test_a_uri_without_a_model_fails_at_build_time_naming_it(s3_server: S3Server) -> None:
    """``serve run`` itself: the application builder refuses before anything is deployed."""
    empty = f"s3://{s3_server.bucket}/nothing/here"
    env = {**os.environ, **S3_ENV, "AWS_ENDPOINT_URL": s3_server.endpoint}
    env.pop("RAY_ADDRESS", None)
    t0 = time.monotonic()
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "serve"), "run", "serve_app:app", f"model_dir={empty}"],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert errors == [f"Error: model_dir: no exported model at {empty} (no metrics.json)"], proc.stderr[
        -2000:
    ]
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - t0 < 120
