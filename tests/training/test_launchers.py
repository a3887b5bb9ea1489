"""Launcher environments turned into torch's rank variables (no processes: see test_multinode.py)."""

from __future__ import annotations

import pytest

from unimm.training.launchers import (
    LaunchEnvironment,
    LaunchEnvironmentError,
    detect_launch_environment,
    first_host,
)


def test_torchrun_and_deepspeed_variables_are_left_alone():
    assert (
        detect_launch_environment({"RANK": "3", "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4"})
        is None
    )
    assert detect_launch_environment({}) is None  # a plain process


def test_open_mpi_on_one_node_needs_no_address():
    environ = {
        "OMPI_COMM_WORLD_RANK": "1",
        "OMPI_COMM_WORLD_SIZE": "2",
        "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
    }
    assert detect_launch_environment(environ) == LaunchEnvironment("Open MPI", 1, 2, 1, "127.0.0.1", 29500)


@pytest.mark.parametrize(
    ("prefix", "launcher"), [("MV2_COMM_WORLD", "MVAPICH"), ("OMPI_COMM_WORLD", "Open MPI")]
)
def test_mpi_over_nodes_takes_master_addr_and_port_from_the_environment(prefix, launcher):
    environ = {
        f"{prefix}_RANK": "5",
        f"{prefix}_SIZE": "8",
        f"{prefix}_LOCAL_RANK": "1",
        f"{prefix}_LOCAL_SIZE": "4",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "6000",
    }
    launch = detect_launch_environment(environ)
    assert launch == LaunchEnvironment(launcher, 5, 8, 1, "10.0.0.1", 6000)
    assert launch.torch_variables() == {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "6000",
    }
    del environ["MASTER_ADDR"]
    with pytest.raises(LaunchEnvironmentError, match=r"several nodes.*export MASTER_ADDR"):
        detect_launch_environment(environ)


def test_intel_mpi_and_mpich():
    environ = {"PMI_RANK": "0", "PMI_SIZE": "2", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2"}
    assert detect_launch_environment(environ) == LaunchEnvironment(
        "Intel MPI / MPICH", 0, 2, 0, "127.0.0.1", 29500
    )


def test_srun_tasks_find_rank_0_on_the_first_node_and_a_port_of_their_job():
    environ = {
        "SLURM_PROCID": "6",
        "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_LOCALID": "2",
        "SLURM_STEP_NODELIST": "gpu[007-008],login1",
        "SLURM_JOB_ID": "123456",
        "SLURM_NTASKS": "8",
    }
    assert detect_launch_environment(environ) == LaunchEnvironment(
        "Slurm", 6, 8, 2, "gpu007", 15000 + 123456 % 20000
    )
    # A batch script's own shell has SLURM_PROCID too, but it is one process: no srun step variables.
    assert detect_launch_environment({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "1"}) is None


@pytest.mark.parametrize(
    ("nodelist", "first"),
    [("node1", "node1"), ("a,b", "a"), ("gpu[07-10,12]", "gpu07"), ("n[3,1-2]-ib,x[1-4]", "n3-ib")],
)
def test_first_host_of_a_slurm_node_list(nodelist, first):
    assert first_host(nodelist) == first


def test_inconsistent_launcher_variables_are_named():
    with pytest.raises(LaunchEnvironmentError, match="rank 4 is outside a world of 4"):
        detect_launch_environment({"PMI_RANK": "4", "PMI_SIZE": "4", "MASTER_ADDR": "10.0.0.1"})
    with pytest.raises(LaunchEnvironmentError, match="OMPI_COMM_WORLD_SIZE='two' is not an integer"):
        detect_launch_environment({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "two"})
