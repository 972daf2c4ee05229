"""Application metrics, exported through Ray's Prometheus endpoint.

Ray prefixes every name with ``ray_`` and counters get ``_total``, so scrape
``ray_rayvit_predictions_total``, ``ray_rayvit_errors_total``,
``ray_rayvit_request_latency_s_bucket``, ``ray_rayvit_batch_size_bucket`` and
``ray_rayvit_disconnects_total``. A client that goes away before its answer
(status 499, as nginx names it) is counted as a disconnect, not an error.
"""

from __future__ import annotations

from collections import Counter as Counter_

from ray.util.metrics import Counter, Histogram

LATENCY_BOUNDARIES_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
BATCH_BOUNDARIES = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0]
ROUTES = frozenset({"/", "/predict", "/healthz", "/model", "/openapi.json", "/docs"})
CLIENT_CLOSED = 499


class ServeMetrics:
    """One set per replica; tags carry the model so a rollout shows both versions."""

    def __init__(self, model_name: str, model_version: str) -> None:
        model_tags = {"model": model_name, "version": model_version}
        self.predictions = Counter(
            "rayvit_predictions",
            description="Images classified, by predicted (top-1) class.",
            tag_keys=("model", "version", "label"),
        )
        self.predictions.set_default_tags(model_tags)
        self.errors = Counter(
            "rayvit_errors",
            description="Requests answered with an error, by HTTP status.",
            tag_keys=("model", "version", "route", "status"),
        )
        self.errors.set_default_tags(model_tags)
        self.latency = Histogram(
            "rayvit_request_latency_s",
            description="Time from the request reaching the replica to its response, in seconds.",
            boundaries=LATENCY_BOUNDARIES_S,
            tag_keys=("model", "version", "route", "status"),
        )
        self.latency.set_default_tags(model_tags)
        self.batch_size = Histogram(
            "rayvit_batch_size",
            description="Images per forward pass (dynamic batching).",
            boundaries=BATCH_BOUNDARIES,
            tag_keys=("model", "version"),
        )
        self.batch_size.set_default_tags(model_tags)
        self.disconnects = Counter(
            "rayvit_disconnects",
            description="Requests whose client went away before the answer (not a server error).",
            tag_keys=("model", "version", "route"),
        )
        self.disconnects.set_default_tags(model_tags)

    def request(self, route: str, status: int, seconds: float) -> None:
        route = route if route in ROUTES else "other"
        if status == CLIENT_CLOSED:
            self.disconnects.inc(tags={"route": route})
            return
        tags = {"route": route, "status": str(status)}
        self.latency.observe(seconds, tags=tags)
        if status >= 400:
            self.errors.inc(tags=tags)

    def predicted(self, labels: list[str]) -> None:
        for label, count in Counter_(labels).items():
            self.predictions.inc(count, tags={"label": label})

    def batch(self, size: int) -> None:
        self.batch_size.observe(size)
