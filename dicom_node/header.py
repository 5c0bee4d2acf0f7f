"""The identifiers and searchable attributes of a received data set, read from its first bytes.

Ingest needs about 25 top-level elements of a header (dicom_node.attributes) and pydicom's
``dcmread(stop_before_pixels=True)`` decodes all of them, sequences included, from the file
again: in the profile of the lean C-STORE path that and the JSON conversion were half of the
CPU per instance. Here the bytes the acceptor already holds are walked element by element
(Little Endian, explicit or implicit VR; sequences skipped by length or by delimiters), the
wanted ones kept raw, and the walk stops at the first tag past the last wanted one.

The values are turned into DICOM JSON here only where that is unambiguous: ASCII text in the
default character repertoire, plain integers, PN without component groups. Anything else (another
character set, an odd number, a person name with ideographic groups) is decoded by pydicom from
the same raw element, so both ways give what ``attributes.searchable_attributes`` gives for a
``dcmread`` header (tests/unit/dicom_node/test_header.py compares them). ``None`` means "read the
file as before": a big-endian or deflated data set, or a header longer than the bytes held.
"""

from __future__ import annotations

import re
import struct
from typing import Any

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from dicom_node.attributes import KEYWORDS, searchable_attributes

IMPLICIT_LE = "1.2.840.10008.1.2"
#: Transfer syntaxes whose data set is not plain Little Endian: read from the file by pydicom.
UNSUPPORTED = frozenset({"1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"})
_WANTED = {int(Tag(kw)): kw for kw in (*KEYWORDS, "Modality")}
_LAST_WANTED = max(_WANTED)
#: Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_TAG = struct.Struct("<HH")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<L")
_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "LO", "SH", "TM", "UI"})
_PLAIN_TEXT = re.compile(rb"[\x20-\x5b\x5d-\x7e]*")  # printable ASCII but backslash
_INTEGER = re.compile(r"[+-]?[0-9]{1,10}")


class _Short(Exception):
    """The bytes held end before the walk does."""


def read_header(head: bytes | bytearray, transfer_syntax: str) -> tuple[dict[str, str], dict[str, Any]] | None:
    """(identifier values as ``attributes.identifiers`` reads them, unchecked; searchable DICOM
    JSON), or None if these bytes cannot give them (the caller reads the file)."""
    if transfer_syntax in UNSUPPORTED:
        return None
    implicit = transfer_syntax == IMPLICIT_LE
    try:
        raw = _walk(memoryview(head), implicit)
    except (_Short, struct.error):
        return None
    return _values(raw, implicit)


def _walk(data: memoryview, implicit: bool) -> dict[int, tuple[str, bytes]]:
    """Raw (VR, value) of the wanted top-level elements."""
    found: dict[int, tuple[str, bytes]] = {}
    offset, size = 0, len(data)
    while True:
        if offset + 8 > size:
            if offset == size:
                return found  # the data set ended before the last wanted tag
            raise _Short
        group, element = _TAG.unpack_from(data, offset)
        tag = group << 16 | element
        if tag > _LAST_WANTED:
            return found
        vr, length, offset = _element_header(data, offset, tag, implicit)
        if length == _UNDEFINED:
            offset = _skip_undefined(data, offset, implicit)
            continue
        end = offset + length
        if end > size:
            raise _Short
        if tag in _WANTED:
            found[tag] = (vr, bytes(data[offset:end]))
        offset = end


def _element_header(data: memoryview, offset: int, tag: int, implicit: bool) -> tuple[str, int, int]:
    if implicit or tag >> 16 == 0xFFFE:  # items and delimiters have no VR
        (length,) = _U32.unpack_from(data, offset + 4)
        vr = dictionary_VR(tag) if tag in _WANTED else ""
        return vr, length, offset + 8
    vr_bytes = bytes(data[offset + 4 : offset + 6])
    if vr_bytes in _LONG_VRS:
        if offset + 12 > len(data):
            raise _Short
        (length,) = _U32.unpack_from(data, offset + 8)
        return vr_bytes.decode("ascii"), length, offset + 12
    (length,) = _U16.unpack_from(data, offset + 6)
    return vr_bytes.decode("latin-1"), length, offset + 8


def _skip_undefined(data: memoryview, offset: int, implicit: bool) -> int:
    """Past a sequence of undefined length (its items walked for their delimiters)."""
    while True:
        tag, length, offset = _delimiter_or_item(data, offset)
        if tag == _SEQUENCE_END:
            return offset
        if tag != _ITEM:
            raise _Short  # not what a sequence holds: let pydicom judge the file
        if length != _UNDEFINED:
            offset += length
            continue
        while True:  # an item of undefined length: its elements up to the item delimiter
            if offset + 8 > len(data):
                raise _Short
            group, element = _TAG.unpack_from(data, offset)
            inner = group << 16 | element
            if inner == _ITEM_END:
                offset += 8
                break
            _, inner_length, offset = _element_header(data, offset, inner, implicit)
            offset = _skip_undefined(data, offset, implicit) if inner_length == _UNDEFINED else offset + inner_length


def _delimiter_or_item(data: memoryview, offset: int) -> tuple[int, int, int]:
    if offset + 8 > len(data):
        raise _Short
    group, element = _TAG.unpack_from(data, offset)
    (length,) = _U32.unpack_from(data, offset + 4)
    return group << 16 | element, length, offset + 8


def _values(raw: dict[int, tuple[str, bytes]], implicit: bool) -> tuple[dict[str, str], dict[str, Any]] | None:
    charset = raw.get(0x00080005, ("CS", b""))[1].strip(b" \0")
    fast = charset in (b"", b"ISO_IR 6", b"ISO_IR 100", b"ISO_IR 192")  # ASCII reads the same in all
    doc: dict[str, Any] = {}
    slow: dict[int, tuple[str, bytes]] = {}
    for tag, (vr, value) in raw.items():
        converted = _json(vr, value) if fast else None
        if converted is None:
            slow[tag] = (vr, value)
        elif converted is not _EMPTY_NUMBER and tag in _SEARCHABLE:
            doc[_SEARCHABLE[tag]] = converted
    if slow:
        doc.update(_pydicom_json(raw, slow, implicit))
    ids = {kw: _identifier(raw.get(tag)) for tag, kw in _IDENTIFIERS.items()}
    if any(value is None for value in ids.values()):
        return None
    return ids, dict(sorted(doc.items(), key=lambda item: _ORDER[item[0]]))  # type: ignore[return-value]


_SEARCHABLE = {int(Tag(kw)): f"{int(Tag(kw)):08X}" for kw in KEYWORDS}
_ORDER = {key: i for i, key in enumerate(_SEARCHABLE.values())}
_EMPTY_NUMBER: dict[str, Any] = {}
_IDENTIFIERS = {int(Tag(kw)): kw for kw in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality")}


def _identifier(item: tuple[str, bytes] | None) -> str | None:
    """The value as ``str(ds.get(keyword, "") or "")`` gives it for a UI or CS element; None
    (pydicom decides) for several values or other than plain ASCII."""
    if item is None:
        return ""
    if not _PLAIN_TEXT.fullmatch(item[1].rstrip(b"\0")):
        return None
    return item[1].decode("ascii").strip(" \0")


def _json(vr: str, value: bytes) -> dict[str, Any] | None:
    """DICOM JSON of one element, or None where pydicom must decide."""
    if vr in ("US",):
        if len(value) % 2:
            return None
        numbers = [n for (n,) in _U16.iter_unpack(value)]
        return {"vr": vr, "Value": numbers} if numbers else _EMPTY_NUMBER
    if vr == "UI":
        value = value.rstrip(b"\0")  # a UI's padding (PS3.5 9.1)
    if not _PLAIN_TEXT.fullmatch(value.replace(b"\\", b"")):
        return None
    text = value.decode("ascii").rstrip(" \0")
    if vr == "IS":
        if not text.strip():
            return _EMPTY_NUMBER
        parts = [p.strip() for p in text.split("\\")]
        if not all(_INTEGER.fullmatch(p) for p in parts):
            return None
        return {"vr": vr, "Value": [int(p) for p in parts]}
    if vr == "PN":
        if "=" in text:
            return None
        parts = text.split("\\") if text else []
        if any(p != p.strip() for p in parts):
            return None
        if not all(parts):
            return None
        return {"vr": vr, "Value": [{"Alphabetic": p} for p in parts]} if parts else {"vr": vr}
    if vr not in _TEXT_VRS:
        return None
    parts = text.split("\\") if text else []
    if any(p != p.strip() for p in parts) or any(not p for p in parts):
        return None  # padding inside values, empty values: pydicom's rules per VR
    return {"vr": vr, "Value": parts} if parts else {"vr": vr}


def _pydicom_json(raw: dict[int, tuple[str, bytes]], tags: dict[int, tuple[str, bytes]], implicit: bool) -> dict[str, Any]:
    """pydicom's conversion of the given raw elements (in their data set's character set)."""
    ds = Dataset()
    for tag, (vr, value) in {**({0x00080005: raw[0x00080005]} if 0x00080005 in raw else {}), **tags}.items():
        ds[tag] = RawDataElement(Tag(tag), None if implicit else vr, len(value), value, 0, implicit, True)
    ds.set_original_encoding(implicit, True)
    return {key: v for key, v in searchable_attributes(ds).items() if int(key, 16) in tags}
