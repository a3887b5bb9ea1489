"""Real DeepSpeed checkpoints, damaged or crafted: a restart resumes from the newest intact checkpoint,
and neither resume nor export unpickles anything that could run code."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import pytest
import torch

from unimm.cli import main as unimm_main
from unimm.training.arguments import parse_recipe
from unimm.training.checkpoint import CheckpointError, verify_checkpoint, write_manifest
from unimm.training.export import export_checkpoint
from unimm.training.loop import train

pytestmark = pytest.mark.integration

MODEL_FILE = "mp_rank_00_model_states.pt"
ZERO_2_OPTIMIZER_FILE = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
NEWEST, BEFORE = "step-00000008", "step-00000004"  # the synthetic recipe: 8 steps, a checkpoint every 4


class RunsCode:
    """Unpickled without weights_only, this creates ``marker`` (as a crafted checkpoint could run anything)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("finished")


@pytest.fixture
def finished_run(finished_runs, synthetic_recipe, deepspeed_dir, tmp_path):
    """``finished_run(zero)`` -> a copy of a finished synthetic run under that DeepSpeed config (trained
    once per module), and the recipe that resumes it."""

    def copy_of(zero: str) -> tuple[Path, dict]:
        values = {**synthetic_recipe, "deepspeed_config": str(deepspeed_dir / f"{zero}.json")}
        if not (finished_runs / zero).exists():
            train(parse_recipe({**values, "output_dir": str(finished_runs / zero)}))
        shutil.copytree(finished_runs / zero, tmp_path / zero)
        return tmp_path / zero, {**values, "output_dir": str(tmp_path / zero)}

    return copy_of


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
}


@pytest.mark.parametrize("damage", DAMAGES.values(), ids=DAMAGES.keys())
def test_restart_resumes_from_the_newest_intact_checkpoint(finished_run, caplog, damage):
    name, spoil = damage
    run, values = finished_run("zero0")
    spoil(run / "checkpoints" / NEWEST / name)
    with caplog.at_level(logging.INFO, logger="unimm.training.checkpoint"):
        result = train(parse_recipe(values))
    assert f"checkpoint {run / 'checkpoints' / NEWEST} is damaged: {name}" in caplog.text
    assert f"resumed from {run / 'checkpoints' / BEFORE} at step 4" in caplog.text
    assert result.global_step == 8
    verify_checkpoint(result.checkpoint)  # the damaged step was written again


def test_restart_with_no_intact_checkpoint_names_the_damaged_files(finished_run):
    run, values = finished_run("zero0")
    _truncate(run / "checkpoints" / NEWEST / MODEL_FILE)
    (run / "checkpoints" / BEFORE / "trainer_state.json").unlink()
    with pytest.raises(CheckpointError) as raised:
        train(parse_recipe(values))
    message = str(raised.value)
    assert message.startswith(f"no intact checkpoint in {run / 'checkpoints'}: ")
    assert f"{NEWEST} is damaged: {MODEL_FILE} has" in message
    assert f"{BEFORE} is damaged: trainer_state.json is missing" in message


def test_a_named_damaged_checkpoint_is_an_error_not_a_fallback(finished_run, tmp_path):
    run, values = finished_run("zero0")
    named = run / "checkpoints" / NEWEST
    _flip_a_bit(named / MODEL_FILE)
    elsewhere = {**values, "output_dir": str(tmp_path / "elsewhere"), "resume_from_checkpoint": str(named)}
    damaged = re.escape(f"checkpoint {named} is damaged: {MODEL_FILE} differs")
    with pytest.raises(CheckpointError, match=f"^{damaged}"):
        train(parse_recipe(elsewhere))
    with pytest.raises(CheckpointError, match=f"^{damaged}"):
        export_checkpoint(named, tmp_path / "export")


CRAFTED = {
    "zero0 model": ("zero0", MODEL_FILE),
    "zero0 stage state": ("zero0", "stage_state_rank0.pt"),
    "zero0 rng state": ("zero0", "rng_state_rank0.pt"),
    "zero2 model": ("zero2", MODEL_FILE),
    "zero2 optimizer": ("zero2", ZERO_2_OPTIMIZER_FILE),
}


@pytest.mark.parametrize("crafted", CRAFTED.values(), ids=CRAFTED.keys())
def test_a_crafted_checkpoint_runs_no_code_on_resume_or_export(finished_run, tmp_path, crafted):
    zero, name = crafted
    run, values = finished_run(zero)
    checkpoint, marker = run / "checkpoints" / NEWEST, tmp_path / "code-ran"
    torch.save({"module": RunsCode(marker)}, checkpoint / name)
    write_manifest(checkpoint)  # whoever crafted it wrote a matching manifest
    refusal = (
        "^" + re.escape(f"refusing to load {checkpoint / name}: its pickle asks for io.open,") + "[^\n]*$"
    )
    with pytest.raises(CheckpointError, match=refusal):
        train(parse_recipe(values))
    if name != "rng_state_rank0.pt":  # export reads no RNG state
        with pytest.raises(CheckpointError, match=refusal):
            export_checkpoint(run, tmp_path / "export")
        # The command: one logged line and exit status 1, no traceback.
        assert unimm_main(["export", str(run), "--output", str(tmp_path / "export")]) == 1
    assert not marker.exists()
