"""Outputs for every PACS: key-image Secondary Captures and FRACTIONAL SEGs, validated and delivered.

- The key images (RGB SC, result burned in) pass dciodvfy, read back with pydicom and highdicom,
  carry the AI flags in the header, and their pixels differ from the plain windowed slice exactly
  where the outline is drawn.
- A probability map from the reference backend (``options.probability_maps``) becomes a FRACTIONAL
  SEG (PROBABILITY, max 255) that passes dciodvfy and reads back with fractional values.
- Through ``radbridge serve`` into Orthanc: a routing rule with ``key_images = true`` delivers the SC
  series next to the SEG/SR, a rule without it does not; a rule whose model sends probability maps
  delivers a FRACTIONAL SEG.
"""

from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from scipy import ndimage

from dicom_node import keyimages as ki
from dicom_node._contours import major_components
from dicom_node.attributes import searchable_attributes
from dicom_node.client import unpack_masks
from dicom_node.results import SERIES_NUMBERS, ResultWriter
from dicom_node.volume import read_series
from inference_service.assembly import pack_mask, result_to_pb
from inference_service.backends.base import ModelConfig, WorkItem
from inference_service.backends.reference import ReferenceBackend
from inference_service.types import AnalysisResult, AnalysisSpec, Geometry, TaskKind, Volume
from radbridge.synth import cr_chest_path, ct_series, write_series
from tests.peers import OrthancServer, assert_valid_dicom_object, free_port, storescu
from tests.reference_run import analyze_reference

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("require_dcmtk", "require_dicom3tools")]
SC_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"


def _key_images(objects: list, tmp_path: Path, name: str) -> list[Path]:
    paths = []
    for i, obj in enumerate(o for o in objects if o.kind == "keyimages"):
        path = tmp_path / f"{name}-{i}.dcm"
        obj.dataset.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def test_ct_key_images_validate_and_show_the_outline(tmp_path: Path, small_ct_files: list[Path]) -> None:
    vol = read_series(small_ct_files)
    outcome = analyze_reference(vol)
    writer = ResultWriter(vol.sources, outcome.result, outcome.masks)
    objects = writer.build_all(key_images=True)
    slices = writer.key_image_slices()
    paths = _key_images(objects, tmp_path, "ct")
    assert slices and len(paths) == len(slices) <= ki.MAX_KEY_IMAGES
    for obj in objects:  # the spool's index stores them as they are built (worker.keep_output)
        json.dumps(searchable_attributes(obj.dataset))
    for k, path in zip(slices, paths, strict=True):
        assert_valid_dicom_object(path)
        ds = pydicom.dcmread(path)
        src = vol.sources[k]
        assert ds.SOPClassUID == SC_IMAGE_STORAGE and ds.Modality == "OT"
        assert ds.PhotometricInterpretation == "RGB" and ds.SamplesPerPixel == 3
        assert ds.BurnedInAnnotation == "YES" and ds.ConversionType == "WSD"
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
        assert "AI" in ds.SeriesDescription and ds.SeriesNumber == SERIES_NUMBERS["keyimages"]
        assert ds.StudyInstanceUID == src.StudyInstanceUID and ds.PatientID == src.PatientID
        (ref,) = ds.SourceImageSequence
        assert ref.ReferencedSOPInstanceUID == src.SOPInstanceUID
        (equipment,) = [
            e
            for e in ds.ContributingEquipmentSequence
            if e.get("ManufacturerModelName") == outcome.result.model.name
        ]  # the AI, besides the source's acquisition equipment and highdicom itself
        assert equipment.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"  # Processing Equipment
        assert list(ds.PatientOrientation) == ["L", "P"]  # axial: rows run to the left, columns back
        assert hd.Image.from_dataset(ds).number_of_frames == 1  # highdicom reads it as an image
        # The grey is the plain windowed slice; the burned-in pixels differ from it along the outline.
        values, rescaled = ki.slice_values(src)
        plain = ki.windowed(values, ki.display_window(src, values, rescaled))
        assert ds.Rows == plain.shape[0] and ds.Columns == plain.shape[1]  # 512 wide: not enlarged
        rgb = ds.pixel_array
        changed = np.any(rgb != plain[..., None], axis=-1)
        info = next(
            m for t in outcome.result.tasks for m in t.masks if outcome.masks[m.segment_number][k].any()
        )
        component = major_components(np.asarray(outcome.masks[info.segment_number][k], dtype=bool))[0]
        edge = component & ~ndimage.binary_erosion(component)
        near_edge = ndimage.binary_dilation(edge, iterations=1)
        assert changed[near_edge].mean() > 0.5, "the outline is not burned in along the mask's edge"
        assert np.all(rgb[near_edge & changed] == ki.colour(info.segment_number, info.cielab), axis=-1).any()
        inside = ndimage.binary_erosion(component, iterations=4)
        inside[:80] = inside[-80:] = False  # leave out the banner and the legend
        assert changed[inside].mean() < 0.05, "the image under the outline is not the plain windowed slice"
        # The banner: a black band at the top with text drawn on it.
        top = rgb[:12]
        assert (top == 0).all(axis=-1).mean() > 0.5 and (top > 200).any()


def test_cr_key_image_enlarged_with_banner(tmp_path: Path) -> None:
    vol = read_series([cr_chest_path()])
    outcome = analyze_reference(vol)
    objects = ResultWriter(vol.sources, outcome.result, outcome.masks).build_all(key_images=True)
    (path,) = _key_images(objects, tmp_path, "cr")  # one image: the mask and the box share it
    assert_valid_dicom_object(path)
    ds = pydicom.dcmread(path)
    assert ds.BurnedInAnnotation == "YES"
    assert ds.Rows == vol.sources[0].Rows  # wider than 512 already: not enlarged
    assert "NOT FOR PRIMARY DIAGNOSIS" in ds.ImageComments


def test_no_key_images_unless_asked(small_ct_files: list[Path]) -> None:
    vol = read_series(small_ct_files)
    outcome = analyze_reference(vol)
    kinds = [o.kind for o in ResultWriter(vol.sources, outcome.result, outcome.masks).build_all()]
    assert "keyimages" not in kinds


def _probability_outcome(vol):  # noqa: ANN001, ANN202
    """The reference backend with probability maps, its masks sent through the wire format."""
    backend = ReferenceBackend(ModelConfig("reference", "reference", options={"probability_maps": True}))
    g = Geometry(vol.voxels.shape, vol.spacing_mm, vol.orientation, vol.position, vol.modality, vol.rescaled)
    item = WorkItem(Volume(vol.voxels, g), AnalysisSpec("", (TaskKind.SEGMENT,)))
    tasks = [backend.run([item], TaskKind.SEGMENT)[0]]
    result = result_to_pb(AnalysisResult(backend.identity, tasks))
    chunks = {m.segment_number: bytearray(pack_mask(m)) for t in tasks for m in t.masks}
    return result, unpack_masks(result, chunks, vol.voxels.shape), tasks


def test_fractional_seg_validates_and_reads_back(tmp_path: Path, small_ct_files: list[Path]) -> None:
    vol = read_series(small_ct_files)
    result, masks, tasks = _probability_outcome(vol)
    assert all(m.encoding == 2 and m.max_fractional_value == 255 for m in result.tasks[0].masks)
    objects = ResultWriter(vol.sources, result, masks).build_all(key_images=True)
    assert [o.kind for o in objects][:3] == ["seg", "measurements", "keyslices"]
    path = tmp_path / "seg.dcm"
    objects[0].dataset.save_as(path, enforce_file_format=True)
    assert_valid_dicom_object(path)
    for image in _key_images(objects, tmp_path, "frac"):  # outlines at p >= 0.5
        assert_valid_dicom_object(image)
    seg = hd.seg.segread(path)
    assert seg.SegmentationType == "FRACTIONAL" and seg.SegmentationFractionalType == "PROBABILITY"
    assert seg.MaximumFractionalValue == 255
    # The stored values are the backend's, on the right source slice, fractional at the edges.
    lungs = next(m for m in tasks[0].masks if m.segment_number == 1).voxels
    k = int(np.count_nonzero(lungs >= 128, axis=(1, 2)).argmax())
    stored = seg.get_pixels_by_source_instance(
        [str(vol.sources[k].SOPInstanceUID)], segment_numbers=[1], rescale_fractional=False
    )[0, ..., 0]
    assert np.array_equal(stored, lungs[k])
    assert np.any((stored > 0) & (stored < 255)), "no fractional value survived"
    probabilities = seg.get_pixels_by_source_instance(
        [str(vol.sources[k].SOPInstanceUID)], segment_numbers=[1]
    )
    assert probabilities.dtype.kind == "f" and probabilities.min() >= 0.0 and probabilities.max() <= 1.0


# -- through radbridge serve into Orthanc -------------------------------------------------------
def _series(tmp_path: Path, seed: int, description: str) -> tuple[str, list[Path]]:
    datasets = ct_series(n_slices=12, seed=seed)
    for ds in datasets:
        ds.SeriesDescription = description
    files = write_series(datasets, tmp_path / description)
    return str(datasets[0].StudyInstanceUID), files


@pytest.mark.slow
def test_rule_with_key_images_delivers_the_sc_series(tmp_path: Path, orthanc: OrthancServer) -> None:
    from tests.e2e.test_pipeline import Serve, _config, _study_objects, _wait_for_outputs

    port = free_port()
    rules = """
[models.reference]
backend = "reference"

[models.reference-prob]
backend = "reference"
options = { probability_maps = true }

[[routing.rules]]
name = "ct-key-images"
match = { modality = ["CT"], series_description = "^KEY$" }
tasks = ["segment", "detect"]
key_images = true

[[routing.rules]]
name = "ct-plain"
match = { modality = ["CT"], series_description = "^PLAIN$" }
tasks = ["segment", "detect"]

[[routing.rules]]
name = "ct-probability"
model = "reference-prob"
match = { modality = ["CT"], series_description = "^PROB$" }
tasks = ["segment"]
"""
    cfg = _config(tmp_path, port, orthanc, extra=rules)
    key_study, key_files = _series(tmp_path, 61, "KEY")
    plain_study, plain_files = _series(tmp_path, 62, "PLAIN")
    prob_study, prob_files = _series(tmp_path, 63, "PROB")
    serve = Serve(cfg, tmp_path / "serve.log")
    try:
        for files in (key_files, plain_files, prob_files):
            assert storescu(files, "127.0.0.1", port, "RADBRIDGE").returncode == 0
        key = _wait_for_outputs(orthanc, key_study, {"SEG": 1, "SR": 2, "OT": 1})
        plain = _wait_for_outputs(orthanc, plain_study, {"SEG": 1, "SR": 2})
        prob = _wait_for_outputs(orthanc, prob_study, {"SEG": 1})
    finally:
        assert serve.stop() == 0
    plain = _study_objects(orthanc, plain_study)
    key = _study_objects(orthanc, key_study)
    assert "OT" not in plain, "a rule without key_images delivered key images"
    assert len(key["OT"]) <= ki.MAX_KEY_IMAGES
    for n, inst in enumerate(key["OT"]):
        path = tmp_path / f"orthanc-sc-{n}.dcm"
        path.write_bytes(orthanc.instance_file(inst["id"]))
        assert_valid_dicom_object(path)
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID == SC_IMAGE_STORAGE and ds.BurnedInAnnotation == "YES"
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID in {
            str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in key_files
        }
    path = tmp_path / "orthanc-prob-seg.dcm"
    path.write_bytes(orthanc.instance_file(prob["SEG"][0]["id"]))
    assert_valid_dicom_object(path)
    assert pydicom.dcmread(path, stop_before_pixels=True).SegmentationType == "FRACTIONAL"
