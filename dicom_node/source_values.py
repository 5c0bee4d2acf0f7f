"""The values a result copies from its source images, made valid for their VR first.

Why: every SEG, SR and key image is built by highdicom from its source's Patient and Study
modules, its pixel geometry and its character set, and highdicom refuses a source whose birth
date, study date or time, or sex is not valid DICOM ("1941-09-23", "2024/01/02", "25:61:00",
"X"), whose pixel spacing has a decimal comma ("0,7\\0,7": a localised number format), or whose
character set it does not know: the whole analysis of the series was lost to one badly
formatted value. Archives take such images every day (ACR-NEMA-era date forms, modalities and
workstations configured by hand), so the node must too.

What a result gets, value by value:

- a valid value: unchanged;
- an unambiguous repair where one exists: ACR-NEMA's "1941.09.23" (and "-" or "/" between the
  same fields) becomes "19410923", "10:20:30.5" becomes "102030.5", an age "45Y" or "45 y"
  becomes "045Y", a sex "m" becomes "M", a decimal number "0,7" becomes "0.7" (DICOM separates
  values with "\\", so a comma between digits can only be a decimal point);
- for the dates, times, ages, numbers and sex of the Patient module (group 0010) and the study's
  date and time, otherwise the value left empty: each of these is type 2 or 3 (PS3.3 C.7.1.1,
  C.7.2.1, C.7.2.2), so empty is valid, and a guessed value would be worse than none;
- an unknown Specific Character Set: "ISO_IR 192" (the results declare UTF-8 anyway; pydicom
  has already decoded the text as well as it could).

The geometry (pixel spacing, positions, orientation, thickness) is only repaired, never emptied:
the volume reader (dicom_node.volume) reads it with :func:`ds_float`, so the masks and the SEG
agree. Names and IDs are kept as they are even where too long for their VR (highdicom only
warns): the archive matches the result to its patient by them. Only the copies given to the
writers change; the spooled images are not touched.
"""

from __future__ import annotations

import copy
import datetime
import math
import re
from collections.abc import Iterable, Sequence

from pydicom.charset import python_encoding
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag

from dicom_node.text import SPECIFIC_CHARACTER_SET

#: The study's own values highdicom passes through DA()/TM(): StudyDate, StudyTime.
STUDY_TAGS = frozenset({0x00080020, 0x00080030})
#: Pixel Spacing, Imager Pixel Spacing, Slice Thickness, Spacing Between Slices, Image Position
#: and Orientation (Patient): repaired (a decimal comma), never emptied.
GEOMETRY_TAGS = frozenset({0x00280030, 0x00181164, 0x00180050, 0x00180088, 0x00200032, 0x00200037})
CHECKED_VRS = frozenset({"DA", "TM", "DT", "AS", "DS", "IS"})
SEX_TAG = 0x00100040  # Patient's Sex: M, F, O (PS3.3 C.7.1.1)
SEX_VALUES = frozenset({"M", "F", "O"})
CHARSET_TAG = 0x00080005
_OTHER_TAGS = STUDY_TAGS | GEOMETRY_TAGS | {CHARSET_TAG}  # checked outside group 0010

_DA_SEPARATED = re.compile(r"(\d{4})[.\-/](\d{2})[.\-/](\d{2})")
_TM = re.compile(r"(\d{2})(?:(\d{2})(?:(\d{2})(\.\d{1,6})?)?)?")
_TM_COLONS = re.compile(r"(\d{2}):(\d{2})(?::(\d{2})(\.\d{1,6})?)?")
_DT = re.compile(r"(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\.\d{1,6})?([+-]\d{4})?")
_AS = re.compile(r"\d{3}[DWMY]")
_AS_LOOSE = re.compile(r"(\d{1,3})\s*([DWMYdwmy])")
_DS = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_DS_COMMA = re.compile(r"[+-]?\d+,\d+([eE][+-]?\d+)?")
_IS = re.compile(r"[+-]?\d+")


def ds_float(value: object) -> float:
    """``float(value)``, also for a decimal string written with a decimal comma ("0,7");
    ValueError (or TypeError) otherwise, as float() raises."""
    try:
        return float(value)  # type: ignore[arg-type]
    except ValueError:
        text = str(value).strip(" \x00")
        if not _DS_COMMA.fullmatch(text):
            raise
        return float(text.replace(",", "."))


def _valid_date(year: str, month: str, day: str) -> bool:
    try:
        datetime.date(int(year), int(month), int(day))
    except ValueError:
        return False
    return True


def _valid_time(hh: str, mm: str | None, ss: str | None) -> bool:
    return int(hh) < 24 and (mm is None or int(mm) < 60) and (ss is None or int(ss) < 61)


def _ds(text: str) -> str:
    if len(text) <= 16 and _DS.fullmatch(text) and math.isfinite(float(text)):
        return text
    if _DS_COMMA.fullmatch(text):
        return _ds(text.replace(",", "."))
    return ""


def conform_value(vr: str, text: str) -> str:
    """``text`` (one value of VR ``vr``) if valid, its repair if unambiguous, else ""."""
    text = text.strip(" \x00")
    if not text:
        return ""
    if vr == "DA":
        if len(text) == 8 and text.isdigit() and _valid_date(text[:4], text[4:6], text[6:]):
            return text
        m = _DA_SEPARATED.fullmatch(text)
        return "".join(m.groups()) if m and _valid_date(*m.groups()) else ""
    if vr == "TM":
        m = _TM.fullmatch(text)
        if m and _valid_time(*m.groups()[:3]):
            return text
        m = _TM_COLONS.fullmatch(text)
        if m and _valid_time(*m.groups()[:3]):
            return "".join(g for g in m.groups() if g)
        return ""
    if vr == "DT":
        m = _DT.fullmatch(text)
        if not m or len(text) > 26:
            return ""
        year, month, day, hh, mm, ss = m.groups()[:6]
        if not _valid_date(year, month or "01", day or "01"):
            return ""
        return "" if hh is not None and not _valid_time(hh, mm, ss) else text
    if vr == "AS":
        if _AS.fullmatch(text):
            return text
        m = _AS_LOOSE.fullmatch(text)
        return f"{int(m.group(1)):03d}{m.group(2).upper()}" if m else ""
    if vr == "DS":
        return _ds(text)
    if vr == "IS":
        return text if len(text) <= 12 and _IS.fullmatch(text) and -(2**31) <= int(text) < 2**31 else ""
    return text


def _texts(elem: DataElement | RawDataElement) -> list[str]:
    """The element's values as text, without converting a raw element (a malformed DS would raise)."""
    value = elem.value
    if value is None:
        return []
    if isinstance(elem, RawDataElement):
        raw = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
        # DS, IS, DA and TM may carry leading or trailing spaces: not a value to repair
        return [v.strip(" \x00") for v in raw.split("\\")] if raw.strip(" \x00") else []
    if isinstance(value, MultiValue | list | tuple):
        return [str(v) for v in value]
    return [str(value)] if str(value) else []


def _checked(ds: Dataset) -> Iterable[tuple[BaseTag, DataElement | RawDataElement]]:
    for tag in ds.keys():  # noqa: SIM118 (iterating a Dataset converts every raw element)
        # plain ints: BaseTag's comparisons are Python methods, and this runs per source image
        t = int(tag)
        if t >> 16 != 0x0010 and t not in _OTHER_TAGS:
            continue
        elem = ds.get_item(tag)
        if t in (SEX_TAG, CHARSET_TAG) or elem.VR in CHECKED_VRS and not _parsed_numbers(elem):
            yield tag, elem


def _parsed_numbers(elem: DataElement | RawDataElement) -> bool:
    """Numbers pydicom has already parsed (it keeps a value it could not parse as text): valid,
    nothing to check. The volume reader has read the geometry by now, so this is the usual case."""
    if isinstance(elem, RawDataElement) or elem.VR not in ("DS", "IS"):
        return False
    values = elem.value if isinstance(elem.value, MultiValue | list | tuple) else [elem.value]
    return all(isinstance(v, float | int) and math.isfinite(v) for v in values)


def _known_charset(term: str) -> bool:
    return not term.strip() or term.strip() in python_encoding


def _conformed(tag: int, vr: str, texts: list[str]) -> list[str]:
    if tag == SEX_TAG:
        fixed = [t.strip().upper() for t in texts]
        return fixed if len(fixed) == 1 and fixed[0] in SEX_VALUES else []
    if tag == CHARSET_TAG:
        return texts if all(_known_charset(t) for t in texts) else [SPECIFIC_CHARACTER_SET]
    fixed = [conform_value(vr, t) for t in texts]
    if tag in GEOMETRY_TAGS:
        return fixed if all(fixed) else texts  # repaired, or left for the reader to refuse
    return fixed if all(fixed) else []  # one bad value of several: none is kept


def conform_source(ds: Dataset) -> tuple[Dataset, list[str]]:
    """``ds`` itself if its values are valid; else a copy with them repaired (or emptied, see the
    module), and the keywords of the values changed (for the study history; never the values)."""
    changes: dict[BaseTag, tuple[str, str]] = {}
    for tag, elem in _checked(ds):
        texts = _texts(elem)
        fixed = _conformed(int(tag), elem.VR, texts)
        if fixed != texts:
            changes[tag] = (elem.VR, "\\".join(fixed))
    if not changes:
        return ds, []
    # copy.copy keeps the class, file meta and encoding but shares the element table:
    out = copy.copy(ds)
    out._dict = {tag: ds.get_item(tag) for tag in ds.keys()}  # noqa: SIM118 (its own table)
    for tag, (vr, value) in changes.items():
        out[tag] = DataElement(tag, vr, value or None)
    return out, sorted({out[tag].keyword for tag in changes})


def conform_sources(sources: Sequence[Dataset]) -> tuple[list[Dataset], list[str]]:
    """:func:`conform_source` for each source; the union of the keywords changed."""
    out: list[Dataset] = []
    changed: set[str] = set()
    for ds in sources:
        fixed, keywords = conform_source(ds)
        out.append(fixed)
        changed.update(keywords)
    return out, sorted(changed)
