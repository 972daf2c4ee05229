"""Image-classification data through Ray Data: read, decoded and resized on the cluster's CPUs.

A data set (hub-layout parquet files or an imagefolder, in a local folder or at a storage
URI; or a hub id, downloaded by ``datasets`` and read from its cache files) is planned on the
driver from file metadata only: which files, how many rows, class names. The work is cut
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

import hashlib
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from rayvit.config import DataConfig
from rayvit.errors import UserError
from rayvit.storage import Storage, is_uri

TEST_SPLIT_NAMES = ("test",)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
#: Image files per decode task of an imagefolder; rows per task of an Arrow cache file.
FILES_PER_UNIT = 64
ARROW_ROWS_PER_UNIT = 2048
#: Bytes of one decoded image besides its pixels (label and index, int64 each).
ROW_OVERHEAD = 16
#: Largest block a decode task yields (a few of them are what streaming holds in flight); fewer
#: blocks cost less per epoch (each is one request to Ray Data's split coordinator).
MAX_BLOCK_BYTES = 16 * 1024 * 1024

Kind = Literal["parquet", "arrow", "imagefolder"]


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
    """A data set resolved to files; small and frozen, it travels into every decode task."""

    kind: Kind
    storage: Storage
    """The folder (local or URI) the files are read through; for a hub id, the local cache."""
    splits: dict[str, SplitFiles] = field(hash=False)
    class_names: tuple[str, ...]
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

    def fingerprint(self, split: str, rows: np.ndarray, side: int) -> str:
        """Names the exact decoded data: the split's files (content hash of parquet/Arrow files,
        names and sizes of image files), the rows taken and the side they are decoded to."""
        h = hashlib.sha256(f"{self.kind}|{split}|{side}|{self.split(split).token}".encode())
        h.update(np.ascontiguousarray(rows, dtype=np.int64).data)
        return h.hexdigest()[:16]


# -- resolving a data set -----------------------------------------------------------------------


def _is_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or Path(path).expanduser().exists()


def load_dataset_dict(path: str, cache_dir: str | None = None) -> Any:
    """``datasets.load_dataset`` on a hub id or a local folder, with a clear error."""
    import datasets

    datasets.disable_progress_bars()
    local = _is_local(path)
    if local:
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise UserError(f"data.path: no such folder: {folder}")
    try:
        kwargs = {"cache_dir": str(Path(cache_dir).expanduser())} if cache_dir else {}
        ds = datasets.load_dataset(str(Path(path).expanduser()) if local else path, **kwargs)
    except Exception as exc:
        what = "folder" if local else "hub data set"
        raise UserError(f"data.path: cannot load {what} '{path}': {_first_line(exc)}") from exc
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


def class_names(ds: Any, cfg: DataConfig) -> list[str]:
    """Class names of a ``datasets.DatasetDict``'s train split."""
    if "train" not in ds:
        raise UserError(f"data.path: no 'train' split (found: {list(ds)})")
    split = ds["train"]
    _, label_col = _columns(split, cfg)
    return list(split.features[label_col].names)


def open_source(cfg: DataConfig, endpoint_url: str | None = None) -> Source:
    """Resolve ``data.path`` to files and class names, from listings and file footers only."""
    path = cfg.path
    if not (is_uri(path) or _is_local(path)):
        return _hub_source(cfg)
    store = Storage.from_setting(path, endpoint_url, key="data.path")
    import pyarrow.fs as pafs

    fs, base = store.filesystem(), store.fs_path()
    try:
        if fs.get_file_info(base).type != pafs.FileType.Directory:
            raise UserError(f"data.path: no such folder: {store.root}")
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    except OSError as exc:
        raise UserError(f"data.path: cannot list {store.root}: {_first_line(exc)}") from exc
    files = sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)
    rel = {i.path: i.path[len(base) :].lstrip("/") for i in files}
    parquet = [i for i in files if i.path.endswith(".parquet")]
    if parquet:
        return _parquet_source(cfg, store, parquet, rel)
    images = [i for i in files if i.path.lower().endswith(IMAGE_SUFFIXES)]
    if images:
        return _imagefolder_source(cfg, store, images, rel)
    raise UserError(f"data.path: {store.root} holds neither parquet files (hub layout) nor an image folder")


def _split_of(rel_path: str) -> str:
    """The split a hub-layout file belongs to: ``<split>-00000-of-00001.parquet``, or a folder
    named after the split."""
    parts = rel_path.split("/")
    named = [p for p in parts[:-1] if p in ("train", "test", "validation", "valid", "val")]
    return named[-1] if named else parts[-1].split(".")[0].split("-")[0]


def _parquet_source(cfg: DataConfig, store: Storage, infos: list[Any], rel: dict[str, str]) -> Source:
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
                        image_col, label_col, names = _parquet_features(meta.schema.to_arrow_schema(), cfg)
                for g in range(meta.num_row_groups):
                    n = meta.row_group(g).num_rows
                    units.append((info.path, g, start, n))
                    start += n
                h.update(f"{rel[info.path]}|{info.size}|".encode())
                h.update(_file_digest(fs, info.path).encode())
            except OSError as exc:
                raise UserError(f"data.path: cannot read {rel[info.path]}: {_first_line(exc)}") from exc
        splits[split] = SplitFiles(tuple(i.path for i in split_infos), tuple(units), token=h.hexdigest())
    return Source("parquet", store, splits, names, image_col, label_col, cfg.path)


def _parquet_features(schema: Any, cfg: DataConfig) -> tuple[str, str, tuple[str, ...]]:
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


def _imagefolder_source(cfg: DataConfig, store: Storage, infos: list[Any], rel: dict[str, str]) -> Source:
    """``<split>/<class>/<file>``, or ``<class>/<file>`` (all train), as ``datasets``' imagefolder
    reads it: classes are the sorted folder names, rows the sorted file paths."""
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
        paths = tuple(i.path for _, i in these)
        listing = "\n".join(f"{rel[i.path]}|{i.size}" for _, i in these)
        units = tuple(
            ("", -1, start, min(FILES_PER_UNIT, len(paths) - start))
            for start in range(0, len(paths), FILES_PER_UNIT)
        )
        splits[split] = SplitFiles(
            paths, units, tuple(index[c] for c, _ in these), hashlib.sha256(listing.encode()).hexdigest()
        )
    return Source("imagefolder", store, splits, names, path=cfg.path)


def _hub_source(cfg: DataConfig) -> Source:
    """A hub id: ``datasets`` downloads and prepares it once; its Arrow cache files are read."""
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


def units_for(split: SplitFiles, rows: np.ndarray) -> list[str]:
    """One JSON unit of work per file piece that holds any of ``rows`` (sorted global indices)."""
    rows = np.sort(np.asarray(rows, dtype=np.int64))
    out = []
    for path, group, start, n in split.units:
        lo, hi = np.searchsorted(rows, [start, start + n])
        if hi <= lo:
            continue
        keep = (rows[lo:hi] - start).tolist()
        unit: dict[str, Any] = {"path": path, "group": group, "start": start, "keep": keep}
        if not path:  # imagefolder: the unit's files and labels themselves
            unit["files"] = [split.files[start + k] for k in keep]
            unit["labels"] = [split.labels[start + k] for k in keep]
            unit["keep"] = list(range(len(keep)))
            unit["index"] = rows[lo:hi].tolist()
        out.append(json.dumps(unit))
    return out


def decode_unit(
    unit_json: str, source: Source, side: int, block_rows: int
) -> Iterator[dict[str, np.ndarray]]:
    """Read one unit's rows and yield blocks of ``image`` (uint8, side x side), ``label`` and
    ``index``; every image is decoded by the server's decoder and resized at once."""
    from rayvit.imageio import ImageError, decode_to_side

    unit = json.loads(unit_json)
    fs = source.storage.filesystem()
    for raws, labels, index in _unit_rows(unit, source, fs, block_rows):
        images = np.empty((len(raws), side, side, 3), dtype=np.uint8)
        for i, (raw, where) in enumerate(raws):
            try:
                data = raw if raw is not None else _read(fs, source, where)
                images[i] = decode_to_side(data, side)
            except (ImageError, OSError) as exc:
                raise UserError(f"data.path: image {where} cannot be decoded: {exc}") from None
        yield {"image": images, "label": labels, "index": index}


def _unit_rows(
    unit: dict[str, Any], source: Source, fs: Any, block_rows: int
) -> Iterator[tuple[list[tuple[bytes | None, str]], np.ndarray, np.ndarray]]:
    """(bytes or None, where) per row, labels and global indices, ``block_rows`` at a time."""
    keep = np.asarray(unit["keep"], dtype=np.int64)
    if source.kind == "imagefolder":
        files, labels = unit["files"], np.asarray(unit["labels"], dtype=np.int64)
        index = np.asarray(unit["index"], dtype=np.int64)
        for s in range(0, len(files), block_rows):
            raws: list[tuple[bytes | None, str]] = [(None, f) for f in files[s : s + block_rows]]
            yield raws, labels[s : s + block_rows], index[s : s + block_rows]
        return
    table = _read_table(unit, source, fs).take(keep)
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


def _read_table(unit: dict[str, Any], source: Source, fs: Any) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = [source.image_column, source.label_column]
    if source.kind == "parquet":
        with fs.open_input_file(unit["path"]) as f:
            return pq.ParquetFile(f).read_row_group(unit["group"], columns=cols)
    _download_here(unit["path"], source)
    with pa.memory_map(unit["path"]) as mm:
        table = pa.ipc.open_stream(mm).read_all().select(cols)
    return table.slice(unit["group"], (max(unit["keep"]) + 1) if unit["keep"] else 0)


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

    units = units_for(source.split(split), rows)
    items: Any = ray.data.from_items([{"unit": u} for u in units], override_num_blocks=max(1, len(units)))
    if shuffle_seed is not None:
        items = items.randomize_block_order(seed=epoch_seed(shuffle_seed))
    decode: Any = _decode_batch  # a generator of blocks; Ray Data's stubs name plain functions
    per_block = block_rows(cfg, side)
    ds = items.map_batches(
        decode,
        batch_size=1,
        fn_kwargs={"source": source, "side": side, "block_rows": per_block},
        num_cpus=cfg.decode_cpus,
    )
    # Each yielded batch stays a block of its own (Ray Data would merge them up to 128 MiB):
    # bounded blocks bound what is in flight and let the per-epoch block order shuffle.
    ds.context.target_max_block_size = per_block * (side * side * 3 + ROW_OVERHEAD)
    return ds


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
    units = units_for(source.split(split), rows)

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


def _read(fs: Any, source: Source, path: str) -> bytes:
    """An image file by its path: in the source's filesystem, else relative to its folder."""
    try:
        with fs.open_input_stream(path) as f:
            return bytes(f.read())
    except (OSError, FileNotFoundError):
        with fs.open_input_stream(source.storage.fs_path(path)) as f:
            return bytes(f.read())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
