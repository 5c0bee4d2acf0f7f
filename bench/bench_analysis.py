"""Analysis path of one CT series, stage by stage: time and peak resident memory.

What `radbridge serve` does after a study is complete, in one process with the embedded inference
service (reference engine), as the node's worker runs it: assemble the volume from the spooled
files, stream it over gRPC, analyse, write SEG + SRs into the spool's outputs. Each stage's peak
resident memory is measured alone (Linux: /proc/self/clear_refs resets VmHWM) and given as a
multiple of the study's pixel bytes.

    python bench/bench_analysis.py [--slices 300 1000] [--repeat 1] [--smoke]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dicom_node.client import InferenceClient, Upload, make_spec
from dicom_node.index import Index
from dicom_node.results import ResultWriter
from dicom_node.spool import Spool
from dicom_node.volume import read_series
from dicom_node.worker import keep_output
from inference_service.config import ServiceSection, ServiceSettings
from protos.radbridge.v1 import inference_pb2 as pb
from radbridge.embedded import EmbeddedInferenceService
from radbridge.synth import ct_series, write_series

STAGES = (
    "read volume", "gRPC + analysis", " gRPC transfer", " analysis+answer", "SEG build", "SR build", "write outputs",
)  # fmt: skip
TOTAL = ("read volume", "gRPC + analysis", "SEG build", "SR build", "write outputs")  # the split rows are parts


def _vm(key: str) -> float:
    """VmHWM / VmRSS of this process in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    """Free what is garbage, give freed heap back to the OS, then restart the peak from here."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with contextlib.suppress(OSError):  # not Linux, or not allowed: peaks then accumulate
        Path("/proc/self/clear_refs").write_text("5")


def _stage(name: str, fn: Callable[[], Any], out: dict[str, tuple[float, float]]) -> Any:
    _reset_peak()
    started = time.perf_counter()
    value = fn()
    out[name] = (time.perf_counter() - started, _vm("VmHWM"))
    return value


def run_once(files: list[Path], work: Path, address: str) -> dict[str, tuple[float, float]]:
    spool = Spool(work / "spool")
    index = Index(spool.index_path)
    out: dict[str, tuple[float, float]] = {}
    volume = _stage("read volume", lambda: read_series(files), out)
    sources = volume.sources
    upload = Upload.of(volume, make_spec(["segment", "report", "detect"]))
    del volume  # as the worker does: the upload lets go of the voxels once the service has them
    received: list[float] = []

    def on_progress(p: pb.Progress) -> None:
        if p.stage != pb.Progress.RECEIVING and not received:
            received.append(time.perf_counter())  # the service holds the whole volume

    client = InferenceClient(address, deadline_s=3600)
    try:
        started = time.perf_counter()
        outcome = _stage("gRPC + analysis", partial(client.analyze_upload, upload, on_progress), out)
    finally:
        client.close()
    del upload
    # Time-only split of the call above: sending the volume, then analysing and answering.
    total, peak = out["gRPC + analysis"]
    sent = (received[0] - started) if received else float("nan")
    out[" gRPC transfer"] = (sent, peak)
    out[" analysis+answer"] = (total - sent, peak)
    writer = ResultWriter(sources, outcome.result, outcome.masks)
    seg = _stage("SEG build", writer.build_seg, out)
    _stage("SR build", lambda: (writer.build_measurement_report(seg), writer.build_key_slice_report(),
                                writer.build_narrative()), out)  # fmt: skip
    objects = writer.build_all()  # the same objects, as written by the worker
    _stage("write outputs", lambda: [keep_output(spool, index, o.kind, o.dataset) for o in objects], out)
    index.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, nargs="+", default=[300, 1000])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="a few seconds: 24 slices, once")
    args = parser.parse_args()
    sizes, repeat = ([24], 1) if args.smoke else (args.slices, args.repeat)
    settings = ServiceSettings(inference_service=ServiceSection(port=0))
    rows = []
    with EmbeddedInferenceService(settings) as service, tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            files = write_series(ct_series(n_slices=n), Path(tmp) / f"ct-{n}")
            gc.collect()
            pixel_mb = n * 512 * 512 * 2 / 1e6
            runs = [run_once(files, Path(tmp) / f"run-{n}-{r}", service.address) for r in range(repeat)]
            for stage in STAGES:
                times = [r[stage][0] for r in runs]
                peaks = [r[stage][1] for r in runs]
                rows.append((n, pixel_mb, stage, statistics.median(times), min(times), max(times), max(peaks)))
            total = [sum(r[s][0] for s in TOTAL) for r in runs]
            rows.append((n, pixel_mb, "total", statistics.median(total), min(total), max(total), max(
                max(r[s][1] for s in TOTAL) for r in runs)))
    print(f"{'slices':>6} {'pixels MB':>9}  {'stage':<16} {'median s':>8} {'min s':>7} {'max s':>7} "
          f"{'peak RSS MB':>11} {'x pixels':>8}")  # fmt: skip
    for n, mb, stage, med, lo, hi, peak in rows:
        print(f"{n:>6} {mb:>9.0f}  {stage:<16} {med:>8.2f} {lo:>7.2f} {hi:>7.2f} {peak:>11.0f} {peak / mb:>8.1f}")
    print("peak RSS: the whole process (node + embedded service) during the stage; x pixels: / pixel bytes")


if __name__ == "__main__":
    main()
