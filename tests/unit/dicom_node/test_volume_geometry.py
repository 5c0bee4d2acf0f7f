"""Volume assembly from enhanced multi-frame images and from series with uneven slice gaps.

Enhanced images are built the way a converter builds them (highdicom's Legacy Converted Enhanced
CT from the synthetic CT series), then edited where a test needs several stacks, per-frame
rescale or a broken geometry.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_node.errors import VolumeError
from dicom_node.volume import SliceRef, read_series, regular_grid
from radbridge.synth import ct_series, phantom_hu, write_series

N = 6


def legacy_enhanced(datasets: list[Dataset]) -> Dataset:
    """The series as one Legacy Converted Enhanced CT instance (frames in the given order)."""
    return hd.legacy.LegacyConvertedEnhancedCTImage(
        legacy_datasets=datasets,
        series_instance_uid=generate_uid(),
        series_number=3,
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )


def save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def frame_z(ds: Dataset, frame: int) -> float:
    return float(
        ds.PerFrameFunctionalGroupsSequence[frame - 1].PlanePositionSequence[0].ImagePositionPatient[2]
    )


@pytest.fixture(scope="module")
def series() -> list[Dataset]:
    return ct_series(n_slices=N)


def test_enhanced_ct_is_one_volume_sorted_along_the_normal(tmp_path: Path, series: list[Dataset]) -> None:
    shuffled = list(series)
    random.Random(4).shuffle(shuffled)
    mf = legacy_enhanced(shuffled)
    vol = read_series([save(mf, tmp_path / "mf.dcm")])
    assert vol.voxels.shape == (N, 512, 512) and vol.voxels.dtype == np.int16
    assert vol.spacing_mm == pytest.approx((2.5, 0.7, 0.7))
    assert vol.window == (40.0, 400.0)
    assert len(vol.sources) == 1 and "PixelData" not in vol.sources[0]
    assert vol.note == ""
    z = [frame_z(mf, r.frame) for r in vol.slices]  # type: ignore[arg-type]
    assert z == sorted(z) and vol.position[2] == pytest.approx(z[0])
    hu = phantom_hu(N)
    for k, ref in enumerate(vol.slices):
        assert ref.source == 0
        np.testing.assert_array_equal(vol.voxels[k], hu[round(-frame_z(mf, ref.frame) / 2.5)])  # type: ignore[arg-type]


def test_per_frame_rescale_is_applied_per_frame(tmp_path: Path, series: list[Dataset]) -> None:
    mf = legacy_enhanced(series)
    shared = mf.SharedFunctionalGroupsSequence[0]
    del shared.PixelValueTransformationSequence
    for number, frame in enumerate(mf.PerFrameFunctionalGroupsSequence, start=1):
        item = Dataset()
        item.RescaleIntercept = -1024 + 10 * number  # a different intercept for every frame
        item.RescaleSlope = 1
        item.RescaleType = "HU"
        frame.PixelValueTransformationSequence = [item]
    vol = read_series([save(mf, tmp_path / "mf.dcm")])
    hu = phantom_hu(N)
    for k, ref in enumerate(vol.slices):
        original = round(-frame_z(mf, ref.frame) / 2.5)  # type: ignore[arg-type]
        np.testing.assert_array_equal(vol.voxels[k], hu[original] + 10 * ref.frame)  # type: ignore[operator]


def test_the_largest_stack_is_taken_and_named(tmp_path: Path, series: list[Dataset]) -> None:
    mf = legacy_enhanced(series)
    for number, frame in enumerate(mf.PerFrameFunctionalGroupsSequence, start=1):
        frame.FrameContentSequence[0].StackID = "A" if number <= 4 else "B"
    vol = read_series([save(mf, tmp_path / "mf.dcm")])
    assert sorted(r.frame for r in vol.slices) == [1, 2, 3, 4]  # type: ignore[type-var]
    assert vol.skipped == 2
    assert "2 stacks" in vol.note and "stack A" in vol.note and "4 frames" in vol.note


def _temporal(mf: Dataset, with_index: bool) -> Dataset:
    """Frames 4..6 at the positions of frames 1..3 (a second time point, other pixels)."""
    frames = mf.PerFrameFunctionalGroupsSequence
    for number in (4, 5, 6):
        frames[number - 1].PlanePositionSequence = copy.deepcopy(frames[number - 4].PlanePositionSequence)
    if with_index:
        for number, frame in enumerate(frames, start=1):
            frame.FrameContentSequence[0].TemporalPositionIndex = 1 if number <= 3 else 2
    return mf


def test_temporal_positions_are_split(tmp_path: Path, series: list[Dataset]) -> None:
    vol = read_series([save(_temporal(legacy_enhanced(series), True), tmp_path / "mf.dcm")])
    assert sorted(r.frame for r in vol.slices) == [1, 2, 3]  # type: ignore[type-var]
    assert "temporal position 1" in vol.note


def test_duplicate_positions_with_other_pixels_are_refused(tmp_path: Path, series: list[Dataset]) -> None:
    with pytest.raises(VolumeError, match="share one slice position .* with different pixels"):
        read_series([save(_temporal(legacy_enhanced(series), False), tmp_path / "mf.dcm")])


def test_duplicate_instances_with_the_same_pixels_are_left_out(tmp_path: Path, series: list[Dataset]) -> None:
    paths = write_series(series, tmp_path / "ct")
    twin = pydicom.dcmread(paths[2])
    twin.SOPInstanceUID = generate_uid()
    vol = read_series([*paths, save(twin, tmp_path / "twin.dcm")])
    assert vol.voxels.shape[0] == N and vol.skipped == 1
    assert "1 duplicate image" in vol.note


def test_mixed_orientations_within_a_stack_are_refused(tmp_path: Path, series: list[Dataset]) -> None:
    mf = legacy_enhanced(series)
    orientation = mf.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence
    del mf.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence
    for number, frame in enumerate(mf.PerFrameFunctionalGroupsSequence, start=1):
        frame.PlaneOrientationSequence = copy.deepcopy(orientation)
        if number > 3:
            frame.PlaneOrientationSequence[0].ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # coronal
    with pytest.raises(VolumeError, match="Stack '1' of the multi-frame image mixes orientations"):
        read_series([save(mf, tmp_path / "mf.dcm")])


def test_non_parallel_slices_are_refused(tmp_path: Path) -> None:
    datasets = ct_series(n_slices=8)
    tilt = np.radians(2.0)
    for ds in datasets[4:]:  # half the series 2 degrees off: neither one stack nor a reformat
        ds.ImageOrientationPatient = [1, 0, 0, 0, float(np.cos(tilt)), float(np.sin(tilt))]
    with pytest.raises(VolumeError, match=r"not parallel \(orientations differ by 2.0 degrees\)"):
        read_series(write_series(datasets, tmp_path / "ct"))


def test_missing_slice_is_interpolated_linearly(tmp_path: Path) -> None:
    paths = write_series(ct_series(n_slices=8), tmp_path / "ct")
    vol = read_series(paths[:3] + paths[4:])  # slice 3 (z = -7.5) was never received
    assert vol.voxels.shape == (8, 512, 512) and vol.spacing_mm[0] == pytest.approx(2.5)
    # ascending z: grid slice 4 is z = -7.5, between received z = -10 (source 3) and z = -5 (source 4)
    assert vol.slices[4] == SliceRef(None)
    assert [r.source for r in vol.slices] == [0, 1, 2, 3, None, 4, 5, 6]
    hu = phantom_hu(8).astype(np.float32)
    np.testing.assert_array_equal(vol.voxels[4], np.rint((hu[2] + hu[4]) / 2))
    np.testing.assert_array_equal(vol.voxels[3], hu[4])
    assert vol.note == (
        "1 missing slice between z=-10.00 and z=-5.00 mm; resampled to 2.50 mm (missing positions linearly interpolated)"
    )


def test_irregular_gaps_are_resampled_to_the_smallest(tmp_path: Path) -> None:
    datasets = ct_series(n_slices=5)
    for ds, z in zip(datasets, (0.0, -2.0, -5.0, -7.0, -10.0), strict=True):  # gaps 2, 3, 2, 3 mm
        ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1], z]
    vol = read_series(write_series(datasets, tmp_path / "ct"))
    assert vol.voxels.shape[0] == 6 and vol.spacing_mm[0] == pytest.approx(2.0)
    assert "irregular slice spacing (gaps 2.00..3.00 mm); resampled to 2.00 mm" in vol.note
    received = [r.source for r in vol.slices if r.source is not None]
    assert received == [0, 1, 2, 3, 4]  # every received image keeps one grid slice
    hu = phantom_hu(5).astype(np.float32)
    np.testing.assert_array_equal(vol.voxels[0], hu[4])  # z = -10, received as is
    np.testing.assert_array_equal(vol.voxels[1], np.rint((hu[4] + 2 * hu[3]) / 3))  # z = -8: 1/3 of the way


@pytest.mark.parametrize(
    ("positions", "size", "step", "exact"),
    [
        ([0, 2.5, 5, 7.5], 4, 2.5, True),
        ([0, 2.5, 7.5, 10], 5, 2.5, True),
        ([0, 2.5, 5, 12.5], 6, 2.5, True),
        ([0, 1.0, 2.5, 3.5], 5, 3.5 / 4, False),
    ],
)
def test_regular_grid(positions: list[float], size: int, step: float, exact: bool) -> None:
    grid = regular_grid(positions)
    assert (grid.size, grid.exact) == (size, exact) and grid.step_mm == pytest.approx(step)
    assert len(set(grid.index.tolist())) == len(positions) and grid.index[-1] == size - 1


def test_a_grid_too_fine_for_the_slices_is_refused() -> None:
    with pytest.raises(VolumeError, match="too irregular to resample"):
        regular_grid([0.0, 0.3, 10.0, 20.0])


@pytest.mark.parametrize("positions", [[2.5, 10.0, 1e308], [2.5, 7.5, 1e308], [-1e308, 0.0, 1e308]])
def test_absurd_gaps_are_refused_before_any_cast(positions: list[float]) -> None:
    """Found by tests/fuzz/test_fuzz_volume.py: a 1e308 mm gap overflowed the int cast of the grid
    (a RuntimeWarning, an error here) instead of the refusal."""
    with pytest.raises(VolumeError, match="too irregular to resample|cannot be resampled"):
        regular_grid(positions)


def test_classic_regular_series_is_unchanged(small_ct_files: list[Path]) -> None:
    vol = read_series(small_ct_files)
    assert vol.slices == () and vol.note == ""
    assert vol.slice_refs == tuple(SliceRef(i) for i in range(24))


def test_orientation_rounding_noise_keeps_one_stack(tmp_path: Path) -> None:
    """Scanners write IOP with noise in the last digits: still one stack, nothing left out."""
    datasets = ct_series(n_slices=6)
    for k, ds in enumerate(datasets):
        e = 4e-4 if k % 2 else -4e-4  # across a 3-decimal rounding boundary, about 0.02 degrees
        ds.ImageOrientationPatient = [1, e, 0, -e, 1, 0.0005 + e]
    vol = read_series(write_series(datasets, tmp_path / "ct"))
    assert vol.voxels.shape[0] == 6 and vol.skipped == 0 and vol.note == ""


def test_a_reformat_in_the_series_is_left_out_and_named(tmp_path: Path) -> None:
    datasets = ct_series(n_slices=8)
    for ds in datasets[6:]:  # two coronal images in the axial series
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    vol = read_series(write_series(datasets, tmp_path / "ct"))
    assert vol.voxels.shape[0] == 6 and vol.skipped == 2
    assert (
        vol.note
        == "the series holds 2 stacks; analysed the largest, 6 images; 2 images of the other stacks not analysed"
    )


def test_legacy_converted_enhanced_mr_is_one_volume(tmp_path: Path) -> None:
    """The same path for MR: the synthetic slices relabelled as an MR series, then converted."""
    datasets = ct_series(n_slices=5)
    for ds in datasets:
        ds.Modality = "MR"
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.MRImageStorage
        for keyword in ("RescaleIntercept", "RescaleSlope", "RescaleType", "KVP"):
            delattr(ds, keyword)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.ScanningSequence, ds.SequenceVariant, ds.MRAcquisitionType = "SE", "NONE", "2D"
        ds.EchoTime, ds.RepetitionTime, ds.MagneticFieldStrength = 10, 500, 3
    raw = {round(float(ds.ImagePositionPatient[2]), 2): ds.pixel_array for ds in datasets}
    mf = hd.legacy.LegacyConvertedEnhancedMRImage(
        legacy_datasets=datasets,
        series_instance_uid=generate_uid(),
        series_number=3,
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )
    vol = read_series([save(mf, tmp_path / "mr.dcm")])
    assert vol.modality == "MR" and vol.voxels.shape == (5, 512, 512)
    assert [frame_z(mf, r.frame) for r in vol.slices] == [-10.0, -7.5, -5.0, -2.5, 0.0]  # type: ignore[arg-type]
    for k, ref in enumerate(vol.slices):
        np.testing.assert_array_equal(vol.voxels[k], raw[frame_z(mf, ref.frame)])  # type: ignore[arg-type]
