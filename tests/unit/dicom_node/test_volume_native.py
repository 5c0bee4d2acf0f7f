"""The volume reader's native fast path (pixel bytes read from the file into the volume) gives
bit for bit what pydicom's decoding gives, and is the path a plain CT series takes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from dicom_node import volume
from dicom_node.volume import SeriesVolume, read_series
from radbridge.synth import phantom_hu


@pytest.fixture
def native_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the slices the fast path read (one entry per successful read)."""
    reads: list[int] = []
    original = volume._NativeReader.read

    def counting(self: volume._NativeReader, *args: object) -> bool:
        done = original(self, *args)  # type: ignore[arg-type]
        if done:
            reads.append(1)
        return done

    monkeypatch.setattr(volume._NativeReader, "read", counting)
    return reads


def _through_pydicom(monkeypatch: pytest.MonkeyPatch, paths: list[Path]) -> SeriesVolume:
    """The same series with the fast path switched off: every slice decoded by pydicom."""
    with monkeypatch.context() as m:
        m.setattr(volume, "_native_slice", lambda p: None)
        return read_series(paths)


def _write_ct(
    directory: Path,
    stored: list[np.ndarray],
    *,
    bits_stored: int,
    signed: bool,
    rescale: tuple[str, str] | None,
    photometric: str = "MONOCHROME2",
    transfer_syntax: str = ExplicitVRLittleEndian,
    z: list[float] | None = None,
) -> list[Path]:
    """One CT slice per array of 16-bit words (high bits beyond ``bits_stored`` left as given)."""
    directory.mkdir(parents=True, exist_ok=True)
    series, frame = generate_uid(), generate_uid()
    paths = []
    for k, words in enumerate(stored):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = transfer_syntax
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.Modality = "CT"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = generate_uid(), series, frame
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0, 0, (z or [2.0 * i for i in range(len(stored))])[k]]
        ds.PixelSpacing = [0.5, 0.5]
        ds.SliceThickness = 2
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.Rows, ds.Columns = words.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
        ds.PixelRepresentation = int(signed)
        if rescale is not None:
            ds.RescaleSlope, ds.RescaleIntercept = rescale
        ds.PixelData = words.astype("<u2").tobytes()
        paths.append(directory / f"{k}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def _words(shape: tuple[int, int], n: int, seed: int) -> list[np.ndarray]:
    """Random 16-bit words: every value of the stored bits, and garbage in the unused high bits."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 1 << 16, size=shape, dtype=np.uint32).astype(np.uint16) for _ in range(n)]


# (bits stored, signed, (slope, intercept) or None, photometric, volume dtype, fast path taken)
CASES: dict[str, tuple[int, bool, tuple[str, str] | None, str, type, bool]] = {
    "unsigned12_ct_hu": (12, False, ("1", "-1024"), "MONOCHROME2", np.int16, True),
    "signed16_raw": (16, True, None, "MONOCHROME2", np.int16, True),
    "signed12_sign_extended": (12, True, ("1", "0"), "MONOCHROME2", np.int16, True),
    "unsigned16_wraps_into_int16": (16, False, ("1", "-32768"), "MONOCHROME2", np.int16, True),
    "unsigned10_integral_slope": (10, False, ("3", "-1000"), "MONOCHROME2", np.int16, True),
    "signed11_negative_slope": (11, True, ("-2", "7"), "MONOCHROME2", np.int16, True),
    "unsigned16_raw_float": (16, False, None, "MONOCHROME2", np.float32, True),
    "signed16_fractional_rescale": (16, True, ("0.5", "-3.25"), "MONOCHROME2", np.float32, True),
    "unsigned12_fractional_rescale": (12, False, ("2.5", "100"), "MONOCHROME2", np.float32, True),
    "signed16_rescale_past_int16": (16, True, ("1", "-1024"), "MONOCHROME2", np.float32, True),
    "monochrome1_raw": (12, False, None, "MONOCHROME1", np.float32, False),
    "monochrome1_rescaled": (12, False, ("1", "-1024"), "MONOCHROME1", np.float32, False),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize(
    "shape", [(16, 12), (7, 5), (129, 127)], ids=["in_header", "odd_in_header", "odd_read_from_file"]
)
def test_fast_path_is_bit_identical_to_pydicom(
    case: str,
    shape: tuple[int, int],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    native_reads: list[int],
) -> None:
    bits, signed, rescale, photometric, dtype, fast = CASES[case]
    paths = _write_ct(
        tmp_path,
        _words(shape, 4, seed=len(case)),
        bits_stored=bits,
        signed=signed,
        rescale=rescale,
        photometric=photometric,
    )
    vol = read_series(paths)
    assert len(native_reads) == (4 if fast else 0)
    reference = _through_pydicom(monkeypatch, paths)
    assert len(native_reads) == (4 if fast else 0)  # the reference did not use the fast path
    assert vol.voxels.dtype == reference.voxels.dtype == dtype
    assert vol.voxels.shape == (4, *shape)
    np.testing.assert_array_equal(vol.voxels, reference.voxels, strict=True)
    assert vol.voxels.tobytes() == reference.voxels.tobytes()  # bit for bit (float -0.0 included)
    assert all("PixelData" not in ds for ds in vol.sources)


def test_fast_path_values_are_the_stored_values_rescaled(tmp_path: Path, native_reads: list[int]) -> None:
    """Not only equal to pydicom: the values themselves (12 bits stored, high-bit garbage cleared)."""
    words = _words((9, 11), 3, seed=5)
    vol = read_series(_write_ct(tmp_path, words, bits_stored=12, signed=False, rescale=("1", "-1024")))
    assert len(native_reads) == 3 and vol.voxels.dtype == np.int16
    expected = np.stack([(w & 0x0FFF).astype(np.int32) - 1024 for w in words]).astype(np.int16)
    np.testing.assert_array_equal(vol.voxels, expected)


@pytest.mark.parametrize(
    ("name", "z", "note"),
    [
        ("missing_slice", [0.0, 2.0, 6.0, 8.0], "missing slice"),  # received slices on the grid
        ("irregular", [0.0, 2.0, 4.5, 6.0], "irregular slice spacing"),  # received slices kept aside
        ("duplicate", [0.0, 2.0, 2.0, 4.0], ""),  # the duplicate read into a spare slice and compared
    ],
)
def test_fast_path_under_resampling_and_duplicates(
    name: str,
    z: list[float],
    note: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    native_reads: list[int],
) -> None:
    words = _words((6, 4), 4, seed=11)
    if name == "duplicate":
        words[2] = words[1].copy()
    paths = _write_ct(tmp_path, words, bits_stored=12, signed=False, rescale=("1", "-1024"), z=z)
    vol = read_series(paths)
    assert len(native_reads) == 4
    reference = _through_pydicom(monkeypatch, paths)
    assert vol.voxels.tobytes() == reference.voxels.tobytes() and vol.voxels.dtype == reference.voxels.dtype
    assert note in vol.note and vol.note == reference.note
    if name == "duplicate":
        assert vol.voxels.shape[0] == 3 and "duplicate" in vol.note


def test_duplicate_with_other_pixels_is_still_refused(tmp_path: Path, native_reads: list[int]) -> None:
    paths = _write_ct(
        tmp_path, _words((6, 4), 3, seed=2), bits_stored=12, signed=False, rescale=None, z=[0.0, 2.0, 2.0]
    )
    with pytest.raises(volume.VolumeError, match="share one slice position"):
        read_series(paths)


def test_implicit_vr_takes_the_fast_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, native_reads: list[int]
) -> None:
    words = _words((8, 8), 3, seed=3)
    paths = _write_ct(
        tmp_path, words, bits_stored=16, signed=True, rescale=None, transfer_syntax=ImplicitVRLittleEndian
    )
    vol = read_series(paths)
    assert len(native_reads) == 3
    assert vol.voxels.tobytes() == _through_pydicom(monkeypatch, paths).voxels.tobytes()


def _mr_series(directory: Path, name: str) -> list[Path]:
    """Three slices of one of pydicom's MR_small test files (same pixels in each of its encodings)."""
    source = get_testdata_file(name)
    assert source is not None, f"pydicom's test file {name} is part of pydicom"
    directory.mkdir()
    paths = []
    for k in range(3):
        ds = pydicom.dcmread(source)
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ImagePositionPatient = [0, 0, 3.0 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        paths.append(directory / f"{k}.dcm")
        ds.save_as(paths[-1])
    return paths


@pytest.mark.parametrize("name", ["MR_small_bigendian.dcm", "MR_small_RLE.dcm"])
def test_big_endian_and_compressed_go_through_pydicom_with_the_same_result(
    name: str, tmp_path: Path, native_reads: list[int]
) -> None:
    native = read_series(_mr_series(tmp_path / "native", "MR_small.dcm"))
    assert len(native_reads) == 3  # MR_small: explicit VR little endian, signed 16-bit
    other = read_series(_mr_series(tmp_path / "other", name))
    assert len(native_reads) == 3  # not one slice of the other encoding took the fast path
    assert other.voxels.dtype == native.voxels.dtype == np.int16
    assert other.voxels.tobytes() == native.voxels.tobytes()
    expected = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array
    np.testing.assert_array_equal(native.voxels, np.stack([expected] * 3))


def test_truncated_pixel_data_falls_back_to_pydicom_and_its_refusal(
    tmp_path: Path, native_reads: list[int]
) -> None:
    """A file cut inside its (deferred) pixel data: the fast path declines, pydicom's error is the reason."""
    paths = _write_ct(tmp_path, _words((200, 200), 3, seed=4), bits_stored=16, signed=True, rescale=None)
    paths[1].write_bytes(paths[1].read_bytes()[:-100])
    with pytest.raises(volume.VolumeError, match="Pixel data cannot be decoded"):
        read_series(paths)
    assert len(native_reads) == 1  # slice 0; slice 1 was short on disk, and pydicom refused it


def test_plain_ct_never_reaches_pydicom_decoding(
    small_ct_files: list[Path], monkeypatch: pytest.MonkeyPatch, native_reads: list[int]
) -> None:
    """The synthetic CT (12 bits stored, slope 1, intercept -1024) must keep taking the fast path:
    pydicom's decoders are made to fail, and the volume is still the phantom."""

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("pydicom decoded a plain CT slice: the fast path was not taken")

    monkeypatch.setattr(Dataset, "pixel_array", property(refuse))
    monkeypatch.setattr(Dataset, "convert_pixel_data", refuse)
    monkeypatch.setattr(volume, "iter_pixels", refuse)
    vol = read_series(small_ct_files)
    assert len(native_reads) == len(small_ct_files) == 24
    assert vol.voxels.dtype == np.int16
    np.testing.assert_array_equal(vol.voxels, phantom_hu(24)[::-1])
