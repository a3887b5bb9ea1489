"""Tiny detokenizer components: 16 codes, 16 px images on a 4×4 grid, a 2-level UNet of width 32."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from diffusers import DDIMScheduler

from unimm.detokenizer import DetokenizerPipeline, TokenDiffusionDecoder

CODEBOOK_SIZE = 16
SEMANTIC_CODE_DIM = 8
PIXEL_CODE_DIM = 4
DOWNSAMPLE_FACTOR = 4
IMAGE_SIZE = 16
GRID = IMAGE_SIZE // DOWNSAMPLE_FACTOR

TINY_UNET: dict[str, Any] = {
    "block_out_channels": (32, 32),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "attention_head_dim": 8,
    "cross_attention_dim": 32,
}


def make_decoder(seed: int = 0, **overrides: Any) -> TokenDiffusionDecoder:
    """A tiny decoder with a random codebook, deterministic for `seed`."""
    torch.manual_seed(seed)
    kwargs = {
        "codebook_size": CODEBOOK_SIZE,
        "semantic_code_dim": SEMANTIC_CODE_DIM,
        "pixel_code_dim": PIXEL_CODE_DIM,
        "downsample_factor": DOWNSAMPLE_FACTOR,
        "sample_size": IMAGE_SIZE,
        **TINY_UNET,
        **overrides,
    }
    decoder = TokenDiffusionDecoder(**kwargs)
    generator = torch.Generator().manual_seed(seed + 1)
    decoder.load_codebook(
        torch.randn(CODEBOOK_SIZE, SEMANTIC_CODE_DIM, generator=generator),
        torch.randn(CODEBOOK_SIZE, PIXEL_CODE_DIM, generator=generator),
    )
    return decoder.eval()


def make_tokenizer(seed: int = 0) -> Any:
    """A tiny random `DualCodebookTokenizer` on the same codebook sizes (its teacher a 2-layer ViT of width 32)."""
    from unimm.tokenizer import DualCodebookConfig, DualCodebookTokenizer

    torch.manual_seed(seed)
    teacher = {"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
    teacher.update(intermediate_size=64, image_size=IMAGE_SIZE, patch_size=4, num_channels=3)
    config = DualCodebookConfig(
        codebook_size=CODEBOOK_SIZE,
        semantic_code_dim=SEMANTIC_CODE_DIM,
        pixel_code_dim=PIXEL_CODE_DIM,
        downsample_factor=DOWNSAMPLE_FACTOR,
        image_size=IMAGE_SIZE,
        hidden_channels=16,
        channel_multipliers=[1, 1, 1],
        norm_num_groups=4,
        semantic_hidden_size=32,
        teacher_config=teacher,
    )
    return DualCodebookTokenizer(config).eval()


def make_pipeline(decoder: TokenDiffusionDecoder | None = None, **components: Any) -> DetokenizerPipeline:
    # Linear betas over 100 steps keep an untrained model's x0 estimates bounded (no saturated images).
    scheduler = components.pop("scheduler", None) or DDIMScheduler(num_train_timesteps=100, clip_sample=False)
    pipeline = DetokenizerPipeline(decoder=decoder or make_decoder(), scheduler=scheduler, **components)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def make_reconstructing_decoder(tokenizer: Any, seed: int = 0, **overrides: Any) -> TokenDiffusionDecoder:
    """A tiny decoder built from `tokenizer` that also sees its pixel decoder's image (condition_on_reconstruction)."""
    torch.manual_seed(seed)
    kwargs = {"sample_size": IMAGE_SIZE, "condition_on_reconstruction": True, **TINY_UNET, **overrides}
    return TokenDiffusionDecoder.from_tokenizer(tokenizer, **kwargs).eval()


@pytest.fixture(name="make_reconstructing_decoder")
def make_reconstructing_decoder_fixture() -> Any:
    return make_reconstructing_decoder


@pytest.fixture(name="tiny_unet")
def tiny_unet_fixture() -> dict[str, Any]:
    return dict(TINY_UNET)


@pytest.fixture(name="make_decoder")
def make_decoder_fixture() -> Any:
    """The `make_decoder` factory (test modules cannot import conftest under importlib mode)."""
    return make_decoder


@pytest.fixture(name="make_pipeline")
def make_pipeline_fixture() -> Any:
    return make_pipeline


@pytest.fixture(name="make_tokenizer")
def make_tokenizer_fixture() -> Any:
    return make_tokenizer


@pytest.fixture
def decoder() -> TokenDiffusionDecoder:
    return make_decoder()


@pytest.fixture
def image_token_ids() -> torch.Tensor:
    return torch.randint(0, CODEBOOK_SIZE, (2, GRID, GRID), generator=torch.Generator().manual_seed(7))
