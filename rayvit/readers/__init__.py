"""Readers of every source kind, behind the same operations: list units, read rows (and a
split's labels, without its images).

``open_source`` resolves ``data.path`` to a ``Source`` (files, splits, class names) from
listings and file footers only; then for each kind (one module each) ``list_units`` cuts rows
of a split into units of work (small JSON-able dicts) and ``read_rows`` yields a unit's rows
as bytes (or the file to read them from), labels and global indices. ``decode_unit`` is the one
decode path on top of them: training's decode tasks and batch prediction's both call it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import numpy as np

from rayvit.config import DataConfig
from rayvit.errors import UserError
from rayvit.readers import hub, imagefolder, images, parquet
from rayvit.readers.base import (
    FILES_PER_UNIT,
    IMAGE_SUFFIXES,
    NO_LABEL,
    Kind,
    Source,
    SplitFiles,
    first_line,
    is_local,
)
from rayvit.storage import Storage, is_uri

#: The reader of each source kind: a module with ``list_units(split, rows)``,
#: ``read_rows(unit, source, fs, block_rows)`` and ``read_labels(split, source)``.
READERS: dict[str, ModuleType] = {
    "parquet": parquet,
    "arrow": hub,
    "imagefolder": imagefolder,
    "images": images,
}

__all__ = [
    "FILES_PER_UNIT",
    "IMAGE_SUFFIXES",
    "NO_LABEL",
    "READERS",
    "Kind",
    "Source",
    "SplitFiles",
    "decode_unit",
    "open_source",
    "split_labels",
    "units_for",
]


def open_source(cfg: DataConfig, endpoint_url: str | None = None, *, unlabelled: bool = False) -> Source:
    """Resolve ``data.path`` to files and class names, from listings and file footers only.

    A folder of parquet files is hub layout, one of ``<class>/<image>`` folders an imagefolder;
    with ``unlabelled``, a folder with images at its top level only is a flat folder of images.
    """
    path = cfg.path
    if not (is_uri(path) or is_local(path)):
        return hub.open_hub(cfg)
    store = Storage.from_setting(path, endpoint_url, key="data.path")
    import pyarrow.fs as pafs

    fs, base = store.filesystem(), store.fs_path()
    try:
        if fs.get_file_info(base).type != pafs.FileType.Directory:
            raise UserError(f"data.path: no such folder: {store.root}")
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    except OSError as exc:
        raise UserError(f"data.path: cannot list {store.root}: {first_line(exc)}") from exc
    files = sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)
    rel = {i.path: i.path[len(base) :].lstrip("/") for i in files}
    found = [i for i in files if i.path.endswith(".parquet")]
    if found:
        return parquet.open_files(cfg, store, found, rel)
    found = [i for i in files if i.path.lower().endswith(IMAGE_SUFFIXES)]
    if found and unlabelled and all("/" not in rel[i.path] for i in found):
        return images.open_files(cfg, store, found, rel)
    if found:
        return imagefolder.open_files(cfg, store, found, rel)
    raise UserError(f"data.path: {store.root} holds neither parquet files (hub layout) nor an image folder")


def units_for(source: Source, split: str, rows: np.ndarray) -> list[str]:
    """One JSON unit of work per file piece that holds any of ``rows`` (global indices)."""
    return [json.dumps(u) for u in READERS[source.kind].list_units(source.split(split), rows)]


def split_labels(source: Source, split: str) -> np.ndarray:
    """Every row's label of ``split``, from the labels alone (no image is read)."""
    labels: np.ndarray = READERS[source.kind].read_labels(source.split(split), source)
    return labels


def decode_unit(
    unit_json: str, source: Source, side: int, block_rows: int, *, errors: bool = False
) -> Iterator[dict[str, np.ndarray]]:
    """Read one unit's rows and yield blocks of ``image`` (uint8, side x side), ``label`` and
    ``index``; every image is decoded by the server's decoder and resized at once.

    A file that cannot be read or decoded is a ``UserError`` naming it; with ``errors`` it is a
    row instead (zero pixels, its reason in ``error``), and every row says where it came from
    (``source``): batch prediction labels what it can and reports the rest.
    """
    from rayvit.imageio import ImageError, decode_to_side

    unit = json.loads(unit_json)
    fs = source.storage.filesystem()
    for raws, labels, index in READERS[source.kind].read_rows(unit, source, fs, block_rows):
        images = np.zeros((len(raws), side, side, 3), dtype=np.uint8)
        reasons = [""] * len(raws)
        for i, (raw, where) in enumerate(raws):
            try:
                data = raw if raw is not None else _read(fs, source, where)
                images[i] = decode_to_side(data, side)
            except (ImageError, OSError) as exc:
                if not errors:
                    raise UserError(f"data.path: image {where} cannot be decoded: {exc}") from None
                reasons[i] = str(exc) if isinstance(exc, ImageError) else f"cannot read: {first_line(exc)}"
        block: dict[str, Any] = {"image": images, "label": labels, "index": index}
        if errors:
            block["source"] = np.asarray([_shown(source, w) for _, w in raws], dtype=object)
            block["error"] = np.asarray(reasons, dtype=object)
        yield block


def _read(fs: Any, source: Source, path: str) -> bytes:
    """An image file by its path: in the source's filesystem, else relative to its folder."""
    try:
        with fs.open_input_stream(path) as f:
            return bytes(f.read())
    except (OSError, FileNotFoundError):
        with fs.open_input_stream(source.storage.fs_path(path)) as f:
            return bytes(f.read())


def _shown(source: Source, where: str) -> str:
    """Where a row came from, as the user names it: a file relative to the data folder."""
    base = source.storage.fs_path().rstrip("/") + "/"
    return where[len(base) :] if where.startswith(base) else where
