"""gRPC client of the inference service: chunked upload, progress, deadline, retry.

grpc errors are translated here, once: UNAVAILABLE / DEADLINE_EXCEEDED /
RESOURCE_EXHAUSTED -> InferenceUnavailable (the job retries); anything else ->
InferenceRejected (the job fails with the service's message).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc
import numpy as np

from dicom_node.errors import InferenceRejected, InferenceUnavailable
from dicom_node.volume import SeriesVolume
from protos.radbridge.v1 import inference_pb2 as pb
from protos.radbridge.v1 import inference_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
TASKS = {
    "report": pb.TASK_KIND_REPORT,
    "vqa": pb.TASK_KIND_VQA,
    "classify": pb.TASK_KIND_CLASSIFY,
    "detect": pb.TASK_KIND_DETECT,
    "segment": pb.TASK_KIND_SEGMENT,
    "embed": pb.TASK_KIND_EMBED,
}
ProgressHandler = Callable[[pb.Progress], None]


@dataclass
class AnalysisOutcome:
    """The final result plus the unpacked masks (segment number -> bool volume)."""

    result: pb.AnalysisResult
    masks: dict[int, np.ndarray] = field(default_factory=dict)


def _pixel_payload(volume: SeriesVolume) -> tuple[int, bytes]:
    v = volume.voxels
    if volume.rescaled and np.all(np.mod(v, 1) == 0) and v.min() >= -32768 and v.max() <= 32767:
        return pb.PIXEL_TYPE_INT16, v.astype("<i2").tobytes()
    if not volume.rescaled and v.min() >= 0 and v.max() <= 65535 and np.all(np.mod(v, 1) == 0):
        return pb.PIXEL_TYPE_UINT16, v.astype("<u2").tobytes()
    return pb.PIXEL_TYPE_FLOAT32, v.astype("<f4").tobytes()


def build_header(volume: SeriesVolume, spec: pb.AnalysisSpec, pixel_type: int, total: int) -> pb.VolumeHeader:
    s, r, c = volume.voxels.shape
    window = volume.window or (0.0, 0.0)
    geometry = pb.Geometry(
        slices=s,
        rows=r,
        columns=c,
        samples_per_pixel=1,
        slice_spacing_mm=volume.spacing_mm[0],
        row_spacing_mm=volume.spacing_mm[1],
        column_spacing_mm=volume.spacing_mm[2],
        image_orientation_patient=list(volume.orientation),
        image_position_patient=list(volume.position),
        modality=volume.modality,
        photometric_interpretation="MONOCHROME2",
        pixel_type=pixel_type,
        rescaled=volume.rescaled,
        body_part=volume.body_part,
        window_center=window[0],
        window_width=window[1],
    )
    return pb.VolumeHeader(spec=spec, geometry=geometry, total_bytes=total)


def request_stream(
    header: pb.VolumeHeader, data: bytes, chunk_bytes: int
) -> Iterator[pb.AnalyzeVolumeRequest]:
    yield pb.AnalyzeVolumeRequest(header=header)
    view = memoryview(data)
    for off in range(0, len(data), chunk_bytes):
        yield pb.AnalyzeVolumeRequest(
            chunk=pb.PixelChunk(offset=off, data=bytes(view[off : off + chunk_bytes]))
        )


def make_spec(
    tasks: list[str],
    model: str = "",
    question: str = "",
    labels: list[str] | None = None,
    language: str = "en",
    correlation_id: str = "",
) -> pb.AnalysisSpec:
    return pb.AnalysisSpec(
        model=model,
        tasks=[TASKS[t] for t in tasks],
        question=question,
        labels=labels or [],
        language=language,
        correlation_id=correlation_id,
    )


def unpack_masks(
    result: pb.AnalysisResult, chunks: dict[int, bytearray], shape: tuple[int, ...]
) -> dict[int, np.ndarray]:
    masks: dict[int, np.ndarray] = {}
    for task in result.tasks:
        for info in task.masks:
            data = chunks.get(info.segment_number, bytearray())
            if len(data) != info.packed_bytes:
                raise InferenceRejected(
                    f"Mask {info.segment_number} arrived with {len(data)} of {info.packed_bytes} bytes."
                )
            n = int(np.prod(shape))
            bits = np.unpackbits(np.frombuffer(bytes(data), dtype=np.uint8), count=n)
            masks[info.segment_number] = bits.reshape(shape).astype(bool)
    return masks


class InferenceClient:
    """A channel to one inference service."""

    def __init__(
        self, address: str, deadline_s: float = 600.0, connect_retries: int = 3, chunk_bytes: int = 1 << 20
    ):
        self.address = address
        self.deadline_s = deadline_s
        self.connect_retries = connect_retries
        self.chunk_bytes = chunk_bytes
        self._channel = grpc.insecure_channel(
            address,
            options=[("grpc.max_receive_message_length", 8 * 1024 * 1024)],
        )
        self._stub = pb_grpc.InferenceServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def list_models(self, timeout_s: float = 10.0) -> pb.ListModelsResponse:
        try:
            return self._stub.ListModels(pb.ListModelsRequest(), timeout=timeout_s, wait_for_ready=True)
        except grpc.RpcError as exc:
            raise self._translate(exc) from exc

    def analyze(
        self, volume: SeriesVolume, spec: pb.AnalysisSpec, on_progress: ProgressHandler | None = None
    ) -> AnalysisOutcome:
        """Stream one volume and collect the result; retries UNAVAILABLE a few times."""
        pixel_type, data = _pixel_payload(volume)
        header = build_header(volume, spec, pixel_type, len(data))
        attempt = 0
        while True:
            attempt += 1
            try:
                return self._analyze_once(header, data, volume.voxels.shape, on_progress)
            except grpc.RpcError as exc:
                error = self._translate(exc)
                if isinstance(error, InferenceUnavailable) and attempt <= self.connect_retries:
                    delay = min(2.0 ** (attempt - 1), 10.0)
                    logger.warning(
                        "inference unavailable, retrying",
                        extra={"event": "inference.retry", "attempt": attempt, "delay_s": delay},
                    )
                    time.sleep(delay)
                    continue
                raise error from exc

    def _analyze_once(
        self,
        header: pb.VolumeHeader,
        data: bytes,
        shape: tuple[int, ...],
        on_progress: ProgressHandler | None,
    ) -> AnalysisOutcome:
        chunks: dict[int, bytearray] = {}
        result: pb.AnalysisResult | None = None
        responses = self._stub.AnalyzeVolume(
            request_stream(header, data, self.chunk_bytes), timeout=self.deadline_s
        )
        for response in responses:
            kind = response.WhichOneof("payload")
            if kind == "progress" and on_progress:
                on_progress(response.progress)
            elif kind == "mask_chunk":
                buf = chunks.setdefault(response.mask_chunk.segment_number, bytearray())
                if response.mask_chunk.offset != len(buf):
                    raise InferenceRejected("Mask chunks arrived out of order.")
                buf.extend(response.mask_chunk.data)
            elif kind == "result":
                result = response.result
        if result is None:
            raise InferenceUnavailable("The inference stream ended without a result.")
        return AnalysisOutcome(result=result, masks=unpack_masks(result, chunks, shape))

    @staticmethod
    def _translate(exc: grpc.RpcError) -> InferenceUnavailable | InferenceRejected:
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        details = exc.details() if hasattr(exc, "details") else str(exc)
        message = f"{code.name}: {details}"
        if code in RETRYABLE:
            return InferenceUnavailable(message)
        return InferenceRejected(message)
