"""Job outcomes: retry with backoff, dead letter, non-retryable failures, unrouted studies."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest

from dicom_node.config import (
    ExportSection,
    ExportTarget,
    NodeSettings,
    RoutingRule,
    RoutingSection,
    RuleMatch,
    SpoolSection,
)
from dicom_node.index import Index, JobKind, JobState, StudyState
from dicom_node.spool import InstanceRef, Spool
from dicom_node.worker import StepContext, run_job
from tests.peers import free_port


def _ctx(tmp_path: Path, settings: NodeSettings) -> StepContext:
    spool = Spool(tmp_path / "spool")
    return StepContext(
        settings, spool, Index(spool.index_path), client_factory=lambda: pytest.fail("no inference")
    )


class _AnswerClient:
    """An inference client that answers every upload with one outcome (the reference run's)."""

    address = "in-process"

    def __init__(self, outcome: object) -> None:
        self.outcome = outcome

    def analyze_upload(self, *args: object, **kwargs: object) -> object:
        return self.outcome

    def close(self) -> None:
        pass


def _ref(path: Path) -> tuple[InstanceRef, pydicom.Dataset]:
    """The spool reference of a test file, as the SCP would record it, and its header."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    ref = InstanceRef(
        ds.SOPInstanceUID, ds.SOPClassUID, ds.StudyInstanceUID, ds.SeriesInstanceUID,
        "1.2.840.10008.1.2.1", path, 1,
    )  # fmt: skip
    return ref, ds


def test_export_to_a_dead_peer_backs_off_then_dead_letters(
    tmp_path: Path, small_ct_files: list[Path]
) -> None:
    target = ExportTarget(host="127.0.0.1", port=free_port(), ae_title="NOBODY")
    settings = NodeSettings(
        spool=SpoolSection(tmp_path / "spool"),
        export=ExportSection(targets={"pacs": target}, max_attempts=2, backoff_s=0.01),
    )
    ctx = _ctx(tmp_path, settings)
    ctx.index.add_job(JobKind.EXPORT, "k", "1.2.3", {"path": str(small_ct_files[0]), "target": "pacs"})
    first = ctx.index.claim_job()
    assert run_job(first, ctx) is JobState.PENDING
    (job,) = ctx.index.jobs()
    assert (
        job.next_try_time > time.time() - 1
        and "Cannot connect" in job.last_error
        or "not established" in job.last_error
    )
    time.sleep(0.05)
    second = ctx.index.claim_job()
    assert second is not None and second.attempts == 2
    assert run_job(second, ctx) is JobState.DEAD_LETTER
    assert ctx.index.jobs()[0].state is JobState.DEAD_LETTER


def test_unknown_target_fails_without_retry(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path, NodeSettings(spool=SpoolSection(tmp_path / "spool")))
    ctx.index.add_job(JobKind.EXPORT, "k", "1.2.3", {"path": "x", "target": "gone"})
    assert run_job(ctx.index.claim_job(), ctx) is JobState.FAILED
    assert "no longer exists" in ctx.index.jobs()[0].last_error


def test_study_no_rule_matches_is_recorded_unrouted(tmp_path: Path, small_ct_files: list[Path]) -> None:
    settings = NodeSettings(
        spool=SpoolSection(tmp_path / "spool"),
        routing=RoutingSection(rules=[RoutingRule(name="mr-only", match=RuleMatch(modality=["MR"]))]),
    )
    ctx = _ctx(tmp_path, settings)


    ref, ds = _ref(small_ct_files[0])
    ctx.index.add_instance(ref, "CT", "SCU", now=0.0)
    ctx.index.complete_study(ds.StudyInstanceUID, 1.0, now=10.0)
    assert run_job(ctx.index.claim_job(), ctx) is JobState.SUCCEEDED
    study = ctx.index.study(ds.StudyInstanceUID)
    assert study["state"] == StudyState.UNROUTED and "CT" in study["reason"]
    assert [j.kind for j in ctx.index.jobs()] == [JobKind.ROUTE]


def test_completion_and_exports_do_not_wait_behind_a_long_analysis(
    tmp_path: Path, small_ct_files: list[Path]
) -> None:
    """A stuck analysis must not delay other studies' completion or pending exports."""
    import threading
    from dataclasses import replace

    from dicom_node.config import CompletionSection, WorkerSection
    from dicom_node.spool import InstanceRef
    from dicom_node.worker import Worker

    release = threading.Event()

    class StuckClient:
        def analyze_upload(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            release.wait(20)
            raise RuntimeError("released")

        def close(self) -> None:
            pass

    settings = NodeSettings(
        spool=SpoolSection(tmp_path / "spool"),
        completion=CompletionSection(quiet_window_s=0.0),
        worker=WorkerSection(threads=1, poll_interval_s=0.05),
        export=ExportSection(
            targets={"pacs": ExportTarget(port=free_port(), ae_title="NOBODY")}, max_attempts=1
        ),
    )
    ctx = replace(_ctx(tmp_path, settings), client_factory=StuckClient)
    ref, ds = _ref(small_ct_files[0])
    ctx.index.add_instance(ref, "CT", "SCU")
    worker = Worker(ctx)
    worker.start()
    try:
        deadline = time.time() + 20
        while time.time() < deadline and not any(
            j.kind is JobKind.ANALYZE and j.state is JobState.RUNNING for j in ctx.index.jobs()
        ):
            time.sleep(0.05)
        # The only analysis thread is now stuck. A second study and an export arrive:
        other = InstanceRef(
            "9.9.9.1", ds.SOPClassUID, "9.9.9", "9.9.9.2", "1.2.840.10008.1.2.1", small_ct_files[1], 1
        )
        ctx.index.add_instance(other, "MR", "SCU")
        ctx.index.add_job(
            JobKind.EXPORT, "x->pacs", "9.9.9", {"path": str(small_ct_files[1]), "target": "pacs"}
        )
        while time.time() < deadline:
            study_done = ctx.index.study("9.9.9")["state"] != "RECEIVING"
            export_done = any(
                j.kind is JobKind.EXPORT and j.state is JobState.DEAD_LETTER for j in ctx.index.jobs()
            )
            if study_done and export_done:
                break
            time.sleep(0.05)
        assert ctx.index.study("9.9.9")["state"] != "RECEIVING"  # completed while the analysis is stuck
        assert any(j.kind is JobKind.EXPORT and j.state is JobState.DEAD_LETTER for j in ctx.index.jobs())
    finally:
        release.set()
        worker.stop()


def test_an_export_stuck_on_one_pacs_does_not_hold_back_the_next(
    tmp_path: Path, small_ct_files: list[Path]
) -> None:
    """Two export lanes (export.threads = 2): while one waits on a PACS that accepted the TCP
    connection and never answers, the next export (here to an unreachable PACS: parked at once)
    still runs. With one lane it would wait for the first association's timeout."""
    import socket
    import threading
    from dataclasses import replace

    from dicom_node.worker import Worker

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(silent.accept()[0]), daemon=True).start()
    settings = NodeSettings(
        spool=SpoolSection(tmp_path / "spool"),
        export=ExportSection(
            targets={
                "silent": ExportTarget(port=silent.getsockname()[1], ae_title="SILENT"),
                "gone": ExportTarget(port=free_port(), ae_title="NOBODY"),
            },
            max_attempts=1,
        ),
    )
    assert settings.export.threads == 2
    ctx = replace(_ctx(tmp_path, settings), client_factory=lambda: pytest.fail("no inference"))
    ctx.index.add_job(
        JobKind.EXPORT, "a->silent", "1.2.3", {"path": str(small_ct_files[0]), "target": "silent"}
    )
    worker = Worker(ctx)
    worker.start()
    try:
        deadline = time.time() + 10
        while time.time() < deadline and not accepted:
            time.sleep(0.02)
        assert accepted, "the first export never connected"
        ctx.index.add_job(
            JobKind.EXPORT, "b->gone", "1.2.3", {"path": str(small_ct_files[1]), "target": "gone"}
        )
        worker._nudge()
        states: dict[str, JobState] = {}
        while time.time() < deadline:
            states = {j.dedupe_key: j.state for j in ctx.index.jobs()}
            if states.get("b->gone") is JobState.DEAD_LETTER:
                break
            time.sleep(0.02)
        assert states == {"a->silent": JobState.RUNNING, "b->gone": JobState.DEAD_LETTER}
    finally:
        for sock in (*accepted, silent):
            sock.close()  # the stuck association ends (connection closed) and the lane stops
        worker.stop()


@pytest.mark.parametrize("threads", [0, -1, "2", True, 1.5])
def test_export_threads_must_be_a_positive_whole_number(threads: object) -> None:
    with pytest.raises(ValueError, match="export.threads"):
        ExportSection(threads=threads)  # type: ignore[arg-type]


@pytest.mark.parametrize("broken", [False, True])
def test_key_images_follow_the_rule_and_never_hold_back_the_seg_and_sr(
    tmp_path: Path, small_ct_files: list[Path], monkeypatch: pytest.MonkeyPatch, broken: bool
) -> None:
    """A rule with key_images adds the SC series to the outputs; if they cannot be built (here: a
    source slice that cannot be read), the SEG and SRs are still written and the history says why."""
    import pydicom

    from dicom_node.results import SERIES_NUMBERS, ResultWriter
    from dicom_node.volume import read_series
    from tests.reference_run import analyze_reference

    outcome = analyze_reference(read_series(small_ct_files))

    if broken:

        def unreadable(self: ResultWriter) -> list:
            raise ValueError("A key image needs the source image's pixels")

        monkeypatch.setattr(ResultWriter, "build_key_images", unreadable)
    rule = RoutingRule(name="ct-keys", match=RuleMatch(modality=["CT"]), tasks=["segment"], key_images=True)
    settings = NodeSettings(spool=SpoolSection(tmp_path / "spool"), routing=RoutingSection(rules=[rule]))
    from dataclasses import replace

    ctx = replace(_ctx(tmp_path, settings), client_factory=lambda: _AnswerClient(outcome))
    for path in small_ct_files:
        ref, ds = _ref(path)
        ctx.index.add_instance(ref, "CT", "SCU", now=0.0)
    study = str(ds.StudyInstanceUID)
    ctx.index.complete_study(study, 1.0, now=10.0)
    assert run_job(ctx.index.claim_job(), ctx) is JobState.SUCCEEDED  # route
    assert run_job(ctx.index.claim_job(), ctx) is JobState.SUCCEEDED  # analyze
    outputs = sorted(p.name.split("-")[0] for p in ctx.spool.output_dir(study).iterdir())
    assert "seg" in outputs and "measurements" in outputs
    key_images = [p for p in ctx.spool.output_dir(study).iterdir() if p.name.startswith("keyimages-")]
    events = {e["event"]: e["detail"] for e in ctx.index.events(study)}
    if broken:
        assert not key_images and "needs the source image's pixels" in events["key images not written"]
    else:
        assert key_images and "key images not written" not in events
        for path in key_images:
            assert pydicom.dcmread(path).SeriesNumber == SERIES_NUMBERS["keyimages"]


def test_a_resampled_series_is_named_once_in_the_history(tmp_path: Path, small_ct_files: list[Path]) -> None:
    """The gap is in the history before inference, and a retried attempt does not repeat it."""
    from dataclasses import replace

    from dicom_node.errors import InferenceUnavailable

    class DownClient:
        address = "127.0.0.1:1"

        def analyze_upload(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            raise InferenceUnavailable("service down")

        def close(self) -> None:
            pass

    settings = NodeSettings(
        spool=SpoolSection(tmp_path / "spool"),
        routing=RoutingSection(rules=[RoutingRule(name="ct", match=RuleMatch(modality=["CT"]))]),
    )
    ctx = replace(_ctx(tmp_path, settings), client_factory=DownClient)
    for path in small_ct_files[:10] + small_ct_files[11:]:  # slice 10 (z = -25) never arrived
        ref, ds = _ref(path)
        ctx.index.add_instance(ref, "CT", "SCU", now=0.0)
    study = str(ds.StudyInstanceUID)
    ctx.index.complete_study(study, 1.0, now=10.0)
    assert run_job(ctx.index.claim_job(), ctx) is JobState.SUCCEEDED  # route
    for _ in range(2):  # the service is down: the analysis waits and runs again
        job = ctx.index.claim_job(now=time.time() + 3600)
        assert job is not None and run_job(job, ctx) is JobState.PENDING
    geometry = [e["detail"] for e in ctx.index.events(study) if e["event"] == "geometry"]
    assert geometry == [
        "1 missing slice between z=-27.50 and z=-22.50 mm; resampled to 2.50 mm (missing positions linearly interpolated)"
    ]


def test_a_job_queued_by_another_lane_is_taken_at_once_not_after_the_poll(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """route -> analyze -> export: each job queues the next for another lane, which must not sleep
    out its poll interval first (30 s here; the test allows 5)."""
    import dicom_node.worker as worker_module
    from dicom_node.config import WorkerSection
    from dicom_node.worker import Worker

    settings = NodeSettings(
        spool=SpoolSection(tmp_path / "spool"), worker=WorkerSection(threads=1, poll_interval_s=30)
    )
    ctx = _ctx(tmp_path, settings)
    ran: dict[JobKind, float] = {}

    def fake_run_job(job, ctx):  # noqa: ANN001, ANN202
        if job.kind is JobKind.ROUTE:  # as an analysis does: an export for the other lane, by then idle
            time.sleep(0.3)
            ctx.index.add_job(JobKind.EXPORT, "e", "1.2.3", {"path": "x", "target": "t"})
        ran[job.kind] = time.monotonic()
        ctx.index.finish_job(job.id, JobState.SUCCEEDED)
        return JobState.SUCCEEDED

    monkeypatch.setattr(worker_module, "run_job", fake_run_job)
    ctx.index.add_job(JobKind.ROUTE, "r", "1.2.3", {})  # taken on the analysis lane's first look
    worker = Worker(ctx)
    worker.start()
    try:
        deadline = time.monotonic() + 40
        while JobKind.EXPORT not in ran and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        worker.stop(timeout_s=5)
    assert JobKind.ROUTE in ran, "the route job was not taken (only the poll would find it: no nudge)"
    assert JobKind.EXPORT in ran and ran[JobKind.EXPORT] - ran[JobKind.ROUTE] < 5


def test_a_study_completes_when_its_quiet_window_ends_not_a_poll_later(
    tmp_path: Path, small_ct_files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:

    import dicom_node.worker as worker_module
    from dicom_node.config import CompletionSection, WorkerSection
    from dicom_node.worker import Worker

    settings = NodeSettings(
        spool=SpoolSection(tmp_path / "spool"),
        completion=CompletionSection(quiet_window_s=0.5),
        worker=WorkerSection(threads=1, poll_interval_s=30),
    )
    ctx = _ctx(tmp_path, settings)
    monkeypatch.setattr(worker_module, "run_job", lambda job, ctx: JobState.SUCCEEDED)  # no analysis here
    ref, ds = _ref(small_ct_files[0])
    ctx.index.add_instance(ref, "CT", "SCU")
    received = time.time()
    worker = Worker(ctx)
    worker.start()
    try:
        deadline = time.time() + 40
        while ctx.index.study(ds.StudyInstanceUID)["state"] == "RECEIVING" and time.time() < deadline:
            time.sleep(0.02)
        completed = time.time()
    finally:
        worker.stop(timeout_s=5)
    assert ctx.index.study(ds.StudyInstanceUID)["state"] != "RECEIVING"
    assert 0.45 < completed - received < 5  # the quiet window, not the 30 s poll


@pytest.mark.parametrize("rules", ["pull_priors off", "rule removed"])
def test_priors_jobs_of_an_earlier_config_end_with_their_reason(tmp_path: Path, rules: str) -> None:
    """A prior fetch queued while a rule pulled priors, then the config changed: the priors lane
    still starts for it, and the job fails with why instead of staying pending for ever."""
    from dicom_node.config import WorkerSection
    from dicom_node.worker import Worker

    kept = [RoutingRule(name="ct", match=RuleMatch(modality=["CT"]))] if rules == "pull_priors off" else []
    settings = NodeSettings(
        spool=SpoolSection(tmp_path / "spool"),
        routing=RoutingSection(rules=kept),
        worker=WorkerSection(poll_interval_s=0.1),
    )
    ctx = _ctx(tmp_path, settings)
    ctx.index.add_job(JobKind.PRIORS, "priors-ct", "1.2.3", {"rule": "ct", "source": "pacs"})
    worker = Worker(ctx)
    worker.start()
    try:
        deadline = time.monotonic() + 20
        while (
            ctx.index.jobs(kind=JobKind.PRIORS)[0].state is JobState.PENDING and time.monotonic() < deadline
        ):
            time.sleep(0.05)
    finally:
        worker.stop(timeout_s=5)
    (job,) = ctx.index.jobs(kind=JobKind.PRIORS)
    assert job.state is JobState.FAILED
    why = "no longer pulls priors" if rules == "pull_priors off" else "no longer exists in the config"
    assert why in job.last_error


@pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning")
def test_repaired_source_values_are_named_once_when_the_analysis_runs_again(
    tmp_path: Path, small_ct_files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The history names the repaired attributes (keywords only), once, though the analysis ran
    twice: here its first results could not be written (a full disk), so it was retried."""
    from dataclasses import replace

    import dicom_node.worker as worker_module
    from dicom_node.errors import SpoolFull
    from dicom_node.volume import read_series
    from tests.dicom_fixtures import index_series, set_raw
    from tests.reference_run import analyze_reference

    files = []
    for path in small_ct_files:
        ds = pydicom.dcmread(path)
        set_raw(ds, "PatientBirthDate", "1941-09-23")
        ds.save_as(tmp_path / path.name, enforce_file_format=True)
        files.append(tmp_path / path.name)
    outcome = analyze_reference(read_series(files))

    real_keep = worker_module.keep_output
    calls = []

    def full_once(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        if len(calls) == 1:
            raise SpoolFull("Out of resources: spool disk below its free-space watermark")
        return real_keep(*args, **kwargs)

    monkeypatch.setattr(worker_module, "keep_output", full_once)
    settings = NodeSettings(
        spool=SpoolSection(tmp_path / "spool"),
        routing=RoutingSection(rules=[RoutingRule(name="ct", match=RuleMatch(modality=["CT"]))]),
    )
    ctx = replace(_ctx(tmp_path, settings), client_factory=lambda: _AnswerClient(outcome))
    study = index_series(ctx.index, files)
    ctx.index.complete_study(study, 1.0, now=10.0)
    assert run_job(ctx.index.claim_job(), ctx) is JobState.SUCCEEDED  # route
    assert run_job(ctx.index.claim_job(), ctx) is JobState.PENDING  # analyze: the disk was full
    # On the worker's backoff: SpoolFull's retry_after_s (60 s) is what the node asks of senders,
    # not a wait a destination asked of the node (ExportError's).
    assert ctx.index.jobs(kind=JobKind.ANALYZE)[0].next_try_time < time.time() + 30
    job = ctx.index.claim_job(now=time.time() + 3600)
    assert job is not None and run_job(job, ctx) is JobState.SUCCEEDED
    repaired = [e["detail"] for e in ctx.index.events(study) if e["event"] == "source values repaired"]
    assert repaired == [
        "not valid DICOM in the images, so repaired or left empty in the results: PatientBirthDate"
    ]
