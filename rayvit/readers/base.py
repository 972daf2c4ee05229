"""What every reader shares: a source resolved to files, its splits and their units of work.

A *unit* is a small JSON-able dict (a parquet row group, a slice of an Arrow cache file, a run
of image files) that one decode task reads; a *row block* is what a reader yields for it:
``(bytes or None, where)`` per row (None: the decode task reads the file at ``where``), the
rows' labels (``-1`` when the source has none) and their global indices in the split.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from rayvit.errors import UserError
from rayvit.storage import Storage

Kind = Literal["parquet", "arrow", "imagefolder", "images"]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
#: Label of a row whose source has no labels (a flat folder of images).
NO_LABEL = -1
#: Image files per decode task of an image folder. Ray Data's cost per task is a few tens of ms of
#: scheduling: at 64 small files a task it equalled the decoding itself and starved the model actors
#: of batch prediction (0.5x the in-process rate); blocks stay bounded by rows and bytes either way.
FILES_PER_UNIT = 256

Raw = tuple[bytes | None, str]
RowBlock = tuple[list[Raw], np.ndarray, np.ndarray]


@dataclass(frozen=True)
class SplitFiles:
    """One split of a source: its files and the rows in each unit of work."""

    files: tuple[str, ...]
    """Parquet or Arrow files, or image files (imagefolder), as paths in the source's filesystem."""
    units: tuple[tuple[str, int, int, int], ...]
    """(file, row group or -1, first global row, row count), in row order."""
    labels: tuple[int, ...] = ()
    """Imagefolder: the label of each file."""
    token: str = ""
    """What names the split's content (see ``Source.fingerprint``)."""

    @property
    def num_rows(self) -> int:
        return sum(u[3] for u in self.units)


@dataclass(frozen=True)
class Source:
    """A data set resolved to files; frozen. Without its listing (``for_tasks``) it is small and
    travels into every decode task."""

    kind: Kind
    storage: Storage
    """The folder (local or URI) the files are read through; for a hub id, the local cache."""
    splits: dict[str, SplitFiles] = field(hash=False)
    class_names: tuple[str, ...]
    """Empty when the source has no labels (a flat folder of images)."""
    image_column: str = "image"
    label_column: str = "label"
    path: str = ""
    """``data.path`` as given."""
    cache_dir: str | None = None
    """A hub id's ``data.cache_dir``: where a node without the files downloads them."""

    def split(self, name: str) -> SplitFiles:
        if name not in self.splits:
            raise UserError(f"data.path: no '{name}' split in {self.path} (found: {sorted(self.splits)})")
        return self.splits[name]

    @property
    def labelled(self) -> bool:
        return bool(self.class_names)

    def for_tasks(self) -> Source:
        """This source without its splits' listing, which the driver turns into units and a
        decode task never reads (a unit names its own files and rows). The listing grows with the
        files (2.2 MB pickled for an imagefolder of 50,000, 374 bytes without), and the decode
        step's arguments are unpickled by every decode task."""
        return replace(self, splits={})

    def fingerprint(self, split: str, rows: np.ndarray, side: int) -> str:
        """Names the exact decoded data: the split's files (content hash of parquet/Arrow files,
        names and sizes of image files), the rows taken and the side they are decoded to."""
        h = hashlib.sha256(f"{self.kind}|{split}|{side}|{self.split(split).token}".encode())
        h.update(np.ascontiguousarray(rows, dtype=np.int64).data)
        return h.hexdigest()[:16]


def row_units(split: SplitFiles, rows: np.ndarray) -> Iterator[tuple[tuple[str, int, int, int], np.ndarray]]:
    """Each unit of ``split`` that holds any of ``rows`` (sorted), with those rows' global indices."""
    rows = np.sort(np.asarray(rows, dtype=np.int64))
    for unit in split.units:
        start, n = unit[2], unit[3]
        lo, hi = np.searchsorted(rows, [start, start + n])
        if hi > lo:
            yield unit, rows[lo:hi]


def table_units(split: SplitFiles, rows: np.ndarray) -> list[dict[str, Any]]:
    """Units of a source of tables (parquet, Arrow): a file piece and the rows kept of it."""
    return [
        {"path": path, "group": group, "start": start, "keep": (index - start).tolist()}
        for (path, group, start, _), index in row_units(split, rows)
    ]


def table_rows(unit: dict[str, Any], source: Source, table: Any, block_rows: int) -> Iterator[RowBlock]:
    """Row blocks of the rows ``unit`` keeps of ``table`` (its file piece, as read)."""
    keep = np.asarray(unit["keep"], dtype=np.int64)
    table = table.take(keep)
    images = table.column(source.image_column).combine_chunks()
    labels = np.asarray(table.column(source.label_column).to_numpy(), dtype=np.int64)
    where = f"{unit['path'].rsplit('/', 1)[-1]} row"
    for s in range(0, len(keep), block_rows):
        part = images.slice(s, block_rows)
        raw = part.field("bytes").to_pylist() if hasattr(part, "field") else part.to_pylist()
        paths = part.field("path").to_pylist() if hasattr(part, "field") else [None] * len(raw)
        rows = [
            (b, p or f"{where} {unit['start'] + int(k)}")
            for b, p, k in zip(raw, paths, keep[s : s + block_rows], strict=True)
        ]
        yield rows, labels[s : s + block_rows], unit["start"] + keep[s : s + block_rows]


def is_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or Path(path).expanduser().exists()


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def file_labels(split: SplitFiles, source: Source) -> np.ndarray:
    """Every row's label of a split of image files (known from the listing: no file is read)."""
    return np.asarray(split.labels, dtype=np.int64)


def file_units(split: SplitFiles, rows: np.ndarray) -> list[dict[str, Any]]:
    """Units of a source of image files: the files themselves, their labels and indices."""
    return [
        {
            "path": "",
            "group": -1,
            "start": unit[2],
            "files": [split.files[int(i)] for i in index],
            "labels": [split.labels[int(i)] if split.labels else NO_LABEL for i in index],
            "keep": list(range(len(index))),
            "index": index.tolist(),
        }
        for unit, index in row_units(split, rows)
    ]


def file_rows(unit: dict[str, Any], source: Source, fs: Any, block_rows: int) -> Iterator[RowBlock]:
    """Row blocks of a unit of image files: no bytes yet (each file is read where it is decoded)."""
    files, labels = unit["files"], np.asarray(unit["labels"], dtype=np.int64)
    index = np.asarray(unit["index"], dtype=np.int64)
    for s in range(0, len(files), block_rows):
        raws: list[Raw] = [(None, f) for f in files[s : s + block_rows]]
        yield raws, labels[s : s + block_rows], index[s : s + block_rows]


def file_split(paths: list[str], labels: list[int], listing: str) -> SplitFiles:
    """A split of image files, ``FILES_PER_UNIT`` a unit; named by its listing (names and sizes)."""
    units = tuple(
        ("", -1, start, min(FILES_PER_UNIT, len(paths) - start))
        for start in range(0, len(paths), FILES_PER_UNIT)
    )
    return SplitFiles(tuple(paths), units, tuple(labels), hashlib.sha256(listing.encode()).hexdigest())
