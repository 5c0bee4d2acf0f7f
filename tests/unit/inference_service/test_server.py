"""The gRPC server on a real loopback port: contract, errors, health, streaming."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inference_service.config import ServiceSection, ServiceSettings
from inference_service.server import SERVICE_NAME, RunningServer, run_server
from protos.radbridge.v1 import inference_pb2 as pb
from protos.radbridge.v1 import inference_pb2_grpc as pb_grpc
from radbridge.synth import phantom_hu

CHUNK = 256 * 1024


@pytest.fixture
async def server() -> AsyncIterator[RunningServer]:
    running = await run_server(ServiceSettings(inference_service=ServiceSection(port=0, chunk_bytes=CHUNK)))
    yield running
    await running.stop(0)


def _requests(voxels: np.ndarray, tasks: list[int], modality: str = "CT", total: int | None = None):
    data = voxels.astype("<i2").tobytes()
    s, r, c = voxels.shape
    header = pb.VolumeHeader(
        spec=pb.AnalysisSpec(tasks=tasks, correlation_id="t1"),
        geometry=pb.Geometry(
            slices=s,
            rows=r,
            columns=c,
            samples_per_pixel=1,
            slice_spacing_mm=2.5,
            row_spacing_mm=0.7,
            column_spacing_mm=0.7,
            image_orientation_patient=[1, 0, 0, 0, 1, 0],
            image_position_patient=[0, 0, 0],
            modality=modality,
            pixel_type=pb.PIXEL_TYPE_INT16,
            rescaled=True,
        ),
        total_bytes=len(data) if total is None else total,
    )
    yield pb.AnalyzeVolumeRequest(header=header)
    for off in range(0, len(data), CHUNK):
        yield pb.AnalyzeVolumeRequest(chunk=pb.PixelChunk(offset=off, data=data[off : off + CHUNK]))


async def test_analyze_streams_progress_masks_then_result(server: RunningServer) -> None:
    hu = phantom_hu(8)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        kinds, chunks, result = [], {}, None
        async for msg in stub.AnalyzeVolume(_requests(hu, [pb.TASK_KIND_SEGMENT, pb.TASK_KIND_REPORT])):
            kind = msg.WhichOneof("payload")
            kinds.append(kind)
            if kind == "mask_chunk":
                assert len(msg.mask_chunk.data) <= CHUNK
                chunks.setdefault(msg.mask_chunk.segment_number, bytearray()).extend(msg.mask_chunk.data)
            elif kind == "result":
                result = msg.result
    assert kinds[0] == "progress" and kinds[-1] == "result"
    assert result.model.name == "reference" and result.model.non_clinical
    seg, report = result.tasks
    assert report.report.findings.startswith("Threshold analysis")
    for info in seg.masks:
        packed = bytes(chunks[info.segment_number])
        assert len(packed) == info.packed_bytes
        bits = np.unpackbits(np.frombuffer(packed, np.uint8), count=hu.size)
        assert int(bits.sum()) == info.voxel_count


@pytest.mark.parametrize(
    ("requests_factory", "code", "text"),
    [
        (lambda hu: _requests(hu, []), grpc.StatusCode.INVALID_ARGUMENT, "names no task"),
        (
            lambda hu: _requests(hu, [pb.TASK_KIND_SEGMENT], total=5),
            grpc.StatusCode.INVALID_ARGUMENT,
            "total_bytes",
        ),
        (lambda hu: _requests(hu, [pb.TASK_KIND_VQA]), grpc.StatusCode.FAILED_PRECONDITION, "cannot do task"),
        (
            lambda hu: _requests(hu, [pb.TASK_KIND_SEGMENT], modality="MR"),
            grpc.StatusCode.FAILED_PRECONDITION,
            "modality",
        ),
        (
            lambda hu: iter([pb.AnalyzeVolumeRequest(chunk=pb.PixelChunk())]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "header",
        ),
        (
            lambda hu: list(_requests(hu, [pb.TASK_KIND_SEGMENT]))[:-1],
            grpc.StatusCode.INVALID_ARGUMENT,
            "Stream ended",
        ),
    ],
)
async def test_bad_requests_get_specific_codes(server: RunningServer, requests_factory, code, text) -> None:  # noqa: ANN001
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stub.AnalyzeVolume(iter(requests_factory(phantom_hu(2)))):
                pass
    assert info.value.code() == code
    assert text in info.value.details()


async def test_unknown_model_is_not_found(server: RunningServer) -> None:
    def reqs():
        messages = list(_requests(phantom_hu(2), [pb.TASK_KIND_SEGMENT]))
        messages[0].header.spec.model = "ghost"
        yield from messages

    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stub.AnalyzeVolume(reqs()):
                pass
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "ghost" in info.value.details()


async def test_list_models_and_health(server: RunningServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        models = await pb_grpc.InferenceServiceStub(channel).ListModels(pb.ListModelsRequest())
        health = health_pb2_grpc.HealthStub(channel)
        status = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
    (m,) = models.models
    assert m.identity.name == "reference" and m.is_default and m.ready
    assert set(m.modalities) == {"CT", "CR", "DX"}
    assert pb.TASK_KIND_SEGMENT in m.tasks
    assert status.status == health_pb2.HealthCheckResponse.SERVING


async def test_deadline_reaches_the_client_and_the_queued_work_is_dropped() -> None:
    import asyncio

    from dicom_node.client import InferenceClient, make_spec
    from dicom_node.errors import InferenceUnavailable
    from dicom_node.volume import SeriesVolume
    from inference_service.backends.registry import ModelRegistry
    from tests.unit.inference_service.test_scheduler import EchoBackend

    backend = EchoBackend()
    backend.gate.clear()  # the model is busy
    registry = ModelRegistry(models={"echo": backend}, default="echo")
    running = await run_server(
        ServiceSettings(inference_service=ServiceSection(port=0, max_batch=1, batch_wait_ms=0)), registry
    )
    try:
        volume = SeriesVolume(
            np.zeros((1, 2, 2), np.float32),
            (1, 1, 1),
            (1, 0, 0, 0, 1, 0),
            (0, 0, 0),
            "CT",
            True,
            "",
            None,
            [],
        )
        client = InferenceClient(f"127.0.0.1:{running.port}", deadline_s=0.5, connect_retries=0)
        first = asyncio.to_thread(client.analyze, volume, make_spec(["report"], correlation_id="a"))
        second = asyncio.to_thread(client.analyze, volume, make_spec(["report"], correlation_id="b"))
        outcomes = await asyncio.gather(first, second, return_exceptions=True)
        client.close()
        assert all(isinstance(o, InferenceUnavailable) and "DEADLINE_EXCEEDED" in str(o) for o in outcomes)
        backend.gate.set()  # the model frees up: abandoned requests must not run
        await asyncio.sleep(0.3)
        assert len(backend.batches) <= 1  # at most the one already running when the deadline hit
    finally:
        backend.gate.set()
        await running.stop(0)


@pytest.mark.parametrize("continuous", [False, True])
async def test_grpc_deadline_reaches_the_work_item_and_tasks_are_queued_together(
    server: RunningServer, continuous: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backend sees the caller's deadline (the engine stops a request past it). A continuous
    backend (a generation engine) gets all tasks before the first result, so it can batch them;
    a backend that runs one batch at a time gets them in turn."""
    import time

    from inference_service.backends.reference import ReferenceBackend

    monkeypatch.setattr(ReferenceBackend, "continuous", property(lambda self: continuous))

    seen: list[tuple[object, float | None, int]] = []
    finished: list[object] = []
    real = server.scheduler.submit

    async def recording(backend, item, task, progress=None):  # noqa: ANN001, ANN202
        seen.append((task, item.deadline, len(finished)))
        result = await real(backend, item, task, progress)
        finished.append(task)
        return result

    server.scheduler.submit = recording  # type: ignore[method-assign]
    hu = phantom_hu(8)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        started = time.monotonic()
        call = stub.AnalyzeVolume(_requests(hu, [pb.TASK_KIND_SEGMENT, pb.TASK_KIND_REPORT]), timeout=60)
        kinds = [msg.WhichOneof("payload") async for msg in call]
        assert kinds[-1] == "result"
        untimed = [m async for m in stub.AnalyzeVolume(_requests(hu, [pb.TASK_KIND_REPORT]))]
        assert untimed[-1].WhichOneof("payload") == "result"
    (_, d1, _), (_, d2, done_before_second), (_, d3, _) = seen
    assert done_before_second == (0 if continuous else 1)
    assert d1 is not None and started + 50 < d1 < started + 61 and d1 == d2
    assert d3 is None


async def test_the_volume_is_released_before_the_masks_are_sent(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sending holds the masks, not the voxels: nothing in the servicer (the WorkItem included)
    keeps the volume once the results exist. A 300-slice CT kept 180 MB more when it did."""
    import gc
    import weakref

    from inference_service import servicer

    voxels: list[weakref.ref] = []
    real = servicer.receive_volume

    async def recording(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        spec, volume = await real(*args, **kwargs)
        voxels.append(weakref.ref(volume.voxels))
        return spec, volume

    monkeypatch.setattr(servicer, "receive_volume", recording)
    alive_at_first_mask = None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        async for msg in stub.AnalyzeVolume(_requests(phantom_hu(8), [pb.TASK_KIND_SEGMENT, pb.TASK_KIND_REPORT])):
            if msg.WhichOneof("payload") == "mask_chunk" and alive_at_first_mask is None:
                gc.collect()
                alive_at_first_mask = voxels[0]() is not None
    assert alive_at_first_mask is False
