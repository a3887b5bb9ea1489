"""The CPU decode step's linear layers and attention as reductions that ``torch.compile`` fuses.

A decode step multiplies a handful of rows (one per sequence, two with guidance) by every weight of the
model and attends with one query per row over the KV cache, so it is bound by how fast the weights and the
cache stream from memory. On a CPU the library kernels behind ``F.linear`` and
``F.scaled_dot_product_attention`` are built for large matrices: the BLAS treats two rows as a general
matrix product and streams a weight at a fraction of the memory bandwidth (a quarter of it on the 2-core
AMD EPYC of ``benchmarks/generation.py``), and the flash-attention kernel runs a small matrix product per
head. Written as plain reductions (one per row over the same weight; scores, softmax and the weighted sum
of values for attention), ``torch.compile`` fuses them into vectorised loops that read each weight and
cache once. Above a few rows the matrix products are bound by arithmetic instead, and oneDNN's kernel on a
weight reordered once into its blocked layout (:func:`packed_linear`) runs them at nearly twice the BLAS's
rate. Weights quantized with int8 activations as well (torchao's ``Int8DynamicActivationInt8WeightConfig``) are
multiplied by ``torch._int_mm`` (:func:`int8_dynamic_linear`), which oneDNN runs with the CPU's int8 dot-product
instructions, instead of torchao's compiled CPU path, a float32 matrix product (at a few rows, as reductions too;
so are int8 weight-only weights, read as int8). :class:`FusedDecodeMode` makes
these swaps while it is active; the values are the same sums in another order.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch._inductor import inductor_prims
from torch.overrides import TorchFunctionMode

# Above this many rows the BLAS kernel wins again: on the EPYC, the 29 linears of the benchmark's default
# model took 2.7 against 4.6 ms as fused reductions at 8 rows, and 6.6 against 5.5 ms at 16.
MAX_FUSED_LINEAR_ROWS = 8
# Weight dtypes oneDNN's packed linear takes on this CPU, where this PyTorch build has oneDNN: bf16 needs AVX-512
# (BW/VL/DQ) or AVX-NE-CONVERT. Asked once here: dynamo cannot trace the questions inside a graph.
PACKED_LINEAR_DTYPES = (
    (torch.float32, *((torch.bfloat16,) if torch.ops.mkldnn._is_mkldnn_bf16_supported() else ()))
    if torch.backends.mkldnn.is_available()
    else ()
)
# Queries per row up to which attention is written out (a decode step feeds one or two tokens).
MAX_FUSED_ATTENTION_QUERIES = 2


def rowwise_linear(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    weight_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear`` as one reduction per row of ``input`` ``(..., in)``: ``weight`` ``(out, in)``, float or
    int8 with ``weight_scale`` ``(out,)`` (an int8 row times its scale is the weight). The rows are padded with
    zeros to the next power of two, so that a compiled graph serves a range of row counts (1, 2, 3-4, 5-8, ...)
    instead of one each. Products and sums are float32 whatever the dtypes (the result is cast back to
    ``input``'s), the input converted before it is padded: inductor computes a bfloat16 product in float32
    anyway and rounds it back to bfloat16 before it sums, and skipping that made 30 MLP blocks of SmolLM2-135M
    at two rows 1.24-1.34x as fast (``benchmarks/decode_kernels.py``; converted after the padding, no
    faster)."""
    rows = input.reshape(-1, input.shape[-1]).float()  # (M, in)
    count = rows.shape[0]
    bucket = 1
    while bucket < count:  # comparisons, not the value itself: dynamo guards on the range only
        bucket *= 2
    # Zeros of the bucket's full size, then a slice: a padding of size bucket - count would be 0 or 1 for
    # some counts, sizes that dynamo specialises.
    padded = torch.cat([rows, rows.new_zeros(bucket, rows.shape[1])])[:bucket]  # (bucket, in)
    output = torch.stack([(row * weight).sum(-1) for row in padded.unbind(0)])[:count]  # (M, out) float32
    if weight_scale is not None:
        output = output * weight_scale
    if bias is not None:
        output = output + bias
    return output.to(input.dtype).reshape(*input.shape[:-1], weight.shape[0])


@dataclass
class _PackedWeights:
    # addresses of the storages of the module's parameters
    parameter_storages: set[int]
    # (address, shape, strides, dtype) of a weight -> its packed copy
    copies: dict[tuple, torch.Tensor] = field(default_factory=dict)


# Per thread: the active `packed_weight_cache` block's copies, or None.
_cache = threading.local()


@contextlib.contextmanager
def packed_weight_cache(module: nn.Module) -> Iterator[None]:
    """Keep the packed copies :func:`packed_linear` makes of ``module``'s parameters (and of slices of them)
    until the block ends, one generation call during which the parameters neither change nor go away. Other
    weights, such as one computed inside the step, are packed anew at every call. Like inductor's weight
    freezing, the copies sit next to the weights: while the block runs, the linear weights the compiled CPU
    step multiplies take twice their memory."""
    previous = getattr(_cache, "weights", None)
    _cache.weights = _PackedWeights(
        {parameter.untyped_storage().data_ptr() for parameter in module.parameters() if is_plain(parameter)}
    )
    try:
        yield
    finally:
        _cache.weights = previous


def _packed_weight(weight: torch.Tensor) -> torch.Tensor:
    """oneDNN's reordered copy of ``weight`` (an ``mkldnn`` tensor), kept by the active
    :func:`packed_weight_cache` when ``weight`` lies in a parameter's storage. Keyed by address and layout, not
    by tensor: inside a compiled graph a slice of a weight, such as the head's image rows, is a new view at
    every call."""
    weights = getattr(_cache, "weights", None)
    kept = weights is not None and weight.untyped_storage().data_ptr() in weights.parameter_storages
    key = (weight.data_ptr(), weight.shape, weight.stride(), weight.dtype)
    packed = weights.copies.get(key) if kept else None
    if packed is None:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
        if kept:
            weights.copies[key] = packed
    return packed


# `packed_linear` as a plain operator with a CPU kernel: the compiled step calls it as one opaque kernel (its
# packed copy is an `mkldnn` tensor, which a graph cannot take as an input). `torch.library.custom_op` wraps every
# call in autograd and dispatch layers that inference does not need: 10 us a call around the kernel against 5 us
# here, which made 16 guided images of the demo model's size 2-6% slower to generate.
_LIBRARY = torch.library.Library("unimm", "FRAGMENT")
_LIBRARY.define("packed_linear(Tensor input, Tensor weight, Tensor? bias) -> Tensor")


def _packed_linear_cpu(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    rows = input.reshape(-1, input.shape[-1]).contiguous()  # (M, in)
    output = torch.ops.mkldnn._linear_pointwise(rows, _packed_weight(weight), bias, "none", [], "")
    return output.reshape(*input.shape[:-1], weight.shape[0])


_LIBRARY.impl("packed_linear", _packed_linear_cpu, "CPU")


@torch.library.register_fake("unimm::packed_linear", lib=_LIBRARY)
def _(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return input.new_empty(*input.shape[:-1], weight.shape[0])


def packed_linear(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear`` through oneDNN on a packed copy of ``weight`` (kept for the duration of a
    :func:`packed_weight_cache` block), as the operator ``torch.ops.unimm.packed_linear``. Inference only (no
    gradient)."""
    return torch.ops.unimm.packed_linear(input, weight, bias)


# `torch._int_mm` as an operator the compiled step calls as it is: inductor would otherwise lower it to its own
# int32 loops, and torchao's compiled CPU path multiplies the int8 values as float32 instead.
_LIBRARY.define("int8_matmul(Tensor input, Tensor weight) -> Tensor")


def _int8_matmul_cpu(input: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch._int_mm(input, weight.t())


_LIBRARY.impl("int8_matmul", _int8_matmul_cpu, "CPU")


@torch.library.register_fake("unimm::int8_matmul", lib=_LIBRARY)
def _(input: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return input.new_empty(input.shape[0], weight.shape[0], dtype=torch.int32)


def is_int8_dynamic(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is torchao's int8 tensor with symmetric dynamic activation quantization and nothing
    else applied to its inputs (no pre-scale, no static scale): the case :func:`int8_dynamic_linear` computes."""
    quant_kwargs = getattr(weight, "act_quant_kwargs", None)
    if quant_kwargs is None or type(weight).__name__ != "Int8Tensor":
        return False
    return (
        quant_kwargs.mapping_type.name == "SYMMETRIC"
        and getattr(weight, "act_pre_scale", None) is None
        and getattr(weight, "act_quant_scale", None) is None
        and list(weight.block_size) == [1, weight.shape[-1]]  # one scale per output row
    )


def is_int8_per_row(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is torchao's int8 weight-only tensor (``Int8WeightOnlyConfig``) with one scale per
    output row: the weight is its int8 values times their row's scale, the case :func:`rowwise_linear`
    computes."""
    return (
        type(weight).__name__ == "Int8Tensor"
        and getattr(weight, "act_quant_kwargs", None) is None
        and getattr(weight, "act_pre_scale", None) is None
        and list(weight.block_size) == [1, weight.shape[-1]]
    )


def int8_dynamic_linear(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, max_rows: int = 0
) -> torch.Tensor:
    """``F.linear`` of a float ``input`` ``(..., in)`` and a torchao int8 ``weight`` with dynamic activation
    quantization (:func:`is_int8_dynamic`): the input quantized by torchao's own rule, an int8 by int8 product
    accumulated in int32 (exact; up to ``max_rows`` rows as :func:`rowwise_linear` reductions), then torchao's
    rescaling, in its order."""
    from torchao.quantization.quantize_.common.quantize_tensor_kwargs import (
        _choose_quant_func_and_quantize_tensor,
    )

    rows = input.reshape(-1, input.shape[-1])  # (M, in)
    quantized = _choose_quant_func_and_quantize_tensor(rows, weight.act_quant_kwargs)
    if rows.shape[0] <= max_rows:
        # A few rows: the int8 products as float32 reductions, which inductor fuses into one pass over the
        # weight (oneDNN's int8 product reorders the whole weight at every call: 1.39-1.48x against it for
        # 30 MLP blocks of SmolLM2-135M at two rows, benchmarks/decode_kernels.py). Exact while a row's
        # partial sums stay below 2^24 (any input of up to 1,040 features). A float input, so that the sums
        # come back as float32 rather than cast to int8.
        products = rowwise_linear(quantized.qdata.float(), weight.qdata, None)  # (M, out) float32
    else:
        products = torch.ops.unimm.int8_matmul(quantized.qdata, weight.qdata)  # (M, out) int32
    scaled = (products.to(quantized.scale.dtype) * quantized.scale.reshape(-1, 1)).to(input.dtype)
    output = scaled * weight.scale.flatten()
    if bias is not None:
        output = output + bias
    return output.to(input.dtype).reshape(*input.shape[:-1], weight.shape[0])


def reduction_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` (no dropout, no causal flag) as reductions: ``query``
    ``(B, H, Q, Dh)``, ``key`` / ``value`` ``(B, H_kv, L, Dh)``, a bool (``True`` = attend) or additive
    ``attn_mask`` broadcastable to ``(B, H, Q, L)``."""
    if enable_gqa and key.shape[1] != query.shape[1]:
        groups = query.shape[1] // key.shape[1]
        key = key.repeat_interleave(groups, dim=1)  # (B, H, L, Dh); compiled, an index into the cache
        value = value.repeat_interleave(groups, dim=1)
    scale = 1 / math.sqrt(query.shape[-1]) if scale is None else scale
    # A buffer of its own in the compiled graph: left as an expression (projection, rotary embedding), inductor
    # recomputes the query, cos and sin included, for every key position of the score loop (1.7 against 1.1 ms
    # per layer at 32 rows). Eager, a no-op.
    query = query.contiguous()
    query = inductor_prims.force_stride_order(query, query.stride())
    scores = (query[:, :, :, None, :] * key[:, :, None]).sum(-1) * scale  # (B, H, Q, L)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    weights = scores.softmax(-1)
    return (weights[..., None] * value[:, :, None]).sum(-2).to(query.dtype)  # (B, H, Q, Dh)


class FusedDecodeMode(TorchFunctionMode):
    """While active, on the CPU: ``F.linear`` of at most ``max_linear_rows`` rows (all dimensions of the
    input but the last) runs as :func:`rowwise_linear` (torchao's int8 weight-only weights too), of more rows
    as :func:`packed_linear` (float32 and bfloat16 where PyTorch has oneDNN), of int8 weights with dynamic int8
    activations as :func:`int8_dynamic_linear`, and ``F.scaled_dot_product_attention`` with at most
    ``max_attention_queries`` queries, no dropout and no causal flag as :func:`reduction_attention`.
    Meant to be entered inside a ``torch.compile``d function (eager, the many small ops are slower than
    the library kernels). A fused linear's row count is specialised to its power-of-two bucket: each bucket
    compiles its own graph."""

    def __init__(
        self,
        max_linear_rows: int = MAX_FUSED_LINEAR_ROWS,
        max_attention_queries: int = MAX_FUSED_ATTENTION_QUERIES,
    ):
        super().__init__()
        self.max_linear_rows = max_linear_rows
        self.max_attention_queries = max_attention_queries

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            input, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            # A quantized weight (torchao's int8 and int4 tensors are subclasses) runs its own kernel, but for
            # int8 by int8 products on a CPU.
            few_rows = input.numel() <= self.max_linear_rows * input.shape[-1]
            if input.device.type == "cpu" and not is_plain(weight):
                if is_int8_dynamic(weight):
                    return int8_dynamic_linear(input, weight, bias, self.max_linear_rows)
                if few_rows and is_int8_per_row(weight):
                    return rowwise_linear(input, weight.qdata, bias, weight.scale.flatten())
            elif input.device.type == "cpu":
                if few_rows:
                    return rowwise_linear(input, weight, bias)
                if _packs(input, weight):
                    return packed_linear(input, weight, bias)
        elif func is F.scaled_dot_product_attention:
            fused = self._attention_arguments(*args, **kwargs)
            if fused is not None:
                return reduction_attention(**fused)
        return func(*args, **kwargs)

    def _attention_arguments(
        self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
    ) -> dict | None:
        if (
            query.device.type != "cpu"
            or dropout_p
            or is_causal
            or query.shape[-2] > self.max_attention_queries
        ):
            return None
        return dict(
            query=query, key=key, value=value, attn_mask=attn_mask, scale=scale, enable_gqa=enable_gqa
        )


def is_plain(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a plain tensor or parameter, not a subclass with its own storage and kernels
    (torchao's quantized weights): only plain weights are multiplied by this module's kernels."""
    return type(tensor) in (torch.Tensor, nn.Parameter)


def _packs(input: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        weight.dtype in PACKED_LINEAR_DTYPES
        and input.dtype == weight.dtype
        and weight.layout == torch.strided
    )


__all__ = [
    "FusedDecodeMode",
    "int8_dynamic_linear",
    "is_int8_dynamic",
    "is_int8_per_row",
    "packed_linear",
    "packed_weight_cache",
    "reduction_attention",
    "rowwise_linear",
]
