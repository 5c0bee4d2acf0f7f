"""Storage Commitment Push Model SCU (PS3.4 Annex J): ask the PACS to commit what it acknowledged.

A C-STORE success says the PACS received an object, not that it kept it (Orthanc 1.10 answers
0x0000 for an instance its ReceivedInstanceFilter discards). For a target with
``storage_commitment = true`` the export, after its C-STOREs, sends N-ACTION (Action Type 1,
a new Transaction UID, the ReferencedSOPSequence of the instances sent) on the same association.
The request is recorded in the index *before* it is sent; the N-EVENT-REPORT (event type 1: all
committed, 2: failures in FailedSOPSequence) is accepted on that association or on a new one the
PACS opens to the node's SCP, and either way lands in the same row (``handle_event_report``).
The export job is done only once that row says COMMITTED; a failure or a missing report within
``commitment_timeout_s`` is a CommitmentFailed, retried like any export failure.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.sop_class import StorageCommitmentPushModel, StorageCommitmentPushModelInstance

from dicom_node.config import ExportTarget
from dicom_node.errors import (
    AwaitingCommitment,
    CommitmentFailed,
    ExportError,
    PermanentExportError,
    dimse_status_is_transient,
)
from dicom_node.export import send_cstore
from dicom_node.index import Commitment, CommitmentState, Delivery, Index
from dicom_node.spool import uid_key

logger = logging.getLogger(__name__)

PUSH_MODEL = str(StorageCommitmentPushModel)  # 1.2.840.10008.1.20.1
PUSH_MODEL_INSTANCE = str(StorageCommitmentPushModelInstance)  # 1.2.840.10008.1.20.1.1
REQUEST_COMMITMENT = 1  # N-ACTION Action Type ID
ALL_COMMITTED = 1  # N-EVENT-REPORT Event Type IDs
FAILURES_EXIST = 2
#: Failure Reason (0008,1197) values of a commitment report (PS3.4 J.3.2.1.1, C.4.3.1.1).
COMMITMENT_FAILURE_REASONS: dict[int, str] = {
    0x0110: "processing failure",
    0x0112: "no such object instance",
    0x0119: "class / instance conflict",
    0x0122: "referenced SOP class not supported",
    0x0131: "duplicate transaction UID",
    0x0213: "resource limitation",
}
#: N-EVENT-REPORT response statuses (PS3.7 10.1.1.1.8) the node answers with.
EVENT_REPORT_SUCCESS = 0x0000
NO_SUCH_EVENT_TYPE = 0x0113
INVALID_ARGUMENT_VALUE = 0x0115
NO_SUCH_SOP_CLASS = 0x0118
PROCESSING_FAILURE = 0x0110
UNRECOGNISED_OPERATION = 0x0211  # an N-ACTION to us: the node is no commitment SCP
_POLL_S = 0.05
_MAX_LISTED = 5


@dataclass(frozen=True)
class CommitmentReport:
    """An N-EVENT-REPORT's content: what the PACS committed and what it did not (with why)."""

    transaction_uid: str
    event_type: int
    committed: list[tuple[str, str]]  # (SOP Class UID, SOP Instance UID)
    failed: list[tuple[str, str, int | None]]  # (class, instance, Failure Reason)


def build_action(transaction_uid: str, instances: Sequence[tuple[str, str]]) -> Dataset:
    """The N-ACTION Action Information of a commitment request (PS3.4 Table J.3-1)."""
    if not instances:
        raise ValueError("A storage commitment request needs at least one instance.")
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    items = []
    for sop_class, sop_instance in instances:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        items.append(item)
    ds.ReferencedSOPSequence = items
    return ds


def parse_report(event_type: int, info: Dataset) -> CommitmentReport:
    """Read an N-EVENT-REPORT's Event Information (PS3.4 Tables J.3-2, J.3-3); ValueError when it
    is not a commitment report (unknown event type, no Transaction UID, a failure without UIDs)."""
    if event_type not in (ALL_COMMITTED, FAILURES_EXIST):
        raise ValueError(f"Event Type ID {event_type} is not a storage commitment result (1 or 2).")
    transaction_uid = str(info.get("TransactionUID", "") or "")
    if not transaction_uid:
        raise ValueError("The report has no Transaction UID (0008,1195).")
    committed = [
        (str(item.get("ReferencedSOPClassUID", "")), str(item.get("ReferencedSOPInstanceUID", "")))
        for item in info.get("ReferencedSOPSequence", [])
    ]
    failed = [
        (
            str(item.get("ReferencedSOPClassUID", "")),
            str(item.get("ReferencedSOPInstanceUID", "")),
            item.get("FailureReason"),
        )
        for item in info.get("FailedSOPSequence", [])
    ]
    if event_type == FAILURES_EXIST and not failed:
        raise ValueError("Event type 2 (failures exist) without a Failed SOP Sequence (0008,1198).")
    if any(not uid for _, uid in committed) or any(not uid for _, uid, _ in failed):
        raise ValueError("A referenced SOP item has no SOP Instance UID.")
    return CommitmentReport(transaction_uid, event_type, committed, failed)


def judge(asked: Sequence[tuple[str, str]], report: CommitmentReport) -> tuple[CommitmentState, str]:
    """COMMITTED only when every instance asked for is listed as committed; else FAILED, saying
    which instances (by keyed hash, never the UID) and why."""
    committed = {uid for _, uid in report.committed}
    reasons = {uid: reason for _, uid, reason in report.failed}
    problems = []
    for _, uid in asked:
        if uid in reasons:
            problems.append(f"instance {uid_key(uid)}: {describe_reason(reasons[uid])}")
        elif uid not in committed:
            problems.append(f"instance {uid_key(uid)}: not listed in the report")
    if not problems:
        return CommitmentState.COMMITTED, f"{len(asked)} instance(s) committed"
    listed = "; ".join(problems[:_MAX_LISTED])
    if len(problems) > _MAX_LISTED:
        listed += f"; and {len(problems) - _MAX_LISTED} more"
    return CommitmentState.FAILED, f"{len(problems)} of {len(asked)} instance(s) not committed: {listed}"


def describe_reason(reason: int | None) -> str:
    if reason is None:
        return "failed, no Failure Reason"
    return f"Failure Reason 0x{reason:04X} ({COMMITMENT_FAILURE_REASONS.get(reason, 'unknown')})"


def handle_event_report(event: evt.Event, index: Index) -> tuple[int, Dataset | None]:
    """EVT_N_EVENT_REPORT, on the export's association or on one the PACS opens to our SCP:
    record the report against its transaction and answer (0x0000 once it is in the index)."""
    req = event.request
    peer_ae = event.assoc.requestor.ae_title if event.assoc.is_acceptor else event.assoc.acceptor.ae_title
    log: dict[str, Any] = {"event": "commitment.report", "peer_ae": peer_ae, "event_type": req.EventTypeID}
    if str(req.AffectedSOPClassUID) != PUSH_MODEL:
        logger.warning("N-EVENT-REPORT refused", extra={**log, "status": "0x0118"})
        return NO_SUCH_SOP_CLASS, None
    try:
        report = parse_report(int(req.EventTypeID or 0), event.event_information)
    except ValueError as exc:
        known_type = req.EventTypeID in (ALL_COMMITTED, FAILURES_EXIST)
        status = INVALID_ARGUMENT_VALUE if known_type else NO_SUCH_EVENT_TYPE
        logger.warning(
            "N-EVENT-REPORT refused", extra={**log, "status": f"0x{status:04X}", "reason": str(exc)}
        )
        return status, None
    except Exception:  # Event Information that cannot be decoded
        logger.warning("N-EVENT-REPORT refused", extra={**log, "status": "0x0115", "reason": "undecodable"})
        return INVALID_ARGUMENT_VALUE, None
    try:
        request = index.commitment(report.transaction_uid)
        if request is None:
            logger.warning("N-EVENT-REPORT for an unknown transaction", extra={**log, "status": "0x0115"})
            return INVALID_ARGUMENT_VALUE, None
        state, detail = judge(request.instances, report)
        recorded = index.resolve_commitment(report.transaction_uid, state, f"{peer_ae}: {detail}")
    except Exception:  # the index cannot be written: the PACS may send the report again
        logger.error("N-EVENT-REPORT not recorded", exc_info=True, extra={**log, "status": "0x0110"})
        return PROCESSING_FAILURE, None
    logger.info(
        "storage commitment report",
        extra={
            **log,
            "study_key": uid_key(request.study_instance_uid),
            "job_id": request.job_id,
            "state": str(state),
            "late": not recorded,  # after the timeout, or a repeat: answered, not acted on
            "status": "0x0000",
        },
    )
    return EVENT_REPORT_SUCCESS, None


def refuse_action(event: evt.Event) -> tuple[int, None]:
    """EVT_N_ACTION on the SCP: the node asks for commitment, it does not give it (0x0211)."""
    logger.warning(
        "N-ACTION refused",
        extra={
            "event": "commitment.action_refused",
            "peer_ae": event.assoc.requestor.ae_title,
            "status": "0x0211",
        },
    )
    return UNRECOGNISED_OPERATION, None


@dataclass
class CommitmentRequester:
    """The step after the C-STOREs of one export job (``send_cstore``'s ``then``): record the
    request, send N-ACTION, and hold the association up to ``commitment_hold_s`` for the report."""

    index: Index
    job_id: int
    study_instance_uid: str
    target_name: str
    target: ExportTarget
    paths: Sequence[Path]
    transaction_uid: str = ""

    def instances(self) -> list[tuple[str, str]]:
        """(SOP Class UID, SOP Instance UID) of each file, as the N-ACTION names them."""
        pairs = []
        for path in self.paths:
            ds = pydicom.dcmread(
                path, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"]
            )
            pairs.append((str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
        return pairs

    def __call__(self, assoc: Association) -> None:
        where = f"{self.target.ae_title}@{self.target.host}:{self.target.port}"
        if not any(c.abstract_syntax == PUSH_MODEL for c in assoc.accepted_contexts):
            raise PermanentExportError(
                f"{where} did not accept the Storage Commitment Push Model SOP class: enable storage"
                " commitment for our AE title at the PACS, or set storage_commitment = false."
            )
        instances = self.instances()
        now = time.time()
        self.transaction_uid = generate_uid()
        self.index.add_commitment(
            Commitment(
                transaction_uid=self.transaction_uid,
                job_id=self.job_id,
                study_instance_uid=self.study_instance_uid,
                target=self.target_name,
                instances=instances,
                state=CommitmentState.AWAITING,
                detail="",
                requested_time=now,
                deadline_time=now + self.target.commitment_timeout_s,
            )
        )
        try:
            status, _ = assoc.send_n_action(
                build_action(self.transaction_uid, instances),
                REQUEST_COMMITMENT,
                PUSH_MODEL,
                PUSH_MODEL_INSTANCE,
            )
        except Exception as exc:  # the association went away under the request
            self.index.judge_commitment(self.transaction_uid, CommitmentState.FAILED)
            raise ExportError(f"N-ACTION (storage commitment) to {where} failed: {exc}") from exc
        code = getattr(status, "Status", None)
        if code != 0x0000:
            self.index.judge_commitment(self.transaction_uid, CommitmentState.FAILED)
            comment = status.get("ErrorComment", "") if status else "no response"
            detail = f"N-ACTION (storage commitment) to {where} failed: status {_hex(code)} {comment}".strip()
            if code is not None and not dimse_status_is_transient(int(code)):  # as for C-STORE
                raise PermanentExportError(detail)
            raise ExportError(detail)
        deadline = time.monotonic() + self.target.commitment_hold_s
        while time.monotonic() < deadline and assoc.is_established:
            request = self.index.commitment(self.transaction_uid)
            if request is None or request.state is not CommitmentState.AWAITING:
                return
            time.sleep(_POLL_S)


def _hex(code: object) -> str:
    return f"0x{code:04X}" if isinstance(code, int) else repr(code)


def outcome(index: Index, request: Commitment, where: str, now: float | None = None) -> None:
    """Act on an open commitment request: return when committed; raise CommitmentFailed
    (failures, or no report by the deadline) or AwaitingCommitment (not yet)."""
    now = time.time() if now is None else now
    if request.state is CommitmentState.COMMITTED:
        index.judge_commitment(request.transaction_uid)
        return
    if request.state is not CommitmentState.AWAITING:
        index.judge_commitment(request.transaction_uid)
        raise CommitmentFailed(f"{where} did not commit the object: {request.detail}")
    if now >= request.deadline_time:
        index.judge_commitment(request.transaction_uid, CommitmentState.TIMED_OUT)
        waited = request.deadline_time - request.requested_time
        raise CommitmentFailed(
            f"no storage commitment report (N-EVENT-REPORT) from {where} within {waited:g} s of the"
            " N-ACTION; check that the PACS knows our AE title, host and port, and that"
            " scp.allowed_calling_aets lets it associate"
        )
    raise AwaitingCommitment(
        f"sent to {where}, awaiting its storage commitment report", request.deadline_time
    )


def export_committed(
    index: Index,
    job_id: int,
    study_instance_uid: str,
    target_name: str,
    target: ExportTarget,
    paths: Sequence[Path],
    calling_ae: str,
) -> None:
    """An export job to a target with storage_commitment: send and ask for commitment, unless a
    request of this job is still open (a restart, or the job woken by the report): then judge it.
    Records the job's Delivery; raises as ``outcome`` does."""
    where = f"{target.ae_title}@{target.host}:{target.port}"
    if index.open_commitment(job_id) is None:
        requester = CommitmentRequester(index, job_id, study_instance_uid, target_name, target, paths)
        handlers = [(evt.EVT_N_EVENT_REPORT, handle_event_report, [index])]
        send_cstore(paths, target, calling_ae, then=requester, contexts=[PUSH_MODEL], handlers=handlers)
    request = index.open_commitment(job_id)
    if request is None:  # cannot happen: the requester records it before the N-ACTION
        raise ExportError(f"The storage commitment request to {where} was not recorded.")
    try:
        outcome(index, request, where)
    except CommitmentFailed:
        index.set_delivery(job_id, Delivery.COMMITMENT_FAILED)
        raise
    index.set_delivery(job_id, Delivery.COMMITTED)
