"""The study state machine (dicom_node.status) and poison jobs (Index.resume_interrupted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from dicom_node.config import NodeSettings, RoutingRule, RoutingSection, RuleMatch, SpoolSection
from dicom_node.index import Index, Job, JobKind, JobState, StudyState
from dicom_node.spool import Spool, uid_key
from dicom_node.status import StudyStatus, derive, describe
from dicom_node.worker import StepContext, run_job
from tests.dicom_fixtures import index_series

STUDY = {"study_instance_uid": "1.2.3", "state": StudyState.COMPLETE, "reason": ""}


def job(kind: JobKind, state: JobState, error: str = "", series: str = "1.2.3.4", attempts: int = 1) -> Job:
    payload = {"series_instance_uid": series, "rule": "ct"} if kind is JobKind.ANALYZE else {}
    if kind is JobKind.EXPORT:
        payload = {"path": "/spool/outputs/x/seg-abc.dcm", "target": "pacs"}
    return Job(1, kind, "k", "1.2.3", payload, state, attempts, 0.0, error)


S, F, D, P, R = JobState.SUCCEEDED, JobState.FAILED, JobState.DEAD_LETTER, JobState.PENDING, JobState.RUNNING
ROUTE, ANALYZE, EXPORT = JobKind.ROUTE, JobKind.ANALYZE, JobKind.EXPORT


@pytest.mark.parametrize(
    ("jobs", "status"),
    [
        ([job(ROUTE, P)], StudyStatus.COMPLETE),
        ([job(ROUTE, S), job(ANALYZE, P)], StudyStatus.QUEUED),
        ([job(ROUTE, S), job(ANALYZE, R), job(ANALYZE, P)], StudyStatus.ANALYSING),
        ([job(ROUTE, S), job(ANALYZE, S), job(EXPORT, R)], StudyStatus.EXPORTING),
        ([job(ROUTE, S), job(ANALYZE, S), job(EXPORT, S)], StudyStatus.DELIVERED),
        ([job(ROUTE, S), job(ANALYZE, S), job(ANALYZE, F, "VolumeError: x"), job(EXPORT, S)], StudyStatus.PARTIALLY_FAILED),
        ([job(ROUTE, S), job(ANALYZE, F, "VolumeError: x")], StudyStatus.FAILED),
        ([job(ROUTE, F, "boom")], StudyStatus.FAILED),
        ([job(ROUTE, S), job(ANALYZE, S), job(EXPORT, D, "refused")], StudyStatus.DEAD_LETTER),
        ([job(ROUTE, S), job(ANALYZE, S), job(EXPORT, D), job(EXPORT, F, "gone")], StudyStatus.PARTIALLY_FAILED),
        # a failed prior fetch is shown but does not fail this study's delivered results
        ([job(ROUTE, S), job(ANALYZE, S), job(EXPORT, S), job(JobKind.PRIORS, D, "PriorFetchError: x")], StudyStatus.DELIVERED),
        ([job(ROUTE, S), job(ANALYZE, S), job(EXPORT, D, "refused"), job(JobKind.PRIORS, D, "x")], StudyStatus.DEAD_LETTER),
    ],
)  # fmt: skip
def test_status_follows_the_jobs(jobs: list[Job], status: StudyStatus) -> None:
    got, reasons = derive(STUDY, jobs, {"1.2.3.4": "series 3 (CT)"})
    assert got is status
    bad = [j for j in jobs if j.state in (F, D)]
    assert len(reasons) == len(bad)
    if any(j.kind is ANALYZE and j.state is F for j in jobs):
        assert "analysis of series 3 (CT) with rule 'ct': VolumeError: x" in reasons


def test_receiving_unrouted_and_retrying_say_why() -> None:
    assert derive({**STUDY, "state": StudyState.RECEIVING}, []) == (StudyStatus.RECEIVING, [])
    unrouted = {**STUDY, "state": StudyState.UNROUTED, "reason": "no rule matched (modalities MR)"}
    assert derive(unrouted, [job(ROUTE, S)]) == (StudyStatus.UNROUTED, ["no rule matched (modalities MR)"])
    status, reasons = derive(
        STUDY, [job(ROUTE, S), job(ANALYZE, P, "InferenceUnavailable: down", attempts=2)]
    )
    assert status is StudyStatus.QUEUED
    key = uid_key("1.2.3.4")  # a series without indexed attributes is named by its key
    assert reasons == [
        f"analysis of series {key} with rule 'ct' will be retried (attempt 2): InferenceUnavailable: down"
    ]


def test_poison_job_fails_with_its_reason_after_max_attempts(tmp_path: Path) -> None:
    path = tmp_path / "i.db"
    index = Index(path)
    index.add_job(JobKind.ANALYZE, "s|ct", "1.2.3", {"series_instance_uid": "1.2.3.4", "rule": "ct"})
    limits = {JobKind.ANALYZE: 3}
    for stop in range(1, 4):
        claimed = index.claim_job()
        assert claimed is not None and claimed.attempts == stop
        index.close()
        index = Index(path)  # the process died with the job RUNNING
        resumed, failed = index.resume_interrupted(limits)
        assert (resumed, failed) == ((1, 0) if stop < 3 else (0, 1))
    assert index.claim_job() is None  # never run again
    (poisoned,) = index.jobs()
    assert poisoned.state is JobState.FAILED and poisoned.interruptions == 3
    assert (
        poisoned.last_error
        == "the node stopped 3 times while analysing this series (attempt 3 of 3); not run again"
    )
    assert index.events("1.2.3")[-1]["event"] == "analyze failed"
    status, reasons = derive(STUDY, index.jobs())
    assert status is StudyStatus.FAILED and "the node stopped 3 times" in reasons[0]


def test_rearmed_job_forgets_its_interruptions(tmp_path: Path) -> None:
    index = Index(tmp_path / "i.db")
    index.add_job(JobKind.ROUTE, "k", "1.2.3", {})
    index.claim_job()
    index.resume_interrupted({JobKind.ROUTE: 1})
    assert index.jobs()[0].state is JobState.FAILED
    index.add_job(JobKind.ROUTE, "k", "1.2.3", {})  # a late instance re-routes the study
    (rearmed,) = index.jobs()
    assert rearmed.state is JobState.PENDING and rearmed.interruptions == 0 and rearmed.attempts == 0


def test_a_series_that_cannot_be_analysed_is_failed_with_its_reason_in_status(
    tmp_path: Path, small_ct_files: list[Path]
) -> None:
    """An unusable series (before: the missing-slice case, now resampled); status once said COMPLETE
    with an empty reason."""
    settings = NodeSettings(
        spool=SpoolSection(tmp_path / "spool"),
        routing=RoutingSection(rules=[RoutingRule(name="ct", match=RuleMatch(modality=["CT"]))]),
    )
    spool = Spool(settings.spool.directory)
    ctx = StepContext(
        settings, spool, Index(spool.index_path), client_factory=lambda: pytest.fail("no inference")
    )
    # Slice 11 sent again at slice 10's position: two images, one position, other pixels.
    clash = pydicom.dcmread(small_ct_files[11])
    clash.ImagePositionPatient = pydicom.dcmread(small_ct_files[10]).ImagePositionPatient
    clash.SOPInstanceUID = pydicom.uid.generate_uid()
    clash.save_as(tmp_path / "clash.dcm")
    study = index_series(ctx.index, [*small_ct_files, tmp_path / "clash.dcm"], attributes=True)
    ctx.index.complete_study(study, 1.0, now=10.0)
    assert run_job(ctx.index.claim_job(), ctx) is JobState.SUCCEEDED  # route
    assert run_job(ctx.index.claim_job(), ctx) is JobState.FAILED  # analyze: not retryable
    doc = describe(ctx.index, ctx.index.study(study), history=True)
    assert doc["status"] == "FAILED"
    assert doc["reasons"] == [
        "analysis of series 2 (CT) with rule 'ct': VolumeError: Two or more instances share one slice"
        " position (-25.00 mm along the normal) with different pixels."
    ]
    assert [e["event"] for e in doc["history"]] == [
        "received",
        "complete",
        "routed",
        "analyze started",
        "analyze failed",
    ]
    assert doc["jobs"] == {"pending": 0, "running": 0, "succeeded": 1, "failed": 1, "dead_letter": 0}
    # The CLI shows the same, found by the study key, without patient data.
    config = tmp_path / "node.toml"
    config.write_text(f'[spool]\ndirectory = "{settings.spool.directory}"\n')
    out = subprocess.run(
        [sys.executable, "-m", "radbridge.cli", "status", "--config", str(config), "--study", uid_key(study)[:8]],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    shown = json.loads(out)
    assert shown["studies"][0]["status"] == "FAILED" and shown["studies"][0]["reasons"] == doc["reasons"]
    assert [j["what"] for j in shown["jobs"]] == ["routing", "analysis of series 2 (CT) with rule 'ct'"]
    assert "PatientName" not in out and "Synthetic" not in out


def test_a_suspect_runs_alone_so_a_crash_is_charged_to_the_job_that_caused_it(tmp_path: Path) -> None:
    path = tmp_path / "i.db"
    index = Index(path)
    lane = (JobKind.ROUTE, JobKind.ANALYZE)
    for name in ("a", "b", "c"):
        index.add_job(JobKind.ANALYZE, name, "1.2.3", {"series_instance_uid": name, "rule": "ct"})
    index.add_job(JobKind.EXPORT, "e", "1.2.3", {"path": "x", "target": "pacs"})
    a, b = index.claim_job(kinds=lane), index.claim_job(kinds=lane)
    assert (a.dedupe_key, b.dedupe_key) == ("a", "b")
    index.close()
    index = Index(path)  # both were running when the node died: both are suspects now
    assert index.resume_interrupted({JobKind.ANALYZE: 5}) == (2, 0)
    first = index.claim_job(kinds=lane)
    assert first.dedupe_key == "a" and first.interruptions == 1
    assert index.claim_job(kinds=lane) is None  # nothing else in the lane while a suspect runs
    assert index.claim_job(kinds=(JobKind.EXPORT,)).dedupe_key == "e"  # exports are not held up
    index.finish_job(first.id, JobState.SUCCEEDED)
    second = index.claim_job(kinds=lane)
    assert second.dedupe_key == "b"
    index.finish_job(second.id, JobState.SUCCEEDED)
    plain = index.claim_job(kinds=lane)
    assert plain.dedupe_key == "c" and plain.interruptions == 0
    index.add_job(JobKind.ANALYZE, "d", "1.2.3", {"series_instance_uid": "d", "rule": "ct"})
    assert index.claim_job(kinds=lane).dedupe_key == "d"  # ordinary jobs run side by side


def test_a_series_over_the_memory_budget_is_refused_with_its_reason(
    tmp_path: Path, small_ct_files: list[Path]
) -> None:
    """Refused from its headers before any pixel is decoded, never an out-of-memory kill."""
    from dicom_node.config import WorkerSection

    settings = NodeSettings(
        spool=SpoolSection(tmp_path / "spool"),
        routing=RoutingSection(rules=[RoutingRule(name="ct", match=RuleMatch(modality=["CT"]))]),
        worker=WorkerSection(memory_budget_bytes=3 * 1024 * 1024),  # 1 MiB of voxels at most (x3)
    )
    spool = Spool(settings.spool.directory)
    ctx = StepContext(
        settings, spool, Index(spool.index_path), client_factory=lambda: pytest.fail("no inference")
    )
    study = index_series(ctx.index, small_ct_files, attributes=True)
    ctx.index.complete_study(study, 1.0, now=10.0)
    assert run_job(ctx.index.claim_job(), ctx) is JobState.SUCCEEDED  # route
    assert run_job(ctx.index.claim_job(), ctx) is JobState.FAILED  # not retried: it will not shrink
    (reason,) = describe(ctx.index, ctx.index.study(study))["reasons"]
    assert reason == (
        "analysis of series 2 (CT) with rule 'ct': VolumeTooLarge: The series' volume needs 13 MB "
        "(24 x 512 x 512 int16), over the 1 MB its analysis may use under worker.memory_budget_bytes."
    )
