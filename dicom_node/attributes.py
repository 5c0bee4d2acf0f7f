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
#: A UID the node accepts: digits and dots, at most 64 (PS3.5 9.1). Looser than the standard on
#: purpose (leading zeros, empty components pass: real devices send them); what it refuses
#: (letters, "/", "\\", NUL, spaces, over-long) cannot be a UID, and would travel into our
#: outputs and DICOMweb URLs. File names never use UIDs anyway (spool.uid_key).
_UID_CHARS = re.compile(r"[0-9][0-9.]{0,63}")

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
            doc[key] = element.to_json_dict(None, 0)
        except Exception:  # a malformed optional value must not refuse the instance
            continue
    return doc


def identifiers(ds: Dataset) -> dict[str, str]:
    """The required UIDs and the Modality of an untrusted header, or a typed refusal."""
    try:
        values = {k: str(ds.get(k, "") or "") for k in (*REQUIRED_UIDS, "Modality")}
    except Exception as exc:  # any decode failure of untrusted bytes
        raise UndecodableInstance("Cannot understand: dataset could not be decoded") from exc
    missing = [k for k in REQUIRED_UIDS if not values[k]]
    if missing:
        raise InvalidInstance(f"Missing required attribute(s): {', '.join(missing)}")
    bad = [k for k in REQUIRED_UIDS if not _UID_CHARS.fullmatch(values[k])]
    if bad:
        raise InvalidInstance(f"Invalid UID in {bad[0]}")
    return values


def dumps(doc: dict[str, Any]) -> str:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False)
