"""STOW-RS export of real SEG/SR objects to Orthanc's DICOMweb plugin."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from dicom_node.config import ExportTarget
from dicom_node.errors import PermanentExportError
from dicom_node.export import export
from dicom_node.results import ResultWriter
from dicom_node.volume import read_series
from tests.peers import OrthancServer, assert_valid_dicom_object

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("require_dcmtk", "require_dicom3tools")]


@pytest.fixture(scope="module")
def result_files(small_ct_files: list[Path], tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Every object the writers make of the reference backend's CT result (SEG, SRs), as files."""
    from tests.reference_run import analyze_reference

    vol = read_series(small_ct_files)
    outcome = analyze_reference(vol)
    out = tmp_path_factory.mktemp("results")
    paths = []
    for obj in ResultWriter(vol.sources, outcome.result, outcome.masks).build_all():
        path = out / f"{obj.kind}.dcm"
        obj.dataset.save_as(path, enforce_file_format=True)
        paths.append(path)
    assert {"seg", "measurements", "narrative"} <= {p.stem for p in paths}
    return paths


def _headers(paths: list[Path]) -> dict[str, pydicom.Dataset]:
    headers = (pydicom.dcmread(p, stop_before_pixels=True) for p in paths)
    return {str(ds.SOPInstanceUID): ds for ds in headers}


def test_seg_and_sr_land_in_the_source_study(
    orthanc: OrthancServer, result_files: list[Path], tmp_path: Path
) -> None:
    sent = _headers(result_files)
    study_uid = next(iter(sent.values())).StudyInstanceUID
    export(result_files, ExportTarget(type="dicomweb", url=orthanc.dicomweb_url), "RADBRIDGE")

    found = orthanc.qido(f"/studies/{study_uid}/instances")
    assert {item["00080018"]["Value"][0] for item in found} == set(sent)
    for item in orthanc.find_instances(StudyInstanceUID=study_uid):
        uid = item["MainDicomTags"]["SOPInstanceUID"]
        stored = tmp_path / f"{uid}.dcm"
        stored.write_bytes(orthanc.instance_file(item["ID"]))
        ds = pydicom.dcmread(stored, stop_before_pixels=True)
        assert ds.SOPClassUID == sent[uid].SOPClassUID and ds.StudyInstanceUID == study_uid
        assert_valid_dicom_object(stored)


def test_exporting_the_same_objects_twice_succeeds(orthanc: OrthancServer, result_files: list[Path]) -> None:
    target = ExportTarget(type="dicomweb", url=orthanc.dicomweb_url)
    export(result_files, target, "RADBRIDGE")
    export(result_files, target, "RADBRIDGE")
    assert len(orthanc.get_json("/instances")) == len(result_files)


def test_a_wrong_service_path_is_a_permanent_404(orthanc: OrthancServer, result_files: list[Path]) -> None:
    with pytest.raises(PermanentExportError, match="HTTP 404"):
        export(result_files, ExportTarget(type="dicomweb", url=f"{orthanc.url}/nope"), "RADBRIDGE")
    assert orthanc.get_json("/instances") == []
