"""Proto <-> domain translation: chunk stream -> Volume, results -> messages.

Size limits are enforced here, before any voxel is allocated.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator

import numpy as np

from inference_service.errors import InvalidInput
from inference_service.types import (
    AnalysisResult,
    AnalysisSpec,
    Code,
    Geometry,
    Mask,
    ModelIdentity,
    TaskKind,
    TaskResult,
    Volume,
)
from protos.radbridge.v1 import inference_pb2 as pb

DTYPES = {
    pb.PIXEL_TYPE_UINT8: np.dtype("u1"),
    pb.PIXEL_TYPE_INT16: np.dtype("<i2"),
    pb.PIXEL_TYPE_UINT16: np.dtype("<u2"),
    pb.PIXEL_TYPE_FLOAT32: np.dtype("<f4"),
}
TASKS = {
    pb.TASK_KIND_REPORT: TaskKind.REPORT,
    pb.TASK_KIND_VQA: TaskKind.VQA,
    pb.TASK_KIND_CLASSIFY: TaskKind.CLASSIFY,
    pb.TASK_KIND_DETECT: TaskKind.DETECT,
    pb.TASK_KIND_SEGMENT: TaskKind.SEGMENT,
    pb.TASK_KIND_EMBED: TaskKind.EMBED,
}
TASK_TO_PB = {v: k for k, v in TASKS.items()}


def spec_from_pb(msg: pb.AnalysisSpec) -> AnalysisSpec:
    try:
        tasks = tuple(TASKS[t] for t in msg.tasks)
    except KeyError as exc:
        raise InvalidInput(f"Unknown or unspecified task value {exc.args[0]}.") from exc
    if not tasks:
        raise InvalidInput("The request names no task.")
    return AnalysisSpec(
        model=msg.model,
        tasks=tasks,
        question=msg.question,
        labels=tuple(msg.labels),
        language=msg.language or "en",
        correlation_id=msg.correlation_id,
    )


def geometry_from_pb(msg: pb.Geometry) -> Geometry:
    try:
        return Geometry(
            shape=(msg.slices, msg.rows, msg.columns),
            spacing_mm=(msg.slice_spacing_mm, msg.row_spacing_mm, msg.column_spacing_mm),
            orientation=tuple(msg.image_orientation_patient),
            position=tuple(msg.image_position_patient),  # type: ignore[arg-type]
            modality=msg.modality,
            rescaled=msg.rescaled,
            body_part=msg.body_part,
            window=(msg.window_center, msg.window_width) if msg.window_width > 0 else None,
            samples_per_pixel=msg.samples_per_pixel or 1,
        )
    except ValueError as exc:
        raise InvalidInput(f"Invalid geometry: {exc}") from exc


async def receive_volume(
    requests: AsyncIterator[pb.AnalyzeVolumeRequest], max_bytes: int
) -> tuple[AnalysisSpec, Volume]:
    """Read the header and every chunk of one AnalyzeVolume call."""
    first = await anext(requests, None)
    if first is None or first.WhichOneof("payload") != "header":
        raise InvalidInput("The first message of AnalyzeVolume must be a header.")
    header = first.header
    spec = spec_from_pb(header.spec)
    geometry = geometry_from_pb(header.geometry)
    dtype = DTYPES.get(header.geometry.pixel_type)
    if dtype is None:
        raise InvalidInput("The header names no pixel type.")
    expected = int(np.prod(geometry.shape)) * geometry.samples_per_pixel * dtype.itemsize
    if header.total_bytes != expected:
        raise InvalidInput(f"total_bytes {header.total_bytes} does not match geometry ({expected}).")
    if expected > max_bytes:
        raise InvalidInput(f"Volume of {expected} bytes exceeds the limit of {max_bytes}.")
    buffer = bytearray(expected)
    received = 0
    async for msg in requests:
        if msg.WhichOneof("payload") != "chunk":
            raise InvalidInput("Only pixel chunks may follow the header.")
        chunk = msg.chunk
        if chunk.offset != received:
            raise InvalidInput(f"Chunk at offset {chunk.offset} arrived, {received} expected.")
        end = received + len(chunk.data)
        if end > expected:
            raise InvalidInput("Pixel chunks exceed total_bytes.")
        buffer[received:end] = chunk.data
        received = end
    if received != expected:
        raise InvalidInput(f"Stream ended after {received} of {expected} voxel bytes.")
    shape = geometry.shape + ((geometry.samples_per_pixel,) if geometry.samples_per_pixel > 1 else ())
    # No copy of the received bytes, and no float conversion of the whole volume: values are in
    # modality units in the dtype they came in (int16 HU for CT); backends convert what they use.
    voxels = np.frombuffer(buffer, dtype=dtype).reshape(shape)
    return spec, Volume(voxels=voxels, geometry=geometry)


def _code(c: Code) -> pb.Code:
    return pb.Code(value=c.value, scheme=c.scheme, meaning=c.meaning)


def pack_mask(mask: Mask) -> bytes:
    """A mask's bytes: bit-packed (numpy packbits, C order, big bit order), or a probability map's
    bytes as they are (one a voxel, C order)."""
    if mask.fractional:
        return np.ascontiguousarray(mask.voxels).tobytes()
    return np.packbits(mask.voxels, axis=None).tobytes()


def mask_chunks(
    masks: list[Mask], chunk_bytes: int, counts: dict[int, int] | None = None
) -> Iterator[pb.AnalyzeVolumeResponse]:
    """The masks' bytes as MaskChunk messages. Each mask is taken off ``masks`` as it is packed (and
    counted into ``counts`` by segment number), so that its byte-a-voxel array can be freed before
    the next one is read: reading a lazily zeroed mask makes all of it resident."""
    while masks:
        mask = masks.pop(0)
        number, data = mask.segment_number, pack_mask(mask)
        if counts is not None:
            counts[number] = voxel_count(mask)
        del mask
        for off in range(0, len(data), chunk_bytes):
            yield pb.AnalyzeVolumeResponse(
                mask_chunk=pb.MaskChunk(segment_number=number, offset=off, data=data[off : off + chunk_bytes])
            )


def identity_to_pb(m: ModelIdentity) -> pb.ModelIdentity:
    return pb.ModelIdentity(
        name=m.name,
        backend=m.backend,
        version=m.version,
        weights_sha256=m.weights_sha256,
        non_clinical=m.non_clinical,
    )


_SURROGATES = re.compile("[\ud800-\udfff]")


def _utf8(text: str) -> str:
    """Model text that protobuf can send: lone surrogates (undecodable bytes kept by a decoder's
    ``surrogateescape``) become U+FFFD instead of failing the whole result."""
    return _SURROGATES.sub("\ufffd", text)


def voxel_count(mask: Mask) -> int:
    """Voxels in the mask (a probability map's voxels of probability >= 0.5)."""
    return int(np.count_nonzero(mask.voxels >= 128) if mask.fractional else np.count_nonzero(mask.voxels))


def task_result_to_pb(r: TaskResult, count_voxels: bool = True) -> pb.TaskResult:
    msg = pb.TaskResult(
        task=TASK_TO_PB[r.task],
        answer=_utf8(r.answer),
        embedding=r.embedding,
        prompt_id=r.prompt_id,
        raw_output=_utf8(r.raw_output),
        unparsed=r.unparsed,
    )
    for f in r.findings:
        msg.findings.add(finding=_code(f.finding), score=f.score, present=f.present, label=_utf8(f.label))
    for m in r.measurements:
        msg.measurements.add(
            concept=_code(m.concept), value=m.value, unit=_code(m.unit), segment_number=m.segment_number
        )
    for b in r.boxes:
        msg.boxes.add(
            slice_index=b.slice_index,
            row_min=b.row_min,
            column_min=b.column_min,
            row_max=b.row_max,
            column_max=b.column_max,
            finding=_code(b.finding),
            label=_utf8(b.label),
            score=b.score,
        )
    for k in r.masks:
        msg.masks.add(
            segment_number=k.segment_number,
            label=_utf8(k.label),
            category=_code(k.category),
            type=_code(k.type),
            cielab=list(k.cielab),
            packed_bytes=k.voxels.size if k.fractional else (k.voxels.size + 7) // 8,
            voxel_count=voxel_count(k) if count_voxels else 0,
            encoding=pb.MASK_ENCODING_FRACTIONAL_UINT8 if k.fractional else pb.MASK_ENCODING_BINARY_PACKBITS,
            max_fractional_value=255 if k.fractional else 0,
        )
    if r.report is not None:
        msg.report.CopyFrom(
            pb.ReportText(
                findings=_utf8(r.report.findings),
                impression=_utf8(r.report.impression),
                language=r.report.language,
            )
        )
    return msg


def result_to_pb(result: AnalysisResult, count_voxels: bool = True) -> pb.AnalysisResult:
    """The result message; without ``count_voxels`` every mask's voxel_count is left 0, for a
    caller that counts while sending the masks (mask_chunks) and fills them in after."""
    return pb.AnalysisResult(
        model=identity_to_pb(result.model), tasks=[task_result_to_pb(t, count_voxels) for t in result.tasks]
    )
