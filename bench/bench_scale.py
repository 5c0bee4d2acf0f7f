"""Scaling: 1, 2 and 4 concurrent studies through `radbridge serve`, with the embedded inference
service and with 1 and 2 inference service replicas (separate processes on this machine).

Per configuration: a fresh `radbridge serve` subprocess (reference engine; worker.threads = 4, so
up to four analyses run at once; quiet window 1 s; no export target, so the figure is the node's and
the services' own work) and, for the replica rows, 1 or 2 `python -m inference_service serve`
processes named in [inference] addresses (the node sends each analysis to the least busy one).
A 4-slice warm-up study goes through first. Then K dcmtk storescu processes send K different
synthetic 512x512 CT studies of N slices at the same time, one association each. The clock runs
from the first send to the last study's "analyze.written" log line (its SEG + SRs in the spool).

Printed per row: wall time, studies per minute, slices per second, the speed-up over one study
on the same configuration (K studies in the time of how many single ones), and the CPU the node
and service processes used over the run (user + system seconds / wall seconds = cores kept busy).
On a machine with C cores the throughput stops growing once that figure reaches C.

    python bench/bench_scale.py [--slices 200] [--studies 1 2 4] [--replicas 0 1 2] [--smoke]

(--replicas 0 = the embedded service inside `radbridge serve`, the default deployment.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # tests.peers and tests.e2e: the shared peer runners

import pydicom  # noqa: E402

from dicom_node.client import InferenceClient  # noqa: E402
from dicom_node.spool import uid_key  # noqa: E402
from radbridge.synth import SyntheticPatient, ct_series, write_series  # noqa: E402
from tests.e2e.test_pipeline import Serve  # noqa: E402
from tests.peers import free_port, missing_tools, storescu  # noqa: E402

WAIT_S = 600.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Row:
    replicas: int
    studies: int
    wall_s: float
    cpu_s: float
    slices: int


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process so far (its threads included)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


class Service:
    """One `python -m inference_service serve` process on a free loopback port."""

    def __init__(self, work: Path) -> None:
        self.port = free_port()
        config = work / f"service-{self.port}.toml"
        config.write_text(f"[inference_service]\nhost = \"127.0.0.1\"\nport = {self.port}\n")
        self._log = open(work / f"service-{self.port}.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "inference_service", "serve", "--config", str(config)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        client = InferenceClient(self.address)
        try:
            client.list_models(timeout_s=60)  # waits for the port to answer
        finally:
            client.close()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def _node_config(work: Path, scp_port: int, addresses: list[str]) -> Path:
    inference = ""
    if addresses:
        inference = "[inference]\naddresses = [" + ", ".join(f'"{a}"' for a in addresses) + "]\n"
    cfg = work / "radbridge.toml"
    cfg.write_text(
        f"""
[scp]
port = {scp_port}
ae_title = "RADBRIDGE"
max_associations = 16

[http]
enabled = false

[spool]
directory = "{work / "spool"}"

[completion]
quiet_window_s = 1.0

[worker]
threads = 4
poll_interval_s = 0.2

{inference}"""
    )
    return cfg


def _written(log: Path) -> dict[str, float]:
    """study key -> when its "analyze.written" line was logged (epoch seconds)."""
    found: dict[str, float] = {}
    for line in log.read_text().splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if event.get("event") == "analyze.written":
            found[event["study_key"]] = time.time()
    return found


def _wait_written(log: Path, keys: set[str]) -> float:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if keys <= set(_written(log)):
            return time.time()
        time.sleep(0.05)
    raise SystemExit(f"studies not analysed within {WAIT_S:.0f} s; see {log}")


def _send(files: list[Path], port: int) -> None:
    result = storescu(files, "127.0.0.1", port, "RADBRIDGE", timeout_s=WAIT_S)
    if result.returncode != 0 or result.errors:
        raise SystemExit(f"storescu failed ({result.returncode}): {result.errors[:5]}")


def run(replicas: int, studies: list[tuple[list[Path], str]], warmup: list[Path], work: Path) -> Row:
    work.mkdir(parents=True)
    services = [Service(work) for _ in range(replicas)]
    port = free_port()
    serve = Serve(_node_config(work, port, [s.address for s in services]), work / "serve.log")
    try:
        _send(warmup, port)
        warm_key = uid_key(str(pydicom.dcmread(warmup[0], stop_before_pixels=True).StudyInstanceUID))
        _wait_written(serve.log_path, {warm_key})
        pids = [serve.proc.pid, *(s.proc.pid for s in services)]
        cpu_before = sum(_cpu_s(p) for p in pids)
        started = time.time()
        senders = [threading.Thread(target=_send, args=(files, port)) for files, _ in studies]
        for t in senders:
            t.start()
        for t in senders:
            t.join()
        done = _wait_written(serve.log_path, {uid_key(uid) for _, uid in studies})
        cpu = sum(_cpu_s(p) for p in pids) - cpu_before
    finally:
        code = serve.stop()
        for s in services:
            s.stop()
    if code != 0:
        raise SystemExit(f"radbridge serve exited {code}; see {serve.log_path}")
    return Row(replicas, len(studies), done - started, cpu, sum(len(f) for f, _ in studies))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--studies", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--replicas", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--smoke", action="store_true", help="8 slices, 1 and 2 studies, embedded and 2 replicas")
    args = parser.parse_args()
    if args.smoke:
        args.slices, args.studies, args.replicas = 8, [1, 2], [0, 2]
    missing = missing_tools("storescu")
    if missing:
        raise SystemExit(f"missing: {', '.join(missing)} (apt-get install dcmtk)")
    os.environ.setdefault("TCP_NODELAY", "1")
    with tempfile.TemporaryDirectory(prefix="rb-bench-scale-") as tmp:
        work = Path(tmp)
        warmup = write_series(ct_series(n_slices=4, seed=90), work / "warmup")
        pool = []
        for i in range(max(args.studies)):
            patient = SyntheticPatient(patient_id=f"SCALE{i}")
            files = write_series(ct_series(n_slices=args.slices, seed=100 + i, patient=patient), work / f"s{i}")
            pool.append((files, str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)))
        rows = [
            run(r, pool[:k], warmup, work / f"r{r}-k{k}") for r in args.replicas for k in args.studies
        ]
    print(f"\nScaling: {args.slices}-slice 512x512 CT studies sent at once, one association each; "
          f"{os.cpu_count()} CPU cores\n")
    print("| inference | studies | wall s | studies/min | slices/s | speed-up vs 1 study | cores busy |")
    print("|---|---|---|---|---|---|---|")
    single = {r.replicas: r.wall_s for r in rows if r.studies == 1}
    for r in rows:
        where = "embedded" if r.replicas == 0 else f"{r.replicas} replica{'s' if r.replicas > 1 else ''}"
        speedup = f"{r.studies * single[r.replicas] / r.wall_s:.2f}" if r.replicas in single else "-"
        print(
            f"| {where} | {r.studies} | {r.wall_s:.2f} | {60 * r.studies / r.wall_s:.1f} | "
            f"{r.slices / r.wall_s:.0f} | {speedup} | {r.cpu_s / r.wall_s:.2f} |"
        )


if __name__ == "__main__":
    main()
