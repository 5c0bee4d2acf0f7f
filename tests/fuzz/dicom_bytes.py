"""Hostile DICOM built byte by byte, so that generated inputs are not limited to what pydicom will write.

pydicom validates values when it writes; an attacker does not. Elements here are
(tag, VR, value bytes) triples encoded by hand (PS3.5 7.1): any VR for any tag,
odd lengths, undefined lengths, values that do not fit their VR, either byte order.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from hypothesis import strategies as st

#: VRs whose explicit-VR header has 2 reserved bytes and a 4-byte length (PS3.5 Table 7.1-1).
LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
ALL_VRS = tuple(
    [
        "AE",
        "AS",
        "AT",
        "CS",
        "DA",
        "DS",
        "DT",
        "FD",
        "FL",
        "IS",
        "LO",
        "LT",
        "OB",
        "OD",
        "OF",
        "OL",
        "OV",
        "OW",
        "PN",
        "SH",
        "SL",
        "SQ",
        "SS",
        "ST",
        "SV",
        "TM",
        "UC",
        "UI",
        "UL",
        "UN",
        "UR",
        "US",
        "UT",
        "UV",
    ]
)
UNDEFINED = 0xFFFFFFFF

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_LOSSLESS = "1.2.840.10008.1.2.4.70"
JPEG_LS = "1.2.840.10008.1.2.4.80"
JPEG_2000 = "1.2.840.10008.1.2.4.90"
RLE = "1.2.840.10008.1.2.5"
TRANSFER_SYNTAXES = (
    IMPLICIT_LE,
    EXPLICIT_LE,
    DEFLATED_LE,
    EXPLICIT_BE,
    JPEG_BASELINE,
    JPEG_LOSSLESS,
    JPEG_LS,
    JPEG_2000,
    RLE,
    "1.2.3.4",
)
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"

# Tags of the attributes the node reads.
SOP_CLASS_UID = 0x00080016
SOP_INSTANCE_UID = 0x00080018
STUDY_INSTANCE_UID = 0x0020000D
SERIES_INSTANCE_UID = 0x0020000E
MODALITY = 0x00080060
SPECIFIC_CHARACTER_SET = 0x00080005
PATIENT_NAME = 0x00100010
PIXEL_DATA = 0x7FE00010


@dataclass(frozen=True)
class Element:
    tag: int
    vr: str  # two characters, or "" (implicit); not necessarily the tag's VR
    value: bytes
    length: int | None = None  # None: len(value); else what the header claims (may lie)


def encode(elements: list[Element], *, explicit: bool = True, little: bool = True) -> bytes:
    """Encode elements as a data set in the given encoding, in the order given."""
    e = "<" if little else ">"
    out = bytearray()
    for el in elements:
        group, number = el.tag >> 16, el.tag & 0xFFFF
        length = len(el.value) if el.length is None else el.length
        out += struct.pack(f"{e}HH", group, number)
        vr = el.vr.encode("latin-1")[:2].ljust(2, b" ")
        if not explicit or group == 0xFFFE:  # items and delimiters never carry a VR
            out += struct.pack(f"{e}L", length & 0xFFFFFFFF)
        elif el.vr in LONG_VRS or length > 0xFFFF:
            out += vr + b"\x00\x00" + struct.pack(f"{e}L", length & 0xFFFFFFFF)
        else:
            out += vr + struct.pack(f"{e}H", length)
        out += el.value
    return bytes(out)


def file_meta(sop_class: bytes, sop_instance: bytes, transfer_syntax: str) -> bytes:
    """A PS3.10 preamble, "DICM" and File Meta group (always explicit VR little endian)."""
    body = encode(
        [
            Element(0x00020001, "OB", b"\x00\x01"),
            Element(0x00020002, "UI", _even(sop_class, b"\x00")),
            Element(0x00020003, "UI", _even(sop_instance, b"\x00")),
            Element(0x00020010, "UI", _even(transfer_syntax.encode(), b"\x00")),
            Element(0x00020012, "UI", _even(b"1.2.826.0.1.3680043.8.498.1", b"\x00")),
        ]
    )
    group_length = encode([Element(0x00020000, "UL", struct.pack("<L", len(body)))])
    return b"\x00" * 128 + b"DICM" + group_length + body


def _even(value: bytes, pad: bytes) -> bytes:
    return value + pad if len(value) % 2 else value


def text(value: str) -> bytes:
    return _even(value.encode("utf-8", "surrogatepass"), b" ")


# -- strategies (built once: building one per draw costs more than running the target) ------
#: Conformant UIDs (PS3.5 9.1): digit components without leading zeros, dots, <= 64 chars.
VALID_UIDS: st.SearchStrategy[str] = st.lists(
    st.integers(min_value=0, max_value=10**6).map(str), min_size=1, max_size=4
).map(lambda parts: "1.2.826.0.1.3680043.8.498.99." + ".".join(parts))


#: What a hostile or broken sender puts where a UID belongs.
HOSTILE_UIDS = (
    "",
    " ",
    "../../x",
    "..",
    "/etc/passwd",
    "1.2.3\\4.5",  # two values
    "1.2.3 4",
    "1.2.é",
    "1.2.3\x00\x00",
    "1" * 65,
    "9" * 200,
    "1.2.3?x=1#y",
    "\u202e1.2.3",
    "1.2.3\n4",
)


#: The bytes of a UI value: mostly valid, often hostile, sometimes anything.
UID_BYTES: st.SearchStrategy[bytes] = st.one_of(
    VALID_UIDS.map(lambda u: _even(u.encode(), b"\x00")),
    st.sampled_from(HOSTILE_UIDS).map(text),
    st.text(max_size=80).map(text),
    st.binary(max_size=80),
)
#: A claimed value length: the true one, undefined, or any 32-bit lie.
LENGTHS: st.SearchStrategy[int | None] = st.one_of(
    st.none(), st.just(UNDEFINED), st.integers(min_value=0, max_value=0xFFFFFFFF)
)
#: Random elements: any tag (items, delimiters, group 2 and private ones included), any VR.
GARBAGE_ELEMENTS: st.SearchStrategy[list[Element]] = st.lists(
    st.builds(
        Element,
        st.one_of(
            st.integers(min_value=0, max_value=0xFFFFFFFF),
            st.sampled_from(
                [0x00020010, 0x00080005, 0x00280010, 0x00280100, 0xFFFEE000, 0xFFFEE0DD, PIXEL_DATA]
            ),
        ),
        st.one_of(
            st.sampled_from(ALL_VRS), st.binary(min_size=2, max_size=2).map(lambda b: b.decode("latin-1"))
        ),
        st.binary(max_size=64),
        LENGTHS,
    ),
    max_size=4,
)


# -- Upper Layer PDUs (PS3.8 9.3), for raw streams at a live SCP --------------------------
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, len(body)) + body


def associate_rq(called: bytes = b"RADBRIDGE", calling: bytes = b"FUZZSCU") -> bytes:
    """An A-ASSOCIATE-RQ proposing CT Image Storage and Verification, implicit/explicit VR LE."""
    contexts = b""
    for context_id, abstract in ((1, CT_IMAGE_STORAGE), (3, VERIFICATION)):
        sub = (
            _item(0x30, abstract.encode())
            + _item(0x40, IMPLICIT_LE.encode())
            + _item(0x40, EXPLICIT_LE.encode())
        )
        contexts += _item(0x20, bytes([context_id, 0, 0, 0]) + sub)
    user = _item(0x51, struct.pack(">L", 16384)) + _item(0x52, b"1.2.826.0.1.3680043.8.498.1")
    body = (
        b"\x00\x01\x00\x00"
        + called.ljust(16)[:16]
        + calling.ljust(16)[:16]
        + b"\x00" * 32
        + _item(0x10, APPLICATION_CONTEXT.encode())
        + contexts
        + _item(0x50, user)
    )
    return pdu(0x01, body)


def p_data(pdvs: list[tuple[int, int, bytes]]) -> bytes:
    """A P-DATA-TF PDU of (presentation context ID, message control header, fragment) PDVs."""
    return pdu(0x04, b"".join(struct.pack(">LBB", len(f) + 2, cid, mch) + f for cid, mch, f in pdvs))


def c_store_rq_command(sop_class: bytes, sop_instance: bytes, message_id: int = 1) -> bytes:
    """A C-STORE-RQ command set (implicit VR little endian, PS3.7 9.3.1.1)."""
    body = encode(
        [
            Element(0x00000002, "UI", _even(sop_class, b"\x00")),
            Element(0x00000100, "US", struct.pack("<H", 0x0001)),
            Element(0x00000110, "US", struct.pack("<H", message_id & 0xFFFF)),
            Element(0x00000700, "US", struct.pack("<H", 0)),
            Element(0x00000800, "US", struct.pack("<H", 0x0000)),  # a data set follows
            Element(0x00001000, "UI", _even(sop_instance, b"\x00")),
        ],
        explicit=False,
    )
    return encode([Element(0x00000000, "UL", struct.pack("<L", len(body)))], explicit=False) + body
