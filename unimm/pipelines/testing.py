"""Random pipelines for tests, benchmarks and the serving code: every component untrained, built offline.

``build_random_pipeline("tiny")`` is the unit-test size (hidden 32, 2 layers, 16 codes, 16 px);
``"demo"`` has the shapes of the demo model (1024 codes, 32 px images on an 8x8 grid, a 4-layer LM) for
speed measurements. ``python scripts/build_tiny_checkpoint.py OUTPUT`` saves one as a checkpoint folder.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from diffusers import DDIMScheduler
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, PreTrainedTokenizerFast

from unimm.data.demo_datasets import FASHION_MNIST_CAPTION_NAMES
from unimm.detokenizer import DetokenizerPipeline, TokenDiffusionDecoder
from unimm.llm import UniMMConfig, UniMMForCausalLM, UniMMProcessor
from unimm.tokenizer import DualCodebookConfig, DualCodebookImageProcessor, DualCodebookTokenizer

from .pipeline_unimm import UniMMPipeline

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
WORDS = [
    "a", "an", "the", "of", "is", "what", "this", "photo", "picture", "image", "emoji", "draw", "show", "me",
    "face", "smiling", "cat", "dog", "red", "blue", "green", "small", "big", "it", "please", "here", "?", ".",
]  # fmt: skip
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)

# Per size: the visual tokenizer's named config, the LM backbone, the grids, the diffusion UNet.
RANDOM_PIPELINE_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "tokenizer": "tiny",
        "text_vocab_size": 64,
        "backbone": dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256,
        ),
        "max_grid": 8,
        "unet": dict(
            block_out_channels=(32, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=8,
            attention_head_dim=8, cross_attention_dim=32,
        ),
        "num_train_timesteps": 100,
    },
    "demo": {
        "tokenizer": "demo",
        "text_vocab_size": 128,
        "backbone": dict(
            hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=1024,
        ),
        "max_grid": 16,
        # As recipes/detokenizer/fashion_mnist.yaml: attention only at the 8x8 level, v-prediction.
        "unet": dict(
            block_out_channels=(32, 64, 64),
            down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"), layers_per_block=1,
            norm_num_groups=16, attention_head_dim=32, cross_attention_dim=64, prediction_type="v_prediction",
        ),
        "num_train_timesteps": 1000,
    },
}  # fmt: skip


def build_text_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer built offline (ids 0-2 pad/BOS/EOS) with a prefix-stable chat template."""
    class_words = [word for name in FASHION_MNIST_CAPTION_NAMES for word in re.findall(r"\w+|[^\w\s]+", name)]
    words = SPECIAL_TOKENS + WORDS + class_words
    vocab = {word: index for index, word in enumerate(dict.fromkeys(words))}
    if len(vocab) > vocab_size:
        raise ValueError(f"the word list has {len(vocab)} entries, more than text vocab size {vocab_size}")
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[4:]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_random_pipeline(size: str = "tiny", seed: int = 0, prompt_format: str = "chat") -> UniMMPipeline:
    """A pipeline of untrained components of the named size, the same weights for the same ``seed``."""
    if size not in RANDOM_PIPELINE_SIZES:
        raise ValueError(f"size must be one of {sorted(RANDOM_PIPELINE_SIZES)}, got {size!r}")
    spec = RANDOM_PIPELINE_SIZES[size]
    with torch.random.fork_rng():  # seed the weights without touching the caller's random state
        torch.manual_seed(seed)
        # 1. Visual tokenizer and its image processor.
        visual_tokenizer = DualCodebookTokenizer(DualCodebookConfig.named(spec["tokenizer"])).eval()
        image_processor = DualCodebookImageProcessor.from_tokenizer_config(visual_tokenizer.config)
        grid = visual_tokenizer.config.grid_size
        # 2. Language model with the image vocabulary, and its processor.
        text_tokenizer = build_text_tokenizer(spec["text_vocab_size"])
        backbone = LlamaConfig(
            vocab_size=spec["text_vocab_size"],
            pad_token_id=text_tokenizer.pad_token_id,
            bos_token_id=text_tokenizer.bos_token_id,
            eos_token_id=text_tokenizer.eos_token_id,
            **spec["backbone"],
        )
        config = UniMMConfig(
            text_config=backbone,
            codebook_size=visual_tokenizer.config.codebook_size,
            max_grid_height=spec["max_grid"],
            max_grid_width=spec["max_grid"],
            default_grid_height=grid,
            default_grid_width=grid,
        )
        llm = UniMMForCausalLM(config).eval()
        processor = UniMMProcessor.from_config(config, text_tokenizer, image_processor)
        # 3. Diffusion detokenizer on the tokenizer's codebook.
        decoder = TokenDiffusionDecoder.from_tokenizer(
            visual_tokenizer, sample_size=visual_tokenizer.config.image_size, **spec["unet"]
        ).eval()
        scheduler = DDIMScheduler(
            num_train_timesteps=spec["num_train_timesteps"],
            prediction_type=decoder.config.prediction_type,
            clip_sample=False,
        )
        detokenizer = DetokenizerPipeline(decoder=decoder, scheduler=scheduler)
    return UniMMPipeline(
        llm=llm,
        processor=processor,
        visual_tokenizer=visual_tokenizer,
        detokenizer=detokenizer,
        prompt_format=prompt_format,
    )
