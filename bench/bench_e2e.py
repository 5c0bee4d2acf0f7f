"""End-to-end node overhead: dcmtk storescu -> `radbridge serve` -> Orthanc, with real processes.

Per run: a fresh Orthanc (tests.peers.OrthancServer, TCP_NODELAY=1) and a fresh `radbridge serve`
subprocess (tests.e2e.test_pipeline.Serve/_config: reference engine embedded in the same process,
quiet window 1.0 s, worker poll 0.2 s, export to that Orthanc). An 8-slice warm-up study goes
through the whole path first (not measured), so the figures are those of a node that has been
running. Then dcmtk's storescu sends a synthetic 512x512 CT of N slices (one association). The clock starts when storescu returns (every instance
acknowledged, i.e. spooled durably and indexed by the node) and stops when Orthanc's index holds the
SEG and the 3 SRs of the study (polled every 50 ms with one /tools/find). "overhead" is that time
minus the quiet window: what the node adds after the last image, beyond the wait that any
study-completion rule needs.

Stage breakdown, from the node's JSON log lines (stderr; ms timestamps, and duration_ms where the
node logs one):

- quiet window + completion: storescu returned -> "study.complete" (quiet window, completion poll)
- route: "study.complete" -> the route job's "job.state" SUCCEEDED (queue wait + the job)
- analyze queue wait: route done -> start of the analyze job (its end minus its duration_ms)
- analyze (node side): the analyze job's duration_ms minus the service's "analysis.done"
  duration_ms; its steps, from "analyze.written" (read_ms, send_ms, inference_ms, build_ms,
  write_ms): volume read from the spool, gRPC upload until the service holds the volume, the
  service's analysis until the last mask is back, SEG + SR build, writing them to the spool
- gRPC + analysis (service): "analysis.done" duration_ms = receiving the volume over gRPC,
  the reference engine, sending the masks back
- export: "analyze.written" -> the last export job's "job.state" SUCCEEDED (4 C-STOREs to Orthanc)
- Orthanc visible: last export done -> this script's poll sees the 4 objects (poll granularity)

The split steps overlap the service's own figure (upload and analysis are the same time seen
from both ends); "total after last image" is measured directly, not summed.

Peak RSS: VmHWM of the `radbridge serve` process (node + embedded inference service, one process)
read just before stopping it, in MB and as a multiple of the study's pixel bytes (N*512*512*2).

    python bench/bench_e2e.py [--slices 300 2000] [--repeat 3] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # tests.peers and tests.e2e: the shared peer runners

import pydicom  # noqa: E402

from dicom_node.spool import uid_key  # noqa: E402
from radbridge.synth import SyntheticPatient, ct_series, write_series  # noqa: E402
from tests.e2e.test_pipeline import Serve, _config  # noqa: E402
from tests.peers import ORTHANC_BIN, OrthancServer, free_port, missing_tools, storescu  # noqa: E402

QUIET_WINDOW_S = 1.0
WAIT_S = 1800
STAGES = (
    "quiet window + completion",
    "route",
    "analyze queue wait",
    "analyze (node side)",
    "  volume read",
    "  gRPC upload",
    "  analysis, masks back",
    "  SEG + SR build",
    "  spool writes",
    "gRPC + analysis (service)",
    "export (4 C-STORE)",
    "Orthanc visible",
)


@dataclass
class Run:
    send_s: float  # storescu, first byte to return
    total_s: float  # storescu returned -> Orthanc holds SEG + 3 SR
    stages: dict[str, float]
    peak_mb: float
    idle_mb: float  # resident before the measured study (imports, embedded service, warm-up)


def _vm_mb(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/{pid}/status")


def _outputs(orthanc: OrthancServer, study_uid: str) -> dict[str, int]:
    """Instances per modality in the study, one request (series level, expanded)."""
    counts: dict[str, int] = {}
    for series in orthanc.post_json(
        "/tools/find", {"Level": "Series", "Query": {"StudyInstanceUID": study_uid}, "Expand": True}
    ):
        modality = series["MainDicomTags"].get("Modality", "")
        counts[modality] = counts.get(modality, 0) + len(series["Instances"])
    return counts


def _events(log: Path) -> list[dict[str, Any]]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict) and "time" in doc:
            doc["t"] = datetime.fromisoformat(doc["time"].replace("Z", "+00:00")).timestamp()
            out.append(doc)
    return out


def stages(events: list[dict[str, Any]], study_key: str, sent: float, visible: float) -> dict[str, float]:
    """The measured study's stages; its lines are found by study key, job ids and correlation id."""

    def only(found: list[dict[str, Any]], what: str) -> dict[str, Any]:
        if len(found) != 1:  # e.g. two analyses: the study completed before storescu was done
            raise SystemExit(f"expected one {what} log line for the study, found {len(found)}")
        return found[0]

    def of(event: str, **match: object) -> list[dict[str, Any]]:
        return [e for e in events if e.get("event") == event and all(e.get(k) == v for k, v in match.items())]

    complete = only(of("study.complete", study_key=study_key), "study.complete")
    written = only(of("analyze.written", study_key=study_key), "analyze.written")
    job = written["job_id"]
    analyze = only(of("job.state", kind="analyze", job_id=job, to="SUCCEEDED"), "analyze job.state")
    service = only(of("analysis.done", correlation_id=f"job-{job}"), "analysis.done")
    # The route job runs between completion and the analyze job it queues (the lower job id).
    routes = [e for e in of("job.state", kind="route", to="SUCCEEDED") if e["job_id"] < job]
    route = only([e for e in routes if e["t"] >= complete["t"]][-1:], "route job.state")
    exports = sorted(of("job.state", kind="export"), key=lambda e: e["job_id"])
    exports = [e for e in exports if e["job_id"] > job][:4]  # queued by this analyze job
    if len(exports) != 4 or any(e.get("to") != "SUCCEEDED" for e in exports):
        raise SystemExit(f"expected 4 successful exports, got {[e.get('to') for e in exports]}")
    analyze_start = analyze["t"] - analyze["duration_ms"] / 1000
    last_export = max(e["t"] for e in exports)
    return {
        "quiet window + completion": complete["t"] - sent,
        "route": route["t"] - complete["t"],
        "analyze queue wait": analyze_start - route["t"],
        "analyze (node side)": (analyze["duration_ms"] - service["duration_ms"]) / 1000,
        "  volume read": written.get("read_ms", float("nan")) / 1000,
        "  gRPC upload": written.get("send_ms", float("nan")) / 1000,
        "  analysis, masks back": written.get("inference_ms", float("nan")) / 1000,
        "  SEG + SR build": written.get("build_ms", float("nan")) / 1000,
        "  spool writes": written.get("write_ms", float("nan")) / 1000,
        "gRPC + analysis (service)": service["duration_ms"] / 1000,
        "export (4 C-STORE)": last_export - written["t"],
        "Orthanc visible": visible - last_export,
    }


def _wait_for_results(orthanc: OrthancServer, serve: Serve, study_uid: str, exports_before: int) -> float:
    """Poll Orthanc until it holds the study's SEG + 3 SRs; then wait for the node's 4 export log
    lines (logged just after Orthanc acknowledged). Returns the wall time Orthanc was seen holding them."""
    deadline = time.monotonic() + WAIT_S
    while True:
        counts = _outputs(orthanc, study_uid)
        if counts.get("SEG", 0) >= 1 and counts.get("SR", 0) >= 3:
            visible = time.time()
            break
        if time.monotonic() > deadline or serve.proc.poll() is not None:
            raise SystemExit(f"no SEG + 3 SR in Orthanc ({counts}); log tail:\n"
                             + serve.log_path.read_text()[-3000:])  # fmt: skip
        time.sleep(0.05)
    for _ in range(200):
        if _export_lines(serve.log_path) >= exports_before + 4:
            break
        time.sleep(0.05)
    return visible


def _export_lines(log: Path) -> int:
    return sum(e.get("event") == "job.state" and e.get("kind") == "export" for e in _events(log))


def _send(files: list[Path], port: int) -> None:
    result = storescu(files, "127.0.0.1", port, "RADBRIDGE", timeout_s=WAIT_S)
    if result.returncode != 0 or result.errors:
        raise SystemExit(f"storescu failed ({result.returncode}): {result.errors[:5]}")


def run_once(files: list[Path], study_uid: str, warmup: list[Path], work: Path) -> Run:
    with OrthancServer(work / "orthanc") as orthanc:
        port = free_port()
        serve = Serve(_config(work, port, orthanc, quiet_window_s=QUIET_WINDOW_S), work / "serve.log")
        try:
            # A small study first, through the whole path: first-call costs (imports, gRPC channel,
            # first association) out of the measured study, as for a node that has been running.
            _send(warmup, port)
            warm_uid = str(pydicom.dcmread(warmup[0], stop_before_pixels=True).StudyInstanceUID)
            _wait_for_results(orthanc, serve, warm_uid, 0)
            idle = _vm_mb(serve.proc.pid, "VmRSS")  # the running node before the study
            started = time.time()
            _send(files, port)
            sent = time.time()
            visible = _wait_for_results(orthanc, serve, study_uid, _export_lines(serve.log_path))
            peak = _vm_mb(serve.proc.pid, "VmHWM")
        finally:
            code = serve.stop()
        if code != 0:
            raise SystemExit(f"radbridge serve exited {code}")
        breakdown = stages(_events(serve.log_path), uid_key(study_uid), sent, visible)
    return Run(sent - started, visible - sent, breakdown, peak, idle)


def _fmt(values: list[float]) -> str:
    return f"{statistics.median(values):8.2f} {min(values):7.2f} {max(values):7.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slices", type=int, nargs="+", default=[300])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="a few seconds: 16 slices, once")
    args = parser.parse_args()
    sizes, repeat = ([16], 1) if args.smoke else (args.slices, args.repeat)
    if not os.access(ORTHANC_BIN, os.X_OK):
        raise SystemExit(f"Orthanc is needed ({ORTHANC_BIN}).")
    if missing_tools("storescu"):
        raise SystemExit("dcmtk's storescu is needed on PATH.")
    os.environ["TCP_NODELAY"] = "1"
    results: list[tuple[int, list[Run]]] = []
    for n in sizes:
        tmp = Path(tempfile.mkdtemp(prefix=f"bench-e2e-{n}-"))
        try:
            files = write_series(ct_series(n_slices=n), tmp / "ct")
            warmup = write_series(
                ct_series(n_slices=8, patient=SyntheticPatient(patient_id="RB-WARMUP"), seed=99), tmp / "warm"
            )
            study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
            runs = []
            for r in range(repeat):
                runs.append(run_once(files, study_uid, warmup, tmp / f"run-{r}"))
                shutil.rmtree(tmp / f"run-{r}", ignore_errors=True)  # spool + Orthanc store: N images each
            results.append((n, runs))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"storescu -> radbridge serve -> Orthanc, 512x512 CT, quiet window {QUIET_WINDOW_S:g} s, "
          f"median of {repeat} (min, max); fresh node + Orthanc per run")  # fmt: skip
    print(f"{'slices':>6} {'pixels MB':>9}  {'stage':<27} {'median s':>8} {'min s':>7} {'max s':>7}")
    for n, runs in results:
        mb = n * 512 * 512 * 2 / 1e6

        def row(name: str, values: list[float], n: int = n, mb: float = mb) -> None:
            print(f"{n:>6} {mb:>9.0f}  {name:<27} {_fmt(values)}")

        row("(storescu send, for scale)", [r.send_s for r in runs])
        for stage in STAGES:
            row(stage, [r.stages[stage] for r in runs])
        row("total after last image", [r.total_s for r in runs])
        row("overhead (total - quiet)", [r.total_s - QUIET_WINDOW_S for r in runs])
        peaks = [r.peak_mb for r in runs]
        print(f"{n:>6} {mb:>9.0f}  {'peak RSS of serve, MB':<27} {statistics.median(peaks):8.0f} "
              f"{min(peaks):7.0f} {max(peaks):7.0f}   = {max(peaks) / mb:.1f} x pixel bytes (max)")  # fmt: skip
        growth = [r.peak_mb - r.idle_mb for r in runs]
        print(f"{n:>6} {mb:>9.0f}  {'  of it above idle, MB':<27} {statistics.median(growth):8.0f} "
              f"{min(growth):7.0f} {max(growth):7.0f}   = {max(growth) / mb:.1f} x pixel bytes (max)")  # fmt: skip
    print("stages from the node's JSON log ('analyze.written' carries the node-side steps); idle = the "
          "serve process's RSS before the study")  # fmt: skip


if __name__ == "__main__":
    main()
