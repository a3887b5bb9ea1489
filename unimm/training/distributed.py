"""Process-group setup through DeepSpeed, and what a job over many nodes needs around it.

Launchers export ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``; MPI launchers and
Slurm export their own names, translated in :mod:`unimm.training.launchers`; a plain ``python`` run has none,
so we export the single-rank values ourselves (on a free port, so parallel runs do not clash) and let
DeepSpeed initialise the group as usual.

Every collective times out (``ddp_timeout``); work that rank 0 does alone (samples, manifests, a teacher)
is waited for on a second group with its own, longer timeout; a watchdog ends a rank whose peers stopped
answering (a frozen or vanished process never reaches the next collective to time out in).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import secrets
import socket
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from unimm.training.launchers import detect_launch_environment

logger = logging.getLogger(__name__)

LOCALHOST = "127.0.0.1"
SHM_OP_BUILDER = "ShareMemCommBuilder"  # DeepSpeed's CPU op for collectives, built on first use
DEFAULT_TIMEOUT_SECONDS = 1800  # torch's and transformers' default collective timeout
SHARED_STORAGE_FILE = ".unimm_shared_storage"
SHARED_STORAGE_WAIT_SECONDS = 10.0  # network filesystems may show a new file to other nodes a little later
HEARTBEATS_PER_TIMEOUT = 10
WATCHDOG_EXIT_CODE = 3

_main_process_group: Any = None  # gloo group with the long timeout, for waiting on rank-0-only work


def find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        return sock.getsockname()[1]


def init_distributed(
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS, main_process_timeout_seconds: float | None = None
) -> None:
    """Initialise DeepSpeed's process group once (gloo on CPU, the accelerator's backend elsewhere).

    ``timeout_seconds`` bounds every collective; ``main_process_timeout_seconds`` (default: the same) bounds
    :func:`wait_for_main_process`."""
    global _main_process_group
    import deepspeed  # here: the helpers below are used by modules that should not import DeepSpeed
    from deepspeed.accelerator import get_accelerator

    if deepspeed.comm.is_initialized():
        return
    launch = detect_launch_environment(os.environ)
    if launch is not None:
        os.environ.update(launch.torch_variables())
        logger.info("%s launch: rank %d of %d", launch.launcher, launch.rank, launch.world_size)
    elif "RANK" not in os.environ:
        single_rank = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": LOCALHOST}
        for key, value in single_rank.items():
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_PORT", str(find_free_port()))
    accelerator = get_accelerator()
    backend = "gloo" if accelerator.device_name() == "cpu" else accelerator.communication_backend_name()
    if accelerator.device_name() == "cpu":
        _announce_shm_op_build(accelerator)
    # auto_mpi_discovery off: the variables are set above, and DeepSpeed's discovery needs mpi4py.
    deepspeed.init_distributed(
        dist_backend=backend, auto_mpi_discovery=False, timeout=timedelta(seconds=timeout_seconds)
    )
    if world_size() > 1:
        wait = timedelta(seconds=main_process_timeout_seconds or timeout_seconds)
        _main_process_group = torch.distributed.new_group(backend="gloo", timeout=wait)
    atexit.register(shutdown_distributed)


def shutdown_distributed() -> None:
    """Destroy the process groups (registered at exit by :func:`init_distributed`).

    A process that exits with its gloo group alive can abort in the group's threads at interpreter
    teardown ("terminate called without an active exception", exit code -6) after a run that succeeded."""
    global _main_process_group
    if dist.is_initialized():
        dist.destroy_process_group()
    _main_process_group = None


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


def wait_for_main_process() -> None:
    """A barrier for after work rank 0 does alone: the others wait up to the main-process timeout
    (a plain barrier would fail after the collective timeout while rank 0 is still busy)."""
    if world_size() == 1:
        return
    group = _main_process_group
    if group is None:  # a group set up by someone else: no long-timeout group of ours
        dist.barrier()
        return
    torch.distributed.barrier(group=group)


def broadcast_object(value: Any) -> Any:
    """Rank 0's ``value`` (picklable), on every rank."""
    if world_size() == 1:
        return value
    holder = [value]
    torch.distributed.broadcast_object_list(holder, src=0, group=_main_process_group)
    return holder[0]


def host() -> str:
    return socket.gethostname()


def gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value`` (picklable), in rank order; ``[value]`` in a single process."""
    if world_size() == 1:
        return [value]
    gathered: list[Any] = [None] * world_size()
    # On the gloo group when there is one: objects travel as CPU tensors, whatever the main backend.
    torch.distributed.all_gather_object(gathered, value, group=_main_process_group)
    return gathered


def mean_over_ranks(values: dict[str, float], device: Any) -> dict[str, float]:
    """Average named floats over all ranks (every rank must pass the same keys)."""
    if world_size() == 1 or not values:
        return dict(values)
    keys = sorted(values)
    tensor = torch.tensor([float(values[key]) for key in keys], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return {key: float(value) / world_size() for key, value in zip(keys, tensor.tolist())}


class ClusterError(RuntimeError):
    """The ranks of a run cannot work together: storage they do not share, or a peer that stopped answering."""


def check_shared_storage(directory: Path) -> None:
    """Raise on every rank unless all ranks see ``directory`` as one folder.

    Checkpoints are written by every rank into one folder that rank 0 then completes, and the export reads
    every rank's shards from it: on node-local disks a run would train and then fail at its end, with its
    shards scattered. Rank 0 writes a random token there; every rank must read it back."""
    if world_size() == 1:
        return
    directory.mkdir(parents=True, exist_ok=True)
    marker = directory / SHARED_STORAGE_FILE
    token = broadcast_object(secrets.token_hex(16) if is_main_process() else None)
    if is_main_process():
        marker.write_text(token)
    barrier()
    views = gather_objects((host(), _wait_for_text(marker, token)))
    barrier()
    if is_main_process():
        marker.unlink(missing_ok=True)
    blind = [f"rank {rank} on {name}" for rank, (name, seen) in enumerate(views) if not seen]
    if blind:
        raise ClusterError(
            f"output_dir {directory} is not one folder shared by every node: {', '.join(blind)} cannot see the "
            f"file rank 0 ({views[0][0]}) wrote there. Every rank writes its checkpoint shards into that folder "
            "and the export reads them all: put output_dir on storage every node mounts (NFS, Lustre, ...)"
        )


def _wait_for_text(path: Path, text: str) -> bool:
    deadline = time.monotonic() + SHARED_STORAGE_WAIT_SECONDS
    while True:
        try:
            os.listdir(path.parent)  # a directory read refreshes a network filesystem's cached lookups
            if path.read_text() == text:
                return True
        except OSError:
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


class Watchdog:
    """Ends this rank when a peer has not shown a sign of life for ``timeout_seconds``.

    A collective's timeout only fires inside a collective; a rank waiting at a barrier for a frozen
    (stopped, swapped-out, partitioned) peer, or doing work of its own, would wait forever. Each rank's
    thread bumps a counter in the process group's store and watches the others'; a rank that stops cleanly
    says so and is no longer watched."""

    LEFT = "left"

    def __init__(self, timeout_seconds: float) -> None:
        self.timeout_seconds = timeout_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._store: Any = None

    def start(self) -> None:
        if world_size() == 1:
            return
        self._store = _default_store()
        if self._store is None:
            logger.warning("no process-group store to watch peers through: the watchdog is off")
            return
        self._store.set(self._key(rank()), "0")
        barrier()  # every key exists before anyone reads them
        self._thread = threading.Thread(target=self._run, name="unimm-watchdog", daemon=True)
        self._thread.start()

    def stop(self, left: bool = True) -> None:
        """Stop watching; ``left``: tell the peers this rank leaves on purpose (else they time out on it)."""
        if self._thread is None:
            return
        self._stop.set()
        if not left:
            return
        self._thread.join()
        self._thread = None
        with contextlib.suppress(RuntimeError):  # the store's host is gone: nobody is left to tell
            self._store.set(self._key(rank()), self.LEFT)

    def _run(self) -> None:
        me, interval = rank(), self.timeout_seconds / HEARTBEATS_PER_TIMEOUT
        peers = [peer for peer in range(world_size()) if peer != me]
        last_seen = {peer: (None, time.monotonic()) for peer in peers}
        beat = 0
        while not self._stop.wait(interval):
            beat += 1
            try:
                self._store.set(self._key(me), str(beat))
                values = {peer: self._store.get(self._key(peer)).decode() for peer in peers}
            except RuntimeError as error:  # the store lives on rank 0's node: it stopped answering
                self._abort(f"the process group's store (rank 0's node) stopped answering ({error})")
                return
            now = time.monotonic()
            for peer, value in values.items():
                if value == self.LEFT or value != last_seen[peer][0]:
                    last_seen[peer] = (value, now)
                elif now - last_seen[peer][1] > self.timeout_seconds:
                    self._abort(f"rank {peer} has not answered for {now - last_seen[peer][1]:.0f} s")
                    return

    def _abort(self, reason: str) -> None:
        logger.error(
            "rank %d on %s stops: %s (ddp_timeout %s s). Restart the job to resume from its last checkpoint",
            rank(),
            host(),
            reason,
            self.timeout_seconds,
        )
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(WATCHDOG_EXIT_CODE)  # the main thread may be blocked in a collective that never returns

    @staticmethod
    def _key(peer: int) -> str:
        return f"unimm/heartbeat/{peer}"


def _default_store() -> Any:
    # The store torch's env:// rendezvous created (a TCPStore on MASTER_ADDR); torch has no public getter.
    try:
        return torch.distributed.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):
        return None
