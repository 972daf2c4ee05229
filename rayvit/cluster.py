"""The Ray cluster a job runs on: connecting, and where training workers can go.

On an autoscaling cluster the resources that matter are the ones the autoscaler
can add, not the ones up right now: a job submitted to a cluster whose GPU
workers scale from zero asks for GPU workers and waits for them (Ray Train's
controller sends the resource request and retries until its placement group is
ready). Only a request that even a fully scaled-up cluster could never place
fails at once.
"""

from __future__ import annotations

import math
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import ray

from rayvit.config import Config, RayConfig
from rayvit.errors import UserError


def init_ray(rc: RayConfig) -> None:
    """Connect to the configured or ambient cluster, else start a local one."""
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"log_to_driver": True}
    if rc.address:
        kwargs["address"] = rc.address
    elif not os.environ.get("RAY_ADDRESS"):
        # A fresh local cluster; a stale "current cluster" file must not be joined.
        kwargs["address"] = "local"
        if rc.num_cpus is not None:
            kwargs["num_cpus"] = rc.num_cpus
        # Ray Train's placement-group cleaner asks the state API whether its controller lives;
        # without this it may ask another (or a dead) cluster on the same machine. The cluster's
        # processes inherit this environment.
        port = _free_port(8265)
        kwargs["dashboard_port"] = port
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    try:
        ray.init(**kwargs)
    except ConnectionError as exc:
        raise UserError(f"ray.address: cannot connect to the Ray cluster: {exc}") from exc


def _free_port(preferred: int) -> int:
    """``preferred`` when nothing listens there, else a free port the OS picks."""
    for port in (preferred, 0):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise UserError("no free TCP port for the Ray dashboard")


@dataclass(frozen=True)
class Capacity:
    """CPUs and GPUs of the cluster now, and the most its autoscaler can reach."""

    cpus: float
    gpus: int
    max_cpus: float
    max_gpus: int
    autoscaling: bool
    max_cpus_per_node: float = 0.0
    max_gpus_per_node: int = 0


def cluster_capacity() -> Capacity:
    """Read from the cluster's resources and, where an autoscaler runs, its node types."""
    now = ray.cluster_resources()
    cpus, gpus = float(now.get("CPU", 0)), int(now.get("GPU", 0))
    per_node = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    node_cpus = max((float(r.get("CPU", 0)) for r in per_node), default=0.0)
    node_gpus = max((int(r.get("GPU", 0)) for r in per_node), default=0)
    limits = _autoscaler_limits()
    if limits is None:
        return Capacity(cpus, gpus, cpus, gpus, False, node_cpus, node_gpus)
    max_total, max_node = limits
    return Capacity(
        cpus,
        gpus,
        max(cpus, float(max_total.get("CPU", 0))),
        max(gpus, int(max_total.get("GPU", 0))),
        True,
        max(node_cpus, float(max_node.get("CPU", 0))),
        max(node_gpus, int(max_node.get("GPU", 0))),
    )


def _autoscaler_limits() -> tuple[dict[str, float], dict[str, float]] | None:
    """(most resources in all, most on one node) by the autoscaler's node types; None without one.

    Autoscaler v2 (KubeRay, and ``ray up`` with ``RAY_enable_autoscaler_v2=1``) reports its node
    types to the GCS on its first round; v1 does not, so under v1 the limits are unknown
    (infinite) and only what is up now decides ``auto``.
    """
    from ray._private.state import state
    from ray.autoscaler.v2.utils import is_autoscaler_v2

    try:
        v2 = is_autoscaler_v2(fetch_from_server=True)
    except Exception:
        v2 = False
    deadline = time.monotonic() + (30.0 if v2 else 0.0)
    config = state.get_cluster_config()
    while config is None and time.monotonic() < deadline:
        time.sleep(1.0)
        config = state.get_cluster_config()
    total = state.get_max_resources_from_cluster_config() if config is not None else None
    if config is None or not total:
        if _v1_autoscaler_running():
            unknown = {"CPU": math.inf, "GPU": 0.0}
            return unknown, unknown
        return None
    node: dict[str, float] = {}
    for group in config.node_group_configs:
        if group.max_count == 0:
            continue
        for key, value in group.resources.items():
            node[key] = max(node.get(key, 0.0), float(value))
    return {k: float(v) for k, v in total.items()}, node


def _v1_autoscaler_running() -> bool:
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    try:
        return _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS) is not None
    except Exception:
        return False


@dataclass(frozen=True)
class Placement:
    """How many training workers, on what; crosses into every trial as it is."""

    num_workers: int | tuple[int, int]
    use_gpu: bool
    resources_per_worker: dict[str, float] = field(hash=False)

    @property
    def max_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]

    @property
    def min_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[0]

    def describe(self) -> str:
        n = self.num_workers
        count = str(n) if isinstance(n, int) else f"{n[0]}-{n[1]} (elastic)"
        return f"{count} worker(s) per run, {'GPU' if self.use_gpu else 'CPU'}"


def resolve_placement(cfg: Config, cap: Capacity | None = None) -> Placement:
    """Turn ``auto`` settings into numbers and check that the cluster can ever place them.

    ``use_gpu: auto`` is true when the cluster has GPUs or its autoscaler can add some;
    ``num_workers: auto`` is one worker per GPU the cluster can reach (an elastic range from
    one up to that when it autoscales), else one CPU worker.
    """
    sc = cfg.scaling
    cap = cap or cluster_capacity()
    use_gpu = cap.max_gpus > 0 if sc.use_gpu == "auto" else bool(sc.use_gpu)
    if use_gpu and cap.max_gpus == 0 and sc.check_resources:
        raise UserError(
            "scaling.use_gpu=true but the Ray cluster has no GPUs and its autoscaler cannot add any "
            "(set scaling.use_gpu=auto or false)"
        )
    num_workers: int | tuple[int, int]
    if sc.num_workers == "auto":
        if not use_gpu:
            num_workers = 1
        elif cap.autoscaling and cap.max_gpus > cap.gpus:
            num_workers = (1, cap.max_gpus) if cap.max_gpus > 1 else 1
        else:
            num_workers = max(1, cap.gpus)
    else:
        num_workers = sc.num_workers
    per_worker: dict[str, float] = {"CPU": sc.cpus_per_worker}
    if use_gpu:
        per_worker["GPU"] = 1.0
    placement = Placement(num_workers, use_gpu, per_worker)
    if sc.check_resources:
        _check_fits(placement, cap, sc.num_workers == "auto")
    return placement


def _check_fits(p: Placement, cap: Capacity, auto: bool) -> None:
    """One line naming the setting when even the largest cluster cannot place ``p``."""
    need = p.min_workers
    where = "its autoscaler's largest size" if cap.autoscaling else "the Ray cluster"
    cpus_per = p.resources_per_worker["CPU"]
    if cpus_per > cap.max_cpus_per_node + 1e-9:
        raise UserError(
            f"scaling.cpus_per_worker={cpus_per:g} is more than any node of {where} has "
            f"({cap.max_cpus_per_node:g} CPUs)"
        )
    if need * cpus_per > cap.max_cpus + 1e-9:
        raise UserError(
            f"scaling.num_workers={_shown(p.num_workers)} x scaling.cpus_per_worker={cpus_per:g} "
            f"needs {need * cpus_per:g} CPUs but {where} has {cap.max_cpus:g}"
        )
    if p.use_gpu and need > cap.max_gpus and not auto:
        raise UserError(
            f"scaling.num_workers={_shown(p.num_workers)} needs {need} GPUs but {where} has {cap.max_gpus}"
        )


def _shown(n: int | tuple[int, int]) -> str:
    return str(n) if isinstance(n, int) else f"[{n[0]}, {n[1]}]"
