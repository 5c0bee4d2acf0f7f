"""The study state machine operators see, and the answer to "why was study X not (fully) processed?".

The index stores the facts: the study row (RECEIVING / COMPLETE / UNROUTED and why), its jobs
(state, attempts, last error, times the node stopped while they ran) and its history
(``study_events``). The state shown is derived from them here, so it can never disagree with the
jobs that drive the work:

RECEIVING -> COMPLETE -> QUEUED -> ANALYSING -> EXPORTING -> DELIVERED, or UNROUTED (no rule
matched), PARTIALLY_FAILED (some series or objects failed, others delivered), FAILED (nothing
delivered), DEAD_LETTER (results exist but the destination refused them; ``radbridge retry``).

An export to a Storage Commitment target stays EXPORTING ("sent, awaiting commitment") until the
PACS's report says every instance is committed; each export's delivery is listed under
``deliveries``.

Texts name series by number and modality and objects by kind, never by patient data.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dicom_node.index import Delivery, Index, Job, JobKind, JobState, StudyState
from dicom_node.spool import uid_key


class StudyStatus(enum.StrEnum):
    RECEIVING = "RECEIVING"
    COMPLETE = "COMPLETE"
    UNROUTED = "UNROUTED"
    QUEUED = "QUEUED"
    ANALYSING = "ANALYSING"
    EXPORTING = "EXPORTING"
    DELIVERED = "DELIVERED"
    PARTIALLY_FAILED = "PARTIALLY_FAILED"
    FAILED = "FAILED"
    DEAD_LETTER = "DEAD_LETTER"


_ACTIVE = (JobState.PENDING, JobState.RUNNING)
_BAD = (JobState.FAILED, JobState.DEAD_LETTER)


def series_labels(index: Index, study_uid: str) -> dict[str, str]:
    """Series UID -> "series 3 (CT)" from the indexed attributes of one of its instances."""
    labels = {}
    for s in index.search_series(study_uid):
        number = _attribute(s.attributes, "SeriesNumber", "00200011")
        modality = _attribute(s.attributes, "Modality", "00080060")
        labels[s.series_instance_uid] = f"series {number} ({modality})"
    return labels


def _attribute(attributes: dict[str, Any], keyword: str, tag: str) -> str:
    """An indexed attribute's first value, or "?": ingest keeps DICOM JSON (by tag), older rows
    and tests a plain keyword -> value map."""
    if keyword in attributes:
        return str(attributes[keyword] or "?")
    values = (attributes.get(tag) or {}).get("Value") or []
    return str(values[0]) if values and values[0] not in (None, "") else "?"


def job_label(job: Job, labels: dict[str, str] | None = None) -> str:
    """What the job works on, in words: "analysis of series 3 (CT) with rule 'ct'"."""
    if job.kind is JobKind.ANALYZE:
        series = job.payload.get("series_instance_uid", "")
        name = (labels or {}).get(series) or f"series {uid_key(series)}"
        return f"analysis of {name} with rule '{job.payload.get('rule', '?')}'"
    if job.kind is JobKind.EXPORT:
        kind = Path(job.payload.get("path", "?")).name.split("-", 1)[0]
        return f"export of the {kind} to '{job.payload.get('target', '?')}'"
    if job.kind is JobKind.PRIORS:
        source, rule = job.payload.get("source", "?"), job.payload.get("rule", "?")
        return f"prior fetch from '{source}' for rule '{rule}'"
    return "routing"


def derive(
    study: dict[str, Any], jobs: Sequence[Job], labels: dict[str, str] | None = None
) -> tuple[StudyStatus, list[str]]:
    """(status, reasons): the reasons say why the study is not (yet, fully) delivered."""
    if study["state"] == StudyState.RECEIVING:
        return StudyStatus.RECEIVING, []
    if study["state"] == StudyState.UNROUTED:
        return StudyStatus.UNROUTED, [study["reason"] or "no routing rule matched"]
    reasons = [
        f"{job_label(j, labels)}: {j.last_error or str(j.state).lower()}" for j in jobs if j.state in _BAD
    ]
    retrying = [
        f"{job_label(j, labels)}: {j.delivery} ({j.last_error})"
        if j.delivery is Delivery.AWAITING_COMMITMENT
        else f"{job_label(j, labels)} will be retried (attempt {j.attempts}): {j.last_error}"
        for j in jobs
        if j.state is JobState.PENDING and j.last_error
    ]
    by_kind = {kind: [j for j in jobs if j.kind is kind] for kind in JobKind}
    if any(j.state in _ACTIVE for j in by_kind[JobKind.ROUTE]):
        return StudyStatus.COMPLETE, reasons + retrying
    analyses = by_kind[JobKind.ANALYZE]
    if any(j.state is JobState.RUNNING for j in analyses):
        return StudyStatus.ANALYSING, reasons + retrying
    if any(j.state is JobState.PENDING for j in analyses):
        return StudyStatus.QUEUED, reasons + retrying
    if any(j.state in _ACTIVE for j in by_kind[JobKind.EXPORT]):
        return StudyStatus.EXPORTING, reasons + retrying
    # A failed prior fetch is listed among the reasons but is not a failure of this study's results.
    bad = [j for j in jobs if j.state in _BAD and j.kind is not JobKind.PRIORS]
    if not bad:
        if not analyses and any(j.state is JobState.SUCCEEDED for j in by_kind[JobKind.ROUTE]):
            return StudyStatus.UNROUTED, [study["reason"] or "no routing rule matched"]
        return StudyStatus.DELIVERED, reasons
    if all(j.kind is JobKind.EXPORT and j.state is JobState.DEAD_LETTER for j in bad):
        return StudyStatus.DEAD_LETTER, reasons
    delivered = any(j.state is JobState.SUCCEEDED for j in analyses)
    return (StudyStatus.PARTIALLY_FAILED if delivered else StudyStatus.FAILED), reasons


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def describe(index: Index, study: dict[str, Any], history: bool = False) -> dict[str, Any]:
    """One study as ``radbridge status`` shows it (JSON-ready)."""
    uid = study["study_instance_uid"]
    jobs = index.jobs(uid)
    labels = series_labels(index, uid)
    status, reasons = derive(study, jobs, labels)
    doc: dict[str, Any] = {
        "study_key": uid_key(uid),
        "status": str(status),
        "reasons": reasons,
        "last_received": _iso(study["last_received_time"]),
        "updated": _iso(max([study["updated_time"], *(j.updated_time for j in jobs)])),
        "jobs": {str(state).lower(): sum(j.state is state for j in jobs) for state in JobState if jobs},
    }
    exports = [j for j in jobs if j.kind is JobKind.EXPORT]
    if exports:
        # What each destination acknowledged: "sent", "sent, awaiting commitment", "committed",
        # "commitment failed: <why>" (Storage Commitment targets), "" while not sent.
        doc["deliveries"] = [
            {
                "what": job_label(j, labels),
                "delivery": f"{j.delivery}: {j.last_error}"
                if j.delivery is Delivery.COMMITMENT_FAILED and j.last_error
                else str(j.delivery) or "not sent",
            }
            for j in exports
        ]
    if history:
        doc["history"] = [
            {"time": _iso(e["time"]), "event": e["event"], "detail": e["detail"]} for e in index.events(uid)
        ]
    return doc


def find_studies(index: Index, wanted: str) -> Iterable[dict[str, Any]]:
    """Studies whose UID or key starts with ``wanted`` (all when empty)."""
    for study in index.studies():
        uid = study["study_instance_uid"]
        if not wanted or uid.startswith(wanted) or uid_key(uid).startswith(wanted):
            yield study
