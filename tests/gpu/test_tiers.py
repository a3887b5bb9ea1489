"""The CPU tier hides CUDA from torch, DeepSpeed and subprocesses, so it behaves the same on any machine."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

PROBE = (
    "import torch; from deepspeed.accelerator import get_accelerator; "
    "print(torch.cuda.is_available(), get_accelerator().device_name())"
)


@pytest.fixture
def cpu_tier(device: torch.device) -> None:
    if device.type != "cpu":
        pytest.skip(f"the gpu tier (UNIMM_TEST_DEVICE={device}) keeps CUDA visible")


def test_the_cpu_tier_sees_no_cuda_device(cpu_tier, clean_env):
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "" and os.environ["DS_ACCELERATOR"] == "cpu"
    assert not torch.cuda.is_available()
    from deepspeed.accelerator import get_accelerator

    assert get_accelerator().device_name() == "cpu"
    probe = subprocess.run([sys.executable, "-c", PROBE], env=clean_env, capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert probe.stdout.split() == ["False", "cpu"]  # training subprocesses inherit the tier
