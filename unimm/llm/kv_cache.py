"""A KV cache with ``DynamicCache`` semantics and no per-step concatenation.

transformers' ``DynamicCache`` concatenates every new key/value onto the whole cache, which copies the
cache once per step; ``StaticCache`` avoids the copy but attends over its full preallocated length. The
decode loop knows its longest row up front, so :class:`PreallocatedLayer` reserves the buffer once, writes
each step in place and hands attention a view of the filled prefix only.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedConfig
from transformers.cache_utils import DynamicCache, DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values are views of buffers of ``max_cache_len`` positions."""

    def __init__(self, max_cache_len: int):
        super().__init__()
        self.max_cache_len = max_cache_len
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        batch_size, num_heads = key_states.shape[:2]
        self.key_buffer = key_states.new_zeros(
            batch_size, num_heads, self.max_cache_len, key_states.shape[-1]
        )
        self.value_buffer = value_states.new_zeros(
            batch_size, num_heads, self.max_cache_len, value_states.shape[-1]
        )
        self.keys, self.values = self.key_buffer[:, :, :0], self.value_buffer[:, :, :0]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.max_cache_len:
            raise ValueError(f"PreallocatedLayer: {end} positions exceed the reserved {self.max_cache_len}.")
        self.key_buffer[:, :, self.length : end] = key_states
        self.value_buffer[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]  # (B, H, end, Dh)
        return self.keys, self.values


def set_cache_length(cache: DynamicCache, length: int) -> None:
    """Set how many positions every :class:`PreallocatedLayer` of ``cache`` holds (the next write goes to
    ``length``). The compiled decode step calls it with the length as an argument, so ``torch.compile``
    traces the length as a symbolic input instead of baking each step's value into a new graph."""
    for layer in cache.layers:
        if isinstance(layer, PreallocatedLayer):
            layer.length = length


def preallocated_cache(config: PreTrainedConfig, max_cache_len: int) -> DynamicCache:
    """A ``DynamicCache`` for ``config`` whose full-attention layers are :class:`PreallocatedLayer`; layers
    of other kinds (sliding window, ...) keep transformers' own implementation."""
    cache = DynamicCache(config=config)
    cache.layers = [
        PreallocatedLayer(max_cache_len) if type(layer) is DynamicLayer else layer for layer in cache.layers
    ]
    return cache
