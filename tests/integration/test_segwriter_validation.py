"""The directly written SEG (dicom_node.segwriter) under dciodvfy: no error, and no warning that
highdicom's Segmentation of the same input did not get. (dcmqi reading it back, as Slicer does:
tests/integration/test_slicer_converters.py, through the same ResultWriter.build_seg.)"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from dicom_node.masks import FractionalMask, PackedMask
from dicom_node.results import ResultWriter
from dicom_node.volume import read_series
from radbridge.synth import cr_chest_path, ct_series
from tests.peers import DCIODVFY_IGNORED
from tests.reference_run import analyze_reference
from tests.unit.dicom_node.test_volume_geometry import _temporal, legacy_enhanced, save

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("require_dicom3tools")]


def _findings(path: Path) -> tuple[list[str], set[str]]:
    """dciodvfy's Error lines and its Warning lines."""
    proc = subprocess.run(
        ["dciodvfy", str(path)], capture_output=True, text=True, errors="replace", timeout=120
    )
    lines = [
        ln for ln in (proc.stdout + proc.stderr).splitlines() if not any(i in ln for i in DCIODVFY_IGNORED)
    ]
    return [ln for ln in lines if ln.startswith("Error")], {ln for ln in lines if ln.startswith("Warning")}


def _check(writer: ResultWriter, tmp_path: Path) -> None:
    new, old = tmp_path / "new.dcm", tmp_path / "old.dcm"
    writer.build_seg().save_as(new, enforce_file_format=True)
    writer.build_seg_highdicom().save_as(old, enforce_file_format=True)
    new_errors, new_warnings = _findings(new)
    _, old_warnings = _findings(old)
    assert new_errors == []
    assert new_warnings <= old_warnings


def test_reference_ct_with_packed_and_fractional_masks(tmp_path: Path, small_ct_files: list[Path]) -> None:
    vol = read_series(small_ct_files)
    outcome = analyze_reference(vol)
    packed = {n: PackedMask(np.packbits(m).tobytes(), m.shape) for n, m in outcome.masks.items()}
    _check(ResultWriter(vol.sources, outcome.result, packed), tmp_path)
    for info in outcome.result.tasks[0].masks:  # the same segments as probability maps: FRACTIONAL
        info.encoding = 2
    fractional = {n: FractionalMask(np.asarray(m, np.uint8) * 200, m.shape) for n, m in outcome.masks.items()}
    (tmp_path / "f").mkdir()
    _check(ResultWriter(vol.sources, outcome.result, fractional), tmp_path / "f")


def test_enhanced_source_and_cr(tmp_path: Path) -> None:
    source = _temporal(legacy_enhanced(ct_series(n_slices=6)), True)
    vol = read_series([save(source, tmp_path / "mf.dcm")])
    outcome = analyze_reference(vol)
    (tmp_path / "mf").mkdir()
    _check(ResultWriter(vol.sources, outcome.result, outcome.masks, slices=vol.slices), tmp_path / "mf")
    cr = read_series([cr_chest_path()])
    outcome = analyze_reference(cr)
    (tmp_path / "cr").mkdir()
    _check(ResultWriter(cr.sources, outcome.result, outcome.masks), tmp_path / "cr")
