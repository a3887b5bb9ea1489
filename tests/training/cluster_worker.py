"""One rank of the multi-node tests, started by them as a plain process with a launcher's variables.

python cluster_worker.py ranks OUT                 # report rank, world size and a collective's sum
python cluster_worker.py choose RUN_TEMPLATE OUT   # the checkpoint rank {rank}'s folder resumes from
python cluster_worker.py watchdog TIMEOUT          # rank 1 freezes; rank 0 must be ended by the watchdog
python cluster_worker.py late-tokenizer RECIPE DELAY KEY=VALUE...  # ranks > 0 reach the stage late
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

from unimm.training import distributed


def ranks(out: str) -> None:
    distributed.init_distributed(timeout_seconds=60)
    total = torch.ones(1)
    torch.distributed.all_reduce(total)
    record = {
        "rank": distributed.rank(),
        "world_size": distributed.world_size(),
        "local_rank": int(os.environ["LOCAL_RANK"]),
        "sum": float(total),
    }
    Path(out, f"rank{distributed.rank()}.json").write_text(json.dumps(record))


def choose(run_template: str, out: str) -> None:
    from unimm.training.checkpoint import CheckpointManager

    distributed.init_distributed(timeout_seconds=60)
    manager = CheckpointManager(Path(run_template.format(rank=distributed.rank())), keep_last=3)
    try:
        chosen = manager.choose("auto")
        record = {"chosen": None if chosen is None else chosen.name}
    except Exception as error:  # the test checks every rank raised the same
        record = {"error": f"{type(error).__name__}: {error}"}
    Path(out, f"rank{distributed.rank()}.json").write_text(json.dumps(record))


def watchdog(timeout: str) -> None:
    distributed.init_distributed(timeout_seconds=float(timeout))
    distributed.Watchdog(float(timeout)).start()
    if distributed.rank() == 1:
        os.kill(os.getpid(), signal.SIGSTOP)
    time.sleep(20 * float(timeout))  # outside any collective: only the watchdog can end this wait
    sys.exit(0)


def late_tokenizer(recipe: str, delay: str, *overrides: str) -> None:
    from unimm.training.arguments import load_recipe
    from unimm.training.loop import train
    from unimm.training.stages import tokenizer

    load = tokenizer.load_image_datasets

    def slow_on_late_ranks(*args, **kwargs):
        if distributed.rank() > 0:
            time.sleep(float(delay))  # a slow node: rank 0 has finished the teacher when this one looks
        return load(*args, **kwargs)

    tokenizer.load_image_datasets = slow_on_late_ranks
    train(load_recipe(recipe, list(overrides)))


if __name__ == "__main__":
    command, *arguments = sys.argv[1:]
    {"ranks": ranks, "choose": choose, "watchdog": watchdog, "late-tokenizer": late_tokenizer}[command](
        *arguments
    )
