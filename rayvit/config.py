"""One typed configuration for training, tuning and serving.

YAML files and dotted ``key=value`` overrides are merged with OmegaConf, then
validated by pydantic models that forbid unknown keys. The validated object is
what flows to every Ray worker and what is saved next to every checkpoint.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rayvit.errors import UserError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    path: str = "uoft-cs/cifar10"
    """Hub data set id, a local folder in hub layout, or an imagefolder."""
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    train_limit: int | None = Field(None, ge=1)
    val_limit: int | None = Field(None, ge=1)
    test_limit: int | None = Field(None, ge=1)
    image_column: str | None = None
    """Column with the images; null = the first ``Image`` feature."""
    label_column: str | None = None
    """Column with the labels; null = the first ``ClassLabel`` feature."""
    cache_dir: str | None = "~/.cache/rayvit"
    """Where a hub data set is downloaded to (``datasets``' cache); null = its default."""
    image_size: int | None = Field(None, ge=8)
    """Side (px) the decode tasks bring every image to; null = ``model.image_size``. A smaller
    side (CIFAR-10's 32 under a 224-px model) keeps less in memory; the batched ``Preprocessor``
    resizes on the worker's device."""
    max_in_memory_bytes: int = Field(4 * 1024**3, ge=0)
    """Decoded train+val data up to this size is decoded once and kept in the object store for
    every epoch; above it, it is streamed (decoded again each epoch) in bounded memory."""
    decode_cpus: float = Field(1.0, gt=0.0)
    """Logical CPUs of one decode task (Ray Data ``map_batches``)."""
    decode_batch_size: int = Field(2048, ge=1)
    """Images per block that a decode task yields (at most 16 MiB of them): bounds a task's
    memory; larger blocks cost less per epoch, smaller ones shuffle finer."""
    shuffle_buffer: int = Field(2048, ge=0)
    """Rows of the windowed per-epoch shuffle on each worker (0 = block order only)."""
    prefetch_batches: int = Field(4, ge=0)
    """Batches each worker prepares ahead of the one it trains on."""


class ModelConfig(_Section):
    pretrained: str | None = "google/vit-base-patch16-224-in21k"
    """Hub id or local folder to fine-tune; null = train from scratch."""
    image_size: int = Field(224, ge=8)
    patch_size: int = Field(16, ge=1)
    hidden_size: int = Field(768, ge=8)
    num_layers: int = Field(12, ge=1)
    num_heads: int = Field(12, ge=1)
    mlp_dim: int = Field(3072, ge=8)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    image_mean: list[float] | None = None
    """Normalization mean; null = the pretrained processor's, else 0.5."""
    image_std: list[float] | None = None
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"


class TrainConfig(_Section):
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(64, ge=1)
    """Per worker."""
    eval_batch_size: int = Field(256, ge=1)
    evals_per_epoch: int = Field(1, ge=1)
    """Validation passes per epoch; the ones before the epoch's end only report metrics (for
    ASHA to stop a weak trial early), checkpoints stay at epoch ends."""
    lr: float = Field(5e-5, gt=0.0)
    weight_decay: float = Field(0.05, ge=0.0)
    warmup_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    grad_clip: float | None = Field(1.0, gt=0.0)
    augment: bool = True
    """Random crop (padding 1/8 of the side) and horizontal flip."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto = bf16 autocast on GPU, fp32 on CPU."""
    num_threads: int | None = Field(None, ge=1)
    """torch threads per worker; null = the worker's CPU count."""
    keep_checkpoints: int = Field(2, ge=1)
    """Best k checkpoints kept by validation accuracy (the latest is always kept)."""
    max_failures: int = Field(3, ge=-1)
    inject_fault_epoch: int | None = Field(None, ge=1)
    """Chaos testing: the last worker dies once, midway through the epoch after this one."""
    compile: bool = False
    """``torch.compile`` the model (worth it on GPUs for long runs; slow to start on CPUs)."""


class ScalingSection(_Section):
    num_workers: int | tuple[int, int] | Literal["auto"] = "auto"
    """A fixed count, an elastic ``[min, max]`` range (Train V2 resizes between them), or auto =
    one worker per GPU the cluster has or its autoscaler can add, else one CPU worker."""
    use_gpu: bool | Literal["auto"] = "auto"
    """auto = GPUs when the cluster has them or its autoscaler can add them."""
    cpus_per_worker: float = Field(1.0, gt=0.0)
    auto_max_workers: int = Field(8, ge=1)
    """Upper end of the elastic range that ``num_workers: auto`` means on an autoscaling cluster."""
    check_resources: bool = True
    """Fail at once when even a fully scaled-up cluster could never place the workers."""


class TuneSection(_Section):
    lrs: list[float] | None = None
    """Grid of learning rates; one value (or null with no range) = no sweep."""
    lr_min: float | None = Field(None, gt=0.0)
    lr_max: float | None = Field(None, gt=0.0)
    num_samples: int = Field(1, ge=1)
    """Log-uniform samples between lr_min and lr_max (used when lrs is null)."""
    grace_period: float = Field(1.0, gt=0)
    """ASHA: epochs every trial runs before it can be stopped; a fraction needs
    ``train.evals_per_epoch`` validation passes per epoch to act on."""
    reduction_factor: float = Field(2.0, gt=1.0)
    max_concurrent_trials: int | Literal["auto"] = "auto"
    """auto = as many trials as the cluster can place side by side."""
    driver_cpus: float = Field(0.01, gt=0.0)
    """Logical CPU of each trial's driver function, which only waits on its TorchTrainer."""


class WandbSection(_Section):
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    """auto = online when WANDB_API_KEY is set, else offline files under output_dir."""
    project: str = "rayvit"
    entity: str | None = None


class RayConfig(_Section):
    address: str | None = None
    """null = RAY_ADDRESS (set by ``ray job submit``) or a new local cluster; "auto" joins a running one."""
    num_cpus: int | None = Field(None, ge=1)
    """Logical CPUs of a local cluster started by the job; null = all cores."""
    object_store_memory: int | None = Field(None, ge=78_643_200)
    """Bytes of object store of a local cluster started by the job (at least 75 MiB); null =
    Ray's default (30% of memory). Streamed data never needs more than a few blocks of it."""


class StorageSection(_Section):
    endpoint_url: str | None = None
    """S3-compatible endpoint for ``s3://`` output (MinIO, a local test server); null = the
    filesystem's default (``AWS_ENDPOINT_URL`` when set)."""


class Config(_Section):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    scaling: ScalingSection = ScalingSection()
    ray: RayConfig = RayConfig()
    tune: TuneSection = TuneSection()
    wandb: WandbSection = WandbSection()
    storage: StorageSection = StorageSection()
    output_dir: str = "runs/default"
    """Where checkpoints, Tune state, sweep.csv and best/ live: a local or shared folder, or a
    storage URI (``gs://bucket/prefix``, ``s3://...``) that every node reaches."""
    local_dir: str = "~/.cache/rayvit"
    """This node's folder for what must be local: wandb offline files when output_dir is a
    URI, downloaded models."""
    restart: bool = False
    """Train from scratch even though output_dir holds a run (its contents are replaced)."""
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _all_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys: list[str] = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(_all_keys(ann, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _closest(key: str) -> str:
    match = difflib.get_close_matches(key, _all_keys(Config), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _first_error(err: ValidationError) -> str:
    e = err.errors()[0]
    # A union failure carries the member's name after the key: keep only real keys.
    parts: list[str] = []
    model: type[BaseModel] | None = Config
    for p in e["loc"]:
        if model is None or str(p) not in model.model_fields:
            if e["type"] == "extra_forbidden":
                parts.append(str(p))
            break
        parts.append(str(p))
        ann = model.model_fields[str(p)].annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    key = ".".join(parts) or "config"
    if e["type"] == "extra_forbidden":
        return f"unknown config key '{key}'{_closest(key)}"
    return f"invalid value for '{key}': {e['msg']} (got {e.get('input')!r})"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build the config from defaults, an optional YAML file and dotted overrides.

    Raises ``UserError`` with a one-line message naming the offending key or file.
    """
    layers: list[Any] = []
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file not found: {p}")
        try:
            loaded = OmegaConf.load(p)
        except (OmegaConfBaseException, yaml.YAMLError) as exc:
            raise UserError(f"config file {p} is not valid YAML: {exc}") from exc
        if not OmegaConf.is_dict(loaded):
            raise UserError(f"config file {p} must hold a mapping at the top level")
        layers.append(loaded)
    for item in overrides or []:
        if "=" not in item or item.startswith("="):
            raise UserError(f"override '{item}' must look like key=value (e.g. train.lr=1e-4)")
    try:
        if overrides:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*layers) if layers else OmegaConf.create({})
        raw = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as exc:
        raise UserError(f"cannot merge config: {exc}") from exc
    return config_from_dict({str(k): v for k, v in raw.items()} if isinstance(raw, dict) else {})


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Validate a plain dict (e.g. one saved next to a checkpoint)."""
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise UserError(_first_error(exc)) from exc
