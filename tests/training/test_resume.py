"""A run killed with SIGKILL after a checkpoint, then resumed, ends bitwise equal to an uninterrupted run."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from unimm.training.tracking import read_metrics

pytestmark = pytest.mark.integration

STEPS = 12
SAVE_EVERY = 4
POLL_SECONDS = 0.2
TIMEOUT_SECONDS = 240


def _recipe(output_dir, synthetic_path: str) -> dict:
    # 32 samples / batch 4 / accumulation 2 = 4 steps per epoch: the run crosses epochs (reshuffles),
    # uses dropout (RNG), warm-up + cosine (scheduler state) and AdamW (optimizer state).
    return {
        "stage": synthetic_path,
        "output_dir": str(output_dir),
        "deepspeed_config": None,
        "max_steps": STEPS,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2,
        "num_train_samples": 32,
        "attention_dropout": 0.1,
        "learning_rate": 1e-2,
        "warmup_steps": 3,
        "lr_scheduler_type": "cosine",
        "logging_steps": 1,
        "save_steps": SAVE_EVERY,
        "seconds_per_step": 0.25,
    }


def _start(recipe_path, env) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "unimm.train", str(recipe_path)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _wait_for_checkpoint(process: subprocess.Popen, latest_file) -> None:
    deadline = time.monotonic() + TIMEOUT_SECONDS
    while not (latest_file.is_file() and latest_file.read_text().strip()):
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(POLL_SECONDS)


def _finish(process: subprocess.Popen) -> None:
    _, stderr = process.communicate(timeout=TIMEOUT_SECONDS)
    assert process.returncode == 0, stderr.decode()[-3000:]


def test_sigkill_then_resume_matches_uninterrupted_run(
    tmp_path, subprocess_env, write_recipe, synthetic_path
):
    uninterrupted = _start(
        write_recipe(_recipe(tmp_path / "uninterrupted", synthetic_path), "a.yaml"), subprocess_env
    )
    killed_recipe = write_recipe(_recipe(tmp_path / "killed", synthetic_path), "b.yaml")
    killed = _start(killed_recipe, subprocess_env)
    _wait_for_checkpoint(killed, tmp_path / "killed" / "checkpoints" / "latest")
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    interrupted_at = max(record["step"] for record in read_metrics(tmp_path / "killed" / "metrics.jsonl"))
    assert SAVE_EVERY <= interrupted_at < STEPS, "killed after a checkpoint, before the end"

    _finish(_start(killed_recipe, subprocess_env))  # the same command resumes from the latest checkpoint
    _finish(uninterrupted)

    expected = read_metrics(tmp_path / "uninterrupted" / "metrics.jsonl")
    resumed = read_metrics(tmp_path / "killed" / "metrics.jsonl")
    steps = [record["step"] for record in resumed if record["split"] == "train"]
    assert steps == list(range(1, STEPS + 1)), (
        "records past the checkpoint were replaced by the resumed run's"
    )
    last = {
        split: [r for r in records if r["split"] == "train"][-1]
        for split, records in (("a", expected), ("b", resumed))
    }
    assert last["a"]["loss"] == last["b"]["loss"]  # bitwise: same float
    assert last["a"]["lr"] == last["b"]["lr"]
    weights = load_file(tmp_path / "uninterrupted" / "export" / "model.safetensors")
    resumed_weights = load_file(tmp_path / "killed" / "export" / "model.safetensors")
    assert weights.keys() == resumed_weights.keys()
    assert all(torch.equal(weights[name], resumed_weights[name]) for name in weights)
