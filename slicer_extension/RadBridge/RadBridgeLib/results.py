"""What the Slicer panel shows of one analysis: segments, box markups, a findings table, report text.

Pure: numpy and the radbridge.v1 protos only (never slicer, qt or vtk). The Slicer module turns
these plain values into segmentation and markups nodes.

Conventions:

* Masks are (k, j, i) bool arrays, as :class:`~RadBridgeLib.client.AnalysisResult` holds them.
* A contract ``pb.Box`` is in voxel index space on one slice: ``row`` is j, ``column`` is i,
  start inclusive, end exclusive, fractional allowed. Its markup corners are the box's outer
  edges: voxel centres sit at integer IJK, so the edges are at ``row_min - 0.5`` and
  ``row_max - 0.5`` (columns alike): a one-voxel box is that voxel's square, as in the SCOORD.
* Colours: the contract carries DICOM CIELab scaled to 0..65535 (L* = v0 / 65535 * 100,
  a* and b* = v / 65535 * 255 - 128, D65 white); Slicer wants sRGB in 0..1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from protos.radbridge.v1 import inference_pb2 as pb

from .client import AnalysisResult
from .geometry import ijk_to_ras

#: D65 reference white (CIE 1931 2 deg), Y normalised to 1.
_D65 = np.array([0.95047, 1.0, 1.08883])
#: Linear sRGB from CIE XYZ (IEC 61966-2-1).
_XYZ_TO_SRGB = np.array(
    [
        [3.2404542, -1.5371385, -0.4985314],
        [-0.9692660, 1.8760108, 0.0415560],
        [0.0556434, -0.2040259, 1.0572252],
    ]
)
_EPSILON = 216.0 / 24389.0
_KAPPA = 24389.0 / 27.0
#: Shown when a segment carries no recommended colour (Slicer's default segment grey-ish).
DEFAULT_COLOR = (0.5, 0.5, 0.5)

CodeTuple = tuple[str, str, str]


def dicom_lab_to_lab(cielab: tuple[int, int, int] | list[int]) -> tuple[float, float, float]:
    """DICOM scaled CIELab (0..65535 each) -> (L*, a*, b*)."""
    if len(cielab) != 3:
        raise ValueError(f"CIELab needs three values, got {len(cielab)}.")
    v0, v1, v2 = (float(v) for v in cielab)
    return v0 / 65535.0 * 100.0, v1 / 65535.0 * 255.0 - 128.0, v2 / 65535.0 * 255.0 - 128.0


def lab_to_srgb(lab: tuple[float, float, float]) -> tuple[float, float, float]:
    """CIELab (D65) -> sRGB in 0..1 (gamma-encoded, clipped to the gamut)."""
    L, a, b = (float(v) for v in lab)
    fy = (L + 16.0) / 116.0
    fx = fy + a / 500.0
    fz = fy - b / 200.0

    def finv(f: float) -> float:
        f3 = f**3
        return f3 if f3 > _EPSILON else (116.0 * f - 16.0) / _KAPPA

    yr = fy**3 if L > _KAPPA * _EPSILON else L / _KAPPA
    xyz = np.array([finv(fx), yr, finv(fz)]) * _D65
    linear = _XYZ_TO_SRGB @ xyz
    linear = np.clip(linear, 0.0, 1.0)
    srgb = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * np.power(linear, 1.0 / 2.4) - 0.055)
    return tuple(float(v) for v in np.clip(srgb, 0.0, 1.0))  # type: ignore[return-value]


def dicom_lab_to_rgb(cielab: tuple[int, int, int] | list[int]) -> tuple[float, float, float]:
    """DICOM scaled CIELab -> sRGB 0..1 (what Slicer's segment colour takes)."""
    return lab_to_srgb(dicom_lab_to_lab(cielab))


def _code(c: pb.Code) -> CodeTuple:
    return (c.value, c.scheme, c.meaning)


@dataclass(frozen=True)
class SegmentSpec:
    """One segment ready for a Slicer segmentation node."""

    segment_number: int
    name: str
    #: sRGB, each 0..1.
    color_rgb: tuple[float, float, float]
    #: Segmented property category and type as (value, scheme, meaning).
    category: CodeTuple
    type: CodeTuple
    #: (k, j, i) bool, the input volume's shape.
    mask: np.ndarray

    @property
    def voxel_count(self) -> int:
        return int(np.count_nonzero(self.mask))


def segment_specs(result: AnalysisResult) -> list[SegmentSpec]:
    """The result's segments in segment-number order (a segment whose mask is missing is skipped)."""
    specs = []
    for number in sorted(result.segments):
        info = result.segments[number]
        mask = result.masks.get(number)
        if mask is None:
            continue
        name = info.label or info.type.meaning or f"Segment {number}"
        color = dicom_lab_to_rgb(list(info.cielab)) if len(info.cielab) == 3 else DEFAULT_COLOR
        specs.append(
            SegmentSpec(
                segment_number=int(number),
                name=name,
                color_rgb=color,
                category=_code(info.category),
                type=_code(info.type),
                mask=np.asarray(mask, dtype=bool),
            )
        )
    return specs


@dataclass(frozen=True)
class BoxMarkup:
    """One detection box as a closed planar polygon in RAS (for a markups plane/closed curve)."""

    label: str
    #: Slice index k in the caller's (Slicer) volume.
    slice_index: int
    #: (4, 3) RAS corners, in order (row_min, col_min), (row_min, col_max), (row_max, col_max),
    #: (row_max, col_min), on the box's outer voxel edges.
    corners_ras: np.ndarray
    #: Model score 0..1, or None when the model gives none.
    score: float | None


def box_corners_ijk(box: pb.Box) -> np.ndarray:
    """(4, 3) IJK corners (i = column, j = row, k = slice) on the box's outer voxel edges."""
    r0, c0 = box.row_min - 0.5, box.column_min - 0.5
    r1, c1 = max(box.row_max, box.row_min) - 0.5, max(box.column_max, box.column_min) - 0.5
    k = float(box.slice_index)
    return np.array([[c0, r0, k], [c1, r0, k], [c1, r1, k], [c0, r1, k]], dtype=float)


def box_markups(result: AnalysisResult, ijk_to_ras_matrix: np.ndarray) -> list[BoxMarkup]:
    """The result's boxes with corners in RAS for the volume's 4x4 IJKToRAS matrix."""
    out = []
    for box in result.boxes:
        label = box.label or box.finding.meaning or "Box"
        out.append(
            BoxMarkup(
                label=label,
                slice_index=int(box.slice_index),
                corners_ras=ijk_to_ras(ijk_to_ras_matrix, box_corners_ijk(box)),
                score=float(box.score) if box.score >= 0 else None,
            )
        )
    return out


def format_score(score: float) -> str:
    return f"{score:.2f}" if score >= 0 else "—"


def findings_table(result: AnalysisResult) -> list[tuple[str, str, str]]:
    """Rows (finding, "present"/"absent", score as text, "—" when none) for a table widget."""
    rows = []
    for f in result.findings:
        name = f.label or f.finding.meaning or f.finding.value
        rows.append((name, "present" if f.present else "absent", format_score(f.score)))
    return rows


def report_text(result: AnalysisResult) -> str:
    """The generated report as "Findings: ...\\n\\nImpression: ..." (empty when no report task ran)."""
    parts = []
    for task in result.result.tasks:
        if task.report.findings:
            parts.append(f"Findings: {task.report.findings}")
        if task.report.impression:
            parts.append(f"Impression: {task.report.impression}")
    return "\n\n".join(parts) if parts else result.report_text
