from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cluster_support import S3Server, s3_server  # noqa: F401  # a fixture
from support import require_data

from rayvit.config import DataConfig
from rayvit.data import label_counts, load_test, load_train_val, plan_test, plan_train_val, split_indices
from rayvit.errors import UserError


def _hashes(images: np.ndarray) -> set[str]:
    return {hashlib.sha1(im.tobytes()).hexdigest() for im in images}


def test_split_is_seeded_stable_and_disjoint() -> None:
    tr1, va1 = split_indices(50_000, 0.1, seed=0)
    tr2, va2 = split_indices(50_000, 0.1, seed=0)
    _tr3, va3 = split_indices(50_000, 0.1, seed=1)
    assert np.array_equal(tr1, tr2) and np.array_equal(va1, va2)
    assert not np.array_equal(va1, va3)
    assert len(va1) == 5_000 and len(tr1) == 45_000
    assert not set(tr1.tolist()) & set(va1.tolist())
    assert set(tr1.tolist()) | set(va1.tolist()) == set(range(50_000))


def test_train_limit_keeps_validation_fixed(cifar10: Path) -> None:
    _, va_all = split_indices(1000, 0.2, seed=0)
    cfg_a = DataConfig(path=str(cifar10), train_limit=100, val_limit=50, cache_dir=None)
    cfg_b = DataConfig(path=str(cifar10), train_limit=300, val_limit=50, cache_dir=None)
    a = load_train_val(cfg_a, seed=0, image_size=32)
    b = load_train_val(cfg_b, seed=0, image_size=32)
    assert np.array_equal(a.val.images, b.val.images)
    assert len(a.train) == 100 and len(b.train) == 300
    assert len(va_all) == 200


def test_real_data_splits_do_not_overlap(cifar10: Path, tmp_path: Path) -> None:
    cfg = DataConfig(
        path=str(cifar10), train_limit=400, val_limit=400, test_limit=400, cache_dir=str(tmp_path)
    )
    tv = load_train_val(cfg, seed=0, image_size=32)
    test = load_test(cfg, image_size=32)
    assert tv.train.images.dtype == np.uint8 and tv.train.images.shape[1:] == (32, 32, 3)
    assert tv.class_names[:3] == ["airplane", "automobile", "bird"] and len(tv.class_names) == 10
    tr, va, te = _hashes(tv.train.images), _hashes(tv.val.images), _hashes(test.images)
    assert not tr & va and not tr & te and not va & te
    # a second read gives identical arrays, named by the same fingerprint
    again = load_train_val(cfg, seed=0, image_size=32)
    assert np.array_equal(again.train.images, tv.train.images)
    assert np.array_equal(again.train.labels, tv.train.labels)
    a, b = plan_train_val(cfg, 0, 32)[0], plan_train_val(cfg, 0, 32)[0]
    assert a.fingerprint == b.fingerprint != plan_train_val(cfg, 1, 32)[0].fingerprint


def test_missing_and_malformed_data_paths(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such folder"):
        load_train_val(DataConfig(path=str(tmp_path / "missing")), 0, 32)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "notes.txt").write_text("not a data set")
    with pytest.raises(UserError, match=r"data\.path"):
        load_train_val(DataConfig(path=str(bad), cache_dir=None), 0, 32)


def test_imagefolder_with_mixed_sizes(tmp_path: Path) -> None:
    from PIL import Image

    for split in ("train", "test"):
        for cls, color in (("cats", (200, 10, 10)), ("dogs", (10, 200, 10))):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(6):
                Image.new("RGB", (20 + i, 30), color).save(d / f"{i}.png")
    cfg = DataConfig(path=str(tmp_path), val_fraction=0.25, cache_dir=None)
    tv = load_train_val(cfg, seed=0, image_size=16)
    assert tv.class_names == ["cats", "dogs"]
    assert tv.train.images.shape[1:] == (16, 16, 3)
    assert len(tv.train) + len(tv.val) == 12


def _hub_parquet(root: Path, n: int = 40) -> Path:
    """A tiny data set in the hub's parquet layout (PNG bytes, ClassLabel metadata)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(1)
    feats = {"img": {"_type": "Image"}, "label": {"names": ["a", "b", "c"], "_type": "ClassLabel"}}
    (root / "plain_text").mkdir(parents=True)
    for split, count in (("train", n), ("test", 10)):
        rows = []
        for _ in range(count):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (20, 28, 3), dtype=np.uint8)).save(buf, "PNG")
            rows.append({"bytes": buf.getvalue(), "path": None})
        image = pa.array(rows, pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
        table = pa.table({"img": image, "label": pa.array(rng.integers(0, 3, count), pa.int64())})
        table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": feats}})})
        pq.write_table(table, root / "plain_text" / f"{split}-00000-of-00001.parquet", row_group_size=16)
    return root


def test_decode_tasks_get_the_source_without_its_listing_and_decode_the_same(tmp_path: Path) -> None:
    """What travels into every decode task (and a fused model actor's constructor) stays small
    however many files the source lists, and decodes every unit as the whole source does."""
    import ray.cloudpickle as cloudpickle
    from PIL import Image

    from rayvit.readers import decode_unit, open_source, units_for

    for n in (4, 400):
        folder = tmp_path / f"folder-{n}"
        for i in range(n):
            (folder / "train" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (12, 10), (i % 256, 7, 9)).save(folder / "train" / f"c{i % 2}" / f"{i:04d}.png")
    sources = {
        "imagefolder": open_source(DataConfig(path=str(tmp_path / "folder-400"), cache_dir=None)),
        "parquet": open_source(DataConfig(path=str(_hub_parquet(tmp_path / "hub")), cache_dir=None)),
    }
    for kind, source in sources.items():
        lean = source.for_tasks()
        assert lean.kind == kind and lean.class_names == source.class_names and not lean.splits
        for unit in units_for(source, "train", np.arange(source.split("train").num_rows)):
            for full, small in zip(
                decode_unit(unit, source, 8, 16, errors=True),
                decode_unit(unit, lean, 8, 16, errors=True),
                strict=True,
            ):
                assert set(full) == set(small), kind
                for key in full:
                    assert np.array_equal(full[key], small[key]), (kind, key)
    few = open_source(DataConfig(path=str(tmp_path / "folder-4"), cache_dir=None))
    many = sources["imagefolder"]
    assert len(cloudpickle.dumps(many)) > 20 * len(cloudpickle.dumps(few))  # the listing grows
    assert len(cloudpickle.dumps(many.for_tasks())) < 2000 and len(cloudpickle.dumps(few.for_tasks())) < 2000


def test_parquet_at_a_storage_uri_reads_as_the_local_folder(s3_server: S3Server, tmp_path: Path) -> None:  # noqa: F811
    local = _hub_parquet(tmp_path / "hub")
    for f in sorted(local.rglob("*.parquet")):
        s3_server.client().upload_file(str(f), s3_server.bucket, f"data/{f.relative_to(local).as_posix()}")
    uri = f"s3://{s3_server.bucket}/data"
    here = DataConfig(path=str(local), val_fraction=0.25)
    there = DataConfig(path=uri, val_fraction=0.25)
    a, b = load_train_val(here, 0, 16), plan_train_val(there, 0, 16, s3_server.endpoint)
    assert b[2] == ("a", "b", "c") and len(b[0]) == 30 and len(b[1]) == 10
    assert np.array_equal(a.train.images, b[0].arrays(there).images)
    assert np.array_equal(a.val.labels, b[1].arrays(there).labels)
    assert plan_test(there, 16, s3_server.endpoint).arrays(there).images.shape == (10, 16, 16, 3)


def test_hub_id_reads_the_downloaded_cache_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub id is downloaded by ``datasets`` (mocked: this machine has no hub) and read from the
    Arrow files it prepared, giving the same images and split as the parquet folder itself."""
    import datasets

    local = _hub_parquet(tmp_path / "hub")
    real = datasets.load_dataset

    def from_local_copy(path: str, **kwargs: Any) -> Any:
        assert path == "someone/tiny"
        return real(str(local), **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", from_local_copy)
    hub = DataConfig(path="someone/tiny", val_fraction=0.25, cache_dir=str(tmp_path / "cache"))
    folder = DataConfig(path=str(local), val_fraction=0.25)
    train, val, names = plan_train_val(hub, 0, 16)
    assert train.source.kind == "arrow" and names == ("a", "b", "c")
    ref = load_train_val(folder, 0, 16)
    assert np.array_equal(train.arrays(hub).images, ref.train.images)
    assert np.array_equal(val.arrays(hub).labels, ref.val.labels)
    # A node that did not plan the job has no cache: its decode task downloads the data set
    # into the same paths first, and reads the same images.
    shutil.rmtree(tmp_path / "cache")
    assert np.array_equal(train.arrays(hub).images, ref.train.images)
    assert (tmp_path / "cache").is_dir()


def test_label_counts_come_from_the_label_column_alone() -> None:
    """What ``train.class_weights: balanced`` weighs by: the plan's labels, no image decoded."""
    from rayvit.job import balanced_weights

    cfg = DataConfig(path=str(require_data()), train_limit=300, val_limit=50)
    train, _, names = plan_train_val(cfg, 0, 8)
    counts = label_counts(train)
    assert counts.sum() == 300 and len(counts) == len(names) == 10
    assert (counts == np.bincount(train.arrays(cfg).labels, minlength=10)).all()
    weights = balanced_weights(tuple(int(c) for c in counts))
    # every class then weighs the same in the loss: count x weight = images / classes
    assert [c * w for c, w in zip(counts, weights, strict=True)] == pytest.approx([30.0] * 10)
    assert balanced_weights((10, 30, 0)) == pytest.approx((40 / 30, 40 / 90, 0.0))
