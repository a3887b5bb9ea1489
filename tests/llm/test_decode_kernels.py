import importlib.util

import pytest
import torch
import torch.nn.functional as F

from unimm.llm import decode_kernels
from unimm.llm.decode_kernels import (
    PACKED_LINEAR_DTYPES,
    FusedDecodeMode,
    int8_dynamic_linear,
    is_int8_dynamic,
    packed_linear,
    packed_weight_cache,
    reduction_attention,
    rowwise_linear,
)

needs_onednn = pytest.mark.skipif(not PACKED_LINEAR_DTYPES, reason="this PyTorch build has no oneDNN")


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("with_bias", [False, True])
def test_rowwise_linear_matches_linear(rows, with_bias):
    generator = torch.Generator().manual_seed(rows)
    input = torch.randn(rows, 1, 32, generator=generator)  # (M, T, in), as in a decode step
    weight = torch.randn(16, 32, generator=generator)
    bias = torch.randn(16, generator=generator) if with_bias else None
    output = rowwise_linear(input, weight, bias)
    assert output.shape == (rows, 1, 16)
    torch.testing.assert_close(output, F.linear(input, weight, bias), rtol=1e-5, atol=1e-5)


def test_rowwise_linear_golden_value():
    input = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 0.0]])
    weight = torch.tensor([[1.0, 1.0], [2.0, -1.0]])
    expected = torch.tensor([[3.0, 0.0], [2.0, 7.0], [0.5, 1.0]])
    torch.testing.assert_close(rowwise_linear(input, weight, None), expected, rtol=0, atol=0)


@needs_onednn
@pytest.mark.parametrize("rows", [9, 16, 33])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_linear_matches_linear(rows, with_bias):
    generator = torch.Generator().manual_seed(rows)
    input = torch.randn(rows, 1, 32, generator=generator)  # (M, T, in)
    weight = torch.randn(48, 32, generator=generator)
    bias = torch.randn(48, generator=generator) if with_bias else None
    output = packed_linear(input, weight, bias)
    assert output.shape == (rows, 1, 48)
    torch.testing.assert_close(output, F.linear(input, weight, bias), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(
    torch.bfloat16 not in PACKED_LINEAR_DTYPES,
    reason="oneDNN's bf16 linear needs AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT, which this CPU lacks",
)
@pytest.mark.parametrize("rows", [9, 33])
def test_packed_linear_in_bf16_matches_linear(rows):
    generator = torch.Generator().manual_seed(rows)
    input = torch.randn(rows, 1, 32, generator=generator).bfloat16()  # (M, T, in)
    weight = torch.randn(48, 32, generator=generator).bfloat16()
    torch.testing.assert_close(
        packed_linear(input, weight, None), F.linear(input, weight), rtol=2e-2, atol=2e-2
    )


@needs_onednn
def test_packed_linear_golden_value():
    input = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 0.0]])
    weight = torch.tensor([[1.0, 1.0], [2.0, -1.0], [0.0, 4.0]])
    expected = torch.tensor([[3.0, 0.0, 8.0], [2.0, 7.0, -4.0], [0.5, 1.0, 0.0]])
    torch.testing.assert_close(packed_linear(input, weight, None), expected, rtol=0, atol=0)


@needs_onednn
def test_packed_weight_cache_keeps_copies_of_parameters_only_and_never_stale_ones():
    layer = torch.nn.Linear(8, 12, bias=False)
    weight = layer.weight
    input = torch.randn(10, 8)
    with torch.no_grad(), packed_weight_cache(layer):
        first = decode_kernels._packed_weight(weight)
        assert decode_kernels._packed_weight(weight) is first  # kept for the block
        # A slice is a new tensor object at each step of a compiled graph: found by address and layout.
        rows = decode_kernels._packed_weight(weight[4:10])
        assert decode_kernels._packed_weight(weight[4:10]) is rows and rows is not first
        torch.testing.assert_close(packed_linear(input, weight[4:10], None), F.linear(input, weight[4:10]))
        # A weight that is not a parameter (computed in the step, its address reusable) is never kept.
        computed = weight * 2
        assert decode_kernels._packed_weight(computed) is not decode_kernels._packed_weight(computed)
        torch.testing.assert_close(packed_linear(input, computed, None), F.linear(input, computed))
    assert getattr(decode_kernels._cache, "weights", None) is None  # the copies go with the block
    with torch.no_grad():
        weight.mul_(2)  # changed between two generation calls
    with torch.no_grad(), packed_weight_cache(layer):
        torch.testing.assert_close(packed_linear(input, weight, None), F.linear(input, weight))
    assert decode_kernels._packed_weight(weight) is not decode_kernels._packed_weight(weight)  # no block


@pytest.mark.parametrize("queries", [1, 2])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
@pytest.mark.parametrize("key_heads", [4, 2])
def test_reduction_attention_matches_sdpa(queries, mask_kind, key_heads):
    generator = torch.Generator().manual_seed(queries + key_heads)
    query = torch.randn(3, 4, queries, 8, generator=generator)  # (B, H, Q, Dh)
    key = torch.randn(3, key_heads, 10, 8, generator=generator)  # (B, H_kv, L, Dh)
    value = torch.randn(3, key_heads, 10, 8, generator=generator)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(3, 1, queries, 10, generator=generator) > 0.4
        mask[..., 0] = True  # every query sees at least one key
    elif mask_kind == "float":
        mask = torch.randn(3, 1, queries, 10, generator=generator)
    gqa = key_heads != query.shape[1]
    for scale in (None, 0.3):
        expected = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, scale=scale, enable_gqa=gqa
        )
        output = reduction_attention(query, key, value, mask, scale=scale, enable_gqa=gqa)
        torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)


def test_fused_decode_mode_swaps_only_few_row_linears_and_short_attention(monkeypatch):
    calls = []
    monkeypatch.setattr(
        decode_kernels, "rowwise_linear", lambda *args: calls.append("linear") or F.linear(*args)
    )
    monkeypatch.setattr(
        decode_kernels, "packed_linear", lambda *args: calls.append("packed") or F.linear(*args)
    )
    monkeypatch.setattr(
        decode_kernels, "reduction_attention", lambda **kwargs: calls.append("attention") or torch.zeros(1)
    )
    weight = torch.randn(4, 6)
    query, key = torch.randn(1, 2, 1, 6), torch.randn(1, 2, 5, 6)
    with FusedDecodeMode(max_linear_rows=8, max_attention_queries=2):
        F.linear(torch.randn(2, 1, 6), weight)  # 2 rows: fused
        F.linear(torch.randn(3, 3, 6), weight)  # 9 rows: oneDNN on a packed weight
        F.linear(torch.randn(3, 3, 6, dtype=torch.float64), weight.double())  # a dtype oneDNN lacks: library
        torch.nn.Linear(6, 4)(torch.randn(8, 6))  # nn.Linear goes through F.linear: fused
        F.scaled_dot_product_attention(query, key, key)  # one query: fused
        F.scaled_dot_product_attention(query, key, key, is_causal=True)  # causal flag: library kernel
        F.scaled_dot_product_attention(query, key, key, dropout_p=0.1)  # dropout: library kernel
        F.scaled_dot_product_attention(torch.randn(1, 2, 3, 6), key, key)  # 3 queries: library kernel
    packed = ["packed"] if PACKED_LINEAR_DTYPES else []
    assert calls == ["linear", *packed, "linear", "attention"]
    F.linear(torch.randn(2, 6), weight)  # outside the mode: nothing swapped
    assert calls == ["linear", *packed, "linear", "attention"]


@pytest.mark.integration
def test_fused_decode_mode_compiles_to_the_same_values():
    """Inside ``torch.compile`` (where the decode loop uses it) the fused graph gives the eager values, for few
    rows (reductions) and many (packed weights, including a slice of a weight as the head's image rows)."""
    torch.manual_seed(0)
    layer, head = torch.nn.Linear(16, 8), torch.nn.Linear(8, 10, bias=False)

    def attend(hidden, key, value, mask):
        with FusedDecodeMode():
            query = layer(hidden).view(hidden.shape[0], 2, 1, 4)  # (B, H, 1, Dh)
            attended = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)  # (B, H, 1, Dh)
            return F.linear(attended.reshape(hidden.shape[0], 1, 8), head.weight[3:])

    compiled = torch.compile(attend, fullgraph=True, dynamic=True)
    for batch in (2, 12):
        hidden = torch.randn(batch, 1, 16)
        key, value = torch.randn(batch, 2, 5, 4), torch.randn(batch, 2, 5, 4)  # (B, H, L, Dh)
        mask = torch.rand(batch, 1, 1, 5) > 0.3
        mask[..., 0] = True
        with torch.no_grad(), packed_weight_cache(torch.nn.ModuleList([layer, head])):
            query = layer(hidden).view(batch, 2, 1, 4)
            attended = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
            expected = F.linear(attended.reshape(batch, 1, 8), head.weight[3:])
            for _ in range(2):  # the second call finds the packed copies of the first
                torch.testing.assert_close(compiled(hidden, key, value, mask), expected, rtol=1e-5, atol=1e-5)
            if batch > decode_kernels.MAX_FUSED_LINEAR_ROWS and PACKED_LINEAR_DTYPES:
                assert len(decode_kernels._cache.weights.copies) == 2  # the layer's weight and the head slice


needs_torchao = pytest.mark.skipif(
    importlib.util.find_spec("torchao") is None, reason="torchao is not installed"
)


def _int8_layer(dtype: torch.dtype, dynamic: bool = True) -> torch.nn.Linear:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 48).to(dtype)
    quantize_(layer, Int8DynamicActivationInt8WeightConfig() if dynamic else Int8WeightOnlyConfig())
    return layer


@needs_torchao
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_dynamic_linear_is_torchao_s_own_product(dtype):
    """Parity with torchao's eager kernel, to the bit: the activation quantized by torchao's rule, an exact
    int32 accumulation, the same rescaling in the same order."""
    layer = _int8_layer(dtype)
    assert is_int8_dynamic(layer.weight)
    input = torch.randn(3, 5, 64, dtype=dtype)  # (B, T, in)
    expected = F.linear(input, layer.weight, layer.bias)  # torchao's kernel
    output = int8_dynamic_linear(input, layer.weight, layer.bias)
    assert output.shape == (3, 5, 48) and output.dtype == dtype
    torch.testing.assert_close(output, expected, rtol=0, atol=0)


@needs_torchao
def test_int8_dynamic_linear_golden_value():
    """torchao's symmetric rule: scale = max |row| / 127.5, values rounded (half to even) and clipped to
    [-128, 127]. Inputs [1, 2] and [-4, 0] become [64, 127] and [-127, 0] (-4 / (4 / 127.5) is -127.49999 in
    float32); weight rows [127.5, 0] and [127.5, -51] (scale 1) become [127, 0] and [127, -51]."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    layer = torch.nn.Linear(2, 2, bias=False)
    layer.weight.data = torch.tensor([[127.5, 0.0], [127.5, -51.0]])
    quantize_(layer, Int8DynamicActivationInt8WeightConfig())
    input = torch.tensor([[1.0, 2.0], [-4.0, 0.0]])
    products = torch.tensor([[64 * 127.0, 64 * 127.0 - 127 * 51], [-127 * 127.0, -127 * 127.0]])
    expected = products * torch.tensor([[2 / 127.5], [4 / 127.5]])
    torch.testing.assert_close(int8_dynamic_linear(input, layer.weight), expected, rtol=1e-6, atol=1e-5)


@needs_torchao
def test_fused_decode_mode_multiplies_int8_dynamic_weights_in_int8_only(monkeypatch):
    calls = []
    original = decode_kernels.int8_dynamic_linear
    monkeypatch.setattr(
        decode_kernels, "int8_dynamic_linear", lambda *args: calls.append("int8") or original(*args)
    )
    dynamic, weight_only = _int8_layer(torch.float32), _int8_layer(torch.float32, dynamic=False)
    with FusedDecodeMode():
        dynamic(torch.randn(2, 64))
        weight_only(torch.randn(2, 64))  # int8 by float: rowwise_linear
    assert calls == ["int8"]


@needs_torchao
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 8, 9])
def test_int8_weight_only_layers_run_as_rowwise_reductions_of_their_int8_values(monkeypatch, dtype, rows):
    calls = []
    original = decode_kernels.rowwise_linear
    monkeypatch.setattr(
        decode_kernels, "rowwise_linear", lambda *args: calls.append(args[1].dtype) or original(*args)
    )
    layer = _int8_layer(dtype, dynamic=False)
    assert decode_kernels.is_int8_per_row(layer.weight) and not is_int8_dynamic(layer.weight)
    input = torch.randn(rows, 1, 64, dtype=dtype)  # (M, T, in)
    expected = F.linear(input, layer.weight, layer.bias)  # torchao's kernel
    with FusedDecodeMode():
        output = layer(input)
    assert calls == ([torch.int8] if rows <= decode_kernels.MAX_FUSED_LINEAR_ROWS else [])
    assert output.shape == (rows, 1, 48) and output.dtype == dtype
    # The same sums in another order, in float32 (torchao's bfloat16 kernel rounds its products to bfloat16).
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(output, expected, **tolerance)


def test_rowwise_linear_sums_bfloat16_in_float32():
    """bfloat16 rows multiplied in float32 and rounded once: 1.0078125 * 1.0078125 + 1.0078125 * 1.015625 is
    2.0392456 in float32, 2.046875 in bfloat16; its products rounded to bfloat16 one by one (1.015625 and
    1.0234375) would sum to 2.03125."""
    input = torch.tensor([[1.0078125, 1.0078125]], dtype=torch.bfloat16)
    weight = torch.tensor([[1.0078125, 1.015625]], dtype=torch.bfloat16)
    output = rowwise_linear(input, weight, None)
    assert output.dtype == torch.bfloat16
    assert output.item() == 2.046875


@needs_torchao
@pytest.mark.integration
@pytest.mark.parametrize("rows", [1, 2, 32])
def test_int8_dynamic_linear_compiles_to_torchao_s_values(rows):
    layer = _int8_layer(torch.float32)

    def forward(input):
        with FusedDecodeMode():
            return layer(input)

    input = torch.randn(rows, 64)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(forward)(input), layer(input), rtol=0, atol=0)


@needs_torchao
@pytest.mark.integration
@pytest.mark.parametrize("rows", [1, 2])
def test_int8_weight_only_layers_compile_to_their_rowwise_values(rows):
    layer = _int8_layer(torch.bfloat16, dynamic=False)

    def forward(input):
        with FusedDecodeMode():
            return layer(input)

    input = torch.randn(rows, 64, dtype=torch.bfloat16)
    with torch.no_grad(), FusedDecodeMode():
        expected = layer(input)  # eager: rowwise_linear on the int8 values
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(forward)(input), expected, rtol=1e-2, atol=1e-2)
