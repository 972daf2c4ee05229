"""DVC's content hash of a data folder: the name of the exact data a model saw.

DVC (3.x, hash ``md5``) names a tracked directory by the md5 of a JSON listing
of its files, each with the md5 of its raw bytes, sorted by relative path,
followed by ``.dir``. ``data_fingerprint`` computes that value without needing
DVC installed, so it equals the ``md5`` that ``dvc.lock`` (or a ``.dvc`` file)
records for the folder whenever the folder is what DVC last saw.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

DIR_SUFFIX = ".dir"
# Names DVC never counts as part of a tracked folder.
_DVC_SKIPPED = frozenset({".git", ".hg", ".dvc", ".dvcignore"})
_CHUNK = 1 << 20


def file_md5(path: Path) -> str:
    """md5 of a file's raw bytes (DVC 3's ``md5`` hash of a file)."""
    h = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def dir_md5(folder: Path) -> str:
    """DVC's hash of a directory: ``md5(json listing) + ".dir"``."""
    entries = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder)
        if any(part in _DVC_SKIPPED for part in rel.parts) or not p.is_file():
            continue
        entries.append({"md5": file_md5(p), "relpath": rel.as_posix()})
    entries.sort(key=lambda e: e["relpath"])
    listing = json.dumps(entries, sort_keys=True).encode("utf-8")
    return hashlib.md5(listing, usedforsecurity=False).hexdigest() + DIR_SUFFIX


def data_fingerprint(path: str | Path) -> str | None:
    """DVC's md5 of a local data folder (or file), e.g. ``"3f0c...e1.dir"``.

    ``None`` when ``path`` is not on the local disk (a hub id such as
    ``uoft-cs/cifar10``): callers then fall back to a content hash of the
    decoded arrays. The value is computed from the files themselves (about one
    second per GB), so it is right even when the folder was changed after
    ``dvc repro``/``dvc pull``; ``tracked_fingerprint`` gives the recorded one.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        return dir_md5(p)
    if p.is_file():
        return file_md5(p)
    return None


def _find_repo_root(start: Path) -> Path | None:
    for d in (start, *start.parents):
        if (d / ".dvc").is_dir():
            return d
    return None


def _out_md5(outs: Any, rel: str) -> str | None:
    for out in outs or []:
        if isinstance(out, dict) and Path(str(out.get("path", ""))).as_posix() == rel:
            md5 = out.get("md5")
            return str(md5) if md5 else None
    return None


def tracked_fingerprint(path: str | Path) -> str | None:
    """The md5 DVC has recorded for ``path``: from ``<path>.dvc`` or ``dvc.lock``.

    ``None`` when the path is not a DVC-tracked output of the enclosing DVC
    repository. Reads YAML only; does not look at the data.
    """
    p = Path(path).expanduser().resolve()
    dvc_file = p.with_name(p.name + ".dvc")
    if dvc_file.is_file():
        meta = yaml.safe_load(dvc_file.read_text()) or {}
        return _out_md5(meta.get("outs"), p.name)
    root = _find_repo_root(p.parent)
    if root is None or not (root / "dvc.lock").is_file():
        return None
    rel = p.relative_to(root).as_posix()
    lock = yaml.safe_load((root / "dvc.lock").read_text()) or {}
    for stage in (lock.get("stages") or {}).values():
        found = _out_md5((stage or {}).get("outs"), rel)
        if found:
            return found
    return None
