"""Fuzz the C-STORE path: the handler with generated data sets, and the live SCP with raw bytes.

(a) ``handle_store`` gets the data set bytes a peer could send (any VR for any
tag, garbled or hostile UIDs, odd transfer syntaxes, truncations, lying
lengths): each is stored intact or refused with a specific DIMSE status and an
Error Comment; no exception escapes, nothing is left in staging, and the
instance accepted before the run is untouched.
(b) Raw byte streams at a live SCP (garbage, truncated A-ASSOCIATE-RQ, bad
P-DATA after a real association): the SCP keeps serving (dcmtk echoscu and a
C-STORE succeed afterwards) and what it accepted before is intact.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import struct
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pynetdicom import _config, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.presentation import PresentationContextTuple

from dicom_node.config import ScpSection
from dicom_node.group_commit import GroupCommitter
from dicom_node.index import Index
from dicom_node.scp import handle_store, start_scp
from dicom_node.spool import Spool
from radbridge.synth import ct_series, write_series
from tests.conftest import staged_data
from tests.fuzz import count_input, examples
from tests.fuzz.dicom_bytes import (
    CT_IMAGE_STORAGE,
    EXPLICIT_LE,
    GARBAGE_ELEMENTS,
    IMPLICIT_LE,
    LENGTHS,
    MODALITY,
    PATIENT_NAME,
    PIXEL_DATA,
    SERIES_INSTANCE_UID,
    SOP_CLASS_UID,
    SOP_INSTANCE_UID,
    SPECIFIC_CHARACTER_SET,
    STUDY_INSTANCE_UID,
    TRANSFER_SYNTAXES,
    UID_BYTES,
    VALID_UIDS,
    Element,
    associate_rq,
    c_store_rq_command,
    encode,
    p_data,
    pdu,
    text,
)
from tests.peers import echoscu, missing_tools, storescu

#: pydicom warns about each invalid value it reads (UserWarning); in service that is a log line, so
#: here too, rather than the suite's warnings-as-errors turning it into an exception mid-parse.
pytestmark = [pytest.mark.fuzz, pytest.mark.timeout(240), pytest.mark.filterwarnings("ignore::UserWarning")]

#: Statuses a refused hostile instance may get: "cannot understand" (0xCxxx), "data set does not
#: match SOP class" (0xA9xx), "SOP class not supported" (0x0122). Not 0xA700: on a healthy spool
#: that is the catch-all for an unexpected exception, and it tells the sender to retry for ever.
REFUSAL_STATUSES = frozenset(range(0xC000, 0xD000)) | frozenset(range(0xA900, 0xAA00)) | {0x0122}
SENTINEL_UID = "1.2.826.0.1.3680043.8.498.77.1"
OTHER_UID = "1.2.826.0.1.3680043.8.498.77.2"


def _fast_dir(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """A directory on tmpfs when there is one: thousands of fsyncs cost nothing there, and the
    fuzz is about parsing and refusal, not about the disk (tests/unit cover durability)."""
    shm = Path("/dev/shm")
    if shm.is_dir():
        import tempfile

        return Path(tempfile.mkdtemp(prefix=f"radbridge-fuzz-{name}-", dir=shm))
    return tmp_path_factory.mktemp(name)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Spool, Index, GroupCommitter]]:
    import shutil

    root = _fast_dir(tmp_path_factory, "cstore")
    spool = Spool(root / "spool")
    index = Index(spool.index_path)
    chunked = _config.STORE_RECV_CHUNKED_DATASET
    _config.STORE_RECV_CHUNKED_DATASET = False  # the handler writes the bytes it is given
    try:
        yield spool, index, GroupCommitter(index)
    finally:
        _config.STORE_RECV_CHUNKED_DATASET = chunked
        index.close()
        shutil.rmtree(root, ignore_errors=True)


def _event(stream: bytes, transfer_syntax: str, sop_class: str, sop_instance: str) -> evt.Event:
    """The event pynetdicom hands the C-STORE handler (non-streamed mode)."""
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = sop_class
    try:
        request.AffectedSOPInstanceUID = sop_instance
    except ValueError:  # pynetdicom drops such a command before any handler: the SCU sends another
        request.AffectedSOPInstanceUID = OTHER_UID
    request.DataSet = BytesIO(stream)
    assoc = SimpleNamespace(is_requestor=False, requestor=SimpleNamespace(ae_title="FUZZSCU"))  # we accept it
    context = PresentationContextTuple(1, sop_class, transfer_syntax)
    return evt.Event(assoc, evt.EVT_C_STORE, {"request": request, "context": context})  # type: ignore[arg-type]


def _decoded(uid: bytes) -> str:
    """The UID string an SCU puts in the command set for the data set's UI bytes."""
    return uid.decode("latin-1").rstrip("\x00 ").strip()


def _store(node: tuple[Spool, Index, GroupCommitter], stream: bytes, ts: str, cls: str, inst: str) -> int:
    spool, index, committer = node
    result = handle_store(_event(stream, ts, cls, inst), spool, index, committer)
    if isinstance(result, Dataset):
        assert result.Status in REFUSAL_STATUSES, (hex(result.Status), result.get("ErrorComment"))
        assert str(result.get("ErrorComment", "")).strip(), "a refusal says why"
        return int(result.Status)
    assert result == 0x0000
    return 0


@pytest.fixture(scope="module")
def sentinel(node: tuple[Spool, Index, GroupCommitter]) -> tuple[Path, str]:
    """One instance accepted before the fuzz run: it must stay stored and byte-identical."""
    stream = encode(
        [
            Element(SOP_CLASS_UID, "UI", text(CT_IMAGE_STORAGE)),
            Element(SOP_INSTANCE_UID, "UI", text(SENTINEL_UID)),
            Element(STUDY_INSTANCE_UID, "UI", text(SENTINEL_UID + ".1")),
            Element(SERIES_INSTANCE_UID, "UI", text(SENTINEL_UID + ".2")),
            Element(MODALITY, "CS", b"CT"),
        ]
    )
    assert _store(node, stream, EXPLICIT_LE, CT_IMAGE_STORAGE, SENTINEL_UID) == 0
    spool = node[0]
    path = spool.instance_path(SENTINEL_UID + ".1", SENTINEL_UID + ".2", SENTINEL_UID)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_intact(node: tuple[Spool, Index, GroupCommitter], sentinel: tuple[Path, str]) -> None:
    spool, index, _ = node
    path, digest = sentinel
    assert index.has_instance(SENTINEL_UID)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert not staged_data(spool.staging_dir), "a refused or stored instance left a staging file"


def _indexed_path(index: Index, sop_instance: str) -> Path:
    """Where the index says an instance is (read back as QIDO/WADO would find it)."""
    row = (
        index._conn()
        .execute("SELECT path FROM instances WHERE sop_instance_uid=?", (sop_instance,))
        .fetchone()
    )
    assert row is not None, "answered 0x0000 but not indexed"
    return Path(row[0])


_REQUIRED = (SOP_CLASS_UID, SOP_INSTANCE_UID, STUDY_INSTANCE_UID, SERIES_INSTANCE_UID)
_UID_VRS = st.sampled_from(["UI", "UI", "UI", "LO", "SQ", "UN", "OB", "US"])
_MODALITIES = st.sampled_from([b"CT", b"MR", b"", b"C\\T", b"\xff\xfe"])
_CHARSETS = st.sampled_from([b"ISO_IR 192", b"GB18030 ", b"XYZ ", b"\\ISO 2022 IR 87", b"ISO_IR 100"])
_OTHER_INSTANCE = st.one_of(VALID_UIDS, st.text(max_size=70))
_VALID_UID_BYTES = VALID_UIDS.map(text)
_OFTEN = st.integers(0, 4).map(bool)  # True four times in five


@st.composite
def cstore_inputs(draw: st.DrawFn) -> tuple[bytes, str, str, str]:
    """(data set bytes, context transfer syntax, request SOP class, request SOP instance)."""
    # Each required UID: valid and in a UI element four times in five, else hostile; missing 1 in 20.
    uids = {tag: draw(_VALID_UID_BYTES if draw(_OFTEN) else UID_BYTES) for tag in _REQUIRED}
    if draw(st.booleans()):
        uids[SOP_CLASS_UID] = text(CT_IMAGE_STORAGE)
    elements = [
        Element(tag, "UI" if draw(_OFTEN) else draw(_UID_VRS), value)
        for tag, value in uids.items()
        if draw(st.integers(0, 19))
    ]
    elements.append(Element(MODALITY, "CS", draw(_MODALITIES)))
    if draw(st.booleans()):
        elements.append(Element(SPECIFIC_CHARACTER_SET, "CS", draw(_CHARSETS)))
        elements.append(Element(PATIENT_NAME, "PN", draw(st.binary(max_size=40))))
    elements += draw(GARBAGE_ELEMENTS)
    if draw(st.booleans()):
        vr = draw(st.sampled_from(["OW", "OB"]))
        elements.append(Element(PIXEL_DATA, vr, draw(st.binary(max_size=200)), draw(LENGTHS)))
    if draw(st.booleans()):
        elements.sort(key=lambda e: e.tag)
    stream = encode(elements, explicit=draw(st.booleans()), little=draw(_OFTEN))
    if not draw(_OFTEN):  # truncated in flight
        stream = stream[: draw(st.integers(0, len(stream)))]
    ts = draw(st.sampled_from(TRANSFER_SYNTAXES))
    sop_instance = _decoded(uids[SOP_INSTANCE_UID])
    if draw(st.integers(0, 5)) == 0:  # the command names another instance than the data set
        sop_instance = draw(_OTHER_INSTANCE)
    return stream, ts, CT_IMAGE_STORAGE, sop_instance


@settings(max_examples=examples(2500))
@given(inputs=cstore_inputs())
@example(  # '../../x' as every UID: stored under hashed names or refused, never outside the spool
    inputs=(
        encode(
            [
                Element(t, "UI", text("../../x"))
                for t in (SOP_CLASS_UID, SOP_INSTANCE_UID, STUDY_INSTANCE_UID, SERIES_INSTANCE_UID)
            ]
        ),
        IMPLICIT_LE,
        CT_IMAGE_STORAGE,
        "../../x",
    )
)
def test_handler_stores_intact_or_refuses_specifically(
    node: tuple[Spool, Index, GroupCommitter], sentinel: tuple[Path, str], inputs: tuple[bytes, str, str, str]
) -> None:
    stream, ts, sop_class, sop_instance = inputs
    spool, index, _ = node
    status = _store(node, stream, ts, sop_class, sop_instance)
    count_input("cstore.handler", "stored" if status == 0 else f"0x{status:04X}")
    if status == 0:
        path = _indexed_path(index, sop_instance)
        assert path.resolve().is_relative_to(spool.root.resolve())
        assert path.read_bytes().endswith(stream)  # stored as sent (after the File Meta group)
        assert pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID == sop_instance
    _assert_intact(node, sentinel)


# -- (b) raw byte streams at a live SCP ------------------------------------------------------
@pytest.fixture(scope="module")
def live_scp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Spool, Index]]:
    """The node's SCP on a free loopback port, with one instance stored through it by dcmtk."""
    import shutil

    if missing_tools("echoscu", "storescu"):
        pytest.skip("dcmtk echoscu/storescu missing; apt-get install dcmtk")
    root = _fast_dir(tmp_path_factory, "scp")
    spool = Spool(root / "spool")
    index = Index(spool.index_path)
    # Limits high enough that the fuzz's own leftover connections never refuse the checking peer;
    # the fuzz's connections hang up at once, so ARTIM need not be short: it is also pynetdicom's ACSE
    # timeout, and 0.2 s aborted the checking echoscu now and then on a loaded 2-core machine.
    settings_ = ScpSection(
        port=0,
        ae_title="RADBRIDGE",
        max_associations=64,
        max_associations_per_peer=64,
        first_pdu_timeout_s=2.0,
    )
    server = start_scp(settings_, spool, index)
    try:
        yield server.server_address[1], spool, index
    finally:
        server.shutdown()
        server.server_close()
        index.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def live_sentinel(
    live_scp: tuple[int, Spool, Index], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, str, str]:
    """A real CT instance stored by dcmtk storescu before the fuzz: (path, sha256, SOP Instance UID)."""
    port, spool, index = live_scp
    (path,) = write_series(ct_series(n_slices=1), tmp_path_factory.mktemp("live-sentinel"))
    result = storescu([path], "127.0.0.1", port, "RADBRIDGE")
    assert result.returncode == 0 and not result.errors, result.stdout + result.stderr
    ds = pydicom.dcmread(path)
    stored = spool.instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    return stored, hashlib.sha256(stored.read_bytes()).hexdigest(), str(ds.SOPInstanceUID)


_PDU_TYPES = st.one_of(st.sampled_from([0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07]), st.integers(0, 255))
_FRAGMENTS = st.one_of(
    st.binary(max_size=300),
    st.tuples(_VALID_UID_BYTES, UID_BYTES).map(lambda u: c_store_rq_command(text(CT_IMAGE_STORAGE), u[1])),
    st.tuples(UID_BYTES, _VALID_UID_BYTES).map(lambda u: c_store_rq_command(u[0], u[1])),
    st.builds(lambda es: encode(es), GARBAGE_ELEMENTS),
)
_PDVS = st.lists(
    st.tuples(st.sampled_from([1, 1, 3, 0, 255]), st.sampled_from([0, 1, 2, 3, 3, 0xFF]), _FRAGMENTS),
    min_size=1,
    max_size=4,
)


@st.composite
def raw_streams(draw: st.DrawFn) -> tuple[str, bytes, bytes]:
    """(kind, bytes sent first, bytes sent after the A-ASSOCIATE-AC if one came)."""
    kind = draw(
        st.sampled_from(["random", "bad_pdu", "truncated_rq", "mutated_rq", "bad_p_data", "bad_p_data"])
    )
    rq = associate_rq()
    if kind == "random":
        return kind, draw(st.binary(min_size=1, max_size=512)), b""
    if kind == "bad_pdu":
        header = struct.pack(
            ">BBL", draw(_PDU_TYPES), draw(st.integers(0, 255)), draw(st.integers(0, 2**32 - 1))
        )
        return kind, header + draw(st.binary(max_size=256)), b""
    if kind == "truncated_rq":
        return kind, rq[: draw(st.integers(1, len(rq) - 1))], b""
    if kind == "mutated_rq":
        mutated = bytearray(rq)
        for _ in range(draw(st.integers(1, 4))):
            mutated[draw(st.integers(0, len(rq) - 1))] = draw(st.integers(0, 255))
        return kind, bytes(mutated), b""
    # A proper association, then P-DATA that is wrong in one way or many.
    after = p_data(draw(_PDVS))
    if draw(st.booleans()):
        after = after[: draw(st.integers(1, len(after)))]
    if draw(st.booleans()):
        after += pdu(draw(_PDU_TYPES), draw(st.binary(max_size=64)))
    return kind, rq, after


def _send(port: int, first: bytes, after: bytes) -> None:
    """Send a stream the way a broken or hostile peer would, then hang up."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        try:
            sock.sendall(first)
            if after:
                header = _recv_exactly(sock, 6)
                if header[:1] == b"\x02":  # A-ASSOCIATE-AC: the association stands; now the bad data
                    _recv_exactly(sock, struct.unpack(">L", header[2:])[0])
                    sock.sendall(after)
                    sock.settimeout(0.05)
                    with contextlib.suppress(TimeoutError):
                        sock.recv(65536)  # whatever the SCP answers (a response, an A-ABORT, EOF)
        except OSError:
            pass  # the SCP closed or reset the connection: a fine answer to garbage


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionResetError("closed")
        data += chunk
    return data


@settings(max_examples=examples(80))
@given(stream=raw_streams())
@example(stream=("bad_p_data", associate_rq(), p_data([(1, 3, c_store_rq_command(b"1.2.3", b""))])))
def test_live_scp_keeps_serving_after_raw_garbage(
    live_scp: tuple[int, Spool, Index], live_sentinel: tuple[Path, str, str], stream: tuple[str, bytes, bytes]
) -> None:
    port, spool, index = live_scp
    kind, first, after = stream
    _send(port, first, after)
    echo = echoscu("127.0.0.1", port, "RADBRIDGE")
    assert echo.returncode == 0 and not echo.errors, echo.stdout + echo.stderr
    path, digest, sop_instance = live_sentinel
    assert index.has_instance(sop_instance)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    count_input("cstore.raw_socket", kind)
