"""Every model family the docs list: built tiny from config, exported, served by ``Predictor`` and
loaded by ``transformers.pipeline``; and each family's hub processor settings through the one
batched ``Preprocessor``, against ``AutoImageProcessor``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from rayvit.checkpoint import save_model_folder
from rayvit.config import ModelConfig, load_config
from rayvit.errors import UserError
from rayvit.model import FAMILIES, build_model, build_preprocessor
from rayvit.predict import Predictor
from rayvit.preprocess import Preprocessor

CLASSES = ["cat", "dog", "ship"]
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_builds_from_config_and_round_trips_export_predictor_pipeline(
    family: str, tmp_path: Path
) -> None:
    from transformers import pipeline
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    cfg = ModelConfig(pretrained=None, model_type=family, image_size=32, arch=FAMILIES[family].tiny)
    torch.manual_seed(0)
    model = build_model(cfg, CLASSES).eval()
    assert type(model).__name__ == FAMILIES[family].classifier
    assert FAMILIES[family].classifier in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES[family]
    assert model.config.id2label == dict(enumerate(CLASSES)) and model.config.num_labels == 3
    save_model_folder(model, build_preprocessor(cfg), tmp_path)

    images = [np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8) for i in range(3)]
    predictor = Predictor(tmp_path, torch.device("cpu"))
    ours = torch.log_softmax(predictor.logits(predictor.pre(torch.from_numpy(np.stack(images)))), -1)
    direct = model(pixel_values=predictor.pre(torch.from_numpy(np.stack(images)))).logits
    torch.testing.assert_close(ours, torch.log_softmax(direct, -1), atol=1e-5, rtol=0)

    clf = pipeline("image-classification", model=str(tmp_path), device="cpu")
    for img, row in zip(images, ours, strict=True):
        out = clf(Image.fromarray(img), top_k=3, function_to_apply="none")
        theirs = {o["label"]: o["score"] for o in out}
        logits = row - row.logsumexp(-1)  # log-probabilities: the pipeline's logits shifted
        # Same pixels at 32 px (no resize), so equal logits up to float rounding.
        got = torch.tensor([theirs[c] for c in CLASSES])
        torch.testing.assert_close(got - got.logsumexp(-1), logits, atol=1e-4, rtol=0)


def _processors() -> dict[str, Any]:
    """Each listed family's hub processor settings (as in ``preprocessor_config.json``)."""
    from transformers import (
        BeitImageProcessor,
        BitImageProcessor,
        ConvNextImageProcessor,
        DeiTImageProcessor,
        ViTImageProcessor,
    )

    norm: dict[str, Any] = {"image_mean": MEAN, "image_std": STD}
    return {
        # google/vit-base-patch16-224: a plain resize
        "vit": ViTImageProcessor(size={"height": 224, "width": 224}, resample=2, **norm),
        # facebook/deit-*: resize to 256, bicubic, centre crop 224
        "deit": DeiTImageProcessor(
            size={"height": 256, "width": 256}, crop_size={"height": 224, "width": 224}, resample=3, **norm
        ),
        # microsoft/beit-*: a plain bicubic resize
        "beit": BeitImageProcessor(
            size={"height": 224, "width": 224}, do_center_crop=False, resample=3, **norm
        ),
        # facebook/dinov2-*: shortest edge 256, bicubic, centre crop 224
        "dinov2": BitImageProcessor(
            size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, resample=3, **norm
        ),
        # microsoft/swin-*: a plain bicubic resize
        "swin": ViTImageProcessor(size={"height": 224, "width": 224}, resample=3, **norm),
        # facebook/convnext-*-224 and microsoft/resnet-*: shortest edge 224/0.875, crop 224
        "convnext": ConvNextImageProcessor(size={"shortest_edge": 224}, crop_pct=0.875, resample=3, **norm),
        "resnet": ConvNextImageProcessor(size={"shortest_edge": 224}, crop_pct=0.875, resample=2, **norm),
    }


#: PIL resamples uint8 images in integer steps, torch in float, and ours rounds to uint8 after the
#: resize (the CPU path) where PIL's processors round before it: the mean difference stays far below
#: one grey level (1/255/std ~ 0.017 after normalisation), a few pixels differ by a few levels.
MEAN_TOLERANCE, MAX_TOLERANCE = 0.01, 0.25


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("shape", [(300, 300), (240, 320)])
def test_preprocessor_matches_auto_image_processor(
    family: str, shape: tuple[int, int], tmp_path: Path
) -> None:
    """The family's processor settings -> ``Preprocessor``, and back out for ``pipeline()``:
    both equal ``AutoImageProcessor``'s pixels within the stated tolerance (square inputs, as the
    decode tasks give; and a landscape one for the shortest-edge rule)."""
    from transformers import AutoImageProcessor

    hub = _processors()[family]
    hub.save_pretrained(tmp_path / "hub")
    ours = Preprocessor.from_processor_config(
        json.loads((tmp_path / "hub" / "preprocessor_config.json").read_text())
    )
    raw = np.random.default_rng(0).integers(0, 256, (2, *shape, 3), dtype=np.uint8)
    # smooth images: real photos, not noise, are what resampling differences are measured on
    raw = (
        np.asarray(torch.nn.functional.avg_pool2d(torch.from_numpy(raw).permute(0, 3, 1, 2).float(), 5, 1, 2))
        .transpose(0, 2, 3, 1)
        .astype(np.uint8)
    )
    x = ours(torch.from_numpy(raw))
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "preprocessor_config.json").write_text(json.dumps(ours.processor_config()))
    for folder in ("hub", "ours"):
        proc = AutoImageProcessor.from_pretrained(tmp_path / folder)
        ref = proc(images=[Image.fromarray(r) for r in raw], return_tensors="pt")["pixel_values"]
        assert ref.shape == x.shape == (2, 3, 224, 224), (folder, ref.shape, x.shape)
        diff = (x - ref).abs()
        assert diff.mean() < MEAN_TOLERANCE and diff.max() < MAX_TOLERANCE, (folder, diff.mean(), diff.max())


def test_pretrained_processor_sets_the_preprocessor_and_a_mismatch_is_one_line(tmp_path: Path) -> None:
    from transformers import ConvNextImageProcessor

    ConvNextImageProcessor(
        size={"shortest_edge": 224}, crop_pct=0.875, image_mean=MEAN, image_std=STD
    ).save_pretrained(tmp_path)
    pre = build_preprocessor(ModelConfig(pretrained=str(tmp_path), image_size=224))
    assert (pre.image_size, pre.resize_side, pre.shortest_edge, pre.resample) == (224, 256, True, "bicubic")
    assert list(pre.mean) == MEAN
    with pytest.raises(UserError, match=r"model.image_size=32 does not match the pretrained model's 224"):
        build_preprocessor(ModelConfig(pretrained=str(tmp_path), image_size=32))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["tune.search_space.train.lrr.loguniform=[1e-4,1e-2]"],
            "tune.search_space['train.lrr']: unknown config key (did you mean 'train.lr'?)",
        ),
        (
            ["tune.search_space.train.batch_size.uniform=[16,64]"],
            "tune.search_space['train.batch_size']: uniform gives 16.0: Input should be a valid integer",
        ),
        (
            ["tune.search_space.train.warmup_fraction.choice=[0.1,1.5]"],
            "tune.search_space['train.warmup_fraction']: choice gives 1.5: Input should be less than 1",
        ),
        (
            ["tune.search_space.train.lr.loguniform=[0,1]"],
            "tune.search_space['train.lr']: loguniform: low must be above 0 (got 0)",
        ),
        (
            ["tune.search_space.train.lr.normal=[0,1]"],
            "tune.search_space['train.lr']: unknown distribution 'normal'",
        ),
        (["tune.search_space.data.path.choice=[a,b]"], "tune.search_space['data.path']: not searchable"),
        (
            ["tune.lrs=[1e-3]", "tune.search_space.train.lr.choice=[1e-3]"],
            "tune.search_space['train.lr'] and tune.lrs/lr_min/lr_max: give one of them",
        ),
        (
            ["model.pretrained=null", "model.model_type=convnxt"],
            "model.model_type 'convnxt' has no image-classification model (did you mean 'convnext'?)",
        ),
        (
            ["model.pretrained=null", "model.model_type=convnext", "model.arch.hidden_size=8"],
            "model.arch.hidden_size: not a field of the 'convnext' config",
        ),
    ],
)
def test_bad_search_space_or_architecture_is_one_line(overrides: list[str], message: str) -> None:
    """Checked when the config loads, before any cluster starts (the CLI prints the same line)."""
    with pytest.raises(UserError) as err:
        load_config(None, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_search_space_accepts_any_key_with_typed_values() -> None:
    from rayvit.config import with_overrides
    from tuning.sweep import is_sweep, param_space, trial_count

    cfg = load_config(
        None,
        [
            "model.pretrained=null",
            "tune.search_space.train.lr.loguniform=[1e-4,1e-2]",
            "tune.search_space.train.weight_decay.choice=[0.0,0.05]",
            "tune.search_space.model.arch.hidden_size.grid=[32,64]",
            "model.arch.num_attention_heads=4",
            "tune.num_samples=3",
        ],
    )
    assert set(param_space(cfg)) == {"train.lr", "train.weight_decay", "model.arch.hidden_size"}
    assert trial_count(cfg) == 6 and is_sweep(cfg)  # 2 grid points x 3 samples
    optuna = cfg.model_copy(update={"tune": cfg.tune.model_copy(update={"search_alg": "optuna"})})
    assert trial_count(optuna) == 3
    # the concurrency limit holds with either searcher: the variant generator's own, or Tune's
    # ConcurrencyLimiter around a Searcher (Optuna's)
    from ray.tune.search import BasicVariantGenerator, Searcher

    from tuning.sweep import search_alg

    grid = search_alg(cfg, 2)
    assert isinstance(grid, BasicVariantGenerator) and grid.max_concurrent == 2
    assert isinstance(search_alg(optuna, 2), Searcher)
    trial = with_overrides(cfg, {"train.lr": np.float64(3e-4), "model.arch.hidden_size": np.int64(64)})
    assert trial.train.lr == 3e-4 and trial.model.arch["hidden_size"] == 64
    assert type(trial.model.arch["hidden_size"]) is int
