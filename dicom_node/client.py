"""gRPC client of the inference service: chunked upload, progress, deadline, retry.

grpc errors are translated here, once: UNAVAILABLE / DEADLINE_EXCEEDED /
RESOURCE_EXHAUSTED -> InferenceUnavailable (the job retries); anything else ->
InferenceRejected (the job fails with the service's message). With [inference]
TLS keys the channel is TLS (mutual when a client certificate is given); a
refused handshake surfaces as UNAVAILABLE, hence InferenceUnavailable.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc
import numpy as np

from dicom_node.config import InferenceSection
from dicom_node.errors import InferenceRejected, InferenceUnavailable
from dicom_node.masks import FractionalMask, PackedMask
from dicom_node.volume import SeriesVolume
from protos.radbridge.v1 import inference_pb2 as pb
from protos.radbridge.v1 import inference_pb2_grpc as pb_grpc
from radbridge_common.tls import pem_ca, pem_pair

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
    """The final result plus its masks (segment number -> bit-packed bool volume, or probability map)."""

    result: pb.AnalysisResult
    masks: dict[int, PackedMask | FractionalMask] = field(default_factory=dict)


def _pixel_payload(volume: SeriesVolume) -> tuple[int, memoryview]:
    """The voxels as wire bytes: int16 volumes (CT in HU) are sent as they are, without a copy."""
    v = volume.voxels
    if v.dtype == np.int16:
        return pb.PIXEL_TYPE_INT16, memoryview(np.ascontiguousarray(v)).cast("B")
    if volume.rescaled and np.all(np.mod(v, 1) == 0) and v.min() >= -32768 and v.max() <= 32767:
        return pb.PIXEL_TYPE_INT16, memoryview(v.astype("<i2")).cast("B")
    if not volume.rescaled and v.min() >= 0 and v.max() <= 65535 and np.all(np.mod(v, 1) == 0):
        return pb.PIXEL_TYPE_UINT16, memoryview(v.astype("<u2")).cast("B")
    return pb.PIXEL_TYPE_FLOAT32, memoryview(np.ascontiguousarray(v, dtype="<f4")).cast("B")


@dataclass
class Upload:
    """One volume ready to send: the header and the voxel bytes, which the client lets go of as
    soon as the service has them all (so the node holds no volume while the model runs)."""

    header: pb.VolumeHeader
    data: memoryview | None
    shape: tuple[int, ...]

    @classmethod
    def of(cls, volume: SeriesVolume, spec: pb.AnalysisSpec) -> Upload:
        pixel_type, data = _pixel_payload(volume)
        return cls(build_header(volume, spec, pixel_type, len(data)), data, tuple(volume.voxels.shape))


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
    header: pb.VolumeHeader, data: bytes | memoryview, chunk_bytes: int
) -> Iterator[pb.AnalyzeVolumeRequest]:
    yield pb.AnalyzeVolumeRequest(header=header)
    view = memoryview(data).cast("B")
    for off in range(0, len(view), chunk_bytes):
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
) -> dict[int, PackedMask | FractionalMask]:
    """The masks by segment number, checked for length and kept as they came (see dicom_node.masks):
    binary ones bit-packed, probability maps (MASK_ENCODING_FRACTIONAL_UINT8) one byte a voxel."""
    masks: dict[int, PackedMask | FractionalMask] = {}
    for task in result.tasks:
        for info in task.masks:
            data = chunks.get(info.segment_number, bytearray())
            if len(data) != info.packed_bytes:
                raise InferenceRejected(
                    f"Mask {info.segment_number} arrived with {len(data)} of {info.packed_bytes} bytes."
                )
            try:
                if info.encoding == pb.MASK_ENCODING_FRACTIONAL_UINT8:
                    masks[info.segment_number] = FractionalMask(data, shape, info.max_fractional_value or 255)
                elif info.encoding in (pb.MASK_ENCODING_UNSPECIFIED, pb.MASK_ENCODING_BINARY_PACKBITS):
                    masks[info.segment_number] = PackedMask(data, shape)  # stays packed: 1 bit a voxel
                else:
                    raise ValueError(f"its encoding {info.encoding} is unknown to this node")
            except ValueError as exc:
                raise InferenceRejected(f"Mask {info.segment_number} cannot be read: {exc}") from exc
    return masks


def channel_credentials(section: InferenceSection) -> grpc.ChannelCredentials | None:
    """TLS credentials from [inference] (files read and checked now: a TlsConfigError at
    start-up), or None for a plaintext channel."""
    if not section.uses_tls:
        return None
    chain = key = None
    if section.tls_cert_file is not None and section.tls_key_file is not None:
        chain, key = pem_pair(section.tls_cert_file, section.tls_key_file)
    roots = pem_ca(section.tls_ca_file) if section.tls_ca_file is not None else None  # None: system roots
    return grpc.ssl_channel_credentials(roots, key, chain)


class InferenceClient:
    """A channel to one inference service: plaintext, or TLS with ``credentials``."""

    def __init__(
        self,
        address: str,
        deadline_s: float = 600.0,
        connect_retries: int = 3,
        chunk_bytes: int = 1 << 20,
        credentials: grpc.ChannelCredentials | None = None,
        server_name: str = "",
    ):
        self.address = address
        self.deadline_s = deadline_s
        self.connect_retries = connect_retries
        self.chunk_bytes = chunk_bytes
        options: list[tuple[str, int | str]] = [("grpc.max_receive_message_length", 8 * 1024 * 1024)]
        self.tls = credentials is not None
        if credentials is None:
            self._channel = grpc.insecure_channel(address, options=options)
        else:
            if server_name:  # the certificate's name, when the address's host is not in it
                options.append(("grpc.ssl_target_name_override", server_name))
            self._channel = grpc.secure_channel(address, credentials, options=options)
        self._stub = pb_grpc.InferenceServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def healthy(self, timeout_s: float = 2.0) -> bool:
        """grpc.health.v1 Check of the inference service: True only when it answers SERVING."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        service = pb.DESCRIPTOR.services_by_name["InferenceService"].full_name
        try:
            reply = health_pb2_grpc.HealthStub(self._channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def list_models(self, timeout_s: float = 10.0) -> pb.ListModelsResponse:
        try:
            return self._stub.ListModels(pb.ListModelsRequest(), timeout=timeout_s, wait_for_ready=True)
        except grpc.RpcError as exc:
            raise self._translate(exc) from exc

    def analyze(
        self, volume: SeriesVolume, spec: pb.AnalysisSpec, on_progress: ProgressHandler | None = None
    ) -> AnalysisOutcome:
        """Stream one volume and collect the result; retries UNAVAILABLE a few times."""
        return self.analyze_upload(Upload.of(volume, spec), on_progress)

    def analyze_upload(self, upload: Upload, on_progress: ProgressHandler | None = None) -> AnalysisOutcome:
        """As ``analyze``; the voxel bytes are dropped once the service has received them all
        (a failure after that is not retried here: the job runs again and reads the volume again)."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return self._analyze_once(upload, on_progress)
            except grpc.RpcError as exc:
                error = self._translate(exc)
                retry = isinstance(error, InferenceUnavailable) and attempt <= self.connect_retries
                if retry and upload.data is not None:
                    delay = min(2.0 ** (attempt - 1), 10.0)
                    logger.warning(
                        "inference unavailable, retrying",
                        extra={"event": "inference.retry", "attempt": attempt, "delay_s": delay},
                    )
                    time.sleep(delay)
                    continue
                raise error from exc

    def _analyze_once(self, upload: Upload, on_progress: ProgressHandler | None) -> AnalysisOutcome:
        if upload.data is None:
            raise InferenceUnavailable("The volume was already handed over; the job must read it again.")
        chunks: dict[int, bytearray] = {}
        result: pb.AnalysisResult | None = None
        responses = self._stub.AnalyzeVolume(
            request_stream(upload.header, upload.data, self.chunk_bytes), timeout=self.deadline_s
        )
        for response in responses:
            kind = response.WhichOneof("payload")
            if kind == "progress":
                if response.progress.stage != pb.Progress.RECEIVING:
                    upload.data = None  # the service has the whole volume
                if on_progress:
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
        return AnalysisOutcome(result=result, masks=unpack_masks(result, chunks, upload.shape))

    def _translate(self, exc: grpc.RpcError) -> InferenceUnavailable | InferenceRejected:
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        details = exc.details() if hasattr(exc, "details") else str(exc)
        message = f"{code.name}: {details}"
        if code in RETRYABLE:
            if self.tls and code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                message += (
                    f" (TLS to {self.address}: a refused handshake looks like this; check the service's"
                    " certificate against [inference] tls_ca_file and tls_server_name, and whether it"
                    " requires our client certificate)"
                )
            return InferenceUnavailable(message)
        return InferenceRejected(message)
