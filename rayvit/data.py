"""Image-classification data through Ray Data: read, decoded and resized on the cluster's CPUs.

A data set (hub-layout parquet files or an imagefolder, in a local folder or at a storage
URI; or a hub id, downloaded by ``datasets`` and read from its cache files) is planned on the
driver from file metadata only: which files, how many rows, class names (``rayvit.readers``,
one reader per source kind). The work is cut
into *units* (a parquet row group, a slice of an Arrow cache file, a run of image files);
Ray Data runs one ``map_batches`` task per unit that reads its rows, decodes each image with
``rayvit.imageio.decode_image`` (the server's decoder) and brings it to a fixed side with
``rayvit.preprocess.resize_uint8`` (the ``Preprocessor``'s resize), yielding blocks of at
most ``data.decode_batch_size`` images. No process ever holds the data set, nor one image
at full size longer than it takes to resize it.

Rows carry their global index in the split (``index``), from which the seeded train/val
split is drawn (``split_indices``), so the split never depends on block order. Tools that
want small arrays in this process (``load_train_val``, ``load_test``) run the same units
through the same decode function without Ray.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rayvit.config import DataConfig
from rayvit.errors import UserError
from rayvit.readers import FILES_PER_UNIT as FILES_PER_UNIT
from rayvit.readers import IMAGE_SUFFIXES as IMAGE_SUFFIXES
from rayvit.readers import Kind as Kind
from rayvit.readers import Source as Source
from rayvit.readers import SplitFiles as SplitFiles
from rayvit.readers import decode_unit as decode_unit
from rayvit.readers import open_source as open_source
from rayvit.readers import split_labels
from rayvit.readers import units_for as units_for
from rayvit.readers.hub import ARROW_ROWS_PER_UNIT as ARROW_ROWS_PER_UNIT
from rayvit.readers.hub import class_names as class_names
from rayvit.readers.hub import load_dataset_dict as load_dataset_dict

TEST_SPLIT_NAMES = ("test",)
#: Bytes of one decoded image besides its pixels (label and index, int64 each).
ROW_OVERHEAD = 16
#: Largest block a decode task yields (a few of them are what streaming holds in flight); fewer
#: blocks cost less per epoch (each is one request to Ray Data's split coordinator).
MAX_BLOCK_BYTES = 16 * 1024 * 1024


@dataclass
class ImageSplit:
    """Images as a uint8 ``(N, H, W, 3)`` array and int64 labels."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, idx: np.ndarray) -> ImageSplit:
        return ImageSplit(self.images[idx], self.labels[idx])


@dataclass
class TrainValData:
    train: ImageSplit
    val: ImageSplit
    class_names: list[str]
    source: str


# -- the split and the units of work -----------------------------------------------------------


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, stable train/val index split of the ``train`` split.

    Depends only on ``n``, ``val_fraction`` and ``seed``, so every run, worker
    and evaluation sees the same validation images.
    """
    n_val = max(1, round(n * val_fraction))
    if n_val >= n:
        raise UserError(f"data.val_fraction={val_fraction} leaves no training images (n={n})")
    perm = np.random.default_rng(seed).permutation(n)
    return perm[n_val:], perm[:n_val]


def _decode_batch(
    batch: dict[str, np.ndarray], source: Source, side: int, block_rows: int
) -> Iterator[dict[str, np.ndarray]]:
    """The ``map_batches`` function: one unit (a batch of one) in, blocks of images out."""
    for unit in batch["unit"]:
        yield from decode_unit(str(unit), source, side, block_rows)


def read_dataset(
    source: Source, split: str, rows: np.ndarray, cfg: DataConfig, side: int, shuffle_seed: int | None = None
) -> Any:
    """The Ray Data ``Dataset`` of ``rows`` of ``split``: lazy; each unit is one decode task on
    ``data.decode_cpus`` logical CPUs, wherever the cluster has them. With ``shuffle_seed`` the
    units are read in a seeded order that changes with every execution (epoch); only the small
    unit descriptions wait for that reordering, never decoded images."""
    import ray.data

    units = units_for(source, split, rows)
    items: Any = ray.data.from_items([{"unit": u} for u in units], override_num_blocks=max(1, len(units)))
    if shuffle_seed is not None:
        items = items.randomize_block_order(seed=epoch_seed(shuffle_seed))
    decode: Any = _decode_batch  # a generator of blocks; Ray Data's stubs name plain functions
    per_block = block_rows(cfg, side)
    ds = decode_tasks(items, decode, source, side, per_block, cfg.decode_cpus)
    no_memory_warnings(ds)
    # Each yielded batch stays a block of its own (Ray Data would merge them up to 128 MiB):
    # bounded blocks bound what is in flight and let the per-epoch block order shuffle.
    ds.context.target_max_block_size = per_block * (side * side * 3 + ROW_OVERHEAD)
    return ds


def decode_tasks(items: Any, decode: Any, source: Source, side: int, rows: int, num_cpus: float) -> Any:
    """``items`` (one unit each) through ``decode`` in Ray Data tasks of ``num_cpus``: blocks of
    at most ``rows`` images of ``side`` px; training's and batch prediction's decode step.

    No memory reservation: a block is bounded (``MAX_BLOCK_BYTES``), and the demand Ray Data
    would add from its own estimate is one that an autoscaler whose node types list no memory
    (a hand-written or local provider's) never meets: decode tasks that need a new node then
    wait forever. (``no_memory_warnings`` leaves out the warning that reservation would cause.)
    """
    return items.map_batches(
        decode,
        batch_size=1,
        fn_kwargs={"source": source.for_tasks(), "side": side, "block_rows": rows},
        num_cpus=num_cpus,
        memory=0,
    )


def no_memory_warnings(ds: Any) -> None:
    """Leave out Ray Data's high-memory warning for ``ds``'s tasks, which reserve no memory on
    purpose (``memory=0``): it compares a task's whole process (torch included) with that
    reservation."""
    ds.context.issue_detectors_config.detectors = [
        d for d in ds.context.issue_detectors_config.detectors if d.__name__ != "HighMemoryIssueDetector"
    ]


def block_rows(cfg: DataConfig, side: int) -> int:
    """Images per block: ``data.decode_batch_size``, fewer when that would pass ``MAX_BLOCK_BYTES``."""
    return max(1, min(cfg.decode_batch_size, MAX_BLOCK_BYTES // (side * side * 3 + ROW_OVERHEAD)))


def epoch_seed(seed: int) -> Any:
    """A Ray Data seed that gives every execution (epoch) of a dataset its own seeded order."""
    from ray.data import RandomSeedConfig

    return RandomSeedConfig(seed=seed, reseed_after_execution=True)


def quiet_ray_data() -> None:
    """No progress bars or per-execution banners from Ray Data in the job's output (its log
    lines are filtered by ``rayvit.logs``)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def decode_here(source: Source, split: str, rows: np.ndarray, side: int, block_rows: int = 256) -> ImageSplit:
    """The same units and decoding in this process (threads), for tools that want small arrays
    (tests, benchmarks, the evaluate stage); rows come back in index order."""
    units = units_for(source, split, rows)

    def run(unit: str) -> list[dict[str, np.ndarray]]:
        return list(decode_unit(unit, source, side, block_rows))

    with ThreadPoolExecutor(max(1, min(8, len(units)))) as pool:
        blocks = [b for part in pool.map(run, units) for b in part]
    if not blocks:
        return ImageSplit(np.zeros((0, side, side, 3), np.uint8), np.zeros(0, np.int64))
    return ImageSplit(
        np.concatenate([b["image"] for b in blocks]), np.concatenate([b["label"] for b in blocks])
    )


# -- what training and evaluation read ---------------------------------------------------------


@dataclass(frozen=True)
class SplitPlan:
    """Which rows of which split of a source, decoded to which side; what names them."""

    source: Source
    split: str
    rows: np.ndarray = field(hash=False, compare=False)
    side: int

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def fingerprint(self) -> str:
        return self.source.fingerprint(self.split, self.rows, self.side)

    @property
    def decoded_bytes(self) -> int:
        return len(self.rows) * (self.side * self.side * 3 + ROW_OVERHEAD)

    def dataset(self, cfg: DataConfig, shuffle_seed: int | None = None) -> Any:
        return read_dataset(self.source, self.split, self.rows, cfg, self.side, shuffle_seed)

    def arrays(self, cfg: DataConfig) -> ImageSplit:
        return decode_here(self.source, self.split, self.rows, self.side, block_rows(cfg, self.side))


def label_counts(plan: SplitPlan) -> np.ndarray:
    """Images per class among the plan's rows, from the label column alone (no image is read):
    what ``train.class_weights: balanced`` weighs the loss by."""
    labels = split_labels(plan.source, plan.split)
    return np.bincount(labels[plan.rows], minlength=len(plan.source.class_names))


def plan_train_val(
    cfg: DataConfig, seed: int, side: int, endpoint_url: str | None = None
) -> tuple[SplitPlan, SplitPlan, tuple[str, ...]]:
    """Train and validation rows of the ``train`` split (never the test split), class names."""
    source = open_source(cfg, endpoint_url)
    n = source.split("train").num_rows
    train_idx, val_idx = split_indices(n, cfg.val_fraction, seed)
    if cfg.train_limit is not None:
        train_idx = train_idx[: cfg.train_limit]
    if cfg.val_limit is not None:
        val_idx = val_idx[: cfg.val_limit]
    return (
        SplitPlan(source, "train", np.sort(train_idx), side),
        SplitPlan(source, "train", np.sort(val_idx), side),
        source.class_names,
    )


def plan_test(
    cfg: DataConfig, side: int, endpoint_url: str | None = None, source: Source | None = None
) -> SplitPlan:
    """The held-out test split: for the final evaluation of the chosen model only."""
    source = source or open_source(cfg, endpoint_url)
    name = next((n for n in TEST_SPLIT_NAMES if n in source.splits), None)
    if name is None:
        raise UserError(
            f"data.path: no 'test' split for the final evaluation (found: {sorted(source.splits)})"
        )
    n = source.split(name).num_rows
    return SplitPlan(source, name, np.arange(min(cfg.test_limit or n, n)), side)


def stored_side(cfg: DataConfig, model_side: int) -> int:
    """The side decoded images are kept at: ``data.image_size``, never above the model's side."""
    return min(cfg.image_size or model_side, model_side)


def load_train_val(cfg: DataConfig, seed: int, image_size: int) -> TrainValData:
    """Train and validation arrays in this process (small data: tests, tools)."""
    train, val, names = plan_train_val(cfg, seed, stored_side(cfg, image_size))
    return TrainValData(train.arrays(cfg), val.arrays(cfg), list(names), cfg.path)


def load_test(cfg: DataConfig, image_size: int) -> ImageSplit:
    """The test split as arrays in this process (small data: tests, tools)."""
    return plan_test(cfg, stored_side(cfg, image_size)).arrays(cfg)
