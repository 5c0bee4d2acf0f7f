"""Prior fetching against a real Orthanc, in process: C-FIND by PatientID, C-GET of the priors.

Orthanc holds two CT studies of one patient (an older and a newer prior), the
current study, and another patient's study. The current study is pulled into a
local spool first (as if it had arrived); the prior fetch must then bring in
only the newest prior, mark it, and leave the other patient's study alone.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pydicom
import pytest

from dicom_node.config import NodeSettings, PullSection, PullSource, RoutingRule, RoutingSection, RuleMatch
from dicom_node.index import Index, JobKind, JobState
from dicom_node.priors import fetch_priors
from dicom_node.retrieve import pull_study
from dicom_node.spool import Spool, uid_key
from dicom_node.status import describe
from dicom_node.worker import StepContext, run_job, run_route
from radbridge.synth import SyntheticPatient, ct_series, write_series
from tests.peers import DICOMWEB_PLUGIN, ORTHANC_BIN, OrthancServer, free_port, storescu

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("require_dcmtk")]
NODE_AE = "RADBRIDGE"
PATIENT = SyntheticPatient(name="PRIOR^SENTINEL", patient_id="PRIOR-ID-5150", accession="PRIORACC1")
OTHER = SyntheticPatient(name="OTHER^SENTINEL", patient_id="OTHER-ID-6160", accession="OTHERACC1")


def _study(tmp: Path, patient: SyntheticPatient, seed: int, date: str) -> tuple[str, list[Path]]:
    series = ct_series(n_slices=6, patient=patient, seed=seed)
    for ds in series:
        ds.StudyDate = date
    files = write_series(series, tmp / f"study-{seed}")
    return str(series[0].StudyInstanceUID), files


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[tuple[OrthancServer, dict[str, str]]]:
    if not os.access(ORTHANC_BIN, os.X_OK) or not Path(DICOMWEB_PLUGIN).exists():
        pytest.skip(f"Orthanc with its DICOMweb plugin not installed ({ORTHANC_BIN}, {DICOMWEB_PLUGIN})")
    studies = {
        "old": _study(tmp_path, PATIENT, 41, "20180301"),
        "prior": _study(tmp_path, PATIENT, 42, "20220301"),
        "current": _study(tmp_path, PATIENT, 43, "20260101"),
        "other": _study(tmp_path, OTHER, 44, "20250101"),
    }
    # Orthanc answers C-FIND and C-GET only for AE titles it knows; the address is not used here.
    with OrthancServer(tmp_path / "orthanc", {"radbridge": [NODE_AE, "127.0.0.1", free_port()]}) as orthanc:
        for _, files in studies.values():
            sent = storescu(files, "127.0.0.1", orthanc.dicom_port, orthanc.aet)
            assert sent.returncode == 0 and not sent.errors, sent.stderr
        yield orthanc, {k: uid for k, (uid, _) in studies.items()}


def _settings(tmp_path: Path, port: int, count: int = 1) -> NodeSettings:
    source = PullSource(host="127.0.0.1", port=port, ae_title="ORTHANC", retrieve="get", timeout_s=30)
    rule = RoutingRule(name="ct", match=RuleMatch(modality=["CT"]), pull_priors=count, priors_from="pacs")
    return NodeSettings(pull=PullSection(sources={"pacs": source}), routing=RoutingSection(rules=[rule]))


def _local(tmp_path: Path) -> tuple[Spool, Index]:
    spool = Spool(tmp_path / "spool")
    return spool, Index(spool.index_path)


def _ctx(settings: NodeSettings, spool: Spool, index: Index) -> StepContext:
    def no_inference() -> None:
        raise AssertionError("prior fetching must not call the inference service")

    return StepContext(settings=settings, spool=spool, index=index, client_factory=no_inference)  # type: ignore[arg-type]


def test_the_newest_prior_of_the_same_patient_is_pulled_and_marked(
    tmp_path: Path, pacs: tuple[OrthancServer, dict[str, str]]
) -> None:
    orthanc, uids = pacs
    settings = _settings(tmp_path, orthanc.dicom_port)
    spool, index = _local(tmp_path)
    try:
        source = settings.pull.sources["pacs"]
        pull_study(source, spool, index, NODE_AE, study_uid=uids["current"])  # the study "arrived"
        ctx = _ctx(settings, spool, index)
        (route,) = index.jobs(uids["current"], JobKind.ROUTE)
        run_route(route, ctx)
        (job,) = index.jobs(uids["current"], JobKind.PRIORS)
        assert job.payload == {"rule": "ct", "source": "pacs"}
        claimed = index.claim_job(kinds=(JobKind.PRIORS,))
        assert claimed is not None and run_job(claimed, ctx) is JobState.SUCCEEDED

        assert len(index.study_instances(uids["prior"])) == 6  # the newest prior, indexed
        assert index.study_instances(uids["old"]) == []  # pull_priors = 1: only the newest
        assert index.study_instances(uids["other"]) == []  # another patient's study: never
        assert index.is_prior(uids["prior"]) and not index.is_prior(uids["current"])
        history = {e["event"]: e["detail"] for e in index.events(uids["current"])}
        assert history["prior fetch"].startswith(f"2 found, 1 pulled (study key {uid_key(uids['prior'])})")
        for text in (PATIENT.patient_id, PATIENT.name, "2022", "2018"):
            assert all(text not in e["detail"] for e in index.events(uids["current"])), text

        # The prior is routed like any study, but fetches no priors itself (no cascade).
        (prior_route,) = index.jobs(uids["prior"], JobKind.ROUTE)
        run_route(prior_route, ctx)
        assert index.jobs(uids["prior"], JobKind.PRIORS) == []
        assert len(index.jobs(uids["prior"], JobKind.ANALYZE)) == 1
        assert "prior fetch skipped" in [e["event"] for e in index.events(uids["prior"])]

        # Run again (a re-routed study): what is already here is not pulled again.
        detail = fetch_priors(settings, spool, index, uids["current"], settings.routing.rules[0])
        assert detail.startswith("2 found, 0 pulled, 1 already here"), detail
    finally:
        index.close()


def test_a_patient_without_other_studies_has_no_priors(
    tmp_path: Path, pacs: tuple[OrthancServer, dict[str, str]]
) -> None:
    orthanc, uids = pacs
    settings = _settings(tmp_path, orthanc.dicom_port, count=3)
    spool, index = _local(tmp_path)
    try:
        pull_study(settings.pull.sources["pacs"], spool, index, NODE_AE, study_uid=uids["other"])
        detail = fetch_priors(settings, spool, index, uids["other"], settings.routing.rules[0])
        assert detail.startswith("0 found, 0 pulled;"), detail
        assert {s["study_instance_uid"] for s in index.studies()} == {uids["other"]}
    finally:
        index.close()


def test_an_unreachable_source_is_retried_and_visible(tmp_path: Path, small_ct_files: list[Path]) -> None:
    settings = _settings(tmp_path, free_port())  # nothing listens there
    spool, index = _local(tmp_path)
    try:
        ds = pydicom.dcmread(small_ct_files[0])
        study_uid = str(ds.StudyInstanceUID)
        _spool_one(spool, index, small_ct_files[0])
        index.add_job(JobKind.PRIORS, f"{study_uid}|ct", study_uid, {"rule": "ct", "source": "pacs"})
        job = index.claim_job(kinds=(JobKind.PRIORS,))
        assert job is not None
        assert run_job(job, _ctx(settings, spool, index)) is JobState.PENDING
        (job,) = index.jobs(study_uid, JobKind.PRIORS)
        assert (
            job.last_error.startswith("PriorFetchError: ORTHANC@127.0.0.1:")
            and "unreachable" in job.last_error
        )
        assert [e for e in index.events(study_uid) if e["event"] == "priors retry"], index.events(study_uid)
        # The last attempt parks it, with its reason, for `radbridge status`.
        settings = replace(settings, export=replace(settings.export, max_attempts=1))
        index.add_job(JobKind.PRIORS, f"{study_uid}|ct", study_uid, {"rule": "ct", "source": "pacs"})
        job = index.claim_job(now=job.next_try_time + 1, kinds=(JobKind.PRIORS,))
        assert job is not None
        assert run_job(job, _ctx(settings, spool, index)) is JobState.DEAD_LETTER
        index.complete_study(study_uid, 0.0)
        shown = describe(index, index.study(study_uid) or {})
        assert any(
            r.startswith("prior fetch from 'pacs' for rule 'ct': PriorFetchError") for r in shown["reasons"]
        )
    finally:
        index.close()


def _spool_one(spool: Spool, index: Index, path: Path) -> None:
    """One instance into the spool and index, as the node's C-STORE handler records it."""
    from dicom_node.attributes import searchable_attributes
    from dicom_node.index import ReceivedInstance
    from dicom_node.spool import InstanceRef

    ds = pydicom.dcmread(path)
    target = spool.root / "one.dcm"
    target.write_bytes(path.read_bytes())
    ref = InstanceRef(
        sop_instance_uid=str(ds.SOPInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        study_instance_uid=str(ds.StudyInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
        path=target,
        size=target.stat().st_size,
    )
    index.add_instances([ReceivedInstance(ref, "CT", "TEST", searchable_attributes(ds))])


def test_a_dicomweb_source_finds_priors_by_qido_and_reads_them_by_wado(
    tmp_path: Path, pacs: tuple[OrthancServer, dict[str, str]]
) -> None:
    orthanc, uids = pacs
    settings = _settings(tmp_path, orthanc.dicom_port, count=2)
    source = PullSource(type="dicomweb", url=orthanc.dicomweb_url, timeout_s=30)
    settings = replace(settings, pull=PullSection(sources={"pacs": source}))
    spool, index = _local(tmp_path)
    try:
        pull_study(source, spool, index, NODE_AE, study_uid=uids["current"])
        detail = fetch_priors(settings, spool, index, uids["current"], settings.routing.rules[0])
        assert detail.startswith("2 found, 2 pulled"), detail
        assert len(index.study_instances(uids["prior"])) == len(index.study_instances(uids["old"])) == 6
        assert index.study_instances(uids["other"]) == []
        assert index.is_prior(uids["old"]) and index.is_prior(uids["prior"])
    finally:
        index.close()
