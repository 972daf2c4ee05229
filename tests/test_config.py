from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ROOT

from rayvit.config import Config, config_from_dict, load_config
from rayvit.errors import UserError


def test_yaml_and_overrides_merge() -> None:
    cfg = load_config(
        ROOT / "configs" / "quick.yaml", ["train.lr=0.01", "scaling.num_workers=3", "model.pretrained=null"]
    )
    assert cfg.train.lr == 0.01
    assert cfg.scaling.num_workers == 3
    assert cfg.model.pretrained is None
    assert cfg.model.image_size == 24  # from the file
    assert cfg.data.path == "uoft-cs/cifar10"  # default kept


def test_full_recipe_defaults() -> None:
    cfg = load_config(ROOT / "configs" / "train.yaml")
    assert cfg.model.pretrained == "google/vit-base-patch16-224-in21k"
    assert cfg.scaling.num_workers == "auto"
    assert cfg.model.image_size == 224


def test_unknown_key_names_key_and_suggestion() -> None:
    with pytest.raises(UserError, match=r"unknown config key 'train\.lrr'.*did you mean 'train\.lr'"):
        load_config(None, ["train.lrr=1"])


def test_unknown_key_in_yaml(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  hiden_size: 3\n")
    with pytest.raises(UserError, match=r"'model\.hiden_size'.*'model\.hidden_size'"):
        load_config(f)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.epochs=many", "train.epochs"),
        ("scaling.num_workers=lots", "scaling.num_workers"),
        ("scaling.use_gpu=maybe", "scaling.use_gpu"),
        ("data.val_fraction=1.5", "data.val_fraction"),
        ("train.lr=-1", "train.lr"),
    ],
)
def test_wrong_type_names_key(override: str, key: str) -> None:
    with pytest.raises(UserError) as err:
        load_config(None, [override])
    assert f"'{key}'" in str(err.value)
    assert "\n" not in str(err.value)


def test_auto_values() -> None:
    cfg = load_config(None, ["scaling.num_workers=auto", "scaling.use_gpu=auto"])
    assert cfg.scaling.num_workers == "auto" and cfg.scaling.use_gpu == "auto"


def test_bad_override_syntax_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="key=value"):
        load_config(None, ["train.lr"])
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_saved_yaml_round_trips(tmp_path: Path) -> None:
    cfg = load_config(ROOT / "configs" / "quick.yaml", ["seed=7"])
    f = tmp_path / "config.yaml"
    f.write_text(cfg.to_yaml())
    assert load_config(f) == cfg
    assert config_from_dict(cfg.to_dict()) == cfg
    assert isinstance(cfg, Config)
