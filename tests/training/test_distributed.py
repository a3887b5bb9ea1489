"""Two processes under torchrun, ZeRO-3 on CPU: disjoint data shards, and an export that reproduces
the sharded model's logits in a single process."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.integration

PROCESSES = 2
TIMEOUT_SECONDS = 300


def test_two_process_zero3_shards_data_and_exports_the_same_model(
    tmp_path, subprocess_env, write_recipe, synthetic_path, deepspeed_dir
):
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    recipe = write_recipe(
        {
            "stage": synthetic_path,
            "output_dir": str(tmp_path / "run"),
            "deepspeed_config": str(deepspeed_dir / "zero3.json"),
            "num_train_samples": 32,
            "num_train_epochs": 1,  # 32 samples / (2 ranks x batch 4) = 4 steps: every sample exactly once
            "per_device_train_batch_size": 4,
            "learning_rate": 1e-2,
            "logging_steps": 1,
            "record_dir": str(record_dir),
        }
    )
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={PROCESSES}"]
    completed = subprocess.run(
        [*command, "-m", "unimm.train", str(recipe)],
        env=subprocess_env,
        capture_output=True,
        timeout=TIMEOUT_SECONDS,
    )
    assert completed.returncode == 0, completed.stderr.decode()[-4000:]

    shards = [
        [
            int(index)
            for line in (record_dir / f"indices_rank{rank}.txt").read_text().splitlines()
            for index in line.split()
        ]
        for rank in range(PROCESSES)
    ]
    assert len(shards[0]) == len(shards[1]) == 16
    assert not set(shards[0]) & set(shards[1]), "ranks trained on overlapping samples"
    assert sorted(shards[0] + shards[1]) == list(range(32))

    sharded = torch.load(record_dir / "logits.pt")  # computed by the ZeRO-3 engine after the last step
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "export").eval()
    with torch.no_grad():
        logits = exported(input_ids=sharded["input_ids"]).logits
    torch.testing.assert_close(logits, sharded["logits"], rtol=1e-5, atol=1e-5)


def test_the_first_cpu_run_says_that_deepspeed_compiles_its_op(tmp_path, monkeypatch, caplog):
    from deepspeed.accelerator import get_accelerator

    from unimm.training.distributed import _announce_shm_op_build

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    with caplog.at_level("WARNING", logger="unimm.training.distributed"):
        _announce_shm_op_build(get_accelerator())
    assert "compiling deepspeed_shm_comm" in caplog.text
    caplog.clear()
    built = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "deepspeed_shm_comm.so"
    built.parent.mkdir(parents=True)
    built.touch()
    with caplog.at_level("WARNING", logger="unimm.training.distributed"):
        _announce_shm_op_build(get_accelerator())
    assert caplog.text == ""
