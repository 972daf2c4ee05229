"""Load an image-classification data set once, as uint8 arrays.

The hub id or local folder is read with ``datasets``; images are decoded once
(in a thread pool, cached on disk by the data set's fingerprint) into a
``(N, H, W, 3)`` uint8 array. Workers receive those arrays through Ray's object
store and read only their own shard; all pixel work after that is batched
tensor ops (see ``rayvit.preprocess``).
"""

from __future__ import annotations

import hashlib
import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from rayvit.config import DataConfig
from rayvit.errors import UserError

TEST_SPLIT_NAMES = ("test",)


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


def _is_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or Path(path).expanduser().exists()


def load_dataset_dict(path: str) -> Any:
    """``datasets.load_dataset`` on a hub id or a local folder, with a clear error."""
    import datasets

    datasets.disable_progress_bars()
    local = _is_local(path)
    if local:
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise UserError(f"data.path: no such folder: {folder}")
    try:
        ds = datasets.load_dataset(str(Path(path).expanduser()) if local else path)
    except Exception as exc:
        what = "folder" if local else "hub data set"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"data.path: cannot load {what} '{path}': {first}") from exc
    if not isinstance(ds, datasets.DatasetDict):
        raise UserError(f"data.path: '{path}' did not load as a set of named splits")
    return ds


def _columns(split: Any, cfg: DataConfig) -> tuple[str, str]:
    import datasets

    feats = split.features
    image_col = cfg.image_column or next((k for k, f in feats.items() if isinstance(f, datasets.Image)), None)
    label_col = cfg.label_column or next(
        (k for k, f in feats.items() if isinstance(f, datasets.ClassLabel)), None
    )
    if image_col is None or image_col not in feats:
        raise UserError(f"data.path: no image column found (columns: {list(feats)}); set data.image_column")
    if label_col is None or label_col not in feats:
        raise UserError(
            f"data.path: no class-label column found (columns: {list(feats)}); set data.label_column"
        )
    if not isinstance(feats[label_col], datasets.ClassLabel):
        raise UserError(f"data.label_column: column '{label_col}' is not a ClassLabel")
    return image_col, label_col


def _decode_one(item: dict[str, Any] | None) -> np.ndarray:
    if item is None:
        raise ValueError("missing image")
    raw = item.get("bytes")
    if raw is None and item.get("path"):
        raw = Path(item["path"]).read_bytes()
    if not isinstance(raw, bytes):
        raise ValueError("image has neither bytes nor a readable path")
    with Image.open(io.BytesIO(raw)) as im:
        return np.asarray(im.convert("RGB"))


def _decode_all(items: list[dict[str, Any] | None], fallback_size: int) -> np.ndarray:
    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        arrays = list(pool.map(_decode_one, items, chunksize=512))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        # Mixed sizes (an imagefolder, say): bring every image to one square size once.
        size = (fallback_size, fallback_size)
        arrays = [
            a
            if a.shape[:2] == size
            else np.asarray(Image.fromarray(a).resize(size, Image.Resampling.BILINEAR))
            for a in arrays
        ]
    return np.ascontiguousarray(np.stack(arrays))


def decode_split(split: Any, cfg: DataConfig, fallback_size: int) -> ImageSplit:
    """Decode a ``datasets`` split to arrays, using the on-disk cache when possible."""
    import datasets

    image_col, label_col = _columns(split, cfg)
    cache: Path | None = None
    if cfg.cache_dir:
        key = hashlib.sha256(
            f"{split._fingerprint}|{image_col}|{label_col}|{fallback_size}".encode()
        ).hexdigest()[:24]
        cache = Path(cfg.cache_dir).expanduser() / f"{key}.npz"
        if cache.is_file():
            try:
                with np.load(cache) as z:
                    return ImageSplit(z["images"], z["labels"])
            except (OSError, ValueError, KeyError):
                cache.unlink(missing_ok=True)
    table = split.cast_column(image_col, datasets.Image(decode=False))
    items = table.data.column(image_col).to_pylist()
    try:
        images = _decode_all(items, fallback_size)
    except Exception as exc:
        raise UserError(f"data.path: an image in column '{image_col}' cannot be decoded: {exc}") from exc
    labels = np.asarray(table.data.column(label_col).to_numpy(), dtype=np.int64)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, images=images, labels=labels)
        os.replace(tmp, cache)
    return ImageSplit(images, labels)


def class_names(ds: Any, cfg: DataConfig) -> list[str]:
    split = ds[_train_split_name(ds)]
    _, label_col = _columns(split, cfg)
    return list(split.features[label_col].names)


def _train_split_name(ds: Any) -> str:
    if "train" not in ds:
        raise UserError(f"data.path: no 'train' split (found: {list(ds)})")
    return "train"


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


def load_train_val(cfg: DataConfig, seed: int, image_size: int) -> TrainValData:
    """Train and validation arrays (never the test split) and the class names."""
    ds = load_dataset_dict(cfg.path)
    train_split = ds[_train_split_name(ds)]
    full = decode_split(train_split, cfg, image_size)
    train_idx, val_idx = split_indices(len(full), cfg.val_fraction, seed)
    if cfg.train_limit is not None:
        train_idx = train_idx[: cfg.train_limit]
    if cfg.val_limit is not None:
        val_idx = val_idx[: cfg.val_limit]
    # Sorted indices keep the copies cache-friendly; order is reshuffled per epoch anyway.
    return TrainValData(
        train=full.take(np.sort(train_idx)),
        val=full.take(np.sort(val_idx)),
        class_names=class_names(ds, cfg),
        source=cfg.path,
    )


def load_test(cfg: DataConfig, image_size: int) -> ImageSplit:
    """The held-out test split: for the final evaluation of the chosen model only."""
    ds = load_dataset_dict(cfg.path)
    name = next((n for n in TEST_SPLIT_NAMES if n in ds), None)
    if name is None:
        raise UserError(f"data.path: no 'test' split for the final evaluation (found: {list(ds)})")
    test = decode_split(ds[name], cfg, image_size)
    if cfg.test_limit is not None:
        test = test.take(np.arange(min(cfg.test_limit, len(test))))
    return test


def fingerprint(*splits: ImageSplit) -> str:
    """Content hash of pixels and labels: names the exact data a model saw."""
    h = hashlib.sha256()
    for s in splits:
        h.update(np.ascontiguousarray(s.images).data)
        h.update(np.ascontiguousarray(s.labels).data)
    return h.hexdigest()[:16]
