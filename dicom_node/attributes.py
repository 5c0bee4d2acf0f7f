"""The searchable attributes of an instance, kept in the index at ingest.

QIDO-RS answers from these (DICOM JSON, PS3.18 F.2) without opening a file.
Taking them costs a few dictionary look-ups on a header that the SCP or the
STOW listener has already decoded, so ingest stays I/O bound.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydicom.dataset import Dataset
from pydicom.tag import Tag

from dicom_node.errors import InvalidInstance, UndecodableInstance

#: What every instance must carry before it may be spooled (C-STORE and STOW-RS alike).
REQUIRED_UIDS = ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID")
#: A UID (PS3.5 9.1): numeric components separated by dots, at most 64 characters. Leading zeros
#: in a component are tolerated (older devices write them); nothing else is.
_UID = re.compile(r"[0-9]+(?:\.[0-9]+)*")
MAX_UID_CHARS = 64

#: Study-level attributes QIDO-RS returns by default (PS3.18 Table 10.6.3-3) and OHIF lists.
STUDY_KEYWORDS = (
    "SpecificCharacterSet",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyID",
    "StudyDescription",
)
SERIES_KEYWORDS = (
    "Modality",
    "SeriesInstanceUID",
    "SeriesNumber",
    "SeriesDescription",
    "SeriesDate",
    "SeriesTime",
    "BodyPartExamined",
)
INSTANCE_KEYWORDS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "InstanceNumber",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "BitsAllocated",
)
KEYWORDS = STUDY_KEYWORDS + SERIES_KEYWORDS + INSTANCE_KEYWORDS
TAGS = {kw: f"{Tag(kw):08X}" for kw in KEYWORDS}
_BY_TAG = [(int(Tag(kw)), key) for kw, key in TAGS.items()]


def searchable_attributes(ds: Dataset) -> dict[str, Any]:
    """DICOM JSON of the searchable attributes present in ``ds`` (keys: 8-hex-digit tags)."""
    doc: dict[str, Any] = {}
    for tag, key in _BY_TAG:  # by tag: one look-up each, no keyword -> tag translation
        if tag not in ds:
            continue
        try:
            element = ds[tag]
            if element.value is None:  # as before: an empty numeric value is left out
                continue
            value = element.to_json_dict(None, 0)
            if element.VR in ("DA", "TM", "DT") and "Value" in value:  # a built header's date objects
                value["Value"] = [str(v) for v in value["Value"]]  # str(): the DICOM form, 20200102
            doc[key] = value
        except Exception:  # a malformed optional value must not refuse the instance
            continue
    return doc


def identifiers(ds: Dataset) -> dict[str, str]:
    """The required UIDs and the Modality of an untrusted header, or a typed refusal."""
    try:
        values = {k: str(ds.get(k, "") or "") for k in (*REQUIRED_UIDS, "Modality")}
    except Exception as exc:  # any decode failure of untrusted bytes
        raise UndecodableInstance("Cannot understand: dataset could not be decoded") from exc
    return check_identifiers(values)


def check_identifiers(values: dict[str, str]) -> dict[str, str]:
    """``values`` if every required UID is present and valid, else a typed refusal."""
    missing = [k for k in REQUIRED_UIDS if not values[k]]
    if missing:
        raise InvalidInstance(f"Missing required attribute(s): {', '.join(missing)}")
    for keyword in REQUIRED_UIDS:
        check_uid(values[keyword], keyword)
    return values


def check_uid(value: str, name: str) -> None:
    """Refuse a value that is not a UID (InvalidInstance naming the attribute, not the value).

    UIDs become index keys, spool paths (hashed) and DICOMweb URLs: "../../x", "1.2?a#b", two
    values or non-ASCII text there would break retrieval or collide, so they are not accepted.
    """
    if len(value) > MAX_UID_CHARS or not _UID.fullmatch(value):
        raise InvalidInstance(f"Invalid UID in {name}")


def dumps(doc: dict[str, Any]) -> str:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False)
