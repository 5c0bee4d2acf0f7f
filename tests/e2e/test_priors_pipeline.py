"""A routing rule fetches the patient's prior study from the PACS (prior fetching).

Orthanc holds the patient's prior (an older CT) and another patient's study;
the current CT is sent to the running `radbridge serve` with dcmtk storescu.
The rule ``pull_priors = 1, priors_from = "pacs"`` makes the node C-FIND the
patient at Orthanc and C-MOVE the prior to itself: the prior is indexed and
marked, the other patient's study never comes, the prior fetches nothing
further, and the current study's history says what happened, without patient
identifiers (nor in the node's log).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from dicom_node.index import Index, JobKind, JobState
from dicom_node.spool import Spool, uid_key
from radbridge.synth import SyntheticPatient, ct_series, write_series
from tests.e2e.test_pipeline import Serve, _config
from tests.peers import DICOMWEB_PLUGIN, ORTHANC_BIN, OrthancServer, free_port, storescu

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.usefixtures("require_dcmtk"),
]
PATIENT = SyntheticPatient(name="PRIORE2E^SENTINEL", patient_id="PRIORE2E-ID-7171", accession="PRIORE2EACC")
OTHER = SyntheticPatient(name="OTHERE2E^SENTINEL", patient_id="OTHERE2E-ID-8181", accession="OTHERE2EACC")
WAIT_S = 180


def _study(tmp: Path, patient: SyntheticPatient, seed: int, date: str) -> tuple[str, list[Path]]:
    series = ct_series(n_slices=8, patient=patient, seed=seed)
    for ds in series:
        ds.StudyDate = date
    return str(series[0].StudyInstanceUID), write_series(series, tmp / f"study-{seed}")


def _wait(index: Index, what: str, ready: Callable[[Index], bool]) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if ready(index):
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_rule_pulls_the_patients_prior_from_the_pacs(tmp_path: Path) -> None:
    if not os.access(ORTHANC_BIN, os.X_OK) or not Path(DICOMWEB_PLUGIN).exists():
        pytest.skip(f"Orthanc with its DICOMweb plugin not installed ({ORTHANC_BIN}, {DICOMWEB_PLUGIN})")
    prior_uid, prior_files = _study(tmp_path, PATIENT, 51, "20230615")
    current_uid, current_files = _study(tmp_path, PATIENT, 52, "20260101")
    other_uid, other_files = _study(tmp_path, OTHER, 53, "20250101")
    scp_port = free_port()
    with OrthancServer(tmp_path / "orthanc", {"radbridge": ["RADBRIDGE", "127.0.0.1", scp_port]}) as orthanc:
        for files in (prior_files, other_files):  # the current study is not in the PACS yet
            sent = storescu(files, "127.0.0.1", orthanc.dicom_port, orthanc.aet)
            assert sent.returncode == 0 and not sent.errors, sent.stderr
        extra = f"""
[pull.sources.pacs]
host = "127.0.0.1"
port = {orthanc.dicom_port}
ae_title = "{orthanc.aet}"

[[routing.rules]]
name = "ct"
match.modality = ["CT"]
tasks = ["report"]
pull_priors = 1
priors_from = "pacs"
"""
        cfg = _config(tmp_path, scp_port, orthanc, quiet_window_s=1.0, extra=extra)
        serve = Serve(cfg, tmp_path / "serve.log")
        index = Index(Spool(tmp_path / "spool").index_path)
        try:
            sent = storescu(current_files, "127.0.0.1", scp_port, "RADBRIDGE")
            assert sent.returncode == 0 and not sent.errors, sent.stderr
            _wait(
                index,
                "the prior fetch",
                lambda i: "prior fetch" in [e["event"] for e in i.events(current_uid)],
            )
            _wait(
                index,
                "the prior's routing",
                lambda i: any(j.state is JobState.SUCCEEDED for j in i.jobs(prior_uid, JobKind.ROUTE)),
            )
            history = {e["event"]: e["detail"] for e in index.events(current_uid)}
            prior_history = [e["event"] for e in index.events(prior_uid)]
            prior_rows = index.study_instances(prior_uid)
            other_rows = index.study_instances(other_uid)
            is_prior = index.is_prior(prior_uid), index.is_prior(current_uid)
            prior_jobs = index.jobs(prior_uid, JobKind.PRIORS)
            (fetch,) = index.jobs(current_uid, JobKind.PRIORS)
        finally:
            index.close()
            serve.stop()
    assert fetch.state is JobState.SUCCEEDED, fetch
    assert len(prior_rows) == len(prior_files)  # the prior is in the node, indexed
    assert other_rows == []  # another patient's study is never fetched
    assert is_prior == (True, False)
    assert prior_jobs == [] and "prior fetch skipped" in prior_history  # no cascade
    assert "pulled as prior" in prior_history
    assert history["prior fetch"].startswith(f"1 found, 1 pulled (study key {uid_key(prior_uid)})"), history
    log = (tmp_path / "serve.log").read_text()
    for text in (PATIENT.patient_id, PATIENT.name, OTHER.patient_id, "20230615"):
        assert text not in log, text
        assert all(text not in d for d in history.values()), text
