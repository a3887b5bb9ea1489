"""The ONNX -> Dinov2Model weight mapping, on the layout torch.onnx.export writes (no onnx package needed)."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from unimm.conversion.onnx_dinov2 import (
    MASK_TOKEN,
    check_config,
    dinov2_config_from_weights,
    dinov2_from_onnx_weights,
    dinov2_image_processor,
)


def _assert_same_model(converted, original) -> None:
    original_state = original.state_dict()
    for name, value in converted.state_dict().items():
        if name != MASK_TOKEN:
            torch.testing.assert_close(value, original_state[name], rtol=0, atol=0, msg=name)
    size = original.config.image_size
    pixel_values = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = original(pixel_values).last_hidden_state
        actual = converted(pixel_values).last_hidden_state
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.mark.parametrize("legacy_names", [True, False], ids=["transformers4-names", "transformers5-names"])
@pytest.mark.parametrize("prefix", ["backbone", ""], ids=["prefixed", "bare"])
def test_mapping_restores_every_weight(tiny_dinov2, fake_export, legacy_names: bool, prefix: str) -> None:
    weights = fake_export(tiny_dinov2, prefix=prefix, legacy_names=legacy_names)
    converted = dinov2_from_onnx_weights(weights, prefix=prefix, num_attention_heads=2)
    _assert_same_model(converted, tiny_dinov2)


def test_config_is_read_off_the_shapes(tiny_dinov2, fake_export) -> None:
    config = dinov2_config_from_weights(fake_export(tiny_dinov2), num_attention_heads=2)
    expected = tiny_dinov2.config
    for key in ("hidden_size", "num_hidden_layers", "mlp_ratio", "patch_size", "image_size", "num_channels"):
        assert getattr(config, key) == getattr(expected, key), key


def test_heads_default_to_dinov2_head_dim(make_dinov2, fake_export) -> None:
    model = make_dinov2(hidden_size=128, num_attention_heads=2)
    assert dinov2_config_from_weights(fake_export(model)).num_attention_heads == 2  # 128 / 64


def test_other_architecture_is_rejected_with_its_names(tiny_dinov2, fake_export) -> None:
    weights = fake_export(tiny_dinov2)
    weights.initializers = {"resnet.conv1.weight": np.zeros((8, 3, 7, 7), np.float32)}
    with pytest.raises(
        ValueError, match=r"not the ONNX export of a DINOv2 ViT.*backbone\.embeddings\.cls_token.*resnet"
    ):
        dinov2_from_onnx_weights(weights)


def test_wrong_prefix_is_rejected(tiny_dinov2, fake_export) -> None:
    with pytest.raises(ValueError, match="under prefix 'model'"):
        dinov2_from_onnx_weights(fake_export(tiny_dinov2), prefix="model")


def test_missing_linear_weight_is_named(tiny_dinov2, fake_export) -> None:
    weights = fake_export(tiny_dinov2)
    del weights.node_inputs["/backbone/encoder/layer.1/mlp/fc2/MatMul"]
    with pytest.raises(
        ValueError, match=r"1 DINOv2 parameters not found.*encoder\.layer\.1\.mlp\.fc2\.weight"
    ):
        dinov2_from_onnx_weights(weights, num_attention_heads=2)


def test_non_square_position_grid_is_rejected(tiny_dinov2, fake_export) -> None:
    weights = fake_export(tiny_dinov2)
    patch_name = weights.node_inputs["/backbone/embeddings/Reshape_1"][0]
    weights.initializers[patch_name] = weights.initializers[patch_name][:, :-1]
    with pytest.raises(ValueError, match="do not form a square grid"):
        dinov2_from_onnx_weights(weights)


def test_heads_that_do_not_divide_hidden_fail_clearly(tiny_dinov2, fake_export) -> None:
    with pytest.raises(ValueError, match="multiple of the number of attention heads"):
        dinov2_from_onnx_weights(fake_export(tiny_dinov2), num_attention_heads=3)


def test_expected_config_mismatch_names_the_fields(tiny_dinov2) -> None:
    with pytest.raises(ValueError, match=r"different DINOv2 architecture: hidden_size=32 \(expected 384\)"):
        check_config(tiny_dinov2.config, {"hidden_size": 384, "patch_size": 4}, "tiny.onnx")


def test_image_processor_gives_dinov2_inputs() -> None:
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8))
    pixel_values = dinov2_image_processor()(image, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, 224, 224)
    assert -3 < float(pixel_values.mean()) < 3


def test_missing_class_position_embedding_is_named(tiny_dinov2, fake_export) -> None:
    weights = fake_export(tiny_dinov2)
    del weights.node_inputs["/backbone/embeddings/Concat_6"]
    with pytest.raises(ValueError, match=r"expected one \(1, 1, 32\).*found shapes \[\(1, 16, 32\)\]"):
        dinov2_from_onnx_weights(weights, num_attention_heads=2)
