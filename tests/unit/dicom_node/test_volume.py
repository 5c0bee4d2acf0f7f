from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from dicom_node.errors import VolumeError
from dicom_node.volume import read_series
from radbridge.synth import cr_chest_path, phantom_hu
from tests.dicom_fixtures import set_raw


def test_shuffled_series_is_sorted_by_position(small_ct_files: list[Path]) -> None:
    shuffled = list(small_ct_files)
    random.Random(3).shuffle(shuffled)
    vol = read_series(shuffled)
    assert vol.voxels.shape == (24, 512, 512)
    z = [float(ds.ImagePositionPatient[2]) for ds in vol.sources]
    assert z == sorted(z)  # ascending along the normal (0,0,1)
    assert vol.spacing_mm == pytest.approx((2.5, 0.7, 0.7))
    assert vol.rescaled
    # synthetic slice k sits at z = -2.5k, so sorted slice 0 is phantom slice 23
    np.testing.assert_array_equal(vol.voxels[0], phantom_hu(24)[23])
    assert all("PixelData" not in ds for ds in vol.sources)


def test_two_missing_slices_are_interpolated(small_ct_files: list[Path]) -> None:
    """Two slices missing: resampled to the series' 2.5 mm, the received slices kept as they came."""
    vol = read_series(
        small_ct_files[:5] + small_ct_files[7:10]
    )  # z = 0..-10, then -17.5..-22.5 (ascending: -22.5 first)
    assert vol.voxels.shape == (10, 512, 512) and vol.spacing_mm[0] == pytest.approx(2.5)
    assert [r.source for r in vol.slices] == [0, 1, 2, None, None, 3, 4, 5, 6, 7]
    assert "2 missing slices between z=-17.50 and z=-10.00 mm" in vol.note and "2.50 mm" in vol.note


def test_duplicate_positions_are_refused(tmp_path: Path, small_ct_files: list[Path]) -> None:
    ds = pydicom.dcmread(small_ct_files[1])
    ds.ImagePositionPatient = pydicom.dcmread(small_ct_files[0]).ImagePositionPatient
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    dup = tmp_path / "dup.dcm"
    ds.save_as(dup)
    with pytest.raises(VolumeError, match="share one slice position"):
        read_series([small_ct_files[0], dup, small_ct_files[2]])


def test_missing_orientation_is_refused(tmp_path: Path, small_ct_files: list[Path]) -> None:
    paths = []
    for i, src in enumerate(small_ct_files[:3]):
        ds = pydicom.dcmread(src)
        del ds.ImageOrientationPatient
        paths.append(tmp_path / f"{i}.dcm")
        ds.save_as(paths[-1])
    with pytest.raises(VolumeError, match="Orientation"):
        read_series(paths)


def test_cr_monochrome1_is_inverted() -> None:
    path = cr_chest_path()
    raw = pydicom.dcmread(path)
    assert raw.PhotometricInterpretation == "MONOCHROME1"
    vol = read_series([path])
    assert vol.voxels.shape == (1, 1955, 1841)
    top = 2 ** int(raw.BitsStored) - 1
    np.testing.assert_array_equal(vol.voxels[0], top - raw.pixel_array.astype(np.float32))
    assert vol.spacing_mm[1:] == (0.0, 0.0)  # RG1_UNCI has PixelSpacing 0\0: unknown


def test_compressed_j2k_ct_decodes() -> None:
    path = get_testdata_file("693_J2KI.dcm")
    vol = read_series([Path(path)])
    ds = pydicom.dcmread(path)
    assert vol.voxels.shape == (1, ds.Rows, ds.Columns)
    assert vol.rescaled


def test_no_pixel_data_is_refused(tmp_path: Path, small_ct_files: list[Path]) -> None:
    ds = pydicom.dcmread(small_ct_files[0])
    del ds.PixelData
    p = tmp_path / "nopix.dcm"
    ds.save_as(p)
    with pytest.raises(VolumeError, match="No instance of the series has pixel data"):
        read_series([p])


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS:UserWarning")
def test_a_lower_case_modality_is_read_as_its_upper_case_term(
    tmp_path: Path, small_ct_files: list[Path]
) -> None:
    """CS values are upper case (PS3.5 6.2): a modality that sends "ct " means CT, which the
    backends check against; the series was refused by the reference backend for 'ct'."""
    files = []
    for path in small_ct_files[:3]:
        ds = pydicom.dcmread(path)
        set_raw(ds, "Modality", "ct ")
        ds.save_as(tmp_path / path.name, enforce_file_format=True)
        files.append(tmp_path / path.name)
    assert read_series(files).modality == "CT"
