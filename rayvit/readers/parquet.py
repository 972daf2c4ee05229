"""Hub-layout parquet files (``<split>-00000-of-00001.parquet`` or ``<split>/*.parquet``), local
or at a storage URI: one unit per row group; class names from the files' ``huggingface`` metadata."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

import numpy as np

from rayvit.config import DataConfig
from rayvit.errors import UserError
from rayvit.readers.base import RowBlock, Source, SplitFiles, first_line, table_rows, table_units
from rayvit.storage import Storage

list_units = table_units


def open_files(cfg: DataConfig, store: Storage, infos: list[Any], rel: dict[str, str]) -> Source:
    """The source of the parquet files among a folder's listing (footers are read, not rows)."""
    import pyarrow.parquet as pq

    fs = store.filesystem()
    by_split: dict[str, list[Any]] = {}
    for info in infos:
        by_split.setdefault(_split_of(rel[info.path]), []).append(info)
    image_col = label_col = ""
    names: tuple[str, ...] = ()
    splits: dict[str, SplitFiles] = {}
    for split, split_infos in by_split.items():
        units: list[tuple[str, int, int, int]] = []
        h = hashlib.sha256()
        start = 0
        for info in split_infos:
            try:
                with fs.open_input_file(info.path) as f:
                    meta = pq.ParquetFile(f).metadata
                    if not names:
                        image_col, label_col, names = _features(meta.schema.to_arrow_schema(), cfg)
                for g in range(meta.num_row_groups):
                    n = meta.row_group(g).num_rows
                    units.append((info.path, g, start, n))
                    start += n
                h.update(f"{rel[info.path]}|{info.size}|".encode())
                h.update(_file_digest(fs, info.path).encode())
            except OSError as exc:
                raise UserError(f"data.path: cannot read {rel[info.path]}: {first_line(exc)}") from exc
        splits[split] = SplitFiles(tuple(i.path for i in split_infos), tuple(units), token=h.hexdigest())
    return Source("parquet", store, splits, names, image_col, label_col, cfg.path)


def read_rows(unit: dict[str, Any], source: Source, fs: Any, block_rows: int) -> Iterator[RowBlock]:
    import pyarrow.parquet as pq

    with fs.open_input_file(unit["path"]) as f:
        table = pq.ParquetFile(f).read_row_group(
            unit["group"], columns=[source.image_column, source.label_column]
        )
    yield from table_rows(unit, source, table, block_rows)


def read_labels(split: SplitFiles, source: Source) -> np.ndarray:
    """Every row's label of the split, from the label column alone (no image is read)."""
    import pyarrow.parquet as pq

    fs, parts = source.storage.filesystem(), []
    for path in dict.fromkeys(u[0] for u in split.units):  # files in row order
        with fs.open_input_file(path) as f:
            parts.append(pq.read_table(f, columns=[source.label_column]).column(0).to_numpy())
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def _split_of(rel_path: str) -> str:
    """The split a hub-layout file belongs to: ``<split>-00000-of-00001.parquet``, or a folder
    named after the split."""
    parts = rel_path.split("/")
    named = [p for p in parts[:-1] if p in ("train", "test", "validation", "valid", "val")]
    return named[-1] if named else parts[-1].split(".")[0].split("-")[0]


def _features(schema: Any, cfg: DataConfig) -> tuple[str, str, tuple[str, ...]]:
    """Image column, label column and class names from the ``huggingface`` schema metadata
    that the hub's parquet files carry."""
    raw = (schema.metadata or {}).get(b"huggingface")
    feats = json.loads(raw).get("info", {}).get("features", {}) if raw else {}
    image_col = cfg.image_column or next((k for k, f in feats.items() if f.get("_type") == "Image"), None)
    label_col = cfg.label_column or next(
        (k for k, f in feats.items() if f.get("_type") == "ClassLabel"), None
    )
    columns = list(schema.names)
    if image_col is None or image_col not in columns:
        raise UserError(f"data.path: no image column found (columns: {columns}); set data.image_column")
    if label_col is None or label_col not in columns:
        raise UserError(f"data.path: no class-label column found (columns: {columns}); set data.label_column")
    names = feats.get(label_col, {}).get("names")
    if not names:
        raise UserError(f"data.label_column: column '{label_col}' has no class names (not a ClassLabel)")
    return image_col, label_col, tuple(str(n) for n in names)


def _file_digest(fs: Any, path: str) -> str:
    """sha256 of a file's bytes, read in 8 MiB pieces (memory stays small)."""
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()
