"""InferenceServicer: proto <-> domain only; errors become gRPC codes here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from inference_service.assembly import (
    TASK_TO_PB,
    identity_to_pb,
    mask_chunks,
    receive_volume,
    result_to_pb,
)
from inference_service.backends.base import WorkItem
from inference_service.backends.registry import ModelRegistry
from inference_service.config import ServiceSection
from inference_service.errors import InferenceError, to_grpc_status
from inference_service.scheduler import Scheduler
from inference_service.types import AnalysisResult, TaskResult
from protos.radbridge.v1 import inference_pb2 as pb
from protos.radbridge.v1 import inference_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)
Stage = pb.Progress.Stage


def _progress(stage: int, fraction: float, message: str) -> pb.AnalyzeVolumeResponse:
    return pb.AnalyzeVolumeResponse(progress=pb.Progress(stage=stage, fraction=fraction, message=message))


async def _drain(requests: AsyncIterator[pb.AnalyzeVolumeRequest], limit_s: float = 10.0) -> None:
    """Read what the client is still sending, so it sees our status, not a broken stream."""

    async def consume() -> None:
        async for _ in requests:
            pass

    with contextlib.suppress(TimeoutError, grpc.RpcError, StopAsyncIteration):
        await asyncio.wait_for(consume(), limit_s)


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    def __init__(self, registry: ModelRegistry, scheduler: Scheduler, section: ServiceSection) -> None:
        self.registry = registry
        self.scheduler = scheduler
        self.section = section

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        out = pb.ListModelsResponse()
        for name, backend in self.registry.models.items():
            out.models.add(
                identity=identity_to_pb(backend.identity),
                tasks=sorted(TASK_TO_PB[t] for t in backend.tasks),
                modalities=sorted(backend.modalities),
                ready=True,
                is_default=name == self.registry.default,
            )
        return out

    async def AnalyzeVolume(
        self, request_iterator: AsyncIterator[pb.AnalyzeVolumeRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.AnalyzeVolumeResponse]:
        started = time.monotonic()
        try:
            spec, volume = await receive_volume(request_iterator, self.section.max_volume_bytes)
            backend = self.registry.get(spec.model)
            yield _progress(Stage.RECEIVING, 1.0, f"received {volume.geometry.shape}")
            events: asyncio.Queue[pb.AnalyzeVolumeResponse] = asyncio.Queue()

            def sink(fraction: float, message: str) -> None:
                events.put_nowait(_progress(Stage.RUNNING, fraction, message))

            remaining = context.time_remaining()
            item = WorkItem(volume, spec, deadline=None if remaining is None else time.monotonic() + remaining)
            # A generation engine gets every task at once: it batches report, VQA and detection of
            # this image together and prefills the image once. Other backends run one batch at a
            # time: their tasks go in turn, as they always have.
            waves = [list(spec.tasks)] if backend.continuous else [[t] for t in spec.tasks]
            jobs: list[asyncio.Future[TaskResult]] = []
            getter: asyncio.Future[pb.AnalyzeVolumeResponse] | None = None
            try:
                for wave in waves:
                    for task in wave:
                        yield _progress(Stage.QUEUED, len(jobs) / len(spec.tasks), f"{task.value} queued")
                        jobs.append(asyncio.ensure_future(self.scheduler.submit(backend, item, task, sink)))
                    pending: set[asyncio.Future[Any]] = set(jobs[-len(wave) :])
                    while pending:
                        getter = asyncio.ensure_future(events.get())
                        done, _ = await asyncio.wait(pending | {getter}, return_when=asyncio.FIRST_COMPLETED)
                        if getter.done():
                            yield getter.result()
                        else:
                            getter.cancel()
                        pending -= done
                        failed = [j for j in done if j is not getter and not j.cancelled() and j.exception()]
                        if failed:
                            raise failed[0].exception()  # type: ignore[misc]
                while not events.empty():
                    yield events.get_nowait()
                results: list[TaskResult] = [job.result() for job in jobs]
            finally:
                for job in jobs:
                    job.cancel()  # client gone or error: withdraw from the queue
                if getter is not None:
                    getter.cancel()  # never leave the progress reader pending
            numbers = [m.segment_number for r in results for m in r.masks]
            if len(numbers) != len(set(numbers)):
                raise RuntimeError("The model returned duplicate segment numbers.")  # a backend bug: INTERNAL
            # Let go of the volume, then of each mask once sent (masks counted as they are packed),
            # so that sending holds one mask, not the whole analysis.
            final = pb.AnalyzeVolumeResponse(
                result=result_to_pb(AnalysisResult(backend.identity, results), count_voxels=False)
            )
            masks = [m for r in results for m in r.masks]
            for r in results:
                r.masks.clear()
            del volume, item  # the WorkItem holds the voxels too (and the backend's memo follows them)
            yield _progress(Stage.SENDING, 0.0, "sending results")
            counts: dict[int, int] = {}
            for chunk in mask_chunks(masks, self.section.chunk_bytes, counts):
                yield chunk
            for task_msg in final.result.tasks:
                for info in task_msg.masks:
                    info.voxel_count = counts[info.segment_number]
            # Logged before the last message: a client that has what it needs may close the stream
            # without asking for more, and the generator is then never resumed past this yield.
            logger.info(
                "analysis done",
                extra={
                    "event": "analysis.done",
                    "correlation_id": spec.correlation_id,
                    "model": backend.config.name,
                    "duration_ms": round(1000 * (time.monotonic() - started)),
                },
            )
            yield final
        except InferenceError as exc:
            await _drain(request_iterator)
            code, message = to_grpc_status(exc)
            logger.warning(
                "analysis rejected",
                extra={"event": "analysis.rejected", "status": code.name, "reason": exc.reason},
            )
            await context.abort(code, message)
        except asyncio.CancelledError:
            logger.info("analysis cancelled", extra={"event": "analysis.cancelled"})
            raise
        except Exception:
            logger.exception("analysis failed", extra={"event": "analysis.failed"})
            code, message = grpc.StatusCode.INTERNAL, "INTERNAL: unexpected error in the inference service"
            await context.abort(code, message)
