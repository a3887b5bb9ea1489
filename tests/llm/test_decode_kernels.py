import pytest
import torch
import torch.nn.functional as F

from unimm.llm import decode_kernels
from unimm.llm.decode_kernels import FusedDecodeMode, reduction_attention, rowwise_linear


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
        decode_kernels, "reduction_attention", lambda **kwargs: calls.append("attention") or torch.zeros(1)
    )
    weight = torch.randn(4, 6)
    query, key = torch.randn(1, 2, 1, 6), torch.randn(1, 2, 5, 6)
    with FusedDecodeMode(max_linear_rows=8, max_attention_queries=2):
        F.linear(torch.randn(2, 1, 6), weight)  # 2 rows: fused
        F.linear(torch.randn(3, 3, 6), weight)  # 9 rows: the library kernel
        torch.nn.Linear(6, 4)(torch.randn(8, 6))  # nn.Linear goes through F.linear: fused
        F.scaled_dot_product_attention(query, key, key)  # one query: fused
        F.scaled_dot_product_attention(query, key, key, is_causal=True)  # causal flag: library kernel
        F.scaled_dot_product_attention(query, key, key, dropout_p=0.1)  # dropout: library kernel
        F.scaled_dot_product_attention(torch.randn(1, 2, 3, 6), key, key)  # 3 queries: library kernel
    assert calls == ["linear", "linear", "attention"]
    F.linear(torch.randn(2, 6), weight)  # outside the mode: nothing swapped
    assert calls == ["linear", "linear", "attention"]


@pytest.mark.integration
def test_fused_decode_mode_compiles_to_the_same_values():
    """Inside ``torch.compile`` (where the decode loop uses it) the fused graph gives the eager values."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 8)

    def attend(hidden, key, value, mask):
        with FusedDecodeMode():
            query = layer(hidden).view(hidden.shape[0], 2, 1, 4)  # (B, H, 1, Dh)
            return F.scaled_dot_product_attention(query, key, value, attn_mask=mask)

    compiled = torch.compile(attend, fullgraph=True)
    hidden, key, value = torch.randn(2, 1, 16), torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4)
    mask = torch.tensor([[True] * 5, [True, False, True, True, False]]).view(2, 1, 1, 5)
    with torch.no_grad():
        expected = F.scaled_dot_product_attention(layer(hidden).view(2, 2, 1, 4), key, value, attn_mask=mask)
        torch.testing.assert_close(compiled(hidden, key, value, mask), expected, rtol=1e-5, atol=1e-5)
