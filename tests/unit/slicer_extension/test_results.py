"""RadBridgeLib.results: segment specs (names, colours), box markups in RAS, findings table, report text."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest
import RadBridgeLib as lib
from RadBridgeLib.results import (
    BoxMarkup,
    SegmentSpec,
    box_markups,
    dicom_lab_to_rgb,
    findings_table,
    lab_to_srgb,
    report_text,
    segment_specs,
)

from inference_service.config import ServiceSection, ServiceSettings
from protos.radbridge.v1 import inference_pb2 as pb
from radbridge.embedded import EmbeddedInferenceService
from radbridge.synth import phantom_hu
from tests.unit.slicer_extension.conftest import EXTENSION_DIR

SHAPE = (4, 6, 8)  # (k, j, i)
SPACING_IJK = (0.7, 0.9, 2.5)
ORIGIN_RAS = np.array([10.0, -20.0, 30.0])
A = math.radians(20.0)
TISSUE = pb.Code(value="85756007", scheme="SCT", meaning="Tissue")
LUNG = pb.Code(value="39607008", scheme="SCT", meaning="Lung")
BONE = pb.Code(value="272673000", scheme="SCT", meaning="Bone")
EFFUSION = pb.Code(value="60046008", scheme="SCT", meaning="Pleural effusion")
WHITE = (65535, 32896, 32896)
#: sRGB (1, 0, 0) is CIELab (53.2408, 80.0925, 67.2032) under D65, DICOM-scaled.
RED = (34891, 53480, 50167)


def oblique_ijk_to_ras() -> np.ndarray:
    c, s = math.cos(A), math.sin(A)
    rx = np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    rz = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    m = np.eye(4)
    m[:3, :3] = rx @ rz @ np.diag(SPACING_IJK)
    m[:3, 3] = ORIGIN_RAS
    return m


def _hand_made() -> lib.AnalysisResult:
    lungs = np.zeros(SHAPE, dtype=bool)
    lungs[1:3, 2:4, 1:6] = True
    bone = np.zeros(SHAPE, dtype=bool)
    bone[0, 0, :] = True
    seg = pb.TaskResult(
        task=pb.TASK_KIND_SEGMENT,
        masks=[
            pb.MaskInfo(segment_number=2, label="Bone", category=TISSUE, type=BONE, cielab=list(WHITE)),
            pb.MaskInfo(segment_number=1, label="", category=TISSUE, type=LUNG, cielab=list(RED)),
        ],
    )
    detect = pb.TaskResult(
        task=pb.TASK_KIND_DETECT,
        boxes=[
            pb.Box(
                slice_index=2,
                row_min=1,
                column_min=3,
                row_max=4,
                column_max=7,
                finding=LUNG,
                label="",
                score=0.75,
            ),
            pb.Box(
                slice_index=0,
                row_min=0,
                column_min=0,
                row_max=1,
                column_max=1,
                finding=LUNG,
                label="x",
                score=-1,
            ),
        ],
        findings=[
            pb.Finding(finding=EFFUSION, score=0.125, present=True, label=""),
            pb.Finding(finding=LUNG, score=-1, present=False, label="Collapsed lung"),
        ],
    )
    report = pb.TaskResult(
        task=pb.TASK_KIND_REPORT,
        report=pb.ReportText(findings="Clear lungs.", impression="Normal.", language="en"),
    )
    result = pb.AnalysisResult(model=pb.ModelIdentity(name="m"), tasks=[seg, detect, report])
    out = lib.AnalysisResult(result=result, masks={1: lungs, 2: bone})
    out.segments = {info.segment_number: info for info in seg.masks}
    out.boxes = list(detect.boxes)
    out.findings = list(detect.findings)
    return out


# -- colours ------------------------------------------------------------------------------


def test_dicom_white_and_black_convert_to_srgb_extremes() -> None:
    assert dicom_lab_to_rgb(WHITE) == pytest.approx((1.0, 1.0, 1.0), abs=1e-3)
    assert dicom_lab_to_rgb((0, 32896, 32896)) == pytest.approx((0.0, 0.0, 0.0), abs=1e-3)


@pytest.mark.parametrize(
    ("lab", "rgb"),
    [
        ((53.2408, 80.0925, 67.2032), (1.0, 0.0, 0.0)),
        ((87.7347, -86.1827, 83.1793), (0.0, 1.0, 0.0)),
        ((32.2970, 79.1875, -107.8602), (0.0, 0.0, 1.0)),
        ((53.5850, 0.0, 0.0), (0.5, 0.5, 0.5)),  # mid grey: sRGB 0.5 is L* 53.585
    ],
)
def test_lab_to_srgb_known_values(lab: tuple[float, float, float], rgb: tuple[float, float, float]) -> None:
    assert lab_to_srgb(lab) == pytest.approx(rgb, abs=2e-3)


def test_saturated_dicom_scaled_red() -> None:
    assert dicom_lab_to_rgb(RED) == pytest.approx((1.0, 0.0, 0.0), abs=2e-3)


def test_results_module_imports_no_slicer_qt_or_vtk() -> None:
    code = (
        f"import sys; sys.path.insert(0, {str(EXTENSION_DIR)!r}); import RadBridgeLib.results; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('slicer', 'qt', 'vtk', 'vtkmodules', 'ctk', 'dicom_node', 'highdicom')); print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- hand-made result ---------------------------------------------------------------------


def test_segment_specs_names_colours_codes_and_masks() -> None:
    r = _hand_made()
    specs = segment_specs(r)
    assert [s.segment_number for s in specs] == [1, 2]
    lung, bone = specs
    assert isinstance(lung, SegmentSpec)
    assert lung.name == "Lung"  # no label: falls back to the property type's meaning
    assert bone.name == "Bone"
    assert lung.color_rgb == pytest.approx((1.0, 0.0, 0.0), abs=2e-3)
    assert bone.color_rgb == pytest.approx((1.0, 1.0, 1.0), abs=1e-3)
    assert lung.category == ("85756007", "SCT", "Tissue")
    assert lung.type == ("39607008", "SCT", "Lung")
    assert lung.mask.shape == SHAPE and lung.mask.dtype == bool
    assert lung.voxel_count == 2 * 2 * 5 and bone.voxel_count == 8
    with pytest.raises(AttributeError):
        lung.name = "x"  # type: ignore[misc]


def test_box_corners_on_an_oblique_matrix() -> None:
    m = oblique_ijk_to_ras()
    first, second = box_markups(_hand_made(), m)
    assert isinstance(first, BoxMarkup)
    assert first.label == "Lung" and first.slice_index == 2 and first.score == pytest.approx(0.75)
    assert second.label == "x" and second.score is None
    # Rows are j, columns are i; corners on the outer voxel edges (end exclusive).
    expected_ijk = np.array([[2.5, 0.5, 2], [6.5, 0.5, 2], [6.5, 3.5, 2], [2.5, 3.5, 2]], dtype=float)
    expected = expected_ijk @ m[:3, :3].T + m[:3, 3]
    assert first.corners_ras.shape == (4, 3)
    np.testing.assert_allclose(first.corners_ras, expected, atol=1e-9)
    # Hand-computed: corner (i=2.5, j=0.5, k=2) = origin + 2.5*0.7*i_axis + 0.5*0.9*j_axis + 2*2.5*k_axis.
    c, s = math.cos(A), math.sin(A)
    i_axis, j_axis, k_axis = np.array([c, s * c, s * s]), np.array([-s, c * c, c * s]), np.array([0, -s, c])
    np.testing.assert_allclose(first.corners_ras[0], ORIGIN_RAS + 1.75 * i_axis + 0.45 * j_axis + 5.0 * k_axis)
    # The four corners are coplanar in the slice plane and form a 2.8 mm x 2.7 mm rectangle (4 x 3 voxels).
    edges = np.diff(np.vstack([first.corners_ras, first.corners_ras[:1]]), axis=0)
    assert np.linalg.norm(edges, axis=1) == pytest.approx([2.8, 2.7, 2.8, 2.7])
    assert np.allclose((first.corners_ras - first.corners_ras[0]) @ k_axis, 0.0)
    # A one-voxel box is that voxel's square around its centre.
    square = np.array([[-0.5, -0.5, 0], [0.5, -0.5, 0], [0.5, 0.5, 0], [-0.5, 0.5, 0]])
    np.testing.assert_allclose(second.corners_ras, square @ m[:3, :3].T + m[:3, 3], atol=1e-9)


def test_findings_table_and_report_text() -> None:
    r = _hand_made()
    assert findings_table(r) == [
        ("Pleural effusion", "present", "0.12"),
        ("Collapsed lung", "absent", "—"),
    ]
    assert report_text(r) == "Findings: Clear lungs.\n\nImpression: Normal."
    empty = lib.AnalysisResult(result=pb.AnalysisResult())
    assert findings_table(empty) == [] and report_text(empty) == ""
    assert segment_specs(empty) == [] and box_markups(empty, np.eye(4)) == []


# -- a real result from the reference backend ---------------------------------------------


@pytest.fixture(scope="module")
def real() -> Iterator[tuple[lib.AnalysisResult, np.ndarray]]:
    ct = phantom_hu(n_slices=24)
    m = oblique_ijk_to_ras()
    with (
        EmbeddedInferenceService(ServiceSettings(inference_service=ServiceSection(port=0))) as svc,
        lib.RadBridgeClient(svc.address, deadline_s=120) as client,
    ):
        yield client.analyze(ct, m, ["segment", "report", "detect"]), m


def test_real_reference_result(real: tuple[lib.AnalysisResult, np.ndarray]) -> None:
    r, m = real
    specs = segment_specs(r)
    assert [s.name for s in specs] == ["Lungs", "Bone", "Soft tissue"]
    for s in specs:
        assert s.voxel_count == r.segments[s.segment_number].voxel_count > 0
        assert all(0.0 <= v <= 1.0 for v in s.color_rgb)
        assert s.category[1] == "SCT" and s.type[1] == "SCT"
    assert len({s.color_rgb for s in specs}) == 3
    boxes = box_markups(r, m)
    assert len(boxes) == len(r.boxes) == 2
    for markup, box in zip(boxes, r.boxes, strict=True):
        assert markup.label == "Lung"
        # Every corner maps back to the box's slice and its outer voxel edges.
        ijk = lib.ras_to_ijk(m, markup.corners_ras)
        np.testing.assert_allclose(ijk[:, 2], box.slice_index, atol=1e-9)
        np.testing.assert_allclose(sorted(set(np.round(ijk[:, 0], 9))), [box.column_min - 0.5, box.column_max - 0.5])
        np.testing.assert_allclose(sorted(set(np.round(ijk[:, 1], 9))), [box.row_min - 0.5, box.row_max - 0.5])
    text = report_text(r)
    assert text.startswith("Findings: Threshold analysis of 24 slices.")
    assert "\n\nImpression: " in text
    assert text == r.report_text
    assert ("Aerated lung", "present", "—") in findings_table(r)
