"""Quantized language-model weights, through transformers' own quantization configs (torchao).

A choice is a name, resolved here only, into a transformers ``TorchAoConfig``:

- ``"int8"``: int8 weights with one scale per output row (torchao ``Int8WeightOnlyConfig``); CPU and CUDA,
  activations in any dtype.
- ``"int8-dynamic"``: the same int8 weights, and each activation row quantized to int8 as it comes (one
  symmetric scale per row; torchao ``Int8DynamicActivationInt8WeightConfig``), so the products are int8 by int8
  (VNNI on x86 CPUs). The compiled CPU engine runs them through ``torch._int_mm`` above 8 rows and as fused
  reductions of the int8 values at fewer (:func:`unimm.llm.decode_kernels.int8_dynamic_linear`), where int8
  weight-only weights go too.
- ``"int4"``: int4 weights with a scale and zero point per 64 inputs (torchao ``Int4WeightOnlyConfig``,
  tinygemm's tile-packed layout); CUDA with compute capability 8.0 or later, computes in bfloat16.

The linear layers of the backbone are quantized; the embeddings and the output head keep the model's dtype
(transformers' default for torchao). Measured on the demo model, teacher-forced over images it generated: int8
layers move the image-code distribution from float32's by a KL of 4e-5, a quantized head as well by 7e-5,
bfloat16 weights by 1.6e-4; with no quality to choose by, the head keeps the default, which leaves the engine's
image-row slice of the head a plain tensor. Activations stay in the model's dtype (weight-only quantization):
a quantized model takes the same inputs and returns logits of the same dtype. ``benchmarks/quantization.py``
measures speed, memory and quality against float32 and bfloat16.

    llm = load_quantized_llm("checkpoints/demo/llm", "int8")
    pipe = UniMMPipeline.from_pretrained("checkpoints/demo", llm=llm)

A quantized model saves with ``save_pretrained`` (its config records the quantization, the weights are written
in torchao's safetensors format) and loads back quantized with ``from_pretrained`` where torchao is installed.
A transformers quantization config object (a ``TorchAoConfig`` of your own, a ``BitsAndBytesConfig``) passes
through unchanged.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from transformers import TorchAoConfig
from transformers.utils.quantization_config import QuantizationConfigMixin

from unimm.llm import UniMMForCausalLM

logger = logging.getLogger(__name__)

QUANTIZATION_CHOICES = ("int8", "int8-dynamic", "int4")
# Inputs per int4 group: 64 divides the hidden sizes of more small models than torchao's default of 128
# (SmolLM2-135M: 576, the demo model: 192); a layer whose input size it does not divide stays unquantized.
INT4_GROUP_SIZE = 64
INSTALL_HINT = "pip install 'unimm[quantization]'"


def quantization_config(
    quantization: str | QuantizationConfigMixin, device: str | torch.device | None = None
) -> QuantizationConfigMixin:
    """The transformers quantization config of a named choice (:data:`QUANTIZATION_CHOICES`) for weights
    that will live on ``device`` (default: the CPU); a config object is returned as it is."""
    if isinstance(quantization, QuantizationConfigMixin):
        return quantization
    if quantization not in QUANTIZATION_CHOICES:
        raise ValueError(
            f"quantization must be one of {QUANTIZATION_CHOICES} or a config, got {quantization!r}"
        )
    device = torch.device(device if device is not None else "cpu")
    if quantization == "int4":
        _check_int4_device(device)
    try:
        from torchao.quantization import (
            Int4WeightOnlyConfig,
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
        )
    except ImportError as error:
        raise ImportError(f"quantization={quantization!r} needs torchao: {INSTALL_HINT}") from error
    if quantization == "int8":
        return TorchAoConfig(quant_type=Int8WeightOnlyConfig())
    if quantization == "int8-dynamic":
        return TorchAoConfig(quant_type=Int8DynamicActivationInt8WeightConfig())
    return TorchAoConfig(
        quant_type=Int4WeightOnlyConfig(group_size=INT4_GROUP_SIZE, int4_packing_format="tile_packed_to_4d")
    )


def load_quantized_llm(
    pretrained_model_name_or_path: str | os.PathLike,
    quantization: str | QuantizationConfigMixin,
    dtype: torch.dtype | None = torch.float32,
    device: str | torch.device | None = None,
    **kwargs: Any,
) -> UniMMForCausalLM:
    """``UniMMForCausalLM.from_pretrained`` with its weights quantized as they load, on ``device`` (the
    weights are quantized where they will run). ``dtype`` is that of activations and of the unquantized
    weights (int4 computes in bfloat16 whatever it says); other keyword arguments (``attn_implementation``,
    ``subfolder``, ...) go to ``from_pretrained``."""
    config = quantization_config(quantization, device)
    if quantization == "int4" and dtype != torch.bfloat16:
        logger.info("int4 weights compute in bfloat16: loading the language model in bfloat16, not %s", dtype)
        dtype = torch.bfloat16
    if device is not None:
        kwargs.setdefault("device_map", str(torch.device(device)))
    model = UniMMForCausalLM.from_pretrained(
        pretrained_model_name_or_path, dtype=dtype, quantization_config=config, **kwargs
    )
    if isinstance(quantization, str) and not quantized_parameters(model):
        raise ValueError(
            f"quantization={quantization!r} found no linear layer to quantize in this "
            f"{model.config.text_config.model_type!r} backbone (torchao quantizes torch.nn.Linear weights; "
            "GPT-2's Conv1D layers, for one, are not): load it without quantization"
        )
    return model


def is_quantized(model: torch.nn.Module) -> bool:
    """Whether ``model`` was loaded with a transformers quantization config."""
    return getattr(model, "hf_quantizer", None) is not None


def quantized_parameters(model: torch.nn.Module) -> list[str]:
    """Names of the parameters held as quantized tensors (tensor subclasses such as torchao's)."""
    return [
        name
        for name, parameter in model.named_parameters()
        if type(parameter) not in (torch.Tensor, torch.nn.Parameter)
    ]


def _check_int4_device(device: torch.device) -> None:
    if device.type != "cuda":
        raise ValueError(
            f"quantization='int4' runs on CUDA only (torchao's int4 kernel), not on {device.type!r}: "
            "pass a CUDA device, or use quantization='int8' on this device"
        )
    if not torch.cuda.is_available():
        raise ValueError("quantization='int4' needs a CUDA device, and torch sees none")
    major, _ = torch.cuda.get_device_capability(device)
    if major < 8:
        raise ValueError(
            f"quantization='int4' needs a GPU of compute capability 8.0 or later (Ampere), got {major}.x: "
            "use quantization='int8'"
        )


__all__ = [
    "QUANTIZATION_CHOICES",
    "is_quantized",
    "load_quantized_llm",
    "quantization_config",
    "quantized_parameters",
]
