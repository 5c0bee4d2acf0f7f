"""Ingest throughput: dcmtk storescu -> RadBridge SCP vs -> dcmtk storescp, same machine, same files.

Both receivers write every instance to disk; RadBridge also fsyncs and indexes
each one before answering (its durability rule), storescp does not fsync.
Prints a table with instances/s and the ratio to storescp.

    python bench/bench_ingest.py [--instances 200] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.peers: the shared peer runners

from dicom_node.config import ScpSection
from dicom_node.index import Index
from dicom_node.scp import start_scp
from dicom_node.spool import Spool
from radbridge.synth import ct_series, write_series
from tests.peers import dcmtk_env, free_port, storescu


def _time_storescu(files: list[Path], port: int, aet: str) -> float:
    started = time.perf_counter()
    result = storescu(files, "127.0.0.1", port, aet)
    elapsed = time.perf_counter() - started
    if result.returncode != 0 or result.errors:
        raise SystemExit(f"storescu failed: {result.errors or result.stderr}")
    return elapsed


def bench_radbridge(files: list[Path], work: Path) -> float:
    spool = Spool(work / "spool")
    index = Index(spool.index_path)
    server = start_scp(ScpSection(port=0), spool, index)
    try:
        return _time_storescu(files, server.server_address[1], "RADBRIDGE")
    finally:
        server.shutdown()
        index.close()


def bench_storescp(files: list[Path], work: Path) -> float:
    port = free_port()
    out = work / "storescp"
    out.mkdir()
    proc = subprocess.Popen(["storescp", "-od", str(out), "-aet", "STORESCP", str(port)], env=dcmtk_env())
    try:
        time.sleep(0.5)
        return _time_storescu(files, port, "STORESCP")
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        files = write_series(ct_series(n_slices=args.instances), Path(tmp) / "ct")
        rows = {"dcmtk storescp": [], "radbridge SCP (fsync + index)": []}
        for i in range(args.repeat):
            for name, fn in (
                ("dcmtk storescp", bench_storescp),
                ("radbridge SCP (fsync + index)", bench_radbridge),
            ):
                work = Path(tmp) / f"{i}-{name.split()[0]}"
                work.mkdir()
                rows[name].append(fn(files, work))
    base = args.instances / statistics.median(rows["dcmtk storescp"])
    print(f"{args.instances} x 512x512 CT instances, storescu (TCP_NODELAY=1), median of {args.repeat}")
    print(f"{'receiver':32} {'inst/s':>8} {'ratio':>7}")
    for name, times in rows.items():
        rate = args.instances / statistics.median(times)
        print(f"{name:32} {rate:8.1f} {rate / base:7.2f}")


if __name__ == "__main__":
    main()
