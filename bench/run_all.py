"""Every node benchmark in one run, each against its peer on this machine, and one report.

Each script starts and stops its own peers (dcmtk storescp, Orthanc, dcmqi) and prints its table;
this runs them in turn with the same settings and prints the machine they ran on first.

    TCP_NODELAY=1 python bench/run_all.py            # about 8 minutes on 2 cores
    python bench/run_all.py --smoke                  # every script's quick mode (CI checks they run)
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
#: (script, its arguments for a full run): ingest, STOW-RS ingest, analysis path, SEG writing, end to end.
RUNS = [
    ("bench_ingest.py", ["--instances", "200", "--repeat", "3"]),
    ("bench_stow.py", ["--instances", "200", "--repeat", "3"]),
    ("bench_analysis.py", ["--slices", "300", "1000"]),
    ("bench_seg.py", ["--repeat", "3"]),
    ("bench_e2e.py", ["--slices", "300", "--repeat", "3"]),
    ("bench_e2e.py", ["--slices", "2000", "--repeat", "1"]),
    ("bench_scale.py", ["--slices", "200"]),
]


def machine() -> str:
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in ln),
        platform.processor(),
    )
    return (
        f"{os.cpu_count()} cores ({cpu}), {mem_gb:.0f} GiB RAM, {platform.platform()}, "
        f"Python {platform.python_version()}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="each script's --smoke mode")
    args = parser.parse_args()
    env = {**os.environ, "TCP_NODELAY": "1"}
    print(f"machine: {machine()}", flush=True)
    runs = [(script, ["--smoke"]) for script in dict.fromkeys(s for s, _ in RUNS)] if args.smoke else RUNS
    failed = []
    for script, extra in runs:
        started = time.monotonic()
        print(f"\n=== {script} {' '.join(extra)}", flush=True)
        code = subprocess.run([sys.executable, str(BENCH / script), *extra], env=env).returncode
        print(f"=== {script}: {'ok' if code == 0 else f'exit {code}'} in {time.monotonic() - started:.0f} s", flush=True)
        if code != 0:
            failed.append(script)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
