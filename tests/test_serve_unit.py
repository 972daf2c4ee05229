"""Serving pieces without a cluster: safe decoding, HTTP parsing, settings, build-time errors."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from serve_support import ROOT, encode
from support import multipart

from rayvit.errors import UserError
from rayvit.imageio import (
    ImageTooCostlyError,
    ImageTooLargeError,
    UndecodableImageError,
    decode_image,
    decoded_size,
    read_image_file,
)
from rayvit.preprocess import to_uint8_array
from serve_app import BuildError, app, build_app
from serve_app.http import (
    ApiKeys,
    HttpError,
    bearer_token,
    parse_header_value,
    parse_top_k,
    read_files,
    require_key,
)
from serve_app.settings import deployment_options, merge, replica_settings

RNG = np.random.default_rng(0)
RGB = Image.fromarray(RNG.integers(0, 256, (24, 40, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    ("image", "fmt", "kwargs"),
    [
        (RGB, "PNG", {}),
        (RGB, "JPEG", {}),
        (RGB, "WEBP", {"lossless": True}),
        (RGB, "BMP", {}),
        (RGB, "TIFF", {}),
        (RGB.convert("P"), "GIF", {}),
        (RGB.convert("L"), "PNG", {}),
        (RGB.convert("LA"), "PNG", {}),
        (RGB.convert("RGBA"), "PNG", {}),
        (RGB.convert("CMYK"), "JPEG", {}),
        (RGB.convert("CMYK"), "TIFF", {}),
        (RGB.convert("1"), "PNG", {}),
        (Image.fromarray(RNG.integers(0, 65535, (24, 40), dtype=np.uint16)), "PNG", {}),
        (Image.fromarray(RNG.random((24, 40), dtype=np.float32)), "TIFF", {}),
    ],
)
def test_every_real_mode_decodes_to_rgb_uint8(
    image: Image.Image, fmt: str, kwargs: dict[str, object]
) -> None:
    arr = decode_image(encode(image, fmt, **kwargs))
    assert arr.shape == (24, 40, 3) and arr.dtype == np.uint8
    assert arr.std() > 0  # real content, not a blank conversion


def test_float_images_are_scaled_not_clipped_to_black() -> None:
    arr = decode_image(encode(Image.fromarray(np.full((4, 4), 0.5, np.float32)), "TIFF"))
    assert 120 <= arr.mean() <= 135


def test_animated_gif_gives_first_frame_and_exif_rotation_is_applied() -> None:
    red = Image.new("RGB", (8, 8), (255, 0, 0))
    blue = Image.new("RGB", (8, 8), (0, 0, 255))
    arr = decode_image(encode(red, "GIF", save_all=True, append_images=[blue], duration=50))
    assert arr[..., 0].mean() > 200 and arr[..., 2].mean() < 50
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    arr = decode_image(encode(Image.new("RGB", (30, 10), (0, 255, 0)), "JPEG", exif=exif.tobytes()))
    assert arr.shape == (30, 10, 3)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello",
        b"<svg xmlns='http://www.w3.org/2000/svg'/>",
        b"<html></html>",
        b'{"image": 1}',
        encode(RGB, "PNG")[:60],
        encode(RGB, "JPEG")[:200],
        encode(RGB, "GIF")[:40],
        encode(RGB, "ICO"),
    ],
)
def test_bad_bytes_raise_undecodable(data: bytes) -> None:
    with pytest.raises(UndecodableImageError):
        decode_image(data)


def test_pixel_limit_is_checked_before_decoding() -> None:
    data = encode(Image.new("L", (4000, 4000)), "PNG")  # small file, 16 MP
    with pytest.raises(ImageTooLargeError, match="4000x4000"):
        decode_image(data, max_pixels=1_000_000)
    assert decode_image(data, max_pixels=16_000_000).shape == (4000, 4000, 3)


def test_read_image_file_matches_the_offline_path(tmp_path: Path) -> None:
    f = tmp_path / "x.png"
    RGB.convert("RGBA").save(f)
    with Image.open(f) as im:
        assert np.array_equal(read_image_file(f), to_uint8_array(im))


def test_header_parsing() -> None:
    assert parse_header_value('multipart/form-data; boundary="a b;c"') == (
        "multipart/form-data",
        {"boundary": "a b;c"},
    )
    assert parse_header_value("Image/PNG") == ("image/png", {})


def _multipart(parts: list[tuple[str, str, bytes]]) -> bytes:
    return multipart(parts, boundary="XyZ")  # the first part's data holds a prefix of the boundary


def _read_files(body: bytes, ctype: str, max_files: int = 4) -> list[tuple[str | None, bytes]]:
    import asyncio

    return asyncio.run(read_files(body, ctype, max_files))


def test_multipart_files_with_limits() -> None:
    ctype = "multipart/form-data; boundary=XyZ"
    body = _multipart([("file", "image/png", b"\x89PNG\r\n--Xy"), ("note", "text/plain", b"hi")])
    assert _read_files(body, ctype) == [("0.png", b"\x89PNG\r\n--Xy")]
    five = _multipart([("file", "image/png", b"x")] * 5)
    with pytest.raises(HttpError) as err:
        _read_files(five, ctype)
    assert err.value.status == 413
    for bad, bad_ctype, status in [
        (body, "multipart/form-data", 400),
        (_multipart([("other", "image/png", b"x")]), ctype, 400),
        (_multipart([("file", "text/plain", b"x")]), ctype, 415),
    ]:
        with pytest.raises(HttpError) as err:
            _read_files(bad, bad_ctype)
        assert err.value.status == status, bad_ctype


def test_api_keys_from_env_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAYVIT_API_KEYS", raising=False)
    assert not ApiKeys.load(None).enabled
    keys = tmp_path / "keys"
    keys.write_text("# comment\nfile-key\n\n")
    monkeypatch.setenv("RAYVIT_API_KEYS", "env-a, env-b")
    loaded = ApiKeys.load(str(keys))
    assert loaded.enabled and all(loaded.check(k) for k in ("env-a", "env-b", "file-key"))
    assert not loaded.check("# comment") and not loaded.check("") and not loaded.check(None)
    with pytest.raises(UserError, match=r"api_keys_file .*nope cannot be read"):
        ApiKeys.load(str(tmp_path / "nope"))


def test_top_k_and_bearer_key_are_parsed_strictly() -> None:
    assert parse_top_k(None) is None
    assert [parse_top_k(v) for v in ("1", "10", " 3 ", "007")] == [1, 10, 3, 7]
    for bad in ("0", "11", "abc", "2.5", "", "-1", "+3", "1_0", "\u0663", "1e1"):
        with pytest.raises(HttpError) as err:
            parse_top_k(bad)
        assert err.value.status == 422 and "top_k must be an integer from 1 to 10" in err.value.reason, bad
    assert bearer_token("Bearer abc") == "abc" and bearer_token("bearer  abc ") == "abc"
    assert (
        bearer_token("Basic abc") is None and bearer_token("Bearer ") is None and bearer_token(None) is None
    )
    require_key(ApiKeys([]), None)  # keys off: nothing needed
    keys = ApiKeys(["k1"])
    require_key(keys, "k1")
    for wrong in (None, "k2", ""):
        with pytest.raises(HttpError) as err:
            require_key(keys, wrong)
        assert err.value.status == 401 and err.value.headers == {"WWW-Authenticate": "Bearer"}


def test_large_images_are_reduced_while_decoding_never_below_the_target() -> None:
    jpeg = encode(Image.new("RGB", (4000, 3000), (10, 200, 30)), "JPEG")
    assert decoded_size(jpeg, target_size=224) == (500, 375)  # DCT scaling 1/8, still >= 224
    png16 = encode(Image.fromarray(np.full((3000, 2000), 40000, np.uint16)), "PNG")
    arr = decode_image(png16, target_size=224)
    assert arr.shape == (375, 250, 3) and min(arr.shape[:2]) >= 224
    assert decode_image(png16).shape == (3000, 2000, 3)
    assert abs(int(arr.mean()) - int(decode_image(png16).mean())) <= 1
    small = encode(RGB, "PNG")  # up to twice the target: decoded exactly as without one
    assert np.array_equal(decode_image(small, target_size=16), decode_image(small))


def jpeg_scan_bomb(side: int = 2000, repeats: int = 1500) -> bytes:
    """A valid progressive JPEG followed by ``repeats`` copies of its smallest scan."""
    data = encode(Image.new("RGB", (side, side), (120, 30, 200)), "JPEG", progressive=True, quality=50)
    starts = [i for i in range(len(data) - 1) if data[i : i + 2] == b"\xff\xda"]
    scans = [data[a:b] for a, b in zip(starts, [*starts[1:], len(data) - 2], strict=True)]
    return data[:-2] + min(scans, key=len) * repeats + b"\xff\xd9"


def test_jpeg_scan_bomb_is_refused_before_decoding() -> None:
    import time

    bomb = jpeg_scan_bomb()
    t0 = time.perf_counter()
    with pytest.raises(ImageTooCostlyError, match="scans, over the limit of 64"):
        decode_image(bomb)
    assert time.perf_counter() - t0 < 0.5
    ok = encode(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG", progressive=True)
    assert decode_image(ok).shape == (64, 64, 3)


def test_settings_come_from_the_serve_config() -> None:
    opts = deployment_options()
    assert opts["autoscaling_config"]["min_replicas"] >= 1
    assert opts["autoscaling_config"]["max_replicas"] >= opts["autoscaling_config"]["min_replicas"]
    s = replica_settings(opts["user_config"])
    assert s.max_batch_size >= 1 and s.max_body_bytes == 10 * 1024 * 1024
    assert merge({"a": {"b": 1, "c": 2}}, {"a": {"b": 3}}) == {"a": {"b": 3, "c": 2}}
    with pytest.raises(UserError, match="max_batch_size"):
        replica_settings({"max_batch_size": 0})
    with pytest.raises(UserError, match="unknown key 'max_batchsize'"):
        replica_settings({"max_batchsize": 8})


def test_missing_or_broken_model_folder_fails_at_build_time(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match=f"model folder not found: {tmp_path / 'nope'}"):
        build_app(tmp_path / "nope")
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(UserError, match=re.escape("incomplete: missing config.json, model.safetensors")):
        build_app(bad)
    (bad / "config.json").write_text('{"id2label": {"0": "a"}}')
    (bad / "preprocessor_config.json").write_text("{}")
    (bad / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(BuildError, match=f"model folder {bad}: model.safetensors cannot be read"):
        build_app(bad)
    with pytest.raises(BuildError, match="unknown application argument"):
        app({"modeldir": str(bad)})


def test_model_with_non_finite_weights_fails_at_build_time(tmp_path: Path) -> None:
    import torch

    from rayvit.checkpoint import save_model_folder
    from rayvit.config import load_config
    from rayvit.model import build_model, build_preprocessor

    cfg = load_config(
        ROOT / "configs" / "quick.yaml",
        ["model.arch.hidden_size=32", "model.arch.num_attention_heads=2", "model.arch.num_hidden_layers=1"],
    )
    model = build_model(cfg.model, ["a", "b"])
    with torch.no_grad():
        next(iter(model.parameters())).fill_(float("nan"))
    save_model_folder(model, build_preprocessor(cfg.model), tmp_path / "nan")
    with pytest.raises(
        BuildError, match=r"weights are not finite \(\d+ NaN/inf values in .*\); the run diverged"
    ):
        build_app(tmp_path / "nan")


def test_serve_run_cli_prints_one_line_for_a_missing_model(tmp_path: Path) -> None:
    missing = tmp_path / "no-model"
    proc = subprocess.run(
        [sys.executable, "-m", "ray.serve.scripts", "run", "serve_app:app", f"model_dir={missing}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert f"Error: model folder not found: {missing}" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr + proc.stdout


def test_launcher_keeps_loopback_unless_told_and_then_needs_keys() -> None:
    from serve_app.__main__ import prepare
    from serve_app.settings import DEFAULT_CONFIG

    data, host = prepare(DEFAULT_CONFIG, {})
    assert host == "127.0.0.1" and data["http_options"]["host"] == "127.0.0.1"  # type: ignore[index]
    with pytest.raises(SystemExit, match=r"refusing to listen on 0\.0\.0\.0 without API keys"):
        prepare(DEFAULT_CONFIG, {"RAYVIT_SERVE_HOST": "0.0.0.0"})
    _, host = prepare(DEFAULT_CONFIG, {"RAYVIT_SERVE_HOST": "0.0.0.0", "RAYVIT_API_KEYS": "k"})
    assert host == "0.0.0.0"
    _, host = prepare(DEFAULT_CONFIG, {"RAYVIT_SERVE_HOST": "::1"})
    assert host == "::1"


# -- the proxy's retry middleware (serve_app.retry), driven as Serve's proxy drives it ---------------


class _Proxy:
    """An ASGI app that, like Serve's proxy when the replica holding a request dies, returns
    without a response on its first ``failures`` calls; then it echoes the request body."""

    def __init__(self, failures: int, status: int = 200, headers: list[tuple[bytes, bytes]] | None = None):
        self.failures = failures
        self.status = status
        self.headers = headers or [(b"content-type", b"application/json")]
        self.bodies: list[bytes] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        scope["root_path"] = scope.get("root_path", "") + "/app"  # the proxy rewrites the scope
        assert scope["root_path"] == "/app"
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.bodies.append(body)
        if len(self.bodies) <= self.failures:
            return
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        await send({"type": "http.response.body", "body": body})


def _call(
    app: Any, path: str = "/app/predict", method: str = "POST", disconnect: bool = False
) -> list[dict[str, Any]]:
    import asyncio

    from serve_app.retry import RetryMiddleware

    chunks = [
        {"type": "http.request", "body": b"part1-", "more_body": True},
        {"type": "http.request", "body": b"part2", "more_body": False},
    ]
    if disconnect:
        chunks = [{"type": "http.disconnect"}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if chunks:
            return chunks.pop(0)
        await asyncio.sleep(3600)  # the client keeps the connection open
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "root_path": "", "headers": []}
    asyncio.run(RetryMiddleware(app, retries=2, retry_after_s=1)(scope, receive, send))
    return sent


def test_retry_middleware_replays_the_body_to_a_second_attempt() -> None:
    proxy = _Proxy(failures=1)
    sent = _call(proxy)
    assert proxy.bodies == [b"part1-part2", b"part1-part2"]  # the client sent it once
    assert sent[0]["status"] == 200 and (b"x-rayvit-retries", b"1") in sent[0]["headers"]
    assert sent[1]["body"] == b"part1-part2"


def test_retry_middleware_answers_json_503_with_retry_after_when_no_attempt_answers() -> None:
    import json

    proxy = _Proxy(failures=10)
    sent = _call(proxy)
    assert len(proxy.bodies) == 3  # the first attempt and two retries
    headers = dict(sent[0]["headers"])
    assert sent[0]["status"] == 503 and headers[b"retry-after"] == b"1"
    assert headers[b"content-type"] == b"application/json"
    assert "retry later" in json.loads(sent[1]["body"])["error"]


def test_retry_middleware_leaves_other_requests_and_gone_clients_alone() -> None:
    proxy = _Proxy(failures=1)
    assert _call(proxy, path="/app/upload") == [] and len(proxy.bodies) == 1  # not a prediction: no retry
    proxy = _Proxy(failures=1)
    assert _call(proxy, disconnect=True) == [] and proxy.bodies == []  # the client left: no retry
    # Serve's own 503 (no replica yet) gets the Retry-After it lacks; other answers pass unchanged.
    sent = _call(_Proxy(failures=0, status=503, headers=[(b"content-type", b"text/plain")]))
    assert sent[0]["status"] == 503 and (b"retry-after", b"1") in sent[0]["headers"]
    sent = _call(_Proxy(failures=0), method="GET", path="/app/health")
    assert sent[0] == {"type": "http.response.start", "status": 200, "headers": _Proxy(0).headers}


def test_the_retry_middleware_loads_without_the_model_code() -> None:
    """Serve's proxy imports it: it must not pull torch into the proxy process."""
    code = (
        "import sys, serve_app.retry as r; m = r.proxy_middlewares(); "
        "assert 'torch' not in sys.modules and m[0].cls is r.RetryMiddleware; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]
