"""Shared fixtures: every test starts from the same seeds; a per-session dataset cache; the test tier's device.

Tiny model configs live next to the tests of each subpackage (``tests/<pkg>/conftest.py``).

Two tiers by device: the CPU tier (plain ``pytest``, ``make test``) hides CUDA from torch and DeepSpeed, so it
runs the same on a GPU machine as on a laptop (and its subprocesses inherit that); the gpu tier (``make
test-gpu``: ``UNIMM_TEST_DEVICE=cuda pytest -m gpu``) keeps CUDA and runs the tests marked ``gpu``, which skip
with the reason when no CUDA device is there."""

from __future__ import annotations

import os
import random

# The CPU tier hides CUDA before torch or DeepSpeed load (this is the first conftest pytest imports): CUDA
# initialises lazily and reads CUDA_VISIBLE_DEVICES then, DeepSpeed picks its accelerator from DS_ACCELERATOR.
os.environ.update(
    {}
    if os.environ.get("UNIMM_TEST_DEVICE", "cpu").startswith("cuda")
    else {"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}
)
# Tests never reach a hub; make that explicit so a missing asset fails fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Tiny models are dominated by per-op overhead: one thread is faster than two, and it keeps
# subprocesses (2-rank DeepSpeed runs) from oversubscribing CI's two cores. Set before torch loads.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from unimm.pipelines import UniMMPipeline
from unimm.pipelines.testing import build_random_pipeline

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

TEST_DEVICE = os.environ.get("UNIMM_TEST_DEVICE", "cpu")
GPU_TIER = TEST_DEVICE.startswith("cuda")


# Set by DeepSpeed's process-group setup in tests that train in this process; a subprocess that inherits
# them joins (or collides with) this process's group instead of starting its own.
RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


@pytest.fixture
def clean_env() -> dict[str, str]:
    """This process's environment without the rank variables, for subprocesses that start their own jobs."""
    return {key: value for key, value in os.environ.items() if key not in RANK_VARIABLES}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` skip, saying why, unless the gpu tier runs on a machine with CUDA."""
    if not GPU_TIER:
        reason = (
            "gpu tier: the CPU tier hides CUDA; run `make test-gpu` (UNIMM_TEST_DEVICE=cuda pytest -m gpu)"
        )
    elif not torch.cuda.is_available():
        reason = f"UNIMM_TEST_DEVICE={TEST_DEVICE} but torch {torch.__version__} sees no CUDA device"
    else:
        return
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device of the test tier: ``UNIMM_TEST_DEVICE`` (default ``cpu``; ``make test-gpu`` sets ``cuda``)."""
    return torch.device(TEST_DEVICE)


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def dataset_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One on-disk ``datasets`` cache shared by the tests of a session."""
    return str(tmp_path_factory.mktemp("datasets-cache"))


@pytest.fixture(scope="session")
def tiny_pipeline() -> UniMMPipeline:
    """Shared by many tests: do not change its components."""
    pipeline = build_random_pipeline("tiny", seed=0)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<{{ message['role'] }}> {{ message['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


@pytest.fixture
def tiny_chat_model() -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A tiny random Llama and a word-level chat tokenizer (words w0..w26)."""
    words = ["<pad>", "<eos>", "<unk>", "<user>", "<assistant>"] + [f"w{i}" for i in range(27)]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(words),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    return LlamaForCausalLM(config).eval(), tokenizer
