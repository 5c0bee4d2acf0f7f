"""`radbridge demo` as a user runs it; its outputs are validated like any produced object."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import highdicom as hd
import pydicom
import pytest

from tests.peers import assert_valid_dicom_object

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.usefixtures("require_dcmtk", "require_dicom3tools"),
]


def test_demo_writes_valid_seg_and_srs(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "radbridge.cli",
            "demo",
            "--out",
            str(out),
            "--slices",
            "100",
            "--spool",
            str(tmp_path / "spool"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    files = sorted(out.glob("*.dcm"))
    modalities = sorted(pydicom.dcmread(f, stop_before_pixels=True).Modality for f in files)
    assert modalities == ["SEG", "SR", "SR", "SR"]
    study_uids = {pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID for f in files}
    assert len(study_uids) == 1
    for f in files:
        assert_valid_dicom_object(f)
        ds = pydicom.dcmread(f)
        if ds.Modality == "SEG":
            seg = hd.seg.Segmentation.from_dataset(ds)
            assert [seg.get_segment_description(n).segment_label for n in seg.segment_numbers] == [
                "Lungs",
                "Bone",
                "Soft tissue",
            ]
        else:
            hd.sr.srread(f)
    assert "segment 1: Lungs" in run.stdout
    assert "Volume" in run.stdout and "mL" in run.stdout
