"""RadBridgeLib.dicom_objects and .database: the panel's Save as DICOM and Load RadBridge results.

An oblique, anisotropic CT series is analysed twice by a real inference service on loopback
(reference backend): once as the Slicer panel does (Slicer's array and IJKToRAS) and once as the
node does (``dicom_node.volume.read_series`` + the node's gRPC client). Both must give the same
DICOM objects; the panel's objects must validate and read back onto the volume's grid.
"""

from __future__ import annotations

import math
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
import RadBridgeLib as lib
from pydicom.dataset import Dataset
from RadBridgeLib.database import list_series, stored_results
from RadBridgeLib.dicom_objects import (
    DicomMismatchError,
    output_kind,
    read_results,
    save_results,
    slice_indices,
)

from dicom_node.client import InferenceClient, make_spec
from dicom_node.results import ResultWriter
from dicom_node.volume import read_series
from inference_service.config import ServiceSection, ServiceSettings
from radbridge.embedded import EmbeddedInferenceService
from radbridge.synth import ct_series, write_series
from tests.peers import assert_valid_dicom_object
from tests.unit.slicer_extension.conftest import EXTENSION_DIR
from tests.unit.slicer_extension.fake_slicer import FolderDatabase, slicer_volume

N_SLICES = 12
ROW_MM, COLUMN_MM, SLICE_MM = 0.9, 0.7, 2.5
TASKS = ["segment", "detect", "report"]
#: Time-of-creation attributes that differ between two runs of the same writer.
VOLATILE = {
    "ContentDate",
    "ContentTime",
    "InstanceCreationDate",
    "InstanceCreationTime",
    "SeriesDate",
    "SeriesTime",
}


def _oblique_series() -> list[Dataset]:
    """The synthetic CT re-placed on an oblique plane (20 deg about z then x), anisotropic pixels."""
    a = math.radians(20.0)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    rot = rx @ rz
    row_dir, col_dir = rot[:, 0], rot[:, 1]
    normal = np.cross(row_dir, col_dir)
    origin = np.array([-170.0, -160.0, 40.0])
    datasets = ct_series(n_slices=N_SLICES, seed=11)
    for k, ds in enumerate(datasets):
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [ROW_MM, COLUMN_MM]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in origin + k * SLICE_MM * normal]
        del ds.SliceLocation
    return datasets


def _slicer_volume(paths: list[Path]) -> tuple[np.ndarray, np.ndarray, list[Dataset]]:
    """Slicer's array and IJKToRAS of the series, and its headers in file order."""
    voxels, ijk_to_ras, _ = slicer_volume(paths)
    return voxels, ijk_to_ras, [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]


@pytest.fixture(scope="module")
def service() -> Iterator[EmbeddedInferenceService]:
    with EmbeddedInferenceService(ServiceSettings(inference_service=ServiceSection(port=0))) as svc:
        yield svc


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_series(_oblique_series(), tmp_path_factory.mktemp("oblique"))


@pytest.fixture(scope="module")
def volume(series: list[Path]) -> tuple[np.ndarray, np.ndarray, list[Dataset]]:
    return _slicer_volume(series)


@pytest.fixture(scope="module")
def panel_result(
    service: EmbeddedInferenceService, volume: tuple[np.ndarray, np.ndarray, list[Dataset]]
) -> lib.AnalysisResult:
    voxels, ijk_to_ras, _ = volume
    with lib.RadBridgeClient(service.address, deadline_s=120) as client:
        return client.analyze(voxels, ijk_to_ras, TASKS)


@pytest.fixture(scope="module")
def saved(
    panel_result: lib.AnalysisResult,
    volume: tuple[np.ndarray, np.ndarray, list[Dataset]],
    tmp_path_factory: pytest.TempPathFactory,
) -> list[Path]:
    voxels, ijk_to_ras, headers = volume
    shuffled = list(headers)
    random.Random(3).shuffle(shuffled)  # the DICOM database lists files in no particular order
    return save_results(panel_result, shuffled, ijk_to_ras, voxels.shape, tmp_path_factory.mktemp("out"))


def _comparable(path: Path) -> dict:
    """The dataset as JSON without the creation times, which differ between two writes."""
    ds = pydicom.dcmread(path)
    for keyword in VOLATILE:
        if keyword in ds:
            delattr(ds, keyword)
    for item in ds.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            del item.ContributionDateTime
    return ds.to_json_dict()


def test_slice_indices_follow_the_volume_not_the_file_order(
    volume: tuple[np.ndarray, np.ndarray, list[Dataset]],
) -> None:
    voxels, ijk_to_ras, headers = volume
    ks = slice_indices(headers, ijk_to_ras, voxels.shape)
    # write_series wrote slice k of the oblique stack as instance number k + 1, along the normal.
    assert ks == [int(h.InstanceNumber) - 1 for h in headers]
    reversed_headers = headers[::-1]
    assert slice_indices(reversed_headers, ijk_to_ras, voxels.shape) == ks[::-1]


def test_panel_saves_the_same_objects_as_the_node(
    service: EmbeddedInferenceService, series: list[Path], saved: list[Path], tmp_path: Path
) -> None:
    vol = read_series(series)
    client = InferenceClient(service.address, deadline_s=120)
    try:
        outcome = client.analyze(vol, make_spec(TASKS))
    finally:
        client.close()
    node = {}
    for obj in ResultWriter(vol.sources, outcome.result, outcome.masks).build_all():
        node[obj.kind] = tmp_path / f"{obj.kind}.dcm"
        obj.dataset.save_as(node[obj.kind], enforce_file_format=True)
    panel = {p.name.split("-", 1)[0]: p for p in saved}
    assert sorted(panel) == sorted(node) == ["keyslices", "measurements", "narrative", "seg"]
    for kind, path in panel.items():
        assert path.name == f"{kind}-{pydicom.dcmread(node[kind]).SOPInstanceUID}.dcm"
        # The same content apart from creation times: same UIDs, same SEG frames, same SR tree.
        assert _comparable(path) == _comparable(node[kind]), kind


def test_saved_objects_are_valid_dicom(saved: list[Path], require_dicom3tools: None) -> None:
    for path in saved:
        assert_valid_dicom_object(path)
        assert output_kind(pydicom.dcmread(path, stop_before_pixels=True)) == path.name.split("-", 1)[0]


def test_saved_objects_read_back_onto_the_volume_grid(
    panel_result: lib.AnalysisResult,
    saved: list[Path],
    volume: tuple[np.ndarray, np.ndarray, list[Dataset]],
) -> None:
    voxels, ijk_to_ras, headers = volume
    loaded = read_results([pydicom.dcmread(p) for p in saved], headers, ijk_to_ras, voxels.shape)
    assert sorted(loaded.masks) == sorted(panel_result.masks)
    for number, mask in panel_result.masks.items():
        assert mask.any()
        np.testing.assert_array_equal(loaded.masks[number], mask)
        assert loaded.segments[number].label == panel_result.segments[number].label
        assert list(loaded.segments[number].cielab) == list(panel_result.segments[number].cielab)
        assert loaded.segments[number].type.value == panel_result.segments[number].type.value
    assert len(loaded.boxes) == len(panel_result.boxes) > 0
    for got, want in zip(
        sorted(loaded.boxes, key=lambda b: (b.slice_index, b.row_min)),
        sorted(panel_result.boxes, key=lambda b: (b.slice_index, b.row_min)),
        strict=True,
    ):
        assert got.slice_index == want.slice_index
        assert (got.row_min, got.column_min, got.row_max, got.column_max) == pytest.approx(
            (want.row_min, want.column_min, want.row_max, want.column_max), abs=1e-3
        )
        assert got.finding.value == want.finding.value
    volumes = {m.segment_number: m.value for m in loaded.measurements}
    for m in panel_result.measurements:
        if m.segment_number:
            assert volumes[m.segment_number] == pytest.approx(m.value, rel=1e-6)
    assert "Findings:" in loaded.report_text
    assert panel_result.report_text.split("\n")[0] in loaded.report_text
    assert loaded.model_name == panel_result.model_name


def test_resampled_volume_is_refused_in_words(
    panel_result: lib.AnalysisResult, volume: tuple[np.ndarray, np.ndarray, list[Dataset]], tmp_path: Path
) -> None:
    voxels, ijk_to_ras, headers = volume
    resampled = ijk_to_ras.copy()
    resampled[:3, 0] *= 2.0  # as if the volume had been resampled to half the columns
    with pytest.raises(DicomMismatchError, match="i axis differs"):
        save_results(panel_result, headers, resampled, voxels.shape, tmp_path)
    shifted = ijk_to_ras.copy()
    shifted[:3, 3] += 0.5 * ijk_to_ras[:3, 2]  # half a slice off
    with pytest.raises(DicomMismatchError, match="between the volume's slices"):
        save_results(panel_result, headers, shifted, voxels.shape, tmp_path)
    with pytest.raises(DicomMismatchError, match="do not fill"):
        save_results(panel_result, headers[1:], ijk_to_ras, voxels.shape, tmp_path)
    with pytest.raises(DicomMismatchError, match="pixels but the volume"):
        slice_indices(headers, ijk_to_ras, (voxels.shape[0], 256, 256))
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_foreign_objects_are_not_taken_for_results(
    volume: tuple[np.ndarray, np.ndarray, list[Dataset]],
) -> None:
    voxels, ijk_to_ras, headers = volume
    other = Dataset()
    other.Manufacturer, other.Modality, other.SeriesNumber = "Vendor", "SR", 9702
    assert output_kind(other) is None
    other.Manufacturer = "RadBridge"
    assert output_kind(other) == "measurements"
    other.Modality = "SEG"
    assert output_kind(other) is None
    with pytest.raises(ValueError, match="None of the given objects"):
        read_results([headers[0]], headers, ijk_to_ras, voxels.shape)


# -- the DICOM database: series to analyse, results to load --------------------------------------


def test_database_lists_series_and_marks_radbridge_outputs(series: list[Path], saved: list[Path]) -> None:
    db = FolderDatabase([*series, *saved])
    entries = list_series(db)
    images = [e for e in entries if e.radbridge_kind is None]
    outputs = {e.radbridge_kind: e for e in entries if e.radbridge_kind}
    assert len(images) == 1 and images[0].image_count == N_SLICES and images[0].modality == "CT"
    assert sorted(outputs) == ["keyslices", "measurements", "narrative", "seg"]
    assert [e.series_number for e in entries] == ["2", "9701", "9702", "9703", "9704"]
    assert images[0].title == f"CT CHEST (synthetic phantom) · 2 Axial 2.5mm · CT · {N_SLICES} images"
    assert outputs["seg"].title.endswith("· SEG · 1 image · RadBridge SEG")
    assert "0010,0010" not in db.asked and "0010,0020" not in db.asked  # no patient name or ID


def test_results_of_a_study_are_found_from_the_image_or_an_output_series(
    series: list[Path], saved: list[Path]
) -> None:
    entries = list_series(FolderDatabase([*series, *saved]))
    image = next(e for e in entries if e.radbridge_kind is None)
    for chosen in entries:
        found = stored_results(entries, chosen)
        assert len(found) == 1, chosen.title
        assert found[0].source_series_uid == image.series_uid
        assert found[0].model == "reference"
        assert sorted(found[0].paths) == sorted(saved)


def test_results_of_another_series_are_not_offered(series: list[Path], saved: list[Path]) -> None:
    entries = list_series(FolderDatabase(series))
    assert stored_results(entries, entries[0]) == []


def test_the_writers_load_in_slicer_without_the_node() -> None:
    """Save/Load pull in dicom_node.results alone: no spool, jobs, DIMSE, HTTP or models."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "import RadBridgeLib.database, RadBridgeLib.dicom_objects; "
        "lazy = [m for m in sys.modules if m.split('.')[0] in ('dicom_node', 'highdicom')]; "
        "import dicom_node.results; "
        "node = sorted(m for m in sys.modules if m.startswith('dicom_node')); "
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('pynetdicom', 'starlette', 'uvicorn', "
        "'httpx', 'multipart', 'python_multipart', 'dicomweb_client', 'torch', 'transformers', "
        "'radbridge', 'radbridge_common', 'inference_service', 'slicer', 'qt', 'vtk')]; "
        "print(lazy, node, heavy); "
        "sys.exit(lazy or heavy or node != ['dicom_node', 'dicom_node._contours', 'dicom_node.masks', 'dicom_node.results', 'dicom_node.segwriter', 'dicom_node.slices', 'dicom_node.source_values', 'dicom_node.text'])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(EXTENSION_DIR)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
