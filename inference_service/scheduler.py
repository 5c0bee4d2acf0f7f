"""Per-(model, task) queues with micro-batching, deadlines and cancellation.

Requests for the same model and task that arrive within ``batch_wait_ms`` of
each other run as one batch (up to ``max_batch``, or the backend's own smaller
``max_batch``: several CT volumes fit one forward pass only as far as memory allows). Backends run in one worker
thread per model so the event loop stays responsive; a request whose caller
has gone away is dropped before it runs.

A model runs up to its backend's ``concurrency`` batches at once (1 unless it
has replicas on several devices or a generation engine), shared by its lanes. A
*continuous* backend (the generation engine) batches across calls itself, token
by token: its lanes hand each item over at once, so report, VQA and detection
requests for one model share the engine's running batch. A caller that goes
away sets the item's cancel event, and the engine drops the request at its next
step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from inference_service.backends.base import Backend, WorkItem
from inference_service.errors import QueueFull, UnsupportedTask
from inference_service.types import TaskKind, TaskResult

logger = logging.getLogger(__name__)

ProgressSink = Callable[[float, str], None]


@dataclass
class _Pending:
    item: WorkItem
    future: asyncio.Future[TaskResult]
    progress: ProgressSink | None = None


@dataclass
class _Lane:
    queue: asyncio.Queue[_Pending]
    worker: asyncio.Task[None] | None = None
    batches: list[int] = field(default_factory=list)  # sizes of batches run, for tests/bench
    waiting: int = 0  # taken from the queue, waiting for a run slot: still counts as queued


class Scheduler:
    """Routes work items to backends in micro-batches."""

    def __init__(self, max_batch: int = 4, batch_wait_ms: int = 20, queue_size: int = 64) -> None:
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_ms / 1000.0
        self.queue_size = queue_size
        self._lanes: dict[tuple[str, TaskKind], _Lane] = {}
        self._executors: dict[str, ThreadPoolExecutor] = {}
        self._backends: dict[str, Backend] = {}
        self._inflight: dict[str, asyncio.Semaphore] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def lane_batches(self, model: str, task: TaskKind) -> list[int]:
        lane = self._lanes.get((model, task))
        return list(lane.batches) if lane else []

    async def submit(
        self, backend: Backend, item: WorkItem, task: TaskKind, progress: ProgressSink | None = None
    ) -> TaskResult:
        """Queue one item and wait for its result (cancel the await to withdraw it)."""
        if task not in backend.tasks:
            raise UnsupportedTask(f"Model {backend.config.name!r} cannot do task {task.value!r}.")
        modality = item.volume.geometry.modality
        if modality not in backend.modalities:
            raise UnsupportedTask(f"Model {backend.config.name!r} does not accept modality {modality!r}.")
        name = backend.config.name
        self._backends[name] = backend
        lane = self._lane(name, task)
        future: asyncio.Future[TaskResult] = asyncio.get_running_loop().create_future()
        if item.cancel is None:
            item = dataclasses.replace(item, cancel=threading.Event())
        cancel = item.cancel
        future.add_done_callback(lambda f: cancel.set() if f.cancelled() else None)
        try:
            if lane.queue.qsize() + lane.waiting >= self.queue_size:
                raise asyncio.QueueFull
            lane.queue.put_nowait(_Pending(item, future, progress))
        except asyncio.QueueFull as exc:
            raise QueueFull(f"The queue of {name}/{task.value} is full ({self.queue_size}).") from exc
        return await future

    def _lane(self, name: str, task: TaskKind) -> _Lane:
        key = (name, task)
        lane = self._lanes.get(key)
        if lane is None:
            lane = _Lane(queue=asyncio.Queue(self.queue_size))
            lane.worker = asyncio.create_task(self._drain(name, task, lane), name=f"lane-{name}-{task.value}")
            self._lanes[key] = lane
        return lane

    async def _collect(self, lane: _Lane, limit: int, first: _Pending) -> list[_Pending]:
        batch = [first]
        deadline = asyncio.get_running_loop().time() + self.batch_wait_s
        while len(batch) < limit:
            timeout = deadline - asyncio.get_running_loop().time()
            if timeout <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(lane.queue.get(), timeout))
            except TimeoutError:
                break
        return [p for p in batch if not p.future.done()]  # drop cancelled callers

    def _executor(self, name: str) -> ThreadPoolExecutor:
        executor = self._executors.get(name)
        if executor is None:
            workers = max(1, self._backends[name].concurrency)
            executor = ThreadPoolExecutor(workers, thread_name_prefix=f"model-{name}")
            self._executors[name] = executor
        return executor

    async def _drain(self, name: str, task: TaskKind, lane: _Lane) -> None:
        """Wait for an item and a free run slot, collect the batch, start it, repeat.

        With concurrency 1 this is run-then-collect (arrivals during a run form the next batch);
        a continuous backend takes items one by one as soon as one of its slots frees up.
        """
        executor = self._executor(name)
        backend = self._backends[name]
        limit = self._inflight.setdefault(name, asyncio.Semaphore(max(1, backend.concurrency)))
        while True:
            first = await lane.queue.get()  # the model's run slots are shared by its lanes: wait for work first
            lane.waiting = 1
            try:
                await limit.acquire()
            finally:
                lane.waiting = 0
            started = False
            try:
                backend = self._backends[name]
                if backend.continuous:
                    batch = [] if first.future.done() else [first]
                else:
                    most = min(self.max_batch, backend.max_batch) if backend.max_batch > 0 else self.max_batch
                    batch = await self._collect(lane, most, first)
                del first
                if batch:
                    job = asyncio.create_task(self._run_and_release(name, task, lane, executor, batch, limit))
                    self._tasks.add(job)
                    job.add_done_callback(self._tasks.discard)
                    started = True
                # Let go of the batch before waiting for the next: a lane holding its last items would
                # keep their volumes (and the backend's per-volume memo) alive between requests.
                del batch
            finally:
                if not started:
                    limit.release()

    async def _run_and_release(
        self,
        name: str,
        task: TaskKind,
        lane: _Lane,
        executor: ThreadPoolExecutor,
        batch: list[_Pending],
        limit: asyncio.Semaphore,
    ) -> None:
        try:
            await self._run_batch(name, task, lane, executor, batch)
        finally:
            limit.release()

    async def _run_batch(
        self, name: str, task: TaskKind, lane: _Lane, executor: ThreadPoolExecutor, batch: list[_Pending]
    ) -> None:
        loop = asyncio.get_running_loop()
        backend = self._backends[name]
        sinks = [p.progress for p in batch if p.progress]

        def progress(fraction: float, message: str, sinks: list[ProgressSink] = sinks) -> None:
            for sink in sinks:
                loop.call_soon_threadsafe(sink, fraction, message)

        lane.batches.append(len(batch))
        try:
            results = await loop.run_in_executor(
                executor, backend.run, [p.item for p in batch], task, progress
            )
        except Exception as exc:  # handed to each caller, translated at the servicer
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        for p, r in zip(batch, results, strict=True):
            if not p.future.done():
                p.future.set_result(r)

    async def close(self) -> None:
        for lane in self._lanes.values():
            if lane.worker:
                lane.worker.cancel()
        for job in list(self._tasks):
            job.cancel()
        for executor in self._executors.values():
            executor.shutdown(wait=False, cancel_futures=True)
