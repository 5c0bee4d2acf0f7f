"""STOW-RS ingest: dicomweb-client -> RadBridge's HTTP front vs -> Orthanc's DICOMweb plugin, same run.

The same synthetic 512x512 CT instances go to each receiver with the same
client (dicomweb-client ``store_instances``, the same number of instances per
request), each receiver a fresh process with an empty store for every repeat,
so that its peak resident memory (VmHWM) is its own.

What each receiver does before it answers a request (its durability; the sync
calls were counted with ``strace -f -y`` over a 40-instance ingest):

- RadBridge (``dicom_node.stow``, run alone in a subprocess: ``create_app`` +
  ``HttpServer``, no SCP, no worker): streams each part to a staging file,
  decodes its header, fsyncs the file, renames it into the spool, fsyncs the
  directory, and commits its index row (SQLite WAL, that commit not synced: the
  fsynced file is the record, dicom_node.recovery) -- two syncs per instance,
  both before the response.
- Orthanc 1.10 with its defaults (and TCP_NODELAY=1, as for every dcmtk-linked
  peer here): SyncStorageArea=true, i.e. one fdatasync per stored file; no
  directory sync; its SQLite index (WAL) is not synced at commit (no sync on
  the index during the ingest), so a power loss can drop acknowledged
  instances from its index. StorageCompression off; a 128 MB in-RAM cache of
  recently written files (MaximumStorageCacheSize) counts in its RSS.

Prints instances/s (median of the repeats), idle and peak RSS of the receiver
process (max over repeats), the rate relative to Orthanc, and the client's
own ceiling (the same client against a server that drops the bodies). The
client and the receivers share this machine's cores: run it on a quiet one.

    python bench/bench_stow.py [--instances 200] [--repeat 3] [--batch 20] [--smoke]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # tests.peers: the shared peer runners

from dicomweb_client.api import DICOMwebClient  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402

from radbridge.synth import SyntheticPatient, ct_series  # noqa: E402
from tests.peers import DICOMWEB_PLUGIN, ORTHANC_BIN, OrthancServer  # noqa: E402

#: RadBridge's HTTP front alone, in its own process: prints its port, serves until stdin closes.
RADBRIDGE_SERVER = """
import sys
from pathlib import Path
from dicom_node.config import NodeSettings, SpoolSection
from dicom_node.http import HttpServer, create_app
from dicom_node.index import Index
from dicom_node.spool import Spool
root = Path(sys.argv[1])
spool = Spool(root)
index = Index(spool.index_path)
server = HttpServer(create_app(NodeSettings(spool=SpoolSection(directory=root)), spool, index), "127.0.0.1", 0)
print(server.start(), flush=True)
sys.stdin.read()
server.stop()
index.close()
"""

#: The client's ceiling: an HTTP server that reads each request body, drops it and answers 200.
NULL_SINK = """
import sys
import threading
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

async def stow(request):
    async for _ in request.stream():
        pass
    return JSONResponse({}, media_type="application/dicom+json")

app = Starlette(routes=[Route("/dicom-web/studies", stow, methods=["POST"])])
server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, lifespan="off"))
thread = threading.Thread(target=server.run, daemon=True)
thread.start()
while not server.started:
    thread.join(0.02)
print(server.servers[0].sockets[0].getsockname()[1], flush=True)
sys.stdin.read()
server.should_exit = True
thread.join(10)
"""


@dataclass
class Run:
    seconds: float
    idle_mb: float
    peak_mb: float


@dataclass
class Receiver:
    name: str
    start: Callable[[Path], AbstractContextManager[tuple[str, int]]]  # workdir -> (DICOMweb root, pid)
    runs: list[Run] = field(default_factory=list)


def _memory_mb(pid: int, key: str) -> float:
    """A /proc/<pid>/status memory line (VmRSS, VmHWM) in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/{pid}/status")


@contextmanager
def _python_server(code: str, *args: str) -> Iterator[tuple[str, int]]:
    """Run ``code`` in a fresh interpreter: it prints its port and serves until its stdin closes."""
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if not line.isdigit():
            raise SystemExit(f"HTTP server did not start (got {line!r}, exit {proc.poll()})")
        yield f"http://127.0.0.1:{line}/dicom-web", proc.pid
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def radbridge(work: Path) -> AbstractContextManager[tuple[str, int]]:
    return _python_server(RADBRIDGE_SERVER, str(work / "spool"))


@contextmanager
def orthanc(work: Path) -> Iterator[tuple[str, int]]:
    with OrthancServer(work / "orthanc") as server:  # TCP_NODELAY=1 in its environment
        assert server.proc is not None
        yield server.dicomweb_url, server.proc.pid


def _send(url: str, datasets: list[Dataset], batch: int, check: bool = True) -> float:
    client = DICOMwebClient(url=url)
    started = time.perf_counter()
    for i in range(0, len(datasets), batch):
        chunk = datasets[i : i + batch]
        response = client.store_instances(chunk)
        if not check:
            continue
        stored = len(response.get("ReferencedSOPSequence", []))
        failed = len(response.get("FailedSOPSequence", []))
        if stored != len(chunk) or failed:
            raise SystemExit(f"{url}: {stored}/{len(chunk)} stored, {failed} failed")
    return time.perf_counter() - started


def _count_instances(url: str) -> int:
    return sum(
        int(doc["00201208"]["Value"][0])
        for doc in DICOMwebClient(url=url).search_for_studies(fields=["NumberOfStudyRelatedInstances"])
    )


def bench(receiver: Receiver, datasets: list[Dataset], warmup: list[Dataset], batch: int, work: Path) -> None:
    with receiver.start(work) as (url, pid):
        _send(url, warmup, batch)  # first-request costs (imports, connections) out of the timing
        idle = _memory_mb(pid, "VmRSS")
        seconds = _send(url, datasets, batch)
        peak = _memory_mb(pid, "VmHWM")
        count = _count_instances(url)
        if count != len(datasets) + len(warmup):
            raise SystemExit(
                f"{receiver.name}: {count} instances searchable, sent {len(datasets) + len(warmup)}"
            )
    receiver.runs.append(Run(seconds, idle, peak))


def _client_ceiling(datasets: list[Dataset], warmup: list[Dataset], batch: int, repeat: int) -> float:
    """Instances/s of this client against the null sink (median): no receiver can beat it here."""
    with _python_server(NULL_SINK) as (url, _):
        _send(url, warmup, batch, check=False)
        return len(datasets) / statistics.median(
            _send(url, datasets, batch, check=False) for _ in range(repeat)
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--batch", type=int, default=20, help="instances per STOW-RS request (both receivers)"
    )
    parser.add_argument("--smoke", action="store_true", help="10 instances, 1 repeat: a quick check")
    args = parser.parse_args()
    if args.smoke:
        args.instances, args.repeat = 10, 1
    if not os.access(ORTHANC_BIN, os.X_OK) or not Path(DICOMWEB_PLUGIN).exists():
        raise SystemExit(f"Orthanc with its DICOMweb plugin is needed ({ORTHANC_BIN}, {DICOMWEB_PLUGIN}).")
    datasets = ct_series(n_slices=args.instances)
    warmup = ct_series(n_slices=1, patient=SyntheticPatient(patient_id="RB-WARMUP"), seed=99)
    receivers = [
        Receiver("orthanc 1.10 STOW (defaults)", orthanc),
        Receiver("radbridge STOW (fsync + index)", radbridge),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeat):
            for receiver in receivers:
                work = Path(tmp) / f"{i}-{receiver.name.split()[0]}"
                work.mkdir()
                bench(receiver, datasets, warmup, args.batch, work)
    ceiling = _client_ceiling(datasets, warmup, args.batch, args.repeat)
    base = args.instances / statistics.median(r.seconds for r in receivers[0].runs)
    print(
        f"{args.instances} x 512x512 CT instances, dicomweb-client store_instances, {args.batch} per request, "
        f"median of {args.repeat}; RSS of the receiver process, max over repeats "
        "(idle: after a 1-instance warm-up)"
    )
    print(f"{'receiver':32} {'inst/s':>8} {'idle RSS MB':>12} {'peak RSS MB':>12} {'ratio':>7}")
    for receiver in receivers:
        rate = args.instances / statistics.median(r.seconds for r in receiver.runs)
        idle = max(r.idle_mb for r in receiver.runs)
        peak = max(r.peak_mb for r in receiver.runs)
        print(f"{receiver.name:32} {rate:8.1f} {idle:12.1f} {peak:12.1f} {rate / base:7.2f}")
    runs = "; ".join(
        f"{r.name.split()[0]} " + ", ".join(f"{args.instances / x.seconds:.0f}" for x in r.runs)
        for r in receivers
    )
    print(f"(each run, inst/s: {runs}; client ceiling, a sink that drops the bodies: {ceiling:.0f} inst/s)")


if __name__ == "__main__":
    main()
