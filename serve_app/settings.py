"""Serving settings: ``configs/serve.yaml`` is the one place they are written.

The file is a Ray Serve config (``serve run configs/serve.yaml`` and ``serve
deploy`` read it as is). ``serve run serve_app:app`` reads the same file's
deployment section, so both ways deploy with the same autoscaling, batching,
resource and limit settings.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rayvit.errors import UserError
from rayvit.imageio import DEFAULT_MAX_JPEG_SCANS, DEFAULT_MAX_PIXELS

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "serve.yaml"
#: What the README's main job exports.
DEFAULT_MODEL_DIR = "runs/quick/best"
TRAIN_COMMAND = (
    "python ray_jobs/train.py --config configs/quick.yaml data.path=PATH/TO/cifar10 output_dir=runs/quick"
)
DEPLOYMENT_NAME = "ImageClassifier"
IMPORT_PATH = "serve_app:app"

#: Keys of a deployment entry that ``Deployment.options`` takes.
DEPLOYMENT_OPTION_KEYS = (
    "num_replicas",
    "autoscaling_config",
    "max_ongoing_requests",
    "max_queued_requests",
    "backpressure_config",
    "ray_actor_options",
    "user_config",
    "graceful_shutdown_wait_loop_s",
    "graceful_shutdown_timeout_s",
    "health_check_period_s",
    "health_check_timeout_s",
    "logging_config",
)


class ReplicaSettings(BaseModel):
    """The deployment's ``user_config``: applied by ``reconfigure``, changeable at runtime."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(32, ge=1, le=4096)
    """Images per forward pass (dynamic batching)."""
    batch_wait_timeout_s: float = Field(0.02, ge=0.0, le=10.0)
    """How long the first image of a batch waits for others."""
    torch_threads: int | None = Field(None, ge=1, le=256)
    """torch intra-op threads; null = the replica's CPU reservation, rounded up."""
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1)
    """Larger request bodies get 413."""
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)
    """Larger images (width x height, read from the header before decoding) get 413."""
    max_request_pixels: int = Field(2 * DEFAULT_MAX_PIXELS, ge=1)
    """Most decoded pixels in one request, all files together (after JPEG DCT scaling); more get 413."""
    max_jpeg_scans: int = Field(DEFAULT_MAX_JPEG_SCANS, ge=1)
    """JPEGs with more scans (progressive passes) get 422: a few KiB of scans can cost seconds."""
    max_files: int = Field(64, ge=1)
    """Most images in one multipart request; more get 413."""
    default_top_k: int = Field(3, ge=1, le=10)
    decode_threads: int | None = Field(None, ge=1, le=64)
    """Threads that decode images, per replica (each holds at most one image being decoded); null
    = the replica's CPU reservation, rounded up (a GPU replica's CPUs feed its GPU)."""
    gil_switch_interval_ms: float = Field(0.5, gt=0.0, le=100.0)
    """How long a thread that wants the GIL waits before the holder must hand it over (Python's
    default is 5 ms). Every request hops to a decode thread and back, and torch re-takes the GIL
    after each op: at 5 ms each hop waits up to that long whenever another thread runs Python."""
    decode_timeout_s: float = Field(10.0, gt=0.0)
    """A request's images must be decoded within this; otherwise 422 (or 503 if decoding never started)."""
    body_timeout_s: float = Field(10.0, gt=0.0)
    """The whole request body must arrive within this; otherwise 408."""
    max_pending_requests: int = Field(48, ge=1)
    """Requests a replica holds at once in /predict; more get 503 with Retry-After."""
    retry_after_s: int = Field(1, ge=0)
    """The Retry-After of a 503."""
    health_probe_idle_s: float = Field(5.0, ge=0.0)
    """check_health runs a forward pass only when none succeeded for this long."""
    api_keys_file: str | None = None
    """A file of API keys, one a line; with it (or RAYVIT_API_KEYS) /predict and /model need a key."""


def replica_settings(raw: dict[str, Any] | None) -> ReplicaSettings:
    try:
        return ReplicaSettings.model_validate(raw or {})
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "user_config"
        if err["type"] == "extra_forbidden":
            known = ", ".join(ReplicaSettings.model_fields)
            raise UserError(f"user_config: unknown key '{key}' (known: {known})") from exc
        raise UserError(f"user_config: invalid '{key}': {err['msg']}") from exc


def _load_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"serve config not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"serve config {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise UserError(f"serve config {path} must hold a mapping at the top level")
    return data


def deployment_options(config_path: str | Path | None = None) -> dict[str, Any]:
    """The ``ImageClassifier`` entry of the serve config, as ``Deployment.options`` kwargs."""
    path = Path(config_path).expanduser() if config_path else DEFAULT_CONFIG
    data = _load_yaml(path)
    apps = data.get("applications") or []
    if not isinstance(apps, list):
        raise UserError(f"serve config {path}: 'applications' must be a list")
    ours = [a for a in apps if isinstance(a, dict) and a.get("import_path") == IMPORT_PATH] or apps[:1]
    entries = (ours[0].get("deployments") or []) if ours and isinstance(ours[0], dict) else []
    entry = next((d for d in entries if isinstance(d, dict) and d.get("name") == DEPLOYMENT_NAME), None)
    if entry is None:
        raise UserError(f"serve config {path}: no deployment named {DEPLOYMENT_NAME} under '{IMPORT_PATH}'")
    unknown = sorted(set(entry) - {"name", *DEPLOYMENT_OPTION_KEYS})
    if unknown:
        raise UserError(f"serve config {path}: unsupported deployment key(s): {', '.join(unknown)}")
    options = {k: copy.deepcopy(v) for k, v in entry.items() if k != "name"}
    replica_settings(options.get("user_config"))  # fail at build time, not in every replica
    return options


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``override`` wins."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
