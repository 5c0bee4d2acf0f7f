"""The panel's results as DICOM SEG + SR, and RadBridge's SEG + SR back into the panel.

Saving goes through the node's own writer, ``dicom_node.results.ResultWriter`` (highdicom; no
spool, no jobs), so a series analysed in Slicer and the same series analysed by PACS routing give
the same objects with the same UIDs (they derive from series, model and version). Loading reads
what the node or this panel wrote into an :class:`~RadBridgeLib.client.AnalysisResult` on the
Slicer volume's grid, so the panel shows it exactly as a fresh analysis.

Both directions need the Slicer volume to be the series' own pixel grid, as Slicer's DICOM loader
makes it: i along the DICOM row direction (increasing column), j along the column direction
(increasing row), one slice per instance. :func:`slice_indices` checks that and says what differs.

Imports highdicom and the node's writer lazily: the rest of RadBridgeLib works without them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from protos.radbridge.v1 import inference_pb2 as pb

from .client import AnalysisResult, RadBridgeError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

#: Our writer's series numbers (``dicom_node.results.SERIES_NUMBERS``), repeated here so that
#: listing a DICOM database needs neither highdicom nor the node package.
OUTPUT_SERIES_NUMBERS = {9701: "seg", 9702: "measurements", 9703: "narrative", 9704: "keyslices"}
MANUFACTURER = "RadBridge"
#: Tolerance, in voxels, for positions and axes compared between the volume and the headers.
GRID_TOLERANCE = 0.05
_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
_FINDINGS, _IMPRESSIONS = "59776-5", "19005-8"
_PROBABILITY = "C0033204"
_PRESENT = "52101004"


class DicomMismatchError(RadBridgeError, ValueError):
    """The volume in the scene is not the pixel grid of the DICOM series it came from."""


def output_kind(ds: Dataset) -> str | None:
    """Kind ("seg", "measurements", "narrative" or "keyslices" of an object RadBridge wrote) or None."""
    return kind_from_attributes(
        str(ds.get("Modality", "")), str(ds.get("Manufacturer", "")), str(ds.get("SeriesNumber", "") or "")
    )


def kind_from_attributes(modality: str, manufacturer: str, series_number: str) -> str | None:
    """:func:`output_kind` from the three attributes (as a DICOM database caches them)."""
    if manufacturer.strip() != MANUFACTURER:
        return None
    try:
        kind = OUTPUT_SERIES_NUMBERS.get(int(series_number))
    except ValueError:
        return None
    return kind if kind is not None and modality.strip() == ("SEG" if kind == "seg" else "SR") else None


def slice_indices(headers: Sequence[Dataset], ijk_to_ras: np.ndarray, shape_kji: Sequence[int]) -> list[int]:
    """The k index of each header's image in the volume; raises DicomMismatchError otherwise.

    Every image must lie on one slice of the volume (i = j = 0 at its first pixel), share its
    row/column axes and spacing, and the images must fill the k range once each.
    """
    if not headers:
        raise DicomMismatchError("The series has no images.")
    n, rows, columns = (int(v) for v in tuple(shape_kji)[:3])
    m_lps = _LPS @ np.asarray(ijk_to_ras, dtype=float)
    try:
        lps_to_ijk = np.linalg.inv(m_lps)
    except np.linalg.LinAlgError as exc:
        raise DicomMismatchError("The volume's IJK to RAS matrix is singular.") from exc
    ks: list[int] = []
    for number, ds in enumerate(headers, start=1):
        where = f"image {number} of {len(headers)} (instance number {ds.get('InstanceNumber', '?')})"
        if int(ds.get("NumberOfFrames", 1) or 1) != 1:
            raise DicomMismatchError(f"{where} is multi-frame; only single-frame series are supported.")
        if (int(ds.Rows), int(ds.Columns)) != (rows, columns):
            raise DicomMismatchError(
                f"{where} is {ds.Rows}x{ds.Columns} pixels but the volume's slices are {rows}x{columns}."
            )
        try:
            iop = np.array([float(v) for v in ds.ImageOrientationPatient])
            row_mm, column_mm = (float(v) for v in ds.PixelSpacing)
            ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        except (AttributeError, TypeError, ValueError) as exc:
            raise DicomMismatchError(f"{where} lacks a usable image plane ({exc}).") from exc
        for axis, expected, name in ((0, iop[:3] * column_mm, "i"), (1, iop[3:] * row_mm, "j")):
            if np.linalg.norm(m_lps[:3, axis] - expected) > GRID_TOLERANCE * np.linalg.norm(expected):
                raise DicomMismatchError(
                    f"The volume's {name} axis differs from the orientation and pixel spacing of {where}; "
                    "was the volume resampled or cropped after loading?"
                )
        i, j, k = (lps_to_ijk @ np.append(ipp, 1.0))[:3]
        if abs(i) > GRID_TOLERANCE or abs(j) > GRID_TOLERANCE or abs(k - round(k)) > GRID_TOLERANCE:
            raise DicomMismatchError(
                f"{where} lies between the volume's slices (IJK {i:.2f}, {j:.2f}, {k:.2f}); "
                "was the volume resampled after loading?"
            )
        ks.append(int(round(k)))
    if sorted(ks) != list(range(n)):
        raise DicomMismatchError(
            f"The series' {len(headers)} images do not fill the volume's {n} slices once each "
            "(missing or repeated slices)."
        )
    return ks


def in_volume_order(
    headers: Sequence[Dataset], ijk_to_ras: np.ndarray, shape_kji: Sequence[int]
) -> list[Dataset]:
    """The headers sorted so that index k is the volume's slice k."""
    ks = slice_indices(headers, ijk_to_ras, shape_kji)
    return [headers[i] for i in np.argsort(ks)]


def build_objects(
    result: AnalysisResult,
    headers: Sequence[Dataset],
    ijk_to_ras: np.ndarray,
    shape_kji: Sequence[int],
    uid_root: str | None = None,
) -> list:
    """The node's SEG / SR objects (``dicom_node.results.OutputObject``) for this analysis."""
    from dicom_node.results import DEFAULT_UID_ROOT, ResultWriter

    sources = in_volume_order(headers, ijk_to_ras, shape_kji)
    writer = ResultWriter(sources, result.result, result.masks, uid_root or DEFAULT_UID_ROOT)
    return writer.build_all()


def save_results(
    result: AnalysisResult,
    headers: Sequence[Dataset],
    ijk_to_ras: np.ndarray,
    shape_kji: Sequence[int],
    out_dir: Path,
    uid_root: str | None = None,
) -> list[Path]:
    """Writes SEG + SRs as DICOM Part 10 files named ``<kind>-<SOP Instance UID>.dcm``."""
    objects = build_objects(result, headers, ijk_to_ras, shape_kji, uid_root)
    if not objects:
        raise ValueError("The analysis produced nothing to save (no mask, box, finding or text).")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for obj in objects:
        path = out_dir / f"{obj.kind}-{obj.sop_instance_uid}.dcm"
        obj.dataset.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# -- reading back ----------------------------------------------------------------------------


def _code(item: object) -> pb.Code:
    return pb.Code(
        value=str(getattr(item, "value", "")),
        scheme=str(getattr(item, "scheme_designator", "")),
        meaning=str(getattr(item, "meaning", "")),
    )


def _seq_code(ds: Dataset, keyword: str) -> pb.Code:
    seq = ds.get(keyword)
    if not seq:
        return pb.Code()
    c = seq[0]
    return pb.Code(value=str(c.CodeValue), scheme=str(c.CodingSchemeDesignator), meaning=str(c.CodeMeaning))


def _score(group: object) -> float:
    for m in group.get_measurements():  # type: ignore[attr-defined]
        if m.name.value == _PROBABILITY:
            return float(m.value)
    return -1.0


def read_results(
    datasets: Sequence[Dataset],
    headers: Sequence[Dataset],
    ijk_to_ras: np.ndarray,
    shape_kji: Sequence[int],
) -> AnalysisResult:
    """RadBridge's SEG, measurements SR and narrative SR of one series, on the volume's grid.

    ``headers`` are the source series' images (header-only is enough); the key-slice SR is
    skipped (it repeats the measurements SR for OHIF).
    """
    ks = slice_indices(headers, ijk_to_ras, shape_kji)
    uid_to_k = {str(ds.SOPInstanceUID): k for ds, k in zip(headers, ks, strict=True)}
    uids_in_order = [str(headers[i].SOPInstanceUID) for i in np.argsort(ks)]
    by_kind: dict[str, Dataset] = {}
    for ds in datasets:
        kind = output_kind(ds)
        if kind is not None and kind != "keyslices":
            by_kind.setdefault(kind, ds)
    if not by_kind:
        raise ValueError("None of the given objects is a RadBridge SEG or SR.")
    model = pb.ModelIdentity()
    first = next(iter(by_kind.values()))
    model.name = str(first.get("ManufacturerModelName", ""))
    model.version = str(first.get("SoftwareVersions", "") or "")
    out = AnalysisResult(result=pb.AnalysisResult(model=model))
    if "seg" in by_kind:
        _read_seg(by_kind["seg"], uids_in_order, out)
    if "measurements" in by_kind:
        _read_measurements(by_kind["measurements"], uid_to_k, out)
    if "narrative" in by_kind:
        _read_narrative(by_kind["narrative"], out)
    return out


def _read_seg(ds: Dataset, uids_in_order: list[str], out: AnalysisResult) -> None:
    import highdicom as hd

    seg = hd.seg.Segmentation.from_dataset(ds, copy=False)
    task = out.result.tasks.add(task=pb.TASK_KIND_SEGMENT)
    numbers = [int(s.SegmentNumber) for s in seg.SegmentSequence]
    try:
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=uids_in_order,
            segment_numbers=numbers,
            combine_segments=False,
            assert_missing_frames_are_empty=True,
        )
    except (KeyError, ValueError, RuntimeError) as exc:
        raise DicomMismatchError(f"The SEG does not segment the images of this series: {exc}") from exc
    for index, desc in enumerate(seg.SegmentSequence):
        number = int(desc.SegmentNumber)
        mask = np.asarray(pixels[..., index]) > 0
        info = task.masks.add(
            segment_number=number,
            label=str(desc.get("SegmentLabel", f"Segment {number}")),
            category=_seq_code(desc, "SegmentedPropertyCategoryCodeSequence"),
            type=_seq_code(desc, "SegmentedPropertyTypeCodeSequence"),
            voxel_count=int(mask.sum()),
        )
        lab = desc.get("RecommendedDisplayCIELabValue")
        if lab is not None:
            info.cielab.extend(int(v) for v in lab)
        out.masks[number] = mask
        out.segments[number] = info


def _read_measurements(ds: Dataset, uid_to_k: dict[str, int], out: AnalysisResult) -> None:
    import highdicom as hd

    report = hd.sr.Comprehensive3DSR.from_dataset(ds, copy=False).content
    detect = pb.TaskResult(task=pb.TASK_KIND_DETECT)
    classify = pb.TaskResult(task=pb.TASK_KIND_CLASSIFY)
    measured = pb.TaskResult(task=pb.TASK_KIND_SEGMENT)
    for group in report.get_planar_roi_measurement_groups():
        roi = group.roi
        if roi is None:
            continue
        ref = roi.ContentSequence[0].ReferencedSOPSequence[0]
        k = uid_to_k.get(str(ref.ReferencedSOPInstanceUID))
        if k is None:
            raise DicomMismatchError("A box of the SR is on an image that is not in this series.")
        points = np.asarray(roi.value, dtype=float)  # (column, row)
        detect.boxes.add(
            slice_index=k,
            row_min=float(points[:, 1].min()),
            column_min=float(points[:, 0].min()),
            row_max=float(points[:, 1].max()),
            column_max=float(points[:, 0].max()),
            finding=_code(group.finding_type) if group.finding_type is not None else pb.Code(),
            label=str(group.tracking_identifier or ""),
            score=_score(group),
        )
    for group in report.get_volumetric_roi_measurement_groups():
        segment = group.referenced_segment
        numbers = (segment.referenced_segment_numbers if segment is not None else None) or [0]
        number = int(numbers[0])
        for m in group.get_measurements():
            measured.measurements.add(
                concept=_code(m.name), value=float(m.value), unit=_code(m.unit), segment_number=number
            )
    for group in report.get_image_measurement_groups():
        evaluations = group.get_qualitative_evaluations()
        for q in evaluations:
            classify.findings.add(
                finding=_code(q.name),
                present=str(q.value.value) == _PRESENT,
                label=str(group.tracking_identifier or q.name.meaning),
                score=_score(group),
            )
        if not evaluations:
            for m in group.get_measurements():
                measured.measurements.add(concept=_code(m.name), value=float(m.value), unit=_code(m.unit))
    segment_task = next((t for t in out.result.tasks if t.task == pb.TASK_KIND_SEGMENT), None)
    if segment_task is not None:
        segment_task.measurements.extend(measured.measurements)
    elif measured.measurements:
        out.result.tasks.append(measured)
    for task in (detect, classify):
        if task.boxes or task.findings:
            out.result.tasks.append(task)
    out.boxes.extend(detect.boxes)
    out.findings.extend(classify.findings)
    out.measurements.extend(measured.measurements)


def _read_narrative(ds: Dataset, out: AnalysisResult) -> None:
    sections: dict[str, list[str]] = {_FINDINGS: [], _IMPRESSIONS: []}
    for item in ds.get("ContentSequence", []):
        if item.get("ValueType") != "CONTAINER":
            continue
        code = str(item.ConceptNameCodeSequence[0].CodeValue)
        if code in sections:
            sections[code].extend(
                str(child.TextValue) for child in item.get("ContentSequence", []) if "TextValue" in child
            )
    findings, impression = "\n".join(sections[_FINDINGS]), "\n".join(sections[_IMPRESSIONS])
    if not findings and not impression:
        return
    out.result.tasks.add(
        task=pb.TASK_KIND_REPORT, report=pb.ReportText(findings=findings, impression=impression)
    )
    parts = [f"Findings: {findings}" if findings else "", f"Impression: {impression}" if impression else ""]
    out.report_text = "\n\n".join(p for p in parts if p)
