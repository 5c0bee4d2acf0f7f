"""RadBridge's SEG and TID 1500 SRs through 3D Slicer's own converters (dcmqi) and headless MRML.

Needs the ``slicer`` extra (``pip install -e .[slicer]``): PyPI ``dcmqi`` for ``segimage2itkimage``
and ``tid1500reader`` (what Slicer's QuantitativeReporting DICOM plugins run), PyPI ``slicer-core``
for ``vtkMRMLScene`` / ``vtkMRMLSegmentationNode`` without a Slicer application.
"""

from __future__ import annotations

import gzip
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_node.client import AnalysisOutcome
from dicom_node.results import ResultWriter
from dicom_node.volume import read_series
from protos.radbridge.v1 import inference_pb2 as pb
from tests.reference_run import analyze_reference

EXTENSION_DIR = Path(__file__).resolve().parents[2] / "slicer_extension" / "RadBridge"
if str(EXTENSION_DIR) not in sys.path:
    sys.path.insert(0, str(EXTENSION_DIR))

import RadBridgeLib as lib  # noqa: E402
from RadBridgeLib.results import SegmentSpec, segment_specs  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slicer]


def _tool(name: str) -> str:
    """A dcmqi command line tool next to this interpreter or on PATH; skip when dcmqi is missing."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} not found: install PyPI dcmqi (pip install -e .[slicer]).")
    return found


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def written(small_ct_files: list[Path], tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """(volume, outcome, {kind: path}) for RadBridge's real SEG, 9702 and 9704 SRs on a synthetic CT."""
    shuffled = list(small_ct_files)
    random.Random(1).shuffle(shuffled)
    vol = read_series(shuffled)
    outcome = analyze_reference(vol)
    out = tmp_path_factory.mktemp("radbridge-objects")
    paths = {}
    for obj in ResultWriter(vol.sources, outcome.result, outcome.masks).build_all():
        paths[obj.kind] = out / f"{obj.kind}.dcm"
        obj.dataset.save_as(paths[obj.kind])
    assert {"seg", "measurements", "keyslices"} <= set(paths)
    return vol, outcome, paths


def _specs(outcome: AnalysisOutcome) -> list[SegmentSpec]:
    """Task A's SegmentSpecs for the outcome (masks already in the volume's (k, j, i) order)."""
    result = lib.AnalysisResult(result=outcome.result, masks=dict(outcome.masks))
    result.segments = {m.segment_number: m for t in outcome.result.tasks for m in t.masks}
    return segment_specs(result)


def _read_nrrd(path: Path) -> tuple[dict[str, str], np.ndarray]:
    """A minimal NRRD reader (attached data, raw or gzip): header fields and the (k, j, i) array."""
    blob = path.read_bytes()
    head, _, data = blob.partition(b"\n\n")
    fields = {}
    for line in head.decode("ascii").splitlines()[1:]:
        if line.startswith("#") or ":" not in line:
            continue
        key, _, value = line.partition(":")
        fields[key.strip()] = value.lstrip("=").strip()
    if fields.get("encoding") == "gzip":
        data = gzip.decompress(data)
    dtypes = {"short": "i2", "unsigned short": "u2", "unsigned char": "u1", "uchar": "u1", "char": "i1"}
    dtype = np.dtype(("<" if fields.get("endian", "little") == "little" else ">") + dtypes[fields["type"]])
    sizes = [int(s) for s in fields["sizes"].split()]
    return fields, np.frombuffer(data, dtype=dtype).reshape(sizes[::-1])


# -- dcmqi ---------------------------------------------------------------------------------


def test_segimage2itkimage_reads_one_volume_per_segment(written, tmp_path: Path) -> None:  # noqa: ANN001
    tool = _tool("segimage2itkimage")
    vol, outcome, paths = written
    out = tmp_path / "seg"
    out.mkdir()
    proc = _run(tool, "--inputDICOM", str(paths["seg"]), "--outputDirectory", str(out), "-t", "nrrd")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    specs = _specs(outcome)
    volumes = sorted(out.glob("*.nrrd"), key=lambda p: int(p.stem))
    assert [p.stem for p in volumes] == ["1", "2", "3"]
    meta = json.loads((out / "meta.json").read_text())
    attributes = [a for group in meta["segmentAttributes"] for a in group]
    assert (
        [a["SegmentLabel"] for a in attributes] == [s.name for s in specs] == ["Lungs", "Bone", "Soft tissue"]
    )
    for a, spec in zip(attributes, specs, strict=True):
        assert a["SegmentedPropertyTypeCodeSequence"]["CodeValue"] == spec.type[0]
        assert a["SegmentedPropertyCategoryCodeSequence"]["CodeValue"] == spec.category[0]
        # dcmqi's own CIELab -> RGB agrees with Task A's conversion.
        assert np.allclose(a["recommendedDisplayRGBValue"], np.array(spec.color_rgb) * 255, atol=2)
    for path, spec in zip(volumes, specs, strict=True):
        fields, labels = _read_nrrd(path)
        assert labels.shape == spec.mask.shape == vol.voxels.shape
        assert (
            int(np.count_nonzero(labels))
            == spec.voxel_count
            == int(np.count_nonzero(outcome.masks[spec.segment_number]))
        )
        np.testing.assert_array_equal(labels != 0, spec.mask)  # same voxels, same (k, j, i) order
        origin = [float(v) for v in fields["space origin"].strip("()").split(",")]
        assert np.allclose(origin, vol.position, atol=1e-3)


def test_tid1500reader_reads_the_volume_groups(written, tmp_path: Path) -> None:  # noqa: ANN001
    tool = _tool("tid1500reader")
    _, outcome, paths = written
    out = tmp_path / "measurements.json"
    proc = _run(tool, "--inputDICOM", str(paths["measurements"]), "--outputMetadata", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    groups = [g for g in json.loads(out.read_text())["Measurements"] if "ReferencedSegment" in g]
    assert len(groups) == 3
    seg_uid = pydicom.dcmread(paths["seg"], stop_before_pixels=True).SOPInstanceUID
    ours = {m.segment_number: m for t in outcome.result.tasks for m in t.measurements if m.segment_number}
    labels = {s.segment_number: s.name for s in _specs(outcome)}
    assert sorted(g["ReferencedSegment"] for g in groups) == sorted(ours) == [1, 2, 3]
    for g in groups:
        n = g["ReferencedSegment"]
        assert g["segmentationSOPInstanceUID"] == seg_uid
        assert g["TrackingIdentifier"] == labels[n]
        (item,) = g["measurementItems"]
        assert item["quantity"]["CodeValue"] == ours[n].concept.value == "118565006"
        assert item["units"]["CodeValue"] == ours[n].unit.value == "mL"
        assert float(item["value"]) == pytest.approx(ours[n].value, abs=0.051)  # the SR keeps 0.1 mL


def test_tid1500reader_reads_the_key_slice_report(written, tmp_path: Path) -> None:  # noqa: ANN001
    tool = _tool("tid1500reader")
    _, outcome, paths = written
    out = tmp_path / "keyslices.json"
    proc = _run(tool, "--inputDICOM", str(paths["keyslices"]), "--outputMetadata", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    groups = json.loads(out.read_text())["Measurements"]
    assert groups and all("Finding" in g for g in groups)
    assert {s.name for s in _specs(outcome)} <= {g["TrackingIdentifier"] for g in groups}


# -- slicer-core (headless MRML) -------------------------------------------------------------


def test_segmentation_node_from_segment_specs(written) -> None:  # noqa: ANN001
    pytest.importorskip("slicer_core", reason="slicer-core is not installed (pip install -e .[slicer]).")
    import slicer_core as slicer
    from vtkmodules.util import numpy_support
    from vtkmodules.vtkCommonCore import VTK_UNSIGNED_CHAR
    from vtkmodules.vtkCommonMath import vtkMatrix4x4

    vol, outcome, _ = written
    specs = _specs(outcome)
    ijk_to_ras = _ijk_to_ras(vol)
    matrix = vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(ijk_to_ras[r, c]))

    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    ids = {}
    for spec in specs:
        image = slicer.vtkOrientedImageData()
        k, j, i = spec.mask.shape
        image.SetDimensions(i, j, k)
        scalars = numpy_support.numpy_to_vtk(
            np.ascontiguousarray(spec.mask, dtype=np.uint8).ravel(), deep=True, array_type=VTK_UNSIGNED_CHAR
        )
        image.GetPointData().SetScalars(scalars)
        image.SetImageToWorldMatrix(matrix)
        ids[spec.segment_number] = node.AddSegmentFromBinaryLabelmapRepresentation(
            image, spec.name, spec.color_rgb
        )

    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == len(specs) == 3
    for spec in specs:
        segment = segmentation.GetSegment(ids[spec.segment_number])
        assert segment.GetName() == spec.name
        assert segment.GetColor() == pytest.approx(spec.color_rgb)
        out = slicer.vtkOrientedImageData()
        assert node.GetBinaryLabelmapRepresentation(ids[spec.segment_number], out)
        x0, x1, y0, y1, z0, z1 = out.GetExtent()
        values = numpy_support.vtk_to_numpy(out.GetPointData().GetScalars())
        back = np.zeros(spec.mask.shape, dtype=bool)
        back[z0 : z1 + 1, y0 : y1 + 1, x0 : x1 + 1] = (
            values.reshape(z1 - z0 + 1, y1 - y0 + 1, x1 - x0 + 1) != 0
        )
        assert int(back.sum()) == spec.voxel_count
        np.testing.assert_array_equal(back, spec.mask)
        read = vtkMatrix4x4()
        out.GetImageToWorldMatrix(read)
        assert np.allclose([[read.GetElement(r, c) for c in range(4)] for r in range(4)], ijk_to_ras)


def _ijk_to_ras(vol) -> np.ndarray:  # noqa: ANN001
    """The volume's Slicer IJKToRAS from its DICOM geometry (position, orientation, spacing)."""
    geometry = pb.Geometry(
        slices=vol.voxels.shape[0],
        rows=vol.voxels.shape[1],
        columns=vol.voxels.shape[2],
        slice_spacing_mm=vol.spacing_mm[0],
        row_spacing_mm=vol.spacing_mm[1],
        column_spacing_mm=vol.spacing_mm[2],
        image_orientation_patient=list(vol.orientation),
        image_position_patient=list(vol.position),
    )
    return lib.ijk_to_ras_from_geometry(geometry)
