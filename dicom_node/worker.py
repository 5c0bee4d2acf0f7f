"""The job loop: claim a due job, run its step, record the new state.

Steps: route (study -> analyze jobs), analyze (series -> volume -> gRPC ->
SR/SEG written to the spool's outputs -> export jobs), export (C-STORE or STOW-RS;
with Storage Commitment the job waits, PENDING, for the PACS's report: dicom_node.commitment).
Every step is idempotent, so a job cut off by a crash simply runs again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Protocol

import pydicom
from pydicom.dataset import Dataset

from dicom_node.attributes import searchable_attributes
from dicom_node.client import AnalysisOutcome, ProgressHandler, Upload, make_spec
from dicom_node.commitment import export_committed
from dicom_node.completion import complete_quiet_studies
from dicom_node.config import NodeSettings, RoutingRule
from dicom_node.deidentify import UidCrosswalk, check_pixels, deidentify_header, load_key, reidentify_result
from dicom_node.errors import (
    AwaitingCommitment,
    DeidentificationRefused,
    ExportError,
    InferenceRejected,
    RadBridgeError,
)
from dicom_node.export import export
from dicom_node.index import Delivery, Index, Job, JobKind, JobState, StudyState
from dicom_node.memory import Admit, MemoryBudget
from dicom_node.metrics import ANALYSIS_SECONDS, EXPORTS, JOB_OUTCOMES, JOBS_RESUMED
from dicom_node.priors import run_priors
from dicom_node.results import SERIES_NUMBERS, ResultWriter
from dicom_node.routing import RulePlanner, group_series, route
from dicom_node.spool import InstanceRef, Spool, uid_key, write_durably
from dicom_node.status import job_label, series_labels
from dicom_node.volume import read_series
from protos.radbridge.v1 import inference_pb2 as pb

logger = logging.getLogger(__name__)
#: Longest wait between two tries while a dependency (the inference service) is down.
OUTAGE_MAX_BACKOFF_S = 60.0
#: A destination's Retry-After is honoured up to this (a PACS asking for a day is retried in an
#: hour); below it, the retry waits at least what it asked even where the backoff is shorter.
RETRY_AFTER_MAX_S = 3600.0
ProgressHook = Callable[[Job, float, str], None]


class AnalysisClient(Protocol):
    """What an analysis needs of a client: one ``InferenceClient`` or a replica pool's."""

    address: str

    def analyze_upload(
        self, upload: Upload, on_progress: ProgressHandler | None = None
    ) -> AnalysisOutcome: ...

    def close(self) -> None: ...


@dataclass
class StepContext:
    settings: NodeSettings
    spool: Spool
    index: Index
    client_factory: Callable[[], AnalysisClient]
    progress: ProgressHook | None = None
    #: The rules checked against the models' tasks; None = send every task of the rule as it is.
    planner: RulePlanner | None = None
    #: The analyses' shared memory pool; None = one made from settings.worker.
    memory: MemoryBudget = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.memory is None:
            self.memory = MemoryBudget(self.settings.worker.analysis_budget_bytes())


def run_route(job: Job, ctx: StepContext) -> None:
    series = group_series(ctx.index.study_instances(job.study_instance_uid))
    pairs = route(series, ctx.settings.routing.rules, ctx.settings.routing.min_instances)
    for s, rule in pairs:
        ctx.index.add_job(
            JobKind.ANALYZE,
            f"{s.series_instance_uid}|{rule.name}",
            job.study_instance_uid,
            {"series_instance_uid": s.series_instance_uid, "rule": rule.name},
        )
    _queue_priors(job, ctx, [rule for _, rule in pairs])
    if pairs:
        rules = ", ".join(sorted({rule.name for _, rule in pairs}))
        ctx.index.add_event(
            job.study_instance_uid,
            "routed",
            f"{len(pairs)} analysis job(s) for {len(series)} series; rules {rules}",
        )
    else:
        modalities = ",".join(sorted({s.modality for s in series})) or "none"
        ctx.index.set_study_state(
            job.study_instance_uid, StudyState.UNROUTED, f"no rule matched (modalities {modalities})"
        )
        logger.info(
            "study unrouted", extra={"event": "study.unrouted", "study_key": uid_key(job.study_instance_uid)}
        )


def _queue_priors(job: Job, ctx: StepContext, rules: list[RoutingRule]) -> None:
    """A PRIORS job per matched rule with pull_priors; none for a study pulled as a prior."""
    wanted = {rule.name: rule for rule in rules if rule.pull_priors}
    if not wanted:
        return
    if ctx.index.is_prior(job.study_instance_uid):
        ctx.index.add_event(
            job.study_instance_uid, "prior fetch skipped", "this study was pulled as a prior (no cascade)"
        )
        return
    for rule in wanted.values():
        ctx.index.add_job(
            JobKind.PRIORS,
            f"{job.study_instance_uid}|{rule.name}",
            job.study_instance_uid,
            {"rule": rule.name, "source": rule.priors_from},
        )


def _run_priors(job: Job, ctx: StepContext) -> None:
    rule = _rule(ctx.settings, job.payload["rule"])
    if not rule.pull_priors:  # queued before the config changed: not to be fetched now
        raise RadBridgeError(f"Routing rule {rule.name!r} no longer pulls priors.")
    run_priors(job, ctx.settings, ctx.spool, ctx.index, rule)


def _rule(settings: NodeSettings, name: str) -> RoutingRule:
    for rule in settings.routing.rules:
        if rule.name == name:
            return rule
    raise RadBridgeError(f"Routing rule {name!r} no longer exists in the config.")


def run_analyze(job: Job, ctx: StepContext) -> None:
    """Analyse one series while holding its share of the node's memory pool (dicom_node.memory)."""

    def waiting(needed: int, held: int) -> None:
        ctx.index.add_event(
            job.study_instance_uid,
            "waiting for memory",
            f"this analysis needs {needed / 1e9:.1f} GB; other analyses hold {held / 1e9:.1f} GB "
            f"of the {ctx.memory.total_bytes / 1e9:.1f} GB worker.memory_budget_bytes",
        )

    with ctx.memory.admission(waiting) as admit:
        _analyze(job, ctx, admit)


def _analyze(job: Job, ctx: StepContext, admit: Admit) -> None:
    series_uid = job.payload["series_instance_uid"]
    rule = _rule(ctx.settings, job.payload["rule"])
    paths = [
        r.path
        for r in ctx.index.study_instances(job.study_instance_uid)
        if r.series_instance_uid == series_uid
    ]
    tasks = list(rule.tasks)
    plan = ctx.planner.plan(rule.name) if ctx.planner is not None else None
    if plan is not None:
        if not plan.runnable:
            raise InferenceRejected(plan.problem)
        tasks = list(plan.runnable)
        if plan.skipped:
            ctx.index.add_event(job.study_instance_uid, "tasks skipped", plan.problem)
    steps: dict[str, float] = {}
    mark = time.monotonic()

    def step(name: str) -> None:
        nonlocal mark
        now = time.monotonic()
        steps[name] = round(1000 * (now - mark), 1)
        mark = now

    volume = read_series(paths, max_voxel_bytes=ctx.memory.max_voxel_bytes(), admit=admit)
    sources, slices, geometry_note = volume.sources, volume.slices, volume.note
    if geometry_note:  # the operator sees what was analysed
        _event_once(ctx, job.study_instance_uid, "geometry", geometry_note)
    spec = make_spec(
        tasks,
        model=rule.model,
        question=rule.question,
        labels=rule.labels,
        language=rule.language,
        correlation_id=f"job-{job.id}",
    )
    upload = Upload.of(volume, spec)
    del volume  # only the upload holds the voxels now, and it lets go once the service has them
    crosswalk = _deidentify_upload(ctx, job, rule, upload, sources) if rule.deidentify else None
    step("read_ms")

    def on_progress(p: pb.Progress) -> None:
        if p.stage != pb.Progress.RECEIVING and "send_ms" not in steps:
            step("send_ms")  # the service holds the whole volume
        if ctx.progress:
            ctx.progress(job, p.fraction, p.message)

    client = ctx.client_factory()
    try:
        outcome = client.analyze_upload(upload, on_progress)
    finally:
        client.close()
    replica = client.address
    step("inference_ms")
    if crosswalk is not None:
        reidentify_result(outcome.result, crosswalk)  # SR/SEG are built from the original sources
    writer = ResultWriter(
        sources,
        outcome.result,
        outcome.masks,
        ctx.settings.worker.uid_root,
        slices=slices,
        geometry_note=geometry_note,
    )
    if writer.repaired:  # the keywords only: the values are patient data
        _event_once(
            ctx,
            job.study_instance_uid,
            "source values repaired",
            "not valid DICOM in the images, so repaired or left empty in the results: "
            + ", ".join(writer.repaired),
        )
    writer.previous = _previous_outputs(ctx.index, writer)
    if writer.previous:
        replaced = sum(len(v) for v in writer.previous.values())
        ctx.index.add_event(
            job.study_instance_uid,
            "analysis revised",
            f"the series changed since its last analysis; the new objects replace {replaced} earlier one(s)",
        )
    objects = writer.build_all()
    if rule.key_images:
        try:
            objects += writer.key_image_outputs()
        except (ValueError, OSError, RadBridgeError) as exc:  # e.g. a source slice that cannot be decoded
            # The key images are a courtesy copy: the SEG and SRs still go out without them.
            ctx.index.add_event(
                job.study_instance_uid,
                "key images not written",
                f"rule '{rule.name}': {type(exc).__name__}: {exc}",
            )
    step("build_ms")
    written = [keep_output(ctx.spool, ctx.index, obj.kind, obj.dataset) for obj in objects]
    step("write_ms")
    for name in ctx.settings.export.targets:
        for path in written:
            ctx.index.add_job(
                JobKind.EXPORT,
                f"{path.name}->{name}",
                job.study_instance_uid,
                {"path": str(path), "target": name},
            )
    logger.info(
        "analysis written",
        extra={
            "event": "analyze.written",
            "job_id": job.id,
            "objects": len(written),
            "study_key": uid_key(job.study_instance_uid),
            "inference_address": replica,
            "repaired_values": ", ".join(writer.repaired),  # keywords; the JSON log keeps scalars
            **steps,  # read, send (gRPC upload), inference (service until the last mask), build, write
        },
    )


def _event_once(ctx: StepContext, study_uid: str, event: str, detail: str) -> None:
    """A history line, unless the study already has it (an analysis retried says it once)."""
    if not any(e["event"] == event and e["detail"] == detail for e in ctx.index.events(study_uid)):
        ctx.index.add_event(study_uid, event, detail)


def _deidentify_upload(
    ctx: StepContext, job: Job, rule: RoutingRule, upload: Upload, sources: list[Dataset]
) -> UidCrosswalk:
    """Clean the header of a de-identifying route's upload in place; the crosswalk maps answers back."""
    check_pixels(sources, rule.name)
    try:
        key = load_key(ctx.settings.deidentification)
    except ValueError as exc:  # ConfigError: the key went missing since start-up
        raise DeidentificationRefused(str(exc)) from exc
    crosswalk = UidCrosswalk(key, ctx.index)
    upload.header = deidentify_header(upload.header, crosswalk, job.payload["series_instance_uid"])
    ctx.index.add_event(
        job.study_instance_uid,
        "sent de-identified",
        f"rule '{rule.name}': PS3.15 Basic Profile on the request, UIDs through the node's crosswalk",
    )
    return crosswalk


def _previous_outputs(index: Index, writer: ResultWriter) -> dict[str, list[Dataset]]:
    """Headers of what earlier analyses of this series (other input) wrote, by kind."""
    previous: dict[str, list[Dataset]] = {}
    for kind in SERIES_NUMBERS:
        headers = [
            pydicom.dcmread(p, stop_before_pixels=True)
            for p in index.outputs_in_series(writer.uid(kind, "series"))
        ]
        earlier = [ds for ds in headers if str(ds.SOPInstanceUID) != writer.instance_uid(kind)]
        if earlier:
            previous[kind] = earlier
    return previous


def keep_output(spool: Spool, index: Index, kind: str, ds: Dataset) -> Path:
    """Write a produced object durably into the spool's outputs and index it (searchable over
    DICOMweb, never routed); returns its path for the export jobs."""
    path = spool.output_dir(str(ds.StudyInstanceUID)) / f"{kind}-{uid_key(str(ds.SOPInstanceUID), 24)}.dcm"
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    write_durably(path, data)
    ref = InstanceRef(
        sop_instance_uid=str(ds.SOPInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        study_instance_uid=str(ds.StudyInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
        path=path,
        size=len(data),
    )
    index.add_output(ref, str(ds.Modality), searchable_attributes(ds))
    return path


def run_export(job: Job, ctx: StepContext) -> None:
    target = ctx.settings.export.targets.get(job.payload["target"])
    if target is None:
        raise RadBridgeError(f"Export target {job.payload['target']!r} no longer exists in the config.")
    paths = [Path(job.payload["path"])]
    if target.storage_commitment:
        export_committed(
            ctx.index,
            job.id,
            job.study_instance_uid,
            job.payload["target"],
            target,
            paths,
            ctx.settings.scp.ae_title,
        )
        return
    export(paths, target, ctx.settings.scp.ae_title)
    ctx.index.set_delivery(job.id, Delivery.SENT)


STEPS: dict[JobKind, Callable[[Job, StepContext], None]] = {
    JobKind.ROUTE: run_route,
    JobKind.ANALYZE: run_analyze,
    JobKind.EXPORT: run_export,
    JobKind.PRIORS: _run_priors,
}


def _policy(ctx: StepContext, kind: JobKind) -> tuple[int, float, float]:
    if kind in (JobKind.EXPORT, JobKind.PRIORS):  # a PACS on the other end: the export policy
        e = ctx.settings.export
        return e.max_attempts, e.backoff_s, e.max_backoff_s
    w = ctx.settings.worker
    return w.max_attempts, w.backoff_s, 300.0


def _history(ctx: StepContext, job: Job, event: str, detail: str = "") -> None:
    """A line in the study's history: what the job works on, and what happened."""
    label = job_label(job, series_labels(ctx.index, job.study_instance_uid))
    ctx.index.add_event(
        job.study_instance_uid, f"{job.kind} {event}", f"{label}{': ' if detail else ''}{detail}"
    )


def _count(job: Job, outcome: str, started: float) -> None:
    JOB_OUTCOMES.labels(kind=str(job.kind), outcome=outcome).inc()
    if job.kind is JobKind.EXPORT:
        EXPORTS.labels(target=str(job.payload.get("target", "")), outcome=outcome).inc()
    elif job.kind is JobKind.ANALYZE:
        ANALYSIS_SECONDS.labels(rule=str(job.payload.get("rule", ""))).observe(time.monotonic() - started)


def run_job(job: Job, ctx: StepContext) -> JobState:
    """Run one claimed job and record its outcome (job state, study history, metrics); returns the new state."""
    started = time.monotonic()
    if job.kind is JobKind.ANALYZE:
        _history(ctx, job, "started", f"attempt {job.attempts}")
    try:
        STEPS[job.kind](job, ctx)
    except AwaitingCommitment as exc:
        # Sent; the PACS's report wakes the job (or the deadline does): no attempt is used.
        ctx.index.await_commitment(job.id, str(exc), exc.until)
        _count(job, "awaiting_commitment", started)
        _history(ctx, job, "awaiting commitment", str(exc))
        return JobState.PENDING
    except Exception as exc:
        retryable = isinstance(exc, RadBridgeError) and exc.retryable
        max_attempts, backoff, cap = _policy(ctx, job.kind)
        message = (
            f"{type(exc).__name__}: {exc}"
            if isinstance(exc, RadBridgeError)
            else f"{type(exc).__name__}: internal error"
        )
        if not isinstance(exc, RadBridgeError):
            logger.error(
                "job crashed", exc_info=True, extra={"event": "job.error", "job_id": job.id, "kind": job.kind}
            )
        if isinstance(exc, RadBridgeError) and exc.outage:
            delay = min(backoff * 2**job.outage_waits, OUTAGE_MAX_BACKOFF_S)
            ctx.index.wait_out_outage(job.id, message, time.time() + delay)
            state = JobState.PENDING
            _count(job, "waiting", started)
            _history(ctx, job, "waiting", f"retry in {delay:g} s, dependency down: {message}")
        elif retryable and job.attempts < max_attempts:
            delay = min(backoff * 2 ** (job.attempts - 1), cap)
            if isinstance(exc, ExportError) and exc.retry_after_s is not None:  # the PACS asked
                delay = max(delay, min(exc.retry_after_s, RETRY_AFTER_MAX_S))
            ctx.index.finish_job(job.id, JobState.PENDING, message, time.time() + delay)
            state = JobState.PENDING
            _count(job, "retry", started)
            _history(ctx, job, "retry", f"in {delay:g} s after attempt {job.attempts}: {message}")
        else:
            # An export the destination refused for good is parked (DEAD_LETTER) like one that ran
            # out of attempts: the objects exist and wait for an operator's retry.
            parked = retryable or (job.kind is JobKind.EXPORT and isinstance(exc, ExportError))
            state = JobState.DEAD_LETTER if parked else JobState.FAILED
            ctx.index.finish_job(job.id, state, message)
            _count(job, "dead_letter" if parked else "failed", started)
            _history(ctx, job, "dead-letter" if parked else "failed", message)
        logger.warning(
            "job state",
            extra={
                "event": "job.state",
                "job_id": job.id,
                "kind": job.kind,
                "to": state,
                "attempt": job.attempts,
                "reason": message,
            },
        )
        return state
    ctx.index.finish_job(job.id, JobState.SUCCEEDED)
    _count(job, "succeeded", started)
    if job.kind is not JobKind.ROUTE:
        _history(ctx, job, "done")
    logger.info(
        "job state",
        extra={
            "event": "job.state",
            "job_id": job.id,
            "kind": job.kind,
            "to": JobState.SUCCEEDED,
            "attempt": job.attempts,
            "duration_ms": round(1000 * (time.monotonic() - started)),
        },
    )
    return JobState.SUCCEEDED


class Worker:
    """Background threads: study completion, analysis jobs, and a dedicated export lane.

    Completion runs on its own timer so a long analysis never delays other
    studies' quiet windows; exports have their own threads (``export.threads``) so results
    already written reach the PACS while the next series is being analysed, and a study's SRs
    while its SEG is still being sent.
    """

    ANALYSIS_KINDS = (JobKind.ROUTE, JobKind.ANALYZE)
    EXPORT_KINDS = (JobKind.EXPORT,)
    #: Prior fetches wait on a PACS (C-FIND, C-MOVE): their own lane, never in front of an analysis.
    PRIORS_KINDS = (JobKind.PRIORS,)

    def __init__(self, ctx: StepContext) -> None:
        self.ctx = ctx
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        # Lanes idle on this, not a plain sleep: a finished job or a completed study usually queued
        # the next job (route -> analyze -> export), which another lane should take at once rather
        # than after its poll interval. The poll stays for jobs queued elsewhere (HTTP, CLI, retries).
        self._queued = threading.Condition()
        self._generation = 0

    def start(self) -> None:
        self.ctx.index.restart_quiet_windows()
        limits = {kind: _policy(self.ctx, kind)[0] for kind in JobKind}
        resumed, failed = self.ctx.index.resume_interrupted(limits)
        JOBS_RESUMED.labels(outcome="resumed").inc(resumed)
        JOBS_RESUMED.labels(outcome="failed").inc(failed)
        if resumed or failed:
            logger.info("jobs resumed", extra={"event": "jobs.resumed", "count": resumed, "poisoned": failed})
        loops = [("completion", self._completion_loop, ())]
        loops += [
            (f"jobs-{i}", self._job_loop, (self.ANALYSIS_KINDS,))
            for i in range(max(1, self.ctx.settings.worker.threads))
        ]
        loops += [
            (f"export-{i}", self._job_loop, (self.EXPORT_KINDS,))
            for i in range(self.ctx.settings.export.threads)
        ]
        # Also when no rule pulls priors now but jobs from an earlier config wait: they end
        # (failed, with the reason) instead of staying pending for ever.
        if any(rule.pull_priors for rule in self.ctx.settings.routing.rules) or self._priors_waiting():
            loops += [("priors", self._job_loop, (self.PRIORS_KINDS,))]
        for name, target, args in loops:
            t = threading.Thread(target=target, args=args, name=f"radbridge-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    def _priors_waiting(self) -> bool:
        counts = self.ctx.index.job_counts()
        return any(counts.get((JobKind.PRIORS, state), 0) for state in (JobState.PENDING, JobState.RUNNING))

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Finish the current jobs, then stop (the job table holds the rest); True if every lane
        has ended."""
        self._stop.set()
        self._nudge()
        self.ctx.memory.close()  # an analysis waiting for memory gives up now (retried later)
        for t in self._threads:
            t.join(timeout_s)
        return not any(t.is_alive() for t in self._threads)

    def _nudge(self) -> None:
        """Something may have been queued: every idle lane looks again now."""
        with self._queued:
            self._generation += 1
            self._queued.notify_all()

    def _idle(self, seen: int, poll: float) -> None:
        """Wait up to ``poll`` unless a nudge came after ``seen`` (also one before this call)."""
        with self._queued:
            self._queued.wait_for(lambda: self._generation != seen or self._stop.is_set(), timeout=poll)

    def _completion_loop(self) -> None:
        poll = self.ctx.settings.worker.poll_interval_s
        quiet = self.ctx.settings.completion.quiet_window_s
        while not self._stop.is_set():
            wait = poll
            try:
                if complete_quiet_studies(self.ctx.index, quiet):
                    self._nudge()  # their route jobs are queued
                due = self.ctx.index.next_quiet_time(quiet)
                if due is not None:  # wake when the next study falls quiet, not up to a poll later
                    wait = min(poll, max(0.005, due - time.time()))
            except Exception:
                logger.error("completion loop error", exc_info=True, extra={"event": "worker.error"})
            self._stop.wait(wait)

    def _job_loop(self, kinds: tuple[JobKind, ...]) -> None:
        poll = self.ctx.settings.worker.poll_interval_s
        while not self._stop.is_set():
            seen = self._generation
            try:
                job = self.ctx.index.claim_job(kinds=kinds)
            except Exception:
                logger.error("worker loop error", exc_info=True, extra={"event": "worker.error"})
                job = None
            if job is None:
                self._idle(seen, poll)
                continue
            run_job(job, self.ctx)
            self._nudge()  # a route, analyze or priors job queues others
