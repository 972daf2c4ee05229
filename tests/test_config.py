from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ROOT, run_train_cli

from rayvit.cli import build_parser, config_markdown
from rayvit.config import Config, _all_keys, config_from_dict, load_config
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
    f.write_text("model:\n  image_sise: 3\n")
    with pytest.raises(UserError, match=r"'model\.image_sise'.*'model\.image_size'"):
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
    again = load_config(f)
    assert again == cfg and again.seed == 7 and again != Config()
    assert config_from_dict(cfg.to_dict()) == cfg


# Each bad value, and the one line that answers it.
BAD_CONFIGS = [
    ("seed=-1", "invalid value for 'seed': Input should be greater than or equal to 0 (got -1)"),
    ("train.lr=0", "invalid value for 'train.lr': Input should be greater than 0 (got 0)"),
    ("train.lr=-1e-3", "invalid value for 'train.lr': Input should be greater than 0 (got -0.001)"),
    ("train.lr=.inf", "invalid value for 'train.lr': Input should be a finite number (got inf)"),
    ("train.lr=.nan", "invalid value for 'train.lr': Input should be a finite number (got nan)"),
    ("train.lr=fast", "invalid value for 'train.lr': Input should be a valid number (got 'fast')"),
    ("tune.lrs=[1e-3,-1]", "invalid value for 'tune.lrs[1]': Input should be greater than 0 (got -1)"),
    ("tune.lrs=[.nan]", "invalid value for 'tune.lrs[0]': Input should be a finite number (got nan)"),
    (
        "tune.lrs=[]",
        "invalid value for 'tune.lrs': List should have at least 1 item after validation, not 0 (got [])",
    ),
    ("tune.lr_min=0", "invalid value for 'tune.lr_min': Input should be greater than 0 (got 0)"),
    ("tune.lr_max=-.inf", "invalid value for 'tune.lr_max': Input should be a finite number (got -inf)"),
    ("tune.lr_min=1e-4", "tune.lr_min and tune.lr_max must be set together (or both null)"),
    ("tune.lr_min=1e-2 tune.lr_max=1e-3", "tune.lr_min (0.01) must be below tune.lr_max (0.001)"),
    (
        "train.batch_size=true",
        "invalid value for 'train.batch_size': Input should be a valid integer (got True)",
    ),
    ("train.epochs=2.5", "invalid value for 'train.epochs': Input should be a valid integer (got 2.5)"),
    (
        "train.epochs=0",
        "invalid value for 'train.epochs': Input should be greater than or equal to 1 (got 0)",
    ),
    ("train.augment=1", "invalid value for 'train.augment': Input should be a valid boolean (got 1)"),
    (
        "train.eval_batch_size=0",
        "invalid value for 'train.eval_batch_size': Input should be greater than or equal to 1 (got 0)",
    ),
    (
        "data.train_limit=0",
        "invalid value for 'data.train_limit': Input should be greater than or equal to 1 (got 0)",
    ),
    (
        "scaling.num_workers=[3,2]",
        "scaling.num_workers [3, 2]: the minimum is above the maximum",
    ),
    (
        "scaling.num_workers=0",
        "invalid value for 'scaling.num_workers': Input should be greater than or equal to 1 or a valid list "
        "or 'auto' (got 0)",
    ),
    (
        "scaling.num_workers=true",
        "invalid value for 'scaling.num_workers': Input should be a valid integer or a valid list or 'auto' (got True)",
    ),
    (
        "tune.max_concurrent_trials=0",
        "invalid value for 'tune.max_concurrent_trials': Input should be greater than or equal to 1 or 'auto' (got 0)",
    ),
    (
        "ray.num_cpus=0",
        "invalid value for 'ray.num_cpus': Input should be greater than or equal to 1 (got 0)",
    ),
    (
        "model.image_std=[0.5,0,0.5]",
        "invalid value for 'model.image_std[1]': Input should be greater than 0 (got 0)",
    ),
    (
        "model.image_mean=[0.5,0.5]",
        "invalid value for 'model.image_mean': List should have at least 3 items after validation, not 2 (got [0.5, 0.5])",
    ),
    (
        "model.pretrained=null model.arch.hidden_size=30 model.arch.num_attention_heads=4",
        "model.arch.hidden_size=30 is not a multiple of model.arch.num_attention_heads=4",
    ),
    ("train.lrr=1", "unknown config key 'train.lrr' (did you mean 'train.lr'?)"),
    ("sed=1", "unknown config key 'sed' (did you mean 'seed'?)"),
    ("wandb.projct=x", "unknown config key 'wandb.projct' (did you mean 'wandb.project'?)"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_CONFIGS, ids=[b[0] for b in BAD_CONFIGS])
def test_bad_config_corpus_one_line_each(overrides: str, message: str) -> None:
    with pytest.raises(UserError) as err:
        load_config(ROOT / "configs" / "quick.yaml", overrides.split())
    assert str(err.value) == message


@pytest.mark.parametrize(
    ("overrides", "message"),
    [BAD_CONFIGS[0], BAD_CONFIGS[3], BAD_CONFIGS[13], BAD_CONFIGS[-3]],
    ids=["seed", "inf", "strict-int", "unknown"],
)
def test_bad_config_through_the_cli(tmp_path: Path, overrides: str, message: str) -> None:
    out = run_train_cli([f"output_dir={tmp_path / 'run'}", *overrides.split()], timeout=120)
    assert out.returncode == 2
    assert out.stderr == f"error: {message}\n" and out.stdout == ""
    assert not (tmp_path / "run").exists()


def test_config_file_values_are_checked_strictly(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  batch_size: yes please\n")
    with pytest.raises(
        UserError, match=r"^invalid value for 'train\.batch_size': Input should be a valid integer"
    ):
        load_config(f)
    f.write_text("train:\n  lr: 1\n")  # an integer is a fine float
    assert load_config(f).train.lr == 1.0


def test_help_lists_every_key_with_type_default_and_meaning() -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, str(ROOT / "ray_jobs" / "train.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    keys = _all_keys(Config)
    assert len(keys) > 40
    for key in keys:
        assert f"  {key} (" in out, key
    # type, bounds and default on the key's line, its docstring below it
    assert "  train.batch_size (int >= 1, default 64)\n      Per worker and micro-batch;" in out
    assert "  tune.lrs (list[float > 0] (non-empty) | null, default null)\n      Shorthand for" in out
    assert "  scaling.num_workers (int >= 1 | list[int >= 1] (2 items) | 'auto', default auto)" in out


def test_every_key_has_a_docstring() -> None:
    def undocumented(model: type, prefix: str = "") -> list[str]:
        missing = []
        for name, field in model.model_fields.items():  # type: ignore[attr-defined]
            if not field.description:
                missing.append(prefix + name)
            ann = field.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                missing += undocumented(ann, f"{prefix}{name}.")
        return missing

    assert undocumented(Config) == []


def test_docs_config_md_is_the_generated_help() -> None:
    doc = (ROOT / "docs" / "config.md").read_text()
    assert doc == config_markdown(), "docs/config.md is stale: python -m rayvit.cli > docs/config.md"
    assert build_parser(None, "x").format_help().count("\n  train.lr (") == 1
