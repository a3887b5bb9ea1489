import pytest
import torch

from unimm.llm.kv_cache import PreallocatedLayer, preallocated_cache


def test_preallocated_layer_matches_concatenation_and_refuses_overflow():
    layer = PreallocatedLayer(max_cache_len=5)
    first, second = torch.randn(2, 3, 3, 4), torch.randn(2, 3, 2, 4)  # (B, H, T, Dh)
    layer.update(first, first + 1)
    keys, values = layer.update(second, second + 1)
    torch.testing.assert_close(keys, torch.cat([first, second], dim=2), rtol=0, atol=0)
    torch.testing.assert_close(values, torch.cat([first, second], dim=2) + 1, rtol=0, atol=0)
    assert layer.get_seq_length() == 5
    with pytest.raises(ValueError, match="exceed the reserved 5"):
        layer.update(second[:, :, :1], second[:, :, :1])


def test_preallocated_cache_replaces_full_attention_layers(tiny):
    cache = preallocated_cache(tiny.config().text_config, max_cache_len=8)
    assert len(cache.layers) == 2 and all(isinstance(layer, PreallocatedLayer) for layer in cache.layers)
