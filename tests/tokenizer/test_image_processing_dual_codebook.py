from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor

from unimm.tokenizer import DualCodebookConfig, DualCodebookImageProcessor


@pytest.fixture
def processor() -> DualCodebookImageProcessor:
    return DualCodebookImageProcessor.from_tokenizer_config(DualCodebookConfig.tiny())


def test_resize_to_target_and_normalise(processor):
    image = Image.fromarray(np.full((30, 20, 3), 255, dtype=np.uint8))
    pixel_values = processor(image, return_tensors="pt").pixel_values
    assert pixel_values.shape == (1, 3, 16, 16) and pixel_values.dtype == torch.float32
    torch.testing.assert_close(
        pixel_values, torch.ones_like(pixel_values)
    )  # white -> +1 with mean = std = 0.5


@pytest.mark.parametrize(
    ("size", "image_hw", "expected_hw"),
    [(None, (30, 21), (32, 20)), (None, (3, 3), (4, 4)), ({"shortest_edge": 16}, (50, 33), (24, 16))],
)
def test_any_aspect_ratio_snaps_to_the_grid(processor, size, image_hw, expected_hw):
    image = Image.new("RGB", image_hw[::-1])
    pixel_values = processor(image, size=size, return_tensors="pt").pixel_values
    assert tuple(pixel_values.shape[-2:]) == expected_hw


def test_grayscale_and_rgba_become_rgb(processor):
    gray = Image.fromarray(np.full((16, 16), 0, dtype=np.uint8), mode="L")
    assert processor(gray, return_tensors="pt").pixel_values.shape == (1, 3, 16, 16)
    transparent = Image.new("RGBA", (16, 16), (0, 0, 0, 0))  # alpha 0 -> composited on white
    pixel_values = processor(transparent, return_tensors="pt").pixel_values
    assert pixel_values.shape == (1, 3, 16, 16)
    torch.testing.assert_close(pixel_values, torch.ones_like(pixel_values))


def test_postprocess_inverts_preprocess_exactly(processor):
    array = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    pixel_values = processor(Image.fromarray(array), size=None, return_tensors="pt").pixel_values
    (restored,) = processor.postprocess(pixel_values)
    assert restored.size == (24, 16)
    np.testing.assert_array_equal(np.asarray(restored), array)
    assert processor.postprocess(pixel_values, output_type="np").shape == (1, 16, 24, 3)


def test_bad_requests_raise_clear_errors(processor):
    with pytest.raises(ValueError, match="multiples of downsample_factor=4"):
        processor(Image.new("RGB", (16, 16)), size={"height": 18, "width": 16}, return_tensors="pt")
    with pytest.raises(ValueError, match="cannot be stacked"):
        processor([Image.new("RGB", (16, 16)), Image.new("RGB", (32, 16))], size=None, return_tensors="pt")
    with pytest.raises(ValueError, match="output_type"):
        processor.postprocess(torch.zeros(1, 3, 4, 4), output_type="jpeg")


def test_save_and_load_through_auto_image_processor(processor, tmp_path):
    DualCodebookConfig.tiny().save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, DualCodebookImageProcessor)
    assert loaded.downsample_factor == 4 and (loaded.size.height, loaded.size.width) == (16, 16)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 20, 3), dtype=np.uint8))
    torch.testing.assert_close(
        loaded(image, return_tensors="pt").pixel_values, processor(image, return_tensors="pt").pixel_values
    )
