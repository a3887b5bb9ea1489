"""Data loaders whose position can be saved and restored exactly.

The order of an epoch is a pure function of ``(seed, epoch)`` (``DistributedSampler``), each rank
reads its own disjoint shard of it, and a resumed run starts at the first sample it has not seen.
The loader draws its worker seeds from its own generator, never from the global torch RNG, so
creating a loader mid-epoch on resume leaves the model's random stream (dropout) exactly where the
uninterrupted run had it.

Batches bound for an accelerator are collated into pinned (page-locked) host memory and copied with
``non_blocking=True``, so the copy overlaps the device's work instead of stalling the step; on the CPU
neither applies and batches are used as collated.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from transformers.trainer_pt_utils import get_length_grouped_indices


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` that can skip the first ``start_index`` samples of this rank's shard.

    Given the samples' ``lengths`` (and ``batch_size``), a shuffled epoch groups samples of similar length
    into the same batches: transformers' ``get_length_grouped_indices`` over the global batch (every rank's
    batch ``i`` comes from the same sorted run; ``group_batches`` batches sorted at a time), seeded by ``(seed,
    epoch)`` as the plain order is."""

    def __init__(
        self,
        *args: Any,
        lengths: Sequence[int] | None = None,
        batch_size: int = 1,
        group_batches: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if lengths is not None and len(lengths) != len(self.dataset):
            raise ValueError(f"lengths: {len(lengths)} values for a dataset of {len(self.dataset)} samples")
        self.lengths, self.batch_size, self.group_batches = lengths, batch_size, group_batches
        self.start_index = 0

    def __iter__(self) -> Iterator[int]:
        if self.lengths is None or not self.shuffle:
            indices = list(super().__iter__())
        else:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            grouped = get_length_grouped_indices(
                self.lengths, self.batch_size * self.num_replicas, self.group_batches, generator
            )
            indices = grouped[: self.total_size]  # drop_last: the shuffled loader's only mode
            indices = indices[self.rank : self.total_size : self.num_replicas]
        return iter(indices[self.start_index :])

    def __len__(self) -> int:
        return max(self.num_samples - self.start_index, 0)


def build_loader(
    dataset: Dataset,
    batch_size: int,
    collate_fn: Callable,
    *,
    rank: int,
    world_size: int,
    seed: int,
    shuffle: bool,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    lengths: Sequence[int] | None = None,
    group_batches: int | None = None,
) -> DataLoader:
    """A loader over this rank's shard; training loaders shuffle and drop the last partial batch.

    ``device``: where the batches go; an accelerator's batches come in pinned memory. ``lengths``: the
    samples' lengths, to batch similar lengths together (a shuffling loader), sorted ``group_batches`` batches
    at a time (``None``: transformers' default)."""
    if len(dataset) < world_size * (batch_size if shuffle else 1):
        raise ValueError(
            f"dataset has {len(dataset)} samples, fewer than one batch per rank "
            f"({world_size} rank(s) x batch size {batch_size})"
        )
    if lengths is not None and not shuffle:
        raise ValueError("lengths group a shuffled epoch's batches; an unshuffled loader keeps its order")
    sampler = ResumableDistributedSampler(
        dataset,
        num_replicas=world_size,
        rank=rank,
        shuffle=shuffle,
        seed=seed,
        drop_last=shuffle,
        lengths=lengths,
        batch_size=batch_size,
        group_batches=group_batches,
    )
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        drop_last=shuffle,
        num_workers=num_workers,
        generator=generator,
        pin_memory=device is not None and is_accelerator(device),
    )


def set_position(loader: DataLoader, epoch: int, batches_consumed: int) -> None:
    """Point ``loader`` at ``epoch``, after its first ``batches_consumed`` batches."""
    loader.sampler.set_epoch(epoch)
    loader.generator.manual_seed(loader.sampler.seed + epoch)  # worker seeds depend on the epoch only
    loader.sampler.start_index = batches_consumed * loader.batch_size


def is_accelerator(device: torch.device | str) -> bool:
    """Whether ``device`` is anything but the host (cuda, xpu, npu, ...)."""
    return torch.device(device).type != "cpu"


def move_to_device(batch: Any, device: torch.device, float_dtype: torch.dtype | None = None) -> Any:
    """Move every tensor of a (nested) batch to ``device``; floating tensors optionally cast.

    Copies to an accelerator do not block the host (from pinned memory they run asynchronously; kernels that
    read the result wait for them). Copies to the CPU block: the host may read them at once."""
    if isinstance(batch, torch.Tensor):
        dtype = float_dtype if float_dtype is not None and batch.is_floating_point() else None
        return batch.to(device=device, dtype=dtype, non_blocking=is_accelerator(device))
    if isinstance(batch, dict):
        return {key: move_to_device(value, device, float_dtype) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(value, device, float_dtype) for value in batch)
    return batch
