"""No patient data in the logs of `radbridge serve`, at its default level and at DEBUG.

A study whose patient has distinctive identifiers goes through the whole node
(C-STORE by dcmtk, quiet window, routing, the embedded reference service, SEG +
SRs written), together with the error paths: an instance refused for a hostile
UID, one whose birth date and name are malformed (pydicom warns about such
values, quoting them; the results carry the birth date repaired), a series that cannot form a volume (job FAILED), a STOW-RS
part that is not DICOM and one refused for its UID. Everything the process
prints (stdout and stderr: JSON log lines, warnings, tracebacks) is searched for
the identifiers, in the forms they may take.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from io import BytesIO
from pathlib import Path

import httpx
import pydicom
import pytest

from radbridge.synth import SyntheticPatient, ct_series, write_series
from tests.peers import dcmtk_env, free_port, storescu

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.usefixtures("require_dcmtk"),
    # writing the malformed inputs
    pytest.mark.filterwarnings(
        "ignore:Invalid value for VR:UserWarning", "ignore:The PN component:UserWarning"
    ),
]

PATIENT = SyntheticPatient(
    name="Zzyzx^Quintessa", patient_id="PID-93817", birth_date="19410923", accession="ACC-58213"
)
#: The identifiers and the forms they can take in a log: whole, in parts, DICOM-encoded, reformatted.
NEEDLES = (
    "Zzyzx^Quintessa",
    "Zzyzx",
    "Quintessa",
    "PID-93817",
    "93817",
    "19410923",
    "1941-09-23",
    "ACC-58213",
    "58213",
)
WAIT_S = 180


def _config(tmp_path: Path, level: str) -> tuple[Path, int, int]:
    scp_port, http_port = free_port(), free_port()
    cfg = tmp_path / "radbridge.toml"
    cfg.write_text(
        f"""
[scp]
port = {scp_port}

[http]
port = {http_port}

[spool]
directory = "{tmp_path / "spool"}"
min_free_bytes = 0

[completion]
quiet_window_s = 1.0

[worker]
poll_interval_s = 0.2
max_attempts = 1

[logging]
level = "{level}"
"""
    )
    return cfg, scp_port, http_port


def _encode(ds: pydicom.Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _variant(template: Path, out: Path, **values: str) -> Path:
    """A copy of ``template`` as a new instance of a new series, with ``values`` set (unchecked)."""
    ds = pydicom.dcmread(template)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"2.25.{uuid.uuid4().int}"
    ds.SeriesInstanceUID = f"2.25.{uuid.uuid4().int}"
    for keyword, value in values.items():
        ds[keyword].value = value
    ds.save_as(out, enforce_file_format=True)
    return out


def _wait_for(log: Path, predicate: str, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if predicate in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.3)
    raise AssertionError(f"{predicate!r} not logged in time:\n{log.read_text(errors='replace')[-4000:]}")


@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
def test_no_patient_identifier_in_any_log_line(tmp_path: Path, level: str) -> None:
    cfg, scp_port, http_port = _config(tmp_path, level)
    ct = write_series(ct_series(n_slices=6, patient=PATIENT, seed=21), tmp_path / "ct")
    bad = write_series(ct_series(n_slices=8, patient=PATIENT, seed=22), tmp_path / "bad")
    twin = pydicom.dcmread(bad[4])  # two images at one position with different pixels: no volume,
    twin.ImagePositionPatient = pydicom.dcmread(bad[3], stop_before_pixels=True).ImagePositionPatient
    twin.save_as(bad[4])  # so the job fails with its reason
    hostile = _variant(ct[0], tmp_path / "hostile.dcm", StudyInstanceUID="../../x")
    malformed = _variant(
        ct[0], tmp_path / "malformed.dcm", PatientBirthDate="1941-09-23", PatientName="Zzyzx^Quintessa" * 5
    )

    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "radbridge.cli", "serve", "--config", str(cfg)],
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "TCP_NODELAY": "1", "PYTHONWARNINGS": "default"},
        )
        try:
            _wait_for(log_path, "listening on", proc)
            sent = storescu([*ct, *bad, malformed], "127.0.0.1", scp_port, "RADBRIDGE")
            assert sent.returncode == 0 and not sent.errors, sent.stderr
            refused = subprocess.run(
                ["storescu", "-v", "-aec", "RADBRIDGE", "127.0.0.1", str(scp_port), str(hostile)],
                capture_output=True,
                text=True,
                env=dcmtk_env(),
                timeout=60,
            )
            assert "Received Store Response (Error: CannotUnderstand)" in refused.stdout + refused.stderr
            boundary = uuid.uuid4().hex
            parts = [b"not a DICOM file " + PATIENT.name.encode(), _encode(pydicom.dcmread(hostile))]
            body = (
                b"".join(
                    f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n"
                    for p in parts
                )
                + f"--{boundary}--\r\n".encode()
            )
            stow = httpx.post(
                f"http://127.0.0.1:{http_port}/dicom-web/studies",
                content=body,
                headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'},
                timeout=60,
            )
            assert stow.status_code == 409, stow.text
            _wait_for(log_path, '"analyze.written"', proc)
            _wait_for(log_path, '"repaired_values": "PatientBirthDate"', proc)  # the malformed one's
            _wait_for(log_path, '"to": "FAILED"', proc)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    text = log_path.read_text(errors="replace")
    lines = text.splitlines()
    assert any('"C-STORE refused"' in ln for ln in lines)  # the error paths did log
    assert any('"STOW-RS part refused"' in ln for ln in lines)
    assert len(lines) > 5
    if level == "DEBUG":
        assert any('"level": "DEBUG"' in ln for ln in lines)
    outputs = list((tmp_path / "spool" / "outputs").rglob("*.dcm"))
    assert outputs, "the pipeline produced no objects"
    assert any(PATIENT.patient_id in str(pydicom.dcmread(p).PatientID) for p in outputs)  # PHI is there...
    lowered = text.lower()
    leaks = {n: [ln for ln in lines if n.lower() in ln.lower()][:3] for n in NEEDLES if n.lower() in lowered}
    assert not leaks, f"patient data in the {level} log: " + json.dumps(leaks, indent=1, ensure_ascii=False)
