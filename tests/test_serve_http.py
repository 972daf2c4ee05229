"""The served application over real HTTP on 127.0.0.1: formats, batching, errors, parity with offline."""

from __future__ import annotations

import json
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import torch
from PIL import Image
from serve_support import Models, encode, offline_tensor, plain_pil_tensor, wait_until
from support import MULTIPART, multipart

from rayvit.predict import Predictor

TIMEOUT = 30
CT = "Content-Type"


def post_raw(base: str, data: bytes, ctype: str | None = "image/png", query: str = "") -> requests.Response:
    headers = {CT: ctype} if ctype is not None else {}
    return requests.post(f"{base}/predict{query}", data=data, headers=headers, timeout=TIMEOUT)


def cifar_png(images: np.ndarray, i: int) -> bytes:
    return encode(images[i])


def check_prediction(body: dict[str, Any], top_k: int = 3) -> None:
    assert set(body) >= {"label", "probability", "top_k", "model"}
    assert body["model"] == {"name": "model-a", "version": "1"}
    probs = [t["probability"] for t in body["top_k"]]
    assert len(probs) == top_k and probs == sorted(probs, reverse=True)
    assert body["top_k"][0] == {"label": body["label"], "probability": body["probability"]}
    # a softmax over the 10 classes: the top class has at least a tenth, all of them at most 1
    assert probs[0] >= 0.1 - 1e-6 and probs[-1] > 0 and sum(probs) <= 1 + 1e-4


def test_raw_png_and_top_k(classifier: str, cifar_test: tuple[np.ndarray, np.ndarray]) -> None:
    images, _ = cifar_test
    r = post_raw(classifier, cifar_png(images, 0))
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    check_prediction(r.json())
    r10 = post_raw(classifier, cifar_png(images, 0), query="?top_k=10")
    body = r10.json()
    check_prediction(body, 10)
    assert abs(sum(t["probability"] for t in body["top_k"]) - 1.0) < 1e-4  # softmax over all classes
    assert len({t["label"] for t in body["top_k"]}) == 10
    check_prediction(post_raw(classifier, cifar_png(images, 0), query="?top_k=1").json(), 1)


@pytest.mark.parametrize(
    ("fmt", "ctype", "kwargs"),
    [
        ("JPEG", "image/jpeg", {"quality": 95}),
        ("WEBP", "image/webp", {"lossless": True}),
        ("GIF", "image/gif", {}),
        ("BMP", "image/bmp", {}),
        ("TIFF", "image/tiff", {}),
        ("PNG", "application/octet-stream", {}),
    ],
)
def test_every_accepted_format(
    classifier: str, cifar_test: tuple[np.ndarray, np.ndarray], fmt: str, ctype: str, kwargs: dict[str, Any]
) -> None:
    r = post_raw(classifier, encode(cifar_test[0][1], fmt, **kwargs), ctype)
    assert r.status_code == 200, r.text
    check_prediction(r.json())


def test_multipart_one_and_several_files_in_order(
    classifier: str, cifar_test: tuple[np.ndarray, np.ndarray]
) -> None:
    images, _ = cifar_test
    n = 20  # over the fixture's max_batch_size (16): one request spans more than one forward pass
    blobs = [cifar_png(images, i) for i in range(n)]
    singles = [post_raw(classifier, b).json() for b in blobs]
    one = requests.post(
        f"{classifier}/predict", files={"file": ("a.png", blobs[0], "image/png")}, timeout=TIMEOUT
    )
    assert one.status_code == 200 and one.json()["label"] == singles[0]["label"]
    files = [("file", (f"{i}.png", b, "image/png")) for i, b in enumerate(blobs)]
    many = requests.post(f"{classifier}/predict?top_k=2", files=files, timeout=TIMEOUT)
    assert many.status_code == 200, many.text
    preds = many.json()["predictions"]
    assert [p["label"] for p in preds] == [s["label"] for s in singles]
    assert [p["filename"] for p in preds] == [f"{i}.png" for i in range(n)]
    for p, s in zip(preds, singles, strict=True):
        check_prediction(p, 2)
        assert p["probability"] == pytest.approx(s["probability"], abs=1e-5)


def test_server_top1_equals_offline_predictor_on_100_cifar_images(
    classifier: str, tiny_models: Models, cifar_test: tuple[np.ndarray, np.ndarray]
) -> None:
    images, _ = cifar_test
    assert len(images) == 100
    offline = Predictor(tiny_models.a, device=torch.device("cpu")).predict(list(images), top_k=1)
    with ThreadPoolExecutor(8) as pool:  # concurrent requests, so the server batches them
        served = list(pool.map(lambda i: post_raw(classifier, cifar_png(images, i)), range(100)))
    assert all(r.status_code == 200 for r in served)
    labels = [r.json()["label"] for r in served]
    assert labels == [p.label for p in offline]
    for r, p in zip(served, offline, strict=True):
        assert r.json()["probability"] == pytest.approx(p.probability, abs=1e-4)
    assert len(set(labels)) >= 3, "the test model should not predict one class for everything"


def test_server_tensor_equals_offline_tensor_for_the_same_file(
    classifier: str, tiny_models: Models, cifar_test: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    from ray import serve

    images, _ = cifar_test
    exif = Image.Exif()
    exif[0x0112] = 8
    files: dict[str, tuple[Image.Image, dict[str, Any]]] = {
        "cifar.png": (Image.fromarray(images[3]), {}),
        "rgba.png": (Image.fromarray(images[4]).convert("RGBA"), {}),
        "rotated.jpg": (Image.fromarray(images[5]).resize((48, 40)), {"exif": exif.tobytes()}),
        "cmyk.jpg": (Image.fromarray(images[6]).convert("CMYK"), {}),
        "gray16.png": (Image.fromarray(images[7][..., 0].astype(np.uint16) * 257), {}),
        "big.webp": (Image.fromarray(images[8]).resize((320, 200)), {"lossless": True}),
    }
    pre = Predictor(tiny_models.a, device=torch.device("cpu")).pre
    handle = serve.get_app_handle("rayvit")
    for name, (image, kwargs) in files.items():
        path = tmp_path / name
        image.save(path, **kwargs)
        served = handle.pixel_values.remote(path.read_bytes()).result(timeout_s=TIMEOUT)
        expected = offline_tensor(pre, path).numpy()
        assert served.shape == expected.shape == (1, 3, 32, 32), name
        assert np.array_equal(served, expected), name
        plain = plain_pil_tensor(pre, path).numpy()
        if min(image.size) < 2 * 32:  # not reduced while decoding: the same as decoding at full size
            assert np.array_equal(served, plain), name
        else:  # reduced (320x200 -> 54x34 by a 6x6 box) before the model's antialiased resize
            assert np.abs(served - plain).mean() < 0.1, name  # normalized units: ~6 of 255


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge size (a decompression bomb as far as the header says)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def _corpus(images: np.ndarray) -> list[tuple[str, str, str, bytes | None, str | None, int]]:
    """(name, method, path+query, body, content type, expected status)."""
    png = cifar_png(images, 9)
    rgb = Image.fromarray(images[9])
    exif = Image.Exif()
    exif[0x0112] = 6
    gif_frames = [rgb, rgb.rotate(90), rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    bomb = encode(Image.new("L", (8000, 8000)), "PNG")  # 64 MP of zeros, ~60 KB compressed
    large = encode(Image.fromarray(np.tile(images[9], (90, 90, 1))), "JPEG", quality=70)  # 2880x2880
    mp = MULTIPART
    return [
        ("empty body", "POST", "/predict", b"", "image/png", 400),
        ("truncated png", "POST", "/predict", png[: len(png) // 2], "image/png", 400),
        ("truncated jpeg", "POST", "/predict", encode(rgb, "JPEG")[:300], "image/jpeg", 400),
        ("png header only", "POST", "/predict", png[:8], "image/png", 400),
        ("text as png", "POST", "/predict", b"just some text", "image/png", 400),
        ("random bytes", "POST", "/predict", bytes(range(256)) * 8, "application/octet-stream", 400),
        ("svg as png", "POST", "/predict", b'<svg xmlns="http://www.w3.org/2000/svg"/>', "image/png", 400),
        ("ico as png", "POST", "/predict", encode(rgb, "ICO"), "image/png", 400),
        ("plain text", "POST", "/predict", b"hello", "text/plain", 415),
        ("html", "POST", "/predict", b"<html><body>hi</body></html>", "text/html", 415),
        ("svg", "POST", "/predict", b'<svg xmlns="http://www.w3.org/2000/svg"/>', "image/svg+xml", 415),
        ("json", "POST", "/predict", b'{"image": "aGVsbG8="}', "application/json", 415),
        ("form urlencoded", "POST", "/predict", png, "application/x-www-form-urlencoded", 415),
        ("png sent as svg", "POST", "/predict", png, "image/svg+xml", 415),
        ("no content type", "POST", "/predict", png, None, 415),
        ("decompression bomb", "POST", "/predict", bomb, "image/png", 413),
        ("header claims 1e10 px", "POST", "/predict", _png_claiming(100_000, 100_000), "image/png", 413),
        ("oversize body", "POST", "/predict", b"\x00" * (10 * 1024 * 1024 + 1), "image/png", 413),
        ("top_k=0", "POST", "/predict?top_k=0", png, "image/png", 422),
        ("top_k=11", "POST", "/predict?top_k=11", png, "image/png", 422),
        ("top_k=abc", "POST", "/predict?top_k=abc", png, "image/png", 422),
        ("top_k=2.5", "POST", "/predict?top_k=2.5", png, "image/png", 422),
        ("GET /predict", "GET", "/predict", None, None, 405),
        ("PUT /predict", "PUT", "/predict", png, "image/png", 405),
        ("POST /healthz", "POST", "/healthz", b"", "text/plain", 405),
        ("DELETE /", "DELETE", "/", None, None, 405),
        ("unknown path", "GET", "/nope", None, None, 404),
        (
            "multipart no boundary",
            "POST",
            "/predict",
            multipart([("file", "image/png", png)]),
            "multipart/form-data",
            400,
        ),
        ("multipart no file part", "POST", "/predict", multipart([("other", "image/png", png)]), mp, 400),
        ("multipart text part", "POST", "/predict", multipart([("file", "text/plain", b"hi")]), mp, 415),
        (
            "multipart bad image",
            "POST",
            "/predict",
            multipart([("file", "image/png", png), ("file", None, b"x")]),
            mp,
            400,
        ),
        ("multipart empty file", "POST", "/predict", multipart([("file", "image/png", b"")]), mp, 400),
        ("multipart truncated", "POST", "/predict", multipart([("file", "image/png", png)])[:-30], mp, 400),
        ("multipart 65 files", "POST", "/predict", multipart([("file", "image/png", png)] * 65), mp, 413),
        # odd but real images: converted, not rejected
        (
            "16-bit png",
            "POST",
            "/predict",
            encode(Image.fromarray(images[9][..., 0].astype(np.uint16) * 257)),
            "image/png",
            200,
        ),
        ("cmyk jpeg", "POST", "/predict", encode(rgb.convert("CMYK"), "JPEG"), "image/jpeg", 200),
        ("cmyk tiff", "POST", "/predict", encode(rgb.convert("CMYK"), "TIFF"), "image/tiff", 200),
        ("rgba png", "POST", "/predict", encode(rgb.convert("RGBA")), "image/png", 200),
        ("la png", "POST", "/predict", encode(rgb.convert("LA")), "image/png", 200),
        ("grey png", "POST", "/predict", encode(rgb.convert("L")), "image/png", 200),
        ("1-bit png", "POST", "/predict", encode(rgb.convert("1")), "image/png", 200),
        ("palette png", "POST", "/predict", encode(palette, "PNG", transparency=0), "image/png", 200),
        (
            "animated gif",
            "POST",
            "/predict",
            encode(gif_frames[0], "GIF", save_all=True, append_images=gif_frames[1:]),
            "image/gif",
            200,
        ),
        ("1x1 png", "POST", "/predict", encode(Image.new("RGB", (1, 1), (200, 10, 10))), "image/png", 200),
        ("large jpeg", "POST", "/predict", large, "image/jpeg", 200),
        (
            "exif rotated jpeg",
            "POST",
            "/predict",
            encode(rgb.resize((64, 48)), "JPEG", exif=exif.tobytes()),
            "image/jpeg",
            200,
        ),
        ("jpeg labelled png", "POST", "/predict", encode(rgb, "JPEG"), "image/png", 200),
        ("content type params", "POST", "/predict", png, "Image/PNG; charset=binary", 200),
    ]


def test_corpus_of_bad_and_odd_inputs_never_gives_5xx(
    classifier: str, cifar_test: tuple[np.ndarray, np.ndarray]
) -> None:
    corpus = _corpus(cifar_test[0])
    assert sum(1 for c in corpus if c[5] != 200) >= 20
    wrong = []
    for name, method, path, body, ctype, expected in corpus:
        headers = {CT: ctype} if ctype else {}
        r = requests.request(method, classifier + path, data=body, headers=headers, timeout=TIMEOUT)
        assert r.status_code < 500, f"{name}: {r.status_code} {r.text[:200]}"
        assert "Traceback" not in r.text, name
        if r.status_code != expected:
            wrong.append(f"{name}: expected {expected}, got {r.status_code} {r.text[:200]}")
            continue
        if expected == 200:
            check_prediction(r.json())
        else:
            body_json = r.json()
            assert set(body_json) == {"error"} and body_json["error"], name
            if expected == 405:
                assert r.headers.get("allow"), name
    assert not wrong, "\n".join(wrong)
    health = requests.get(f"{classifier}/healthz", timeout=TIMEOUT)
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_health_model_info_and_upload_page(classifier: str) -> None:
    h = requests.get(f"{classifier}/healthz", timeout=TIMEOUT)
    assert h.status_code == 200 and h.json() == {"status": "ok", "model": {"name": "model-a", "version": "1"}}
    info = requests.get(f"{classifier}/model", timeout=TIMEOUT).json()
    assert info["name"] == "model-a" and info["metrics"]["seed"] == 1
    assert info["config"]["image_size"] == 32 and info["config"]["num_labels"] == 10
    assert info["config"]["model_type"] == "vit" and info["config"]["preprocessing"]["resample"] == "bilinear"
    assert info["labels"][:2] == ["airplane", "automobile"]
    assert info["serving"]["max_batch_size"] == 16
    page = requests.get(f"{classifier}/", timeout=TIMEOUT)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert 'type="file"' in html and "drop" in html and "/predict" in html
    assert "http://" not in html and "https://" not in html  # no external assets


def test_batching_settings_change_at_runtime_without_restart(
    classifier: str, tiny_models: Models, cifar_test: tuple[np.ndarray, np.ndarray]
) -> None:
    """A new ``user_config`` (as ``serve deploy`` of an edited serve.yaml) reaches ``reconfigure`` live,
    and its torch thread count reaches the thread that runs the model."""
    from ray import serve
    from serve_support import TEST_OPTIONS, deploy_config, serve_config

    handle = serve.get_app_handle("rayvit")
    before = handle.replica_info.remote().result(timeout_s=TIMEOUT)
    assert before["settings"]["max_batch_size"] == 16 and before["batch"] == [16, 0.002]
    assert before["torch_threads"] == 1
    new = {
        **TEST_OPTIONS["user_config"],
        "max_batch_size": 8,
        "batch_wait_timeout_s": 0.02,
        "torch_threads": 2,
    }

    def info() -> dict[str, Any]:
        return dict(handle.replica_info.remote().result(timeout_s=TIMEOUT))

    try:
        deploy_config(serve_config(tiny_models.a, user_config=new))
        assert wait_until(lambda: info()["batch"] == [8, 0.02], 120), info()
        after = info()
        assert after["settings"]["max_batch_size"] == 8
        assert after["pid"] == before["pid"], "a user_config change must not restart the replica"
        assert post_raw(classifier, cifar_png(cifar_test[0], 0)).status_code == 200
        assert info()["torch_threads"] == 2
    finally:
        deploy_config(serve_config(tiny_models.a))
        assert wait_until(lambda: info()["batch"] == [16, 0.002], 120)


def test_metrics_reach_the_prometheus_endpoint(
    classifier: str, cifar_test: tuple[np.ndarray, np.ndarray]
) -> None:
    import ray

    node = ray._private.worker.global_worker.node
    assert node is not None
    port = node.metrics_export_port
    for i in range(4):
        post_raw(classifier, cifar_png(cifar_test[0], i))
    post_raw(classifier, b"nope", "text/plain")
    names = (
        "ray_rayvit_predictions_total",
        "ray_rayvit_errors_total",
        "ray_rayvit_request_latency_s_bucket",
        "ray_rayvit_batch_size_bucket",
    )

    def exported() -> bool:
        try:
            text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        except requests.RequestException:
            return False
        return all(n in text for n in names) and 'status="415"' in text

    assert wait_until(exported, 60, 2.0), f"metrics {names} not exported on port {port}"


def test_openapi_and_docs_describe_predict(classifier: str) -> None:
    spec = requests.get(f"{classifier}/openapi.json", timeout=TIMEOUT).json()
    assert {"/predict", "/model", "/healthz"} <= set(spec["paths"])
    predict = spec["paths"]["/predict"]["post"]
    content = predict["requestBody"]["content"]
    assert {"image/png", "image/jpeg", "application/octet-stream", "multipart/form-data"} <= set(content)
    assert content["multipart/form-data"]["schema"]["properties"]["file"]["type"] == "array"
    (top_k,) = (p for p in predict["parameters"] if p["name"] == "top_k")
    assert top_k["in"] == "query" and top_k["schema"]["anyOf"][0]["maximum"] == 10
    responses = predict["responses"]
    assert {"200", "400", "401", "408", "413", "415", "422", "500", "503"} <= set(responses)
    schemas = spec["components"]["schemas"]
    assert schemas["ErrorBody"]["required"] == ["error"]
    for code in ("400", "401", "408", "413", "415", "422", "503"):
        ref = responses[code]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/ErrorBody"), code
    assert "Retry-After" in responses["503"]["headers"]
    ok = json.dumps(responses["200"])
    assert "PredictionBody" in ok and "PredictionsBody" in ok
    assert "HTTPBearer" in spec["components"]["securitySchemes"]
    docs = requests.get(f"{classifier}/docs", timeout=TIMEOUT)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
