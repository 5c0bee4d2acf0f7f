"""Study Root Query/Retrieve FIND and MOVE SCP over the spool (PS3.4 C.4.1, C.4.2).

A PACS or a workstation finds what the node holds (the studies it received and
the SEG/SR series it wrote) and moves it to itself. Matching is QIDO-RS's
(dicom_node.dicomweb: study_matches, series_matches, instance_matches over the
searchable attributes in the index), so C-FIND and QIDO-RS answer alike and no
file is opened to answer a query. C-MOVE sends only to AE titles listed in
scp.move_destinations (anything else: 0xA801); each sub-operation is one
C-STORE of the instance as spooled, on one association to the destination.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context, evt
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification

from dicom_node.attributes import TAGS
from dicom_node.dicomweb import instance_matches, series_matches, study_matches
from dicom_node.index import Index, StoredInstance

logger = logging.getLogger(__name__)

LEVELS = ("STUDY", "SERIES", "IMAGE")
#: Unique keys of each level and the levels above it (PS3.4 C.6.2.1): always in a response.
UNIQUE_KEYS = {
    "STUDY": ("StudyInstanceUID",),
    "SERIES": ("StudyInstanceUID", "SeriesInstanceUID"),
    "IMAGE": ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"),
}
PENDING = 0xFF00
CANCELLED = 0xFE00
IDENTIFIER_DOES_NOT_MATCH = 0xA900  # Identifier does not match SOP Class
UNABLE_TO_PROCESS = 0xC000
_SKIPPED = {0x00080005, 0x00080052}  # SpecificCharacterSet, QueryRetrieveLevel: not match keys
_SOP_CLASS = TAGS["SOPClassUID"]


class QueryRefused(Exception):
    """The identifier cannot be answered; ``status`` and the sentence go back as the response."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status


def _failure(status: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment[:64]  # LO
    return ds


def _terms(identifier: Dataset) -> dict[str, str]:
    """The identifier's matching keys as QIDO-RS terms (8-hex tag -> value); universal matches
    (empty, "*") are return keys only."""
    terms: dict[str, str] = {}
    for element in identifier:
        if element.tag in _SKIPPED or element.VR == "SQ" or element.value in (None, "", b""):
            continue
        value = element.value
        text = "\\".join(str(v) for v in value) if isinstance(value, MultiValue) else str(value)
        if text.strip() and text.strip() != "*":
            terms[f"{element.tag:08X}"] = text.strip()
    return terms


def _level(identifier: Dataset) -> str:
    level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    if level not in LEVELS:
        raise QueryRefused(IDENTIFIER_DOES_NOT_MATCH, "QueryRetrieveLevel must be STUDY, SERIES or IMAGE")
    return level


def _uids(terms: dict[str, str], keyword: str) -> list[str] | None:
    value = terms.get(TAGS[keyword])
    return [u.strip() for u in value.replace(",", "\\").split("\\") if u.strip()] if value else None


def _studies(index: Index, terms: dict[str, str]) -> list[str]:
    return _uids(terms, "StudyInstanceUID") or [s.study_instance_uid for s in index.search_studies()]


def matching_docs(index: Index, identifier: Dataset) -> tuple[str, list[dict[str, Any]]]:
    """The level and the DICOM JSON of every match. Above the query level only the unique keys
    narrow the search (a study UID list); other keys are matched on each record."""
    level = _level(identifier)
    terms = _terms(identifier)
    if level == "STUDY":
        return level, study_matches(index, terms)
    if level == "SERIES":
        return level, [doc for uid in _studies(index, terms) for doc in series_matches(index, uid, terms)]
    return level, [doc for _, doc in _instances(index, terms)]


def _instances(index: Index, terms: dict[str, str]) -> list[tuple[StoredInstance, dict[str, Any]]]:
    return [pair for uid in _studies(index, terms) for pair in instance_matches(index, uid, None, terms)]


def _response(identifier: Dataset, doc: dict[str, Any], level: str, ae_title: str) -> Dataset:
    """The identifier's keys, filled from the match (absent ones empty), plus the unique keys."""
    found = Dataset.from_json({k: v for k, v in doc.items() if v.get("Value")})
    out = Dataset()
    if "SpecificCharacterSet" in found:
        out.SpecificCharacterSet = found.SpecificCharacterSet
    out.QueryRetrieveLevel = level
    for element in identifier:
        if element.tag in _SKIPPED:
            continue
        if element.tag in found:
            out.add(found[element.tag])
        elif element.keyword == "RetrieveAETitle":
            out.RetrieveAETitle = ae_title
        else:
            out.add(DataElement(element.tag, element.VR, None))
    for keyword in UNIQUE_KEYS[level]:
        if keyword in found and keyword not in out:
            out.add(found[keyword])
    return out


def handle_find(
    event: evt.Event, index: Index, ae_title: str
) -> Iterator[tuple[int | Dataset, Dataset | None]]:
    """C-FIND: one Pending response per match, then Success (pynetdicom adds it)."""
    started = time.monotonic()
    identifier = event.identifier
    try:
        level, docs = matching_docs(index, identifier)
    except QueryRefused as exc:
        _log("cfind", event, status=exc.status, reason=str(exc))
        yield _failure(exc.status, str(exc)), None
        return
    except Exception:
        logger.error("C-FIND failed", exc_info=True, extra={"event": "cfind"})
        yield _failure(UNABLE_TO_PROCESS, "Unable to process the query"), None
        return
    for doc in docs:
        if event.is_cancelled:
            yield CANCELLED, None
            return
        yield PENDING, _response(identifier, doc, level, ae_title)
    _log(
        "cfind", event, level=level, matches=len(docs), duration_ms=round(1000 * (time.monotonic() - started))
    )


def _contexts(instances: list[StoredInstance]) -> list[PresentationContext]:
    """One context per SOP class: the stored transfer syntaxes and both uncompressed little
    endian ones (as dicom_node.export proposes them)."""
    syntaxes: dict[str, set[str]] = {}
    for inst in instances:
        values = (inst.attributes.get(_SOP_CLASS) or {}).get("Value") or []
        sop_class = str(values[0]) if values else str(dcmread(inst.path, stop_before_pixels=True).SOPClassUID)
        syntaxes.setdefault(sop_class, {ExplicitVRLittleEndian, ImplicitVRLittleEndian}).add(
            inst.transfer_syntax_uid
        )
    return [build_context(c, sorted(ts)) for c, ts in sorted(syntaxes.items())]


def _to_move(index: Index, identifier: Dataset) -> list[StoredInstance]:
    """The instances a C-MOVE identifier names: unique keys down to its level (PS3.4 C.4.2.2.1)."""
    level = _level(identifier)
    terms = _terms(identifier)
    wanted = {TAGS[k]: terms[TAGS[k]] for k in UNIQUE_KEYS[level] if TAGS[k] in terms}
    if TAGS[UNIQUE_KEYS[level][-1]] not in wanted:
        raise QueryRefused(
            IDENTIFIER_DOES_NOT_MATCH, f"C-MOVE at {level} level needs {UNIQUE_KEYS[level][-1]}"
        )
    return [inst for inst, _ in _instances(index, wanted)]


def handle_move(event: evt.Event, index: Index, destinations: dict[str, tuple[str, int]]) -> Iterator[Any]:
    """C-MOVE: the destination (None = unknown: 0xA801), the number of sub-operations, then one
    Pending (status, dataset) per instance to send; pynetdicom counts and answers the rest."""
    aet = str(event.move_destination or "").strip()
    destination = destinations.get(aet)
    if destination is None:
        _log("cmove", event, status=0xA801, reason="move destination not in scp.move_destinations")
        yield None, None
        return
    refused: QueryRefused | None = None
    try:
        instances = _to_move(index, event.identifier)
    except QueryRefused as exc:
        refused, instances = exc, []
    if refused is not None:
        yield (*destination, {"contexts": [build_context(Verification)]})
        yield 1
        yield _failure(refused.status, str(refused)), None
        _log("cmove", event, status=refused.status, reason=str(refused))
        return
    yield (*destination, {"contexts": _contexts(instances)} if instances else {})
    yield len(instances)
    started = time.monotonic()
    for inst in instances:
        if event.is_cancelled:
            yield CANCELLED, None
            return
        yield PENDING, dcmread(inst.path)
    _log(
        "cmove",
        event,
        destination=aet,
        instances=len(instances),
        duration_ms=round(1000 * (time.monotonic() - started)),
    )


def _log(kind: str, event: evt.Event, **details: Any) -> None:
    """One line per request: the peer, the outcome; never an identifier's values."""
    status = details.pop("status", None)
    extra = {"event": kind, "peer_ae": event.assoc.requestor.ae_title, **details}
    if status is not None:
        logger.warning(f"{kind.upper()} refused", extra={**extra, "status": f"0x{status:04X}"})
    else:
        logger.info(f"{kind.upper()} answered", extra=extra)
