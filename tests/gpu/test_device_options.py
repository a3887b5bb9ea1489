"""The commands' ``--dtype auto`` and ``--device`` (CPU tier: CUDA's answers are stubbed)."""

from __future__ import annotations

import pytest
import torch

from unimm import cli
from unimm.commands.devices import resolve_device, resolve_dtype


@pytest.fixture
def tf32_flag():
    allowed = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = allowed


@pytest.mark.parametrize("command", ["chat", "generate", "reconstruct", "demo", "serve"])
def test_the_pipeline_commands_default_to_auto(command):
    required = {"generate": ["--prompt", "a cat"], "reconstruct": ["image.png"]}.get(command, [])
    args = cli.build_parser().parse_args([command, *required])
    assert args.dtype == "auto" and args.device is None


@pytest.mark.parametrize(("native_bf16", "expected"), [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_is_bfloat16_on_a_gpu_that_runs_it_and_float32_elsewhere(monkeypatch, native_bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native_bf16)
    assert resolve_dtype("auto", torch.device("cuda")) == expected
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16


def test_cuda_gets_tf32_matmuls_and_the_cpu_is_left_alone(monkeypatch, tf32_flag):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == torch.device("cpu")
    assert not torch.backends.cuda.matmul.allow_tf32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(None) == torch.device("cuda")
    assert torch.backends.cuda.matmul.allow_tf32
