"""The request queue on its own, with fake jobs: what is batched with what, limits, cancellation, errors."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

import pytest

from unimm.serving.batching import GenerationBatcher, QueueFullError


@dataclass
class Job:
    name: str
    rows: int = 1
    batch_key: object = "same"


class Engine:
    """Records each batch; ``hold`` keeps the first batch running until released."""

    def __init__(self, hold: bool = False) -> None:
        self.batches: list[list[str]] = []
        self.started = threading.Event()
        self.release = threading.Event()
        if not hold:
            self.release.set()

    def __call__(self, jobs: list[Job]) -> list:
        self.batches.append([job.name for job in jobs])
        self.started.set()
        self.release.wait(timeout=10)
        return [ValueError(job.name) if job.name.startswith("bad") else job.name.upper() for job in jobs]


def run(scenario) -> None:
    asyncio.run(asyncio.wait_for(scenario(), timeout=20))


async def started_batcher(engine: Engine, **options) -> GenerationBatcher:
    batcher = GenerationBatcher(engine, **{"batch_wait_ms": 50.0, **options})
    batcher.start()
    return batcher


async def engine_started(engine: Engine) -> None:
    while not engine.started.is_set():
        await asyncio.sleep(0.005)


def test_jobs_that_arrive_together_share_one_batch():
    engine = Engine()

    async def scenario():
        batcher = await started_batcher(engine)
        results = await asyncio.gather(*(batcher.submit(Job(f"j{index}")) for index in range(5)))
        assert results == ["J0", "J1", "J2", "J3", "J4"]
        assert engine.batches == [["j0", "j1", "j2", "j3", "j4"]]
        assert (batcher.batches, batcher.jobs, batcher.queued) == (1, 5, 0)
        await batcher.stop()

    run(scenario)


def test_batches_hold_at_most_max_batch_size_rows_in_arrival_order():
    engine = Engine()

    async def scenario():
        batcher = await started_batcher(engine, max_batch_size=4)
        jobs = [Job("a", 2), Job("b", 3), Job("c", 1), Job("d", 2), Job("e", 4)]
        await asyncio.gather(*(batcher.submit(job) for job in jobs))
        # b (3 rows) does not fit next to a (2), c (1) does; d and e no longer fit: they wait their turn.
        assert engine.batches == [["a", "c"], ["b"], ["d"], ["e"]]
        await batcher.stop()

    run(scenario)


def test_only_jobs_with_the_same_key_are_batched_and_none_keys_run_alone():
    engine = Engine()

    async def scenario():
        batcher = await started_batcher(engine)
        jobs = [
            Job("x1", batch_key="x"),
            Job("y1", batch_key="y"),
            Job("s", batch_key=None),
            Job("x2", batch_key="x"),
        ]
        await asyncio.gather(*(batcher.submit(job) for job in jobs))
        assert engine.batches == [["x1", "x2"], ["y1"], ["s"]]
        await batcher.stop()

    run(scenario)


def test_requests_that_arrive_while_the_engine_works_form_the_next_batch():
    engine = Engine(hold=True)

    async def scenario():
        batcher = await started_batcher(engine, batch_wait_ms=0.0)
        first = batcher.submit(Job("first"))
        await engine_started(engine)
        later = [batcher.submit(Job(f"later{index}")) for index in range(3)]
        assert (batcher.running, batcher.queued) == (1, 3)
        engine.release.set()
        await asyncio.gather(first, *later)
        assert engine.batches == [["first"], ["later0", "later1", "later2"]]
        await batcher.stop()

    run(scenario)


def test_a_full_queue_refuses_at_once_and_cancelled_jobs_are_dropped():
    engine = Engine(hold=True)

    async def scenario():
        batcher = await started_batcher(engine, max_queue_size=2, batch_wait_ms=0.0)
        running = batcher.submit(Job("running"))
        await engine_started(engine)
        gone, kept = batcher.submit(Job("gone")), batcher.submit(Job("kept"))
        with pytest.raises(QueueFullError, match="2 requests are waiting"):
            batcher.submit(Job("refused"))
        gone.cancel()  # its client went away: a free place in the queue, and it never runs
        also = batcher.submit(Job("also"))
        engine.release.set()
        assert await asyncio.gather(running, kept, also) == ["RUNNING", "KEPT", "ALSO"]
        assert engine.batches == [["running"], ["kept", "also"]]
        await batcher.stop()

    run(scenario)


def test_each_job_gets_its_own_error_and_a_crash_fails_only_its_batch():
    def crashing(jobs):
        if jobs[0].name == "crash":
            raise RuntimeError("engine crashed")
        return Engine()(jobs)

    async def scenario():
        batcher = GenerationBatcher(crashing, batch_wait_ms=20.0)
        batcher.start()
        good, bad = batcher.submit(Job("good")), batcher.submit(Job("bad"))
        with pytest.raises(ValueError, match="bad"):
            await bad
        assert await good == "GOOD"
        with pytest.raises(RuntimeError, match="engine crashed"):
            await batcher.submit(Job("crash", batch_key=None))
        assert await batcher.submit(Job("after")) == "AFTER"  # the collector survived
        await batcher.stop()

    run(scenario)


def test_submit_before_start_is_an_error():
    async def scenario():
        with pytest.raises(RuntimeError, match="not started"):
            GenerationBatcher(Engine()).submit(Job("early"))

    run(scenario)
