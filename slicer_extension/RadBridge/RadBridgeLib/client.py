"""gRPC client of the RadBridge inference service for the Slicer extension.

Uploads one volume in chunks over the radbridge.v1 contract, reports progress,
honours a cancel event and unpacks the returned masks into (k, j, i) bool arrays.
gRPC errors are translated here, once, into :class:`RadBridgeServerError`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np

from protos.radbridge.v1 import inference_pb2 as pb
from protos.radbridge.v1 import inference_pb2_grpc as pb_grpc

from .geometry import canonical_slice_order, geometry_from_ijk_to_ras

TASKS = {
    "report": pb.TASK_KIND_REPORT,
    "vqa": pb.TASK_KIND_VQA,
    "classify": pb.TASK_KIND_CLASSIFY,
    "detect": pb.TASK_KIND_DETECT,
    "segment": pb.TASK_KIND_SEGMENT,
    "embed": pb.TASK_KIND_EMBED,
}
#: Contract task kind -> the name used here.
TASK_NAMES = {kind: name for name, kind in TASKS.items()}


def model_summary(model: pb.ModelInfo) -> tuple[list[str], str]:
    """(task names, one line for the panel) of a model the service lists."""
    tasks = [TASK_NAMES[t] for t in model.tasks if t in TASK_NAMES]
    line = f"Tasks: {', '.join(tasks) or 'none'}"
    if model.modalities:
        line += f" · modalities: {', '.join(model.modalities)}"
    if model.identity.non_clinical:
        line += " · non-clinical"
    return tasks, line


#: Share of the overall progress bar each server stage ends at (RECEIVING, QUEUED, RUNNING, SENDING).
_STAGE_SPAN = {
    pb.Progress.RECEIVING: (0.0, 0.1),
    pb.Progress.QUEUED: (0.1, 0.2),
    pb.Progress.RUNNING: (0.2, 0.9),
    pb.Progress.SENDING: (0.9, 1.0),
}
_PIXEL_TYPES = {
    np.dtype("uint8"): (pb.PIXEL_TYPE_UINT8, "<u1"),
    np.dtype("int16"): (pb.PIXEL_TYPE_INT16, "<i2"),
    np.dtype("uint16"): (pb.PIXEL_TYPE_UINT16, "<u2"),
    np.dtype("float32"): (pb.PIXEL_TYPE_FLOAT32, "<f4"),
}
#: on_progress(overall_fraction 0..1, never decreasing; short message).
ProgressCallback = Callable[[float, str], None]


class RadBridgeError(Exception):
    """Base of the errors this library raises."""


class RadBridgeCancelled(RadBridgeError):
    """The analysis was cancelled through the cancel event."""


class RadBridgeServerError(RadBridgeError):
    """The service could not be reached or refused the request."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass
class AnalysisResult:
    """One analysis: the contract result plus its pieces, in the caller's (k, j, i) index order."""

    #: The service's result with box slice indices in the caller's k order.
    result: pb.AnalysisResult
    #: segment number -> bool mask with the shape of the input voxels (k, j, i).
    masks: dict[int, np.ndarray] = field(default_factory=dict)
    #: segment number -> its description (label, codes, colour).
    segments: dict[int, pb.MaskInfo] = field(default_factory=dict)
    boxes: list[pb.Box] = field(default_factory=list)
    findings: list[pb.Finding] = field(default_factory=list)
    measurements: list[pb.Measurement] = field(default_factory=list)
    report_text: str = ""
    answer: str = ""

    @property
    def model_name(self) -> str:
        return self.result.model.name

    def segment_labels(self) -> dict[int, str]:
        return {n: info.label for n, info in self.segments.items()}


def _payload(voxels: np.ndarray) -> tuple[int, bytes]:
    v = np.asarray(voxels)
    known = _PIXEL_TYPES.get(v.dtype)
    if known is None:
        if v.dtype.kind in "iub" and v.size and v.min() >= -32768 and v.max() <= 32767:
            known = _PIXEL_TYPES[np.dtype("int16")]
        else:
            known = _PIXEL_TYPES[np.dtype("float32")]
    pixel_type, wire = known
    return pixel_type, np.ascontiguousarray(v, dtype=wire).tobytes()


def _translate(exc: grpc.RpcError, address: str, deadline_s: float) -> RadBridgeServerError:
    code = exc.code() if hasattr(exc, "code") else None
    details = (exc.details() if hasattr(exc, "details") else None) or str(exc)
    name = code.name if code is not None else "UNKNOWN"
    if code == grpc.StatusCode.UNAVAILABLE:
        message = f"Cannot reach the RadBridge inference service at {address} ({name}: {details})."
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        message = (
            f"The RadBridge inference service at {address} did not answer within {deadline_s:g} s "
            f"({name}: {details})."
        )
    else:
        message = f"The RadBridge inference service at {address} refused the request ({name}: {details})."
    return RadBridgeServerError(message, code)


def _read_pem(path: str, what: str) -> bytes:
    """A PEM file's bytes; a clear error naming the file (never its content) otherwise."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise RadBridgeError(f"Cannot read the TLS {what} {path} ({exc.strerror}).") from exc
    if b"-----BEGIN " not in data:
        raise RadBridgeError(f"The TLS {what} {path} is not a PEM file.")
    return data


def _report_text(task: pb.TaskResult) -> str:
    parts = []
    if task.report.findings:
        parts.append(f"Findings: {task.report.findings}")
    if task.report.impression:
        parts.append(f"Impression: {task.report.impression}")
    return "\n\n".join(parts)


class RadBridgeClient:
    """A channel to one inference service; safe to use from one worker thread at a time."""

    def __init__(
        self,
        address: str,
        tls: bool = False,
        ca_file: str | None = None,
        deadline_s: float = 600.0,
        chunk_bytes: int = 1 << 20,
        cert_file: str | None = None,
        key_file: str | None = None,
    ) -> None:
        """``tls`` (implied by any file): a TLS channel verified against ``ca_file`` (else the
        system roots); ``cert_file`` + ``key_file``: our certificate, for mutual TLS."""
        if not 0 < chunk_bytes <= 3 * 1024 * 1024:
            raise ValueError("chunk_bytes must be between 1 byte and 3 MiB.")
        if bool(cert_file) != bool(key_file):
            raise ValueError("A client certificate needs both cert_file and key_file (or neither).")
        self.address = address
        self.deadline_s = float(deadline_s)
        self.chunk_bytes = chunk_bytes
        options = [("grpc.max_receive_message_length", 8 * 1024 * 1024)]
        if tls or ca_file or cert_file:
            root = _read_pem(ca_file, "CA file") if ca_file else None
            chain = _read_pem(cert_file, "client certificate") if cert_file else None
            key = _read_pem(key_file, "client key") if key_file else None
            credentials = grpc.ssl_channel_credentials(root, key, chain)
            self._channel = grpc.secure_channel(address, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        self._stub = pb_grpc.InferenceServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> RadBridgeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def list_models(self, timeout_s: float | None = None) -> list[pb.ModelInfo]:
        """The models the service has loaded."""
        timeout = min(self.deadline_s, 30.0) if timeout_s is None else timeout_s
        try:
            response = self._stub.ListModels(pb.ListModelsRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            raise _translate(exc, self.address, timeout) from exc
        return list(response.models)

    def analyze(
        self,
        voxels: np.ndarray,
        ijk_to_ras: np.ndarray,
        tasks: Sequence[str],
        model: str = "",
        question: str = "",
        labels: Sequence[str] = (),
        language: str = "en",
        on_progress: ProgressCallback | None = None,
        cancel_event: threading.Event | None = None,
        *,
        modality: str = "CT",
        rescaled: bool = True,
        body_part: str = "",
        window: tuple[float, float] | None = None,
        correlation_id: str = "",
    ) -> AnalysisResult:
        """Analyze one volume given as a Slicer array (k, j, i) and its IJKToRAS matrix.

        ``on_progress`` and the cancel check run on the calling thread; ``cancel_event`` may be
        set from any thread and cancels the RPC within ~50 ms (RadBridgeCancelled is raised).
        """
        unknown = [t for t in tasks if t not in TASKS]
        if unknown or not tasks:
            raise ValueError(f"Unknown or no tasks {unknown or list(tasks)}; known: {', '.join(TASKS)}.")
        original_shape = tuple(np.shape(voxels))
        if len(original_shape) not in (3, 4):
            raise ValueError(f"voxels must be (k, j, i) or (k, j, i, samples), got {original_shape}.")
        send, matrix, flipped = canonical_slice_order(np.asarray(voxels), ijk_to_ras)
        pixel_type, data = _payload(send)
        geometry = geometry_from_ijk_to_ras(
            matrix,
            send.shape,
            modality=modality,
            pixel_type=pixel_type,
            rescaled=rescaled,
            body_part=body_part,
            window=window,
        )
        spec = pb.AnalysisSpec(
            model=model,
            tasks=[TASKS[t] for t in tasks],
            question=question,
            labels=list(labels),
            language=language,
            correlation_id=correlation_id,
        )
        header = pb.VolumeHeader(spec=spec, geometry=geometry, total_bytes=len(data))
        if cancel_event is not None and cancel_event.is_set():
            raise RadBridgeCancelled("The analysis was cancelled before it started.")
        mask_shape = original_shape[:3]
        chunks, result = self._stream(header, data, on_progress, cancel_event)
        return self._assemble(result, chunks, mask_shape, flipped, on_progress)

    # -- internals ---------------------------------------------------------------
    def _requests(
        self, header: pb.VolumeHeader, data: bytes, cancel_event: threading.Event | None
    ) -> Iterator[pb.AnalyzeVolumeRequest]:
        yield pb.AnalyzeVolumeRequest(header=header)
        view = memoryview(data)
        for off in range(0, len(data), self.chunk_bytes):
            if cancel_event is not None and cancel_event.is_set():
                return
            yield pb.AnalyzeVolumeRequest(
                chunk=pb.PixelChunk(offset=off, data=bytes(view[off : off + self.chunk_bytes]))
            )

    def _stream(
        self,
        header: pb.VolumeHeader,
        data: bytes,
        on_progress: ProgressCallback | None,
        cancel_event: threading.Event | None,
    ) -> tuple[dict[int, bytearray], pb.AnalysisResult]:
        call = self._stub.AnalyzeVolume(self._requests(header, data, cancel_event), timeout=self.deadline_s)
        done = threading.Event()
        if cancel_event is not None:

            def watch() -> None:
                while not done.is_set():
                    if cancel_event.wait(0.05):
                        call.cancel()
                        return

            threading.Thread(target=watch, name="radbridge-cancel-watch", daemon=True).start()
        chunks: dict[int, bytearray] = {}
        result: pb.AnalysisResult | None = None
        last = 0.0
        try:
            for response in call:
                kind = response.WhichOneof("payload")
                if kind == "progress":
                    p = response.progress
                    lo, hi = _STAGE_SPAN.get(p.stage, (last, last))
                    overall = max(last, lo + (hi - lo) * min(max(p.fraction, 0.0), 1.0))
                    last = overall
                    if on_progress is not None:
                        on_progress(overall, p.message)
                elif kind == "mask_chunk":
                    mc = response.mask_chunk
                    buf = chunks.setdefault(mc.segment_number, bytearray())
                    if mc.offset != len(buf):
                        raise RadBridgeServerError(
                            f"Mask {mc.segment_number} chunks arrived out of order.",
                            grpc.StatusCode.DATA_LOSS,
                        )
                    buf.extend(mc.data)
                elif kind == "result":
                    result = response.result
                if cancel_event is not None and cancel_event.is_set():
                    call.cancel()
                    raise RadBridgeCancelled("The analysis was cancelled.")
        except grpc.RpcError as exc:
            if (cancel_event is not None and cancel_event.is_set()) or (
                hasattr(exc, "code") and exc.code() == grpc.StatusCode.CANCELLED
            ):
                raise RadBridgeCancelled("The analysis was cancelled.") from exc
            raise _translate(exc, self.address, self.deadline_s) from exc
        finally:
            done.set()
        if result is None:
            raise RadBridgeServerError(
                f"The stream from {self.address} ended without a result.", grpc.StatusCode.DATA_LOSS
            )
        return chunks, result

    @staticmethod
    def _assemble(
        result: pb.AnalysisResult,
        chunks: dict[int, bytearray],
        shape: tuple[int, ...],
        flipped: bool,
        on_progress: ProgressCallback | None,
    ) -> AnalysisResult:
        if flipped:
            # Back into the caller's slice order, so that result.tasks and out.boxes agree.
            caller = pb.AnalysisResult()
            caller.CopyFrom(result)
            for task in caller.tasks:
                for box in task.boxes:
                    box.slice_index = shape[0] - 1 - box.slice_index
            result = caller
        out = AnalysisResult(result=result)
        n_voxels = int(np.prod(shape))
        reports = []
        for task in result.tasks:
            for info in task.masks:
                data = chunks.get(info.segment_number, bytearray())
                if len(data) != info.packed_bytes:
                    raise RadBridgeServerError(
                        f"Mask {info.segment_number} arrived with {len(data)} of {info.packed_bytes} bytes.",
                        grpc.StatusCode.DATA_LOSS,
                    )
                if info.encoding == pb.MASK_ENCODING_FRACTIONAL_UINT8:
                    # A probability map: the segment is its voxels of probability >= 0.5.
                    values = np.frombuffer(bytes(data), dtype=np.uint8)
                    mask = (values >= ((info.max_fractional_value or 255) + 1) // 2).reshape(shape)
                else:
                    bits = np.unpackbits(np.frombuffer(bytes(data), dtype=np.uint8), count=n_voxels)
                    mask = bits.reshape(shape).astype(bool)
                out.masks[info.segment_number] = mask[::-1].copy() if flipped else mask
                out.segments[info.segment_number] = info
            out.boxes.extend(task.boxes)
            out.findings.extend(task.findings)
            out.measurements.extend(task.measurements)
            text = _report_text(task)
            if text:
                reports.append(text)
            if task.answer and not out.answer:
                out.answer = task.answer
        out.report_text = "\n\n".join(reports)
        if on_progress is not None:
            on_progress(1.0, "done")
        return out
