from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import numpy as np
import pytest

from inference_service.backends.base import Backend, ModelConfig, ProgressCallback, WorkItem
from inference_service.errors import QueueFull, UnsupportedTask
from inference_service.scheduler import Scheduler
from inference_service.types import AnalysisSpec, Geometry, ModelIdentity, TaskKind, TaskResult, Volume


class EchoBackend(Backend):
    """Answers each item with its correlation id; blocks until released, to shape batches."""

    kind = "echo"

    def __init__(self) -> None:
        super().__init__(ModelConfig(name="echo", backend="echo"))
        self.gate = threading.Event()
        self.gate.set()
        self.batches: list[list[str]] = []

    tasks = frozenset({TaskKind.REPORT})  # type: ignore[assignment]
    modalities = frozenset({"CT"})  # type: ignore[assignment]
    identity = ModelIdentity("echo", "echo", "1")  # type: ignore[assignment]

    def run(
        self, batch: Sequence[WorkItem], task: TaskKind, progress: ProgressCallback | None = None
    ) -> list[TaskResult]:
        self.gate.wait(5)
        self.batches.append([i.spec.correlation_id for i in batch])
        if progress:
            progress(1.0, "done")
        return [TaskResult(task=task, answer=i.spec.correlation_id) for i in batch]


def _item(cid: str, modality: str = "CT") -> WorkItem:
    g = Geometry((1, 2, 2), (1, 1, 1), (1, 0, 0, 0, 1, 0), (0, 0, 0), modality)
    return WorkItem(
        Volume(np.zeros((1, 2, 2), np.float32), g),
        AnalysisSpec("echo", (TaskKind.REPORT,), correlation_id=cid),
    )


async def test_concurrent_requests_are_micro_batched_in_order() -> None:
    backend = EchoBackend()
    sched = Scheduler(max_batch=4, batch_wait_ms=50)
    seen: list[str] = []
    results = await asyncio.gather(
        *[
            sched.submit(backend, _item(str(i)), TaskKind.REPORT, lambda f, m: seen.append(m))
            for i in range(6)
        ]
    )
    await sched.close()
    assert [r.answer for r in results] == [str(i) for i in range(6)]
    assert backend.batches == [["0", "1", "2", "3"], ["4", "5"]]
    assert seen.count("done") == 6


async def test_cancelled_request_is_dropped_before_it_runs() -> None:
    backend = EchoBackend()
    backend.gate.clear()
    sched = Scheduler(max_batch=1, batch_wait_ms=0)
    first = asyncio.ensure_future(sched.submit(backend, _item("a"), TaskKind.REPORT))
    await asyncio.sleep(0.05)  # "a" is running (blocked on the gate)
    second = asyncio.ensure_future(sched.submit(backend, _item("b"), TaskKind.REPORT))
    await asyncio.sleep(0.01)
    second.cancel()  # the client went away while queued
    backend.gate.set()
    assert (await first).answer == "a"
    await asyncio.sleep(0.1)
    await sched.close()
    assert backend.batches == [["a"]]


async def test_queue_bound_and_capabilities() -> None:
    backend = EchoBackend()
    backend.gate.clear()
    sched = Scheduler(max_batch=1, batch_wait_ms=0, queue_size=1)
    running = asyncio.ensure_future(sched.submit(backend, _item("a"), TaskKind.REPORT))
    await asyncio.sleep(0.05)
    queued = asyncio.ensure_future(sched.submit(backend, _item("b"), TaskKind.REPORT))
    await asyncio.sleep(0.01)
    with pytest.raises(QueueFull):
        await sched.submit(backend, _item("c"), TaskKind.REPORT)
    with pytest.raises(UnsupportedTask, match="task"):
        await sched.submit(backend, _item("d"), TaskKind.SEGMENT)
    with pytest.raises(UnsupportedTask, match="modality"):
        await sched.submit(backend, _item("e", "MR"), TaskKind.REPORT)
    backend.gate.set()
    await asyncio.gather(running, queued)
    await sched.close()


async def test_backend_max_batch_caps_the_lane() -> None:
    backend = EchoBackend()
    backend.max_batch = 2  # e.g. two CT volumes per forward pass is what fits in memory
    sched = Scheduler(max_batch=4, batch_wait_ms=50)
    results = await asyncio.gather(*[sched.submit(backend, _item(str(i)), TaskKind.REPORT) for i in range(5)])
    await sched.close()
    assert [r.answer for r in results] == [str(i) for i in range(5)]
    assert backend.batches == [["0", "1"], ["2", "3"], ["4"]]
