"""Retry in Serve's HTTP proxy: a request whose replica died on the way is sent again.

Ray Serve's proxy answers a request with a plain-text 500 when the replica that
holds it dies (``RayActorError``/``ActorDiedError``); its router retries only
requests a replica refused before running them. Predictions are idempotent, so
this ASGI middleware, installed in the proxy through Serve's own hook
(``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serve_app.retry:proxy_middlewares``,
set in ``configs/serve.yaml``'s ``controller_options``), sends such a request
again: the router has by then dropped the dead replica, so the retry lands on a
live one. When no attempt gets an answer, the client gets a JSON 503 with
``Retry-After``, never a bare 500.

It runs in the proxy, not in a deployment of its own, so the hot path gains no
second actor hop: per request it only keeps the body messages it passed on (for
a replay) and holds the response messages until the response is complete.
This module imports nothing heavy: it is loaded into the proxy process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from typing import Any

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("ray.serve")

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "serve_app.retry:proxy_middlewares"
RETRIES_ENV = "RAYVIT_PROXY_RETRIES"
RETRY_AFTER_ENV = "RAYVIT_PROXY_RETRY_AFTER_S"
#: Route prefixes (comma-separated) never retried: apps whose requests must not run twice.
SKIP_ENV = "RAYVIT_PROXY_RETRY_SKIP"
#: The header of a response that needed retries: how many.
RETRIES_HEADER = b"x-rayvit-retries"
#: Waits before the 2nd, 3rd, ... attempt: the first retry goes at once (the router already
#: dropped the dead replica); later ones give Serve time to replace it.
BACKOFF_S = (0.0, 0.1, 0.5, 1.0)
#: Idempotent requests: reads, and POST to a ``/predict`` route (a prediction changes nothing).
RETRY_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
RETRY_POST_SUFFIX = "/predict"


def proxy_middlewares() -> list[Middleware]:
    """Serve's proxy callback: the middlewares the proxy wraps its ASGI app in."""
    return [
        Middleware(
            RetryMiddleware,
            retries=int(os.environ.get(RETRIES_ENV, "3")),
            retry_after_s=int(os.environ.get(RETRY_AFTER_ENV, "1")),
            skip=tuple(p.strip() for p in os.environ.get(SKIP_ENV, "").split(",") if p.strip()),
        )
    ]


def proxy_env() -> dict[str, str]:
    """Environment that makes a Serve proxy load this middleware (for ``controller_options``)."""
    return {CALLBACK_ENV: CALLBACK}


class _Request:
    """The request's messages as the client sent them, replayable to each attempt."""

    def __init__(self, receive: Receive) -> None:
        self.receive = receive
        self.received: list[Message] = []
        self.disconnected = False

    def replay(self) -> Receive:
        position = 0

        async def receive() -> Message:
            nonlocal position
            if position < len(self.received):
                position += 1
                return self.received[position - 1]
            message = await self.receive()
            if message["type"] == "http.disconnect":
                self.disconnected = True
                return message
            self.received.append(message)
            position += 1
            return message

        return receive


class RetryMiddleware:
    """Replays an idempotent request whose attempt ended without a complete response."""

    def __init__(
        self, app: ASGIApp, retries: int = 3, retry_after_s: int = 1, skip: tuple[str, ...] = ()
    ) -> None:
        self.app = app
        self.retries = max(0, retries)
        self.retry_after = str(max(0, retry_after_s)).encode()
        self.skip = skip

    def _retryable(self, scope: Scope) -> bool:
        if scope["type"] != "http" or not self.retries:
            return False
        method = scope.get("method", "GET")
        path: str = scope["path"]
        if self.skip and path.startswith(self.skip):
            return False
        return method in RETRY_METHODS or (method == "POST" and path.endswith(RETRY_POST_SUFFIX))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._retryable(scope):
            await self.app(scope, receive, send)
            return
        request = _Request(receive)
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(BACKOFF_S[min(attempt - 1, len(BACKOFF_S) - 1)])
            held = await self._attempt(scope, request, attempt)
            if held is not None:
                await self._send(send, held, attempt)
                return
            if request.disconnected:
                return  # the client left: nobody to answer
            logger.warning(
                f"{scope.get('method')} {scope['path']}: no response from the replica (attempt "
                f"{attempt + 1} of {self.retries + 1}); "
                + ("retrying on another replica" if attempt < self.retries else "answering 503")
            )
        body = json.dumps({"error": "no replica answered (a replica was lost); retry later"}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 503,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"retry-after", self.retry_after),
                    (RETRIES_HEADER, str(self.retries).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _attempt(self, scope: Scope, request: _Request, attempt: int) -> list[Message] | None:
        """One pass through the proxy: its response messages when complete, else None."""
        held: list[Message] = []
        complete = False

        async def hold(message: Message) -> None:
            nonlocal complete
            held.append(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                complete = True

        try:
            # A copy: the proxy rewrites the scope's root_path as it routes.
            await self.app(dict(scope), request.replay(), hold)
        except Exception as exc:  # the proxy answers its own errors; anything else: try again
            logger.warning(f"retry middleware: attempt {attempt + 1} raised {type(exc).__name__}: {exc}")
        return held if complete else None

    async def _send(self, send: Send, messages: list[Message], retries: int) -> None:
        start = messages[0]
        if start["type"] == "http.response.start" and (retries or start["status"] == 503):
            headers: list[Any] = list(start.get("headers", []))
            if retries:
                headers.append((RETRIES_HEADER, str(retries).encode()))
            if start["status"] == 503 and not any(k.lower() == b"retry-after" for k, _ in headers):
                headers.append((b"retry-after", self.retry_after))  # Serve's "no replica" 503 lacks it
            messages = [{**start, "headers": headers}, *messages[1:]]
        for message in messages:
            await send(message)
