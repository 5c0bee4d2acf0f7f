"""Fuzz STOW-RS: generated bodies, boundaries, media types and truncations against the node's app.

Every request goes through ``dicom_node.http.create_app`` (Starlette's TestClient, which
re-raises any exception the app lets escape). Each answer must be a specific status with a
JSON body: 200/202/409 with a DICOM JSON STOW response whose lists agree with the status and
the index, or 400/413/415 with ``{"error": ...}``; never a 500. Nothing is left in staging,
and the instance stored before the run is untouched.
"""

from __future__ import annotations

import hashlib
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from dicom_node.config import HttpSection, NodeSettings, SpoolSection
from dicom_node.http import DICOMWEB_ROOT, create_app
from dicom_node.index import Index
from dicom_node.spool import Spool
from tests.fuzz import count_input, examples
from tests.fuzz.dicom_bytes import (
    CT_IMAGE_STORAGE,
    EXPLICIT_LE,
    GARBAGE_ELEMENTS,
    JPEG_BASELINE,
    MODALITY,
    SERIES_INSTANCE_UID,
    SOP_CLASS_UID,
    SOP_INSTANCE_UID,
    STUDY_INSTANCE_UID,
    TRANSFER_SYNTAXES,
    UID_BYTES,
    VALID_UIDS,
    Element,
    encode,
    file_meta,
    text,
)

pytestmark = [pytest.mark.fuzz, pytest.mark.timeout(240), pytest.mark.filterwarnings("ignore::UserWarning")]

MAX_PART_BYTES = 2048
MAX_REQUEST_BYTES = 8192
STUDY = "1.2.826.0.1.3680043.8.498.66"
SENTINEL_UID = "1.2.826.0.1.3680043.8.498.66.1.1"
#: FailureReasons a refused part may get: cannot understand (0xCxxx, 0xC409 other study),
#: out of resources for a part over http.max_part_bytes (0xA700). Not 0x0110 (an unexpected error).
PART_REASONS = frozenset(range(0xC000, 0xD000)) | {0xA700}
REQUEST_ERRORS = {400, 413, 415}
SEQ_STORED, SEQ_FAILED, REASON, INSTANCE = "00081199", "00081198", "00081197", "00081155"


def _instance(
    sop: bytes, study: bytes = text(STUDY), ts: str = EXPLICIT_LE, extra: list[Element] = ()
) -> bytes:  # type: ignore[assignment]
    elements = [
        Element(SOP_CLASS_UID, "UI", text(CT_IMAGE_STORAGE)),
        Element(SOP_INSTANCE_UID, "UI", sop),
        Element(STUDY_INSTANCE_UID, "UI", study),
        Element(SERIES_INSTANCE_UID, "UI", text(STUDY + ".1")),
        Element(MODALITY, "CS", b"CT"),
        *extra,
    ]
    return file_meta(text(CT_IMAGE_STORAGE), sop, ts) + encode(sorted(elements, key=lambda e: e.tag))


@pytest.fixture(scope="module")
def node() -> Iterator[tuple[TestClient, Spool, Index]]:
    shm = Path("/dev/shm")
    root = Path(tempfile.mkdtemp(prefix="radbridge-fuzz-stow-", dir=shm if shm.is_dir() else None))
    settings_ = NodeSettings(
        spool=SpoolSection(directory=root / "spool", min_free_bytes=0),
        http=HttpSection(max_part_bytes=MAX_PART_BYTES, max_request_bytes=MAX_REQUEST_BYTES),
    )
    spool = Spool(settings_.spool.directory)
    index = Index(spool.index_path)
    with TestClient(create_app(settings_, spool, index)) as client:
        yield client, spool, index
    index.close()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def sentinel(node: tuple[TestClient, Spool, Index]) -> tuple[Path, str]:
    client, spool, index = node
    body = (
        b"--b\r\nContent-Type: application/dicom\r\n\r\n" + _instance(text(SENTINEL_UID)) + b"\r\n--b--\r\n"
    )
    response = client.post(f"{DICOMWEB_ROOT}/studies", content=body, headers={"Content-Type": _ct("b")})
    assert response.status_code == 200, response.text
    path = spool.instance_path(STUDY, STUDY + ".1", SENTINEL_UID)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def _ct(boundary: str) -> str:
    return f'multipart/related; type="application/dicom"; boundary={boundary}'


_BCHARS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'()+_,-./:=?"
_BOUNDARIES = st.one_of(
    st.text(alphabet=_BCHARS, min_size=1, max_size=70).filter(lambda b: not b.endswith(" ")),
    st.sampled_from(["", " ", "a" * 200, 'quo"te', "semi;colon", "new\r\nline", "é", "--", "b"]),
)
_OFTEN = st.integers(0, 9).map(bool)  # True nine times in ten


@st.composite
def content_types(draw: st.DrawFn, boundary: str) -> str:
    if draw(_OFTEN):
        return draw(
            st.sampled_from(
                [_ct(boundary), f'multipart/related; type=application/dicom; boundary="{boundary}"']
            )
        )
    return draw(
        st.one_of(
            st.sampled_from(
                [
                    f"multipart/related; boundary={boundary}",  # no type: allowed
                    f'multipart/related; type="application/dicom+json"; boundary={boundary}',
                    f"multipart/form-data; boundary={boundary}",
                    "multipart/related; type=application/dicom",
                    "application/dicom",
                    "",
                    ";;;",
                    f"multipart/related; boundary={boundary}; boundary=other",
                ]
            ),
            st.text(max_size=80).filter(lambda t: t.isascii() and "\n" not in t and "\r" not in t),
        )
    )


@st.composite
def payloads(draw: st.DrawFn) -> tuple[bytes, str]:
    """(part bytes, what they are)."""
    kind = draw(
        st.sampled_from(
            ["dicom", "dicom", "dicom", "no_preamble", "hostile_uid", "truncated", "garbage", "big"]
        )
    )
    sop = text(draw(VALID_UIDS))
    if kind == "dicom":
        return _instance(sop, ts=draw(st.sampled_from(TRANSFER_SYNTAXES)), extra=draw(GARBAGE_ELEMENTS)), kind
    if kind == "no_preamble":  # as dicomweb-client sends: meta group first
        return _instance(sop)[132:], kind
    if kind == "hostile_uid":
        return _instance(draw(UID_BYTES), study=draw(st.one_of(st.just(text(STUDY)), UID_BYTES))), kind
    if kind == "truncated":
        data = _instance(sop)
        return data[: draw(st.integers(0, len(data) - 1))], kind
    if kind == "big":
        return _instance(sop, extra=[Element(0x00091010, "OB", b"\x00" * MAX_PART_BYTES)]), kind
    return draw(st.binary(max_size=300)), kind


_HEADERS = st.one_of(
    st.just(b"Content-Type: application/dicom\r\n"),
    st.sampled_from(
        [b"", b"Content-Type: text/plain\r\n", b"content-type:APPLICATION/DICOM\r\n", b"X: y\r\n"]
    ),
    st.binary(max_size=40).map(lambda b: b.replace(b"\r\n", b"") + b"\r\n"),
)


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str, bytes, list[str]]:
    """(path, Content-Type, body, kinds of the parts)."""
    if draw(_OFTEN):
        boundary = draw(st.text(alphabet="0123456789abcdefXYZ-_", min_size=1, max_size=40))
    else:
        boundary = draw(_BOUNDARIES)
    headers = st.just(b"Content-Type: application/dicom\r\n") if draw(_OFTEN) else _HEADERS
    parts = draw(st.lists(st.tuples(headers, payloads()), min_size=1 if draw(_OFTEN) else 0, max_size=4))
    delimiter = f"--{boundary}".encode("utf-8", "replace")
    body = draw(st.sampled_from([b"", b"", b"preamble text\r\n", b"\r\n"]))
    for headers, (data, _) in parts:
        body += delimiter + b"\r\n" + headers + b"\r\n" + data + b"\r\n"
    if draw(_OFTEN):
        body += delimiter + b"--\r\n"
    if not draw(_OFTEN):
        body = body[: draw(st.integers(0, len(body)))]
    if not draw(_OFTEN):
        body = body.replace(b"\r\n", b"\n")
    path = f"{DICOMWEB_ROOT}/studies" + (draw(st.sampled_from(["", "", f"/{STUDY}", "/1.2.3", "/x"])))
    return path, draw(content_types(boundary)), body, [kind for _, (_, kind) in parts]


def _check_stow_response(doc: dict[str, Any], status: int, index: Index) -> tuple[int, int]:
    stored = doc.get(SEQ_STORED, {}).get("Value", [])
    failed = doc.get(SEQ_FAILED, {}).get("Value", [])
    for item in stored:  # answered stored -> indexed
        assert index.has_instance(item[INSTANCE]["Value"][0])
    for item in failed:
        assert item[REASON]["Value"][0] in PART_REASONS, hex(item[REASON]["Value"][0])
    if status == 200:
        assert stored and not failed
    elif status == 202:
        assert stored and failed
    elif status == 409:
        assert failed and not stored
    return len(stored), len(failed)


@settings(max_examples=examples(1200))
@given(request=requests())
@example(request=(f"{DICOMWEB_ROOT}/studies", _ct("b"), b"--b\r\n\r\n" + b"x" * 10, ["garbage"]))  # truncated
# A complete part, then a malformed header line in the same chunk: the first part was left in staging.
@example(
    request=(
        f"{DICOMWEB_ROOT}/studies",
        _ct("0"),
        b"--0\r\n\r\n" + _instance(text(STUDY + ".9")) + b"\r\n--0\r\n\x00\r\n\r\nxx\r\n--0--\r\n",
        ["dicom", "garbage"],
    )
)
def test_stow_answers_specifically_and_keeps_what_it_stored(
    node: tuple[TestClient, Spool, Index],
    sentinel: tuple[Path, str],
    request: tuple[str, str, bytes, list[str]],
) -> None:
    client, spool, index = node
    path, content_type, body, kinds = request
    for leftover in spool.staging_dir.iterdir():  # each example starts clean: a leak is its own
        leftover.unlink()
    response = client.post(path, content=body, headers={"Content-Type": content_type.encode()})  # raw bytes
    status = response.status_code
    assert status in {200, 202, 409} | REQUEST_ERRORS, (status, response.text)
    doc = response.json()
    if status in REQUEST_ERRORS:
        assert doc["error"]["code"] == status and doc["error"]["message"]
        if "result" in doc:  # parts stored before the request-level error stay stored and listed
            _check_stow_response(doc["result"], 0, index)
    else:
        assert response.headers["content-type"].startswith("application/dicom+json")
        _check_stow_response(doc, status, index)
    assert not any(spool.staging_dir.iterdir()), "a part was left in staging"
    sentinel_path, digest = sentinel
    assert index.has_instance(SENTINEL_UID)
    assert hashlib.sha256(sentinel_path.read_bytes()).hexdigest() == digest
    count_input("stow", str(status))


def test_wado_frame_that_would_abort_the_decoder_is_406(node: tuple[TestClient, Spool, Index]) -> None:
    """Regression (found by the volume fuzz): python-gdcm aborts the process on a JPEG frame that claims
    64 bits. Such an instance is stored (ingest never decodes); transcoding its frame is refused."""
    client, _, _ = node
    sop = STUDY + ".64"
    fragment = (
        struct.pack("<HHL", 0xFFFE, 0xE000, 0) + struct.pack("<HHL", 0xFFFE, 0xE000, 16) + b"\x64\x1e" * 8
    )
    pixels = [
        Element(0x00280002, "US", struct.pack("<H", 1)),
        Element(0x00280004, "CS", b"MONOCHROME2 "),
        Element(0x00280010, "US", struct.pack("<H", 8)),
        Element(0x00280011, "US", struct.pack("<H", 6)),
        Element(0x00280100, "US", struct.pack("<H", 64)),
        Element(0x00280101, "US", struct.pack("<H", 64)),
        Element(0x00280102, "US", struct.pack("<H", 63)),
        Element(0x00280103, "US", struct.pack("<H", 1)),
        Element(0x7FE00010, "OB", fragment + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0), 0xFFFFFFFF),
    ]
    body = b"--b\r\n\r\n" + _instance(text(sop), ts=JPEG_BASELINE, extra=pixels) + b"\r\n--b--\r\n"
    stored = client.post(f"{DICOMWEB_ROOT}/studies", content=body, headers={"Content-Type": _ct("b")})
    assert stored.status_code == 200, stored.text
    frame = f"{DICOMWEB_ROOT}/studies/{STUDY}/series/{STUDY}.1/instances/{sop}/frames/1"
    refused = client.get(frame, headers={"Accept": "multipart/related; type=application/octet-stream"})
    assert refused.status_code == 406
    assert "Bits Allocated 64" in refused.json()["error"]["message"]
    as_stored = client.get(
        frame, headers={"Accept": 'multipart/related; type="image/jpeg"; transfer-syntax=*'}
    )
    assert as_stored.status_code == 200 and b"\x64\x1e" * 8 in as_stored.content
