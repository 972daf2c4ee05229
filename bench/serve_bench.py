"""Load test of the served model, with its baselines, in one run.

Real CIFAR-10 test images go as PNG bodies to ``POST /predict`` from concurrent
keep-alive HTTP clients on 127.0.0.1 (bounded by request count and time):

  (a) the deployment as configured (dynamic batching),
  (b) the same model with ``max_batch_size=1`` (one request per forward pass),
  (c) a no-op Serve deployment that reads the body and answers JSON (HTTP ceiling),
  (d) in-process batched inference with ``Predictor`` (model ceiling),
  (e) the deployment with 32 images per multipart request (images/s),
  (r) (a) again, at a route the proxy's retry middleware (``serve_app.retry``) skips.

Serve starts with ``configs/serve.yaml``'s ``controller_options``, so its proxy runs the retry
middleware as deployed; (a) and (r) side by side give what the retrying costs.
Goals on a 2-core machine: (a) >= 60% of min(c, d) req/s, >= 70% of (c) and >= 2x (b),
p99 <= 3x p50, zero errors; (e) >= 70% of (d) images/s; (a) >= 90% of (r) (the retry
costs under 10%). Run from the repository root:

    python bench/serve_bench.py [--model-dir models/best] [--seconds 20]

Without ``--model-dir`` an untrained model of the quick recipe's architecture
(``configs/quick.yaml``: the same compute as a trained one) is used.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from rayvit.checkpoint import save_model_folder, write_json
from rayvit.cluster import free_port
from rayvit.config import DataConfig, load_config
from rayvit.data import load_test
from rayvit.predict import Predictor

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10"
CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@dataclass
class Result:
    name: str
    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    images_per_request: int = 1
    latencies: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def ips(self) -> float:
        return self.rps * self.images_per_request

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies, q) * 1000) if self.latencies else float("nan")


def png_bodies(data: str, n: int) -> tuple[list[bytes], np.ndarray]:
    import io

    from PIL import Image

    split = load_test(DataConfig(path=data, test_limit=n), 32)
    bodies = []
    for img in split.images:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "PNG")
        bodies.append(buf.getvalue())
    return bodies, split.images


def multipart(bodies: list[bytes]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = bytearray()
    for i, b in enumerate(bodies):
        out += (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{i}.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        out += b + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"


def load(
    name: str,
    port: int,
    path: str,
    payloads: list[tuple[bytes, str]],
    clients: int,
    seconds: float,
    max_requests: int,
    warmup_s: float,
    images_per_request: int = 1,
) -> Result:
    """``clients`` threads, each with one keep-alive connection, for ``seconds`` (after a warm-up)."""
    result = Result(name, images_per_request=images_per_request)
    lock = threading.Lock()
    start_evt = threading.Event()
    t_start = time.perf_counter() + warmup_s
    t_end = t_start + seconds
    budget = [max_requests]

    def client(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        lat: list[float] = []
        errors = done = 0
        i = k
        start_evt.wait()
        while True:
            now = time.perf_counter()
            if now >= t_end:
                break
            with lock:
                if budget[0] <= 0:
                    break
                if now >= t_start:
                    budget[0] -= 1
            body, ctype = payloads[i % len(payloads)]
            i += clients
            t0 = time.perf_counter()
            try:
                conn.request("POST", path, body=body, headers={"Content-Type": ctype})
                resp = conn.getresponse()
                resp.read()
                ok = resp.status == 200
            except (OSError, http.client.HTTPException):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            t1 = time.perf_counter()
            if t0 >= t_start:
                done += 1
                errors += 0 if ok else 1
                lat.append(t1 - t0)
        conn.close()
        with lock:
            result.requests += done
            result.errors += errors
            result.latencies.extend(lat)

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    start_evt.set()
    for t in threads:
        t.join(timeout=seconds + warmup_s + 120)
    result.seconds = min(seconds, max(1e-9, time.perf_counter() - t_start))
    return result


_PREDICTORS: dict[str, Predictor] = {}


def model_ceiling(model_dir: Path, images: np.ndarray, batch: int, seconds: float) -> Result:
    """(d): ``Predictor.probabilities`` on batches of decoded images, in this process.

    The best of 1 thread and one per core: the model's ceiling on this machine.
    """
    pred = _PREDICTORS.setdefault(str(model_dir), Predictor(model_dir, device=torch.device("cpu")))
    arrays = list(images)
    batches = [arrays[i : i + batch] for i in range(0, len(arrays) - batch + 1, batch)]
    best: Result | None = None
    for threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        for b in batches[:2]:
            pred.probabilities(b)
        n = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds / 2:
            pred.probabilities(batches[n % len(batches)])
            n += 1
        r = Result(
            f"(d) in-process Predictor, batch {batch}", requests=n * batch, seconds=time.perf_counter() - t0
        )
        r.note = f"best: {threads} thread(s)"
        if best is None or r.rps > best.rps:
            best = r
    assert best is not None
    return best


def quick_model(dest: Path) -> Path:
    from rayvit.model import build_model, build_preprocessor

    cfg = load_config(ROOT / "configs" / "quick.yaml")
    torch.manual_seed(0)
    save_model_folder(build_model(cfg.model, CIFAR10), build_preprocessor(cfg.model), dest)
    write_json(dest / "metrics.json", {"name": "quick-untrained", "note": "benchmark model, not trained"})
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", help="exported model folder (default: an untrained quick-size model)")
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--images", type=int, default=1024, help="distinct CIFAR-10 test images to send")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=20.0, help="measured time per scenario (all rounds)")
    ap.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each turn")
    ap.add_argument("--max-requests", type=int, default=200_000, help="cap per scenario")
    ap.add_argument("--multipart-images", type=int, default=32)
    ap.add_argument(
        "--replicas", type=int, default=None, help="replicas of (a)/(b) (default: serve.yaml min)"
    )
    ap.add_argument("--num-cpus", type=float, default=None, help="CPU reservation per replica")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per replica")
    ap.add_argument("--max-batch-size", type=int, default=None)
    ap.add_argument("--wait-ms", type=float, default=None, help="batch_wait_timeout_s in ms")
    ap.add_argument("--rounds", type=int, default=4, help="scenarios take turns this many times")
    ap.add_argument("--only", default="abcder", help="scenarios to run, e.g. 'ad'")
    args = ap.parse_args()

    import ray
    import yaml
    from ray import serve

    from serve_app import build_app
    from serve_app.retry import SKIP_ENV
    from serve_app.settings import deployment_options, merge, replica_settings

    tmp = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    model_dir = Path(args.model_dir).resolve() if args.model_dir else quick_model(tmp / "model")
    bodies, arrays = png_bodies(args.data, args.images)
    single = [(b, "image/png") for b in bodies]
    k = args.multipart_images
    groups = [multipart(bodies[i : i + k]) for i in range(0, len(bodies) - k + 1, k)]

    base = deployment_options()
    user = replica_settings(base.get("user_config")).model_dump()
    overrides: dict[str, Any] = {"user_config": dict(user)}
    if args.threads is not None:
        overrides["user_config"]["torch_threads"] = args.threads
    if args.max_batch_size is not None:
        overrides["user_config"]["max_batch_size"] = args.max_batch_size
    if args.wait_ms is not None:
        overrides["user_config"]["batch_wait_timeout_s"] = args.wait_ms / 1000
    env = {"PYTHONPATH": str(ROOT)}  # workers import this checkout's code
    overrides["ray_actor_options"] = {"runtime_env": {"env_vars": env}}
    if args.num_cpus is not None:
        overrides["ray_actor_options"]["num_cpus"] = args.num_cpus
    if args.replicas is not None:
        overrides["autoscaling_config"] = {"min_replicas": args.replicas, "initial_replicas": args.replicas}
        overrides["autoscaling_config"]["max_replicas"] = args.replicas
    else:  # a fixed size for the measurement: no scaling in the middle of a run
        n = base["autoscaling_config"]["min_replicas"]
        overrides["autoscaling_config"] = {"min_replicas": n, "max_replicas": n, "initial_replicas": n}

    ray.init(
        address="local",
        num_cpus=max(8, os.cpu_count() or 1),  # logical: every app of the run fits at once
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": env},
    )
    port = free_port()
    controller = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text()).get("controller_options") or {}
    controller = merge(controller, {"runtime_env": {"env_vars": {SKIP_ENV: "/r/"}}})
    serve.start(
        http_options={"host": "127.0.0.1", "port": port},
        logging_config={"enable_access_log": False},
        controller_options=controller,
    )
    settings = overrides["user_config"]
    unbatched = {**overrides, "user_config": {**settings, "max_batch_size": 1, "batch_wait_timeout_s": 0.0}}
    rounds = max(1, args.rounds)
    per_round = args.seconds / rounds
    common = dict(
        clients=args.clients, seconds=per_round, max_requests=args.max_requests, warmup_s=args.warmup
    )
    scenarios = {
        "a": ("(a) this deployment", "/a/predict", single, 1),
        "e": (f"(e) this deployment, {k} images/request", "/a/predict", groups, k),
        "b": ("(b) same model, max_batch_size=1", "/b/predict", single, 1),
        "c": ("(c) no-op Serve deployment", "/c/predict", single, 1),
        "r": ("(r) (a) without the proxy's retry", "/r/predict", single, 1),
    }
    wanted = [x for x in "arebc" if x in args.only]
    results: dict[str, Result] = {}
    try:
        if "a" in args.only or "e" in args.only:
            serve.run(build_app(model_dir, overrides=overrides), name="a", route_prefix="/a")
        if "r" in args.only:
            serve.run(build_app(model_dir, overrides=overrides), name="r", route_prefix="/r")
        if "b" in args.only:
            serve.run(build_app(model_dir, overrides=unbatched), name="b", route_prefix="/b")
        if "c" in args.only:
            serve.run(noop_app(overrides), name="c", route_prefix="/c")
        # Scenarios take turns in short rounds, so a change in the machine's load hits them alike.
        for _ in range(rounds):
            for key in wanted:
                name, path, payloads, per_request = scenarios[key]
                part = load(name, port, path, payloads, images_per_request=per_request, **common)
                results[key] = merge_results(results.get(key), part)
            if "d" in args.only:
                part = model_ceiling(model_dir, arrays, int(settings["max_batch_size"]), per_round)
                results["d"] = merge_results(results.get("d"), part)
    finally:
        shutdown: Any = serve.shutdown
        shutdown()
        ray.shutdown()
    if "a" in results:
        results["a"].note = (
            f"max_batch_size {settings['max_batch_size']}, wait {settings['batch_wait_timeout_s'] * 1000:g} ms, "
            f"torch threads {settings['torch_threads'] or 'auto'}"
        )
    report(results, args, model_dir)


def merge_results(old: Result | None, new: Result) -> Result:
    if old is None:
        return new
    old.requests += new.requests
    old.errors += new.errors
    old.seconds += new.seconds
    old.latencies.extend(new.latencies)
    old.note = new.note
    return old


def noop_app(overrides: dict[str, Any]) -> Any:
    """(c): the same replica resources and logging, no work: Serve's HTTP ceiling."""
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import Response

    from serve_app.settings import deployment_options, merge

    @serve.deployment(name="NoOp", max_ongoing_requests=64)
    class NoOp:
        async def __call__(self, request: Request) -> Response:
            await request.body()
            return Response(b'{"label":"none","probability":0.0}', media_type="application/json")

    keep = ("autoscaling_config", "ray_actor_options", "logging_config")
    opts = {k: v for k, v in merge(deployment_options(), overrides).items() if k in keep}
    deployment: Any = NoOp
    return deployment.options(**opts).bind()


def report(results: dict[str, Result], args: argparse.Namespace, model_dir: Path) -> None:
    load1, load5, _ = os.getloadavg()
    print()
    print(
        f"serve bench: {args.clients} clients, {args.seconds:g} s per scenario in {args.rounds} rounds, "
        f"CIFAR-10 test PNGs, {os.cpu_count()} cores (load average {load1:.1f}/{load5:.1f}), model {model_dir.name}"
    )
    print(
        f"{'scenario':46} {'req/s':>8} {'img/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'errors':>7}"
    )
    for res in results.values():
        lat = [res.pct(q) for q in (50, 95, 99)] if res.latencies else [float("nan")] * 3
        print(
            f"{res.name:46} {res.rps:8.1f} {res.ips:8.1f} {lat[0]:8.1f} {lat[1]:8.1f} {lat[2]:8.1f} "
            f"{res.errors:7d}" + (f"  ({res.note})" if res.note else "")
        )
    goals = []
    a, b, c, d, e, r = (results.get(x) for x in "abcder")
    if a and c and d:
        ceiling = min(c.rps, d.ips)
        goals.append(("(a) >= 60% of min((c), (d)) req/s", a.rps / ceiling, 0.6, f"{a.rps / ceiling:.0%}"))
    if a and c:
        goals.append(
            (
                "(a) >= 70% of (c) req/s",
                a.rps / c.rps if c.rps else 0.0,
                0.7,
                f"{a.rps / max(c.rps, 1e-9):.0%}",
            )
        )
    if a and b:
        goals.append(
            ("(a) >= 2x (b) req/s", a.rps / b.rps if b.rps else 0.0, 2.0, f"{a.rps / max(b.rps, 1e-9):.2f}x")
        )
    if a and a.latencies:
        ratio = a.pct(99) / a.pct(50)
        goals.append(("(a) p99 <= 3x p50", 3.0 / ratio, 1.0, f"p99/p50 = {ratio:.2f}"))
        goals.append(("(a) zero errors", 1.0 if a.errors == 0 else 0.0, 1.0, f"{a.errors} errors"))
    if e and d:
        goals.append(("(e) >= 70% of (d) images/s", e.ips / d.ips, 0.7, f"{e.ips / d.ips:.0%}"))
    if a and r:
        cost = 1 - a.rps / r.rps if r.rps else 1.0
        goals.append(
            ("(a) >= 90% of (r) req/s (retry cost)", 1 - cost, 0.9, f"{a.rps / r.rps:.0%}, cost {cost:.1%}")
        )
    if goals:
        print("goals:")
        for name, value, need, shown in goals:
            print(f"  {'met ' if value >= need else 'MISSED'} {name:38} {shown}")
    print(json.dumps({k: {"rps": round(v.rps, 1), "ips": round(v.ips, 1)} for k, v in results.items()}))


if __name__ == "__main__":
    main()
