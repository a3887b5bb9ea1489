"""The request queue: requests that arrive together are decoded in one engine call.

Handlers ``submit`` jobs and await their futures. One collector task on the event loop takes the oldest
waiting job, waits up to ``batch_wait_ms`` for jobs with the same ``batch_key`` (until ``max_batch_size``
rows), and hands the batch to ``run_batch`` in a single worker thread. While the engine works, the event
loop stays free (``/health`` answers) and new requests queue up; they form the next batch as soon as the
engine is free, so under load batches fill without waiting.

A job is any object with ``rows`` (its cost in engine rows) and ``batch_key`` (``None``: never batched).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """More requests are waiting than ``max_queue_size``: try again later (HTTP 429)."""


@dataclass
class _Waiting:
    job: Any
    future: asyncio.Future

    @property
    def key(self) -> Hashable | None:
        return self.job.batch_key


class GenerationBatcher:
    """Collects jobs into batches for ``run_batch(jobs) -> results`` (one result or exception per job),
    which runs in a worker thread, one batch at a time."""

    def __init__(
        self,
        run_batch: Callable[[list[Any]], list[Any]],
        max_batch_size: int = 16,
        batch_wait_ms: float = 10.0,
        max_queue_size: int = 64,
    ) -> None:
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.batch_wait = batch_wait_ms / 1000
        self.max_queue_size = max_queue_size
        self._waiting: deque[_Waiting] = deque()
        self._running: list[_Waiting] = []
        self._arrived: asyncio.Event | None = None  # made in start(): an Event belongs to one loop
        self._executor: ThreadPoolExecutor | None = None
        self._collector: asyncio.Task | None = None
        # Counters for /health and tests.
        self.batches = 0
        self.jobs = 0

    @property
    def running(self) -> int:
        """Jobs in the engine now."""
        return len(self._running)

    @property
    def queued(self) -> int:
        """Jobs waiting for the engine."""
        return sum(not entry.future.done() for entry in self._waiting)

    def start(self) -> None:
        """Start the collector on the running event loop (the app's lifespan calls this)."""
        if self._collector is None:
            self._arrived = asyncio.Event()
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="unimm-engine")
            self._collector = asyncio.get_running_loop().create_task(self._collect_forever())

    async def stop(self) -> None:
        if self._collector is not None:
            self._collector.cancel()
            await asyncio.gather(self._collector, return_exceptions=True)
            self._collector = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        for entry in (*self._running, *self._waiting):
            entry.future.cancel()
        self._waiting.clear()

    def submit(self, job: Any) -> asyncio.Future:
        """Queue ``job``; await the returned future for its result. Raises ``QueueFullError`` at once when
        ``max_queue_size`` jobs are waiting. Cancelling the future (a client gone) drops the job if it has
        not started."""
        if self._collector is None:
            raise RuntimeError("the batcher is not started: call start() on the event loop first")
        if self.queued >= self.max_queue_size:
            raise QueueFullError(
                f"{self.queued} requests are waiting for the model (the limit is {self.max_queue_size}); "
                "retry later"
            )
        future = asyncio.get_running_loop().create_future()
        self._waiting.append(_Waiting(job, future))
        self._arrived.set()
        return future

    # ------------------------------------------------------------------ the collector
    async def _collect_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wait_for_batch()
            batch = self._take_batch()
            if not batch:
                continue
            self._running = batch
            try:
                results = await loop.run_in_executor(self._executor, self._run, [e.job for e in batch])
            finally:
                self._running = []
            self.batches += 1
            self.jobs += len(batch)
            for entry, result in zip(batch, results):
                if entry.future.done():  # cancelled while it ran
                    continue
                if isinstance(result, BaseException):
                    entry.future.set_exception(result)
                else:
                    entry.future.set_result(result)

    def _run(self, jobs: list[Any]) -> list[Any]:
        """``run_batch`` that never raises: an unexpected error becomes every job's result."""
        try:
            results = list(self.run_batch(jobs))
            if len(results) != len(jobs):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(jobs)} jobs")
            return results
        except Exception as error:
            logger.exception("a batch of %d jobs failed", len(jobs))
            return [error] * len(jobs)

    async def _wait_for_batch(self) -> None:
        """Wait for a job, then up to ``batch_wait`` for company, unless its batch is already full."""
        while not self._drop_cancelled():
            self._arrived.clear()
            await self._arrived.wait()
        deadline = asyncio.get_running_loop().time() + self.batch_wait
        while self._waiting[0].key is not None and self._batchable_rows() < self.max_batch_size:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:  # not the builtin before Python 3.11
                return

    def _drop_cancelled(self) -> int:
        self._waiting = deque(entry for entry in self._waiting if not entry.future.done())
        return len(self._waiting)

    def _batchable_rows(self) -> int:
        key = self._waiting[0].key
        return sum(entry.job.rows for entry in self._waiting if entry.key == key)

    def _take_batch(self) -> list[_Waiting]:
        """The oldest job and, in arrival order, the jobs with its key that fit in ``max_batch_size``."""
        if not self._drop_cancelled():
            return []
        first = self._waiting.popleft()
        batch, rows, kept = [first], first.job.rows, deque()
        for entry in self._waiting:
            if (
                first.key is not None
                and entry.key == first.key
                and rows + entry.job.rows <= self.max_batch_size
            ):
                batch.append(entry)
                rows += entry.job.rows
            else:
                kept.append(entry)
        self._waiting = kept
        return batch
