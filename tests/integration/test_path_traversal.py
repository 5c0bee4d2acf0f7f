"""UIDs from the wire never name a path: hostile UIDs by C-STORE and STOW-RS are refused, nothing
is written outside the spool, and what was accepted before stays intact (and owner-only)."""

from __future__ import annotations

import stat
import subprocess
import uuid
from io import BytesIO
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from dicom_node.config import NodeSettings, SpoolSection
from dicom_node.http import HttpServer, create_app
from radbridge.synth import ct_series, write_series
from tests.conftest import StartScp, staged_data
from tests.peers import dcmtk_env, storescu

pytestmark = [
    pytest.mark.integration,
    pytest.mark.usefixtures("require_dcmtk"),
    # pydicom warns about each hostile UID it writes (here) and reads (in the node): as in production.
    pytest.mark.filterwarnings("ignore:Invalid value for VR UI:UserWarning"),
    pytest.mark.filterwarnings("ignore:The value length .* allowed for VR UI:UserWarning"),
]

HOSTILE_UIDS = {
    "parent": "../../x",
    "dotdot": "..",
    "absolute": "/tmp/radbridge-traversal-x",
    "nul": "1.2.3\x00/../../x",
    "backslash": "..\\..\\x",
    "long": "1." + "2" * 200,
}
UID_ATTRIBUTES = ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")
FAILURE_REASON, FAILED_SOP = "00081197", "00081198"


def _hostile(template: Dataset, keyword: str, uid: str) -> Dataset:
    ds = pydicom.dcmread(BytesIO(_encode(template)))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"2.25.{uuid.uuid4().int}"
    setattr(ds, keyword, uid)
    if keyword == "SOPInstanceUID":
        ds.file_meta.MediaStorageSOPInstanceUID = uid
    return ds


def _encode(ds: Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _tree(root: Path, skip: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if skip not in p.parents and p != skip}


def test_hostile_uids_are_refused_by_cstore_and_stow(tmp_path: Path, start_node_scp: StartScp) -> None:
    good_file, *_ = write_series(ct_series(n_slices=1, seed=3), tmp_path / "in")
    port, spool, index = start_node_scp()
    result = storescu([good_file], "127.0.0.1", port, "RADBRIDGE")
    assert result.returncode == 0 and not result.errors, result.stderr
    (stored,) = [p for p in (spool.root / "instances").rglob("*.dcm")]
    accepted = stored.read_bytes()
    assert pydicom.dcmread(stored).SOPInstanceUID == pydicom.dcmread(good_file).SOPInstanceUID
    outside_before = _tree(tmp_path, spool.root)

    template = pydicom.dcmread(good_file)
    hostile = [
        (k, name, _hostile(template, k, uid)) for k in UID_ATTRIBUTES for name, uid in HOSTILE_UIDS.items()
    ]

    # C-STORE: pynetdicom as the sender (it sends non-conformant UIDs; dcmtk's storescu may not).
    ae = AE(ae_title="EVIL")
    ae.add_requested_context(CTImageStorage, template.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="RADBRIDGE")
    assert assoc.is_established
    try:
        for keyword, name, ds in hostile:
            if keyword == "SOPInstanceUID" and name in ("backslash", "long"):
                continue  # pynetdicom refuses to send these as Affected SOP Instance UID; STOW below does
            status = assoc.send_c_store(ds)
            assert status.Status == 0xC000, (keyword, name, status)
            # The SOP Instance UID also travels in the C-STORE request, which is checked first.
            expected = "Affected SOP Instance UID" if keyword == "SOPInstanceUID" else keyword
            assert status.ErrorComment == f"Invalid UID in {expected}", (keyword, name)
    finally:
        assoc.release()

    # STOW-RS: the same objects in one request; each refused with FailureReason 0xC000, none stored.
    settings = NodeSettings(spool=SpoolSection(directory=spool.root))
    server = HttpServer(create_app(settings, spool, index), "127.0.0.1", 0)
    http_port = server.start()
    try:
        boundary = uuid.uuid4().hex
        body = (
            b"".join(
                f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + _encode(ds) + b"\r\n"
                for _, _, ds in hostile
            )
            + f"--{boundary}--\r\n".encode()
        )
        response = httpx.post(
            f"http://127.0.0.1:{http_port}/dicom-web/studies",
            content=body,
            headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'},
            timeout=60,
        )
    finally:
        server.stop()
    assert response.status_code == 409, response.text
    failed = response.json()[FAILED_SOP]["Value"]
    assert len(failed) == len(hostile)
    assert {item[FAILURE_REASON]["Value"][0] for item in failed} == {0xC000}

    # Nothing outside the spool, nothing new inside it, the accepted instance intact.
    assert _tree(tmp_path, spool.root) == outside_before
    assert not Path(HOSTILE_UIDS["absolute"]).exists()
    assert [p for p in (spool.root / "instances").rglob("*") if p.is_file()] == [stored]
    assert not staged_data(spool.root / "staging")  # (the empty spares made ahead aside)
    assert stored.read_bytes() == accepted
    assert index.count_instances() == 1
    for path in [spool.root, *spool.root.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), (path, oct(mode))


def test_storescu_with_a_hostile_uid_stores_nothing(tmp_path: Path, start_node_scp: StartScp) -> None:
    """dcmtk as the sender: whether it refuses the file itself or sends it, nothing is stored."""
    good_file, *_ = write_series(ct_series(n_slices=1, seed=4), tmp_path / "in")
    bad = _hostile(pydicom.dcmread(good_file), "StudyInstanceUID", HOSTILE_UIDS["parent"])
    bad_file = tmp_path / "bad.dcm"
    bad.save_as(bad_file, enforce_file_format=True)
    port, spool, index = start_node_scp()
    done = subprocess.run(
        ["storescu", "-v", "-aec", "RADBRIDGE", "127.0.0.1", str(port), str(bad_file)],
        capture_output=True,
        text=True,
        env=dcmtk_env(),
        timeout=60,
    )
    out = done.stdout + done.stderr
    # dcmtk 3.6.7 sends it; the node answers 0xC000 with its Error Comment, and storescu exits non-zero.
    assert "Received Store Response (Error: CannotUnderstand)" in out, out
    assert done.returncode != 0, out
    assert index.count_instances() == 0
    assert not [p for p in spool.root.rglob("*.dcm")]
