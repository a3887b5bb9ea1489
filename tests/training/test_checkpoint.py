"""Checkpoint bookkeeping with a stand-in engine (the real DeepSpeed round trip is in test_resume.py, and
damaged or crafted real checkpoints in test_checkpoint_integrity.py)."""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from unimm.training.checkpoint import (
    MANIFEST_FILE,
    CheckpointError,
    CheckpointManager,
    RunFingerprint,
    TrainState,
    capture_rng_state,
    latest_checkpoint,
    load_file,
    model_fingerprint,
    restore_rng_state,
)

MODEL_FILE = "mp_rank_00_model_states.pt"


class FakeEngine:
    """Writes what DeepSpeed's save_checkpoint writes (files under ``save_dir/tag``), and reads them back
    the way its load_checkpoint does: through ``checkpoint_engine.load``."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.checkpoint_engine = "configured"
        self.loaded = None

    def save_checkpoint(self, save_dir, tag, save_latest):
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True)
        torch.save({"module": {"weight": torch.ones(64)}}, folder / MODEL_FILE)
        if self.fail:
            raise KeyboardInterrupt("killed while saving")

    def load_checkpoint(self, load_dir, tag, **kwargs):
        path = str(Path(load_dir) / tag / MODEL_FILE)
        self.loaded = self.checkpoint_engine.load(path, map_location=lambda storage, location: storage)
        return path, {}


class FakeStage:
    def __init__(self) -> None:
        self.loaded = None

    def state_dict(self):
        return {"ema": 1}

    def load_state_dict(self, state):
        self.loaded = state


class RunsCode:
    """Unpickled without weights_only, this creates ``marker`` (as a crafted checkpoint could run anything)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


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
        MANIFEST_FILE,
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


def test_save_writes_a_manifest_of_every_file(tmp_path):
    saved = _save(CheckpointManager(tmp_path / "checkpoints", keep_last=2), 2)
    manifest = json.loads((saved / MANIFEST_FILE).read_text())["files"]
    assert set(manifest) == {path.name for path in saved.iterdir()} - {MANIFEST_FILE}
    for name, entry in manifest.items():
        data = (saved / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGES = {
    "truncated model": (MODEL_FILE, _truncate),
    "deleted model": (MODEL_FILE, Path.unlink),
    "bit-flipped model": (MODEL_FILE, _flip_a_bit),
    "half trainer_state.json": ("trainer_state.json", _truncate),
    "half manifest": (MANIFEST_FILE, _truncate),
}


@pytest.mark.parametrize("damage", DAMAGES.values(), ids=DAMAGES.keys())
def test_damaged_newest_checkpoint_is_skipped_for_the_one_before(tmp_path, caplog, damage):
    name, spoil = damage
    manager = CheckpointManager(tmp_path / "checkpoints", keep_last=2)
    before, newest = _save(manager, 2), _save(manager, 4)
    spoil(newest / name)
    with caplog.at_level(logging.WARNING, logger="unimm.training.checkpoint"):
        assert manager.resolve("auto") == before
    assert f"checkpoint {newest} is damaged: {name}" in caplog.text
    # Named as the one to resume from, it is an error rather than a quiet swap for another.
    with pytest.raises(CheckpointError, match=f"checkpoint {newest} is damaged: {name}"):
        manager.resolve(str(newest))


def test_no_intact_checkpoint_is_an_error_naming_the_files(tmp_path):
    manager = CheckpointManager(tmp_path / "checkpoints", keep_last=2)
    for step in (2, 4):
        _truncate(_save(manager, step) / MODEL_FILE)
    with pytest.raises(CheckpointError) as raised:
        manager.resolve("auto")
    message = str(raised.value)
    assert message.startswith(f"no intact checkpoint in {manager.directory}: ")
    assert f"step-00000004 is damaged: {MODEL_FILE} has" in message
    assert f"step-00000002 is damaged: {MODEL_FILE} has" in message


def test_checkpoint_without_manifest_is_accepted_with_a_warning(tmp_path, caplog):
    manager = CheckpointManager(tmp_path / "checkpoints", keep_last=2)
    _save(manager, 2)
    older_unimm = _save(manager, 4)
    (older_unimm / MANIFEST_FILE).unlink()
    with caplog.at_level(logging.WARNING, logger="unimm.training.checkpoint"):
        assert manager.resolve("auto") == older_unimm
    assert f"{older_unimm} has no {MANIFEST_FILE}" in caplog.text


def test_a_run_resumed_past_a_damaged_checkpoint_rewrites_it_and_keeps_the_intact_ones(tmp_path):
    manager = CheckpointManager(tmp_path / "checkpoints", keep_last=2)
    _save(manager, 2)
    damaged = _save(manager, 4)
    _truncate(damaged / MODEL_FILE)
    manager.keep_last = 1
    _save(manager, 3)  # resumed from step 2: the damaged step 4 does not count towards keep_last
    assert [path.name for path in manager.checkpoints()] == ["step-00000003", "step-00000004"]
    assert latest_checkpoint(manager.directory).name == "step-00000003"
    _save(manager, 4)
    assert [path.name for path in manager.checkpoints()] == ["step-00000004"]
    assert latest_checkpoint(manager.directory).name == "step-00000004"  # intact again


def test_load_goes_through_weights_only_loads(tmp_path):
    saved = _save(CheckpointManager(tmp_path / "checkpoints", keep_last=2), 2)
    engine, stage = FakeEngine(), FakeStage()
    state = CheckpointManager(saved.parent, keep_last=2).load(engine, stage, saved)
    assert state.global_step == 2
    assert torch.equal(engine.loaded["module"]["weight"], torch.ones(64))
    assert engine.checkpoint_engine == "configured", "the configured engine (it also saves) is given back"
    assert stage.loaded == {"ema": 1}


@pytest.mark.parametrize("name", [MODEL_FILE, "stage_state_rank0.pt", "rng_state_rank0.pt"])
def test_load_refuses_a_file_that_would_run_code(tmp_path, name):
    saved = _save(CheckpointManager(tmp_path / "checkpoints", keep_last=2), 2)
    marker = tmp_path / "code-ran"
    torch.save({"module": RunsCode(marker)}, saved / name)
    with pytest.raises(CheckpointError) as raised:
        CheckpointManager(saved.parent, keep_last=2).load(FakeEngine(), FakeStage(), saved)
    message = str(raised.value)
    assert message.startswith(f"refusing to load {saved / name}: ") and "\n" not in message
    assert "asks for io.open" in message
    assert not marker.exists()


def test_load_file_names_a_damaged_file(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"weight": torch.ones(64)}, path)
    _truncate(path)
    with pytest.raises(CheckpointError, match=f"^cannot read {path}: PytorchStreamReader failed"):
        load_file(path)


def test_rng_state_file_loads_with_weights_only(tmp_path):
    torch.save(capture_rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(2))
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand()) == expected[:2]
    assert torch.equal(torch.rand(2), expected[2])


def test_rng_state_file_of_an_older_unimm_still_loads(tmp_path):
    legacy = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save(legacy, tmp_path / "rng.pt")  # numpy's state as a tuple holding an ndarray
    expected = (random.random(), np.random.rand(), torch.rand(2))
    saved = _save(CheckpointManager(tmp_path / "checkpoints", keep_last=2), 2)
    (tmp_path / "rng.pt").replace(saved / "rng_state_rank0.pt")
    CheckpointManager(saved.parent, keep_last=2).load(FakeEngine(), FakeStage(), saved)
    assert (random.random(), np.random.rand()) == expected[:2]
    assert torch.equal(torch.rand(2), expected[2])


def test_choose_in_one_process_is_resolve(tmp_path):
    """The ranks' agreement (tests/training/test_multinode.py) reduces to ``resolve`` in a single process."""
    manager = CheckpointManager(tmp_path / "checkpoints", keep_last=3)
    assert manager.choose("auto") is None and manager.choose("never") is None
    older, newest = _save(manager, 2), _save(manager, 4)
    assert manager.choose("auto") == newest and manager.choose(str(older)) == older
    with pytest.raises(FileNotFoundError, match="no checkpoint there"):
        manager.choose(str(tmp_path / "elsewhere"))
