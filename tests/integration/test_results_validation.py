"""Every shape of result the writers can produce passes dciodvfy and dsrdump."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import pydicom
import pytest

from dicom_node.results import ResultWriter
from dicom_node.volume import read_series
from protos.radbridge.v1 import inference_pb2 as pb
from radbridge.synth import cr_chest_path
from tests.peers import assert_valid_dicom_object

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("require_dcmtk", "require_dicom3tools")]
EFFUSION = pb.Code(value="60046008", scheme="SCT", meaning="Pleural effusion")
NODULE = pb.Code(value="27925004", scheme="SCT", meaning="Nodule")


def _model_result() -> pb.AnalysisResult:
    """What a VLM backend returns for a CXR: classification, a box, a bilingual report, VQA."""
    return pb.AnalysisResult(
        model=pb.ModelIdentity(
            name="medgemma-4b-it", backend="medgemma", version="1.5", weights_sha256="0f" * 32
        ),
        tasks=[
            pb.TaskResult(
                task=pb.TASK_KIND_CLASSIFY,
                findings=[
                    pb.Finding(finding=EFFUSION, score=0.82, present=True, label="pleural effusion"),
                    pb.Finding(finding=NODULE, score=0.07, present=False, label="nodule"),
                ],
                prompt_id="classify-yesno-v1",
                raw_output="yes / no",
            ),
            pb.TaskResult(
                task=pb.TASK_KIND_DETECT,
                boxes=[
                    pb.Box(
                        slice_index=0,
                        row_min=900,
                        column_min=200,
                        row_max=1400,
                        column_max=800,
                        finding=EFFUSION,
                        label="effusion",
                        score=0.7,
                    ),
                ],
                raw_output='[{"box_2d": [460, 108, 716, 434], "label": "effusion"}]',
            ),
            pb.TaskResult(
                task=pb.TASK_KIND_REPORT,
                report=pb.ReportText(findings="右侧少量胸腔积液。", impression="胸腔积液。", language="zh"),
                raw_output="Findings: 右侧少量胸腔积液。 Impression: 胸腔积液。",
            ),
            pb.TaskResult(task=pb.TASK_KIND_VQA, answer="Yes, a small right effusion.", raw_output="Yes"),
            pb.TaskResult(task=pb.TASK_KIND_REPORT, unparsed=True, raw_output="<truncated"),
        ],
    )


def test_model_outputs_on_a_cr_validate(tmp_path: Path) -> None:
    vol = read_series([cr_chest_path()])
    objects = ResultWriter(vol.sources, _model_result(), {}).build_all()
    assert [o.kind for o in objects] == ["measurements", "keyslices", "narrative"]
    for obj in objects:
        path = tmp_path / f"{obj.kind}.dcm"
        obj.dataset.save_as(path, enforce_file_format=True)
        assert_valid_dicom_object(path)
        assert pydicom.dcmread(path).VerificationFlag == "UNVERIFIED"


def test_reference_outputs_on_ct_validate(tmp_path: Path, small_ct_files: list[Path]) -> None:
    from tests.reference_run import analyze_reference

    vol = read_series(small_ct_files)
    outcome = analyze_reference(vol)
    objects = ResultWriter(vol.sources, outcome.result, outcome.masks).build_all()
    assert [o.kind for o in objects] == ["seg", "measurements", "keyslices", "narrative"]
    for obj in objects:
        path = tmp_path / f"{obj.kind}.dcm"
        obj.dataset.save_as(path, enforce_file_format=True)
        assert_valid_dicom_object(path)


def test_reference_outputs_on_a_cr_validate(tmp_path: Path) -> None:
    """A CR with a mask and a box, PixelSpacing 0\\0: the key-slice SR carries outlines without areas."""
    from tests.reference_run import analyze_reference

    vol = read_series([cr_chest_path()])
    outcome = analyze_reference(vol)
    objects = ResultWriter(vol.sources, outcome.result, outcome.masks).build_all()
    assert [o.kind for o in objects] == ["seg", "measurements", "keyslices", "narrative"]
    for obj in objects:
        path = tmp_path / f"{obj.kind}.dcm"
        obj.dataset.save_as(path, enforce_file_format=True)
        assert_valid_dicom_object(path)
    groups = hd.sr.srread(tmp_path / "keyslices.dcm").content.get_planar_roi_measurement_groups()
    assert [g.tracking_identifier for g in groups] == ["Foreground", "Foreground"]
    assert all(g.roi.GraphicType == "POLYLINE" for g in groups)
    assert not groups[0].get_measurements()  # no spacing, no area
