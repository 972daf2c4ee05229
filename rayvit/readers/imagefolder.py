"""An imagefolder (``<split>/<class>/<file>``, or ``<class>/<file>``: all train), local or at a
storage URI, as ``datasets``' imagefolder reads it: classes are the sorted folder names, rows the
sorted file paths; ``FILES_PER_UNIT`` files a unit, each file read by the task that decodes it."""

from __future__ import annotations

from typing import Any

from rayvit.config import DataConfig
from rayvit.errors import UserError
from rayvit.readers.base import Source, SplitFiles, file_labels, file_rows, file_split, file_units
from rayvit.storage import Storage

list_units = file_units
read_rows = file_rows
read_labels = file_labels


def open_files(cfg: DataConfig, store: Storage, infos: list[Any], rel: dict[str, str]) -> Source:
    rows: list[tuple[str, str, Any]] = []
    for info in infos:
        parts = rel[info.path].split("/")
        if len(parts) >= 3:
            rows.append((parts[0], parts[-2], info))
        elif len(parts) == 2:
            rows.append(("train", parts[0], info))
    if not rows:
        raise UserError(f"data.path: no <class>/<image> folders under {store.root}")
    names = tuple(sorted({c for _, c, _ in rows}))
    index = {c: i for i, c in enumerate(names)}
    splits: dict[str, SplitFiles] = {}
    for split in sorted({s for s, _, _ in rows}):
        these = [(c, i) for s, c, i in rows if s == split]
        splits[split] = file_split(
            [i.path for _, i in these],
            [index[c] for c, _ in these],
            "\n".join(f"{rel[i.path]}|{i.size}" for _, i in these),
        )
    return Source("imagefolder", store, splits, names, path=cfg.path)
