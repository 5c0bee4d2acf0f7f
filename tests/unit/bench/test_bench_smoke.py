"""The benchmark scripts still run: each one's --smoke mode, as a subprocess, prints its table.

Timings are printed, never asserted. A missing tool is a skip that names it (CI installs them all).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.peers import DICOMWEB_PLUGIN, ORTHANC_BIN, missing_tools

REPO = Path(__file__).resolve().parents[3]


def _smoke(script: str, timeout_s: float) -> str:
    proc = subprocess.run(
        [sys.executable, f"bench/{script}", "--smoke"],
        cwd=REPO,
        env={**os.environ, "TCP_NODELAY": "1"},
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert proc.returncode == 0, f"{script} --smoke exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_bench_seg_smoke() -> None:
    venv_tool = Path(sys.executable).parent / "itkimage2segimage"
    if not venv_tool.exists() and shutil.which("itkimage2segimage") is None:
        pytest.skip("dcmqi's itkimage2segimage missing; pip install dcmqi")
    out = _smoke("bench_seg.py", 120)
    assert "writer" in out and "median s" in out and "ratio" in out
    assert "radbridge build_seg + save" in out and "dcmqi itkimage2segimage" in out
    assert "MISMATCH" not in out


@pytest.mark.slow
@pytest.mark.integration
def test_bench_e2e_smoke() -> None:
    if not os.access(ORTHANC_BIN, os.X_OK):
        pytest.skip(f"Orthanc not installed ({ORTHANC_BIN}); apt-get install orthanc")
    if not Path(DICOMWEB_PLUGIN).exists():  # tests.peers.OrthancServer loads it
        pytest.skip(f"Orthanc DICOMweb plugin missing ({DICOMWEB_PLUGIN}); apt-get install orthanc-dicomweb")
    if missing_tools("storescu"):
        pytest.skip("dcmtk's storescu missing; apt-get install dcmtk")
    out = _smoke("bench_e2e.py", 300)
    assert "stage" in out and "median s" in out
    assert "overhead (total - quiet)" in out and "peak RSS of serve" in out


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.skipif(bool(missing_tools("storescu", "storescp")), reason="needs dcmtk storescu/storescp")
def test_bench_ingest_smoke() -> None:
    out = _smoke("bench_ingest.py", 300)
    assert "assoc receiver" in out and "radbridge SCP (durable)" in out
    assert "durable-store floor per instance" in out and "1-association ceiling" in out


def test_bench_analysis_smoke() -> None:
    out = _smoke("bench_analysis.py", 120)
    assert "peak RSS MB" in out and "gRPC transfer" in out and "SEG build" in out


def test_run_all_lists_every_bench_script() -> None:
    """bench/run_all.py runs each bench; every script it names exists (the smokes above run them)."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import run_all
    finally:
        sys.path.remove(str(REPO / "bench"))
    scripts = {script for script, _ in run_all.RUNS}
    gpu_benches = {"bench_inference.py", "bench_med3dvlm.py"}  # need a GPU for numbers; smoked here
    assert scripts == {p.name for p in (REPO / "bench").glob("bench_*.py")} - gpu_benches
    assert "cores" in run_all.machine()


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.skipif(bool(missing_tools("storescu")), reason="needs dcmtk storescu")
def test_bench_scale_smoke() -> None:
    out = _smoke("bench_scale.py", 300)
    assert "| embedded | 1 |" in out and "| 2 replicas | 2 |" in out
    assert "speed-up vs 1 study" in out and "cores busy" in out


def test_bench_inference_smoke() -> None:
    """Every section's table: plain generate vs the engine, open loop, mixed study, PaliGemma, vision, engines."""
    out = _smoke("bench_inference.py", 300)
    titles = ("1. MedGemma", "2. Open loop", "3. Mixed study", "4. PaliGemma", "5. Vision", "6. Engines")
    assert [t for t in titles if t not in out] == [], out
    assert "plain generate, one at a time" in out and "engine, 4 in flight" in out and "p95 s" in out
    assert "SiglipBackend.run" in out and "captured while timed" in out


def test_bench_med3dvlm_smoke() -> None:
    out = _smoke("bench_med3dvlm.py", 300)
    assert "smoke (tiny checkpoint, CPU, not a measurement)" in out and "CT studies ran in batches of" in out
