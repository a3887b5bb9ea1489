"""Shared fixtures: every test starts from the same seeds; a per-session dataset cache.

Tiny model configs live next to the tests of each subpackage (``tests/<pkg>/conftest.py``)."""

from __future__ import annotations

import os
import random

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


# Set by DeepSpeed's process-group setup in tests that train in this process; a subprocess that inherits
# them joins (or collides with) this process's group instead of starting its own.
RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


@pytest.fixture
def clean_env() -> dict[str, str]:
    """This process's environment without the rank variables, for subprocesses that start their own jobs."""
    return {key: value for key, value in os.environ.items() if key not in RANK_VARIABLES}


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
