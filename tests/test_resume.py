"""Checkpoints, shards and the resume check, without a Ray cluster."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from rayvit.checkpoint import load_training_checkpoint, save_training_checkpoint
from rayvit.config import load_config
from rayvit.errors import UserError
from rayvit.job import JOB_FILE, check_resume
from rayvit.model import build_model, build_preprocessor
from rayvit.storage import Storage

TINY_MODEL = [
    "model.arch.hidden_size=16",
    "model.arch.num_hidden_layers=1",
    "model.arch.num_attention_heads=2",
    "model.arch.intermediate_size=32",
]


def _checkpoint(folder: Path, epoch: int) -> None:
    cfg = load_config(ROOT / "configs" / "quick.yaml", TINY_MODEL)
    model = build_model(cfg.model, ["a", "b"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    save_training_checkpoint(
        folder, model, build_preprocessor(cfg.model), opt, sched, epoch, {"epoch": epoch}, cfg
    )


def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ray.train import Checkpoint

    older, latest = tmp_path / "checkpoint_2026-01-01_00-00-01", tmp_path / "checkpoint_2026-01-01_00-00-02"
    _checkpoint(older, 1)
    _checkpoint(latest, 2)
    (latest / "training_state.pt").write_bytes(b"torn upload")
    restored = load_training_checkpoint(Checkpoint(str(latest)), "eager")
    assert restored is not None and restored.state["epoch"] == 1
    assert f"warning: checkpoint {latest} cannot be read" in capsys.readouterr().out
    # every kept checkpoint unreadable: one clear error
    (older / "training_state.pt").write_bytes(b"")
    with pytest.raises(UserError, match="no readable checkpoint"):
        load_training_checkpoint(Checkpoint(str(latest)), "eager")


def test_training_state_loads_weights_only(tmp_path: Path) -> None:
    """A checkpoint whose state holds more than tensors and numbers is refused, not executed."""
    from ray.train import Checkpoint

    _checkpoint(tmp_path / "checkpoint_a", 1)
    torch.save({"epoch": 1, "payload": Path("x")}, tmp_path / "checkpoint_a" / "training_state.pt")
    with pytest.raises(UserError):
        load_training_checkpoint(Checkpoint(str(tmp_path / "checkpoint_a")), "eager")


def test_resume_check_names_changed_settings_and_data(tmp_path: Path) -> None:
    storage = Storage.from_setting(str(tmp_path))
    cfg = load_config(ROOT / "configs" / "quick.yaml", [f"output_dir={tmp_path}"])
    check_resume(cfg, storage, "fp1")  # nothing there yet
    storage.write_text(json.dumps({"config": cfg.to_dict(), "data_fingerprint": "fp1"}), JOB_FILE)
    check_resume(cfg, storage, "fp1")
    # where and how fast a run goes may change between reruns
    check_resume(cfg.model_copy(update={"local_dir": "/elsewhere"}), storage, "fp1")
    with pytest.raises(UserError) as err:
        check_resume(cfg, storage, "fp2")
    assert "data fingerprint fp1 -> fp2" in str(err.value)
    other = load_config(ROOT / "configs" / "quick.yaml", [f"output_dir={tmp_path}", "seed=3"])
    with pytest.raises(UserError, match=r"seed: 0 -> 3"):
        check_resume(other, storage)
    restart = load_config(
        ROOT / "configs" / "quick.yaml", [f"output_dir={tmp_path}", "seed=3", "restart=true"]
    )
    check_resume(restart, storage, "fp2")  # restart=true: no check


def test_other_ranks_build_the_architecture_from_the_checkpoint_config_alone(tmp_path: Path) -> None:
    """What a rank other than 0 reads on resume: config.json only; the model it builds has the
    checkpoint's parameters, name for name and shape for shape (DDP then sends rank 0's values)."""
    from ray.train import Checkpoint

    from rayvit.checkpoint import model_without_weights

    _checkpoint(tmp_path / "checkpoint_a", 1)
    (tmp_path / "checkpoint_a" / "training_state.pt").write_bytes(b"not read")
    (tmp_path / "checkpoint_a" / "model" / "model.safetensors").write_bytes(b"not read either")
    skeleton = model_without_weights(Checkpoint(str(tmp_path / "checkpoint_a")), "eager")
    cfg = load_config(ROOT / "configs" / "quick.yaml", TINY_MODEL)
    reference = build_model(cfg.model, ["a", "b"])
    assert {n: p.shape for n, p in skeleton.named_parameters()} == {
        n: p.shape for n, p in reference.named_parameters()
    }
    assert skeleton.config.id2label == {0: "a", 1: "b"}
