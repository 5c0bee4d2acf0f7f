from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TaskKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_KIND_UNSPECIFIED: _ClassVar[TaskKind]
    TASK_KIND_REPORT: _ClassVar[TaskKind]
    TASK_KIND_VQA: _ClassVar[TaskKind]
    TASK_KIND_CLASSIFY: _ClassVar[TaskKind]
    TASK_KIND_DETECT: _ClassVar[TaskKind]
    TASK_KIND_SEGMENT: _ClassVar[TaskKind]
    TASK_KIND_EMBED: _ClassVar[TaskKind]

class PixelType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PIXEL_TYPE_UNSPECIFIED: _ClassVar[PixelType]
    PIXEL_TYPE_UINT8: _ClassVar[PixelType]
    PIXEL_TYPE_INT16: _ClassVar[PixelType]
    PIXEL_TYPE_UINT16: _ClassVar[PixelType]
    PIXEL_TYPE_FLOAT32: _ClassVar[PixelType]

class MaskEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MASK_ENCODING_UNSPECIFIED: _ClassVar[MaskEncoding]
    MASK_ENCODING_BINARY_PACKBITS: _ClassVar[MaskEncoding]
    MASK_ENCODING_FRACTIONAL_UINT8: _ClassVar[MaskEncoding]
TASK_KIND_UNSPECIFIED: TaskKind
TASK_KIND_REPORT: TaskKind
TASK_KIND_VQA: TaskKind
TASK_KIND_CLASSIFY: TaskKind
TASK_KIND_DETECT: TaskKind
TASK_KIND_SEGMENT: TaskKind
TASK_KIND_EMBED: TaskKind
PIXEL_TYPE_UNSPECIFIED: PixelType
PIXEL_TYPE_UINT8: PixelType
PIXEL_TYPE_INT16: PixelType
PIXEL_TYPE_UINT16: PixelType
PIXEL_TYPE_FLOAT32: PixelType
MASK_ENCODING_UNSPECIFIED: MaskEncoding
MASK_ENCODING_BINARY_PACKBITS: MaskEncoding
MASK_ENCODING_FRACTIONAL_UINT8: MaskEncoding

class Code(_message.Message):
    __slots__ = ("value", "scheme", "meaning")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    SCHEME_FIELD_NUMBER: _ClassVar[int]
    MEANING_FIELD_NUMBER: _ClassVar[int]
    value: str
    scheme: str
    meaning: str
    def __init__(self, value: _Optional[str] = ..., scheme: _Optional[str] = ..., meaning: _Optional[str] = ...) -> None: ...

class Geometry(_message.Message):
    __slots__ = ("slices", "rows", "columns", "samples_per_pixel", "row_spacing_mm", "column_spacing_mm", "slice_spacing_mm", "image_orientation_patient", "image_position_patient", "modality", "photometric_interpretation", "pixel_type", "rescaled", "body_part", "window_center", "window_width")
    SLICES_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_PIXEL_FIELD_NUMBER: _ClassVar[int]
    ROW_SPACING_MM_FIELD_NUMBER: _ClassVar[int]
    COLUMN_SPACING_MM_FIELD_NUMBER: _ClassVar[int]
    SLICE_SPACING_MM_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ORIENTATION_PATIENT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_POSITION_PATIENT_FIELD_NUMBER: _ClassVar[int]
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    PHOTOMETRIC_INTERPRETATION_FIELD_NUMBER: _ClassVar[int]
    PIXEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    RESCALED_FIELD_NUMBER: _ClassVar[int]
    BODY_PART_FIELD_NUMBER: _ClassVar[int]
    WINDOW_CENTER_FIELD_NUMBER: _ClassVar[int]
    WINDOW_WIDTH_FIELD_NUMBER: _ClassVar[int]
    slices: int
    rows: int
    columns: int
    samples_per_pixel: int
    row_spacing_mm: float
    column_spacing_mm: float
    slice_spacing_mm: float
    image_orientation_patient: _containers.RepeatedScalarFieldContainer[float]
    image_position_patient: _containers.RepeatedScalarFieldContainer[float]
    modality: str
    photometric_interpretation: str
    pixel_type: PixelType
    rescaled: bool
    body_part: str
    window_center: float
    window_width: float
    def __init__(self, slices: _Optional[int] = ..., rows: _Optional[int] = ..., columns: _Optional[int] = ..., samples_per_pixel: _Optional[int] = ..., row_spacing_mm: _Optional[float] = ..., column_spacing_mm: _Optional[float] = ..., slice_spacing_mm: _Optional[float] = ..., image_orientation_patient: _Optional[_Iterable[float]] = ..., image_position_patient: _Optional[_Iterable[float]] = ..., modality: _Optional[str] = ..., photometric_interpretation: _Optional[str] = ..., pixel_type: _Optional[_Union[PixelType, str]] = ..., rescaled: _Optional[bool] = ..., body_part: _Optional[str] = ..., window_center: _Optional[float] = ..., window_width: _Optional[float] = ...) -> None: ...

class AnalysisSpec(_message.Message):
    __slots__ = ("model", "tasks", "question", "labels", "language", "correlation_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    CORRELATION_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    tasks: _containers.RepeatedScalarFieldContainer[TaskKind]
    question: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    language: str
    correlation_id: str
    def __init__(self, model: _Optional[str] = ..., tasks: _Optional[_Iterable[_Union[TaskKind, str]]] = ..., question: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ..., language: _Optional[str] = ..., correlation_id: _Optional[str] = ...) -> None: ...

class VolumeHeader(_message.Message):
    __slots__ = ("spec", "geometry", "total_bytes")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    GEOMETRY_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    spec: AnalysisSpec
    geometry: Geometry
    total_bytes: int
    def __init__(self, spec: _Optional[_Union[AnalysisSpec, _Mapping]] = ..., geometry: _Optional[_Union[Geometry, _Mapping]] = ..., total_bytes: _Optional[int] = ...) -> None: ...

class PixelChunk(_message.Message):
    __slots__ = ("offset", "data")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class AnalyzeVolumeRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: VolumeHeader
    chunk: PixelChunk
    def __init__(self, header: _Optional[_Union[VolumeHeader, _Mapping]] = ..., chunk: _Optional[_Union[PixelChunk, _Mapping]] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("stage", "fraction", "message")
    class Stage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STAGE_UNSPECIFIED: _ClassVar[Progress.Stage]
        RECEIVING: _ClassVar[Progress.Stage]
        QUEUED: _ClassVar[Progress.Stage]
        RUNNING: _ClassVar[Progress.Stage]
        SENDING: _ClassVar[Progress.Stage]
    STAGE_UNSPECIFIED: Progress.Stage
    RECEIVING: Progress.Stage
    QUEUED: Progress.Stage
    RUNNING: Progress.Stage
    SENDING: Progress.Stage
    STAGE_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    stage: Progress.Stage
    fraction: float
    message: str
    def __init__(self, stage: _Optional[_Union[Progress.Stage, str]] = ..., fraction: _Optional[float] = ..., message: _Optional[str] = ...) -> None: ...

class Measurement(_message.Message):
    __slots__ = ("concept", "value", "unit", "segment_number")
    CONCEPT_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_NUMBER_FIELD_NUMBER: _ClassVar[int]
    concept: Code
    value: float
    unit: Code
    segment_number: int
    def __init__(self, concept: _Optional[_Union[Code, _Mapping]] = ..., value: _Optional[float] = ..., unit: _Optional[_Union[Code, _Mapping]] = ..., segment_number: _Optional[int] = ...) -> None: ...

class Finding(_message.Message):
    __slots__ = ("finding", "score", "present", "label")
    FINDING_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    finding: Code
    score: float
    present: bool
    label: str
    def __init__(self, finding: _Optional[_Union[Code, _Mapping]] = ..., score: _Optional[float] = ..., present: _Optional[bool] = ..., label: _Optional[str] = ...) -> None: ...

class Box(_message.Message):
    __slots__ = ("slice_index", "row_min", "column_min", "row_max", "column_max", "finding", "label", "score")
    SLICE_INDEX_FIELD_NUMBER: _ClassVar[int]
    ROW_MIN_FIELD_NUMBER: _ClassVar[int]
    COLUMN_MIN_FIELD_NUMBER: _ClassVar[int]
    ROW_MAX_FIELD_NUMBER: _ClassVar[int]
    COLUMN_MAX_FIELD_NUMBER: _ClassVar[int]
    FINDING_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    slice_index: int
    row_min: float
    column_min: float
    row_max: float
    column_max: float
    finding: Code
    label: str
    score: float
    def __init__(self, slice_index: _Optional[int] = ..., row_min: _Optional[float] = ..., column_min: _Optional[float] = ..., row_max: _Optional[float] = ..., column_max: _Optional[float] = ..., finding: _Optional[_Union[Code, _Mapping]] = ..., label: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class MaskInfo(_message.Message):
    __slots__ = ("segment_number", "label", "category", "type", "cielab", "packed_bytes", "voxel_count", "encoding", "max_fractional_value")
    SEGMENT_NUMBER_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    CIELAB_FIELD_NUMBER: _ClassVar[int]
    PACKED_BYTES_FIELD_NUMBER: _ClassVar[int]
    VOXEL_COUNT_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    MAX_FRACTIONAL_VALUE_FIELD_NUMBER: _ClassVar[int]
    segment_number: int
    label: str
    category: Code
    type: Code
    cielab: _containers.RepeatedScalarFieldContainer[int]
    packed_bytes: int
    voxel_count: int
    encoding: MaskEncoding
    max_fractional_value: int
    def __init__(self, segment_number: _Optional[int] = ..., label: _Optional[str] = ..., category: _Optional[_Union[Code, _Mapping]] = ..., type: _Optional[_Union[Code, _Mapping]] = ..., cielab: _Optional[_Iterable[int]] = ..., packed_bytes: _Optional[int] = ..., voxel_count: _Optional[int] = ..., encoding: _Optional[_Union[MaskEncoding, str]] = ..., max_fractional_value: _Optional[int] = ...) -> None: ...

class MaskChunk(_message.Message):
    __slots__ = ("segment_number", "offset", "data")
    SEGMENT_NUMBER_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    segment_number: int
    offset: int
    data: bytes
    def __init__(self, segment_number: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class ReportText(_message.Message):
    __slots__ = ("findings", "impression", "language")
    FINDINGS_FIELD_NUMBER: _ClassVar[int]
    IMPRESSION_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    findings: str
    impression: str
    language: str
    def __init__(self, findings: _Optional[str] = ..., impression: _Optional[str] = ..., language: _Optional[str] = ...) -> None: ...

class ModelIdentity(_message.Message):
    __slots__ = ("name", "backend", "version", "weights_sha256", "non_clinical")
    NAME_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    NON_CLINICAL_FIELD_NUMBER: _ClassVar[int]
    name: str
    backend: str
    version: str
    weights_sha256: str
    non_clinical: bool
    def __init__(self, name: _Optional[str] = ..., backend: _Optional[str] = ..., version: _Optional[str] = ..., weights_sha256: _Optional[str] = ..., non_clinical: _Optional[bool] = ...) -> None: ...

class TaskResult(_message.Message):
    __slots__ = ("task", "findings", "measurements", "boxes", "masks", "report", "answer", "embedding", "prompt_id", "raw_output", "unparsed")
    TASK_FIELD_NUMBER: _ClassVar[int]
    FINDINGS_FIELD_NUMBER: _ClassVar[int]
    MEASUREMENTS_FIELD_NUMBER: _ClassVar[int]
    BOXES_FIELD_NUMBER: _ClassVar[int]
    MASKS_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    PROMPT_ID_FIELD_NUMBER: _ClassVar[int]
    RAW_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    UNPARSED_FIELD_NUMBER: _ClassVar[int]
    task: TaskKind
    findings: _containers.RepeatedCompositeFieldContainer[Finding]
    measurements: _containers.RepeatedCompositeFieldContainer[Measurement]
    boxes: _containers.RepeatedCompositeFieldContainer[Box]
    masks: _containers.RepeatedCompositeFieldContainer[MaskInfo]
    report: ReportText
    answer: str
    embedding: _containers.RepeatedScalarFieldContainer[float]
    prompt_id: str
    raw_output: str
    unparsed: bool
    def __init__(self, task: _Optional[_Union[TaskKind, str]] = ..., findings: _Optional[_Iterable[_Union[Finding, _Mapping]]] = ..., measurements: _Optional[_Iterable[_Union[Measurement, _Mapping]]] = ..., boxes: _Optional[_Iterable[_Union[Box, _Mapping]]] = ..., masks: _Optional[_Iterable[_Union[MaskInfo, _Mapping]]] = ..., report: _Optional[_Union[ReportText, _Mapping]] = ..., answer: _Optional[str] = ..., embedding: _Optional[_Iterable[float]] = ..., prompt_id: _Optional[str] = ..., raw_output: _Optional[str] = ..., unparsed: _Optional[bool] = ...) -> None: ...

class AnalysisResult(_message.Message):
    __slots__ = ("model", "tasks")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    model: ModelIdentity
    tasks: _containers.RepeatedCompositeFieldContainer[TaskResult]
    def __init__(self, model: _Optional[_Union[ModelIdentity, _Mapping]] = ..., tasks: _Optional[_Iterable[_Union[TaskResult, _Mapping]]] = ...) -> None: ...

class AnalyzeVolumeResponse(_message.Message):
    __slots__ = ("progress", "mask_chunk", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    MASK_CHUNK_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: Progress
    mask_chunk: MaskChunk
    result: AnalysisResult
    def __init__(self, progress: _Optional[_Union[Progress, _Mapping]] = ..., mask_chunk: _Optional[_Union[MaskChunk, _Mapping]] = ..., result: _Optional[_Union[AnalysisResult, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("identity", "tasks", "modalities", "ready", "is_default")
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    MODALITIES_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    identity: ModelIdentity
    tasks: _containers.RepeatedScalarFieldContainer[TaskKind]
    modalities: _containers.RepeatedScalarFieldContainer[str]
    ready: bool
    is_default: bool
    def __init__(self, identity: _Optional[_Union[ModelIdentity, _Mapping]] = ..., tasks: _Optional[_Iterable[_Union[TaskKind, str]]] = ..., modalities: _Optional[_Iterable[str]] = ..., ready: _Optional[bool] = ..., is_default: _Optional[bool] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...
