from __future__ import annotations

from pathlib import Path

from dicom_node.completion import complete_quiet_studies
from dicom_node.index import Index, JobKind, JobState, StudyState
from dicom_node.spool import InstanceRef


def _ref(tmp_path: Path, sop: str, study: str = "1.2.3", series: str = "1.2.3.1") -> InstanceRef:
    return InstanceRef(
        sop, "1.2.840.10008.5.1.4.1.1.2", study, series, "1.2.840.10008.1.2.1", tmp_path / sop, 10
    )


def test_quiet_window_completes_once_and_queues_route(tmp_path: Path) -> None:
    index = Index(tmp_path / "i.db")
    index.add_instance(_ref(tmp_path, "1"), "CT", "SCU", now=100.0)
    assert complete_quiet_studies(index, 30.0, now=120.0) == []  # still receiving
    assert complete_quiet_studies(index, 30.0, now=131.0) == ["1.2.3"]
    assert complete_quiet_studies(index, 30.0, now=200.0) == []  # only once
    jobs = index.jobs("1.2.3")
    assert [(j.kind, j.state) for j in jobs] == [(JobKind.ROUTE, JobState.PENDING)]
    assert index.study("1.2.3")["state"] == StudyState.COMPLETE


def test_late_instance_reopens_study_and_reroutes(tmp_path: Path) -> None:
    index = Index(tmp_path / "i.db")
    index.add_instance(_ref(tmp_path, "1"), "CT", "SCU", now=100.0)
    complete_quiet_studies(index, 1.0, now=110.0)
    job = index.claim_job(now=110.0)
    index.finish_job(job.id, JobState.SUCCEEDED)
    index.add_instance(_ref(tmp_path, "2"), "CT", "SCU", now=120.0)
    assert index.study("1.2.3")["state"] == StudyState.RECEIVING
    complete_quiet_studies(index, 1.0, now=130.0)
    routes = index.jobs("1.2.3", JobKind.ROUTE)
    assert [j.state for j in routes] == [JobState.SUCCEEDED, JobState.PENDING]


def test_claim_is_exclusive_and_respects_next_try(tmp_path: Path) -> None:
    index = Index(tmp_path / "i.db")
    index.add_job(JobKind.EXPORT, "k", "1.2.3", {"path": "x"})
    job = index.claim_job()
    assert job is not None and job.attempts == 1 and job.state is JobState.RUNNING
    assert index.claim_job() is None
    index.finish_job(job.id, JobState.PENDING, "try later", next_try_time=10**12)
    assert index.claim_job() is None  # not due yet
    assert index.jobs()[0].last_error == "try later"


def test_restart_resumes_running_jobs(tmp_path: Path) -> None:
    index = Index(tmp_path / "i.db")
    index.add_job(JobKind.ANALYZE, "k", "1.2.3", {})
    assert index.claim_job() is not None
    index.close()
    reopened = Index(tmp_path / "i.db")  # as after kill -9
    assert reopened.resume_interrupted() == (1, 0)
    job = reopened.claim_job()
    assert job is not None and job.attempts == 2


def test_re_adding_a_finished_job_rearms_it_but_not_a_pending_one(tmp_path: Path) -> None:
    index = Index(tmp_path / "i.db")
    index.add_job(JobKind.EXPORT, "k", "1.2.3", {"v": 1})
    index.add_job(JobKind.EXPORT, "k", "1.2.3", {"v": 2})
    assert len(index.jobs()) == 1 and index.jobs()[0].payload == {"v": 1}
    job = index.claim_job()
    index.finish_job(job.id, JobState.DEAD_LETTER, "gone")
    index.add_job(JobKind.EXPORT, "k", "1.2.3", {"v": 3})
    (only,) = index.jobs()
    assert only.state is JobState.PENDING and only.payload == {"v": 3} and only.attempts == 0


def test_quiet_windows_restart_when_the_node_starts(tmp_path: Path) -> None:
    """Down time is not quiet time: a study cut off by a stop waits a full window after the start."""
    index = Index(tmp_path / "i.db")
    index.add_instance(_ref(tmp_path, "1"), "CT", "SCU", now=100.0)
    assert index.quiet_studies(30.0, now=200.0) == ["1.2.3"]  # as if the node had been down 100 s
    assert index.restart_quiet_windows(now=200.0) == 1
    assert index.quiet_studies(30.0, now=200.0) == []
    assert index.quiet_studies(30.0, now=230.0) == ["1.2.3"]
