"""De-identification per route: PS3.15 Basic Profile and a keyed, reversible UID crosswalk.

What leaves the node towards an inference service is a ``VolumeHeader`` and voxels, never a DICOM
object. On a route with ``deidentify = true`` the header is cleaned before it is sent
(``deidentify_header``): the correlation key becomes the series' pseudonymous UID, DICOM-derived
strings pass only as defined terms, and any string field this module does not know is cleared, so a
field added to the contract later cannot leak by default. A series marked BurnedInAnnotation YES is
refused (``check_pixels``): header de-identification cannot clean pixels.

A pseudonymous UID is ``2.25.`` + the first 16 bytes of HMAC-SHA256(key, UID) as an integer:
deterministic (the same study maps to the same pseudonym in every series and every run), one-way
without the key, and reversible only through the crosswalk table the node keeps (``Index``), so only
the node that holds it can re-identify what comes back (``reidentify_result``).

``deidentify``/``reidentify`` apply the same profile to a whole pydicom Dataset, for backends that
will need DICOM.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import os
import re
from collections.abc import Iterable, Mapping
from typing import Protocol

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID_dictionary

from dicom_node._confidentiality import BASIC_PROFILE, BODY_PART_TERMS, MODALITY_TERMS
from dicom_node.config import DeidentificationSection, NodeSettings
from dicom_node.errors import DeidentificationRefused
from protos.radbridge.v1 import inference_pb2 as pb
from radbridge_common.settings import ConfigError

MIN_KEY_BYTES = 16
PSEUDONYM_ROOT = "2.25."
PSEUDONYM_PATTERN = re.compile(r"(?<![\d.])2\.25\.\d{1,39}(?!\d)")
DEIDENTIFICATION_METHOD = "RadBridge: PS3.15 Basic Application Confidentiality Profile"  # LO: <= 64
#: (113100, DCM, "Basic Application Confidentiality Profile"), PS3.16 CID 7050.
BASIC_PROFILE_CODE = ("113100", "DCM", "Basic Application Confidentiality Profile")
#: Header string fields that may be sent, and what they hold: the routing rule's own text (written by
#: the operator, not taken from DICOM) passes; DICOM-derived strings pass through a filter.
RULE_FIELDS = frozenset({"spec.model", "spec.question", "spec.labels", "spec.language"})
PHOTOMETRIC = frozenset({"MONOCHROME2", "RGB"})
#: VRs removed when the table does not name the attribute: names, dates and times, AE titles (they
#: name stations), and free text.
_REMOVED_VRS = frozenset({"PN", "DA", "DT", "TM", "AE", "LT", "ST", "UT"})
#: File meta attributes that name the sending or receiving station.
_META_REMOVED = (
    "SourceApplicationEntityTitle",
    "SendingApplicationEntityTitle",
    "ReceivingApplicationEntityTitle",
)
#: Dummy values (action D) by VR.
_DUMMIES = {"DA": "19000101", "TM": "000000", "DT": "19000101000000", "PN": "ANONYMOUS", "AS": "000Y"}


# -- the key -----------------------------------------------------------------------------------
def load_key(section: DeidentificationSection, environ: Mapping[str, str] | None = None) -> bytes:
    """The crosswalk key from ``key_file`` or the variable named by ``key_env``; ConfigError if none."""
    environ = os.environ if environ is None else environ
    if section.key_file is not None:
        try:
            key = section.key_file.read_bytes().strip()
        except OSError as exc:
            raise ConfigError(
                f"deidentification.key_file {section.key_file} cannot be read ({exc.strerror})."
            ) from exc
        where = f"deidentification.key_file {section.key_file}"
    elif section.key_env:
        key = environ.get(section.key_env, "").strip().encode()
        where = f"the environment variable {section.key_env} (deidentification.key_env)"
        if not key:
            raise ConfigError(f"{where} is not set or empty; it must hold the crosswalk key.")
    else:
        raise ConfigError(
            "A routing rule has deidentify = true but no crosswalk key is configured: set"
            " deidentification.key_file (a file with at least 16 random bytes, e.g. from"
            " `openssl rand -hex 32`) or deidentification.key_env (an environment variable holding it)."
        )
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(
            f"The crosswalk key in {where} is {len(key)} bytes; at least {MIN_KEY_BYTES} needed."
        )
    return key


def require_key(settings: NodeSettings) -> bytes | None:
    """The key when any rule de-identifies (checked at start-up, so a missing key stops the node
    before a study arrives); None when no rule does."""
    if not any(rule.deidentify for rule in settings.routing.rules):
        return None
    return load_key(settings.deidentification)


# -- the crosswalk -------------------------------------------------------------------------------
class CrosswalkStore(Protocol):
    """Where pseudonym -> original pairs are kept (the node's Index; a dict in tests)."""

    def put_crosswalk(self, pairs: Iterable[tuple[str, str]]) -> None: ...

    def crosswalk_originals(self, pseudonyms: Iterable[str]) -> dict[str, str]: ...


class MemoryCrosswalkStore:
    """A CrosswalkStore in memory, for tools that de-identify without a node."""

    def __init__(self) -> None:
        self.pairs: dict[str, str] = {}

    def put_crosswalk(self, pairs: Iterable[tuple[str, str]]) -> None:
        self.pairs.update(pairs)

    def crosswalk_originals(self, pseudonyms: Iterable[str]) -> dict[str, str]:
        return {p: self.pairs[p] for p in pseudonyms if p in self.pairs}


def pseudonymous_uid(key: bytes, uid: str) -> str:
    """``2.25.`` + int(HMAC-SHA256(key, uid)[:16]): at most 44 characters, a valid UID."""
    digest = hmac.new(key, uid.encode("ascii"), hashlib.sha256).digest()
    return PSEUDONYM_ROOT + str(int.from_bytes(digest[:16], "big"))


class UidCrosswalk:
    """Keyed UID pseudonyms, recorded in a store so that they can be reversed.

    ``pseudonym`` records new pairs in memory; ``flush`` writes them to the store, and must run before
    a pseudonym leaves the node (``deidentify_header`` and ``deidentify`` do), so a crash after
    sending can still map the answer back.
    """

    def __init__(self, key: bytes, store: CrosswalkStore | None = None) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"The crosswalk key must be at least {MIN_KEY_BYTES} bytes.")
        self._key = key
        self.store: CrosswalkStore = store if store is not None else MemoryCrosswalkStore()
        self._pending: dict[str, str] = {}

    def pseudonym(self, uid: str) -> str:
        value = pseudonymous_uid(self._key, str(uid))
        self._pending[value] = str(uid)
        return value

    def flush(self) -> None:
        if self._pending:
            self.store.put_crosswalk(self._pending.items())
            self._pending = {}

    def originals(self, pseudonyms: Iterable[str]) -> dict[str, str]:
        """Pseudonym -> original for those this node recorded (unknown ones are left out)."""
        wanted = set(pseudonyms)
        found = {p: self._pending[p] for p in wanted if p in self._pending}
        found.update(self.store.crosswalk_originals(wanted - set(found)))
        return found

    def original(self, pseudonym: str) -> str | None:
        return self.originals([pseudonym]).get(pseudonym)


# -- the gRPC request ----------------------------------------------------------------------------
def defined_body_part(value: str) -> str:
    """The value if it is a Body Part Examined defined term, else "" (free text stays home)."""
    term = value.strip().upper()
    return term if term in BODY_PART_TERMS else ""


def check_pixels(sources: Iterable[Dataset], rule: str) -> None:
    """Refuse a series whose pixels may show identifying text (BurnedInAnnotation YES)."""
    if any(str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES" for ds in sources):
        raise DeidentificationRefused(
            f"not sent on de-identifying rule '{rule}': the series has Burned In Annotation YES, and"
            " text in the pixels cannot be removed by header de-identification"
        )


def deidentify_header(
    header: pb.VolumeHeader, crosswalk: UidCrosswalk, series_instance_uid: str
) -> pb.VolumeHeader:
    """A copy of the header fit to leave the node: pseudonymous correlation key, defined terms only."""
    out = pb.VolumeHeader()
    out.CopyFrom(header)
    out.spec.correlation_id = crosswalk.pseudonym(series_instance_uid)
    geometry = out.geometry
    geometry.body_part = defined_body_part(geometry.body_part)
    if geometry.modality.strip().upper() not in MODALITY_TERMS:
        geometry.modality = ""
    if geometry.photometric_interpretation not in PHOTOMETRIC:
        geometry.photometric_interpretation = ""
    known = RULE_FIELDS | {"spec.correlation_id", "geometry.body_part", "geometry.modality"}
    _clear_strings(out, "", known | {"geometry.photometric_interpretation"})
    crosswalk.flush()
    return out


def _clear_strings(message: Message, prefix: str, keep: frozenset[str] | set[str]) -> None:
    """Clear every string field not named in ``keep``, at any depth (new fields are closed by default)."""
    for field, value in message.ListFields():
        path = f"{prefix}{field.name}"
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            for item in value if _repeated(field) else [value]:
                _clear_strings(item, f"{path}.", keep)
        elif field.type == FieldDescriptor.TYPE_STRING and path not in keep:
            message.ClearField(field.name)


def _repeated(field: FieldDescriptor) -> bool:
    if hasattr(field, "is_repeated"):  # protobuf >= 5.28; `label` is gone in 6
        return bool(field.is_repeated)
    return field.label == FieldDescriptor.LABEL_REPEATED


def reidentify_result(result: pb.AnalysisResult, crosswalk: UidCrosswalk) -> int:
    """Map pseudonymous UIDs in the result's text back to the originals (in place); how many."""
    strings: list[tuple[Message, FieldDescriptor, int | None]] = []
    _collect_strings(result, strings)
    texts = [getattr(m, f.name)[i] if i is not None else getattr(m, f.name) for m, f, i in strings]
    found = {p for text in texts for p in PSEUDONYM_PATTERN.findall(text)}
    originals = crosswalk.originals(found) if found else {}
    replaced = 0
    for (message, field, i), text in zip(strings, texts, strict=True):
        new, n = PSEUDONYM_PATTERN.subn(lambda m: originals.get(m.group(0), m.group(0)), text)
        if new != text:
            if i is None:
                setattr(message, field.name, new)
            else:
                getattr(message, field.name)[i] = new
            replaced += n
    return replaced


def _collect_strings(message: Message, out: list[tuple[Message, FieldDescriptor, int | None]]) -> None:
    for field, value in message.ListFields():
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            for item in value if _repeated(field) else [value]:
                _collect_strings(item, out)
        elif field.type == FieldDescriptor.TYPE_STRING and _repeated(field):
            out.extend((message, field, i) for i in range(len(value)))
        elif field.type == FieldDescriptor.TYPE_STRING:
            out.append((message, field, None))


# -- whole data sets -----------------------------------------------------------------------------
def deidentify(dataset: Dataset, crosswalk: UidCrosswalk) -> Dataset:
    """A de-identified copy of ``dataset`` (Basic Profile; instance UIDs through the crosswalk).

    Beyond the table: private tags, curves and overlay data/comments are removed; person names,
    dates, times, AE titles and free text (LT/ST/UT) the table does not name are removed; Body Part
    Examined is kept only as a defined term; and every UID that is not a UID of the standard (SOP
    classes, transfer syntaxes, coding schemes) is replaced.
    """
    ds = copy.deepcopy(dataset)
    _deidentify_items(ds, crosswalk)
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        if "MediaStorageSOPInstanceUID" in meta and "SOPInstanceUID" in ds:
            meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        for keyword in _META_REMOVED:
            if keyword in meta:
                delattr(meta, keyword)
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = DEIDENTIFICATION_METHOD
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = BASIC_PROFILE_CODE
    ds.DeidentificationMethodCodeSequence = [code]
    crosswalk.flush()
    return ds


def _action(elem: DataElement) -> str:
    if elem.tag.is_private or elem.tag.group & 0xFF00 == 0x5000:  # private, curves
        return "X"
    if elem.tag.group & 0xFF00 == 0x6000 and elem.tag.element in (0x3000, 0x4000):  # overlay data, comments
        return "X"
    if elem.keyword == "BodyPartExamined":
        return "K" if defined_body_part(str(elem.value or "")) else "X"
    action = BASIC_PROFILE.get(elem.keyword)
    if action:
        return action
    if elem.VR in _REMOVED_VRS:
        return "X"
    if elem.VR == "UI":
        return "U"
    return "K"


def _deidentify_items(ds: Dataset, crosswalk: UidCrosswalk) -> None:
    for elem in list(ds):
        action = _action(elem)
        if action == "X" or action == "C":
            del ds[elem.tag]
        elif action == "Z":
            elem.value = [] if elem.VR == "SQ" else None
        elif action == "D":
            elem.value = (
                _DUMMIES.get(elem.VR, "ANONYMOUS") if elem.VR != "UI" else _map_uids(elem.value, crosswalk)
            )
        elif action == "U" and elem.value:
            elem.value = _map_uids(elem.value, crosswalk)
        if action in ("K", "D", "U") and elem.VR == "SQ" and elem.tag in ds:
            for item in elem.value:
                _deidentify_items(item, crosswalk)


def _map_uids(value: object, crosswalk: UidCrosswalk) -> object:
    def one(uid: str) -> str:
        return uid if str(uid) in UID_dictionary else crosswalk.pseudonym(str(uid))

    if isinstance(value, MultiValue | list):
        return [one(v) for v in value]
    return one(str(value))


def reidentify(dataset: Dataset, crosswalk: UidCrosswalk) -> Dataset:
    """A copy with every pseudonymous UID this node recorded mapped back to the original.

    Only UIDs come back: what the profile removed (names, dates) is gone, so objects made from a
    de-identified input take their patient and study attributes from the original sources.
    """
    ds = copy.deepcopy(dataset)
    elements: list[DataElement] = []
    _collect_uids(ds, elements)
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        elements.extend(e for e in meta if e.VR == "UI")
    values = {str(v) for e in elements for v in (e.value if isinstance(e.value, MultiValue) else [e.value])}
    originals = crosswalk.originals(v for v in values if v.startswith(PSEUDONYM_ROOT))
    for elem in elements:
        if isinstance(elem.value, MultiValue):
            elem.value = [originals.get(str(v), str(v)) for v in elem.value]
        elif elem.value:
            elem.value = originals.get(str(elem.value), str(elem.value))
    return ds


def _collect_uids(ds: Dataset, out: list[DataElement]) -> None:
    for elem in ds:
        if elem.VR == "UI" and elem.value:
            out.append(elem)
        elif elem.VR == "SQ":
            for item in elem.value:
                _collect_uids(item, out)


__all__ = [
    "CrosswalkStore",
    "MemoryCrosswalkStore",
    "UidCrosswalk",
    "check_pixels",
    "defined_body_part",
    "deidentify",
    "deidentify_header",
    "load_key",
    "pseudonymous_uid",
    "reidentify",
    "reidentify_result",
    "require_key",
]
