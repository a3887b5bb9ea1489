"""Which launcher started this process, and the rank variables it implies.

torchrun and the ``deepspeed`` launcher export ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/
``MASTER_PORT`` themselves. MPI launchers (``mpirun`` of Open MPI, MVAPICH, Intel MPI/MPICH, and
``deepspeed --launcher openmpi|mvapich``) and Slurm's ``srun`` export their own names instead; here they are
translated to torch's, so every process joins one group instead of each starting a single-rank run.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

LOCALHOST = "127.0.0.1"
TORCH_DEFAULT_PORT = 29500  # torch's and DeepSpeed's default rendezvous port
# Slurm: a port derived from the job id, so two jobs sharing a node do not collide (as Lightning does).
SLURM_PORT_BASE, SLURM_PORT_SPAN = 15000, 20000


@dataclass(frozen=True)
class LaunchEnvironment:
    """The rank variables for torch's ``env://`` initialisation, and the launcher they came from."""

    launcher: str
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise LaunchEnvironmentError(
                f"{self.launcher}: rank {self.rank} is outside a world of {self.world_size} process(es)"
            )

    def torch_variables(self) -> dict[str, str]:
        return {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }


@dataclass(frozen=True)
class _MPIVariables:
    launcher: str
    rank: str
    size: str
    local_rank: str
    local_size: str


# In order: a Slurm allocation running mpirun has both kinds of names, and mpirun is then the launcher.
MPI_LAUNCHERS = (
    _MPIVariables(
        "Open MPI",
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "OMPI_COMM_WORLD_LOCAL_SIZE",
    ),
    _MPIVariables(
        "MVAPICH",
        "MV2_COMM_WORLD_RANK",
        "MV2_COMM_WORLD_SIZE",
        "MV2_COMM_WORLD_LOCAL_RANK",
        "MV2_COMM_WORLD_LOCAL_SIZE",
    ),
    _MPIVariables("Intel MPI / MPICH", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
)


class LaunchEnvironmentError(RuntimeError):
    """The launcher's variables are incomplete or contradict each other."""


def detect_launch_environment(environ: Mapping[str, str]) -> LaunchEnvironment | None:
    """The rank variables implied by ``environ``; ``None`` when torch's are already set (torchrun,
    ``deepspeed``) or no launcher is recognised (a plain single process)."""
    if "RANK" in environ:
        return None
    for variables in MPI_LAUNCHERS:
        if variables.rank in environ:
            return _from_mpi(environ, variables)
    # srun exports SLURM_STEP_* to the tasks of a step; a batch script's own shell also has SLURM_PROCID
    # and SLURM_NTASKS but is one process, so those alone do not make a multi-rank launch.
    if "SLURM_PROCID" in environ and "SLURM_STEP_NUM_TASKS" in environ:
        return _from_slurm(environ)
    return None


def _from_mpi(environ: Mapping[str, str], variables: _MPIVariables) -> LaunchEnvironment:
    rank = _integer(environ, variables.rank)
    world_size = _integer(environ, variables.size)
    local_rank = _integer(environ, variables.local_rank, default=0)
    local_size = _integer(environ, variables.local_size, default=0)
    master_addr = environ.get("MASTER_ADDR")
    if master_addr is None:
        if world_size > 1 and local_size != world_size:
            raise LaunchEnvironmentError(
                f"{variables.launcher} started {world_size} ranks over several nodes, and MPI cannot tell "
                "torch where rank 0 listens: export MASTER_ADDR (the first node's address) to every rank, e.g. "
                "`mpirun -x MASTER_ADDR=<first node> -x MASTER_PORT=29500 ...`"
            )
        master_addr = LOCALHOST
    return LaunchEnvironment(
        launcher=variables.launcher,
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        master_addr=master_addr,
        master_port=_integer(environ, "MASTER_PORT", default=TORCH_DEFAULT_PORT),
    )


def _from_slurm(environ: Mapping[str, str]) -> LaunchEnvironment:
    nodes = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
    master_addr = environ.get("MASTER_ADDR")
    if master_addr is None:
        if not nodes:
            raise LaunchEnvironmentError("srun set no SLURM_STEP_NODELIST: export MASTER_ADDR to every task")
        master_addr = first_host(nodes)
    job_port = SLURM_PORT_BASE + _integer(environ, "SLURM_JOB_ID", default=0) % SLURM_PORT_SPAN
    return LaunchEnvironment(
        launcher="Slurm",
        rank=_integer(environ, "SLURM_PROCID"),
        world_size=_integer(environ, "SLURM_STEP_NUM_TASKS"),
        local_rank=_integer(environ, "SLURM_LOCALID", default=0),
        master_addr=master_addr,
        master_port=_integer(environ, "MASTER_PORT", default=job_port),
    )


NODELIST_ENTRY = re.compile(r"^(?P<prefix>[^,\[]+)(?:\[(?P<ranges>[^\]]+)\](?P<suffix>[^,]*))?")


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: ``gpu[007-010,12],cpu3`` -> ``gpu007``."""
    match = NODELIST_ENTRY.match(nodelist.strip())
    if match is None:
        raise LaunchEnvironmentError(f"cannot read the Slurm node list {nodelist!r}")
    if match["ranges"] is None:
        return match["prefix"]
    first = match["ranges"].split(",")[0].split("-")[0]  # keeps the list's zero padding
    return f"{match['prefix']}{first}{match['suffix']}"


def _integer(environ: Mapping[str, str], name: str, default: int | None = None) -> int:
    if name not in environ:
        if default is None:
            raise LaunchEnvironmentError(f"the launcher set no {name}")
        return default
    try:
        return int(environ[name])
    except ValueError:
        raise LaunchEnvironmentError(f"{name}={environ[name]!r} is not an integer") from None
