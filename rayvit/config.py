"""One typed configuration for training, tuning and serving.

YAML files and dotted ``key=value`` overrides are merged with OmegaConf, then
validated by pydantic models that forbid unknown keys. The validated object is
what flows to every Ray worker and what is saved next to every checkpoint.
"""

from __future__ import annotations

import difflib
import textwrap
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rayvit.errors import UserError


class _Section(BaseModel):
    # strict: a YAML ``true`` is not the integer 1 and ``2.5`` is not an epoch count;
    # no NaN or infinity anywhere; the docstring under each field is its ``--help`` text.
    model_config = ConfigDict(
        extra="forbid",
        validate_assignment=True,
        strict=True,
        allow_inf_nan=False,
        use_attribute_docstrings=True,
    )


PositiveInt = Annotated[int, Field(ge=1)]
PositiveFloat = Annotated[float, Field(gt=0.0)]
RGB = Annotated[list[float], Field(min_length=3, max_length=3)]
RGBPositive = Annotated[list[PositiveFloat], Field(min_length=3, max_length=3)]


class DataConfig(_Section):
    path: str = Field("uoft-cs/cifar10", min_length=1)
    """A folder (local path or storage URI: ``s3://``, ``gs://``) of hub-layout parquet files or
    an imagefolder (``train/<class>/<image>``), or a hub data set id."""
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    """Share of the ``train`` split held out for validation (seeded, the same in every run)."""
    train_limit: PositiveInt | None = None
    """First N training images only; null = all."""
    val_limit: PositiveInt | None = None
    """First N validation images only; null = all."""
    test_limit: PositiveInt | None = None
    """First N test images for the final evaluation; null = all."""
    image_column: str | None = None
    """Column with the images; null = the first ``Image`` feature."""
    label_column: str | None = None
    """Column with the labels; null = the first ``ClassLabel`` feature."""
    cache_dir: str | None = "~/.cache/rayvit"
    """Where a hub data set is downloaded to (``datasets``' cache); null = its default."""
    image_size: int | None = Field(None, ge=8)
    """Side (px) the decode tasks bring every image to and the object store keeps; null = or
    above ``model.image_size`` = the model's side (never more is stored). The rule: the source's
    own side when it is smaller than the model's (CIFAR-10: 32 under a 224-px model, 49x fewer
    bytes kept, sent and copied to the device), else null. The batched ``Preprocessor`` brings
    it to the model's side on the worker's device. Only at the model's side are training pixels
    exactly the server's for the same file (otherwise they are resized twice)."""
    max_in_memory_bytes: int = Field(4 * 1024**3, ge=0)
    """Decoded train+val data up to this size is decoded once and kept in the object store for
    every epoch; above it, it is streamed (decoded again each epoch) in bounded memory."""
    decode_cpus: float = Field(1.0, gt=0.0)
    """Logical CPUs of one decode task (Ray Data ``map_batches``)."""
    decode_batch_size: int = Field(2048, ge=1)
    """Images per block that a decode task yields (at most 16 MiB of them): bounds a task's
    memory; larger blocks cost less per epoch, smaller ones shuffle finer."""
    shuffle_buffer: int = Field(2048, ge=0)
    """Rows of the windowed per-epoch shuffle on each worker, rounded down to a multiple of
    ``train.batch_size`` (0 = block order only); also how many rows a worker takes from Ray
    Data at a time."""
    prefetch_batches: int = Field(4, ge=0)
    """Training batches each worker has ready ahead of the one it trains on, fetched in whole
    windows of ``data.shuffle_buffer`` rows (so at least one window when above 0)."""


ArchValue = int | float | bool | str | list[int] | list[float] | list[str] | None


class ModelConfig(_Section):
    pretrained: str | None = "google/vit-base-patch16-224-in21k"
    """Anything ``AutoModelForImageClassification`` loads: a hub id (``facebook/convnext-tiny-224``,
    ``timm/resnet18.a1_in1k`` with the ``timm`` extra), a local folder, or a storage URI of an
    exported model (an earlier run's ``best/``); null = build untrained from ``model_type`` and
    ``arch``."""
    model_type: str = Field("vit", min_length=1)
    """transformers model type of an untrained build (``vit``, ``deit``, ``convnext``,
    ``resnet``, ``swin``, ...; any with an image-classification head)."""
    arch: dict[str, ArchValue] = {}
    """Sizes of an untrained build, in the family's own config names (ViT: ``patch_size``,
    ``hidden_size``, ``num_hidden_layers``, ...; ConvNeXt: ``hidden_sizes``, ``depths``);
    unset ones keep the family's defaults."""
    image_size: int = Field(224, ge=8)
    """Side of the square model input in pixels; a pretrained model's processor must agree."""
    image_mean: RGB | None = None
    """Normalization mean per RGB channel; null = the pretrained processor's, else 0.5."""
    image_std: RGBPositive | None = None
    """Normalization standard deviation per RGB channel (> 0); null = the pretrained processor's, else 0.5."""
    attn_implementation: Literal["auto", "sdpa", "eager"] = "auto"
    """Attention kernel: auto = the family's best (PyTorch's scaled_dot_product_attention where it
    has it), or the plain one."""
    gradient_checkpointing: bool = False
    """Recompute each block's activations in the backward pass instead of keeping them: about a
    third more compute for far less activation memory (larger backbones, small GPUs)."""

    @model_validator(mode="after")
    def _shape(self) -> ModelConfig:
        if self.pretrained is None:
            check_architecture(self.model_type, self.arch, self.image_size)
        return self


def check_architecture(model_type: str, arch: dict[str, Any], image_size: int) -> None:
    """``model_type`` has an image-classification head and ``arch`` names only its config's
    fields, with the sizes that must divide each other doing so (``ValueError`` naming them)."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    known = sorted(MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES)
    if model_type not in known:
        match = difflib.get_close_matches(model_type, known, n=1, cutoff=0.5)
        hint = f" (did you mean '{match[0]}'?)" if match else ""
        raise ValueError(f"model.model_type '{model_type}' has no image-classification model{hint}")
    defaults = CONFIG_MAPPING[model_type]()
    for key in arch:
        if key in ("image_size", "num_labels", "id2label", "label2id"):
            raise ValueError(f"model.arch.{key} is set by rayvit (model.image_size, the data's classes)")
        if not hasattr(defaults, key):
            raise ValueError(f"model.arch.{key}: not a field of the '{model_type}' config")
    merged = {**defaults.to_dict(), **arch}
    patch, hidden, heads = (
        merged.get("patch_size"),
        merged.get("hidden_size"),
        merged.get("num_attention_heads"),
    )
    if isinstance(patch, int) and hasattr(defaults, "image_size") and image_size % patch:
        raise ValueError(f"model.image_size={image_size} is not a multiple of model.arch.patch_size={patch}")
    if isinstance(hidden, int) and isinstance(heads, int) and hidden % heads:
        raise ValueError(
            f"model.arch.hidden_size={hidden} is not a multiple of model.arch.num_attention_heads={heads}"
        )


class TrainConfig(_Section):
    epochs: PositiveInt = 3
    """Passes over the training images."""
    batch_size: PositiveInt = 64
    """Per worker and micro-batch; every step has exactly this shape (the last images of an
    epoch that do not fill a batch are left out, others each epoch)."""
    eval_batch_size: PositiveInt = 256
    """Per worker, for validation and test passes."""
    evals_per_epoch: PositiveInt = 1
    """Validation passes per epoch; the ones before the epoch's end only report metrics (for
    ASHA to stop a weak trial early), checkpoints stay at epoch ends."""
    lr: PositiveFloat = 5e-5
    """Peak learning rate of AdamW (after warmup) for the global batch ``batch_size x
    grad_accum_steps x workers`` (a sweep's trials all have the same one); a sweep replaces it
    per trial."""
    weight_decay: float = Field(0.05, ge=0.0)
    """AdamW weight decay; biases, norm layers and embeddings (tables, class and position tokens) get none."""
    warmup_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    """Share of all steps spent in linear warmup; cosine decay to zero follows."""
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    """Label smoothing of the cross-entropy loss."""
    class_weights: Literal["none", "balanced"] = "none"
    """balanced = weigh each class's loss by images / (classes x that class's training images),
    for imbalanced data; none = every image counts the same."""
    grad_clip: PositiveFloat | None = 1.0
    """Gradient norm clip; null = off."""
    augment: bool = True
    """Random crop (padding 1/8 of the side) and horizontal flip."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto = bf16 autocast on GPU, fp32 on CPU."""
    num_threads: PositiveInt | None = None
    """torch threads per worker; null = the worker's CPU count."""
    keep_checkpoints: PositiveInt = 2
    """Best k checkpoints kept by ``tune.metric`` (the latest is always kept)."""
    max_failures: int = Field(3, ge=-1)
    """Failures recovered from the last checkpoint, per run: lost workers (Ray Train restarts
    them) and a trial's lost driver node (Tune reruns the trial, which resumes); -1 = no limit."""
    inject_fault_epoch: PositiveInt | None = None
    """Chaos testing: the last worker dies once, midway through the epoch after this one."""
    compile: bool = False
    """``torch.compile`` the model (worth it on GPUs for long runs; slow to start on CPUs; on in
    the GPU recipe). Every step has the same batch shape, so it compiles once; the first step's
    time, compilation included, is reported once."""
    grad_accum_steps: PositiveInt = 1
    """Micro-batches of ``train.batch_size`` per optimizer step (gradients summed locally, one
    all-reduce per step): the global batch is ``batch_size x grad_accum_steps x workers``."""
    log_every_steps: PositiveInt = 50
    """Optimizer steps between the host's looks at the device: the finiteness check (a diverged
    run stops there, at the same step on every rank) and the running loss to wandb. Between
    them a step never waits for the device."""
    checkpoint_upload: Literal["async", "sync"] = "async"
    """How rank 0's checkpoint reaches ``output_dir``: async = Ray Train uploads it in the
    background while the next epoch trains (a mid-epoch report waits for it in the background
    too); sync = every rank waits for the upload."""
    ddp_static_graph: bool = True
    """DDP's ``static_graph`` (the same parameters get gradients every step, which lets DDP skip
    per-step bookkeeping); used with ``train.grad_accum_steps: 1`` and without compile only."""
    ddp_bf16_grads: bool = False
    """Send gradients in bf16 over the network (DDP's ``bf16_compress_hook``): half the all-reduce
    bytes, for multi-node runs whose interconnect is the bottleneck; GPUs only."""


class ScalingSection(_Section):
    num_workers: (
        PositiveInt | Annotated[list[PositiveInt], Field(min_length=2, max_length=2)] | Literal["auto"]
    ) = "auto"
    """A fixed count, an elastic ``[min, max]`` range (Ray Train V2 resizes between them), or auto =
    one worker per GPU on a fixed cluster (one CPU worker without GPUs), the elastic range
    ``[1, auto_max_workers]`` on an autoscaling one. A sweep's trials each run at the range's
    upper end, fixed (same global batch, same schedule, comparable); a single run is elastic.
    A run's workers share one node when they fit on it."""
    use_gpu: bool | Literal["auto"] = "auto"
    """Train on GPUs (one per worker); auto = when the cluster has any or its autoscaler can add one."""
    cpus_per_worker: PositiveFloat = 1.0
    """Logical CPUs reserved for each training worker."""
    auto_max_workers: PositiveInt = 8
    """Upper end of the elastic range that ``num_workers: auto`` means on an autoscaling cluster."""
    check_resources: bool = True
    """Fail at once when even a fully scaled-up cluster could never place the workers."""

    @model_validator(mode="after")
    def _range(self) -> ScalingSection:
        n = self.num_workers
        if isinstance(n, list) and n[0] > n[1]:
            raise ValueError(f"scaling.num_workers [{n[0]}, {n[1]}]: the minimum is above the maximum")
        return self


SearchValue = int | float | bool | str | list[int] | list[float] | None
Bounds = Annotated[list[float], Field(min_length=2, max_length=2)]
IntBounds = Annotated[list[int], Field(min_length=2, max_length=2)]


class Distribution(_Section):
    """One searched key's values: exactly one of these, as Ray Tune's distribution of that name."""

    grid: Annotated[list[SearchValue], Field(min_length=1)] | None = None
    """Every value, each in its own trial(s) (``tune.grid_search``); with the random and optuna
    searchers, a choice."""
    choice: Annotated[list[SearchValue], Field(min_length=1)] | None = None
    """One of these values per trial (``tune.choice``)."""
    uniform: Bounds | None = None
    """``[low, high]``: a float, uniformly (``tune.uniform``)."""
    quniform: Annotated[list[float], Field(min_length=3, max_length=3)] | None = None
    """``[low, high, q]``: a float, uniformly, rounded to a multiple of q (``tune.quniform``)."""
    loguniform: Bounds | None = None
    """``[low, high]``, low > 0: a float, uniformly in log space (``tune.loguniform``)."""
    randint: IntBounds | None = None
    """``[low, high]``: an integer, low <= x < high (``tune.randint``)."""
    lograndint: IntBounds | None = None
    """``[low, high]``, low > 0: an integer, uniformly in log space, low <= x < high."""

    @model_validator(mode="after")
    def _one(self) -> Distribution:
        given = [k for k, v in self if v is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of {', '.join(Distribution.model_fields)} (got {given or 'none'})"
            )
        kind, value = given[0], getattr(self, given[0])
        if kind in ("grid", "choice"):
            return self
        low, high = value[0], value[1]
        if low >= high:
            raise ValueError(f"{kind}: low ({low:g}) must be below high ({high:g})")
        if kind.startswith("log") and low <= 0:
            raise ValueError(f"{kind}: low must be above 0 (got {low:g})")
        return self

    @property
    def kind(self) -> str:
        return next(k for k, v in self if v is not None)

    @property
    def args(self) -> list[Any]:
        return list(getattr(self, self.kind))

    def probes(self) -> list[Any]:
        """Values that stand for all it can give, to check against the key's type and bounds:
        every listed value; both ends of a range and, for a float range, its middle (an integer
        key cannot take it)."""
        args = self.args
        if self.kind in ("grid", "choice"):
            return args
        if self.kind in ("randint", "lograndint"):
            return [args[0], args[1] - 1]
        return [float(args[0]), float(args[1]), (args[0] + args[1]) / 2 + 1e-9]


#: Sections whose keys a sweep may vary per trial (the data, cluster and storage are the job's).
SEARCHABLE = ("model.", "train.")
UNSEARCHABLE = ("train.epochs",)
"""ASHA's horizon is ``train.epochs``: every trial has the same one."""
METRICS = ("val_accuracy", "val_loss", "val_macro_f1")


class TuneSection(_Section):
    search_space: dict[str, Distribution] = {}
    """Dotted config key (``train.lr``, ``train.weight_decay``, ``model.arch.hidden_size``,
    ``model.pretrained``, ...) -> its distribution, e.g. ``{loguniform: [1e-4, 1e-2]}`` or
    ``{choice: [0.0, 0.05]}``; checked against the key's type and bounds before anything starts."""
    lrs: Annotated[list[PositiveFloat], Field(min_length=1)] | None = None
    """Shorthand for ``search_space: {train.lr: {grid: LRS}}``; one value (or null with no range) = no sweep."""
    lr_min: PositiveFloat | None = None
    """Shorthand, with lr_max, for ``search_space: {train.lr: {loguniform: [LR_MIN, LR_MAX]}}``."""
    lr_max: PositiveFloat | None = None
    """Upper end of the lr_min shorthand."""
    num_samples: PositiveInt = 1
    """Trials drawn from the sampled distributions (with search_alg grid: per grid point)."""
    search_alg: Literal["grid", "random", "optuna"] = "grid"
    """grid = every grid point, with num_samples random draws of the other keys each (Tune's
    variant generator); random = num_samples random draws of every key (a grid is a choice);
    optuna = num_samples trials from Optuna's TPE (``OptunaSearch``, the ``tune`` extra)."""
    scheduler: Literal["asha", "fifo"] = "asha"
    """asha = stop weak trials early on ``metric``; fifo = every trial runs all its epochs."""
    metric: Literal["val_accuracy", "val_loss", "val_macro_f1"] = "val_accuracy"
    """What ASHA, the kept checkpoints (``train.keep_checkpoints``) and the chosen trial follow."""
    mode: Literal["auto", "max", "min"] = "auto"
    """auto = min for val_loss, max otherwise."""
    grace_period: float = Field(1.0, gt=0)
    """ASHA: epochs every trial runs before it can be stopped; a fraction needs
    ``train.evals_per_epoch`` validation passes per epoch to act on."""
    reduction_factor: float = Field(2.0, gt=1.0)
    """ASHA: keep the best 1/reduction_factor of trials at each rung."""
    max_concurrent_trials: PositiveInt | Literal["auto"] = "auto"
    """auto = as many trials as the cluster can place side by side."""
    driver_cpus: PositiveFloat = 0.01
    """Logical CPU of each trial's driver function, which only waits on its TorchTrainer."""

    @model_validator(mode="before")
    @classmethod
    def _dotted(cls, raw: Any) -> Any:
        # A dotted override (tune.search_space.train.lr.loguniform=[...]) arrives nested.
        if isinstance(raw, dict) and isinstance(raw.get("search_space"), dict):
            raw = {**raw, "search_space": _flatten_space(raw["search_space"])}
        return raw

    @model_validator(mode="after")
    def _range(self) -> TuneSection:
        if (self.lr_min is None) != (self.lr_max is None):
            raise ValueError("tune.lr_min and tune.lr_max must be set together (or both null)")
        if self.lr_min is not None and self.lr_max is not None and self.lr_min >= self.lr_max:
            raise ValueError(f"tune.lr_min ({self.lr_min:g}) must be below tune.lr_max ({self.lr_max:g})")
        if "train.lr" in self.search_space and (self.lrs is not None or self.lr_min is not None):
            raise ValueError("tune.search_space['train.lr'] and tune.lrs/lr_min/lr_max: give one of them")
        return self

    @property
    def space(self) -> dict[str, Distribution]:
        """The search space with the learning-rate shorthands in it."""
        space = dict(self.search_space)
        if self.lrs is not None:
            space["train.lr"] = Distribution(grid=list(self.lrs))
        elif self.lr_min is not None and self.lr_max is not None:
            space["train.lr"] = Distribution(loguniform=[self.lr_min, self.lr_max])
        return space

    @property
    def resolved_mode(self) -> Literal["max", "min"]:
        if self.mode != "auto":
            return self.mode
        return "min" if self.metric == "val_loss" else "max"


def _flatten_space(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict) and value and not set(value) <= set(Distribution.model_fields):
            out.update(_flatten_space(value, f"{prefix}{key}."))
        elif prefix and not isinstance(value, dict):
            raise ValueError(
                f"tune.search_space['{prefix[:-1]}']: unknown distribution '{key}' "
                f"(one of {', '.join(Distribution.model_fields)})"
            )
        else:
            out[f"{prefix}{key}"] = value
    return out


class WandbSection(_Section):
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    """auto = online when WANDB_API_KEY is set, else offline files under output_dir."""
    project: str = Field("rayvit", min_length=1)
    """wandb project of the runs."""
    entity: str | None = None
    """wandb team or user; null = the API key's default."""


class RayConfig(_Section):
    address: str | None = None
    """null = RAY_ADDRESS (set by ``ray job submit``) or a new local cluster; "auto" joins a running one."""
    num_cpus: PositiveInt | None = None
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
    """Data set and split."""
    model: ModelConfig = ModelConfig()
    """Model and input preprocessing."""
    train: TrainConfig = TrainConfig()
    """Optimization, per training run."""
    scaling: ScalingSection = ScalingSection()
    """Ray Train workers."""
    ray: RayConfig = RayConfig()
    """Ray cluster to run on."""
    tune: TuneSection = TuneSection()
    """Hyperparameter sweep (Ray Tune: a searcher, ASHA)."""
    wandb: WandbSection = WandbSection()
    """Experiment tracking."""
    storage: StorageSection = StorageSection()
    """Object storage settings for URI ``output_dir``s."""
    output_dir: str = Field("runs/default", min_length=1)
    """Where checkpoints, Tune state, sweep.csv and best/ live: a local or shared folder, or a
    storage URI (``gs://bucket/prefix``, ``s3://...``) that every node reaches."""
    local_dir: str = Field("~/.cache/rayvit", min_length=1)
    """This node's folder for what must be local: wandb offline files when output_dir is a
    URI, downloaded models."""
    restart: bool = False
    """Train from scratch even though output_dir holds a run (its contents are replaced)."""
    seed: int = Field(0, ge=0)
    """Seeds the split, the shuffling, augmentation and model initialisation."""

    @model_validator(mode="after")
    def _searchable(self) -> Config:
        for key, dist in self.tune.space.items():
            check_searched(self, key, dist)
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def check_searched(cfg: Config, key: str, dist: Distribution) -> None:
    """A searched key is a config key of a searchable section and every value the distribution
    stands for is one the key takes (``ValueError`` naming the key)."""
    where = f"tune.search_space['{key}']"
    section, _, name = key.partition(".")
    if f"{key}." not in {f"{k}." for k in _all_keys(Config)} and not key.startswith("model.arch."):
        raise ValueError(f"{where}: unknown config key{_closest(key)}")
    if not key.startswith(SEARCHABLE) or key in UNSEARCHABLE:
        raise ValueError(
            f"{where}: not searchable (a sweep varies {' and '.join(s + '*' for s in SEARCHABLE)} keys "
            f"other than {', '.join(UNSEARCHABLE)}; the data, cluster and storage are the job's)"
        )
    model: type[BaseModel] = ModelConfig if section == "model" else TrainConfig
    for value in dist.probes():
        raw = getattr(cfg, section).model_dump()
        if name.startswith("arch."):
            raw["arch"] = {**raw["arch"], name.removeprefix("arch."): value}
        else:
            raw[name] = value
        try:
            model.model_validate(raw)
        except ValidationError as exc:
            e = exc.errors()[0]
            msg = str(e["ctx"]["error"]) if e["type"] == "value_error" else e["msg"]
            raise ValueError(f"{where}: {dist.kind} gives {value!r}: {msg}") from None


def with_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """``cfg`` with dotted keys set (a trial's searched values), validated like any config."""
    raw = cfg.to_dict()
    for key, value in overrides.items():
        node = raw
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value.item() if hasattr(value, "item") else value  # numpy scalars from Tune
    return config_from_dict(raw)


def _all_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys: list[str] = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(_all_keys(ann, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _type_name(ann: Any) -> str:
    """``int >= 1 | 'auto'``-style text for a field annotation, bounds included."""
    origin = typing.get_origin(ann)
    if origin is Annotated:
        inner, *meta = typing.get_args(ann)
        return _type_name(inner) + _bounds(meta)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(ann))
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(ann))
    if origin is list:
        return f"list[{', '.join(_type_name(a) for a in typing.get_args(ann))}]"
    if ann is type(None):
        return "null"
    return getattr(ann, "__name__", str(ann))


def _bounds(meta: list[Any]) -> str:
    """Pydantic's constraint objects (``Ge``, ``MinLen`` ...) as `` >= 1``, `` in [0, 1)`` or `` (3 items)``."""
    found: dict[str, Any] = {}
    # Inside a union the constraints stay wrapped in a FieldInfo: unwrap it.
    for c in [x for m in meta for x in (getattr(m, "metadata", None) or [m])]:
        for attr in ("gt", "ge", "lt", "le", "min_length", "max_length"):
            if getattr(c, attr, None) is not None:
                found[attr] = getattr(c, attr)
    lower = ("(", found["gt"]) if "gt" in found else ("[", found["ge"]) if "ge" in found else None
    upper = (")", found["lt"]) if "lt" in found else ("]", found["le"]) if "le" in found else None
    text = ""
    if lower and upper:
        text = f" in {lower[0]}{lower[1]:g}, {upper[1]:g}{upper[0]}"
    elif lower:
        text = f" {'>' if lower[0] == '(' else '>='} {lower[1]:g}"
    elif upper:
        text = f" {'<' if upper[0] == ')' else '<='} {upper[1]:g}"
    lo, hi = found.get("min_length"), found.get("max_length")
    if lo is not None and lo == hi:
        text += f" ({lo} items)"
    elif lo is not None:
        text += " (non-empty)" if lo == 1 else f" (at least {lo})"
    return text


@dataclass(frozen=True)
class KeyDoc:
    """One config key as ``--help`` shows it."""

    key: str
    type: str
    default: str
    doc: str


def config_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[KeyDoc]:
    """Every key of ``model`` with its type, default and docstring, sections expanded."""
    out: list[KeyDoc] = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.extend(config_keys(ann, f"{prefix}{name}."))
            continue
        type_text = _type_name(ann) + _bounds(list(field.metadata))
        default = yaml.safe_dump(field.default, default_flow_style=True).strip().removesuffix("...").strip()
        doc = " ".join((field.description or "").split())
        out.append(KeyDoc(f"{prefix}{name}", type_text, default, doc))
    return out


def config_help(width: int = 100) -> str:
    """The config keys as plain text: what ``--help`` prints and docs/config.md holds."""
    lines: list[str] = []
    section = ""
    for k in config_keys():
        head = k.key.rpartition(".")[0]
        if head != section or not lines:
            section = head
            lines += ["", f"{head}: {Config.model_fields[head].description}" if head else "top level:"]
        lines.append(f"  {k.key} ({k.type}, default {k.default})")
        lines += textwrap.wrap(k.doc, width, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines).strip("\n") + "\n"


def _closest(key: str) -> str:
    match = difflib.get_close_matches(key, _all_keys(Config), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _key_of(loc: tuple[int | str, ...]) -> tuple[str, str]:
    """The dotted config key of an error location, and a list index (``[1]``) below it if any."""
    parts: list[str] = []
    model: type[BaseModel] | None = Config
    for p in loc:
        if model is None or str(p) not in model.model_fields:
            # A union failure carries the member's name after the key; a list its index.
            index = f"[{p}]" if isinstance(p, int) else ""
            return ".".join(parts), index
        parts.append(str(p))
        ann = model.model_fields[str(p)].annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return ".".join(parts), ""


def _first_error(err: ValidationError) -> str:
    """One line for the first wrong key: what is wrong, what was given, what fits."""
    errors = err.errors()
    e = errors[0]
    if tuple(e["loc"][:2]) == ("tune", "search_space") and len(e["loc"]) > 2:
        # A distribution's own fault: name the searched key, then what is wrong with it.
        where = f"tune.search_space['{e['loc'][2]}']"
        if e["type"] == "value_error":
            return f"{where}: {e['ctx']['error']}"
        inner = ".".join(str(p) for p in e["loc"][3:])
        return f"{where}{': ' + inner if inner else ''}: {e['msg']} (got {e.get('input')!r})"
    if e["type"] == "extra_forbidden":
        key = ".".join(str(p) for p in e["loc"])
        return f"unknown config key '{key}'{_closest(key)}"
    key, index = _key_of(e["loc"])
    if e["type"] == "value_error":  # a check across keys: its message names them
        return str(e["ctx"]["error"])
    # A union (e.g. an integer or "auto") fails once per member: say what each wanted.
    wanted = list(dict.fromkeys(x["msg"] for x in errors if _key_of(x["loc"]) == (key, index)))
    msg = " or ".join([wanted[0], *(w.removeprefix("Input should be ") for w in wanted[1:])])
    return f"invalid value for '{key or 'config'}{index}': {msg} (got {e.get('input')!r})"


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
