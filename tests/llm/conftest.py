"""Tiny shared fixtures for the unified LLM: backbone configs, models and an offline text tokenizer."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

from unimm.llm import UniMMConfig, UniMMForCausalLM

TEXT_VOCAB = 64
CODEBOOK = 16
MAX_GRID = 4
SPECIAL = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}

WORDS = [
    "a",
    "an",
    "the",
    "of",
    "is",
    "what",
    "this",
    "picture",
    "image",
    "draw",
    "show",
    "me",
    "cat",
    "dog",
    "shirt",
    "shoe",
    "bag",
    "red",
    "blue",
    "green",
    "small",
    "big",
    "emoji",
    "face",
    "smiling",
    "please",
    "here",
    "it",
]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def text_config(kind: str, tied: bool = False):
    common = dict(vocab_size=TEXT_VOCAB, tie_word_embeddings=tied, **SPECIAL)
    if kind == "llama":
        return LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, **common,
        )  # fmt: skip
    if kind == "qwen2":
        return Qwen2Config(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, **common,
        )  # fmt: skip
    if kind == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, **common)
    raise ValueError(kind)


def tiny_config(kind: str = "llama", tied: bool = False, **overrides) -> UniMMConfig:
    fields = dict(
        codebook_size=CODEBOOK, max_grid_height=MAX_GRID, max_grid_width=MAX_GRID,
        default_grid_height=2, default_grid_width=3,
    )  # fmt: skip
    fields.update(overrides)
    return UniMMConfig(text_config=text_config(kind, tied), **fields)


def tiny_model(
    kind: str = "llama",
    tied: bool = False,
    seed: int = 0,
    attn_implementation: str | None = None,
    **overrides,
) -> UniMMForCausalLM:
    config = tiny_config(kind, tied, **overrides)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return UniMMForCausalLM(config).eval()


@pytest.fixture(scope="session")
def text_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer built offline; ids 0-2 are pad/bos/eos as in the tiny configs."""
    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    vocab = {token: index for index, token in enumerate(specials + WORDS + ["?", "."])}
    assert len(vocab) <= TEXT_VOCAB
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": specials[4:]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


class TinyFactory:
    """Builders and constants of the tiny setup, handed to tests as the ``tiny`` fixture (tests cannot
    import ``conftest`` under pytest's importlib mode)."""

    text_vocab = TEXT_VOCAB
    codebook = CODEBOOK
    max_grid = MAX_GRID
    text_config = staticmethod(text_config)
    config = staticmethod(tiny_config)
    model = staticmethod(tiny_model)


@pytest.fixture(scope="session")
def tiny() -> TinyFactory:
    return TinyFactory()
