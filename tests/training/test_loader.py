from __future__ import annotations

import torch

from unimm.training.loader import build_loader, move_to_device, set_position


class Numbers(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 40

    def __getitem__(self, index: int) -> int:
        return index


def _loader(rank: int = 0, world_size: int = 1, batch_size: int = 4):
    return build_loader(
        Numbers(),
        batch_size,
        torch.utils.data.default_collate,
        rank=rank,
        world_size=world_size,
        seed=3,
        shuffle=True,
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
