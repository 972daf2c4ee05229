"""The model deployment: HTTP ingress, safe decoding and batched inference in one replica.

One replica process loads the exported model once (on its GPU when Ray gave it
one), decodes requests on its event loop and feeds single images into a
``@serve.batch`` queue, so concurrent requests share forward passes. Keeping
decoding and inference in the same replica avoids a second network hop per
request; autoscaling adds or removes whole replicas.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
from typing import Any

import numpy as np
import ray
import torch
from ray import serve
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from rayvit.checkpoint import model_identity
from rayvit.imageio import MIME_TYPES, ImageError, ImageTooLargeError, decode_image, limit_pil_pixels
from rayvit.predict import Predictor
from rayvit.preprocess import preprocess_arrays
from serve_app.http import (
    HttpError,
    error_response,
    json_response,
    parse_header_value,
    parse_multipart,
    parse_top_k,
    read_body,
)
from serve_app.metrics import ServeMetrics
from serve_app.page import upload_page
from serve_app.settings import DEPLOYMENT_NAME, ReplicaSettings, replica_settings

logger = logging.getLogger("ray.serve")

RAW_TYPES = MIME_TYPES | {"application/octet-stream"}
ACCEPTED = "image/png, image/jpeg, image/webp, image/gif, image/bmp, image/tiff or multipart/form-data"
#: Bodies up to this size are decoded on the event loop; larger ones in a thread.
INLINE_DECODE_BYTES = 256 * 1024
ROUTES: dict[str, tuple[str, ...]] = {
    "/": ("GET",),
    "/predict": ("POST",),
    "/healthz": ("GET",),
    "/model": ("GET",),
}
LONG_LIST = 100


def _thread_count(requested: int | None) -> int:
    if requested:
        return requested
    try:
        cpus = float(ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0))
    except Exception:
        cpus = 1.0
    return max(1, math.ceil(cpus))


@serve.deployment(name=DEPLOYMENT_NAME, max_ongoing_requests=64)
class ViTClassifier:
    def __init__(self, model_dir: str) -> None:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.settings = ReplicaSettings()
        self._threads = _thread_count(self.settings.torch_threads)
        self._thread_state = threading.local()
        self.forward_threads = 0  # torch threads of the last forward pass, as the model ran it
        self.predictor = Predictor(model_dir)
        self.name, self.version = model_identity(self.predictor.path, self.predictor.metrics)
        self.model_info = {"name": self.name, "version": self.version}
        self.metrics = ServeMetrics(self.name, self.version)
        limit_pil_pixels(self.settings.max_pixels)
        side = self.predictor.pre.image_size
        self._forward([np.zeros((side, side, 3), np.uint8)])  # warm-up
        logger.info(f"loaded model {self.name} {self.version} from {model_dir} on {self.predictor.device}")

    # -- settings ---------------------------------------------------------------------------------
    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply ``user_config``: batching, limits and threads change without a restart."""
        settings = replica_settings(user_config)
        self.infer.set_max_batch_size(settings.max_batch_size)  # type: ignore[attr-defined]
        self.infer.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)  # type: ignore[attr-defined]
        self._threads = _thread_count(settings.torch_threads)
        limit_pil_pixels(settings.max_pixels)
        self.settings = settings

    # -- HTTP -------------------------------------------------------------------------------------
    async def __call__(self, request: Request) -> Response:
        start = time.perf_counter()
        route = _route(request)
        try:
            response = await self._dispatch(route, request)
        except HttpError as err:
            response = error_response(err)
        except Exception:
            logger.exception("unexpected error while handling %s %s", request.method, route)
            response = json_response({"error": "internal server error"}, 500)
        self.metrics.request(route, response.status_code, time.perf_counter() - start)
        return response

    async def _dispatch(self, route: str, request: Request) -> Response:
        methods = ROUTES.get(route)
        if methods is None:
            raise HttpError(404, f"no such endpoint: {route} (try POST /predict, GET /model, GET /healthz)")
        if request.method not in methods:
            allow = ", ".join(methods)
            raise HttpError(405, f"{request.method} is not allowed on {route}; use {allow}", {"Allow": allow})
        if route == "/predict":
            return await self._predict(request)
        if route == "/healthz":
            return json_response({"status": "ok", "model": self.model_info})
        if route == "/model":
            return json_response(self._model_summary())
        return HTMLResponse(upload_page(_base(request), self.name))

    async def _predict(self, request: Request) -> Response:
        settings = self.settings
        ctype = request.headers.get("content-type")
        if not ctype:
            raise HttpError(415, f"missing Content-Type; send {ACCEPTED}")
        mime, params = parse_header_value(ctype)
        if mime != "multipart/form-data" and mime not in RAW_TYPES:
            raise HttpError(415, f"unsupported content type {mime[:80]!r}; send {ACCEPTED}")
        top_k = parse_top_k(request.query_params.get("top_k"), settings.default_top_k)
        body = await read_body(request, settings.max_body_bytes)
        if mime == "multipart/form-data":
            files = [p for p in parse_multipart(body, params.get("boundary")) if p.name == "file"]
            if not files:
                raise HttpError(400, "multipart body has no 'file' part")
            if len(files) > settings.max_files:
                raise HttpError(
                    413, f"{len(files)} files in one request, over the limit of {settings.max_files}"
                )
            for i, part in enumerate(files, 1):
                if part.content_type and part.content_type not in RAW_TYPES:
                    raise HttpError(415, f"file {i}: unsupported content type {part.content_type[:80]!r}")
            blobs = [p.data for p in files]
            names: list[str | None] = [p.filename for p in files]
        else:
            blobs, names = [body], [None]
        if len(body) <= INLINE_DECODE_BYTES:
            images = _decode_all(blobs, settings.max_pixels)
        else:
            images = await asyncio.to_thread(_decode_all, blobs, settings.max_pixels)
        probs = await asyncio.gather(*(self.infer(image) for image in images))
        preds = [self._prediction(p, top_k) for p in probs]
        self.metrics.predicted([p["label"] for p in preds])
        if mime != "multipart/form-data" or len(preds) == 1:
            return json_response(preds[0])
        for pred, name in zip(preds, names, strict=True):
            pred["filename"] = name
        return json_response({"predictions": preds, "model": self.model_info})

    # -- inference --------------------------------------------------------------------------------
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.02)
    async def infer(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Softmax probabilities of single images, computed in dynamic batches."""
        self.metrics.batch(len(images))
        # Inline on purpose: Serve runs this code on its own event loop thread, so the replica's
        # main loop keeps taking requests while the forward pass runs, and requests that arrive
        # meanwhile form the next, larger batch. A further thread hop only adds GIL handoffs.
        probs = self._forward(images)
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

    def _prediction(self, probs: np.ndarray, top_k: int) -> dict[str, Any]:
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
        image = decode_image(data, self.settings.max_pixels)
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
            "device": str(self.predictor.device),
        }

    def _model_summary(self) -> dict[str, Any]:
        cfg = self.predictor.model.config
        metrics = dict(self.predictor.metrics)
        omitted = sorted(k for k, v in metrics.items() if isinstance(v, list) and len(v) > LONG_LIST)
        for key in omitted:
            metrics.pop(key)
        pre = self.predictor.pre
        return {
            "name": self.name,
            "version": self.version,
            "labels": list(self.predictor.labels),
            "config": {
                "architecture": type(self.predictor.model).__name__,
                "image_size": int(getattr(cfg, "image_size", pre.image_size)),
                "patch_size": int(getattr(cfg, "patch_size", 0)),
                "hidden_size": int(getattr(cfg, "hidden_size", 0)),
                "num_layers": int(getattr(cfg, "num_hidden_layers", 0)),
                "num_heads": int(getattr(cfg, "num_attention_heads", 0)),
                "num_labels": len(self.predictor.labels),
                "parameters": sum(p.numel() for p in self.predictor.model.parameters()),
                "preprocessing": {"image_size": pre.image_size, "mean": list(pre.mean), "std": list(pre.std)},
            },
            "metrics": metrics,
            "metrics_omitted": omitted,
            "serving": {**self.settings.model_dump(), "device": str(self.predictor.device)},
        }


def _decode_all(blobs: list[bytes], max_pixels: int) -> list[np.ndarray]:
    images = []
    for i, blob in enumerate(blobs, 1):
        try:
            images.append(decode_image(blob, max_pixels))
        except ImageError as exc:
            where = f"file {i}: " if len(blobs) > 1 else ""
            raise HttpError(413 if isinstance(exc, ImageTooLargeError) else 400, f"{where}{exc}") from None
    return images


def _base(request: Request) -> str:
    return str(request.scope.get("root_path") or "").rstrip("/")


def _route(request: Request) -> str:
    path = str(request.scope.get("path") or "/")
    base = _base(request)
    if base and (path == base or path.startswith(base + "/")):
        path = path[len(base) :]
    path = "/" + path.strip("/")
    return path
