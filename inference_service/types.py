"""Domain types of the inference service: volumes in, typed results out.

No DICOM and no protobuf here: the servicer translates at the seam. Every
coordinate is in volume index space (slice, row, column).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np


class TaskKind(enum.Enum):
    """What a model is asked to do (mirrors radbridge.v1.TaskKind)."""

    REPORT = "report"
    VQA = "vqa"
    CLASSIFY = "classify"
    DETECT = "detect"
    SEGMENT = "segment"
    EMBED = "embed"


@dataclass(frozen=True)
class Code:
    """A coded concept (value, scheme, meaning)."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class Geometry:
    """Where a volume's voxels sit in patient (LPS) space."""

    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]  # slice, row, column
    orientation: tuple[float, ...]  # DICOM Image Orientation (Patient), 6 values
    position: tuple[float, float, float]  # centre of voxel (0, 0, 0)
    modality: str
    rescaled: bool = True
    body_part: str = ""
    window: tuple[float, float] | None = None  # centre, width
    samples_per_pixel: int = 1

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"Volume shape must be three positive sizes, got {self.shape}.")
        if len(self.orientation) != 6:
            raise ValueError("Image orientation must have 6 direction cosines.")
        if len(self.position) != 3:
            raise ValueError("Image position must have 3 coordinates.")
        if any(s < 0 for s in self.spacing_mm):
            raise ValueError(f"Spacing must not be negative, got {self.spacing_mm}.")
        if not self.modality:
            raise ValueError("Modality must be given.")

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres (0 when spacing is unknown)."""
        s, r, c = self.spacing_mm
        return s * r * c / 1000.0


@dataclass(frozen=True)
class Volume:
    """A volume of voxels (slices, rows, columns[, samples]) and its geometry."""

    voxels: np.ndarray
    geometry: Geometry

    def __post_init__(self) -> None:
        if tuple(self.voxels.shape[:3]) != tuple(self.geometry.shape):
            raise ValueError(
                f"Voxel array shape {self.voxels.shape} does not match geometry {self.geometry.shape}."
            )


@dataclass(frozen=True)
class AnalysisSpec:
    """The work requested for one volume."""

    model: str
    tasks: tuple[TaskKind, ...]
    question: str = ""
    labels: tuple[str, ...] = ()
    language: str = "en"
    correlation_id: str = ""


@dataclass(frozen=True)
class Measurement:
    concept: Code
    value: float
    unit: Code
    segment_number: int = 0


@dataclass(frozen=True)
class Finding:
    finding: Code
    score: float = -1.0
    present: bool = True
    label: str = ""


@dataclass(frozen=True)
class Box:
    slice_index: int
    row_min: float
    column_min: float
    row_max: float
    column_max: float
    finding: Code
    label: str = ""
    score: float = -1.0


@dataclass(frozen=True)
class Mask:
    """A mask over the whole volume (slices, rows, columns): bool (binary), or uint8 for a
    probability map (0..255 for probability 0..1; sent as MASK_ENCODING_FRACTIONAL_UINT8)."""

    segment_number: int
    label: str
    category: Code
    type: Code
    cielab: tuple[int, int, int]
    voxels: np.ndarray

    def __post_init__(self) -> None:
        if self.voxels.dtype not in (np.bool_, np.uint8) or self.voxels.ndim != 3:
            raise ValueError("Mask voxels must be a 3-D bool array (or uint8 for a probability map).")
        if not 1 <= self.segment_number < 65536:
            raise ValueError("Segment number must be a positive integer below 65536.")

    @property
    def fractional(self) -> bool:
        return self.voxels.dtype == np.uint8


@dataclass(frozen=True)
class ReportText:
    findings: str = ""
    impression: str = ""
    language: str = "en"


@dataclass
class TaskResult:
    """The outcome of one task; unparsed=True keeps raw_output instead of crashing."""

    task: TaskKind
    findings: list[Finding] = field(default_factory=list)
    measurements: list[Measurement] = field(default_factory=list)
    boxes: list[Box] = field(default_factory=list)
    masks: list[Mask] = field(default_factory=list)
    report: ReportText | None = None
    answer: str = ""
    embedding: list[float] = field(default_factory=list)
    prompt_id: str = ""
    raw_output: str = ""
    unparsed: bool = False


@dataclass(frozen=True)
class ModelIdentity:
    name: str
    backend: str
    version: str
    weights_sha256: str = ""
    non_clinical: bool = False


@dataclass
class AnalysisResult:
    model: ModelIdentity
    tasks: list[TaskResult]
