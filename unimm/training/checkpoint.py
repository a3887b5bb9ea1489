"""Atomic, resumable checkpoints on top of DeepSpeed's ``save_checkpoint`` / ``load_checkpoint``.

A checkpoint folder ``checkpoints/step-00000100`` holds DeepSpeed's files (module, optimizer and
scheduler states, sharded per rank under ZeRO), one RNG file and one stage-state file per rank, and
``trainer_state.json`` (step, data position, the resolved recipe and a fingerprint of the run). It is
written under a temporary name and renamed when complete, so a run killed at any moment leaves either
a whole checkpoint or none; ``latest`` names the newest one; only the last K are kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from unimm.training import distributed
from unimm.training.arguments import RESUME_AUTO, RESUME_NEVER

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
LATEST_FILE = "latest"
PREFIX = "step-"
TEMPORARY_PREFIX = ".tmp-"
STEP_PATTERN = re.compile(rf"^{PREFIX}(\d+)$")
STEP_DIGITS = 8


@dataclass
class TrainState:
    """Where training stands: optimizer steps done, and the data position inside the current epoch."""

    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of this epoch already consumed (per rank)


@dataclass
class RunFingerprint:
    """What must match for a checkpoint to be resumed by this run."""

    stage: str
    model: str  # hash of parameter names and shapes
    world_size: int
    global_batch_size: int

    def mismatches(self, other: RunFingerprint) -> list[str]:
        return [
            f"{key}: checkpoint has {theirs!r}, this run has {ours!r}"
            for key, ours in asdict(self).items()
            if (theirs := getattr(other, key)) != ours
        ]


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of the parameter names, shapes and trainability (not the values)."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        shape = tuple(getattr(param, "ds_shape", param.shape))  # a ZeRO-3 partitioned parameter's full shape
        digest.update(f"{name}:{shape}:{param.requires_grad};".encode())
    return digest.hexdigest()[:16]


def capture_rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    """Saves, finds, checks and loads the checkpoints of one run folder."""

    def __init__(self, directory: Path, keep_last: int) -> None:
        self.directory = Path(directory)
        self.keep_last = keep_last

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [path for path in self.directory.iterdir() if STEP_PATTERN.match(path.name)]
        return sorted(found, key=lambda path: int(STEP_PATTERN.match(path.name).group(1)))

    def resolve(self, resume_from: str) -> Path | None:
        """The checkpoint to resume from: ``auto`` -> the newest here (if any), ``never`` -> none, or a
        given checkpoint folder / run folder."""
        if resume_from == RESUME_NEVER:
            return None
        if resume_from == RESUME_AUTO:
            return latest_checkpoint(self.directory)
        path = Path(resume_from)
        if (path / STATE_FILE).is_file():
            return path
        found = latest_checkpoint(path) or latest_checkpoint(path / "checkpoints")
        if found is None:
            raise FileNotFoundError(
                f"resume_from_checkpoint {resume_from!r}: no checkpoint there (expected a folder with "
                f"{STATE_FILE}, or a run folder with checkpoints/{PREFIX}N)"
            )
        return found

    def save(self, engine: Any, stage: Any, state: TrainState, metadata: dict[str, Any]) -> Path:
        """Write a complete checkpoint for ``state`` (every rank calls this) and return its folder."""
        name = f"{PREFIX}{state.global_step:0{STEP_DIGITS}d}"
        final, temporary = self.directory / name, self.directory / f"{TEMPORARY_PREFIX}{name}"
        if final.exists():
            return final
        if distributed.is_main_process() and temporary.exists():
            shutil.rmtree(temporary)  # left by a run killed while saving
        distributed.barrier()
        engine.save_checkpoint(str(self.directory), tag=temporary.name, save_latest=False)
        rank = distributed.rank()
        torch.save(capture_rng_state(), temporary / f"rng_state_rank{rank}.pt")
        torch.save(stage.state_dict(), temporary / f"stage_state_rank{rank}.pt")
        distributed.barrier()
        if distributed.is_main_process():
            _write_json_atomic(temporary / STATE_FILE, {"state": asdict(state), **metadata})
            os.replace(temporary, final)
            _write_text_atomic(self.directory / LATEST_FILE, name)
            self._prune()
        distributed.barrier()
        return final

    def check_compatible(self, checkpoint: Path, fingerprint: RunFingerprint) -> None:
        """Raise before training if ``checkpoint`` was written by a different kind of run."""
        saved = read_trainer_state(checkpoint)
        theirs = RunFingerprint(**saved["fingerprint"])
        problems = fingerprint.mismatches(theirs)
        if problems:
            raise ValueError(
                f"cannot resume from {checkpoint}: it belongs to another run ({'; '.join(problems)}). "
                "Use a new output_dir, or resume_from_checkpoint: never to start over"
            )

    def load(self, engine: Any, stage: Any, checkpoint: Path) -> TrainState:
        """Restore module, optimizer, scheduler, RNG, stage state and data position from ``checkpoint``."""
        load_path, _ = engine.load_checkpoint(
            str(checkpoint.parent),
            tag=checkpoint.name,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint {checkpoint}")
        rank = distributed.rank()
        stage.load_state_dict(torch.load(checkpoint / f"stage_state_rank{rank}.pt", weights_only=False))
        restore_rng_state(torch.load(checkpoint / f"rng_state_rank{rank}.pt", weights_only=False))
        state = TrainState(**read_trainer_state(checkpoint)["state"])
        logger.info("resumed from %s at step %d", checkpoint, state.global_step)
        return state

    def _prune(self) -> None:
        for old in self.checkpoints()[: -self.keep_last]:
            shutil.rmtree(old)


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest complete checkpoint in ``directory`` (the one ``latest`` names, if it exists)."""
    directory = Path(directory)
    latest = directory / LATEST_FILE
    if latest.is_file() and (directory / latest.read_text().strip() / STATE_FILE).is_file():
        return directory / latest.read_text().strip()
    complete = [
        path for path in CheckpointManager(directory, 1).checkpoints() if (path / STATE_FILE).is_file()
    ]
    return complete[-1] if complete else None


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    path = Path(checkpoint) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint} is not a unimm checkpoint (no {STATE_FILE})")
    return json.loads(path.read_text())


def _write_text_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(f"{TEMPORARY_PREFIX}{path.name}")
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _write_json_atomic(path: Path, value: dict[str, Any]) -> None:
    _write_text_atomic(path, json.dumps(value, indent=2, sort_keys=True))
