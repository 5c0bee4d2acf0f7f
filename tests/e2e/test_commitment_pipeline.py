"""The whole loop with Storage Commitment on: dcmtk storescu -> `radbridge serve` -> Orthanc, which
commits the node's SEG and SRs by an N-EVENT-REPORT to the node's SCP; `radbridge status` says so.
"""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest

from radbridge.synth import ct_series, write_series
from tests.e2e.test_pipeline import Serve, _config, _wait_for_outputs, study_status
from tests.peers import OrthancServer, assert_valid_dicom_object, free_port, storescu

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.usefixtures("require_dcmtk", "require_dicom3tools"),
]


def test_results_are_delivered_only_once_orthanc_commits_them(tmp_path: Path) -> None:
    port = free_port()
    node = {"AET": "RADBRIDGE", "Host": "127.0.0.1", "Port": port, "AllowStorageCommitment": True}
    with OrthancServer(tmp_path / "orthanc", modalities={"radbridge": node}) as orthanc:
        cfg = _config(tmp_path, port, orthanc, extra="storage_commitment = true\ncommitment_timeout_s = 60\n")
        serve = Serve(cfg, tmp_path / "serve.log")
        try:
            files = write_series(ct_series(n_slices=16, seed=61), tmp_path / "ct")
            sent = storescu(files, "127.0.0.1", port, "RADBRIDGE")
            assert sent.returncode == 0 and not sent.errors, sent.stderr
            study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
            objs = _wait_for_outputs(orthanc, study_uid, {"SEG": 1, "SR": 3})
            deadline = time.monotonic() + 120
            while (study := study_status(cfg, study_uid)[0])["status"] != "DELIVERED":
                assert study["status"] in ("COMPLETE", "QUEUED", "ANALYSING", "EXPORTING"), study
                assert time.monotonic() < deadline, f"not DELIVERED in time: {study}"
                time.sleep(0.5)
            study, jobs = study_status(cfg, study_uid)
            assert [d["delivery"] for d in study["deliveries"]] == ["committed"] * 4
            assert [j["delivery"] for j in jobs if j["kind"] == "export"] == ["committed"] * 4
            events = [e["event"] for e in study["history"]]
            assert events.count("export committed") == 4 and events.count("export done") == 4
            for event in (e for e in study["history"] if e["event"] == "export committed"):
                assert event["detail"] == "ORTHANC: 1 instance(s) committed"
            first_sr = tmp_path / "sr.dcm"
            first_sr.write_bytes(orthanc.instance_file(objs["SR"][0]["id"]))
            assert_valid_dicom_object(first_sr)  # what was committed is the object the node wrote
        finally:
            assert serve.stop() == 0
