"""The Ray cluster a job runs on: connecting, and where training workers can go.

On an autoscaling cluster the resources that matter are the ones the autoscaler
can add, not the ones up right now: a job submitted to a cluster whose GPU
workers scale from zero asks for GPU workers and waits for them (Ray Train's
controller sends the resource request and retries until its placement group is
ready). Only a request that even a fully scaled-up cluster could never place
fails at once.
"""

from __future__ import annotations

import functools
import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

import ray

from rayvit.config import Config, RayConfig
from rayvit.errors import UserError
from rayvit.logs import WORKER_SETUP_HOOK, filter_worker_output


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
        # processes inherit this environment. A port the OS picks, not Ray's default 8265: two
        # jobs starting at once would both find 8265 free, and the later dashboard fails to bind.
        port = free_port()
        kwargs["dashboard_port"] = port
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    try:
        ray.init(**kwargs)
    except ConnectionError as exc:
        raise UserError(f"ray.address: cannot connect to the Ray cluster: {exc}") from exc
    except Exception as exc:
        if kwargs.get("address") != "local":
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"ray: the local Ray cluster did not start: {first}") from exc
    filter_worker_output()


P = ParamSpec("P")
R = TypeVar("R")

#: Actors of Ray Train whose end the job waits for: a process of Ray's that is SIGTERMed while
#: it is already exiting (its interpreter shutting down) prints a traceback to the job's output.
TRAIN_ACTORS = ("TrainController", "RayTrainWorker")
EXIT_WAIT_S = 30.0


def _live_actors(owner_worker_id: str | None, classes: tuple[str, ...] | None) -> list[Any]:
    """This job's non-detached actors that are not dead, or whose process on this node still
    runs (Ray marks an actor dead when its worker disconnects, before its interpreter has
    finished exiting); optionally only those owned by one worker or of some classes."""
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    job_id = ray.JobID.from_hex(ray.get_runtime_context().get_job_id())
    rows = [
        gcs_pb2.ActorTableData.FromString(b)  # type: ignore[attr-defined]
        for b in state._connect_and_get_accessor().get_actor_table(job_id, None)
    ]
    here = ray.get_runtime_context().get_node_id()
    live = []
    for a in rows:
        if a.is_detached or (classes is not None and a.class_name not in classes):
            continue
        if owner_worker_id is not None and a.owner_address.worker_id.hex() != owner_worker_id:
            continue
        dead = a.state == gcs_pb2.ActorTableData.DEAD  # type: ignore[attr-defined]
        if not dead or (a.address.node_id.hex() == here and a.pid and _pid_runs(a.pid)):
            live.append(a)
    return live


def _pid_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def wait_for_actors_to_exit(
    owner_worker_id: str | None = None,
    classes: tuple[str, ...] | None = None,
    timeout_s: float = EXIT_WAIT_S,
) -> bool:
    """Wait until the matching actors of this job have ended; False if some still run at the
    deadline. Only a process that has exited cannot be caught halfway through its exit by
    the kill that Ray sends when the actor's owner (or the job) ends."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if not _live_actors(owner_worker_id, classes):
                return True
        except Exception:  # no GCS to ask (a Ray without this table, or one going away)
            return False
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


def waits_for_train_controllers(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorate a Tune trial's function: return (or raise) only once the Ray Train controller
    it started has exited.

    ``TorchTrainer.fit`` returns while its controller actor, no longer referenced, is still
    exiting; the trial's actor ends right after, and Ray kills the actors it owns, so the
    controller gets a SIGTERM in the middle of its interpreter's shutdown and Ray's handler
    prints a ``SystemExit`` traceback into the job's output.
    """

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        finally:
            wait_for_actors_to_exit(ray.get_runtime_context().get_worker_id(), ("TrainController",))

    return wrapper


def shutdown_ray() -> None:
    """End the job's Ray session once Tune's trial actors and Ray Train's actors have exited.

    Called at the end of the CLI path (success, error or interrupt). A driver that exits first
    ends the job, and Ray then kills the actors that are still on their way out; the ones in
    their interpreter's shutdown print tracebacks. On a cluster the job started itself
    (``ray.init()`` on a laptop), ``ray.shutdown`` then stops it.
    """
    if not ray.is_initialized():
        return
    driver = ray.get_runtime_context().get_worker_id()
    wait_for_actors_to_exit(driver)  # Tune's trial actors (and any other actor the job made)
    wait_for_actors_to_exit(None, TRAIN_ACTORS)
    ray.shutdown()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Capacity:
    """CPUs and GPUs of the cluster now, per node, and whether an autoscaler can add nodes."""

    cpus: float
    gpus: int
    max_cpus_per_node: float
    autoscaler: str | None
    """``v2``, ``v1`` (an autoscaler with a cluster config) or None (checked as a fixed cluster)."""


def cluster_capacity() -> Capacity:
    now = ray.cluster_resources()
    per_node = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    node_cpus = max((float(r.get("CPU", 0)) for r in per_node), default=0.0)
    return Capacity(float(now.get("CPU", 0)), int(now.get("GPU", 0)), node_cpus, _autoscaler_kind())


def _autoscaler_kind() -> str | None:
    """``v2`` when autoscaler v2 runs (it can say what it could never place), ``v1`` when the
    v1 autoscaler runs with a cluster config (it adds nodes for pending work but cannot be
    asked in advance), else None (a fixed cluster)."""
    from ray.autoscaler.v2.utils import is_autoscaler_v2

    try:
        if is_autoscaler_v2(fetch_from_server=True):
            return "v2"
    except Exception:
        pass
    return classify_v1_status(_v1_status())


def _v1_status() -> dict[str, Any] | None:
    """What the v1 autoscaler's monitor last wrote to the GCS (``ray status`` reads the same),
    or None when no monitor reports there."""
    import json

    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized

    try:
        if not _internal_kv_initialized():
            return None
        raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        status = json.loads(raw) if raw else None
    except Exception:
        return None
    return status if isinstance(status, dict) else None


#: The node type the v1 monitor gives each node when it runs without a cluster config (a
#: laptop's ``ray.init()``, ``ray start`` by hand): its read-only provider, which adds nothing.
_READONLY_NODE_TYPE = re.compile(r"node_[0-9a-f]{56}")


def classify_v1_status(status: dict[str, Any] | None) -> str | None:
    """``v1`` for the status of a v1 monitor that runs with a cluster config, else None.

    Every Ray head runs the v1 monitor unless autoscaler v2 is on. Without a config (a laptop,
    a hand-started head) it mirrors the nodes that are there, one node type per node named
    ``node_<node id>``, and can add none. With ``--autoscaling-config`` (an older KubeRay, the
    cluster launcher) its node types are the config's names (``ray.head.default``,
    ``cpu_worker``, a worker group), and it launches nodes for work that waits. The status
    holds no node type's size or ``max_workers``, so a v1 cluster cannot be asked in advance
    whether it could ever place the workers.
    """
    report = (status or {}).get("autoscaler_report")
    if not isinstance(report, dict):
        return None
    types: set[str] = set()
    for key in ("active_nodes", "idle_nodes", "pending_launches"):
        if isinstance(report.get(key), dict):
            types |= {str(t) for t in report[key]}
    if isinstance(report.get("node_type_mapping"), dict):
        types |= {str(t) for t in report["node_type_mapping"].values()}
    for entry in report.get("pending_nodes") or []:
        if isinstance(entry, (list, tuple)) and len(entry) >= 2:
            types.add(str(entry[-2]))
    if not types or all(_READONLY_NODE_TYPE.fullmatch(t) for t in types):
        return None
    return "v1"


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
    when GPUs are up or the autoscaler (v2) can add one, ``num_workers: auto`` becomes the
    elastic range ``[1, scaling.auto_max_workers]`` (Ray Train grows the group as nodes
    arrive), and a request is refused only when autoscaler v2 says no node type could ever
    place it; autoscaler v1 cannot be asked, so the job waits for the nodes it adds.
    """
    sc = cfg.scaling
    cap = cap or cluster_capacity()
    scaling = cap.autoscaler is not None
    use_gpu: bool
    if sc.use_gpu == "auto":
        # (autoscaler v1 cannot be asked: GPUs that are not up yet need scaling.use_gpu=true)
        use_gpu = cap.gpus > 0 or (cap.autoscaler == "v2" and autoscaler_can_place([{"GPU": 1.0}]) is True)
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
        if cap.autoscaler == "v2":
            _check_autoscaler_fits(placement, cap)
        elif not scaling:
            _check_fits(placement, cap)
        # autoscaler v1: nothing to ask; Ray Train's controller waits for its placement group,
        # which v1 launches nodes for (and warns in the job's output when no node type fits)
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


#: How to go on when a cluster without an autoscaler cannot place the workers.
FIXED_HINT = (
    "no autoscaler that adds nodes was found (neither v2 nor v1 with a cluster config): add nodes, "
    "ask for less, or set scaling.check_resources=false to wait for nodes started by hand"
)


def _check_fits(p: Placement, cap: Capacity) -> None:
    """One line naming the setting, what the cluster has and how to go on, when a fixed cluster
    cannot place ``p``."""
    need = p.min_workers
    cpus_per = p.resources_per_worker["CPU"]
    if p.use_gpu and cap.gpus == 0:
        raise UserError(
            "scaling.use_gpu=true but the Ray cluster has no GPUs and no autoscaler "
            f"(set scaling.use_gpu=auto or false; {FIXED_HINT})"
        )
    if cpus_per > cap.max_cpus_per_node + 1e-9:
        raise UserError(
            f"scaling.cpus_per_worker={cpus_per:g} is more than any node of the Ray cluster has "
            f"({cap.max_cpus_per_node:g} CPUs; {FIXED_HINT})"
        )
    if need * cpus_per > cap.cpus + 1e-9:
        raise UserError(
            f"scaling.num_workers={_shown(p.num_workers)} x scaling.cpus_per_worker={cpus_per:g} "
            f"needs {need * cpus_per:g} CPUs but the Ray cluster has {cap.cpus:g} ({FIXED_HINT})"
        )
    if p.use_gpu and need > cap.gpus:
        raise UserError(
            f"scaling.num_workers={_shown(p.num_workers)} needs {need} GPUs but the Ray cluster has "
            f"{cap.gpus} ({FIXED_HINT})"
        )


def _shown(n: int | tuple[int, int]) -> str:
    return str(n) if isinstance(n, int) else f"[{n[0]}, {n[1]}]"
