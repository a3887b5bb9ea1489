"""Fixtures for the training tests: the synthetic stage registered, and recipes for it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from unimm.training.stages import STAGES

HERE = Path(__file__).parent
REPOSITORY = HERE.parent.parent
SYNTHETIC = "synthetic"
# How a subprocess names the synthetic stage (with tests/training on its PYTHONPATH).
SYNTHETIC_PATH = "synthetic_stage:SyntheticStage"


@pytest.fixture(autouse=True)
def synthetic_stage(monkeypatch):
    """``stage: synthetic`` resolves to the test stage; the subprocess runs import it the same way."""
    monkeypatch.syspath_prepend(str(HERE))
    monkeypatch.setitem(STAGES, SYNTHETIC, SYNTHETIC_PATH)


@pytest.fixture
def synthetic_recipe(tmp_path):
    """A recipe mapping for a few-step run of the synthetic stage in ``tmp_path``."""
    return {
        "stage": SYNTHETIC,
        "output_dir": str(tmp_path / "run"),
        "max_steps": 8,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-2,
        "lr_scheduler_type": "constant",
        "logging_steps": 1,
        "save_steps": 4,
        "export_at_end": False,
    }


@pytest.fixture
def deepspeed_dir() -> Path:
    return REPOSITORY / "recipes" / "deepspeed"


@pytest.fixture
def synthetic_path() -> str:
    return SYNTHETIC_PATH


@pytest.fixture
def subprocess_env(clean_env: dict[str, str]) -> dict[str, str]:
    """Environment for training subprocesses: the synthetic stage importable, one thread (deterministic
    reductions, and fair to the shared cores), no rank variables inherited from this process."""
    env = dict(clean_env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture
def write_recipe(tmp_path):
    """``write_recipe(values, name)`` -> the path of a recipe YAML holding ``values``."""

    def write(values: dict, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(values))
        return path

    return write
