"""Write an image-classification data set to a folder in the hub's parquet layout.

The folder is what the DVC ``prepare`` stage outputs (``data/cifar10``):

    plain_text/train-00000-of-00001.parquet
    plain_text/test-00000-of-00001.parquet
    SHA256SUMS

A source is either a local folder already in that layout (its parquet files are
copied byte for byte after checking its ``SHA256SUMS``, so the same source
always gives the same DVC hash) or anything ``datasets.load_dataset`` reads,
e.g. the hub id ``uoft-cs/cifar10``, exported split by split to parquet.
``train_limit``/``test_limit`` keep only the first rows of a split (for tests
and smoke runs); the schema, and so the class names, are kept.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from rayvit.errors import UserError

CONFIG_NAME = "plain_text"
SPLITS = ("train", "test")
SUMS_FILE = "SHA256SUMS"


def split_file(split: str) -> str:
    return f"{CONFIG_NAME}/{split}-00000-of-00001.parquet"


@dataclass
class PrepareResult:
    dest: Path
    rows: dict[str, int]
    how: str
    """``copied`` (byte-identical local parquet), ``subset`` or ``exported``."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def read_sums(folder: Path) -> dict[str, str]:
    """``relpath -> sha256`` from a ``SHA256SUMS`` file (``sha256sum`` format)."""
    sums: dict[str, str] = {}
    f = folder / SUMS_FILE
    if not f.is_file():
        return sums
    for line in f.read_text().splitlines():
        if line.strip():
            digest, _, name = line.partition("  ")
            sums[name.strip().lstrip("*")] = digest.strip()
    return sums


def write_sums(folder: Path) -> None:
    lines = [f"{sha256(folder / rel)}  {rel}" for rel in sorted(split_file(s) for s in SPLITS)]
    (folder / SUMS_FILE).write_text("\n".join(lines) + "\n")


def verify_sums(folder: Path) -> list[str]:
    """Names of files whose checksum differs from ``SHA256SUMS`` (or that are missing)."""
    bad = []
    for rel, digest in read_sums(folder).items():
        f = folder / rel
        if not f.is_file() or sha256(f) != digest:
            bad.append(rel)
    return bad


def _is_local(source: str) -> bool:
    return source.startswith((".", "/", "~")) or Path(source).expanduser().exists()


def _has_hub_layout(folder: Path) -> bool:
    return all((folder / split_file(s)).is_file() for s in SPLITS)


def _parquet_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return int(pq.ParquetFile(path).metadata.num_rows)


def _write_head(src: Path, dst: Path, limit: int) -> int:
    """The first ``limit`` rows of a parquet file, schema (and its HF metadata) kept."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(src)
    batches, n = [], 0
    for batch in pf.iter_batches(batch_size=min(limit, 8192)):
        batches.append(batch.slice(0, limit - n))
        n += batches[-1].num_rows
        if n >= limit:
            break
    table = pa.Table.from_batches(batches, schema=pf.schema_arrow)
    pq.write_table(table, dst)
    return int(table.num_rows)


def _from_local_layout(src: Path, tmp: Path, limits: dict[str, int | None]) -> tuple[dict[str, int], str]:
    bad = verify_sums(src)
    if bad:
        raise UserError(f"source {src}: checksum mismatch against {SUMS_FILE} for {', '.join(bad)}")
    rows: dict[str, int] = {}
    subset = False
    for split in SPLITS:
        out = tmp / split_file(split)
        out.parent.mkdir(parents=True, exist_ok=True)
        limit = limits[split]
        if limit is not None and limit < _parquet_rows(src / split_file(split)):
            rows[split] = _write_head(src / split_file(split), out, limit)
            subset = True
        else:
            shutil.copyfile(src / split_file(split), out)
            rows[split] = _parquet_rows(out)
    if subset:
        write_sums(tmp)
    elif read_sums(src):
        shutil.copyfile(src / SUMS_FILE, tmp / SUMS_FILE)
    else:
        write_sums(tmp)
    return rows, "subset" if subset else "copied"


def _export(source: str, tmp: Path, limits: dict[str, int | None]) -> dict[str, int]:
    """Load with ``datasets`` (hub id, or a local folder in another layout) and export to parquet."""
    import datasets

    from rayvit.data import load_dataset_dict

    datasets.logging.set_verbosity_error()
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # no retry chatter before the error
    try:
        ds = load_dataset_dict(source)
    except UserError as exc:
        raise UserError(
            str(exc).removeprefix("data.path: ").replace("cannot load", "source: cannot load", 1)
        ) from exc
    missing = [s for s in SPLITS if s not in ds]
    if missing:
        raise UserError(f"source '{source}' has no {'/'.join(missing)} split (found: {', '.join(ds)})")
    rows: dict[str, int] = {}
    for split in SPLITS:
        part = ds[split]
        limit = limits[split]
        if limit is not None and limit < len(part):
            part = part.select(range(limit))
        out = tmp / split_file(split)
        out.parent.mkdir(parents=True, exist_ok=True)
        part.to_parquet(str(out))
        rows[split] = len(part)
    write_sums(tmp)
    return rows


def prepare_data(
    source: str,
    dest: str | Path,
    train_limit: int | None = None,
    test_limit: int | None = None,
) -> PrepareResult:
    """Write ``source`` to ``dest`` in hub layout; ``dest`` is replaced atomically.

    Raises ``UserError`` (one line) for a missing or unreadable source.
    """
    for name, value in (("train_limit", train_limit), ("test_limit", test_limit)):
        if value is not None and value < 1:
            raise UserError(f"{name} must be >= 1 (got {value})")
    if not source.strip():
        raise UserError("source is empty: give a hub id (uoft-cs/cifar10) or a local folder")
    limits: dict[str, int | None] = {"train": train_limit, "test": test_limit}
    dest_path = Path(dest).expanduser()
    tmp = dest_path.with_name(f".{dest_path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if _is_local(source):
            src = Path(source).expanduser()
            if not src.is_dir():
                raise UserError(f"source folder not found: {src}")
            if src.resolve() == dest_path.resolve():
                raise UserError(f"source and destination are the same folder: {src}")
            if _has_hub_layout(src):
                rows, how = _from_local_layout(src, tmp, limits)
            else:
                rows, how = _export(str(src), tmp, limits), "exported"
        else:
            rows, how = _export(source, tmp, limits), "exported"
        old = dest_path.with_name(f".{dest_path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if dest_path.exists():
            os.replace(dest_path, old)
        os.replace(tmp, dest_path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return PrepareResult(dest_path, rows, how)
