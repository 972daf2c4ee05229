"""The HTTP layer: FastAPI routes, limits on bodies and forms, API keys, JSON errors, metrics.

Routing, header and form parsing are FastAPI's and Starlette's, with explicit
limits. Everything a client can get wrong ends as ``{"error": reason}`` with a
4xx status; ``/openapi.json`` and ``/docs`` describe every route, body and
error shape.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import time
from collections.abc import AsyncGenerator, Iterable
from pathlib import Path
from typing import Annotated, Any, Protocol

from fastapi import Depends, FastAPI, Security
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from ray.exceptions import TaskCancelledError
from ray.serve.exceptions import RequestCancelledError
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rayvit.errors import UserError
from rayvit.imageio import MIME_TYPES

logger = logging.getLogger("ray.serve")

MAX_TOP_K = 10
API_KEYS_ENV = "RAYVIT_API_KEYS"
CLIENT_CLOSED = 499
RAW_TYPES = MIME_TYPES | {"application/octet-stream"}
ACCEPTED = "image/png, image/jpeg, image/webp, image/gif, image/bmp, image/tiff or multipart/form-data"
BEARER = HTTPBearer(auto_error=False, description="Needed only when API keys are configured.")
ENDPOINTS = "try POST /predict, GET /model, GET /healthz, GET /docs"


class HttpError(Exception):
    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers or {}


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(data, separators=(",", ":"), allow_nan=False).encode()
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def error_response(err: HttpError) -> Response:
    return json_response({"error": err.reason}, err.status, err.headers)


def parse_header_value(value: str) -> tuple[str, dict[str, str]]:
    """``'multipart/form-data; boundary="x"'`` -> ``('multipart/form-data', {'boundary': 'x'})``."""
    from python_multipart.multipart import parse_options_header

    main, params = parse_options_header(value)
    return main.decode("latin-1").strip().lower(), {
        k.decode("latin-1").lower(): v.decode("latin-1") for k, v in params.items()
    }


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The whole body within ``timeout_s`` (else 408), or 413 as soon as it exceeds ``limit``."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise HttpError(400, "invalid Content-Length header")
        if int(declared) > limit:
            raise HttpError(413, f"request body of {int(declared)} bytes is over the limit of {limit} bytes")

    async def read() -> bytes:
        chunks: list[bytes] = []
        total = 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise HttpError(413, f"request body is over the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        async with asyncio.timeout(timeout_s):  # no extra task per request, unlike wait_for
            return await read()
    except (TaskCancelledError, RequestCancelledError):
        # Serve fetches the body from its proxy; when the client has gone, that fetch is cancelled
        raise ClientDisconnect() from None
    except TimeoutError:
        raise HttpError(408, f"request body not received within {timeout_s:g} s") from None


class _InMemoryParser(MultiPartParser):
    spool_max_size = 1 << 40  # the body is already in memory and bounded: never spill parts to disk


async def read_files(body: bytes, content_type: str, max_files: int) -> list[tuple[str | None, bytes]]:
    """``(filename, data)`` of every ``file`` part of a multipart body already read."""

    async def stream() -> AsyncGenerator[bytes, None]:
        yield body

    parser = _InMemoryParser(
        Headers({"content-type": content_type}),
        stream(),
        max_files=max_files + 1,
        max_fields=64,
        max_part_size=len(body) + 1,
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        if str(exc).startswith("Too many files"):
            raise HttpError(413, f"more than {max_files} files in one request") from None
        raise HttpError(400, f"malformed multipart body: {exc}") from None
    files = [v for k, v in form.multi_items() if k == "file"]
    try:
        if not files:
            raise HttpError(400, "multipart body has no 'file' part")
        if len(files) > max_files:
            raise HttpError(413, f"{len(files)} files in one request, over the limit of {max_files}")
        out: list[tuple[str | None, bytes]] = []
        for i, part in enumerate(files, 1):
            if not isinstance(part, UploadFile):
                raise HttpError(400, f"file {i}: the 'file' part must be a file (with a filename)")
            ctype = parse_header_value(part.content_type)[0] if part.content_type else None
            if ctype and ctype not in RAW_TYPES:
                raise HttpError(415, f"file {i}: unsupported content type {ctype[:80]!r}")
            out.append((part.filename, part.file.read()))
        return out
    finally:
        await form.close()


class ApiKeys:
    """Keys from ``RAYVIT_API_KEYS`` (comma or space separated) and a file (one a line, ``#`` comments).

    No keys: the API is open (the default, with the server on loopback).
    Only digests are kept; a presented key is compared in constant time.
    """

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys if k]

    @classmethod
    def load(cls, file: str | None) -> ApiKeys:
        keys = os.environ.get(API_KEYS_ENV, "").replace(",", " ").split()
        if file:
            path = Path(file).expanduser()
            try:
                lines = path.read_text().splitlines()
            except OSError as exc:
                raise UserError(f"api_keys_file {path} cannot be read ({exc.strerror})") from None
            keys += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        return cls(keys)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def check(self, key: str | None) -> bool:
        if not key:
            return False
        digest = hashlib.sha256(key.encode()).digest()
        return any(hmac.compare_digest(digest, d) for d in self._digests)


UNAUTHORIZED = "missing or invalid API key: send 'Authorization: Bearer <key>'"


def bearer_token(authorization: str | None) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header (scheme case-insensitive), else None."""
    scheme, _, token = (authorization or "").partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


def require_key(keys: ApiKeys, key: str | None) -> None:
    """401 unless keys are off or ``key`` is one of them."""
    if keys.enabled and not keys.check(key):
        raise HttpError(401, UNAUTHORIZED, {"WWW-Authenticate": "Bearer"})


def parse_top_k(raw: str | None) -> int | None:
    """The ``top_k`` query parameter: absent, or an integer from 1 to ``MAX_TOP_K`` (else 422)."""
    if raw is None:
        return None
    value = raw.strip()
    if value.isascii() and value.isdigit() and 1 <= int(value) <= MAX_TOP_K:
        return int(value)
    raise HttpError(422, f"top_k must be an integer from 1 to {MAX_TOP_K}, got {raw[:20]!r}")


class Service(Protocol):
    """What the HTTP layer needs from the replica."""

    name: str
    api_keys: ApiKeys

    async def predict(self, request: Request, top_k: int | None) -> Response: ...
    def health(self) -> tuple[int, dict[str, Any]]: ...
    def model_summary(self) -> dict[str, Any]: ...
    def page(self, base: str) -> str: ...
    def record(self, route: str, status: int, seconds: float) -> None: ...


# -- OpenAPI shapes -------------------------------------------------------------------------------
class ErrorBody(BaseModel):
    error: str = Field(description="Why the request failed, fit to show to a person.")


class ModelRef(BaseModel):
    name: str
    version: str


class LabelProbability(BaseModel):
    label: str
    probability: float = Field(ge=0.0, le=1.0)


class PredictionBody(BaseModel):
    label: str = Field(description="The most likely class.")
    probability: float = Field(ge=0.0, le=1.0, description="Its softmax probability.")
    top_k: list[LabelProbability] = Field(description="The top_k most likely classes, most likely first.")
    model: ModelRef
    filename: str | None = Field(None, description="Only in a multipart answer: the part's filename.")


class PredictionsBody(BaseModel):
    predictions: list[PredictionBody] = Field(description="One per file part, in the order sent.")
    model: ModelRef


class HealthBody(BaseModel):
    status: str
    model: ModelRef


_BINARY = {"schema": {"type": "string", "format": "binary"}}
# /predict reads its query parameter, key and body itself: FastAPI's dependency solving and parameter
# validation were a large part of its per-request cost (docs/serving.md, "Benchmark"). The schema
# below describes exactly what it accepts.
PREDICT_OPENAPI: dict[str, Any] = {
    "parameters": [
        {
            "name": "top_k",
            "in": "query",
            "required": False,
            "description": f"How many classes to list (1-{MAX_TOP_K}).",
            "schema": {
                "anyOf": [{"type": "integer", "minimum": 1, "maximum": MAX_TOP_K}, {"type": "null"}],
                "title": "Top K",
            },
        }
    ],
    "security": [{"HTTPBearer": []}],
    "requestBody": {
        "required": True,
        "description": "One image as the raw body, or multipart/form-data with one or more 'file' parts.",
        "content": {
            **{t: _BINARY for t in sorted(t for t in RAW_TYPES if "/x-" not in t)},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {"type": "array", "items": {"type": "string", "format": "binary"}}
                    },
                    "required": ["file"],
                }
            },
        },
    },
}


def _err(description: str, retry: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"model": ErrorBody, "description": description}
    if retry:
        out["headers"] = {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}}
    return out


AUTH_ERROR: dict[int | str, dict[str, Any]] = {
    401: _err("API keys are configured and the request has no valid `Authorization: Bearer` key")
}
PREDICT_ERRORS: dict[int | str, dict[str, Any]] = {
    200: {
        "model": PredictionBody | PredictionsBody,
        "description": "A raw body or a single file: one prediction; several files: `predictions`.",
    },
    400: _err("Empty, truncated, corrupt or undecodable image; malformed multipart body; no 'file' part"),
    **AUTH_ERROR,
    408: _err("The body did not arrive within body_timeout_s"),
    413: _err(
        "Body over max_body_bytes; image over max_pixels; request over max_request_pixels or max_files"
    ),
    415: _err("Unsupported or missing Content-Type (also per multipart part)"),
    422: _err("top_k not an integer from 1 to 10; an image too costly to decode (JPEG scan bomb, deadline)"),
    500: _err("The model failed (the replica is then checked and restarted by Serve)"),
    503: _err(
        "The replica holds max_pending_requests, or decoding is saturated; retry after Retry-After", True
    ),
}


# -- the application ------------------------------------------------------------------------------
def build_http_app(service: Service, title: str) -> ASGIApp:
    """The FastAPI app of one replica (built once the model is loaded)."""
    app = FastAPI(
        title=title,
        description='Image classification. Errors are always JSON `{"error": reason}`.',
        docs_url="/docs",
        redoc_url=None,
        openapi_url="/openapi.json",
    )

    async def authorized(
        creds: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)] = None,
    ) -> None:  # async: a sync dependency would cost a worker-thread hop per request
        require_key(service.api_keys, creds.credentials if creds else None)

    @app.get("/", include_in_schema=False)
    def page(request: Request) -> HTMLResponse:
        return HTMLResponse(service.page(_base(request)))

    @app.get("/healthz", responses={200: {"model": HealthBody}, 503: _err("The model cannot run")})
    def healthz() -> Response:
        """200 while the replica's model can run a forward pass."""
        status, body = service.health()
        return json_response(body, status)

    @app.get("/model", dependencies=[Depends(authorized)], responses={**AUTH_ERROR})
    def model() -> Response:
        """The model's name, version, labels, config summary, metrics and the serving settings."""
        return json_response(service.model_summary())

    @app.post("/predict", openapi_extra=PREDICT_OPENAPI, responses=PREDICT_ERRORS, response_class=Response)
    async def predict(request: Request) -> Response:
        """Classify one image (raw body) or several (multipart `file` parts)."""
        keys = service.api_keys
        if keys.enabled:  # checked here, not as a dependency: nothing to do per request when off
            require_key(keys, bearer_token(request.headers.get("authorization")))
        return await service.predict(request, parse_top_k(request.query_params.get("top_k")))

    app.add_exception_handler(HttpError, _on_http_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _on_routing_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _on_invalid)  # type: ignore[arg-type]
    app.add_exception_handler(ClientDisconnect, _on_disconnect)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _on_unexpected)
    return MetricsMiddleware(app, service)


async def _on_http_error(request: Request, exc: HttpError) -> Response:
    return error_response(exc)


async def _on_routing_error(request: Request, exc: StarletteHTTPException) -> Response:
    route = _route(request.scope)
    if exc.status_code == 404:
        return error_response(HttpError(404, f"no such endpoint: {route} ({ENDPOINTS})"))
    if exc.status_code == 405:
        allow = (exc.headers or {}).get("Allow", "")
        return error_response(
            HttpError(405, f"{request.method} is not allowed on {route}; use {allow}", {"Allow": allow})
        )
    return error_response(HttpError(exc.status_code, str(exc.detail), dict(exc.headers or {})))


async def _on_invalid(request: Request, exc: RequestValidationError) -> Response:
    err = exc.errors()[0] if exc.errors() else {}
    name = str((err.get("loc") or ("", "request"))[-1])
    return error_response(HttpError(422, f"invalid {name}: {err.get('msg', 'bad value')}"))


async def _on_disconnect(request: Request, exc: ClientDisconnect) -> Response:
    return json_response({"error": "client disconnected"}, CLIENT_CLOSED)


async def _on_unexpected(request: Request, exc: Exception) -> Response:
    logger.error("unexpected error on %s %s", request.method, _route(request.scope), exc_info=exc)
    return json_response({"error": "internal server error"}, 500)


class MetricsMiddleware:
    """Times every request and records its status; a cancelled request (client gone) is a 499."""

    def __init__(self, app: ASGIApp, service: Service) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = CLIENT_CLOSED

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.service.record(_route(scope), status, time.perf_counter() - start)


def _base(request: Request) -> str:
    return str(request.scope.get("root_path") or "").rstrip("/")


def _route(scope: Scope) -> str:
    path = str(scope.get("path") or "/")
    base = str(scope.get("root_path") or "").rstrip("/")
    if base and (path == base or path.startswith(base + "/")):
        path = path[len(base) :]
    return "/" + path.strip("/")
