"""Errors of the DICOM node, and their translation to DIMSE statuses (only here).

RadBridgeError
 ├ InvalidInstance       C-STORE 0xC000 (0xC210 when it cannot be decoded); STOW FailureReason alike
 │ └ StudyMismatch       STOW-RS to /studies/{study} with an instance of another study: 0xC409
 ├ SopClassNotSupported  C-STORE 0x0122
 ├ StorageError          C-STORE 0xA700 (write/fsync/rename failed; never 0x0000)
 ├ AuthError             HTTP front (dicom_node.auth): a JSON body {"error", "detail"}
 │ ├ Unauthenticated     401 + WWW-Authenticate: Bearer (no, unknown or expired credentials)
 │ └ Forbidden           403 (the token's scopes do not cover the request)
 ├ VolumeError           job FAILED with the reason (series cannot form a volume)
 ├ InferenceUnavailable  job retried with backoff (service down, deadline)
 ├ InferenceRejected     job FAILED (the service refused the request)
 ├ DeidentificationRefused  job FAILED (a de-identifying route cannot send the series, e.g. burned-in text)
 ├ PullError             `radbridge pull`: the PACS refused or failed (its DIMSE status + Error
 │ │                     Comment, or HTTP status), or cannot be reached; exit 1 with the message
 │ └ StudyNotFound       the PACS has no study with that UID or accession number
 ├ ExportError           job retried with backoff, then DEAD_LETTER
 │ ├ PermanentExportError  not retried: DEAD_LETTER at once (the peer refused for good:
 │ │                       STOW-RS 4xx, FailureReason 0x0122/0x0124/0xA9xx/0xCxxx)
 │ └ CommitmentFailed    Storage Commitment: the PACS reported failures, or no report in time
 └ AwaitingCommitment    not a failure: the export job waits (PENDING) for the N-EVENT-REPORT
"""

from __future__ import annotations

from pydicom.dataset import Dataset


class RadBridgeError(Exception):
    """Base of every error a peer or an operator must see."""

    retryable: bool = False
    #: A dependency is down (not the job's fault): retried with backoff for as long as it lasts,
    #: without using up the job's attempts.
    outage: bool = False


class InvalidInstance(RadBridgeError):
    status = 0xC000


class UndecodableInstance(InvalidInstance):
    status = 0xC210


class StudyMismatch(InvalidInstance):
    """STOW-RS to /studies/{study}: the instance belongs to another study (dcm4chee's 0xC409)."""

    status = 0xC409


class StowRequestError(RadBridgeError):
    """A STOW-RS request as a whole is refused (media type, syntax, size): an HTTP status."""

    def __init__(self, http_status: int, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.retry_after_s = retry_after_s


class AuthError(RadBridgeError):
    """An HTTP request without the right credentials; ``dicom_node.auth`` answers it."""

    http_status = 401
    #: RFC 6750 error code for WWW-Authenticate ("" when the request carried no credentials).
    bearer_error = ""


class Unauthenticated(AuthError):
    http_status = 401


class InvalidCredentials(Unauthenticated):
    bearer_error = "invalid_token"


class Forbidden(AuthError):
    http_status = 403
    bearer_error = "insufficient_scope"


class SopClassNotSupported(RadBridgeError):
    status = 0x0122


class StorageError(RadBridgeError):
    status = 0xA700
    retryable = True


class SpoolFull(StorageError):
    """Free space on the spool's disk is below the watermark: refuse before accepting anything
    (0xA700 for C-STORE, 503 + Retry-After for STOW-RS)."""

    retry_after_s = 60

    def __init__(self, message: str, free_bytes: int = 0, min_free_bytes: int = 0) -> None:
        super().__init__(message)
        self.free_bytes = free_bytes
        self.min_free_bytes = min_free_bytes


class VolumeError(RadBridgeError):
    """The instances of a series cannot form a volume."""


class VolumeTooLarge(VolumeError):
    """The volume would take more memory than the node's budget allows (refused, not retried)."""


class InferenceUnavailable(RadBridgeError):
    retryable = True
    outage = True


class InferenceRejected(RadBridgeError):
    """The inference service refused the request (bad input, unsupported task)."""


class DeidentificationRefused(RadBridgeError):
    """A de-identifying route cannot send this series as it is (pixels with burned-in text, no key)."""


class PullError(RadBridgeError):
    """A study could not be pulled from a PACS (dicom_node.retrieve); the message says why."""


class StudyNotFound(PullError):
    """The PACS answered the query with no matching study."""


class PriorFetchError(PullError):
    """A routing rule's prior fetch failed (PACS refused or unreachable): retried by the job policy."""

    retryable = True


class ExportError(RadBridgeError):
    retryable = True

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        #: How long the destination asked us to wait (its HTTP Retry-After): the export's retry
        #: waits at least this long. Not SpoolFull's retry_after_s, which is what we ask of senders.
        self.retry_after_s = retry_after_s


class PermanentExportError(ExportError):
    """The destination refused the objects in a way a retry cannot change (parked, not retried)."""

    retryable = False


class CommitmentFailed(ExportError):
    """The PACS acknowledged the C-STOREs but did not commit every instance (N-EVENT-REPORT event
    type 2), or sent no report within commitment_timeout_s: retried like any export failure."""


class AwaitingCommitment(RadBridgeError):
    """The objects are sent and the N-ACTION accepted; the job waits for the N-EVENT-REPORT
    until ``until`` (epoch seconds) without using up an attempt."""

    def __init__(self, message: str, until: float) -> None:
        super().__init__(message)
        self.until = until


#: DIMSE status for unexpected errors in a C-STORE handler (processing failure).
PROCESSING_FAILURE = 0x0110


def to_dimse_status(exc: BaseException) -> Dataset:
    """A C-STORE response status dataset with an Error Comment (no PHI; <= 64 chars)."""
    status = Dataset()
    status.Status = getattr(exc, "status", PROCESSING_FAILURE) if isinstance(exc, RadBridgeError) else 0xA700
    comment = str(exc) if isinstance(exc, RadBridgeError) else "Out of resources: could not store"
    status.ErrorComment = comment[:64]
    return status


# -- Codes a STOW-RS destination answers with (export side) -------------------------------
#: FailureReason (0008,1197) values of PS3.18 Table 10.5.3-1 (C-STORE statuses of PS3.4/PS3.7).
FAILURE_REASONS: dict[int, str] = {
    0x0110: "processing failure",
    0x0111: "duplicate SOP instance",
    0x0122: "SOP class not supported",
    0x0124: "refused: not authorised",
    0xA700: "out of resources",
    0xA900: "data set does not match SOP class",
    0xC000: "cannot understand",
    0xC122: "transfer syntax not supported",
}
#: The destination already holds the instance; our output UIDs are deterministic, so it is ours.
DUPLICATE_SOP_INSTANCE = 0x0111
#: HTTP statuses that a retry can change; every other 4xx/5xx is permanent
#: (400 malformed, 401/403 credentials, 404 wrong URL, 413 too large, 415 media type,
#: 501/505 the server cannot do STOW-RS at all).
TRANSIENT_HTTP_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504, 507})


def dimse_status_is_transient(status: int) -> bool:
    """Whether a C-STORE failure status may clear on a later attempt (same rule as STOW-RS)."""
    return failure_reason_is_transient(status)


def failure_reason_is_transient(reason: int) -> bool:
    """Whether a STOW-RS FailureReason may clear on a later attempt.

    0xA7xx (out of resources) and 0x0110 (processing failure) describe the
    destination's state, not the object. 0x0122, 0x0124, 0xA9xx and 0xCxxx
    describe the object or our rights, which a resend does not change. An
    unknown code is retried: the attempts are bounded, so it still ends in
    DEAD_LETTER, but a passing condition is not parked by mistake.
    """
    if reason & 0xFF00 == 0xA700 or reason == 0x0110:
        return True
    return not (reason in (0x0122, 0x0124) or reason & 0xFF00 == 0xA900 or reason & 0xF000 == 0xC000)


def to_stow_failure(exc: BaseException) -> int:
    """The FailureReason (0008,1197) of a STOW-RS instance that could not be stored."""
    if isinstance(exc, RadBridgeError) and hasattr(exc, "status"):
        return int(exc.status)
    return 0xA700 if isinstance(exc, OSError) else PROCESSING_FAILURE
