from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

import rayvit.data
from rayvit.config import DataConfig
from rayvit.data import load_test, load_train_val, split_indices
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


def test_real_data_splits_do_not_overlap(
    cifar10: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = DataConfig(
        path=str(cifar10), train_limit=400, val_limit=400, test_limit=400, cache_dir=str(tmp_path)
    )
    tv = load_train_val(cfg, seed=0, image_size=32)
    test = load_test(cfg, image_size=32)
    assert tv.train.images.dtype == np.uint8 and tv.train.images.shape[1:] == (32, 32, 3)
    assert tv.class_names[:3] == ["airplane", "automobile", "bird"] and len(tv.class_names) == 10
    tr, va, te = _hashes(tv.train.images), _hashes(tv.val.images), _hashes(test.images)
    assert not tr & va and not tr & te and not va & te
    # the second load reads the cache: no image is decoded again, and the arrays are identical
    assert list(tmp_path.glob("*.npz"))

    def no_decoding(*args: object) -> np.ndarray:
        raise AssertionError("images decoded again although the cache holds them")

    monkeypatch.setattr(rayvit.data, "_decode_all", no_decoding)
    again = load_train_val(cfg, seed=0, image_size=32)
    assert np.array_equal(again.train.images, tv.train.images)
    assert np.array_equal(again.train.labels, tv.train.labels)


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
