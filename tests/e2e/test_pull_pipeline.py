"""Pull, analyse, send back: a study that is only in the PACS gets results.

The CT is stored in Orthanc; `radbridge pull` (a second process, as an operator
runs it) has Orthanc C-MOVE it to the running `radbridge serve`; the node
analyses it at once (no quiet window) and exports SEG + SRs back into the same
study in Orthanc, each valid by dciodvfy.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from radbridge.synth import ct_series, write_series
from tests.e2e.test_pipeline import Serve, _config, _wait_for_outputs, study_status
from tests.peers import (
    DICOMWEB_PLUGIN,
    ORTHANC_BIN,
    OrthancServer,
    assert_valid_dicom_object,
    free_port,
    storescu,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.usefixtures("require_dcmtk", "require_dicom3tools"),
]


def test_a_pulled_study_is_analysed_and_its_results_go_back(tmp_path: Path) -> None:
    if not os.access(ORTHANC_BIN, os.X_OK) or not Path(DICOMWEB_PLUGIN).exists():
        pytest.skip(f"Orthanc with its DICOMweb plugin not installed ({ORTHANC_BIN}, {DICOMWEB_PLUGIN})")
    scp_port = free_port()
    with OrthancServer(tmp_path / "orthanc", {"radbridge": ["RADBRIDGE", "127.0.0.1", scp_port]}) as orthanc:
        files = write_series(ct_series(n_slices=24, seed=21), tmp_path / "ct")
        sent = storescu(files, "127.0.0.1", orthanc.dicom_port, orthanc.aet)
        assert sent.returncode == 0 and not sent.errors, sent.stderr
        study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        source = f'[pull.sources.pacs]\nhost = "127.0.0.1"\nport = {orthanc.dicom_port}\nae_title = "{orthanc.aet}"\n'
        # A long quiet window: only the pull's own completion can start the analysis in time.
        cfg = _config(tmp_path, scp_port, orthanc, quiet_window_s=3600, extra=source)
        serve = Serve(cfg, tmp_path / "serve.log")
        try:
            pull = subprocess.run(
                [sys.executable, "-m", "radbridge.cli", "pull", "--config", str(cfg), "--study", study_uid],
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert pull.returncode == 0, pull.stdout + pull.stderr
            assert f"{len(files)}/{len(files)} instance(s) received" in pull.stderr
            assert "analysis queued" in pull.stdout
            objs = _wait_for_outputs(orthanc, study_uid, {"SEG": 1, "SR": 2})
            study, jobs = study_status(cfg, study_uid)
        finally:
            serve.stop()
        assert "pulled" in [e["event"] for e in study["history"]], study
        assert any(j["kind"] == "analyze" and j["state"] == "SUCCEEDED" for j in jobs), jobs
        for modality in ("SEG", "SR"):
            for obj in objs[modality]:
                path = tmp_path / f"{modality}-{obj['sop']}.dcm"
                path.write_bytes(orthanc.instance_file(obj["id"]))
                assert_valid_dicom_object(path)
                assert pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID == study_uid
