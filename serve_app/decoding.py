"""Decoding of a request's images off the event loop: a bounded pool, a budget and a deadline.

A request's files are decoded by one job in a small thread pool (PIL releases
the GIL while it decodes), so the replica's event loop keeps answering while
an image is decoded. Before any pixel is decoded, every file's header is read
and the request's decoded pixels are summed against ``max_request_pixels``;
the job then decodes the files one by one, each reduced to the model's input
size where it is much larger. Memory per decoding thread is thus bounded by
one image of ``max_pixels``, and the pool's size bounds the threads.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from rayvit.imageio import (
    ImageError,
    ImageTooCostlyError,
    ImageTooLargeError,
    decode_to_side,
    decoded_size,
)
from serve_app.http import HttpError
from serve_app.settings import ReplicaSettings


@dataclass(frozen=True)
class DecodeLimits:
    max_pixels: int
    max_request_pixels: int
    max_jpeg_scans: int
    target_size: int
    timeout_s: float
    retry_after_s: int

    @classmethod
    def of(cls, settings: ReplicaSettings, target_size: int) -> DecodeLimits:
        return cls(
            settings.max_pixels,
            settings.max_request_pixels,
            settings.max_jpeg_scans,
            target_size,
            settings.decode_timeout_s,
            settings.retry_after_s,
        )


class DecodePool:
    """``decode_threads`` threads shared by all requests of a replica."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="decode")

    def resize(self, threads: int) -> None:
        if threads != self.threads:
            old, self._pool, self.threads = self._pool, ThreadPoolExecutor(threads, "decode"), threads
            old.shutdown(wait=False)

    async def decode(self, blobs: list[bytes], limits: DecodeLimits) -> list[np.ndarray]:
        """The images of one request, or ``HttpError`` (400, 413, 422, 503)."""
        deadline = time.monotonic() + limits.timeout_s
        job = self._pool.submit(decode_request, blobs, limits, deadline)
        try:
            async with asyncio.timeout(limits.timeout_s):  # cancels the job too if it has not started
                return await asyncio.wrap_future(job)
        except TimeoutError:
            if job.cancel():  # never started: the pool was busy with other requests
                raise HttpError(
                    503,
                    f"server busy: decoding did not start within {limits.timeout_s:g} s; retry later",
                    {"Retry-After": str(limits.retry_after_s)},
                ) from None
            # started and still running (it finishes in its thread; bounded by the limits above)
            raise HttpError(
                422, f"images took over {limits.timeout_s:g} s to decode: refused as too costly"
            ) from None


def decode_request(blobs: list[bytes], limits: DecodeLimits, deadline: float) -> list[np.ndarray]:
    """Check every header and the request's pixel budget, then decode; runs in a pool thread."""
    total = 0
    for i, blob in enumerate(blobs):
        with _as_http_error(i, len(blobs)):
            width, height = decoded_size(
                blob, limits.max_pixels, target_size=limits.target_size, max_jpeg_scans=limits.max_jpeg_scans
            )
        total += width * height
    if total > limits.max_request_pixels:
        raise HttpError(
            413,
            f"{len(blobs)} image(s) of {total} pixels in all, over the limit of "
            f"{limits.max_request_pixels} decoded pixels per request",
        )
    images = []
    for i, blob in enumerate(blobs):
        if time.monotonic() > deadline:
            raise HttpError(422, "images took too long to decode: refused as too costly")
        with _as_http_error(i, len(blobs)):
            images.append(
                decode_to_side(
                    blob, limits.target_size, limits.max_pixels, max_jpeg_scans=limits.max_jpeg_scans
                )
            )
    return images


class _as_http_error:  # noqa: N801 (used as a context manager, like contextlib's)
    """``ImageError`` -> ``HttpError``: 413 too large, 422 too costly, 400 otherwise."""

    def __init__(self, index: int, count: int) -> None:
        self.where = f"file {index + 1}: " if count > 1 else ""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, ImageError):
            status = (
                413
                if isinstance(exc, ImageTooLargeError)
                else 422
                if isinstance(exc, ImageTooCostlyError)
                else 400
            )
            raise HttpError(status, f"{self.where}{exc}") from None
