"""Outages ridden out by a real `radbridge serve` (the inference service down, then the PACS down),
and routing rules checked against the models at start-up.

Inference down: the analysis waits with backoff for as long as the outage lasts, without using up
its attempts, and finishes when the service comes up. PACS down: the export retries, ends in
DEAD_LETTER (visible in `radbridge status`), and `radbridge retry` delivers it once the PACS is back.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pydicom
import pytest

from dicom_node.spool import uid_key
from inference_service.config import ServiceSection, ServiceSettings
from radbridge.embedded import EmbeddedInferenceService
from radbridge.synth import ct_series, write_series
from tests.e2e.test_pipeline import Serve, _config, _study_objects, _wait_for_outputs, study_status
from tests.peers import OrthancServer, free_port, storescu

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.usefixtures("require_dcmtk", "require_dicom3tools"),
]


def _cli(cfg: Path, *args: str) -> str:
    return subprocess.run(
        [sys.executable, "-m", "radbridge.cli", *args, "--config", str(cfg)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def _study(cfg: Path, study_uid: str) -> dict:
    return study_status(cfg, study_uid)[0]


def _until(predicate: Callable[[], bool], what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def _send_study(tmp_path: Path, port: int, seed: int) -> str:
    files = write_series(ct_series(n_slices=16, seed=seed), tmp_path / f"ct-{seed}")
    assert storescu(files, "127.0.0.1", port, "RADBRIDGE").returncode == 0
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def test_inference_outage_is_waited_out_without_using_attempts(
    tmp_path: Path, orthanc: OrthancServer
) -> None:
    port, inference_port = free_port(), free_port()
    cfg = _config(tmp_path, port, orthanc)
    text = cfg.read_text().replace("[worker]\n", "[worker]\nmax_attempts = 2\n")
    cfg.write_text(text + f'\n[inference]\naddress = "127.0.0.1:{inference_port}"\nconnect_retries = 0\n')
    serve = Serve(cfg, tmp_path / "serve.log")
    try:
        study = _send_study(tmp_path, port, seed=41)
        # More waits than max_attempts: an outage must not turn into DEAD_LETTER or FAILED.
        _until(
            lambda: sum(e["event"] == "analyze waiting" for e in _study(cfg, study)["history"]) >= 3,
            "three waits on the inference outage",
        )
        waiting = _study(cfg, study)
        assert waiting["status"] == "QUEUED"
        assert "InferenceUnavailable" in waiting["reasons"][0] and "will be retried" in waiting["reasons"][0]
        settings = ServiceSettings(inference_service=ServiceSection(port=inference_port))
        with EmbeddedInferenceService(settings):  # the service comes back
            objs = _wait_for_outputs(orthanc, study, {"SEG": 1, "SR": 3})
            _until(lambda: _study(cfg, study)["status"] == "DELIVERED", "DELIVERED")
        assert len(objs["SEG"]) == 1 and len(objs["SR"]) == 3
        (analysis,) = [j for j in study_status(cfg, study)[1] if j["kind"] == "analyze"]
        assert analysis["state"] == "SUCCEEDED" and analysis["attempts"] == 1  # the waits were given back
    finally:
        assert serve.stop() == 0


def test_pacs_outage_ends_in_dead_letter_and_retry_delivers_once(tmp_path: Path) -> None:
    orthanc = OrthancServer(tmp_path / "orthanc")  # ports chosen, not started yet: the PACS is down
    port = free_port()
    cfg = _config(tmp_path, port, orthanc)
    cfg.write_text(cfg.read_text() + "\n[export]\nmax_attempts = 2\nbackoff_s = 0.2\n")
    serve = Serve(cfg, tmp_path / "serve.log")
    try:
        study = _send_study(tmp_path, port, seed=42)
        _until(lambda: _study(cfg, study)["status"] == "DEAD_LETTER", "DEAD_LETTER")
        parked = _study(cfg, study)
        assert len(parked["reasons"]) == 4  # SEG and three SRs
        assert all("export of the" in r and "to 'orthanc'" in r for r in parked["reasons"])
        assert any(e["event"] == "export dead-letter" for e in parked["history"])
        http_port = int(re.search(r"\[http\]\nport = (\d+)", cfg.read_text()).group(1))
        metrics = httpx.get(f"http://127.0.0.1:{http_port}/metrics", timeout=10).text
        assert 'radbridge_exports_total{outcome="dead_letter",target="orthanc"} 4.0' in metrics
        assert 'radbridge_jobs{kind="export",state="DEAD_LETTER"} 4.0' in metrics
        orthanc.start()
        try:
            assert (
                _cli(cfg, "retry", "--study", uid_key(study)).strip()
                == "radbridge: 4 dead-letter job(s) queued again"
            )
            _until(lambda: _study(cfg, study)["status"] == "DELIVERED", "DELIVERED after retry")
            objs = _wait_for_outputs(orthanc, study, {"SEG": 1, "SR": 3})
            time.sleep(1.0)
            objs = _study_objects(orthanc, study)
            assert len(objs["SEG"]) == 1 and len(objs["SR"]) == 3
            assert _study(cfg, study)["history"][-1]["event"] == "export done"
        finally:
            orthanc.stop()
    finally:
        assert serve.stop() == 0


def test_rule_with_a_task_the_model_cannot_do_is_named_at_start_and_the_rest_runs(
    tmp_path: Path, orthanc: OrthancServer
) -> None:
    """The reference model cannot do VQA: start-up says so by name, segment + report still run."""
    port = free_port()
    cfg = _config(tmp_path, port, orthanc)
    cfg.write_text(
        cfg.read_text()
        + '\n[[routing.rules]]\nname = "ct-vqa"\ntasks = ["segment", "vqa", "report"]\n'
        + 'question = "Is there an effusion?"\nmatch = { modality = ["CT"] }\n'
    )
    serve = Serve(cfg, tmp_path / "serve.log")
    try:
        study = _send_study(tmp_path, port, seed=43)
        objs = _wait_for_outputs(orthanc, study, {"SEG": 1, "SR": 3})
        assert len(objs["SEG"]) == 1
        _until(lambda: _study(cfg, study)["status"] == "DELIVERED", "DELIVERED")
        skipped = [e for e in _study(cfg, study)["history"] if e["event"] == "tasks skipped"]
        assert len(skipped) == 1 and "cannot do vqa" in skipped[0]["detail"]
    finally:
        assert serve.stop() == 0
    warning = "radbridge: warning: routing rule 'ct-vqa': model 'reference' cannot do vqa"
    assert warning in (tmp_path / "serve.log").read_text()
