"""Backbone features for the linear probe, on a tiny random Dinov2Model."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model

from unimm.evaluation.linear_probe import backbone_features

IMAGE_SIZE = 16


@pytest.fixture
def tiny_backbone() -> Dinov2Model:
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, patch_size=4, image_size=IMAGE_SIZE
    )
    return Dinov2Model(config).eval()


def _images(count: int) -> list[PIL.Image.Image]:
    rng = np.random.default_rng(0)
    return [PIL.Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)) for _ in range(count)]


def test_features_are_class_token_and_mean_patch(tiny_backbone) -> None:
    images = _images(5)
    processor = BitImageProcessorPil()
    features = backbone_features(tiny_backbone, processor, images, IMAGE_SIZE, batch_size=2)
    assert features.shape == (5, 2 * tiny_backbone.config.hidden_size) and features.dtype == torch.float32
    # the whole image is kept (no crop): the same pixels the processor gives at this size
    size, crop = {"shortest_edge": IMAGE_SIZE}, {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    pixel_values = processor(images, size=size, crop_size=crop, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        hidden = tiny_backbone(pixel_values=pixel_values).last_hidden_state  # (5, 1 + N, 32)
    expected = torch.cat([hidden[:, 0], hidden[:, 1:].mean(1)], dim=-1)
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)


def test_features_do_not_depend_on_batch_size(tiny_backbone) -> None:
    images, processor = _images(5), BitImageProcessorPil()
    one_batch = backbone_features(tiny_backbone, processor, images, IMAGE_SIZE, batch_size=5)
    small_batches = backbone_features(tiny_backbone, processor, images, IMAGE_SIZE, batch_size=2)
    torch.testing.assert_close(one_batch, small_batches, rtol=1e-5, atol=1e-5)
