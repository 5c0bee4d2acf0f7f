"""Durable C-STORE ingest: dcmtk storescu -> RadBridge SCP vs -> Orthanc vs -> dcmtk storescp.

The same synthetic 512x512 CT files go to each receiver over 1 association (one
storescu) and over 4 concurrent associations (4 storescu processes, each sending a
quarter). Every receiver is started and stopped here, with an empty store for
every repeat; TCP_NODELAY=1 for storescu, storescp and Orthanc (dcmtk FAQ #48).

What each receiver does before it answers a C-STORE:

- RadBridge (in this process, ``dicom_node.scp.start_scp``): the data set is
  streamed to a staging file (made ahead by dicom_node.staging, its writeback started as it
  arrives); fsync(file), rename into the spool, fsync(dir) (grouped across concurrent
  associations) -- all before the status; the index row (SQLite WAL, that commit not synced: the
  fsynced file is the record, dicom_node.recovery) right after it. Twice: as configured
  (storage-only associations on the lean acceptor, dicom_node.lean_scp) and with
  ``scp.lean_store = false`` (every association through pynetdicom, which commits the row before
  the status), so the two paths are compared in the same run. And a third time with ``scp.receivers = 2``: a second
  process accepts on the same port (SO_REUSEPORT, dicom_node.receivers); its ack latency and
  RSS are not printed (this process sees only its own share).
- Orthanc (tests.peers.OrthancServer, its defaults): one fdatasync per file
  (SyncStorageArea), its SQLite index not synced at commit.
- dcmtk storescp: writes the file, no fsync.

Also measured, on the same file system: the durable-store floor, i.e. what the two syncs a
durable spool cannot do without cost per instance, in two patterns: "in place" (a file of the
instance's size created in its final directory, written, fsynced, then the directory fsynced)
and "staged" (RadBridge's: the file made ahead in a staging directory, written, fsynced, renamed
into its series directory, that directory fsynced). On ext4 without a journal the first fsync of a
new file also writes its directory, so "in place" leaves the directory fsync almost nothing; the
rename after the fsync dirties the series directory again. From each floor, the 1-association
ceiling of a receiver that made those syncs at no CPU cost: 1 / (storescp's time per instance +
the floor). storescu waits for each response before it sends the next instance, so no receiver
that syncs before answering can beat that ceiling with one association. A synced one-row SQLite
WAL commit is measured beside it (what a synced index row would add).

Prints instances/s (median, min, max of the repeats); the machine's CPU time per instance
(every process: senders, receiver, kernel; /proc/stat) and how many of its cores that kept busy,
which shows where a receiver is limited by the machine's CPU rather than by its own waits (once
the cores are busy, two receivers' rates stand as the inverse of their CPU per instance);
RadBridge's ratio to Orthanc and to storescp, RadBridge's ack latency (data set received -> status
returned, measured around ``scp.store_staged``) p50/p99 over all repeats, and its
peak RSS during ingest (VmHWM, reset before each run; this process also holds the
bench's own state). The senders share this machine's cores: run it on a quiet one.

    python bench/bench_ingest.py [--instances 200] [--repeat 3] [--smoke]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.peers: the shared peer runners

import dicom_node.scp as scp  # noqa: E402
from dicom_node.config import ScpSection  # noqa: E402
from dicom_node.index import Index  # noqa: E402
from dicom_node.spool import Spool  # noqa: E402
from radbridge.synth import ct_series, write_series  # noqa: E402
from tests.peers import ORTHANC_BIN, OrthancServer, dcmtk_env, free_port  # noqa: E402

ASSOCIATIONS = (1, 4)
RADBRIDGE, ORTHANC, STORESCP = "radbridge SCP (durable)", "Orthanc", "dcmtk storescp"
RADBRIDGE_PYNETDICOM = "radbridge, pynetdicom path"
RADBRIDGE_RECEIVERS = "radbridge, 2 processes"

#: Handler durations (s) of the current RadBridge run; filled only by the bench's wrapper below.
ack_latencies: list[float] = []
#: CPU seconds the whole machine spent (every process: senders, receiver, kernel) during the last
#: ``_send``, from /proc/stat; NaN where that cannot be read.
machine_cpu_s: list[float] = [float("nan")]


def _cpu_ticks() -> tuple[int, int] | None:
    """(busy, total) jiffies of all cores since boot (Linux /proc/stat), or None."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _timed_handler(handler: Callable[..., object]) -> Callable[..., object]:
    def timed(*args: object, **kwargs: object) -> object:
        started = time.perf_counter()
        try:
            return handler(*args, **kwargs)
        finally:
            ack_latencies.append(time.perf_counter() - started)

    return timed


def _send(files: list[Path], port: int, aet: str, associations: int) -> float:
    """Seconds for ``associations`` concurrent storescu processes to send every file."""
    parts = [files[i::associations] for i in range(associations)]
    ticks = _cpu_ticks()
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            ["storescu", "-R", "-aet", "BENCH", "-aec", aet, "127.0.0.1", str(port), *map(str, part)],
            env=dcmtk_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for part in parts
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    elapsed = time.perf_counter() - started
    after = _cpu_ticks()
    if ticks is None or after is None or after[1] == ticks[1]:
        machine_cpu_s[0] = float("nan")
    else:  # the busy share of all cores' time, times the wall time and the cores
        machine_cpu_s[0] = (after[0] - ticks[0]) / (after[1] - ticks[1]) * elapsed * (os.cpu_count() or 1)
    for proc, out in zip(procs, outputs, strict=True):
        errors = [ln for ln in out.splitlines() if ln.startswith(("E:", "F:"))]
        if proc.returncode != 0 or errors:
            raise SystemExit(f"storescu failed ({aet}): {errors or out[-2000:]}")
    return elapsed


def _peak_rss_reset() -> None:
    with open("/proc/self/clear_refs", "w") as fh:  # "5": reset VmHWM to the current RSS
        fh.write("5")


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bench_radbridge(
    files: list[Path], work: Path, associations: int, *, lean: bool = True, receivers: int = 1
) -> tuple[float, float]:
    spool = Spool(work / "spool")
    index = Index(spool.index_path)
    server = scp.start_scp(ScpSection(port=0, lean_store=lean, receivers=receivers), spool, index)
    try:
        _peak_rss_reset()
        elapsed = _send(files, server.server_address[1], "RADBRIDGE", associations)
        rss = _peak_rss_mb()
    finally:
        server.shutdown()
        index.close()
    if index.count_instances() != len(files):
        raise SystemExit(f"radbridge indexed {index.count_instances()} of {len(files)}")
    return elapsed, rss


def bench_radbridge_pynetdicom(files: list[Path], work: Path, associations: int) -> tuple[float, float]:
    """The same node with scp.lean_store off: every association through pynetdicom."""
    return bench_radbridge(files, work, associations, lean=False)


def bench_radbridge_receivers(files: list[Path], work: Path, associations: int) -> tuple[float, float]:
    """The same node with scp.receivers = 2: a second process accepts on the port (SO_REUSEPORT)."""
    return bench_radbridge(files, work, associations, receivers=2)


def bench_orthanc(files: list[Path], work: Path, associations: int) -> tuple[float, float]:
    with OrthancServer(work / "orthanc") as orthanc:
        return _send(files, orthanc.dicom_port, orthanc.aet, associations), float("nan")


def bench_storescp(files: list[Path], work: Path, associations: int) -> tuple[float, float]:
    port = free_port()
    out = work / "storescp"
    out.mkdir()
    proc = subprocess.Popen(
        ["storescp", "-od", str(out), "-aet", "STORESCP", str(port)],
        env=dcmtk_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)
        return _send(files, port, "STORESCP", associations), float("nan")
    finally:
        proc.terminate()
        proc.wait(10)


def _timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _write_and_fsync(fd: int, payload: bytes) -> float:
    """Write ``payload`` to the open file ``fd``, fsync and close it; the fsync's seconds."""
    try:
        os.write(fd, payload)
        return _timed(lambda: os.fsync(fd))
    finally:
        os.close(fd)


def durable_floor(directory: Path, size: int, n: int = 100) -> dict[str, float]:
    """Median seconds of each sync the durable store makes per instance, on ``directory``'s disk."""
    directory.mkdir(parents=True)
    payload = os.urandom(size)
    db = sqlite3.connect(directory / "floor.sqlite", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE t (k TEXT PRIMARY KEY, v TEXT)")
    times: dict[str, list[float]] = {
        "file fsync": [], "directory fsync": [], "WAL commit": [], "staged file fsync": [], "staged rename + directory fsync": []
    }  # fmt: skip
    staging, series = directory / "staging", directory / "series"
    staging.mkdir()
    series.mkdir()
    made_ahead = []  # as dicom_node.staging does, outside the timed part
    for i in range(n):
        path = staging / f"{i}.part"
        made_ahead.append((path, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)))
    series_fd = os.open(series, os.O_RDONLY)
    try:
        for i, (path, fd) in enumerate(made_ahead):
            times["staged file fsync"].append(_write_and_fsync(fd, payload))
            times["staged rename + directory fsync"].append(
                _timed(lambda path=path, i=i: (os.replace(path, series / f"{i}.dcm"), os.fsync(series_fd)))
            )
    finally:
        os.close(series_fd)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        for i in range(n):
            fd = os.open(directory / f"{i}.dcm", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            times["file fsync"].append(_write_and_fsync(fd, payload))
            times["directory fsync"].append(_timed(lambda: os.fsync(dir_fd)))
            times["WAL commit"].append(_timed(lambda i=i: db.execute("INSERT INTO t VALUES (?, ?)", (str(i), "x" * 400))))
    finally:
        os.close(dir_fd)
        db.close()
    return {k: statistics.median(v) for k, v in times.items()}


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="20 instances, 1 repeat (CI: the bench runs)")
    args = parser.parse_args()
    if args.smoke:
        args.instances, args.repeat = 20, 1
    missing = [t for t in ("storescu", "storescp") if shutil.which(t) is None]
    if missing:
        raise SystemExit(f"needs dcmtk: {', '.join(missing)} not found")
    receivers = {
        RADBRIDGE: bench_radbridge,
        RADBRIDGE_PYNETDICOM: bench_radbridge_pynetdicom,
        RADBRIDGE_RECEIVERS: bench_radbridge_receivers,
        STORESCP: bench_storescp,
    }
    if Path(ORTHANC_BIN).exists():
        receivers[ORTHANC] = bench_orthanc
    else:
        print(f"({ORTHANC_BIN} not found: Orthanc skipped)")
    scp.store_staged = _timed_handler(scp.store_staged)  # both acceptors call the module's function
    rates: dict[tuple[str, int], list[float]] = {}
    latencies: dict[tuple[str, int], list[float]] = {}
    rss: dict[tuple[str, int], float] = {}
    cpu: dict[tuple[str, int], list[tuple[float, float]]] = {}  # machine CPU s, cores busy; per run
    with tempfile.TemporaryDirectory() as tmp:
        files = write_series(ct_series(n_slices=args.instances), Path(tmp) / "ct")
        size_mb = sum(f.stat().st_size for f in files) / 1e6
        floor = durable_floor(Path(tmp) / "floor", files[0].stat().st_size, n=20 if args.smoke else 100)
        for i in range(args.repeat):
            for associations in ASSOCIATIONS:
                for name, fn in receivers.items():
                    work = Path(tmp) / f"{i}-{associations}-{list(receivers).index(name)}"
                    work.mkdir()
                    ack_latencies.clear()
                    elapsed, peak = fn(files, work, associations)
                    rates.setdefault((name, associations), []).append(args.instances / elapsed)
                    cpu.setdefault((name, associations), []).append((machine_cpu_s[0], machine_cpu_s[0] / elapsed))
                    if name in (RADBRIDGE, RADBRIDGE_PYNETDICOM):
                        latencies.setdefault((name, associations), []).extend(ack_latencies)
                        rss[name, associations] = max(rss.get((name, associations), 0.0), peak)
    print(
        f"{args.instances} x 512x512 CT instances ({size_mb:.0f} MB), storescu (TCP_NODELAY=1),"
        f" median [min-max] of {args.repeat}; {os.cpu_count()} cores"
    )
    print(
        f"{'assoc':>5} {'receiver':24} {'inst/s':>8} {'min':>7} {'max':>7}"
        f" {'CPU ms':>7} {'busy':>5} {'/Orthanc':>9} {'/storescp':>9} {'ack p50 ms':>10} {'ack p99 ms':>10}"
        f" {'peak RSS MB':>11}"
    )
    for associations in ASSOCIATIONS:
        medians = {name: statistics.median(rates[name, associations]) for name in receivers}
        for name in receivers:
            values = rates[name, associations]
            line = f"{associations:>5} {name:24} {medians[name]:8.1f} {min(values):7.1f} {max(values):7.1f}"
            # The machine's CPU (senders, receiver, kernel) per instance, and the cores it kept busy.
            cpu_s = statistics.median(c for c, _ in cpu[name, associations])
            busy = statistics.median(b for _, b in cpu[name, associations])
            line += f" {1000 * cpu_s / args.instances:7.2f} {busy:5.2f}"
            if name == RADBRIDGE_RECEIVERS:  # latency and RSS: only the node process's share is seen here
                to_orthanc = medians[name] / medians[ORTHANC] if ORTHANC in medians else float("nan")
                line += f" {to_orthanc:9.2f} {medians[name] / medians[STORESCP]:9.2f}"
            elif name in (RADBRIDGE, RADBRIDGE_PYNETDICOM):
                to_orthanc = medians[name] / medians[ORTHANC] if ORTHANC in medians else float("nan")
                lat = latencies[name, associations]
                line += (
                    f" {to_orthanc:9.2f} {medians[name] / medians[STORESCP]:9.2f}"
                    f" {1000 * _percentile(lat, 0.50):10.2f} {1000 * _percentile(lat, 0.99):10.2f}"
                    f" {rss[name, associations]:11.0f}"
                )
            print(line)
    storescp_s = 1 / statistics.median(rates[STORESCP, 1])
    patterns = {
        "in place": ("file fsync", "directory fsync"),
        "staged (RadBridge's)": ("staged file fsync", "staged rename + directory fsync"),
    }
    for pattern, (first, second) in patterns.items():
        floor_s = floor[first] + floor[second]
        ceiling = 1 / (storescp_s + floor_s)
        line = (
            f"durable-store floor per instance, {pattern}: {1000 * floor_s:.2f} ms ({first} {1000 * floor[first]:.2f}"
            f" + {second} {1000 * floor[second]:.2f} ms; medians, this disk); 1-association ceiling with no"
            f" receiver CPU: {ceiling:.0f} inst/s"
        )
        if ORTHANC in receivers:
            line += f" = {ceiling / statistics.median(rates[ORTHANC, 1]):.2f}x Orthanc"
        print(line + f" = {ceiling * storescp_s:.2f}x storescp")
    print(f"a synced SQLite WAL commit would add {1000 * floor['WAL commit']:.2f} ms")


if __name__ == "__main__":
    main()
