"""Checkpoint bookkeeping with a stand-in engine (the real DeepSpeed round trip is in test_resume.py)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from unimm.training.checkpoint import (
    CheckpointManager,
    RunFingerprint,
    TrainState,
    capture_rng_state,
    latest_checkpoint,
    model_fingerprint,
    restore_rng_state,
)


class FakeEngine:
    """Writes what DeepSpeed's save_checkpoint writes: files under ``save_dir/tag``."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    def save_checkpoint(self, save_dir, tag, save_latest):
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True)
        torch.save({"module": {}}, folder / "mp_rank_00_model_states.pt")
        if self.fail:
            raise KeyboardInterrupt("killed while saving")


class FakeStage:
    def state_dict(self):
        return {"ema": 1}


FINGERPRINT = RunFingerprint(stage="synthetic", model="abc", world_size=1, global_batch_size=8)


def _save(manager: CheckpointManager, step: int, engine=None):
    return manager.save(
        engine or FakeEngine(),
        FakeStage(),
        TrainState(global_step=step),
        {"fingerprint": FINGERPRINT.__dict__},
    )


def test_save_is_complete_and_keeps_the_last_k(tmp_path):
    manager = CheckpointManager(tmp_path / "checkpoints", keep_last=2)
    for step in (2, 4, 6):
        _save(manager, step)
    assert [path.name for path in manager.checkpoints()] == ["step-00000004", "step-00000006"]
    assert latest_checkpoint(manager.directory).name == "step-00000006"
    files = {path.name for path in latest_checkpoint(manager.directory).iterdir()}
    assert {
        "trainer_state.json",
        "rng_state_rank0.pt",
        "stage_state_rank0.pt",
        "mp_rank_00_model_states.pt",
    } <= files


def test_interrupted_save_leaves_no_checkpoint(tmp_path):
    manager = CheckpointManager(tmp_path / "checkpoints", keep_last=2)
    _save(manager, 2)
    with pytest.raises(KeyboardInterrupt):
        _save(manager, 4, FakeEngine(fail=True))
    assert latest_checkpoint(manager.directory).name == "step-00000002"
    assert manager.resolve("auto").name == "step-00000002"
    _save(manager, 4)  # the stale temporary folder is replaced
    assert latest_checkpoint(manager.directory).name == "step-00000004"


def test_resolve(tmp_path):
    manager = CheckpointManager(tmp_path / "run" / "checkpoints", keep_last=2)
    assert manager.resolve("auto") is None
    saved = _save(manager, 2)
    assert manager.resolve("never") is None
    assert manager.resolve(str(tmp_path / "run")) == saved
    assert manager.resolve(str(saved)) == saved
    with pytest.raises(FileNotFoundError, match="no checkpoint there"):
        manager.resolve(str(tmp_path / "elsewhere"))


def test_checkpoint_of_another_run_is_refused(tmp_path):
    manager = CheckpointManager(tmp_path / "checkpoints", keep_last=2)
    saved = _save(manager, 2)
    manager.check_compatible(saved, FINGERPRINT)
    other = RunFingerprint(stage="llm_sft", model="def", world_size=1, global_batch_size=8)
    with pytest.raises(
        ValueError, match=r"another run \(stage: checkpoint has 'synthetic', this run has 'llm_sft'; model"
    ):
        manager.check_compatible(saved, other)


def test_rng_state_round_trip():
    state = capture_rng_state()
    expected = (random.random(), torch.rand(2))
    restore_rng_state(state)
    assert random.random() == expected[0]
    assert torch.equal(torch.rand(2), expected[1])


def test_model_fingerprint_sees_shapes_and_trainability():
    model = torch.nn.Linear(2, 3)
    before = model_fingerprint(model)
    assert model_fingerprint(torch.nn.Linear(2, 3)) == before
    assert model_fingerprint(torch.nn.Linear(2, 4)) != before
    model.bias.requires_grad_(False)
    assert model_fingerprint(model) != before
