"""A flat folder of image files without labels (what batch prediction labels): one split,
``images``, of the sorted file paths; ``FILES_PER_UNIT`` files a unit."""

from __future__ import annotations

from typing import Any

from rayvit.config import DataConfig
from rayvit.readers.base import NO_LABEL, Source, file_labels, file_rows, file_split, file_units
from rayvit.storage import Storage

SPLIT = "images"

list_units = file_units
read_rows = file_rows
read_labels = file_labels


def open_files(cfg: DataConfig, store: Storage, infos: list[Any], rel: dict[str, str]) -> Source:
    paths = [i.path for i in infos]
    listing = "\n".join(f"{rel[i.path]}|{i.size}" for i in infos)
    split = file_split(paths, [NO_LABEL] * len(paths), listing)
    return Source("images", store, {SPLIT: split}, (), path=cfg.path)
