from __future__ import annotations

import pytest
import torch

from unimm.training.loader import build_loader, move_to_device, set_position


class Numbers(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 40

    def __getitem__(self, index: int) -> int:
        return index


def _loader(rank: int = 0, world_size: int = 1, batch_size: int = 4, **options):
    """A shuffling loader over ``Numbers``; ``options`` go to ``build_loader`` (lengths, group_batches)."""
    return build_loader(
        Numbers(),
        batch_size,
        torch.utils.data.default_collate,
        rank=rank,
        world_size=world_size,
        seed=3,
        shuffle=True,
        **options,
    )


def _epoch(loader, epoch: int, skip: int = 0) -> list[int]:
    set_position(loader, epoch, skip)
    return torch.cat(list(loader)).tolist()


def test_ranks_read_disjoint_shards_covering_the_epoch():
    shards = [_epoch(_loader(rank, world_size=2), epoch=0) for rank in range(2)]
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(40))


def test_epochs_are_reshuffled_and_reproducible():
    assert _epoch(_loader(), 0) != _epoch(_loader(), 1)
    assert _epoch(_loader(), 1) == _epoch(_loader(), 1)


def test_resumed_position_continues_the_same_order():
    full = _epoch(_loader(), epoch=2)
    assert _epoch(_loader(), epoch=2, skip=3) == full[3 * 4 :]


def test_loading_does_not_touch_the_global_random_stream():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    _epoch(_loader(), epoch=0)
    assert torch.equal(torch.rand(3), expected)


def test_move_to_device_casts_only_floating_tensors():
    batch = {"ids": torch.ones(2, dtype=torch.long), "pixels": [torch.ones(2)], "name": "x"}
    moved = move_to_device(batch, torch.device("cpu"), torch.bfloat16)
    assert moved["ids"].dtype == torch.long
    assert moved["pixels"][0].dtype == torch.bfloat16
    assert moved["name"] == "x"


LENGTHS = [(7 * index) % 37 + 3 for index in range(40)]  # 3..39, scattered over the indices


def _grouped_loader(rank: int = 0, world_size: int = 1, batch_size: int = 4, lengths=LENGTHS, **options):
    return _loader(rank, world_size, batch_size, lengths=lengths, **options)


def _padding(batches: list[list[int]]) -> int:
    """Padding positions if each batch is padded to its longest sample."""
    return sum(
        max(LENGTHS[i] for i in batch) * len(batch) - sum(LENGTHS[i] for i in batch) for batch in batches
    )


def test_grouped_batches_hold_similar_lengths_and_cover_the_epoch():
    set_position(plain := _loader(), 0, 0)
    set_position(grouped := _grouped_loader(), 0, 0)
    plain_batches = [batch.tolist() for batch in plain]
    grouped_batches = [batch.tolist() for batch in grouped]
    assert sorted(sum(grouped_batches, [])) == list(range(40))
    assert (_padding(plain_batches), _padding(grouped_batches)) == (441, 241)
    # 40 samples in batches of 4: groups of 2 batches (transformers' default for so few), each sorted longest
    # first; the longest sample of all is swapped to the very front.
    for start in range(0, 10, 2):
        lengths = [LENGTHS[i] for batch in grouped_batches[start : start + 2] for i in batch]
        assert sorted(lengths[1:], reverse=True) == lengths[1:]
    assert LENGTHS[grouped_batches[0][0]] == max(LENGTHS)


def test_group_batches_sets_how_many_batches_are_sorted_together():
    set_position(grouped := _grouped_loader(group_batches=5), 0, 0)
    batches = [batch.tolist() for batch in grouped]
    for start in (0, 5):
        lengths = [LENGTHS[i] for batch in batches[start : start + 5] for i in batch]
        assert sorted(lengths[1:], reverse=True) == lengths[1:]
    assert _padding(batches) < 241  # groups of 5 batches pad less than transformers' 2 for this epoch


def test_grouped_epochs_reshuffle_reproduce_and_resume():
    assert _epoch(_grouped_loader(), 0) != _epoch(_grouped_loader(), 1)
    full = _epoch(_grouped_loader(), 1)
    assert _epoch(_grouped_loader(), 1) == full
    assert _epoch(_grouped_loader(), 1, skip=3) == full[3 * 4 :]


def test_grouped_ranks_split_each_global_batch():
    """Two ranks with batches of 4 read the batches of 8 that one rank would, each every other sample."""
    shards = [_epoch(_grouped_loader(rank, world_size=2), epoch=0) for rank in range(2)]
    single = _epoch(_grouped_loader(batch_size=8), epoch=0)
    assert shards == [single[0::2], single[1::2]]


def test_lengths_must_match_the_dataset_and_a_shuffled_loader():
    with pytest.raises(ValueError, match="3 values for a dataset of 40"):
        _grouped_loader(lengths=[1, 2, 3])
    with pytest.raises(ValueError, match="unshuffled loader"):
        build_loader(Numbers(), 4, torch.utils.data.default_collate, rank=0, world_size=1, seed=3, shuffle=False,
                     lengths=LENGTHS)  # fmt: skip
