"""Tiny tokenizer fixtures: ``DualCodebookConfig.tiny()`` (16 codes, 16 px, 4x4 grid, 2-layer ViT teacher)."""

from __future__ import annotations

import pytest
import torch

from unimm.tokenizer import DualCodebookConfig, DualCodebookTokenizer


@pytest.fixture
def tiny_config() -> DualCodebookConfig:
    return DualCodebookConfig.tiny()


@pytest.fixture
def tiny_tokenizer(tiny_config: DualCodebookConfig) -> DualCodebookTokenizer:
    torch.manual_seed(0)
    return DualCodebookTokenizer(tiny_config)


@pytest.fixture
def pixel_values() -> torch.Tensor:
    """Two 16x24 images (a non-square 4x6 grid) in [-1, 1]."""
    generator = torch.Generator().manual_seed(1)
    return torch.rand(2, 3, 16, 24, generator=generator) * 2 - 1
