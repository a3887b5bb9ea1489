"""Process-group setup through DeepSpeed: launched by ``deepspeed``/``torchrun`` or as one plain process.

Launchers export ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``; a plain
``python`` run has none, so we export the single-rank values ourselves (on a free port, so parallel
runs do not clash) and let DeepSpeed initialise the group as usual.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any

import deepspeed
import deepspeed.comm as dist
import torch
from deepspeed.accelerator import get_accelerator

logger = logging.getLogger(__name__)

LOCALHOST = "127.0.0.1"
SHM_OP_BUILDER = "ShareMemCommBuilder"  # DeepSpeed's CPU op for collectives, built on first use


def find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        return sock.getsockname()[1]


def init_distributed() -> None:
    """Initialise DeepSpeed's process group once (gloo on CPU, the accelerator's backend elsewhere)."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        single_rank = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": LOCALHOST}
        for key, value in single_rank.items():
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_PORT", str(find_free_port()))
    accelerator = get_accelerator()
    backend = "gloo" if accelerator.device_name() == "cpu" else accelerator.communication_backend_name()
    if accelerator.device_name() == "cpu":
        _announce_shm_op_build(accelerator)
    deepspeed.init_distributed(dist_backend=backend)


def _announce_shm_op_build(accelerator: Any) -> None:
    """DeepSpeed compiles its shared-memory op on a machine's first CPU run (with gcc; a minute or two)
    and says nothing meanwhile: say it, so the wait does not look like a hang."""
    builder = accelerator.create_op_builder(SHM_OP_BUILDER)
    if builder is None:
        return
    extensions = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))
    if not any(extensions.glob(f"*/{builder.NAME}/*.so")) and not any(
        extensions.glob(f"{builder.NAME}/*.so")
    ):
        logger.warning(
            "DeepSpeed is compiling %s (first CPU run on this machine only: a minute or two with gcc; "
            "cached under %s)",
            builder.NAME,
            extensions,
        )


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized() and world_size() > 1:
        dist.barrier()


def gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value`` (picklable), in rank order; ``[value]`` in a single process."""
    if world_size() == 1:
        return [value]
    gathered: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(gathered, value)  # DeepSpeed's comm wraps this same process group
    return gathered


def mean_over_ranks(values: dict[str, float], device: Any) -> dict[str, float]:
    """Average named floats over all ranks (every rank must pass the same keys)."""
    if world_size() == 1 or not values:
        return dict(values)
    keys = sorted(values)
    tensor = torch.tensor([float(values[key]) for key in keys], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return {key: float(value) / world_size() for key, value in zip(keys, tensor.tolist())}
