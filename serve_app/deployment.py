"""The model deployment: FastAPI ingress, bounded decoding and batched inference in one replica.

One replica process loads the exported model once (on its GPU when Ray gave it
one), decodes requests in a small thread pool (never on its event loop) and
feeds single images into a ``@serve.batch`` queue, so concurrent requests share
forward passes. Keeping decoding and inference in the same replica avoids a
second network hop per request; autoscaling adds or removes whole replicas.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray import serve
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp

from rayvit.checkpoint import model_identity
from rayvit.errors import UserError
from rayvit.imageio import decode_to_side, limit_pil_pixels
from rayvit.predict import Predictor
from rayvit.preprocess import preprocess_arrays
from rayvit.storage import is_uri
from serve_app.decoding import DecodeLimits, DecodePool
from serve_app.http import (
    ACCEPTED,
    RAW_TYPES,
    ApiKeys,
    HttpError,
    build_http_app,
    json_response,
    parse_header_value,
    read_body,
    read_files,
)
from serve_app.metrics import ServeMetrics
from serve_app.model_source import local_model_folder
from serve_app.page import upload_page
from serve_app.settings import DEPLOYMENT_NAME, ReplicaSettings, replica_settings

logger = logging.getLogger("ray.serve")

LONG_LIST = 100


class ModelHealthError(UserError):
    """The model cannot produce finite outputs: the replica must not (keep) serving."""


class ModelUnavailableError(UserError):
    """The replica cannot get its model folder (storage down, export gone): it must not start."""


def _model_folder(model_dir: str) -> Path:
    """The model folder, or ``ModelUnavailableError`` with one line (also logged) saying why.

    Serve then counts the replica as failed to start, retries it, and reports the deployment
    unhealthy with this line, instead of a replica that hangs or serves nothing.
    """
    try:
        return local_model_folder(model_dir, check_weights=False)
    except UserError as exc:
        reason = str(exc)
        if is_uri(model_dir) and "no exported model" not in reason:
            reason = f"storage unreachable when the replica started: {reason}"
        logger.error(reason)
        raise ModelUnavailableError(reason) from None


def _thread_count(requested: int | None) -> int:
    if requested:
        return requested
    try:
        cpus = float(ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0))
    except Exception:
        cpus = 1.0
    return max(1, math.ceil(cpus))


@serve.deployment(name=DEPLOYMENT_NAME, max_ongoing_requests=64)
@serve.ingress()
class ImageClassifier:
    def __init__(self, model_dir: str) -> None:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.settings = ReplicaSettings()
        sys.setswitchinterval(self.settings.gil_switch_interval_ms / 1000)
        self._threads = _thread_count(self.settings.torch_threads)
        self._thread_state = threading.local()
        self.forward_threads = 0  # torch threads of the last forward pass, as the model ran it
        self.predictor = Predictor(_model_folder(model_dir))
        self.name, self.version = model_identity(self.predictor.path, self.predictor.metrics)
        self.model_info = {"name": self.name, "version": self.version}
        self.metrics = ServeMetrics(self.name, self.version)
        self.api_keys = ApiKeys.load(None)
        self.decoder = DecodePool(_thread_count(self.settings.decode_threads))
        self.side = self.predictor.pre.image_size
        self.decode_limits = DecodeLimits.of(self.settings, self.side)
        self.pending = 0
        self._probe_image = np.random.default_rng(0).integers(0, 256, (self.side, self.side, 3), np.uint8)
        self._unhealthy: str | None = None
        self._last_ok = 0.0
        limit_pil_pixels(self.settings.max_pixels)
        # Warm-up: on a GPU at the largest batch, so that its kernels are chosen and its memory
        # taken before the first request; on a CPU two images do.
        warm = self.settings.max_batch_size if self.predictor.device.type == "cuda" else 2
        self._probe([np.zeros((self.side, self.side, 3), np.uint8)] * (warm - 1) + [self._probe_image])
        logger.info(f"loaded model {self.name} {self.version} from {model_dir} on {self.predictor.device}")

    def __serve_build_asgi_app__(self) -> ASGIApp:
        return build_http_app(self, f"{self.name} image classifier")

    # -- settings ---------------------------------------------------------------------------------
    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply ``user_config``: batching, limits, keys and threads change without a restart."""
        settings = replica_settings(user_config)
        self.api_keys = ApiKeys.load(settings.api_keys_file)
        self.infer.set_max_batch_size(settings.max_batch_size)  # type: ignore[attr-defined]
        self.infer.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)  # type: ignore[attr-defined]
        self._threads = _thread_count(settings.torch_threads)
        self.decoder.resize(_thread_count(settings.decode_threads))
        limit_pil_pixels(settings.max_pixels)
        sys.setswitchinterval(settings.gil_switch_interval_ms / 1000)  # the replica owns its process
        self.decode_limits = DecodeLimits.of(settings, self.side)
        self.settings = settings

    # -- HTTP (called by serve_app.http) -----------------------------------------------------------
    async def predict(self, request: Request, top_k: int | None) -> Response:
        settings = self.settings
        if self.pending >= settings.max_pending_requests:
            raise HttpError(
                503,
                f"server busy: {self.pending} requests in progress on this replica; retry later",
                {"Retry-After": str(settings.retry_after_s)},
            )
        self.pending += 1
        try:
            images, names, multipart = await self._images(request, settings)
            if len(images) == 1:  # the common case: no gather, no extra task
                probs = [await self.infer(images[0])]
            else:
                probs = await asyncio.gather(*(self.infer(image) for image in images))
        finally:
            self.pending -= 1
        k = top_k or settings.default_top_k
        preds = [self._prediction(p, k) for p in probs]
        if not multipart or len(preds) == 1:
            return json_response(preds[0])
        for pred, name in zip(preds, names, strict=True):
            pred["filename"] = name
        return json_response({"predictions": preds, "model": self.model_info})

    async def _images(
        self, request: Request, settings: ReplicaSettings
    ) -> tuple[list[np.ndarray], list[str | None], bool]:
        """Read, check and decode the request's images (the body is dropped once decoded)."""
        ctype = request.headers.get("content-type")
        if not ctype:
            raise HttpError(415, f"missing Content-Type; send {ACCEPTED}")
        mime, _ = parse_header_value(ctype)
        multipart = mime == "multipart/form-data"
        if not multipart and mime not in RAW_TYPES:
            raise HttpError(415, f"unsupported content type {mime[:80]!r}; send {ACCEPTED}")
        body = await read_body(request, settings.max_body_bytes, settings.body_timeout_s)
        if multipart:
            files = await read_files(body, ctype, settings.max_files)
        else:
            files = [(None, body)]
        images = await self.decoder.decode([f[1] for f in files], self.decode_limits)
        return images, [f[0] for f in files], multipart

    def health(self) -> tuple[int, dict[str, Any]]:
        if self._unhealthy:
            return 503, {"status": "failing", "error": self._unhealthy, "model": self.model_info}
        return 200, {"status": "ok", "model": self.model_info}

    def model_summary(self) -> dict[str, Any]:
        cfg = self.predictor.model.config
        metrics = dict(self.predictor.metrics)
        omitted = sorted(k for k, v in metrics.items() if isinstance(v, list) and len(v) > LONG_LIST)
        for key in omitted:
            metrics.pop(key)
        pre = self.predictor.pre
        serving = self.settings.model_dump(exclude={"api_keys_file"})
        return {
            "name": self.name,
            "version": self.version,
            "labels": list(self.predictor.labels),
            "config": {
                "architecture": type(self.predictor.model).__name__,
                "model_type": str(getattr(cfg, "model_type", "")),
                "image_size": pre.image_size,
                "num_labels": len(self.predictor.labels),
                "parameters": sum(p.numel() for p in self.predictor.model.parameters()),
                "preprocessing": {
                    "image_size": pre.image_size,
                    "resize_side": pre.resize_side or pre.image_size,
                    "shortest_edge": pre.shortest_edge,
                    "resample": pre.resample,
                    "mean": list(pre.mean),
                    "std": list(pre.std),
                },
            },
            "metrics": metrics,
            "metrics_omitted": omitted,
            "serving": {**serving, "auth": self.api_keys.enabled, "device": str(self.predictor.device)},
        }

    def page(self, base: str) -> str:
        return upload_page(base, self.name)

    def record(self, route: str, status: int, seconds: float) -> None:
        self.metrics.request(route, status, seconds)

    # -- inference --------------------------------------------------------------------------------
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.02)
    async def infer(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Softmax probabilities of single images, computed in dynamic batches."""
        self.metrics.batch(len(images))
        # Inline on purpose: Serve runs this code on its own event loop thread, so the replica's
        # main loop keeps taking requests while the forward pass runs, and requests that arrive
        # meanwhile form the next, larger batch. A further thread hop only adds GIL handoffs.
        try:
            probs = self._forward(images)
        except Exception as exc:
            self._unhealthy = f"forward pass failed: {type(exc).__name__}: {str(exc)[:200]}"
            raise
        finite = np.isfinite(probs).all(axis=1)
        if finite.all():
            self._last_ok = time.monotonic()
        # counted per batch, not per request: one counter update per class in the batch
        labels = self.predictor.labels
        self.metrics.predicted([labels[i] for i in probs[finite].argmax(axis=1)])
        return list(probs)

    def _forward(self, images: list[np.ndarray]) -> np.ndarray:
        # torch's (OpenMP) thread count belongs to the calling thread, and Serve runs __init__,
        # reconfigure and the batch handler on different threads: set it where the model runs.
        state = self._thread_state
        if getattr(state, "threads", None) != self._threads:
            torch.set_num_threads(self._threads)
            state.threads = self._threads
        self.forward_threads = torch.get_num_threads()
        return self.predictor.probabilities(images).numpy()

    def _probe(self, images: list[np.ndarray]) -> None:
        """A forward pass on known images that must give finite probabilities, else ``ModelHealthError``."""
        try:
            probs = self._forward(images)
        except Exception as exc:
            self._unhealthy = f"forward pass failed: {type(exc).__name__}: {str(exc)[:200]}"
            raise ModelHealthError(f"model {self.name} {self.version}: {self._unhealthy}") from None
        bad = int((~np.isfinite(probs)).sum())
        if bad:
            self._unhealthy = f"outputs are not finite ({bad} NaN/inf of {probs.size} on the probe images)"
            raise ModelHealthError(
                f"model folder {self.predictor.path}: {self._unhealthy}; the model cannot be served"
            )
        self._unhealthy = None
        self._last_ok = time.monotonic()

    async def check_health(self) -> None:
        """Serve calls this periodically; raising makes it replace the replica.

        A forward pass runs only when none succeeded recently (traffic proves health for free).
        """
        if self._unhealthy is None and time.monotonic() - self._last_ok < self.settings.health_probe_idle_s:
            return
        await asyncio.to_thread(self._probe, [self._probe_image])

    def _prediction(self, probs: np.ndarray, top_k: int) -> dict[str, Any]:
        if not np.isfinite(probs).all():
            self._unhealthy = "outputs are not finite"
            raise HttpError(500, "the model produced a non-finite output; this replica is being checked")
        k = min(top_k, probs.shape[0])
        order = np.argsort(-probs, kind="stable")[:k]
        labels = self.predictor.labels
        top = [{"label": labels[i], "probability": float(probs[i])} for i in order]
        return {
            "label": top[0]["label"],
            "probability": top[0]["probability"],
            "top_k": top,
            "model": self.model_info,
        }

    # -- for tests and tools (through a DeploymentHandle, not HTTP) --------------------------------
    def pixel_values(self, data: bytes) -> np.ndarray:
        """The model input this replica computes for one uploaded file."""
        image = decode_to_side(data, self.side, self.settings.max_pixels)
        x = preprocess_arrays(self.predictor.pre, [image], self.predictor.device)
        return x.cpu().numpy()

    def replica_info(self) -> dict[str, Any]:
        infer: Any = self.infer
        return {
            "pid": os.getpid(),
            "batch": [infer._get_max_batch_size(), infer._get_batch_wait_timeout_s()],
            "model": self.model_info,
            "settings": self.settings.model_dump(),
            "torch_threads": self.forward_threads,
            "decode_threads": self.decoder.threads,
            "device": str(self.predictor.device),
        }
