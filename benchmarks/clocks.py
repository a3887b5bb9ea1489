"""How the speed benchmarks time work on the device they run on (``--device``).

On a CPU the main clock is this process's CPU time: with one torch thread it is the work done, which other
jobs on a shared machine barely disturb; the wall clock is read beside it. On CUDA kernels run asynchronously:
the clock is read only after the device has finished the queued work, and the main clock is the wall clock
(CPU time there measures only the host launching kernels). Torch's CPU threads are pinned on the CPU only.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        default="cpu",
        help="torch device: cpu, cuda, cuda:1 (default: cpu; CUDA runs time wall clock)",
    )


@dataclass(frozen=True)
class Clock:
    """``read()`` -> ``(main seconds, wall seconds)`` on ``device``; ``unit`` names the main clock's second."""

    device: torch.device

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def unit(self) -> str:
        return "s" if self.is_cuda else "CPU-s"

    def read(self) -> tuple[float, float]:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)
            now = time.perf_counter()
            return now, now
        return time.process_time(), time.perf_counter()

    def time(self, function, *args) -> tuple[float, float]:
        """``(main seconds, wall seconds)`` that ``function(*args)`` took."""
        start = self.read()
        function(*args)
        end = self.read()
        return end[0] - start[0], end[1] - start[1]

    def pin_threads(self, threads: int | None) -> None:
        """Torch's CPU threads, on a CPU only (a CUDA run's host threads are left as they are)."""
        if threads and not self.is_cuda:
            torch.set_num_threads(threads)

    def describe(self) -> str:
        if self.is_cuda:
            return f"{torch.cuda.get_device_name(self.device)}, wall clock after synchronizing"
        return f"CPU, torch threads {torch.get_num_threads()}"
