"""Prior fetching: a routing rule's trigger for Query/Retrieve.

When a rule with ``pull_priors = N`` matches a newly completed study, its route
job queues a PRIORS job (its own lane, so routing and analysis never wait for
the PACS). The job asks the rule's ``priors_from`` source for the patient's
other studies (Study Root C-FIND at STUDY level by PatientID, and
IssuerOfPatientID when the study has one; QIDO-RS for a DICOMweb source), takes
the N most recent by StudyDate/StudyTime (optionally only those sharing a
modality with the current study), skips those already in the spool and pulls
the rest with dicom_node.retrieve, as `radbridge pull` does.

A pulled prior is marked in the index before it is retrieved: it is routed and
analysed like any study, but its own routing fetches no priors (no cascade).
PatientID goes to the PACS in the query only; logs and the study history name
studies by their hashed key.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pydicom
import requests
from pydicom.dataset import Dataset
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from dicom_node.config import NodeSettings, PullSource, RoutingRule
from dicom_node.errors import PriorFetchError, PullError, RadBridgeError, StudyNotFound
from dicom_node.export import safe_location
from dicom_node.index import Index, Job
from dicom_node.retrieve import (
    PENDING,
    SUCCESS,
    _associate,
    _http_error,
    _session,
    _source_where,
    _status_text,
    pull_study,
)
from dicom_node.spool import Spool, uid_key

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PriorStudy:
    study_instance_uid: str
    study_date: str = ""
    study_time: str = ""
    modalities: frozenset[str] = frozenset()

    @property
    def when(self) -> tuple[str, str]:
        """Sort key: most recent first when sorted in reverse; a study without a date sorts last."""
        return self.study_date.strip(), self.study_time.replace(":", "").strip()


@dataclass(frozen=True)
class Patient:
    """Who the current study belongs to, as the query needs it (never logged)."""

    patient_id: str
    issuer: str
    modalities: frozenset[str]


def patient_of(index: Index, study_uid: str) -> Patient | None:
    """The current study's PatientID (+ issuer) from one of its instances; None when it has none."""
    rows = index.study_instances(study_uid)
    if not rows:
        return None
    ds = pydicom.dcmread(
        rows[0].path, stop_before_pixels=True, specific_tags=["PatientID", "IssuerOfPatientID"]
    )
    patient_id = str(ds.get("PatientID", "") or "").strip()
    if not patient_id:
        return None
    issuer = str(ds.get("IssuerOfPatientID", "") or "").strip()
    return Patient(patient_id, issuer, frozenset(r.modality for r in rows if r.modality))


def find_patient_studies(source: PullSource, ae_title: str, patient: Patient) -> list[PriorStudy]:
    """Every study of the patient at ``source`` (C-FIND or QIDO-RS); PriorFetchError on failure."""
    try:
        if source.type == "dicomweb":
            return _qido_patient(source, patient)
        return _find_patient(source, ae_title, patient)
    except PriorFetchError:
        raise
    except PullError as exc:  # cannot connect, association rejected
        raise PriorFetchError(str(exc)) from exc


def _find_patient(source: PullSource, ae_title: str, patient: Patient) -> list[PriorStudy]:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.PatientID = patient.patient_id
    if patient.issuer:
        query.IssuerOfPatientID = patient.issuer
    query.StudyInstanceUID = ""
    query.StudyDate = ""
    query.StudyTime = ""
    query.ModalitiesInStudy = ""
    where = _source_where(source)
    assoc = _associate(source, ae_title, [StudyRootQueryRetrieveInformationModelFind])
    found: list[PriorStudy] = []
    try:
        for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            if not status:
                raise PriorFetchError(f"{where} did not answer the prior C-FIND (timeout or abort).")
            if status.Status in PENDING and identifier is not None:
                modalities = identifier.get("ModalitiesInStudy") or []
                if isinstance(modalities, str):
                    modalities = [modalities]
                found.append(
                    PriorStudy(
                        str(identifier.get("StudyInstanceUID", "") or ""),
                        str(identifier.get("StudyDate", "") or ""),
                        str(identifier.get("StudyTime", "") or ""),
                        frozenset(str(m) for m in modalities if m),
                    )
                )
            elif status.Status != SUCCESS:
                raise PriorFetchError(f"{where} refused the prior C-FIND: {_status_text(status)}.")
    finally:
        if assoc.is_established:
            assoc.release()
    return [f for f in found if f.study_instance_uid]


def _qido_patient(source: PullSource, patient: Patient) -> list[PriorStudy]:
    where = safe_location(source.url)
    params = {"PatientID": patient.patient_id, "includefield": "00080020,00080030,00080061"}
    if patient.issuer:
        params["IssuerOfPatientID"] = patient.issuer
    with _session(source) as session:
        try:
            response = session.get(
                source.url.rstrip("/") + "/studies",
                params=params,
                headers={"Accept": "application/dicom+json"},
                timeout=source.timeout_s,
            )
        except requests.RequestException as exc:
            raise PriorFetchError(f"Cannot reach QIDO-RS at {where}: {type(exc).__name__}.") from exc
    if response.status_code not in (200, 204):
        raise PriorFetchError(str(_http_error(f"QIDO-RS at {where}", response)))
    try:
        docs = response.json() if response.status_code == 200 and response.content else []
    except ValueError as exc:
        raise PriorFetchError(f"QIDO-RS at {where} did not answer DICOM JSON.") from exc

    def first(doc: dict, tag: str) -> str:
        values = (doc.get(tag) or {}).get("Value") or [""]
        return str(values[0] or "")

    return [
        PriorStudy(
            first(d, "0020000D"),
            first(d, "00080020"),
            first(d, "00080030"),
            frozenset(str(m) for m in (d.get("00080061") or {}).get("Value") or [] if m),
        )
        for d in docs
        if first(d, "0020000D")
    ]


def choose_priors(
    studies: list[PriorStudy], current_uid: str, count: int, modalities: frozenset[str] | None
) -> list[PriorStudy]:
    """The ``count`` most recent studies other than the current one (sharing a modality with it
    when ``modalities`` is given)."""
    others = {s.study_instance_uid: s for s in studies if s.study_instance_uid != current_uid}
    candidates = [s for s in others.values() if modalities is None or s.modalities & modalities]
    return sorted(candidates, key=lambda s: s.when, reverse=True)[:count]


def fetch_priors(
    settings: NodeSettings, spool: Spool, index: Index, study_uid: str, rule: RoutingRule
) -> str:
    """Find and pull the rule's priors of ``study_uid``; returns the history line. A prior whose
    pull fails does not stop the others; PriorFetchError afterwards (the job is retried and finds
    the pulled ones in the spool)."""
    source = settings.pull.sources.get(rule.priors_from)
    if source is None:
        raise RadBridgeError(f"Pull source {rule.priors_from!r} no longer exists in the config.")
    patient = patient_of(index, study_uid)
    if patient is None:
        return "the study has no PatientID; no prior asked for"
    studies = find_patient_studies(source, settings.scp.ae_title, patient)
    chosen = choose_priors(
        studies, study_uid, rule.pull_priors, patient.modalities if rule.priors_same_modality else None
    )
    here = [s for s in chosen if index.study_instances(s.study_instance_uid)]
    pulled: list[str] = []
    failed: list[str] = []
    for prior in chosen:
        if prior in here:
            continue
        key = uid_key(prior.study_instance_uid)
        index.mark_prior(prior.study_instance_uid, study_uid)  # before any instance can arrive
        try:
            outcome = pull_study(
                source, spool, index, settings.scp.ae_title, study_uid=prior.study_instance_uid
            )
        except StudyNotFound:
            failed.append(f"{key} (gone from the PACS)")
            continue
        except PullError as exc:
            failed.append(f"{key} ({exc})")
            continue
        if outcome.failed or not outcome.indexed:
            failed.append(f"{key} ({outcome.received} received, {outcome.failed} failed)")
            continue
        pulled.append(key)
        index.add_event(
            prior.study_instance_uid,
            "pulled as prior",
            f"for study key {uid_key(study_uid)}; routed like any study, fetches no priors itself",
        )
    logger.info(
        "priors fetched",
        extra={
            "event": "priors",
            "study_key": uid_key(study_uid),
            "source": rule.priors_from,
            "found": len(studies),
            "chosen": len(chosen),
            "pulled": len(pulled),
            "failed": len(failed),
        },
    )
    other = len({s.study_instance_uid for s in studies} - {study_uid})
    detail = f"{other} found, {len(pulled)} pulled"
    if pulled:
        detail += f" (study key {', '.join(pulled)})"
    if here:
        detail += f", {len(here)} already here"
    detail += f"; rule '{rule.name}', source '{rule.priors_from}'"
    if failed:
        raise PriorFetchError(f"{detail}; not pulled: {'; '.join(failed)}")
    return detail


def run_priors(job: Job, settings: NodeSettings, spool: Spool, index: Index, rule: RoutingRule) -> None:
    """The PRIORS job's step: fetch, then record what came in the current study's history."""
    detail = fetch_priors(settings, spool, index, job.study_instance_uid, rule)
    index.add_event(job.study_instance_uid, "prior fetch", detail)
