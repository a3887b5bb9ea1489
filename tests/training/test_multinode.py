"""A cluster on loopback: "nodes" are processes on 127.0.0.1 with their own folders and launcher variables.

What a real cluster does to a run and a single machine never shows: node-local output folders, a node
that lost its newest checkpoint, a frozen peer, a slow node, MPI and Slurm launchers."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from unimm.training.checkpoint import STATE_FILE, write_manifest
from unimm.training.distributed import WATCHDOG_EXIT_CODE, find_free_port

pytestmark = pytest.mark.integration
logger = logging.getLogger(__name__)

HERE = Path(__file__).parent
WORKER = HERE / "cluster_worker.py"
TIMEOUT_SECONDS = 240


def start_ranks(
    arguments: list[str], env: dict[str, str], variables: list[dict[str, str]]
) -> list[subprocess.Popen]:
    """One plain process per entry of ``variables`` (the launcher's environment for that rank)."""
    return [
        subprocess.Popen(
            [sys.executable, str(WORKER), *arguments],
            env={**env, **rank_variables},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for rank_variables in variables
    ]


def finish(processes: list[subprocess.Popen]) -> list[tuple[int, str]]:
    results = []
    for process in processes:
        _, stderr = process.communicate(timeout=TIMEOUT_SECONDS)
        results.append((process.returncode, stderr.decode()))
    return results


def torch_variables(world_size: int) -> list[dict[str, str]]:
    port = str(find_free_port())
    return [
        {
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
        }
        for rank in range(world_size)
    ]


@pytest.mark.parametrize("launcher", ["openmpi", "slurm"])
def test_mpi_and_slurm_ranks_join_one_group(tmp_path, subprocess_env, launcher):
    """Without torch's variables each process used to start a one-rank run of its own."""
    port = str(find_free_port())
    if launcher == "openmpi":  # what `mpirun -np 2 -x MASTER_PORT` exports
        variables = [
            {
                "OMPI_COMM_WORLD_RANK": str(rank),
                "OMPI_COMM_WORLD_SIZE": "2",
                "OMPI_COMM_WORLD_LOCAL_RANK": str(rank),
                "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
                "MASTER_PORT": port,
            }
            for rank in range(2)
        ]
    else:  # what `srun --ntasks 2` exports to its tasks (here on one "node" named by its address)
        job_id = str(int(port) - 15000)  # the port unimm derives from the job id
        variables = [
            {
                "SLURM_PROCID": str(rank),
                "SLURM_STEP_NUM_TASKS": "2",
                "SLURM_LOCALID": str(rank),
                "SLURM_STEP_NODELIST": "127.0.0.1",
                "SLURM_JOB_ID": job_id,
                "SLURM_NTASKS": "2",
            }
            for rank in range(2)
        ]
    results = finish(start_ranks(["ranks", str(tmp_path)], subprocess_env, variables))
    assert all(code == 0 for code, _ in results), results
    records = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [(record["rank"], record["world_size"], record["local_rank"]) for record in records] == [
        (0, 2, 0),
        (1, 2, 1),
    ]
    assert all(record["sum"] == 2.0 for record in records)  # one group of two, not two groups of one


def make_checkpoint(run: Path, step: int) -> None:
    checkpoint = run / f"step-{step:08d}"
    checkpoint.mkdir(parents=True)
    (checkpoint / STATE_FILE).write_text(json.dumps({"state": {"global_step": step}}))
    (checkpoint / "model_states.pt").write_bytes(bytes(range(step)))
    write_manifest(checkpoint)


def test_a_node_that_lost_its_newest_checkpoint_makes_every_rank_resume_from_an_older_one(
    tmp_path, subprocess_env
):
    for rank in range(2):
        make_checkpoint(tmp_path / f"node{rank}", 4)
    make_checkpoint(tmp_path / "node0", 8)  # node 1 lost step 8 (or never received it)
    results = finish(
        start_ranks(
            ["choose", str(tmp_path / "node{rank}"), str(tmp_path)], subprocess_env, torch_variables(2)
        )
    )
    assert all(code == 0 for code, _ in results), results
    records = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert records == [{"chosen": "step-00000004"}] * 2
    assert "rank 1 on" in results[0][1] and "step-00000008" in results[0][1]  # rank 0 says why it skipped it

    # A node with no checkpoint at all: stop (never start over on one node and resume on the other).
    (tmp_path / "r0").symlink_to(tmp_path / "node0")
    (tmp_path / "r1").mkdir()
    finish(
        start_ranks(["choose", str(tmp_path / "r{rank}"), str(tmp_path)], subprocess_env, torch_variables(2))
    )
    records = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    for record in records:  # every rank stops, each naming its own folder
        assert "intact on every rank: step-00000008 (rank 1 on" in record.get("error", ""), records


def launch_nodes(recipes: list[Path], env: dict[str, str], *overrides: str) -> list[tuple[int, str]]:
    """``torchrun --nnodes N --node_rank i`` per recipe: N "nodes" of one process each, on loopback."""
    port = str(find_free_port())
    processes = []
    for node, recipe in enumerate(recipes):
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nnodes={len(recipes)}",
            f"--node_rank={node}",
        ]
        command += ["--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}"]
        processes.append(
            subprocess.Popen(
                [*command, "-m", "unimm.train", str(recipe), *overrides],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        )
    return finish(processes)


def test_two_nodes_sharing_output_dir_train_resume_and_export(
    tmp_path, subprocess_env, write_recipe, synthetic_path
):
    recipe = write_recipe(
        {
            "stage": synthetic_path,
            "output_dir": str(tmp_path / "run"),
            "max_steps": 4,
            "save_steps": 2,
            "per_device_train_batch_size": 4,
            "logging_steps": 1,
        }
    )
    results = launch_nodes([recipe, recipe], subprocess_env)
    assert all(code == 0 for code, _ in results), [stderr[-3000:] for _, stderr in results]
    results = launch_nodes([recipe, recipe], subprocess_env, "max_steps=6")
    assert all(code == 0 for code, _ in results), [stderr[-3000:] for _, stderr in results]
    for _, stderr in results:
        assert "step-00000004 at step 4" in stderr  # both ranks resumed from the same checkpoint
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records if record["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "run" / "export" / "model.safetensors").is_file()


def test_separate_output_folders_are_refused_at_start(tmp_path, subprocess_env, write_recipe, synthetic_path):
    """Two nodes, each with its own disk: the run used to train and then fail at its final export."""
    recipes = [
        write_recipe(
            {
                "stage": synthetic_path,
                "output_dir": str(tmp_path / f"node{node}" / "run"),
                "max_steps": 2,
                "per_device_train_batch_size": 4,
            },
            name=f"recipe{node}.yaml",
        )
        for node in range(2)
    ]
    results = launch_nodes(recipes, subprocess_env)
    assert all(code != 0 for code, _ in results), results
    for _, stderr in results:
        assert "is not one folder shared by every node: rank 1 on" in stderr, stderr[-3000:]
    assert not list((tmp_path / "node0" / "run").glob("checkpoints/*"))  # refused before any step


def test_a_frozen_peer_ends_the_others_through_the_watchdog(tmp_path, subprocess_env):
    timeout = 5
    processes = start_ranks(["watchdog", str(timeout)], subprocess_env, torch_variables(2))
    try:
        _, stderr = processes[0].communicate(timeout=TIMEOUT_SECONDS)
    finally:
        processes[1].send_signal(signal.SIGCONT)
        processes[1].kill()
        processes[1].communicate()
    assert processes[0].returncode == WATCHDOG_EXIT_CODE, stderr.decode()[-3000:]
    assert "rank 1 has not answered" in stderr.decode()


def test_a_frozen_peer_in_zero2_training_ends_the_run_within_its_timeout(
    tmp_path, subprocess_env, write_recipe, synthetic_path, deepspeed_dir
):
    """With a rank stopped (SIGSTOP) mid-run, rank 0 used to wait in a ZeRO-2 collective for ever."""
    timeout = 10
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    recipe = write_recipe(
        {
            "stage": synthetic_path,
            "output_dir": str(tmp_path / "run"),
            "max_steps": 1000,
            "save_steps": 1000,
            "per_device_train_batch_size": 4,
            "num_train_samples": 4000,
            "seconds_per_step": 0.2,
            "deepspeed_config": str(deepspeed_dir / "zero2.json"),
            "ddp_timeout": timeout,
            "record_dir": str(record_dir),
        }
    )
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "unimm.train",
        str(recipe),
    ]
    launcher = subprocess.Popen(command, env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        trained = record_dir / "indices_rank1.txt"
        deadline = time.monotonic() + TIMEOUT_SECONDS
        while not (trained.exists() and len(trained.read_text().splitlines()) >= 3):
            assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()[
                1
            ].decode()[-3000:]
            time.sleep(0.2)
        pids = {rank: int((record_dir / f"pid_rank{rank}.txt").read_text()) for rank in range(2)}
        os.kill(pids[1], signal.SIGSTOP)
        frozen_at = time.monotonic()
        while _alive(pids[0]) and time.monotonic() - frozen_at < TIMEOUT_SECONDS:
            time.sleep(0.2)
        waited = time.monotonic() - frozen_at
    finally:
        with_pid = record_dir / "pid_rank1.txt"
        if with_pid.exists():
            os.kill(int(with_pid.read_text()), signal.SIGCONT)  # let the launcher end it
        _, stderr = launcher.communicate(timeout=TIMEOUT_SECONDS)
    logger.info("rank 0 ended %.1f s after its peer froze (ddp_timeout %d s)", waited, timeout)
    assert launcher.returncode != 0
    assert waited < 3 * timeout, f"rank 0 waited {waited:.0f} s for a frozen peer (ddp_timeout {timeout} s)"
    assert "has not answered" in stderr.decode() or "Timed out" in stderr.decode(), stderr.decode()[-3000:]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    return not status.exists() or status.read_text().split()[2] != "Z"  # a zombie has exited


def test_a_late_rank_does_not_hang_the_tokenizer_stage(tmp_path, subprocess_env):
    """Rank 0 pre-trains the teacher while rank 1 is still loading data; rank 1 then found the teacher
    folder complete, skipped the barrier, and both ranks hung."""
    recipe = Path(__file__).parents[2] / "recipes" / "tokenizer" / "tiny.yaml"
    overrides = [
        f"output_dir={tmp_path / 'run'}",
        f"teacher_name_or_path={tmp_path / 'teacher'}",
        "pretrain_teacher_epochs=1",
        "max_steps=2",
        "sample_steps=0",
        "eval_steps=0",
        "ddp_timeout=120",
    ]
    results = finish(
        start_ranks(["late-tokenizer", str(recipe), "6", *overrides], subprocess_env, torch_variables(2))
    )
    assert all(code == 0 for code, _ in results), [stderr[-3000:] for _, stderr in results]
    assert (tmp_path / "teacher" / "config.json").exists() and (tmp_path / "run" / "export").is_dir()
