"""Packing: many tokenized samples into fixed-length rows, with no attention across samples.

A packed row is the samples' ``input_ids`` one after another, with ``position_ids`` that restart at 0
for every sample and ``labels`` whose first token of every sample is ``-100``, so no token learns to
predict the next sample (the same layout as transformers' ``DataCollatorWithFlattening``).

Two ways to keep attention inside each sample (``PackedCollator(attention=...)``):

- ``"4d"`` (default): the batch carries the block-diagonal causal mask (B, 1, T, T) in additive form;
  transformers uses a 4D mask as given, so this works with eager and sdpa attention whatever else the
  call passes. Costs T² mask entries per row.
- ``"position_ids"``: no mask; transformers (5.x) derives the blocks from the restarting
  ``position_ids`` (eager/sdpa/flex) or takes flash-attention's varlen path. It does so only when the
  model runs **without a cache**: call the model with ``use_cache=False`` (its config defaults to
  ``True`` even in training, and with a cache the samples silently attend to each other).

Samples are placed by best-fit decreasing within windows of ``window_size`` samples, so a dataset of
any size packs in one pass with bounded memory; a sample longer than ``max_length`` is skipped and
counted (``too_long``), never cut (a cut would split an image's rows).
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import datasets
import torch

from unimm.data.bad_records import MISSING_FIELD, TOO_LONG, BadRecordError, BadRecords

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
PACKED_COLUMNS = ("input_ids", "labels", "position_ids")


def plan_packs(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Group sample indices into packs of total length ``<= max_length`` (best-fit decreasing).

    Every index whose length fits appears in exactly one pack; longer ones in none."""
    order = sorted(
        (index for index, length in enumerate(lengths) if 0 < length <= max_length), key=lambda i: -lengths[i]
    )
    packs: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free space, pack index), sorted
    for index in order:
        slot = bisect.bisect_left(free, (lengths[index], -1))
        if slot == len(free):  # no pack has room: open one
            packs.append([index])
            remaining, pack_index = max_length - lengths[index], len(packs) - 1
        else:
            space, pack_index = free.pop(slot)
            packs[pack_index].append(index)
            remaining = space - lengths[index]
        bisect.insort(free, (remaining, pack_index))
    return packs


def pack_examples(
    examples: Iterable[dict[str, Any]],
    max_length: int,
    window_size: int = 10_000,
    bad_records: BadRecords | None = None,
) -> Iterator[dict[str, list[int]]]:
    """Packed rows (``input_ids``, ``labels``, ``position_ids``) from tokenized examples.

    An example has ``input_ids`` and optionally ``labels`` (``-100`` where no loss is wanted; default:
    the ``input_ids``). Too-long examples go to ``bad_records``, reported when the examples run out."""
    tally = bad_records if bad_records is not None else BadRecords()
    window: list[dict[str, Any]] = []
    for example in examples:
        window.append(example)
        if len(window) == window_size:
            yield from _pack_window(window, max_length, tally)
            window = []
    if window:
        yield from _pack_window(window, max_length, tally)
    tally.log("packing")


def pack_dataset(
    dataset: datasets.Dataset | datasets.IterableDataset,
    max_length: int,
    window_size: int = 10_000,
    **map_options: Any,
) -> datasets.Dataset | datasets.IterableDataset:
    """``pack_examples`` as a batched ``map`` over a tokenized dataset (lazily for an ``IterableDataset``).

    Other columns are dropped; too-long examples are counted and logged per window."""
    columns = dataset.column_names
    return dataset.map(
        _pack_batch,
        batched=True,
        batch_size=window_size,
        remove_columns=columns,
        fn_kwargs={"max_length": max_length},
        **map_options,
    )


def _pack_batch(batch: dict[str, list], max_length: int) -> dict[str, list]:
    examples = [dict(zip(batch, values)) for values in zip(*batch.values())]
    bad_records = BadRecords()
    rows = list(_pack_window(examples, max_length, bad_records))
    if bad_records.total:
        logger.warning("packing: %s", bad_records.report())
    return {column: [row[column] for row in rows] for column in PACKED_COLUMNS}


def _pack_window(window: list[dict[str, Any]], max_length: int, bad_records: BadRecords):
    lengths = [len(example["input_ids"]) for example in window]
    for index, length in enumerate(lengths):
        location = f"example {index} of a packing window"
        if length > max_length:
            bad_records.add(
                BadRecordError(TOO_LONG, f"{length} tokens, more than max_length={max_length}", location)
            )
        elif length == 0:
            bad_records.add(BadRecordError(MISSING_FIELD, "no input_ids", location))
    for pack in plan_packs(lengths, max_length):
        yield _concatenate([window[index] for index in pack])


def _concatenate(examples: list[dict[str, Any]]) -> dict[str, list[int]]:
    row: dict[str, list[int]] = {column: [] for column in PACKED_COLUMNS}
    for example in examples:
        input_ids = list(example["input_ids"])
        labels = example.get("labels")
        labels = list(labels) if labels is not None else input_ids
        if len(labels) != len(input_ids):
            raise ValueError(f"labels ({len(labels)}) and input_ids ({len(input_ids)}) differ in length")
        row["input_ids"] += input_ids
        row["labels"] += [
            IGNORE_INDEX,
            *labels[1:],
        ]  # the first token is not predicted from the previous sample
        row["position_ids"] += list(range(len(input_ids)))
    return row


class PackedCollator:
    """Stack packed rows into a batch padded to ``max_length``.

    Returns ``input_ids``, ``labels`` and ``position_ids`` (B, T). Padding forms its own pseudo-sample
    (positions from 0, labels ``-100``), so it attends to nothing real. With ``attention="4d"`` the
    batch also holds ``attention_mask`` (B, 1, T, T): 0 where a token may attend, the minimum of
    ``mask_dtype`` (use the model's dtype) elsewhere. With ``attention="position_ids"`` the model must
    be called with ``use_cache=False`` (see the module docstring)."""

    ATTENTION_MODES = ("position_ids", "4d")

    def __init__(
        self,
        max_length: int,
        pad_token_id: int,
        attention: str = "4d",
        mask_dtype: torch.dtype = torch.float32,
    ) -> None:
        if attention not in self.ATTENTION_MODES:
            raise ValueError(f"attention must be one of {self.ATTENTION_MODES}, got {attention!r}")
        self.max_length = max_length
        self.pad_token_id = pad_token_id
        self.attention = attention
        self.mask_dtype = mask_dtype

    def __call__(self, rows: Sequence[dict[str, Sequence[int]]]) -> dict[str, torch.Tensor]:
        batch = {column: [] for column in PACKED_COLUMNS}
        for row in rows:
            padding = self.max_length - len(row["input_ids"])
            if padding < 0:
                raise ValueError(
                    f"a packed row of {len(row['input_ids'])} tokens exceeds max_length={self.max_length}"
                )
            batch["input_ids"].append([*row["input_ids"], *[self.pad_token_id] * padding])
            batch["labels"].append([*row["labels"], *[IGNORE_INDEX] * padding])
            batch["position_ids"].append([*row["position_ids"], *range(padding)])
        tensors = {
            column: torch.tensor(values, dtype=torch.long) for column, values in batch.items()
        }  # (B, T)
        if self.attention == "4d":
            tensors["attention_mask"] = block_causal_mask(tensors["position_ids"], self.mask_dtype)
        return tensors


def sequence_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Index of the packed sample each token belongs to (B, T): a new sample starts where positions restart."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts.long().cumsum(dim=1) - 1  # (B, T)


def block_causal_mask(position_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive attention mask (B, 1, T, T): causal within each packed sample, blocked across samples."""
    ids = sequence_ids(position_ids)
    same_sample = ids[:, :, None] == ids[:, None, :]  # (B, T, T), query along dim 1, key along dim 2
    # Within one sample positions count up by one, so "key position <= query position" is causal order.
    causal = position_ids[:, None, :] <= position_ids[:, :, None]  # (B, T, T)
    allowed = (same_sample & causal)[:, None]  # (B, 1, T, T)
    zero = torch.zeros((), dtype=dtype, device=position_ids.device)
    blocked = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=position_ids.device)
    return torch.where(allowed, zero, blocked)
