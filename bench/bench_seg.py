"""DICOM SEG writing: RadBridge's ``ResultWriter.build_seg`` vs dcmqi's ``itkimage2segimage``, same run.

Both writers get the same masks and the same source CT series (synthetic 512x512, radbridge.synth),
and each writes a BINARY SEG file:

- RadBridge (``dicom_node.results.ResultWriter``, in this process, as the node's worker calls it):
  source headers read with ``pydicom.dcmread(stop_before_pixels=True)`` (what ``read_series`` keeps),
  masks in memory as the gRPC client hands them to the worker (``dicom_node.masks.PackedMask``, 1 bit
  a voxel), one SEGMENT TaskResult whose MaskInfo list describes the segments. Timed: ``build_seg()``
  (``dicom_node.segwriter``) + ``save_as`` to a file: one frame per (segment, slice) with any voxel
  set, uncompressed (Explicit VR Little Endian, 1 bit a pixel). A second row adds the header read
  of the source files, so that both sides start from files on disk. With ``--highdicom`` a third
  row times ``build_seg_highdicom()`` (highdicom's Segmentation, the writer before segwriter) on
  the same input.
- dcmqi 1.5.7 (``itkimage2segimage`` from the PyPI wheel, a subprocess): reads the source DICOM
  files (``--inputDICOMDirectory``), one NRRD label map holding all segments (label i = segment i;
  uint8, raw, LPS geometry from the series) and the JSON metadata; writes a BINARY SEG with its
  defaults: ``--skip 1`` (empty frames are not encoded), ``--compress none``. Timed: the whole
  subprocess (start-up, reading the DICOM files and the NRRD, writing the SEG). Writing the NRRD and
  the JSON is input preparation and is not timed (RadBridge's masks are in memory likewise).

After the timed runs each output is read back with ``highdicom.seg.segread``: its frame count and,
per segment and source slice (Plane Position z), its voxel count must equal the masks'. The
ratio is dcmqi time / RadBridge time: above 1, RadBridge is faster. Wall time is the table's
figure; CPU time (this process's, plus the dcmqi child's) is printed beside it, because a shared
machine slows wall time unevenly.

Cases (from the issue): 2 large segments x 500 slices, 100 small non-overlapping segments x 300
slices; every segment is an ellipsoid in its own place, so frames are not empty.

    python bench/bench_seg.py [--case 2x500 100x300] [--repeat 3] [--highdicom] [--smoke]
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import highdicom as hd  # noqa: E402
import pydicom  # noqa: E402

from dicom_node.masks import PackedMask  # noqa: E402
from dicom_node.results import ResultWriter  # noqa: E402
from protos.radbridge.v1 import inference_pb2 as pb  # noqa: E402
from radbridge.synth import ct_series, write_series  # noqa: E402

#: the venv's (pip install dcmqi) first, else one on PATH
_VENV_DCMQI = Path(sys.executable).parent / "itkimage2segimage"
DCMQI = str(_VENV_DCMQI) if _VENV_DCMQI.exists() else shutil.which("itkimage2segimage")
CATEGORY = pb.Code(value="49755003", scheme="SCT", meaning="Morphologically Altered Structure")
TYPE = pb.Code(value="4147007", scheme="SCT", meaning="Mass")


@dataclass(frozen=True)
class Case:
    segments: int
    slices: int

    @property
    def name(self) -> str:
        return f"{self.segments}x{self.slices}"


def _ellipsoid(
    mask: np.ndarray, center: tuple[float, float, float], radii: tuple[float, float, float]
) -> None:
    """Set an axis-aligned ellipsoid in ``mask`` (z, y, x), touching only its bounding box."""
    lo = [max(0, int(np.floor(c - r))) for c, r in zip(center, radii, strict=True)]
    hi = [min(n, int(np.ceil(c + r)) + 1) for c, r, n in zip(center, radii, mask.shape, strict=True)]
    z, y, x = np.ogrid[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    inside = sum(((g - c) / r) ** 2 for g, c, r in zip((z, y, x), center, radii, strict=True)) <= 1.0
    mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] |= inside


def make_masks(case: Case, rows: int = 512, cols: int = 512) -> dict[int, np.ndarray]:
    """Non-overlapping ellipsoids, each in its own place. np.zeros pages that are never written
    stay unallocated, so 100 full-volume masks cost only what their ellipsoids touch."""
    n, shape = case.slices, (case.slices, rows, cols)
    masks = {i: np.zeros(shape, dtype=bool) for i in range(1, case.segments + 1)}
    if case.segments <= 2:
        places = [((0.4 * n, 200, 180), (0.35 * n, 80, 80)), ((0.6 * n, 310, 340), (0.35 * n, 70, 90))]
        for number, (center, radii) in zip(masks, places, strict=False):
            _ellipsoid(masks[number], center, radii)
        return masks
    grid = int(np.ceil(np.sqrt(case.segments)))
    step = min(rows, cols) / grid
    rz = max(1.0, min(15.0, n / 8))
    for number, mask in masks.items():
        i = number - 1
        cy, cx = step * (i // grid + 0.5), step * (i % grid + 0.5)
        cz = rz + (i * 37) % max(1, int(n - 2 * rz))
        _ellipsoid(mask, (cz, cy, cx), (rz, step * 0.4, step * 0.4))
    return masks


def analysis_result(case: Case) -> pb.AnalysisResult:
    """One SEGMENT task whose MaskInfo list names the segments (as the gRPC client receives it)."""
    return pb.AnalysisResult(
        model=pb.ModelIdentity(name="bench", backend="reference", version="1"),
        tasks=[
            pb.TaskResult(
                task=pb.TASK_KIND_SEGMENT,
                masks=[
                    pb.MaskInfo(segment_number=i, label=f"Segment {i}", category=CATEGORY, type=TYPE)
                    for i in range(1, case.segments + 1)
                ],
            )
        ],
    )


def dcmqi_metadata(case: Case) -> dict:
    code = {  # pb.Code -> dcmqi's code dict
        "category": {"CodeValue": CATEGORY.value, "CodingSchemeDesignator": CATEGORY.scheme,
                     "CodeMeaning": CATEGORY.meaning},
        "type": {"CodeValue": TYPE.value, "CodingSchemeDesignator": TYPE.scheme, "CodeMeaning": TYPE.meaning},
    }  # fmt: skip
    return {
        "ContentCreatorName": "Bench^RadBridge",
        "ClinicalTrialSeriesID": "1",
        "ClinicalTrialTimePointID": "1",
        "SeriesDescription": "Segmentation",
        "SeriesNumber": "9701",
        "InstanceNumber": "1",
        "BodyPartExamined": "CHEST",
        "segmentAttributes": [
            [
                {
                    "labelID": i,
                    "SegmentDescription": f"Segment {i}",
                    "SegmentLabel": f"Segment {i}",
                    "SegmentAlgorithmType": "AUTOMATIC",
                    "SegmentAlgorithmName": "bench",
                    "SegmentedPropertyCategoryCodeSequence": code["category"],
                    "SegmentedPropertyTypeCodeSequence": code["type"],
                    "recommendedDisplayRGBValue": [128, 174, 128],
                }
                for i in range(1, case.segments + 1)
            ]
        ],
    }


def write_nrrd(path: Path, labels: np.ndarray, headers: list[pydicom.Dataset]) -> None:
    """A raw uint8 NRRD label map (z, y, x) with the series' geometry in LPS."""
    first, second = headers[0], headers[1] if len(headers) > 1 else None
    row_dir = np.array(first.ImageOrientationPatient[:3], dtype=float)  # along a row: column index
    col_dir = np.array(first.ImageOrientationPatient[3:], dtype=float)  # down a column: row index
    dr, dc = (float(v) for v in first.PixelSpacing)  # row spacing, column spacing
    origin = np.array(first.ImagePositionPatient, dtype=float)
    if second is not None:
        slice_vec = np.array(second.ImagePositionPatient, dtype=float) - origin
    else:
        slice_vec = np.cross(row_dir, col_dir) * float(first.SliceThickness)

    def vec(v: np.ndarray) -> str:
        return "(" + ",".join(f"{x:.6g}" for x in v) + ")"

    header = (
        "NRRD0004\n"
        "type: unsigned char\n"
        "dimension: 3\n"
        "space: left-posterior-superior\n"
        f"sizes: {labels.shape[2]} {labels.shape[1]} {labels.shape[0]}\n"
        f"space directions: {vec(row_dir * dc)} {vec(col_dir * dr)} {vec(slice_vec)}\n"
        "kinds: domain domain domain\n"
        "endian: little\n"
        "encoding: raw\n"
        f"space origin: {vec(origin)}\n\n"
    )
    with open(path, "wb") as f:
        f.write(header.encode("ascii"))
        f.write(np.ascontiguousarray(labels, dtype=np.uint8).tobytes())


def label_map(masks: dict[int, np.ndarray]) -> np.ndarray:
    labels = np.zeros(next(iter(masks.values())).shape, dtype=np.uint8)
    for number, mask in masks.items():
        labels[mask] = number
    return labels


def expected_counts(masks: dict[int, np.ndarray], z_of_slice: list[float]) -> dict[tuple[str, float], int]:
    """(segment label, slice z) -> voxels set, for every non-empty (segment, slice)."""
    out = {}
    for number, mask in masks.items():
        per_slice = np.count_nonzero(mask, axis=(1, 2))
        for k in np.flatnonzero(per_slice):
            out[(f"Segment {number}", round(z_of_slice[k], 2))] = int(per_slice[k])
    return out


def read_counts(path: Path) -> dict[tuple[str, float], int]:
    """(segment label, frame z) -> voxels set, from a SEG read back with highdicom."""
    seg = hd.seg.segread(path)
    labels = {n: seg.get_segment_description(n).segment_label for n in seg.segment_numbers}
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    out: dict[tuple[str, float], int] = {}
    for frame, item in zip(pixels, seg.PerFrameFunctionalGroupsSequence, strict=True):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        z = round(float(item.PlanePositionSequence[0].ImagePositionPatient[2]), 2)
        key = (labels[number], z)
        out[key] = out.get(key, 0) + int(np.count_nonzero(frame))
    return out


def _cpu() -> float:
    """CPU seconds of this process and of its waited-for children (dcmqi)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall, CPU) seconds of fn()."""
    gc.collect()
    started, cpu = time.perf_counter(), _cpu()
    fn()
    return time.perf_counter() - started, _cpu() - cpu


def packed(masks: dict[int, np.ndarray]) -> dict[int, PackedMask]:
    """The masks as the node holds them after the gRPC answer: bit-packed, 1 bit a voxel."""
    return {n: PackedMask(np.packbits(m).tobytes(), m.shape) for n, m in masks.items()}


Row = tuple[str, list[float], list[float], int, float, str]


def run_case(case: Case, repeat: int, work: Path, with_highdicom: bool = False) -> list[Row]:
    series_dir = work / "series"
    files = write_series(ct_series(n_slices=case.slices), series_dir)
    headers = sorted(
        (pydicom.dcmread(p, stop_before_pixels=True) for p in files),
        key=lambda ds: -float(ds.ImagePositionPatient[2]),  # the synthetic series runs head to foot
    )
    masks = make_masks(case)
    node_masks = packed(masks)
    result = analysis_result(case)
    nrrd, meta = work / "labels.nrrd", work / "meta.json"
    write_nrrd(nrrd, label_map(masks), headers)
    meta.write_text(json.dumps(dcmqi_metadata(case), indent=1))
    rb_out, rb_files_out, qi_out = work / "radbridge.dcm", work / "radbridge-files.dcm", work / "dcmqi.dcm"
    hd_out = work / "highdicom.dcm"

    def radbridge() -> None:
        ResultWriter(headers, result, node_masks).build_seg().save_as(rb_out, enforce_file_format=True)

    def radbridge_from_files() -> None:
        sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
        sources.sort(key=lambda ds: -float(ds.ImagePositionPatient[2]))
        ResultWriter(sources, result, node_masks).build_seg().save_as(rb_files_out, enforce_file_format=True)

    def radbridge_highdicom() -> None:
        writer = ResultWriter(headers, result, node_masks)
        writer.build_seg_highdicom().save_as(hd_out, enforce_file_format=True)

    def dcmqi() -> None:
        proc = subprocess.run(
            [DCMQI, "--inputImageList", str(nrrd), "--inputDICOMDirectory", str(series_dir),
             "--outputDICOM", str(qi_out), "--inputMetadata", str(meta)],
            capture_output=True, text=True,
        )  # fmt: skip
        if proc.returncode != 0 or not qi_out.exists():
            raise SystemExit(f"itkimage2segimage failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")

    writers = [
        ("radbridge build_seg + save", radbridge, rb_out),
        ("radbridge + header read", radbridge_from_files, rb_files_out),
        *([("radbridge highdicom (before)", radbridge_highdicom, hd_out)] if with_highdicom else []),
        ("dcmqi itkimage2segimage", dcmqi, qi_out),
    ]
    times: dict[str, list[float]] = {name: [] for name, _, _ in writers}
    cpu: dict[str, list[float]] = {name: [] for name, _, _ in writers}
    for _ in range(repeat):  # interleaved, so a slow moment of the machine hits all sides
        for name, fn, _ in writers:
            wall, used = timed(fn)
            times[name].append(wall)
            cpu[name].append(used)
    expected = expected_counts(masks, [float(ds.ImagePositionPatient[2]) for ds in headers])
    rows = []
    for name, _, out in writers:
        got = read_counts(out)
        check = "ok"
        if got != expected:
            missing = len(set(expected) - set(got))
            extra = len(set(got) - set(expected))
            differ = sum(1 for k in set(got) & set(expected) if got[k] != expected[k])
            check = f"MISMATCH ({missing} frames missing, {extra} extra, {differ} differ)"
        frames = int(pydicom.dcmread(out, stop_before_pixels=True).NumberOfFrames)
        rows.append((name, times[name], cpu[name], frames, out.stat().st_size / 1e6, check))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--case", nargs="+", default=["2x500", "100x300"], help="SEGMENTSxSLICES")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--highdicom", action="store_true", help="also time the highdicom writer (before)")
    parser.add_argument("--smoke", action="store_true", help="a few seconds: 2x8 and 5x6, once")
    args = parser.parse_args()
    specs, repeat = (["2x8", "5x6"], 1) if args.smoke else (args.case, args.repeat)
    if DCMQI is None:
        raise SystemExit("dcmqi's itkimage2segimage is needed (pip install dcmqi).")
    cases = [Case(*(int(v) for v in spec.split("x"))) for spec in specs]
    with tempfile.TemporaryDirectory(prefix="bench-seg-") as tmp:
        run_case(Case(2, 4), 1, Path(tmp))  # warm-up, not reported: imports, first calls, page cache
    table = []
    for case in cases:
        with tempfile.TemporaryDirectory(prefix="bench-seg-") as tmp:
            table.append((case, run_case(case, repeat, Path(tmp), args.highdicom)))
    print(f"DICOM SEG (BINARY, uncompressed, empty frames omitted) of 512x512 CT masks, median of {repeat}; "
          "ratio = dcmqi median / this row's median, wall and CPU (>1: RadBridge faster)")  # fmt: skip
    print(f"{'case':>8}  {'writer':<28} {'median s':>8} {'min s':>7} {'max s':>7} {'frames':>6} "
          f"{'file MB':>7} {'ratio':>6} {'cpu s':>6} {'ratio':>6}  check")  # fmt: skip
    failed = False
    for case, rows in table:
        dcmqi_median = statistics.median(rows[-1][1])
        dcmqi_cpu = statistics.median(rows[-1][2])
        for name, times, used, frames, mb, check in rows:
            med, med_cpu = statistics.median(times), statistics.median(used)
            own = name.startswith("dcmqi")
            ratio = f"{'':>6}" if own else f"{dcmqi_median / med:6.2f}"
            cpu_ratio = f"{'':>6}" if own else f"{dcmqi_cpu / med_cpu:6.2f}"
            print(f"{case.name:>8}  {name:<28} {med:8.2f} {min(times):7.2f} {max(times):7.2f} {frames:6d} "
                  f"{mb:7.1f} {ratio} {med_cpu:6.2f} {cpu_ratio}  {check}")  # fmt: skip
            failed |= check != "ok"
    print("check: per (segment, source slice) voxel counts read back with highdicom == the masks'")
    if failed:
        raise SystemExit("an output does not match its masks")


if __name__ == "__main__":
    main()
