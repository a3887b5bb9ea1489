"""Packing: many tokenized samples into fixed-length rows, with no attention across samples.

A packed row is the samples' ``input_ids`` one after another, with ``position_ids`` that restart at 0
for every sample and ``labels`` whose first token of every sample is ``-100``, so no token learns to
predict the next sample (the same layout as transformers' ``DataCollatorWithFlattening``).

The restarting ``position_ids`` are all the model needs to keep attention inside each sample; no mask is
built. transformers (5.x) derives the per-sample blocks from them on the device, for every backend:
eager, sdpa and flex build a block-causal mask from them (``masking_utils.find_packed_sequence_indices``);
flash attention runs its varlen kernel, from the position ids when the batch is one row, else from the
``cu_seq_lens_*`` / ``max_length_*`` arguments ``PackedCollator(flash_attention=True)`` adds. transformers
looks for packed rows only when the model runs **without a KV cache** (with one, the samples silently attend
to each other), so every packed batch carries ``use_cache=False``. A block mask built here instead would be
a (B, 1, T, T) tensor, 64 MiB per row in fp32 at T=4096, which flash attention cannot take.

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
# The arguments of flash attention's varlen kernel, as transformers' attention layers take them.
FLASH_VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


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

    Returns ``input_ids``, ``labels`` and ``position_ids`` (B, T), and ``use_cache=False`` (the samples
    are kept apart only without a cache; see the module docstring). Padding forms its own pseudo-sample
    (positions from 0, labels ``-100``), so it attends to nothing real. ``flash_attention=True`` adds
    flash attention's varlen arguments (``flash_varlen_kwargs``), computed here on the host so the model's
    step does not wait for them."""

    def __init__(self, max_length: int, pad_token_id: int, flash_attention: bool = False) -> None:
        self.max_length = max_length
        self.pad_token_id = pad_token_id
        self.flash_attention = flash_attention

    def __call__(self, rows: Sequence[dict[str, Sequence[int]]]) -> dict[str, Any]:
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
        tensors: dict[str, Any] = {
            column: torch.tensor(values, dtype=torch.long) for column, values in batch.items()
        }  # (B, T)
        if self.flash_attention:
            tensors.update(flash_varlen_kwargs(tensors["position_ids"]))
        return {**tensors, "use_cache": False}


def sequence_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """Where a packed sample starts (B, T), as transformers reads it: positions that do not count up by one."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts  # (B, T)


def sequence_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Index of the packed sample each token belongs to (B, T), counted from 0 in every row."""
    return sequence_starts(position_ids).long().cumsum(dim=1) - 1  # (B, T)


def flash_varlen_kwargs(position_ids: torch.Tensor) -> dict[str, Any]:
    """``cu_seq_lens_q/k`` (int32, one entry per sample plus the end) and ``max_length_q/k`` of packed rows.

    They describe the batch flattened to one sequence of B·T tokens, which is how transformers' flash
    attention runs varlen with them for any B (from ``position_ids`` alone it does so only for B = 1)."""
    starts = sequence_starts(position_ids).flatten()  # (B·T,): every row starts a sample
    bounds = torch.cat([starts.nonzero().flatten(), torch.tensor([starts.numel()], device=starts.device)])
    cu_seq_lens = bounds.to(torch.int32)  # (samples + 1,)
    max_length = int(cu_seq_lens.diff().max())
    return dict(zip(FLASH_VARLEN_KEYS, (cu_seq_lens, cu_seq_lens, max_length, max_length)))
