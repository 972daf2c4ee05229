"""Helpers every kind of test shares: one copy each, so a fix reaches every test that uses it.

Ports on 127.0.0.1, the CIFAR-10 copy, multipart bodies, killing a group of processes, and what
a job's output may hold.
Fixtures live in ``conftest.py`` (training) and ``serve_support.py`` (serving).
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

from rayvit.cluster import free_port as free_port  # one copy, shared with the job

ROOT = Path(__file__).resolve().parents[1]

#: The real CIFAR-10 copy in hub layout (``RAYVIT_TEST_DATA`` points elsewhere).
DATA_DIR = Path(os.environ.get("RAYVIT_TEST_DATA", ROOT.parent / "shared" / "data" / "cifar10")).resolve()


def require_data() -> Path:
    """The CIFAR-10 copy, for tests that read it; they skip, saying why, when it is missing.

    Unit tests never call this, so they run without the copy.
    """
    if not (DATA_DIR / "plain_text").is_dir():
        pytest.skip(f"CIFAR-10 copy not found at {DATA_DIR} (set RAYVIT_TEST_DATA)")
    return DATA_DIR


#: The boundary ``multipart`` uses unless told otherwise, and the matching Content-Type.
BOUNDARY = "b0und"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


def multipart(parts: Iterable[tuple[str, str | None, bytes]], boundary: str = BOUNDARY) -> bytes:
    """A ``multipart/form-data`` body written by hand, so tests can also send malformed ones.

    ``parts`` are ``(field name, Content-Type or None for no header, data)``; part ``i`` is a file
    named ``{i}.png``.
    """
    out = b""
    for i, (name, ctype, data) in enumerate(parts):
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{i}.png"\r\n'
        if ctype is not None:
            head += f"Content-Type: {ctype}\r\n"
        out += head.encode() + b"\r\n" + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def kill_processes(match: Callable[[int], bool], passes: int = 3, pause_s: float = 0.5) -> None:
    """SIGKILL every process of this machine for which ``match(pid)`` holds (never this one).

    Ray's workers and actors sit in process groups of their own, so a process group is not
    enough; the scan is repeated for anything forked while a pass ran.
    """
    for _ in range(passes):
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if match(int(entry.name)):
                    os.kill(int(entry.name), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                continue
        time.sleep(pause_s)


def cmdline_has(marker: str) -> Callable[[int], bool]:
    """``match`` for ``kill_processes``: the process's command line contains ``marker``."""
    needle = marker.encode()

    def match(pid: int) -> bool:
        return needle in Path(f"/proc/{pid}/cmdline").read_bytes()

    return match


def in_session(sid: int) -> Callable[[int], bool]:
    """``match`` for ``kill_processes``: the process belongs to session ``sid``."""
    return lambda pid: os.getsid(pid) == sid


def write_cifar_imagefolder(dest: Path, split: str, n: int) -> list[tuple[Path, int]]:
    """The first ``n`` images of a CIFAR-10 split as an imagefolder ``dest/<split>/<class>/<i>.png``
    (the hub files' own PNG bytes); ``(file, label)`` of each."""
    import pyarrow.parquet as pq

    (part,) = sorted((require_data() / "plain_text").glob(f"{split}-*.parquet"))
    table = pq.read_table(part).slice(0, n)
    out = []
    for i, (image, label) in enumerate(
        zip(table.column("img").to_pylist(), table.column("label").to_pylist(), strict=True)
    ):
        path = dest / split / CIFAR10_CLASSES[label] / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image["bytes"])
        out.append((path, int(label)))
    return out


def bad_image_files() -> dict[str, bytes]:
    """One file of each kind the decoder refuses, by file name: corrupt, truncated, not an image,
    too many pixels, too many JPEG scans."""
    import io

    from PIL import Image
    from test_serve_unit import jpeg_scan_bomb

    def encode(image: Image.Image, fmt: str) -> bytes:
        buf = io.BytesIO()
        image.save(buf, fmt)
        return buf.getvalue()

    png = encode(Image.new("RGB", (64, 64), (200, 10, 10)), "PNG")
    return {
        "corrupt.png": png[:40] + bytes(len(png) - 40),
        "truncated.png": png[: len(png) // 2],
        "not-an-image.jpg": b"this is a text file, not a JPEG\n" * 10,
        "pixel-bomb.png": encode(Image.new("1", (6000, 6000)), "PNG"),
        "scan-bomb.jpg": jpeg_scan_bomb(side=64, repeats=200),
    }


#: Class names of CIFAR-10, in label order.
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def untrained_model_folder(dest: Path, image_size: int = 32) -> Path:
    """A tiny ViT for CIFAR-10's classes, built from config (no weights downloaded), exported."""
    from rayvit.checkpoint import save_model_folder, write_json
    from rayvit.config import load_config
    from rayvit.model import build_model, build_preprocessor

    overrides = ["model.pretrained=null", f"model.image_size={image_size}", "model.arch.patch_size=8"]
    tiny = [
        "model.arch.hidden_size=32",
        "model.arch.num_hidden_layers=2",
        "model.arch.num_attention_heads=2",
        "model.arch.intermediate_size=64",
    ]
    cfg = load_config(ROOT / "configs" / "quick.yaml", [*overrides, *tiny])
    save_model_folder(build_model(cfg.model, CIFAR10_CLASSES), build_preprocessor(cfg.model), dest)
    write_json(dest / "metrics.json", {"name": dest.name})
    return dest


# Lines seen before rayvit.logs silenced them (Ray, Tune, HF hub, wandb's teardown).
CHATTER = [
    "Reporting training result",  # Ray Train V2, once per report on every worker
    "Fatal Python error",  # wandb's service teardown at a Ray worker's exit
    "Traceback",
    "Configuration for experiment",  # Tune's banner
    "View detailed results here",
    "To visualize your results with TensorBoard",
    "Wrote the latest version of all result files",
    "Started a local Ray instance",
    "Token authentication is enabled for this Ray cluster",
    "Repo card metadata block was not found",
    "wandb:",
]

# The project's own lines.
PROJECT = [
    r"data: \d+ train / \d+ val images( at \d+px)?, 10 classes from .*",
    r"sweep over \S+ .*, \d+ worker\(s\) per trial \(global batch \d+\), up to \d+ trial\(s\) at once",
    r"(\(RayTrainWorker pid=\d+\) )?epoch [\d.]+/\d+  train_loss .*",
    r"trial +train\.lr +epochs +best val_accuracy +early stop +status",
    r"\w+_\d{5} +[\d.e-]+ +[\d.]+ +[\d.]+ +(True|False) +\w+( \*)?",
    r"exported: .*  test_accuracy [\d.]+  val_accuracy [\d.]+",
]
# Warnings and errors pass: Python's "WARNING"/"ERROR", Ray's C++ " W "/" E " lines.
WARNING_OR_ERROR = re.compile(r"\b(WARNING|ERROR|warning|error)\b|\[\d{4}-\d\d-\d\d [\d:,]+ [WE] \d+ \d+\]")
# What a process killed during its own exit prints (Ray's SIGTERM handler raising SystemExit
# in a finalizer; Ray's C++ stack dump of a worker stopped while it started), and Ray's two
# notices that every run used to carry.
TEARDOWN = re.compile(r"Traceback|Exception ignored|SystemExit|SIGTERM received")
RAY_NOTICES = ["PreemptionWatcher", "Detected that the Ray Train controller actor"]


def strip_ansi(text: str) -> str:
    """``text`` without the colour codes Ray puts around a worker's prefix."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def assert_only_project_output(log: str) -> None:
    """A job's output holds the project's lines, warnings and errors, and nothing else: no library
    chatter, no Ray notice, no teardown traceback."""
    log = strip_ansi(log)
    for line in CHATTER + RAY_NOTICES:
        assert line not in log, f"library chatter in the job's output: {line!r}"
    assert not TEARDOWN.search(log), log[-3000:]
    other = [
        ln
        for ln in log.splitlines()
        if ln.strip()
        and not any(re.fullmatch(p, ln.strip()) for p in PROJECT)
        and not WARNING_OR_ERROR.search(ln)
    ]
    assert other == [], "\n".join(other)
