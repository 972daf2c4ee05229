"""A hub data set id: ``datasets`` downloads and prepares it once; its Arrow cache files are read,
``ARROW_ROWS_PER_UNIT`` rows a unit."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from rayvit.config import DataConfig
from rayvit.errors import UserError
from rayvit.readers.base import RowBlock, Source, SplitFiles, first_line, is_local, table_rows, table_units
from rayvit.storage import Storage

#: Rows per decode task of an Arrow cache file.
ARROW_ROWS_PER_UNIT = 2048

list_units = table_units


def open_hub(cfg: DataConfig) -> Source:
    import pyarrow as pa

    ds = load_dataset_dict(cfg.path, cfg.cache_dir)
    names = tuple(class_names(ds, cfg))
    image_col, label_col = _columns(ds["train"], cfg)
    splits: dict[str, SplitFiles] = {}
    for split, part in ds.items():
        files = tuple(str(c["filename"]) for c in part.cache_files)
        units: list[tuple[str, int, int, int]] = []
        start = 0
        for f in files:
            with pa.memory_map(f) as mm:
                n = pa.ipc.open_stream(mm).read_all().num_rows
            # The "group" of an Arrow unit is its first row within the file.
            units += [
                (f, s, start + s, min(ARROW_ROWS_PER_UNIT, n - s)) for s in range(0, n, ARROW_ROWS_PER_UNIT)
            ]
            start += n
        splits[split] = SplitFiles(files, tuple(units), token=str(part._fingerprint))
    folder = str(Path(splits["train"].files[0]).parent) if splits["train"].files else "."
    return Source(
        "arrow", Storage.from_setting(folder), splits, names, image_col, label_col, cfg.path, cfg.cache_dir
    )


def read_rows(unit: dict[str, Any], source: Source, fs: Any, block_rows: int) -> Iterator[RowBlock]:
    import pyarrow as pa

    _download_here(unit["path"], source)
    with pa.memory_map(unit["path"]) as mm:
        table = pa.ipc.open_stream(mm).read_all().select([source.image_column, source.label_column])
    table = table.slice(unit["group"], (max(unit["keep"]) + 1) if unit["keep"] else 0)
    yield from table_rows(unit, source, table, block_rows)


def read_labels(split: SplitFiles, source: Source) -> np.ndarray:
    """Every row's label of the split, from the label column of its Arrow cache files."""
    import pyarrow as pa

    parts = []
    for path in dict.fromkeys(u[0] for u in split.units):  # files in row order
        _download_here(path, source)
        with pa.memory_map(path) as mm:
            parts.append(pa.ipc.open_stream(mm).read_all().column(source.label_column).to_numpy())
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def load_dataset_dict(path: str, cache_dir: str | None = None) -> Any:
    """``datasets.load_dataset`` on a hub id or a local folder, with a clear error."""
    import datasets

    datasets.disable_progress_bars()
    local = is_local(path)
    if local:
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise UserError(f"data.path: no such folder: {folder}")
    try:
        kwargs = {"cache_dir": str(Path(cache_dir).expanduser())} if cache_dir else {}
        ds = datasets.load_dataset(str(Path(path).expanduser()) if local else path, **kwargs)
    except Exception as exc:
        what = "folder" if local else "hub data set"
        raise UserError(f"data.path: cannot load {what} '{path}': {first_line(exc)}") from exc
    if not isinstance(ds, datasets.DatasetDict):
        raise UserError(f"data.path: '{path}' did not load as a set of named splits")
    return ds


def class_names(ds: Any, cfg: DataConfig) -> list[str]:
    """Class names of a ``datasets.DatasetDict``'s train split."""
    if "train" not in ds:
        raise UserError(f"data.path: no 'train' split (found: {list(ds)})")
    split = ds["train"]
    _, label_col = _columns(split, cfg)
    return list(split.features[label_col].names)


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


def _download_here(path: str, source: Source) -> None:
    """A hub data set's files live in the ``datasets`` cache of the node that planned the job;
    a decode task on another node (a cluster's GPU nodes, when the head has no CPUs for Ray)
    downloads and prepares the same data set into its own node's cache first (once a node:
    ``datasets`` caches and locks), which gives the same files at the same paths."""
    if Path(path).is_file():
        return
    load_dataset_dict(source.path, source.cache_dir)
    if not Path(path).is_file():
        raise UserError(
            f"data.path: '{source.path}' prepared on this node lacks {Path(path).name}, which the job "
            "planned with: another revision of the data set or of `datasets`? Give the data as a "
            "folder or storage URI instead"
        )
