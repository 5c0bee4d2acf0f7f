"""kill -9 of `radbridge serve` mid-analysis: nothing acknowledged is lost, results arrive once."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pydicom
import pytest

from radbridge.synth import ct_series, write_series
from tests.e2e.test_pipeline import Serve, _config, _status, _study_objects, _wait_for_outputs
from tests.peers import OrthancServer, free_port, storescu

pytestmark = [
    pytest.mark.chaos,
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.usefixtures("require_dcmtk", "require_dicom3tools"),
]


def _jobs(cfg: Path) -> list[dict]:
    return _status(cfg)["jobs"]


def test_sigkill_during_analysis_then_restart(tmp_path: Path, orthanc: OrthancServer) -> None:
    port = free_port()
    cfg = _config(tmp_path, port, orthanc)
    files = write_series(ct_series(n_slices=100, seed=21), tmp_path / "ct")
    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)

    serve = Serve(cfg, tmp_path / "serve1.log")
    result = storescu(files, "127.0.0.1", port, "RADBRIDGE")
    assert result.returncode == 0 and not result.errors
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if any(j["kind"] == "analyze" and j["state"] == "RUNNING" for j in _jobs(cfg)):
            break
        time.sleep(0.1)
    else:
        pytest.fail("the analysis never started")
    serve.proc.send_signal(signal.SIGKILL)
    serve.proc.wait(30)
    serve.stop()
    assert not _study_objects(orthanc, study).get("SEG")  # killed before any export

    restarted = Serve(cfg, tmp_path / "serve2.log")
    try:
        objs = _wait_for_outputs(orthanc, study, {"SEG": 1, "SR": 3})
        time.sleep(2)  # any duplicate export would have arrived by now
        objs = _study_objects(orthanc, study)
        assert len(objs["SEG"]) == 1 and len(objs["SR"]) == 3
        analyze = [j for j in _jobs(cfg) if j["kind"] == "analyze"]
        assert len(analyze) == 1 and analyze[0]["state"] == "SUCCEEDED" and analyze[0]["attempts"] == 2
        assert _status(cfg)["instances"] == len(files)
    finally:
        assert restarted.stop() == 0
