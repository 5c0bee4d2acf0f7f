"""Whatever text a model returns, the SEG and SRs built from it stay valid DICOM.

Control characters (the reported 0x1E in a VQA answer), over-long labels, bytes
that were not UTF-8 and Chinese text go through the service's result encoding
and the node's writers; every object passes dciodvfy and dsrdump and reads back
with highdicom, with the text kept as far as its VR allows.
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from dicom_node.results import ResultWriter
from dicom_node.volume import read_series
from inference_service.assembly import result_to_pb
from inference_service.types import (
    AnalysisResult,
    Code,
    Finding,
    Mask,
    ModelIdentity,
    ReportText,
    TaskKind,
    TaskResult,
)
from radbridge.synth import cr_chest_path
from tests.peers import assert_valid_dicom_object

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("require_dcmtk", "require_dicom3tools")]

CONTROLS = "".join(chr(c) for c in range(0x20)) + "\x7f"
NOT_UTF8 = b"pleural \xff\xfe effusion".decode("utf-8", "surrogateescape")  # a tokenizer's undecodable bytes
CHINESE = "右侧少量胸腔积液"
LUNG = Code("39607008", "SCT", "Lung")
TISSUE = Code("85756007", "SCT", "Tissue")
RGB = (40000, 40000, 40000)  # CIELab, DICOM-scaled


def _hostile_result(shape: tuple[int, int, int]) -> tuple[AnalysisResult, dict[int, np.ndarray]]:
    mask = np.zeros(shape, dtype=bool)
    mask[0, 800:1000, 300:600] = True
    other = np.zeros(shape, dtype=bool)
    other[0, 1100:1300, 900:1200] = True
    third = np.zeros(shape, dtype=bool)
    third[0, 200:300, 200:300] = True
    tasks = [
        TaskResult(
            TaskKind.SEGMENT,
            masks=[
                Mask(
                    1,
                    f"left{CONTROLS}lung\\upper",
                    LUNG,
                    Code("39607008", "SCT", f"Lung\x1e{CONTROLS}"),
                    RGB,
                    mask,
                ),
                Mask(2, CHINESE * 10, TISSUE, Code("85756007", "SCT", "组织" * 40), RGB, other),
                Mask(3, NOT_UTF8, TISSUE, TISSUE, RGB, third),
            ],
        ),
        TaskResult(
            TaskKind.CLASSIFY,
            findings=[Finding(Code("60046008", "SCT", "Pleural effusion" * 8), 0.8, True, "x" * 300)],
            raw_output=f"yes{CONTROLS}",
        ),
        TaskResult(TaskKind.VQA, answer="Yes\x1eNo, a small effusion.", raw_output="Yes\x1eNo"),
        TaskResult(
            TaskKind.REPORT,
            report=ReportText(f"{CHINESE}。\x1e\x00", f"{NOT_UTF8}\x0b结论。", "zh\x1e"),
            raw_output=f"所见：{CHINESE}\x1e{NOT_UTF8}",
            prompt_id="report\x00v1\\2",
        ),
    ]
    model = ModelIdentity(name=f"model\x1e{'名' * 40}", backend="medgemma\x00", version="1.5\\beta\x07")
    masks = {m.segment_number: m.voxels for m in tasks[0].masks}
    return AnalysisResult(model, tasks), masks


def test_hostile_model_text_gives_valid_seg_and_srs(tmp_path: Path) -> None:
    vol = read_series([cr_chest_path()])
    domain, masks = _hostile_result(vol.voxels.shape)
    result = result_to_pb(domain)  # the service's side: would raise on the surrogates without _utf8
    objects = ResultWriter(vol.sources, result, masks).build_all()
    assert [o.kind for o in objects] == ["seg", "measurements", "keyslices", "narrative"]
    paths = {}
    for obj in objects:
        path = paths[obj.kind] = tmp_path / f"{obj.kind}.dcm"
        obj.dataset.save_as(path, enforce_file_format=True)
        assert_valid_dicom_object(path)
        assert pydicom.dcmread(path, stop_before_pixels=True).SpecificCharacterSet == "ISO_IR 192"

    seg = hd.seg.segread(paths["seg"])
    labels = [seg.get_segment_description(n).SegmentLabel for n in (1, 2, 3)]
    assert labels[0] == "left" + " " * len(CONTROLS) + "lung/upper"  # controls -> spaces, "\\" -> "/"
    assert labels[1] == CHINESE * 2 + CHINESE[:5]  # 21 characters: 63 of 64 UTF-8 bytes
    assert labels[2] == "pleural \ufffd\ufffd effusion"
    meaning = seg.get_segment_description(2).SegmentedPropertyTypeCodeSequence[0].CodeMeaning
    assert meaning == "组织" * 10 + "组"  # 63 bytes

    narrative = hd.sr.srread(paths["narrative"])
    texts = _text_values(narrative)
    assert "Yes No, a small effusion." in texts
    assert f"{CHINESE}。" in texts  # trailing controls -> spaces, dropped
    assert "pleural \ufffd\ufffd effusion 结论。" in texts  # VT (0x0B) is not allowed in UT
    assert f"所见：{CHINESE}\u241epleural \ufffd\ufffd effusion" in texts  # raw output: control picture
    assert (
        "yes"
        + "".join(c if c in "\n\f\r" else chr(0x2400 + ord(c)) if c != "\x7f" else "\u2421" for c in CONTROLS)
        in texts
    )
    assert "report v1/2" in texts  # prompt id as LO
    assert str(narrative.ContentSequence[0].ConceptCodeSequence[0].CodeValue) == "zh"

    for kind in ("measurements", "keyslices"):
        report = hd.sr.srread(paths[kind])
        labels = _text_values(report)  # tracking identifiers, algorithm name and version
        assert labels and all(len(t.encode()) <= 64 and t.isprintable() for t in labels), labels
    equipment = pydicom.dcmread(paths["measurements"], stop_before_pixels=True)
    assert equipment.SoftwareVersions == "1.5/beta"  # one value, not "1.5" and "beta"
    assert len(str(equipment.ManufacturerModelName).encode()) <= 64


def _text_values(ds: pydicom.Dataset) -> list[str]:
    """Every TEXT content item's value, depth first."""
    out: list[str] = []
    for item in ds.get("ContentSequence", []):
        if item.get("ValueType") == "TEXT":
            out.append(str(item.TextValue))
        out.extend(_text_values(item))
    return out
