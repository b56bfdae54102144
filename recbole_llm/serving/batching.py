"""Batching: one worker owns the ONNX Runtime session, and requests waiting when it is free share one call.

When the worker is free it takes every request waiting (up to ``max_batch`` histories) and answers them
with one call, so requests that arrive together share a call and a lone request waits for nobody. An
explained request runs in a call of its own. ``--no-batching`` runs one call per request (the load test
compares).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from recbole_llm.serving.records import Encoded


@dataclass
class Job:
    encoded: Encoded
    ks: list[int]
    exclude: list[bool]
    explain: list[bool]


class Batcher:
    """One worker thread runs the model (``recommender``, a :class:`~recbole_llm.serving.runtime.Recommender`);
    requests waiting when it is free share one call."""

    def __init__(self, recommender, max_rows: int, batching: bool):
        self.recommender = recommender
        self.max_rows = max_rows
        self.batching = batching
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnxruntime")
        self.queue: asyncio.Queue | None = None
        self.worker: asyncio.Task | None = None
        self.calls = 0
        self.rows = 0

    async def start(self) -> None:
        self.queue = asyncio.Queue()
        self.worker = asyncio.create_task(self._work())

    async def stop(self) -> None:
        if self.worker is not None:
            self.worker.cancel()
        self.executor.shutdown(wait=False)

    async def submit(self, job: Job) -> list:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((job, future))
        return await future

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        carried = None
        while True:
            first = carried or await self.queue.get()
            carried = None
            batch, rows = [first], len(first[0].ks)
            # an explained request runs alone: its cost is bounded (max_explained), so is everyone's wait
            while self.batching and not self.queue.empty() and not any(first[0].explain):
                waiting = self.queue.get_nowait()
                if rows + len(waiting[0].ks) > self.max_rows or any(waiting[0].explain):
                    carried = waiting  # first in the next call
                    break
                batch.append(waiting)
                rows += len(waiting[0].ks)
            jobs = [job for job, _ in batch]
            try:
                answers = await loop.run_in_executor(self.executor, self._run, jobs)
            except Exception as error:  # the model failed: every request of this call gets a 500
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            self.calls += 1
            self.rows += rows
            start = 0
            for job, future in batch:
                if not future.done():  # a client that went away leaves a cancelled future
                    future.set_result(answers[start : start + len(job.ks)])
                start += len(job.ks)

    def _run(self, jobs: list[Job]) -> list:
        return self.recommender.rank(
            Encoded.join([job.encoded for job in jobs]),
            [k for job in jobs for k in job.ks],
            [e for job in jobs for e in job.exclude],
            [e for job in jobs for e in job.explain],
        )
