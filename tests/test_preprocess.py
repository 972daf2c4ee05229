from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from rayvit.preprocess import Preprocessor, preprocess_arrays, random_crop_flip, to_uint8_array

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def _batch(n: int = 8, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, 3), generator=g, dtype=torch.uint8)


def test_shape_dtype_and_range() -> None:
    pre = Preprocessor(224, MEAN, STD)
    x = pre(_batch())
    assert x.shape == (8, 3, 224, 224) and x.dtype == torch.float32
    lo = min((0 - m) / s for m, s in zip(MEAN, STD, strict=True))
    hi = max((1 - m) / s for m, s in zip(MEAN, STD, strict=True))
    assert x.min() >= lo - 1e-4 and x.max() <= hi + 1e-4


def test_normalization_is_exact_without_resize() -> None:
    pre = Preprocessor(32, MEAN, STD)
    raw = _batch(2)
    x = pre(raw)
    ref = (raw.permute(0, 3, 1, 2).float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(
        STD
    ).view(1, 3, 1, 1)
    torch.testing.assert_close(x, ref, atol=1e-5, rtol=1e-5)


def test_eval_is_deterministic_and_batch_independent() -> None:
    pre = Preprocessor(48, MEAN, STD)
    raw = _batch(6)
    a, b = pre(raw), pre(raw)
    assert torch.equal(a, b)
    single = torch.cat([pre(raw[i : i + 1]) for i in range(6)])
    torch.testing.assert_close(a, single, atol=1e-5, rtol=0)


def test_augmentation_is_seeded_and_geometric() -> None:
    raw = _batch(16)
    a = random_crop_flip(raw, torch.Generator().manual_seed(3))
    b = random_crop_flip(raw, torch.Generator().manual_seed(3))
    c = random_crop_flip(raw, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == raw.shape and a.dtype == torch.uint8
    # each output is a shifted (maybe mirrored) copy: its pixels come from its own image or padding
    for i in range(16):
        vals = {tuple(p) for p in a[i].reshape(-1, 3).tolist()} - {(0, 0, 0)}
        assert vals <= {tuple(p) for p in raw[i].reshape(-1, 3).tolist()}


def test_rejects_wrong_input() -> None:
    with pytest.raises(ValueError, match="uint8"):
        Preprocessor(32)(torch.zeros(1, 3, 32, 32))


def test_close_to_vit_image_processor_at_224() -> None:
    from transformers import ViTImageProcessor

    pre = Preprocessor(224, MEAN, STD)
    proc = ViTImageProcessor(
        **{k: v for k, v in pre.processor_config().items() if k != "image_processor_type"}
    )
    raw = _batch(4)
    ours = pre(raw)
    theirs = proc(images=[Image.fromarray(r.numpy()) for r in raw], return_tensors="pt")["pixel_values"]
    assert theirs.shape == ours.shape
    # PIL's and torch's bilinear differ by rounding only: far below one grey level on average
    assert (ours - theirs).abs().mean() < 0.02


def test_serving_decode_matches_dataset_decode() -> None:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    decoded = to_uint8_array(Image.open(io.BytesIO(buf.getvalue())))
    assert np.array_equal(decoded, arr)
    pre = Preprocessor(32, MEAN, STD)
    assert torch.equal(preprocess_arrays(pre, [decoded]), pre(torch.from_numpy(arr[None])))


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "1"])
def test_any_image_mode_becomes_rgb(mode: str) -> None:
    im = Image.new("RGB", (10, 7), (120, 30, 200)).convert(mode)
    arr = to_uint8_array(im)
    assert arr.shape == (7, 10, 3) and arr.dtype == np.uint8


def test_exif_rotation_is_applied() -> None:
    im = Image.new("RGB", (10, 4), (1, 2, 3))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif)
    arr = to_uint8_array(Image.open(io.BytesIO(buf.getvalue())))
    assert arr.shape == (10, 4, 3)


def test_an_image_gives_the_same_values_alone_and_in_any_batch() -> None:
    pre = Preprocessor(32, MEAN, STD)
    rng = np.random.default_rng(0)
    mixed = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((10, 20, 3), (64, 64, 3), (32, 32, 3))]
    same = [rng.integers(0, 256, (48, 40, 3), dtype=np.uint8) for _ in range(5)]
    for arrays in (mixed, same, [*same, mixed[1]]):
        batch = preprocess_arrays(pre, arrays)
        assert batch.shape == (len(arrays), 3, 32, 32)
        for i, a in enumerate(arrays):
            alone = preprocess_arrays(pre, [a])[0]
            torch.testing.assert_close(batch[i], alone, atol=1e-5, rtol=0)
        # and the images differ, so equal values are not a coincidence of a constant output
        assert not torch.allclose(batch[0], batch[1])
    # a 32 px image in a batch is only normalised: its exact values are known
    ref = (
        torch.from_numpy(mixed[2]).permute(2, 0, 1).float() / 255 - torch.tensor(MEAN).view(3, 1, 1)
    ) / torch.tensor(STD).view(3, 1, 1)
    torch.testing.assert_close(preprocess_arrays(pre, mixed)[2], ref, atol=1e-5, rtol=1e-5)
