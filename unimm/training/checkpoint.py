"""Atomic, resumable checkpoints on top of DeepSpeed's ``save_checkpoint`` / ``load_checkpoint``.

A checkpoint folder ``checkpoints/step-00000100`` holds DeepSpeed's files (module, optimizer and
scheduler states, sharded per rank under ZeRO), one RNG file and one stage-state file per rank, and
``trainer_state.json`` (step, data position, the resolved recipe and a fingerprint of the run), and
``manifest.json`` (the size and sha256 of every other file). It is written under a temporary name and
renamed when complete, so a run killed at any moment leaves either a whole checkpoint or none; ``latest``
names the newest one; only the last K are kept.

Reading a checkpoint trusts neither its bytes nor its pickles. The manifest is verified before a
checkpoint is chosen, so a damaged newest one (a full disk, a bad copy) is skipped for the newest intact
one. Every ``.pt`` file, DeepSpeed's included, is read with ``torch.load(weights_only=True)`` and an
allow-list of the few DeepSpeed types its optimizer states hold, so a crafted checkpoint cannot run code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address
from torch import nn

from unimm.training import distributed
from unimm.training.arguments import RESUME_AUTO, RESUME_NEVER

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
LATEST_FILE = "latest"
PREFIX = "step-"
TEMPORARY_PREFIX = ".tmp-"
STEP_PATTERN = re.compile(rf"^{PREFIX}(\d+)$")
STEP_DIGITS = 8
HASH_CHUNK_BYTES = 1 << 24

# The non-tensor types in DeepSpeed's ZeRO optimizer states (bf16 or fp32; fp16 is refused by the
# recipe checks), found with torch.serialization.get_unsafe_globals_in_checkpoint on every ZeRO stage.
DEEPSPEED_GLOBALS = (LossScaler, ZeroStageEnum, fragment_address)
# RNG files written before the RNG state was saved as plain values hold numpy's state as an ndarray.
# (``_reconstruct`` is taken from ndarray's own reduce: numpy 1 and 2 keep it in different modules.)
LEGACY_RNG_GLOBALS = (np.empty(0).__reduce__()[0], np.ndarray, np.dtype, type(np.dtype(np.uint32)))


class CheckpointError(RuntimeError):
    """A checkpoint (or one of its files) that is damaged, missing, or would run code when loaded."""


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
    """Every RNG's state as tensors and plain values, so that it loads with ``weights_only=True``."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = numpy_state["state"]["key"].tolist()  # set_state takes it back as a list
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`capture_rng_state` returned (or the numpy tuple of older checkpoints)."""
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
        """Checkpoint folders (complete or damaged), oldest first."""
        if not self.directory.is_dir():
            return []
        return sorted((path for path in self.directory.iterdir() if STEP_PATTERN.match(path.name)), key=_step)

    def resolve(self, resume_from: str) -> Path | None:
        """The checkpoint to resume from: ``auto`` -> the newest intact one here (if any), ``never`` ->
        none, or a given checkpoint folder (which must be intact) / run folder (its newest intact one)."""
        if resume_from == RESUME_NEVER:
            return None
        if resume_from == RESUME_AUTO:
            return latest_checkpoint(self.directory)
        found = locate_checkpoint(resume_from)
        if found is None:
            raise FileNotFoundError(
                f"resume_from_checkpoint {resume_from!r}: no checkpoint there (expected a folder with "
                f"{STATE_FILE}, or a run folder with checkpoints/{PREFIX}N)"
            )
        return found

    def choose(self, resume_from: str) -> Path | None:
        """The checkpoint every rank resumes from: all ranks call this, and all get the same answer.

        Each rank looks at its own disk, and with node-local folders or a copy missing on one node the
        ranks' views differ; resuming from different steps would train one mixed model. So rank 0 proposes
        (``resolve``'s choice and, for ``auto``, the older ones after it), and every rank checks that it holds
        the proposal whole (rank 0 verifies every file's sha256, the others that every file is there with
        its size): the newest that all hold wins. With ``auto``, a run where some rank holds a checkpoint but
        none is held by all stops rather than start over; a named checkpoint must be held by all."""
        if resume_from == RESUME_NEVER:
            return None
        proposal = distributed.broadcast_object(
            self._propose(resume_from) if distributed.is_main_process() else None
        )
        if isinstance(proposal, Exception):
            raise proposal
        refusals = []
        for index, proposed in enumerate(proposal):
            # ``auto`` proposes names, looked up in each rank's own output folder; a named checkpoint is
            # one path for all.
            candidate = self.directory / proposed if resume_from == RESUME_AUTO else Path(proposed)
            verified = index == 0 and distributed.is_main_process()  # resolve has hashed its choice
            views = distributed.gather_objects((distributed.host(), None if verified else _holds(candidate)))
            missing = [
                f"rank {rank} on {name}: {problem}" for rank, (name, problem) in enumerate(views) if problem
            ]
            if not missing:
                return candidate
            refusals.append(f"{candidate.name} ({'; '.join(missing)})")
            logger.warning(
                "not every rank holds %s intact, trying the one before: %s", candidate, refusals[-1]
            )
            if resume_from != RESUME_AUTO:
                break
        holders = [count for count in distributed.gather_objects(len(self.checkpoints())) if count]
        if refusals or holders:
            raise CheckpointError(
                f"no checkpoint in {self.directory} is intact on every rank"
                + (
                    f": {', '.join(refusals)}"
                    if refusals
                    else f" (rank 0 has none, {len(holders)} rank(s) have some)"
                )
                + ". Every node must see the same checkpoints: put output_dir on a filesystem all nodes share, or "
                "copy the checkpoint to each node"
            )
        return None

    def _propose(self, resume_from: str) -> list[str] | Exception:
        """Rank 0's candidates, newest first (an exception to raise on every rank if the choice fails)."""
        try:
            chosen = self.resolve(resume_from)
        except (CheckpointError, FileNotFoundError) as error:
            return error
        if chosen is None:
            return []
        if resume_from != RESUME_AUTO:
            return [str(chosen)]
        older = [path for path in _newest_first(self.directory) if _step(path) < _step(chosen)]
        return [path.name for path in [chosen, *older]]

    def save(self, engine: Any, stage: Any, state: TrainState, metadata: dict[str, Any]) -> Path:
        """Write a complete checkpoint for ``state`` (every rank calls this) and return its folder."""
        name = f"{PREFIX}{state.global_step:0{STEP_DIGITS}d}"
        final, temporary = self.directory / name, self.directory / f"{TEMPORARY_PREFIX}{name}"
        if final.exists():
            if _is_intact(final):
                return final  # a finished run started again: this step is saved already
            logger.warning("rewriting the damaged checkpoint %s", final)
            distributed.barrier()  # every rank has verified it before it is removed
        if distributed.is_main_process():
            for stale in (temporary, final):  # left by a run killed while saving / damaged
                shutil.rmtree(stale, ignore_errors=True)
        distributed.barrier()
        engine.save_checkpoint(str(self.directory), tag=temporary.name, save_latest=False)
        rank = distributed.rank()
        torch.save(capture_rng_state(), temporary / f"rng_state_rank{rank}.pt")
        torch.save(stage.state_dict(), temporary / f"stage_state_rank{rank}.pt")
        distributed.barrier()
        if distributed.is_main_process():
            _write_json_atomic(temporary / STATE_FILE, {"state": asdict(state), **metadata})
            write_manifest(temporary)  # every rank's files are in the shared folder by now
            os.replace(temporary, final)
            _write_text_atomic(self.directory / LATEST_FILE, name)
            self._prune(final)
        distributed.wait_for_main_process()  # hashing a large checkpoint can outlast a collective timeout
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
        with _deepspeed_loads_weights_only(engine):
            load_path, _ = engine.load_checkpoint(
                str(checkpoint.parent),
                tag=checkpoint.name,
                load_optimizer_states=True,
                load_lr_scheduler_states=True,
            )
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint {checkpoint}")
        rank = distributed.rank()
        stage.load_state_dict(load_file(checkpoint / f"stage_state_rank{rank}.pt"))
        restore_rng_state(load_file(checkpoint / f"rng_state_rank{rank}.pt", LEGACY_RNG_GLOBALS))
        state = TrainState(**read_trainer_state(checkpoint)["state"])
        logger.info("resumed from %s at step %d", checkpoint, state.global_step)
        return state

    def _prune(self, saved: Path) -> None:
        # Checkpoints newer than the one just saved (damaged ones that resume skipped) do not count
        # towards the limit: the run rewrites them when it gets there.
        done = [path for path in self.checkpoints() if _step(path) <= _step(saved)]
        for old in done[: -self.keep_last]:
            shutil.rmtree(old)


def locate_checkpoint(path: str | Path) -> Path | None:
    """``path`` if it is a checkpoint (verified: a damaged one raises, nothing else is taken instead),
    else the newest intact checkpoint of the run folder ``path`` (in ``path/checkpoints``)."""
    path = Path(path)
    if path.is_dir() and (STEP_PATTERN.match(path.name) or (path / STATE_FILE).exists()):
        verify_checkpoint(path)
        return path
    return latest_checkpoint(path / "checkpoints") or latest_checkpoint(path)


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest intact checkpoint in ``directory`` (the one ``latest`` names, first), skipping damaged
    ones with a warning: None if there is no checkpoint, CheckpointError if none is intact."""
    problems = []
    for checkpoint in _newest_first(Path(directory)):
        try:
            verify_checkpoint(checkpoint)
        except CheckpointError as error:
            logger.warning("skipping a damaged checkpoint, trying the one before: %s", error)
            problems.append(str(error))
            continue
        return checkpoint
    if problems:
        raise CheckpointError(f"no intact checkpoint in {directory}: {'; '.join(problems)}")
    return None


def write_manifest(checkpoint: Path) -> None:
    """Record the size and sha256 of every file of ``checkpoint`` in its ``manifest.json``."""
    files = {
        path.relative_to(checkpoint).as_posix(): {"size": path.stat().st_size, "sha256": _sha256(path)}
        for path in sorted(checkpoint.rglob("*"))
        if path.is_file() and path.name != MANIFEST_FILE
    }
    _write_json_atomic(checkpoint / MANIFEST_FILE, {"files": files})


def verify_checkpoint(checkpoint: Path) -> None:
    """Raise CheckpointError naming the first file of ``checkpoint`` that is missing or differs from its
    manifest. One written before manifests existed passes, with a warning, if its state file reads."""
    checkpoint = Path(checkpoint)
    if not (checkpoint / MANIFEST_FILE).is_file():
        read_trainer_state(checkpoint)
        logger.warning(
            "%s has no %s (an older unimm wrote it): its files are not verified", checkpoint, MANIFEST_FILE
        )
        return
    for name, expected in _read_manifest(checkpoint).items():
        path = checkpoint / name
        if not path.is_file():
            problem = "is missing"
        elif (size := path.stat().st_size) != expected["size"]:
            problem = f"has {size} bytes where {expected['size']} were written"
        elif _sha256(path) != expected["sha256"]:
            problem = "differs from what was written (sha256)"
        else:
            continue
        raise CheckpointError(f"checkpoint {checkpoint} is damaged: {name} {problem}")


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    path = Path(checkpoint) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{checkpoint} is not a unimm checkpoint (no {STATE_FILE})")
    return _read_json(path)


def load_file(path: Path, allowed: Sequence[Any] = (), **kwargs: Any) -> Any:
    """``torch.load(path, weights_only=True, **kwargs)`` letting through only the globals in ``allowed``;
    a damaged file, or one whose pickle asks for anything else (it could run code), raises a one-line
    CheckpointError that names it."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, weights_only=True, **kwargs)
    except pickle.UnpicklingError as error:
        # torch's message spans paragraphs and suggests allow-listing; the refused global is what matters.
        found = re.search(r"GLOBAL (\S+)", str(error))
        what = f"asks for {found.group(1)}" if found else "holds more than tensors and plain values"
        raise CheckpointError(
            f"refusing to load {path}: its pickle {what}, and loading it could run code "
            "(checkpoints hold only tensors and plain values)"
        ) from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        summary = str(error).strip().splitlines()[0].split(". ")[0] if str(error).strip() else repr(error)
        raise CheckpointError(f"cannot read {path}: {summary}") from error


class _WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, loading through :func:`load_file` (its own load passes
    ``weights_only=False``)."""

    def load(self, path: str, map_location: Any = None) -> Any:
        return load_file(Path(path), DEEPSPEED_GLOBALS, map_location=map_location)


@contextlib.contextmanager
def _deepspeed_loads_weights_only(engine: Any) -> Iterator[None]:
    """``engine.load_checkpoint`` reads every file through ``engine.checkpoint_engine.load``: swap in one
    that loads weights only, and give the configured one (which also saves) back afterwards."""
    configured, engine.checkpoint_engine = engine.checkpoint_engine, _WeightsOnlyCheckpointEngine()
    try:
        yield
    finally:
        engine.checkpoint_engine = configured


def _read_manifest(checkpoint: Path) -> dict[str, dict[str, Any]]:
    try:
        files = json.loads((checkpoint / MANIFEST_FILE).read_text())["files"]
        return {
            name: {"size": int(entry["size"]), "sha256": str(entry["sha256"])}
            for name, entry in files.items()
        }
    except (OSError, ValueError, LookupError, TypeError, AttributeError) as error:
        # half a file, or a bit flip that left JSON of another shape
        raise CheckpointError(
            f"checkpoint {checkpoint} is damaged: {MANIFEST_FILE} does not read ({error!r})"
        ) from error


def _holds(checkpoint: Path) -> str | None:
    """Why this rank cannot resume from ``checkpoint`` (None: it can). Rank 0 verifies every file's hash;
    the other ranks, every file's presence and size (cheap on any storage, and enough: rank 0's check
    covers the bytes of a shared folder)."""
    if distributed.is_main_process():
        return None if _is_intact(checkpoint) else "damaged"
    if not checkpoint.is_dir():
        return f"no folder {checkpoint}"
    if not (checkpoint / MANIFEST_FILE).is_file():
        return None if (checkpoint / STATE_FILE).is_file() else f"no {STATE_FILE}"
    try:
        manifest = _read_manifest(checkpoint)
    except CheckpointError as error:
        return str(error)
    for name, expected in manifest.items():
        path = checkpoint / name
        if not path.is_file() or path.stat().st_size != expected["size"]:
            return f"{name} is missing or incomplete"
    return None


def _is_intact(checkpoint: Path) -> bool:
    try:
        verify_checkpoint(checkpoint)
    except CheckpointError:
        return False
    return True


def _newest_first(directory: Path) -> list[Path]:
    found = CheckpointManager(directory, 1).checkpoints()[::-1]
    latest = directory / LATEST_FILE
    named = directory / latest.read_text().strip() if latest.is_file() else None
    return ([named] if named in found else []) + [path for path in found if path != named]


def _step(checkpoint: Path) -> int:
    return int(STEP_PATTERN.match(checkpoint.name).group(1))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):  # (hashlib.file_digest needs Python 3.11)
            digest.update(chunk)
    return digest.hexdigest()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:  # ValueError: half a file, or bytes that are not UTF-8 JSON
        raise CheckpointError(f"cannot read {path}: {error}") from error


def _write_text_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(f"{TEMPORARY_PREFIX}{path.name}")
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _write_json_atomic(path: Path, value: dict[str, Any]) -> None:
    _write_text_atomic(path, json.dumps(value, indent=2, sort_keys=True))
