"""DICOMweb end to end: dicomweb-client STOW-RS -> `radbridge serve` -> STOW-RS export -> Orthanc.

No DIMSE anywhere: the study goes in over STOW-RS, the results come back to a
real Orthanc (DICOMweb plugin) over STOW-RS, into the source study, each one
valid by dciodvfy; the node's own read-only DICOMweb shows them too.
"""

from __future__ import annotations

import time
from io import BytesIO
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient

from radbridge.synth import ct_series
from tests.e2e.test_pipeline import WAIT_S, Serve, _status
from tests.peers import OrthancServer, assert_valid_dicom_object, free_port

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.usefixtures("require_dcmtk", "require_dicom3tools"),
]


def _config(tmp_path: Path, http_port: int, orthanc: OrthancServer) -> Path:
    cfg = tmp_path / "radbridge.toml"
    cfg.write_text(
        f"""
[scp]
port = {free_port()}

[http]
port = {http_port}
stow_completes_study = true   # one STOW request is the whole study: no quiet window

[spool]
directory = "{tmp_path / "spool"}"

[worker]
poll_interval_s = 0.2

[export.targets.orthanc]
type = "dicomweb"
url = "{orthanc.dicomweb_url}"
"""
    )
    return cfg


def test_stow_in_stow_out_into_the_same_study(tmp_path: Path, orthanc: OrthancServer) -> None:
    http_port = free_port()
    cfg = _config(tmp_path, http_port, orthanc)
    serve = Serve(cfg, tmp_path / "serve.log")
    try:
        ct = ct_series(n_slices=24, seed=5)
        study_uid = str(ct[0].StudyInstanceUID)
        node = DICOMwebClient(url=f"http://127.0.0.1:{http_port}/dicom-web")
        response = node.store_instances(ct)
        assert len(response.ReferencedSOPSequence) == len(ct)

        pacs = DICOMwebClient(url=orthanc.dicomweb_url)
        deadline = time.monotonic() + WAIT_S
        produced: list[dict] = []
        while time.monotonic() < deadline:
            series = pacs.search_for_series(study_uid)
            produced = [s for s in series if s["00080060"]["Value"][0] in ("SEG", "SR")]
            jobs = _status(cfg)["jobs"]
            exports = [j for j in jobs if j["kind"] == "export"]
            if exports and all(j["state"] == "SUCCEEDED" for j in exports) and len(produced) == len(exports):
                break
            time.sleep(1.0)
        else:
            raise AssertionError(f"results did not reach Orthanc: {_status(cfg)}")
        # The node's own read-only DICOMweb holds the study with its results (what `radbridge viewer` shows).
        own = {s["0020000E"]["Value"][0]: s["00080060"]["Value"][0] for s in node.search_for_series(study_uid)}
        assert own == {ct[0].SeriesInstanceUID: "CT"} | {
            s["0020000E"]["Value"][0]: s["00080060"]["Value"][0] for s in produced
        }
    finally:
        serve.stop()

    modalities = sorted(s["00080060"]["Value"][0] for s in produced)
    assert modalities.count("SEG") == 1 and modalities.count("SR") >= 2
    for series in produced:
        series_uid = series["0020000E"]["Value"][0]
        (instance,) = pacs.retrieve_series(study_uid, series_uid)
        path = tmp_path / f"{series_uid}.dcm"
        buffer = BytesIO()
        instance.save_as(buffer, enforce_file_format=True)
        path.write_bytes(buffer.getvalue())
        assert_valid_dicom_object(path)
        assert instance.StudyInstanceUID == study_uid
        ds = pydicom.dcmread(path)
        if ds.Modality == "SEG":
            seg = hd.seg.Segmentation.from_dataset(ds)
            assert len(seg.segment_numbers) == 3
            assert {ref.SeriesInstanceUID for ref in ds.ReferencedSeriesSequence} == {ct[0].SeriesInstanceUID}
        else:
            hd.sr.srread(path)

    log = (tmp_path / "serve.log").read_text()
    for secret in ("SYNTHETIC^CHEST^PHANTOM", "RB-SYN-0001", "RBACC0001"):
        assert secret not in log
