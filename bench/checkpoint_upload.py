"""Benchmark: does uploading each epoch's checkpoint to a slow bucket slow training down?

The job (``run_job``, one run, one worker, the quick recipe's code path with a model whose
checkpoint is tens of MB) trains ``--epochs`` epochs in three modes:

- ``local``: ``output_dir`` on the local disk (no upload: the baseline);
- ``async``: ``output_dir`` in an S3 bucket (moto's server on 127.0.0.1) reached through a proxy on
  127.0.0.1 that passes ``--mb-per-s`` MB/s, with ``train.checkpoint_upload=async`` (the default);
- ``sync``: the same bucket and proxy, ``train.checkpoint_upload=sync`` (for reference).

Per-epoch time is the difference of consecutive epochs' ``elapsed_s`` (epoch 1 and its start-up
left out): an upload that blocks the workers shows there. Goal: async <= 1.05 x local, and the
last checkpoint complete in the bucket (weights and training state).

``local`` and ``async`` run back to back ``--rounds`` times, their order alternating; each round
gives a ratio of the two, and the figure is the median of those ratios: a shared machine's speed
drifts by more than the 5 % asked for over the minutes of a run, and a pair run minutes apart
sees the same drift. ``sync`` runs once, for reference.

The S3 server and the proxy stand in for a bucket on other machines: they run in a process of their
own, confined to one core (``--server-cpu``, the last one by default; ``-1``: anywhere) at the
lowest CPU priority (``--server-nice``, 19 by default; 0: the job's), so that the ratio is the
training job's own cost of uploading, not a server's CPU taken from the step. The CPU seconds the
server used in each mode are printed beside its times.

Run: ``python bench/checkpoint_upload.py [--data DIR] [--mb-per-s 4] [--epochs 4] [--rounds 3]
[--server-cpu N] [--server-nice N]``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import multiprocessing
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rayvit.cluster import free_port, init_ray
from rayvit.config import RayConfig, load_config
from rayvit.storage import Storage
from tuning import run_job

ROOT = Path(__file__).resolve().parents[1]
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
}
BUCKET = "rayvit-bench"
MODES = ("local", "async", "sync")


class SlowProxy:
    """TCP on 127.0.0.1 to ``target``, every connection's upload paced to ``rate`` bytes/s in all."""

    def __init__(self, target: int, rate: float) -> None:
        self.target, self.rate = target, rate
        self.port = free_port()
        self._lock = threading.Lock()
        self._next = time.monotonic()
        self._server = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            client, _ = self._server.accept()
            upstream = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, paced: bool) -> None:
        try:
            while chunk := src.recv(64 * 1024):
                if paced:
                    self._wait(len(chunk))
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def _wait(self, n: int) -> None:
        with self._lock:
            start = max(self._next, time.monotonic())
            self._next = start + n / self.rate
        time.sleep(max(0.0, self._next - time.monotonic()))


def bucket_server(conn: Connection, rate: float, cpu: int, nice: int) -> None:
    """The S3 server (moto) with the bucket, behind a ``SlowProxy``, in this process, confined to
    core ``cpu`` at niceness ``nice``; sends the proxy's port, then its CPU seconds when asked,
    serves until told to stop."""
    if cpu >= 0 and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})
    os.nice(nice)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    import boto3
    from moto.server import ThreadedMotoServer

    moto_port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=moto_port, verbose=False)
    server.start()
    boto3.client("s3", endpoint_url=f"http://127.0.0.1:{moto_port}").create_bucket(Bucket=BUCKET)
    proxy = SlowProxy(moto_port, rate)
    conn.send(proxy.port)
    while conn.recv() == "cpu":  # the CPU seconds of this process (all its threads) so far
        conn.send(time.process_time())
    server.stop()


def epoch_times(storage: Storage) -> list[float]:
    """Per-epoch seconds (epochs 2..E) from the checkpoints' ``elapsed_s``; every epoch's
    checkpoint is read from the run's trial folder (all are kept)."""
    import pyarrow.fs as pafs

    fs = storage.filesystem()
    found = fs.get_file_info(pafs.FileSelector(storage.fs_path("trials"), recursive=True))
    elapsed = {}
    for info in found:
        if info.path.endswith("/metrics.json") and "/checkpoint_" in info.path:
            with fs.open_input_stream(info.path) as f:
                m = json.loads(f.read())
            elapsed[int(m["epoch"])] = float(m["elapsed_s"])
    epochs = sorted(elapsed)
    return [elapsed[b] - elapsed[a] for a, b in itertools.pairwise(epochs)]


def complete(storage: Storage) -> tuple[bool, float]:
    """Whether the last checkpoint holds the weights and the training state, at full size; and
    its MB."""
    import pyarrow.fs as pafs

    fs = storage.filesystem()
    found = fs.get_file_info(pafs.FileSelector(storage.fs_path("trials"), recursive=True))
    dirs = sorted(
        i.path for i in found if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_2")
    )
    if not dirs:
        return False, 0.0
    sizes = {i.path.rsplit("/", 1)[1]: i.size or 0 for i in found if i.path.startswith(dirs[-1] + "/")}
    whole = bool(sizes.get("model.safetensors", 0) > 1e6 and sizes.get("training_state.pt", 0) > 1e6)
    return whole, sum(sizes.values()) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10"))
    ap.add_argument("--mb-per-s", type=float, default=4.0, help="the proxy's upload bandwidth")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--images", type=int, default=1600, help="training images an epoch")
    ap.add_argument("--rounds", type=int, default=3, help="local/async pairs, their order alternating")
    ap.add_argument(
        "--server-cpu",
        type=int,
        default=max(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else -1,
        help="the one core of the S3 server and the proxy (-1: not confined)",
    )
    ap.add_argument("--server-nice", type=int, default=19, help="the S3 server's niceness (0: the job's)")
    args = ap.parse_args()
    for key, value in CREDENTIALS.items():
        os.environ.setdefault(key, value)
    ctx = multiprocessing.get_context("spawn")
    here, there = ctx.Pipe()
    server = ctx.Process(
        target=bucket_server,
        args=(there, args.mb_per_s * 1e6, args.server_cpu, args.server_nice),
        daemon=True,
    )
    server.start()

    def server_cpu() -> float:
        here.send("cpu")
        seconds: float = here.recv()
        return seconds

    endpoint = f"http://127.0.0.1:{here.recv()}"
    init_ray(RayConfig(num_cpus=2))
    base = [
        f"data.path={args.data}",
        f"data.train_limit={args.images}",
        "data.val_limit=200",
        "data.test_limit=200",
        "model.arch.hidden_size=256",  # ~3.3 M parameters: 13 MB of weights, 40 MB with AdamW's state
        "model.arch.num_hidden_layers=4",
        "model.arch.num_attention_heads=4",
        "model.arch.intermediate_size=512",
        f"train.epochs={args.epochs}",
        f"train.keep_checkpoints={args.epochs}",
        "tune.lrs=null",
        "scaling.num_workers=1",
        "scaling.cpus_per_worker=1",
        "wandb.mode=disabled",
    ]
    local = Path(tempfile.mkdtemp(prefix="rayvit-ckpt-bench-"))
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    order = [
        *itertools.chain.from_iterable(
            [(rnd, "local"), (rnd, "async")][:: 1 if rnd % 2 == 0 else -1] for rnd in range(args.rounds)
        ),
        (0, "sync"),
    ]
    for rnd, mode in order:
        where = (
            [f"output_dir={local / f'{mode}{rnd}'}"]
            if mode == "local"
            else [f"output_dir=s3://{BUCKET}/{mode}{rnd}", f"storage.endpoint_url={endpoint}"]
        )
        upload = "sync" if mode == "sync" else "async"
        cfg = load_config(
            ROOT / "configs" / "quick.yaml", [*base, *where, f"train.checkpoint_upload={upload}"]
        )
        t0, cpu0 = time.perf_counter(), server_cpu()
        run_job(cfg)
        server_cpu_s = server_cpu() - cpu0
        storage = Storage.from_setting(cfg.output_dir, cfg.storage.endpoint_url)
        times = epoch_times(storage)
        whole, mb = complete(storage)
        runs[mode].append(
            {
                "epoch_s": times,
                "mean_epoch_s": sum(times) / max(1, len(times)),
                "complete": whole,
                "mb": mb,
                "job_s": time.perf_counter() - t0,
                "server_cpu_s": server_cpu_s,
            }
        )
    here.send("stop")
    server.join(timeout=30)
    pinned = f"on core {args.server_cpu}" if args.server_cpu >= 0 else "on any core"
    pinned += f", nice {args.server_nice}"
    print(
        f"checkpoint upload (S3 server and proxy {pinned}) through a {args.mb_per_s:g} MB/s proxy, "
        f"{args.epochs} epochs of {args.images} images, {args.rounds} local/async pairs, sync once:"
    )
    for mode, rs in runs.items():
        for i, r in enumerate(rs):
            print(
                f"  {mode:<6}#{i}: {r['mean_epoch_s']:6.2f} s/epoch (epochs 2..: "
                f"{', '.join(f'{t:.2f}' for t in r['epoch_s'])}), last checkpoint complete: {r['complete']} ({r['mb']:.1f} MB), "
                f"whole job {r['job_s']:.0f} s, S3 server CPU {r['server_cpu_s']:.1f} s"
            )
    ratios = [
        a["mean_epoch_s"] / b["mean_epoch_s"] for a, b in zip(runs["async"], runs["local"], strict=True)
    ]
    sync = runs["sync"][0]["mean_epoch_s"] / statistics.median(r["mean_epoch_s"] for r in runs["local"])
    print(
        f"  async / local: median {statistics.median(ratios):.3f} of the pairs' "
        f"{', '.join(f'{r:.3f}' for r in ratios)} (goal <= 1.05); sync / local (median): {sync:.3f}; "
        f"every checkpoint complete: {all(r['complete'] for rs in runs.values() for r in rs)}"
    )


if __name__ == "__main__":
    main()
