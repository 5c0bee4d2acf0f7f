"""The ingest benchmark still runs (so it cannot rot); timings are printed, never asserted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.peers import missing_tools

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.skipif(bool(missing_tools("storescu", "storescp")), reason="needs dcmtk storescu/storescp")
def test_bench_ingest_smoke() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_ingest.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ, "TCP_NODELAY": "1"},
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "assoc receiver" in proc.stdout
    assert "radbridge SCP (durable)" in proc.stdout
    print(proc.stdout)
