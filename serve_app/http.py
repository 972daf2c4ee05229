"""HTTP plumbing of the server: bounded body reads, content types, multipart, JSON errors.

Everything a client can send wrong ends here as ``HttpError(status, reason)``,
which the ingress turns into ``{"error": reason}`` with that status.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

_PARAM = re.compile(r';\s*([A-Za-z0-9_.*!#$%&\'^`|~+-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')
_TOP_K = re.compile(r"[0-9]{1,4}")
MAX_TOP_K = 10


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
    main, _, rest = value.partition(";")
    params: dict[str, str] = {}
    for m in _PARAM.finditer(";" + rest):
        raw = m.group(2).strip()
        if len(raw) >= 2 and raw[0] == raw[-1] == '"':
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        params[m.group(1).lower()] = raw
    return main.strip().lower(), params


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, or 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise HttpError(400, "invalid Content-Length header")
        if int(declared) > limit:
            raise HttpError(413, f"request body of {int(declared)} bytes is over the limit of {limit} bytes")
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise HttpError(413, f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_top_k(raw: str | None, default: int) -> int:
    if raw is None:
        return default
    text = raw.strip()
    if not _TOP_K.fullmatch(text) or not 1 <= int(text) <= MAX_TOP_K:
        raise HttpError(422, f"top_k must be an integer from 1 to {MAX_TOP_K}, got {raw[:20]!r}")
    return int(text)


@dataclass
class Part:
    name: str | None
    filename: str | None
    content_type: str | None
    data: bytes


def parse_multipart(body: bytes, boundary: str | None) -> list[Part]:
    """Split a ``multipart/form-data`` body (RFC 7578) into its parts.

    The body is already in memory and bounded; parts are slices of it.
    """
    if not boundary or len(boundary) > 200:
        raise HttpError(400, "multipart body without a valid boundary parameter")
    dash = b"--" + boundary.encode("latin-1", errors="replace")
    start = body.find(dash)
    if start < 0 or (start > 0 and body[start - 2 : start] != b"\r\n"):
        raise HttpError(400, "malformed multipart body: boundary not found")
    pos = start + len(dash)
    parts: list[Part] = []
    while True:
        if body[pos : pos + 2] == b"--":
            return parts
        eol = body.find(b"\r\n", pos)
        if eol < 0 or body[pos:eol].strip(b" \t"):
            raise HttpError(400, "malformed multipart body: truncated or bad delimiter line")
        pos = eol + 2
        end = body.find(b"\r\n" + dash, pos)
        if end < 0:
            raise HttpError(400, "malformed multipart body: no closing boundary (truncated?)")
        parts.append(_part(body[pos:end]))
        pos = end + 2 + len(dash)


def _part(raw: bytes) -> Part:
    if raw.startswith(b"\r\n"):
        head, data = b"", raw[2:]
    else:
        split = raw.find(b"\r\n\r\n")
        if split < 0:
            raise HttpError(400, "malformed multipart body: part without a blank line after its headers")
        head, data = raw[:split], raw[split + 4 :]
    headers: dict[str, str] = {}
    for line in head.decode("utf-8", errors="replace").split("\r\n"):
        key, sep, value = line.partition(":")
        if not sep:
            raise HttpError(400, "malformed multipart body: bad part header line")
        headers[key.strip().lower()] = value.strip()
    _, disp = parse_header_value(headers.get("content-disposition", ""))
    ctype = headers.get("content-type")
    return Part(disp.get("name"), disp.get("filename"), parse_header_value(ctype)[0] if ctype else None, data)
