"""Real DICOM peers for tests: Orthanc (+ DICOMweb), dcmtk clients, dicom3tools/dcmtk validators.

Every server starts on loopback ports chosen by the OS and is stopped by the
test that started it. dcmtk tools (and Orthanc, which links dcmtk) run with
TCP_NODELAY=1 (dcmtk FAQ #48: Nagle's algorithm makes them ~30x slower).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

ORTHANC_BIN = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
DCIODVFY_IGNORED = ("needed to build DICOMDIR",)


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dcmtk_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def missing_tools(*names: str) -> list[str]:
    return [n for n in names if shutil.which(n) is None]


# -- dcmtk clients -------------------------------------------------------------------
@dataclass(frozen=True)
class ToolResult:
    returncode: int
    stdout: str
    stderr: str
    errors: list[str] = field(default_factory=list)  # "E:" / "F:" lines


def _run_dcmtk(args: list[str], timeout_s: float) -> ToolResult:
    proc = subprocess.run(args, capture_output=True, text=True, env=dcmtk_env(), timeout=timeout_s)
    lines = (proc.stdout + proc.stderr).splitlines()
    errors = [ln for ln in lines if ln.startswith(("E:", "F:"))]
    return ToolResult(proc.returncode, proc.stdout, proc.stderr, errors)


def storescu(
    paths: list[Path],
    host: str,
    port: int,
    called_aet: str,
    calling_aet: str = "STORESCU",
    timeout_s: float = 600,
    extra: list[str] | None = None,
) -> ToolResult:
    """dcmtk storescu -R: proposes exactly the files' SOP classes (SEG and 3D SR included).

    storescu exits 0 even when it skipped files ("E: No presentation context"),
    so callers must treat any ``errors`` line as a failure.
    """
    args = ["storescu", "-R", *(extra or []), "-aet", calling_aet, "-aec", called_aet, host, str(port)]
    args += map(str, paths)
    return _run_dcmtk(args, timeout_s)


def echoscu(
    host: str, port: int, called_aet: str, calling_aet: str = "ECHOSCU", extra: list[str] | None = None
) -> ToolResult:
    """``extra``: more options, e.g. dcmtk's TLS ones (``+tls key crt``, ``+cf ca.crt``)."""
    args = ["echoscu", *(extra or []), "-aet", calling_aet, "-aec", called_aet, host, str(port)]
    return _run_dcmtk(args, 30)


@contextlib.contextmanager
def storescp(out: Path, aet: str = "STORESCP", extra: list[str] | None = None) -> Iterator[int]:
    """dcmtk storescp on a free loopback port, writing into ``out``; yields the port once it
    accepts connections, and stops it on exit."""
    port = free_port()
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        ["storescp", *(extra or []), "-aet", aet, "-od", str(out), str(port)],
        env=dcmtk_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("storescp did not start") from None
                time.sleep(0.1)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


# -- hostile peers ------------------------------------------------------------------
#: What a port scanner or a broken client may send first. A PDU starts with its type, a reserved
#: byte and a 4-byte big-endian length (PS3.8 9.3); 0x01 is an A-ASSOCIATE-RQ.
GARBAGE_KINDS = ("random", "huge_pdu", "truncated_rq", "idle")
_TRUNCATED_RQ = (
    struct.pack(">BBL", 0x01, 0, 205)
    + b"\x00\x01\x00\x00"  # protocol version 1, reserved
    + b"RADBRIDGE".ljust(16)  # called AE title; the calling AE title and the items never come
)


def garbage_connection(
    kind: str, port: int, source: str = "127.0.0.1", rng: random.Random | None = None
) -> socket.socket:
    """Connect from ``source`` to 127.0.0.1:``port`` and send one kind of garbage.

    ``random``: 64 random bytes; ``huge_pdu``: an A-ASSOCIATE-RQ header announcing 0xFFFFFFFF
    bytes; ``truncated_rq``: the first bytes of an A-ASSOCIATE-RQ; ``idle``: nothing.
    The socket is left open (half-open, as an attacker holds it); the caller closes it.
    """
    payload = {
        "random": (rng or random.Random(0)).randbytes(64),
        "huge_pdu": struct.pack(">BBL", 0x01, 0, 0xFFFFFFFF),
        "truncated_rq": _TRUNCATED_RQ,
        "idle": b"",
    }[kind]
    sock = socket.create_connection(("127.0.0.1", port), timeout=2, source_address=(source, 0))
    with contextlib.suppress(OSError):  # the node may close it first; that is what it should do
        sock.sendall(payload)
    return sock


def closed_by_peer(sock: socket.socket, within_s: float) -> bool:
    """True if the other end closed ``sock`` (EOF or reset) within ``within_s`` seconds."""
    deadline = time.monotonic() + within_s
    try:
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            if not sock.recv(4096):
                return True
    except TimeoutError:
        return False
    except OSError:  # reset
        return True
    return False


# -- validators ----------------------------------------------------------------------
def dciodvfy(path: Path) -> list[str]:
    """The Error lines dciodvfy prints for a file (empty = valid)."""
    proc = subprocess.run(
        ["dciodvfy", str(path)], capture_output=True, text=True, errors="replace", timeout=120
    )
    lines = (proc.stdout + proc.stderr).splitlines()
    return [ln for ln in lines if ln.startswith("Error") and not any(i in ln for i in DCIODVFY_IGNORED)]


def dsrdump(path: Path) -> tuple[int, str]:
    proc = subprocess.run(
        ["dsrdump", str(path)], capture_output=True, text=True, errors="replace", timeout=120
    )
    return proc.returncode, proc.stdout + proc.stderr


def assert_valid_dicom_object(path: Path) -> None:
    """dciodvfy reports no Error; an SR also parses with dsrdump (exit 0, no E:/F: lines)."""
    errors = dciodvfy(path)
    assert not errors, f"dciodvfy errors in {path.name}:\n" + "\n".join(errors)
    import pydicom

    if pydicom.dcmread(path, stop_before_pixels=True).Modality == "SR":
        code, out = dsrdump(path)
        bad = [ln for ln in out.splitlines() if ln.startswith(("E:", "F:"))]
        assert code == 0 and not bad, f"dsrdump failed on {path.name} ({code}):\n" + "\n".join(bad)


# -- Orthanc -------------------------------------------------------------------------
class OrthancServer:
    """An Orthanc with its DICOMweb plugin, in a temporary directory, on free ports."""

    aet = "ORTHANC"

    def __init__(
        self,
        workdir: Path,
        modalities: dict[str, Any] | None = None,
        extra_config: dict[str, Any] | None = None,
    ) -> None:
        """``modalities``: Orthanc's DicomModalities (a list [AET, host, port] or an object with
        "AET", "Host", "Port" and "Allow…" keys, e.g. "AllowStorageCommitment" for a node whose
        exports it commits); ``extra_config``: more configuration keys (e.g. "LuaScripts")."""
        self.workdir = Path(workdir)
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.modalities = modalities or {}
        self.extra_config = extra_config or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "orthanc.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def _config(self) -> dict[str, Any]:
        return {
            "Name": "radbridge-test",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "UnknownSopClassAccepted": True,
            "DicomCheckCalledAet": False,
            "StableAge": 2,
            "Plugins": [DICOMWEB_PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "DicomModalities": self.modalities,
            **self.extra_config,
        }

    def start(self, timeout_s: float = 30.0) -> OrthancServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "orthanc.json"
        cfg.write_text(json.dumps(self._config(), indent=2))
        log = open(self.log_path, "wb")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            [ORTHANC_BIN, str(cfg)], stdout=log, stderr=subprocess.STDOUT, env=dcmtk_env()
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                self.get_json("/system")
                return self
            except OSError:
                time.sleep(0.2)
        tail = self.log_path.read_text(errors="replace")[-3000:]
        self.stop()
        raise RuntimeError(f"Orthanc did not start:\n{tail}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- REST ----------------------------------------------------------------------
    def _request(self, path: str, data: bytes | None = None, headers: dict[str, str] | None = None) -> bytes:
        req = urllib.request.Request(self.url + path, data=data, headers=headers or {})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.read()

    def get_json(self, path: str) -> Any:
        return json.loads(self._request(path))

    def post_json(self, path: str, body: Any) -> Any:
        return json.loads(
            self._request(path, json.dumps(body).encode(), {"Content-Type": "application/json"})
        )

    def find_instances(self, **query: str) -> list[dict[str, Any]]:
        """/tools/find at instance level, expanded (MainDicomTags + parent ids)."""
        return self.post_json("/tools/find", {"Level": "Instance", "Query": query, "Expand": True})

    def instance_file(self, orthanc_id: str) -> bytes:
        return self._request(f"/instances/{orthanc_id}/file")

    def qido(self, path: str) -> Any:
        return json.loads(self._request(f"/dicom-web{path}", headers={"Accept": "application/dicom+json"}))
