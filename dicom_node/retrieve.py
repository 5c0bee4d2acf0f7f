"""Pull a study from a PACS into the spool, so it is analysed like a pushed one.

A "dicom" source is asked with C-FIND (Study Root, STUDY level) to resolve a
StudyInstanceUID or an AccessionNumber to exactly one study, then retrieved by
C-MOVE to the node's own AE title (the PACS must know that AE with the node's
host and port; the node's running SCP receives the C-STOREs into the spool) or
by C-GET (the C-STOREs come back on the same association and are spooled by
this process with the SCP's own handler: no running node and no entry at the
PACS needed, but only the storage SOP classes proposed, uncompressed). A
"dicomweb" source is asked with QIDO-RS and read with WADO-RS; the multipart
response is spooled part by part by the STOW-RS receiver (same checks, same
fsync-then-index). When every instance is in, the study is completed at once
(no quiet window) and its route job queued for the node's worker. The same
pull is `POST /pull` on the node's HTTP front (pull_request).

Errors are PullError with what the PACS said (DIMSE status and Error Comment,
or HTTP status and body) or why it could not be reached.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import anyio
import requests
from pydicom.dataset import Dataset
from pynetdicom import AE, StoragePresentationContexts, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (
    SegmentationStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from python_multipart.exceptions import MultipartParseError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from dicom_node.attributes import check_uid
from dicom_node.auth import read_bearer_token
from dicom_node.config import HttpSection, NodeSettings, PullSource
from dicom_node.errors import InvalidInstance, PullError, StowRequestError, StudyNotFound
from dicom_node.export import association_rejection, requests_tls, safe_location, tls_args
from dicom_node.index import Index
from dicom_node.scp import configure_pynetdicom, handle_store
from dicom_node.spool import Spool, uid_key
from dicom_node.stow import StowReceiver, multipart_boundary
from radbridge_common.settings import ConfigError

logger = logging.getLogger(__name__)
#: (instances received so far, instances expected or None when the PACS did not say)
Progress = Callable[[int, int | None], None]
PENDING = (0xFF00, 0xFF01)
SUCCESS = 0x0000
SUBOPERATIONS_FAILED = 0xB000  # warning: some sub-operations failed or had warnings
MOVE_DESTINATION_UNKNOWN = 0xA801
WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class FoundStudy:
    study_instance_uid: str
    instances: int | None  # NumberOfStudyRelatedInstances, when the PACS returns it


@dataclass
class PullOutcome:
    study_instance_uid: str
    expected: int | None
    received: int = 0
    failed: int = 0
    warnings: int = 0
    #: Instances of the study the index holds after the pull (what the node will analyse).
    indexed: int = 0

    @property
    def study_key(self) -> str:
        return uid_key(self.study_instance_uid)


def _quiet(_: int, __: int | None) -> None:
    return None


def pull_study(
    source: PullSource,
    spool: Spool,
    index: Index,
    ae_title: str,
    *,
    study_uid: str = "",
    accession: str = "",
    progress: Progress | None = None,
    complete: bool = True,
) -> PullOutcome:
    """Resolve the study at ``source``, retrieve it into ``spool``/``index``, and (``complete``)
    queue its analysis. ``ae_title`` is the node's (scp.ae_title): our calling AE title and the
    default C-MOVE destination."""
    if bool(study_uid) == bool(accession):
        raise PullError("Name the study by its StudyInstanceUID or by its AccessionNumber (one of them).")
    if study_uid:
        try:
            check_uid(study_uid, "the StudyInstanceUID")
        except InvalidInstance as exc:
            raise PullError(str(exc)) from exc
    progress = progress or _quiet
    if source.type == "dicomweb":
        outcome = _pull_dicomweb(source, spool, index, study_uid, accession, progress)
    else:
        found = find_study(source, ae_title, study_uid=study_uid, accession=accession)
        if source.retrieve == "get":
            outcome = _get(source, ae_title, found, spool, index, progress)
        else:
            outcome = _move(source, ae_title, found, progress)
    outcome.indexed = len(index.study_instances(outcome.study_instance_uid))
    logger.info(
        "study pulled",
        extra={
            "event": "pull",
            "source": _source_where(source),
            "study_key": outcome.study_key,
            "expected": outcome.expected,
            "received": outcome.received,
            "failed": outcome.failed,
            "indexed": outcome.indexed,
        },
    )
    if complete and outcome.indexed and not outcome.failed:
        index.add_event(
            outcome.study_instance_uid, "pulled", f"{outcome.received} instance(s) from {source.type}"
        )
        index.complete_study(outcome.study_instance_uid, 0.0)
    return outcome


def _source_where(source: PullSource) -> str:
    return (
        safe_location(source.url) if source.type == "dicomweb" else f"{source.ae_title}@{source.host}:{source.port}"
    )


# -- DIMSE -----------------------------------------------------------------------------
def _associate(
    source: PullSource,
    ae_title: str,
    contexts: list[Any],
    roles: list[Any] | None = None,
    handlers: list[Any] | None = None,
) -> Association:
    configure_pynetdicom()  # no identifiers in pynetdicom's logs
    ae = AE(ae_title=source.calling_ae_title or ae_title)
    ae.acse_timeout = ae.network_timeout = min(source.timeout_s, 60.0)
    ae.dimse_timeout = source.timeout_s
    for context in contexts:
        ae.add_requested_context(context)
    where = _source_where(source)
    try:
        assoc = ae.associate(
            source.host,
            source.port,
            ae_title=source.ae_title,
            tls_args=tls_args(source),
            ext_neg=roles,
            evt_handlers=handlers,
        )
    except Exception as exc:
        raise PullError(f"Cannot connect to {where}: {exc}") from exc
    if assoc.is_rejected:
        raise PullError(str(association_rejection(assoc, where)))
    if not assoc.is_established:
        raise PullError(f"{where} is unreachable or did not accept the association (no answer or aborted).")
    return assoc


def _status_text(status: Dataset) -> str:
    code = int(status.Status)
    comment = str(status.get("ErrorComment", "") or "").strip()
    return f"status 0x{code:04X}" + (f" ({comment})" if comment else "")


def find_study(source: PullSource, ae_title: str, *, study_uid: str = "", accession: str = "") -> FoundStudy:
    """C-FIND at STUDY level: exactly one study, or StudyNotFound / PullError."""
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    query.AccessionNumber = accession
    query.NumberOfStudyRelatedInstances = None
    assoc = _associate(source, ae_title, [StudyRootQueryRetrieveInformationModelFind])
    found: list[FoundStudy] = []
    try:
        for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            if not status:
                raise PullError(
                    f"{_source_where(source)} did not answer the C-FIND (timeout or abort). A PACS that"
                    f" does not know our calling AE title {source.calling_ae_title or ae_title!r} may"
                    " refuse it so: register it there (Orthanc: DicomModalities)."
                )
            if status.Status in PENDING and identifier is not None:
                count = identifier.get("NumberOfStudyRelatedInstances")
                found.append(
                    FoundStudy(str(identifier.get("StudyInstanceUID", "")), int(count) if count else None)
                )
            elif status.Status != SUCCESS:
                raise PullError(f"{_source_where(source)} refused the C-FIND: {_status_text(status)}.")
    finally:
        if assoc.is_established:
            assoc.release()
    what = f"StudyInstanceUID {study_uid}" if study_uid else f"AccessionNumber {accession}"
    found = [f for f in found if f.study_instance_uid]
    if not found:
        raise StudyNotFound(f"{_source_where(source)} has no study with {what}.")
    if len({f.study_instance_uid for f in found}) > 1:
        raise PullError(
            f"{what} matches {len(found)} studies at {_source_where(source)}; pull one by its StudyInstanceUID."
        )
    return found[0]


def _retrieve_identifier(study_uid: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = study_uid
    return ds


def _follow(
    responses: Iterator[tuple[Dataset, Dataset | None]],
    source: PullSource,
    found: FoundStudy,
    progress: Progress,
    verb: str,
    hint: Callable[[Dataset], str],
) -> PullOutcome:
    """Read C-MOVE/C-GET responses: progress from the pending ones' sub-operation counts; a
    failure status (with its Error Comment) is a PullError, with ``hint`` for what to check."""
    outcome = PullOutcome(found.study_instance_uid, found.instances)
    where = _source_where(source)
    for status, _ in responses:
        if not status:
            raise PullError(f"{where} did not answer the {verb} (timeout or abort).")
        code = int(status.Status)
        completed = int(status.get("NumberOfCompletedSuboperations") or 0)
        outcome.failed = int(status.get("NumberOfFailedSuboperations") or 0)
        outcome.warnings = int(status.get("NumberOfWarningSuboperations") or 0)
        outcome.received = completed + outcome.warnings
        if code in PENDING:
            remaining = status.get("NumberOfRemainingSuboperations")
            if remaining is not None:
                outcome.expected = outcome.received + outcome.failed + int(remaining)
            progress(outcome.received, outcome.expected)
            continue
        if code in (SUCCESS, SUBOPERATIONS_FAILED):
            if outcome.expected is None or code == SUCCESS:
                outcome.expected = outcome.received + outcome.failed
            progress(outcome.received, outcome.expected)
            return outcome
        raise PullError(f"{where} refused the {verb}: {_status_text(status)}.{hint(status)}")
    raise PullError(f"{where} ended the {verb} without a final status.")


def _move(source: PullSource, ae_title: str, found: FoundStudy, progress: Progress) -> PullOutcome:
    destination = source.move_destination or ae_title

    def hint(status: Dataset) -> str:
        # Orthanc answers 0xC000 for a destination it does not know; others 0xA801 (PS3.4 C.4.2.1.5).
        unknown = (
            " (0xA801: the destination is unknown there)"
            if int(status.Status) == MOVE_DESTINATION_UNKNOWN
            else ""
        )
        return (
            f" The PACS must know move destination {destination!r}{unknown} with this node's host and"
            " DICOM port (Orthanc: DicomModalities), and reach it there (`radbridge serve` running)."
        )

    assoc = _associate(source, ae_title, [StudyRootQueryRetrieveInformationModelMove])
    try:
        responses = assoc.send_c_move(
            _retrieve_identifier(found.study_instance_uid),
            destination,
            StudyRootQueryRetrieveInformationModelMove,
        )
        return _follow(responses, source, found, progress, "C-MOVE", hint)
    finally:
        if assoc.is_established:
            assoc.release()


def get_contexts() -> list[Any]:
    """C-GET's storage contexts (uncompressed transfer syntaxes): pynetdicom's 120 common storage
    SOP classes with Segmentation Storage in place of the last, plus the C-GET context (< 128)."""
    classes = [c.abstract_syntax for c in StoragePresentationContexts]
    if SegmentationStorage not in classes:
        classes[-1] = SegmentationStorage
    return classes


def _get(
    source: PullSource, ae_title: str, found: FoundStudy, spool: Spool, index: Index, progress: Progress
) -> PullOutcome:
    classes = get_contexts()
    roles = [build_role(c, scp_role=True) for c in classes]
    handlers = [(evt.EVT_C_STORE, handle_store, [spool, index])]
    assoc = _associate(
        source, ae_title, [StudyRootQueryRetrieveInformationModelGet, *classes], roles, handlers
    )

    def hint(status: Dataset) -> str:
        return ""

    try:
        responses = assoc.send_c_get(
            _retrieve_identifier(found.study_instance_uid), StudyRootQueryRetrieveInformationModelGet
        )
        return _follow(responses, source, found, progress, "C-GET", hint)
    finally:
        if assoc.is_established:
            assoc.release()


# -- DICOMweb --------------------------------------------------------------------------
def _session(source: PullSource) -> requests.Session:
    session = requests.Session()
    if source.uses_tls:
        session.verify, session.cert = requests_tls(source)
    try:
        token = read_bearer_token(source.token_file, source.token_env, f"pull source {safe_location(source.url)}")
    except ConfigError as exc:
        raise PullError(str(exc)) from exc
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    return session


def _http_error(what: str, response: requests.Response) -> PullError:
    body = response.text.strip().replace("\n", " ")[:300]
    return PullError(
        f"{what} answered HTTP {response.status_code} {response.reason or ''}".rstrip()
        + (f": {body}" if body else "")
    )


def _qido(session: requests.Session, source: PullSource, study_uid: str, accession: str) -> FoundStudy:
    where = safe_location(source.url)
    params = {"StudyInstanceUID": study_uid} if study_uid else {"AccessionNumber": accession}
    params["includefield"] = "00201208"  # NumberOfStudyRelatedInstances
    url = source.url.rstrip("/") + "/studies"
    try:
        response = session.get(
            url, params=params, headers={"Accept": "application/dicom+json"}, timeout=source.timeout_s
        )
    except requests.RequestException as exc:
        raise PullError(f"Cannot reach QIDO-RS at {where}: {type(exc).__name__}.") from exc
    if response.status_code not in (200, 204):
        raise _http_error(f"QIDO-RS at {where}", response)
    try:
        docs = response.json() if response.status_code == 200 and response.content else []
    except ValueError as exc:
        raise PullError(f"QIDO-RS at {where} did not answer DICOM JSON.") from exc
    what = f"StudyInstanceUID {study_uid}" if study_uid else f"AccessionNumber {accession}"
    uids = {str(d.get("0020000D", {}).get("Value", [""])[0]) for d in docs} - {""}
    if not uids:
        raise StudyNotFound(f"{where} has no study with {what}.")
    if len(uids) > 1:
        raise PullError(f"{what} matches {len(uids)} studies at {where}; pull one by its StudyInstanceUID.")
    uid = uids.pop()
    counts = [d.get("00201208", {}).get("Value", [None])[0] for d in docs]
    return FoundStudy(uid, int(counts[0]) if counts and counts[0] is not None else None)


def _pull_dicomweb(
    source: PullSource, spool: Spool, index: Index, study_uid: str, accession: str, progress: Progress
) -> PullOutcome:
    where = safe_location(source.url)
    with _session(source) as session:
        found = _qido(session, source, study_uid, accession)
        outcome = PullOutcome(found.study_instance_uid, found.instances)
        receiver = StowReceiver(spool, index, HttpSection(), study=found.study_instance_uid)
        url = f"{source.url.rstrip('/')}/studies/{found.study_instance_uid}"
        try:
            with session.get(
                url, headers={"Accept": WADO_ACCEPT}, stream=True, timeout=source.timeout_s
            ) as response:
                if response.status_code != 200:
                    raise _http_error(f"WADO-RS at {where}", response)
                parser = receiver.parser(multipart_boundary(response.headers.get("Content-Type", "")))
                for chunk in response.iter_content(_CHUNK):
                    parser.write(chunk)
                    receiver.commit_finished()
                    if len(receiver.outcome.stored) != outcome.received:
                        outcome.received = len(receiver.outcome.stored)
                        progress(outcome.received, outcome.expected)
                parser.finalize()
                receiver.commit_finished()
        except requests.RequestException as exc:
            receiver.discard_open_part()
            raise PullError(f"WADO-RS from {where} failed: {type(exc).__name__}.") from exc
        except (StowRequestError, MultipartParseError) as exc:
            receiver.discard_open_part()
            receiver.commit_finished()
            raise PullError(f"WADO-RS from {where} sent an unreadable response: {exc}") from exc
    outcome.received = len(receiver.outcome.stored)
    outcome.failed = len(receiver.outcome.failed)
    if outcome.expected is None:
        outcome.expected = outcome.received + outcome.failed
    progress(outcome.received, outcome.expected)
    return outcome


# -- POST /pull on the node's HTTP front -------------------------------------------------
async def pull_request(request: Request, settings: NodeSettings, spool: Spool, index: Index) -> Response:
    """``POST /pull`` with ``{"source": NAME, "study": UID}`` (or ``"accession"``): the same pull as
    `radbridge pull`, answered when it is over (write scope). 200 with the counts when the whole
    study is in the spool and queued; 400 bad request or unknown source; 404 no such study; 502
    the PACS refused or could not be reached, or the study came incomplete (with the counts)."""
    try:
        body = await request.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return _error(400, 'The body must be JSON: {"source": NAME, "study": UID} or "accession".')
    sources = settings.pull.sources
    name = str(body.get("source") or (next(iter(sources)) if len(sources) == 1 else ""))
    if name not in sources:
        return _error(
            400, f"Unknown pull source {name!r}; configured: {', '.join(sorted(sources)) or 'none'}."
        )
    study, accession = str(body.get("study") or ""), str(body.get("accession") or "")
    if bool(study) == bool(accession):
        return _error(400, 'Name the study by "study" (StudyInstanceUID) or "accession" (one of them).')
    try:
        if study:
            check_uid(study, "study")
    except InvalidInstance as exc:
        return _error(400, str(exc))
    try:
        outcome = await anyio.to_thread.run_sync(
            lambda: pull_study(
                sources[name], spool, index, settings.scp.ae_title, study_uid=study, accession=accession
            )
        )
    except StudyNotFound as exc:
        return _error(404, str(exc))
    except PullError as exc:
        return _error(502, str(exc))
    result = {
        "source": name,
        "study_instance_uid": outcome.study_instance_uid,
        "expected": outcome.expected,
        "received": outcome.received,
        "failed": outcome.failed,
        "indexed": outcome.indexed,
    }
    if outcome.failed or not outcome.indexed:
        return JSONResponse(
            {
                "error": {"code": 502, "message": "The study came incomplete; it is not queued."},
                "result": result,
            },
            status_code=502,
        )
    return JSONResponse(result)


def _error(code: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=code)
