"""The Ray cluster a job runs on: connecting, and where training workers can go.

On an autoscaling cluster the resources that matter are the ones the autoscaler
can add, not the ones up right now: a job submitted to a cluster whose GPU
workers scale from zero asks for GPU workers and waits for them (Ray Train's
controller sends the resource request and retries until its placement group is
ready). Only a request that even a fully scaled-up cluster could never place
fails at once.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import ray

from rayvit.config import Config, RayConfig
from rayvit.errors import UserError
from rayvit.logs import WORKER_SETUP_HOOK


def init_ray(rc: RayConfig) -> None:
    """Connect to the configured or ambient cluster, else start a local one."""
    if ray.is_initialized():
        return
    # Every worker process of the job filters Ray's console chatter as the driver does.
    kwargs: dict[str, Any] = {
        "log_to_driver": True,
        "runtime_env": {"worker_process_setup_hook": WORKER_SETUP_HOOK},
    }
    if rc.address:
        kwargs["address"] = rc.address
    elif not os.environ.get("RAY_ADDRESS"):
        # A fresh local cluster; a stale "current cluster" file must not be joined.
        kwargs["address"] = "local"
        if rc.num_cpus is not None:
            kwargs["num_cpus"] = rc.num_cpus
        if rc.object_store_memory is not None:
            kwargs["object_store_memory"] = rc.object_store_memory
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
    """CPUs and GPUs of the cluster now, per node, and whether an autoscaler can add nodes."""

    cpus: float
    gpus: int
    max_cpus_per_node: float
    autoscaler: str | None
    """``v2`` or None (checked as a fixed cluster)."""


def cluster_capacity() -> Capacity:
    now = ray.cluster_resources()
    per_node = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    node_cpus = max((float(r.get("CPU", 0)) for r in per_node), default=0.0)
    return Capacity(float(now.get("CPU", 0)), int(now.get("GPU", 0)), node_cpus, _autoscaler_kind())


def _autoscaler_kind() -> str | None:
    """``v2`` when autoscaler v2 runs (it can say what it could never place), else None.

    Autoscaler v1 runs on every cluster, a laptop's ``ray.init()`` too (with a provider that
    adds nothing), and cannot tell either; such a cluster is checked as a fixed one
    (``scaling.check_resources=false`` skips that on a v1 autoscaling cluster).
    """
    from ray.autoscaler.v2.utils import is_autoscaler_v2

    try:
        return "v2" if is_autoscaler_v2(fetch_from_server=True) else None
    except Exception:
        return None


def keep_coordinator_off_workers() -> None:
    """Create Ray Train's autoscaling coordinator from the job's driver.

    The coordinator is a detached actor that Ray creates on the node of its first user, which
    is a trial's controller: on a cluster whose head runs no training, a worker node, which then
    never goes idle and is never scaled down. Created from the driver (on the head node under
    ``ray job submit``) it lives there instead; later users find it by name.
    """
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )

        get_or_create_autoscaling_coordinator()
    except Exception:  # a Ray without it: nothing to pin
        return


def autoscaler_can_place(bundles: list[dict[str, float]], timeout_s: float = 60.0) -> bool | None:
    """Ask the cluster's autoscaler whether it could ever place ``bundles`` (all at once).

    The bundles become a cluster resource constraint (``ray.autoscaler.sdk.request_resources``);
    autoscaler v2 answers within two of its rounds: infeasible (no node type fits), or not.
    The constraint is withdrawn afterwards: Ray Train asks for its workers itself. None when
    the autoscaler gives no answer in time.
    """
    from ray._raylet import GcsClient  # type: ignore[attr-defined]
    from ray.autoscaler.sdk import request_resources
    from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply  # type: ignore[attr-defined]

    gcs = GcsClient(address=ray.get_runtime_context().gcs_address)

    def state() -> Any:
        reply = GetClusterStatusReply()
        reply.ParseFromString(gcs.get_cluster_status(timeout_s=10))
        return reply.autoscaling_state

    wanted = sorted(tuple(sorted(b.items())) for b in bundles)
    try:
        start = state().autoscaler_state_version
        request_resources(bundles=bundles)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            st = state()
            for constraint in st.infeasible_cluster_resource_constraints:
                asked = sorted(
                    tuple(sorted((k, float(v)) for k, v in r.request.resources_bundle.items()))
                    for r in constraint.resource_requests
                    for _ in range(r.count)
                )
                if asked == wanted:
                    return False
            if st.autoscaler_state_version >= start + 3:
                return True
            time.sleep(0.5)
        return None
    except Exception:
        return None
    finally:
        request_resources(bundles=[])


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

    On a fixed cluster that is what is up now. With an autoscaler, ``use_gpu: auto`` is true
    when GPUs are up or the autoscaler can add one, ``num_workers: auto`` becomes the elastic
    range ``[1, scaling.auto_max_workers]`` (Ray Train grows the group as nodes arrive), and a
    request is refused only when the autoscaler says no node type could ever place it.
    """
    sc = cfg.scaling
    cap = cap or cluster_capacity()
    scaling = cap.autoscaler is not None
    use_gpu: bool
    if sc.use_gpu == "auto":
        use_gpu = cap.gpus > 0 or (scaling and autoscaler_can_place([{"GPU": 1.0}]) is True)
    else:
        use_gpu = bool(sc.use_gpu)
    num_workers: int | tuple[int, int]
    if sc.num_workers == "auto":
        if not use_gpu:
            num_workers = 1
        elif scaling:
            num_workers = (1, max(1, sc.auto_max_workers))
        else:
            num_workers = max(1, cap.gpus)
    else:
        num_workers = (
            sc.num_workers if isinstance(sc.num_workers, int) else (sc.num_workers[0], sc.num_workers[1])
        )
    per_worker: dict[str, float] = {"CPU": sc.cpus_per_worker}
    if use_gpu:
        per_worker["GPU"] = 1.0
    placement = Placement(num_workers, use_gpu, per_worker)
    if scaling:
        keep_coordinator_off_workers()
    if sc.check_resources:
        if scaling:
            _check_autoscaler_fits(placement, cap)
        else:
            _check_fits(placement, cap)
    return placement


def _check_autoscaler_fits(p: Placement, cap: Capacity) -> None:
    """One line naming the setting when the autoscaler says it can never place the workers."""
    bundles = [dict(p.resources_per_worker) for _ in range(p.min_workers)]
    if autoscaler_can_place(bundles) is False:
        what = "GPU and " if p.use_gpu else ""
        raise UserError(
            f"scaling.num_workers={_shown(p.num_workers)} x {_bundle(p.resources_per_worker)}: no node "
            f"type of the cluster's autoscaler can ever provide that many {what}CPUs "
            "(fewer workers, or a smaller scaling.cpus_per_worker)"
        )


def _bundle(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}"


def _check_fits(p: Placement, cap: Capacity) -> None:
    """One line naming the setting when a fixed cluster cannot place ``p``."""
    need = p.min_workers
    cpus_per = p.resources_per_worker["CPU"]
    if p.use_gpu and cap.gpus == 0:
        raise UserError(
            "scaling.use_gpu=true but the Ray cluster has no GPUs and no autoscaler "
            "(set scaling.use_gpu=auto or false)"
        )
    if cpus_per > cap.max_cpus_per_node + 1e-9:
        raise UserError(
            f"scaling.cpus_per_worker={cpus_per:g} is more than any node of the Ray cluster has "
            f"({cap.max_cpus_per_node:g} CPUs)"
        )
    if need * cpus_per > cap.cpus + 1e-9:
        raise UserError(
            f"scaling.num_workers={_shown(p.num_workers)} x scaling.cpus_per_worker={cpus_per:g} "
            f"needs {need * cpus_per:g} CPUs but the Ray cluster has {cap.cpus:g}"
        )
    if p.use_gpu and need > cap.gpus:
        raise UserError(
            f"scaling.num_workers={_shown(p.num_workers)} needs {need} GPUs but the Ray cluster has {cap.gpus}"
        )


def _shown(n: int | tuple[int, int]) -> str:
    return str(n) if isinstance(n, int) else f"[{n[0]}, {n[1]}]"
