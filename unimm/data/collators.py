"""Collators for tokenized examples, and the CFG text dropout applied to samples before tokenizing.

``PaddingCollator`` pads examples (``input_ids`` and optional ``labels``) to the longest in the batch;
packed rows use ``unimm.data.packing.PackedCollator``. Both work on token ids only: turning samples
into ids is the processor's job (``unimm.llm.UniMMProcessor``).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch

from unimm.data.packing import IGNORE_INDEX
from unimm.data.schema import drop_text

PADDING_SIDES = ("right", "left")


class PaddingCollator:
    """Pad ``input_ids`` (with ``pad_token_id``) and ``labels`` (with ``-100``) to one length.

    Returns ``input_ids``, ``attention_mask`` (1 on real tokens) and ``labels`` (B, T); without
    labels in the examples, ``labels`` are the ``input_ids`` with padding ignored. ``padding_side="left"``
    suits batched generation; ``pad_to_multiple_of`` rounds T up (tensor-core friendly shapes)."""

    def __init__(
        self, pad_token_id: int, padding_side: str = "right", pad_to_multiple_of: int | None = None
    ) -> None:
        if padding_side not in PADDING_SIDES:
            raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(example["input_ids"]) for example in examples)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of  # round up
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for example in examples:
            input_ids = list(example["input_ids"])
            labels = example.get("labels")
            labels = list(labels) if labels is not None else input_ids
            padding = length - len(input_ids)
            batch["input_ids"].append(self._pad(input_ids, self.pad_token_id, padding))
            batch["attention_mask"].append(self._pad([1] * len(input_ids), 0, padding))
            batch["labels"].append(self._pad(labels, IGNORE_INDEX, padding))
        return {name: torch.tensor(values, dtype=torch.long) for name, values in batch.items()}  # (B, T)

    def _pad(self, values: list[int], pad_value: int, padding: int) -> list[int]:
        pad = [pad_value] * padding
        return values + pad if self.padding_side == "right" else pad + values


def shared_prefix_length(batch: dict[str, torch.Tensor]) -> int:
    """How many leading positions every row of a padded batch shares (same token, none padding) with no target
    among them nor at the position after them: what a loss-only forward may run once for all rows
    (``UniMMForCausalLM``'s ``shared_prefix_length``). Chat rows share their template's system prompt."""
    input_ids, labels = batch["input_ids"], batch["labels"]  # (B, T)
    same = (input_ids == input_ids[:1]).all(dim=0)  # (T,)
    mask = batch.get("attention_mask")
    if mask is not None:
        same &= mask.bool().all(dim=0)
    no_target = (labels == IGNORE_INDEX).all(dim=0)  # (T,)
    leading_same, leading_untargeted = (int(flags.long().cumprod(0).sum()) for flags in (same, no_target))
    return max(min(leading_same, leading_untargeted - 1, input_ids.shape[1] - 1), 0)


class TextDropout:
    """Classifier-free guidance training: with ``probability``, a sample becomes ``drop_text(sample)``.

    Apply it to text-to-image samples only (it does not look at the task). The decision depends on
    ``(seed, key)`` alone, e.g. the sample's index and epoch, so it is the same after a resume and in
    every data-loader worker."""

    def __init__(self, probability: float, seed: int = 0) -> None:
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"probability must be in [0, 1], got {probability}")
        self.probability = probability
        self.seed = seed

    def drops(self, key: int | str) -> bool:
        return random.Random(f"{self.seed}:{key}").random() < self.probability

    def __call__(self, sample: dict[str, Any], key: int | str) -> dict[str, Any]:
        return drop_text(sample) if self.drops(key) else sample
