"""Text made valid for the DICOM Value Representation it is written into (PS3.5 6.2).

Why this exists: model answers, labels and code meanings come from a model or
another service, and a single stray byte makes a whole SR or SEG invalid (a
report answer holding 0x1E failed dciodvfy with "Character invalid for this
VR"). Every string from outside the node passes through ``clean`` (or ``raw``
for the model's verbatim output) before it enters a data set.

The objects we write declare ``ISO_IR 192`` (UTF-8), so:

- lengths are bounded in UTF-8 bytes, not characters: PS3.5 counts characters,
  dciodvfy counts bytes, and the byte bound satisfies both;
- ESC is removed everywhere: PS3.5 allows it only for ISO 2022 code extensions,
  which ISO_IR 192 does not have;
- lone surrogates (e.g. undecodable bytes kept by ``surrogateescape``) and
  undecodable ``bytes`` become U+FFFD: they cannot be written as UTF-8.

Control characters (C0, DEL and C1): LT, ST and UT keep LF, FF and CR (PS3.5
6.2; dciodvfy also refuses TAB there, so TAB is treated as any other control);
every other control character, and all of them in the other VRs, becomes a
space in ``clean`` and its visible Unicode "control picture" (0x1E -> U+241E)
in ``raw``. Backslash separates values, so it is replaced by "/" in the VRs
that may hold several values (SH, LO, UC, PN, CS); LT, ST and UT keep it.
"""

from __future__ import annotations

import re

__all__ = ["MAX_BYTES", "SPECIFIC_CHARACTER_SET", "TEXT_VRS", "clean", "clean_language", "raw", "to_str"]

#: What every object RadBridge writes declares (UTF-8, no code extensions).
SPECIFIC_CHARACTER_SET = "ISO_IR 192"
#: Maximum length of one value, in UTF-8 bytes (PS3.5 Table 6.2-1); PN: per component group.
MAX_BYTES: dict[str, int] = {
    "CS": 16,
    "SH": 16,
    "LO": 64,
    "PN": 64,
    "ST": 1024,
    "LT": 10240,
    "UC": 2**32 - 2,
    "UT": 2**32 - 2,
}
#: VRs for free text: single-valued, and may span lines.
TEXT_VRS = frozenset({"ST", "LT", "UT"})
#: The control characters PS3.5 6.2 lets LT/ST/UT hold (ESC left out: see the module docstring;
#: TAB left out: dciodvfy answers "Character invalid for this VR" for it).
TEXT_CONTROLS = frozenset("\n\f\r")

_SURROGATES = re.compile("[\ud800-\udfff]")
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f]")
_CS_INVALID = re.compile("[^A-Z0-9 _]")
_LANGUAGE_INVALID = re.compile("[^A-Za-z0-9-]")
#: PN: at most 3 component groups (alphabetic, ideographic, phonetic) of at most 5 components.
_PN_GROUPS, _PN_COMPONENTS = 3, 5


def to_str(value: str | bytes) -> str:
    """``value`` as a str that UTF-8 can encode: bad bytes and lone surrogates become U+FFFD."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return _SURROGATES.sub("\ufffd", value)


def truncate_bytes(value: str, max_bytes: int) -> str:
    """The longest prefix of ``value`` whose UTF-8 encoding fits ``max_bytes`` (never half a character)."""
    encoded = value.encode("utf-8")
    if len(encoded) <= max_bytes:
        return value
    return encoded[:max_bytes].decode("utf-8", "ignore")


def _controls(value: str, vr: str, visible: bool) -> str:
    keep = TEXT_CONTROLS if vr in TEXT_VRS else frozenset()

    def replace(match: re.Match[str]) -> str:
        ch = match.group()
        if ch in keep:
            return ch
        if not visible:
            return " "
        code = ord(ch)
        # U+2400..U+241F picture C0, U+2421 DEL; C1 has no pictures: U+FFFD.
        return chr(0x2400 + code) if code < 0x20 else "\u2421" if code == 0x7F else "\ufffd"

    return _CONTROLS.sub(replace, value)


def clean(value: str | bytes, vr: str, max_bytes: int | None = None) -> str:
    """``value`` made valid for one value of ``vr`` (see the module docstring); may be "".

    ``max_bytes`` bounds the result further (e.g. a UT that should stay readable).
    Leading and trailing spaces, insignificant in these VRs, are dropped
    (LT/ST/UT: trailing only). Raises ValueError for a VR without a rule here.
    """
    if vr not in MAX_BYTES:
        raise ValueError(f"No text rule for VR {vr!r}.")
    text = _controls(to_str(value), vr, visible=False)
    limit = min(MAX_BYTES[vr], max_bytes) if max_bytes is not None else MAX_BYTES[vr]
    if vr in TEXT_VRS:
        return truncate_bytes(text.rstrip(" "), limit).rstrip(" ")
    text = text.replace("\\", "/")
    if vr == "CS":
        text = _CS_INVALID.sub("_", text.upper())
    elif vr == "PN":
        return _person_name(text, limit)
    return truncate_bytes(text.strip(" "), limit).strip(" ")


def _person_name(text: str, limit: int) -> str:
    """PN: at most 3 "="-separated groups of at most 5 "^"-separated components, each group <= limit bytes."""
    groups = text.split("=")[:_PN_GROUPS]
    cleaned = []
    for group in groups:
        components = group.split("^")
        head, tail = components[: _PN_COMPONENTS - 1], components[_PN_COMPONENTS - 1 :]
        parts = [c.strip(" ") for c in head] + ([" ".join(t.strip(" ") for t in tail)] if tail else [])
        cleaned.append(truncate_bytes("^".join(parts).rstrip("^"), limit).rstrip("^ "))
    return "=".join(cleaned).rstrip("=")


def raw(value: str | bytes, vr: str = "UT") -> str:
    """A model's verbatim output for a text VR: every character kept where the VR allows it,
    disallowed control characters shown as their control pictures, nothing trimmed but the
    VR's length limit (UT: 4 GB)."""
    if vr not in TEXT_VRS:
        raise ValueError(f"Raw text needs a text VR (LT, ST, UT), not {vr!r}.")
    return truncate_bytes(_controls(to_str(value), vr, visible=True), MAX_BYTES[vr])


def clean_language(tag: str, default: str = "en") -> str:
    """An RFC 5646 language tag fit for a Code Value (SH): letters, digits and "-", <= 16 bytes."""
    text = _LANGUAGE_INVALID.sub("", to_str(tag))[:16].strip("-")
    return text or default
