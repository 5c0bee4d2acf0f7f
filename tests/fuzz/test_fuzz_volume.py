"""Fuzz the volume assembler: generated series headers -> a sane volume or the node's VolumeError.

Each series is a few small files written byte by byte (tests.fuzz.dicom_bytes):
inconsistent or non-finite orientations and positions, duplicate slices, NaN or
negative spacing, zero or mixed matrix sizes, missing tags, pixel data of the
wrong length or a compressed transfer syntax over garbage. ``read_series``
must return a volume whose geometry is finite and whose voxels match its
sources, or raise VolumeError (a job FAILED with the reason); any other
exception would be a worker crash on a peer's data.
"""

from __future__ import annotations

import math
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dicom_node.errors import VolumeError
from dicom_node.volume import SeriesVolume, read_series
from tests.fuzz import count_input, examples
from tests.fuzz.dicom_bytes import (
    CT_IMAGE_STORAGE,
    EXPLICIT_LE,
    IMPLICIT_LE,
    JPEG_BASELINE,
    JPEG_LOSSLESS,
    RLE,
    Element,
    encode,
    file_meta,
    text,
)

pytestmark = [pytest.mark.fuzz, pytest.mark.timeout(240), pytest.mark.filterwarnings("ignore::UserWarning")]

#: What read_series is given in service: the analysis memory budget (worker.memory_budget_bytes).
BUDGET_BYTES = 64 * 1024 * 1024

# Tags (group, element) of the image attributes read_series uses.
IMAGE_TYPE = 0x00080008
MODALITY = 0x00080060
SLICE_THICKNESS = 0x00180050
IPP = 0x00200032
IOP = 0x00200037
SAMPLES = 0x00280002
PHOTOMETRIC = 0x00280004
FRAMES = 0x00280008
ROWS = 0x00280010
COLUMNS = 0x00280011
PIXEL_SPACING = 0x00280030
BITS_ALLOCATED = 0x00280100
BITS_STORED = 0x00280101
HIGH_BIT = 0x00280102
PIXEL_REPRESENTATION = 0x00280103
WINDOW_CENTER = 0x00281050
WINDOW_WIDTH = 0x00281051
RESCALE_INTERCEPT = 0x00281052
RESCALE_SLOPE = 0x00281053
PIXEL_DATA = 0x7FE00010

_NUMBERS = st.one_of(
    st.sampled_from(
        ["0", "1", "-1", "0.5", "2.5", "1e308", "-1e308", "NaN", "nan", "inf", "-Infinity", "1e-9"]
    ),
    st.floats(allow_nan=True, allow_infinity=True, width=32).map(lambda f: f"{f:.6g}"),
    st.text(alphabet="0123456789.-+eE \\abc", max_size=10),
)
_AXIAL = ("1", "0", "0", "0", "1", "0")
_ORIENTATIONS = st.one_of(
    st.just(_AXIAL),
    st.sampled_from(
        [("0", "1", "0", "0", "0", "-1"), ("0", "0", "0", "0", "0", "0"), ("1", "0", "0", "1", "0", "0")]
    ),
    st.lists(_NUMBERS, min_size=0, max_size=7).map(tuple),
)
_SMALL = st.integers(0, 6)
_US = st.one_of(_SMALL, st.sampled_from([1, 2, 4, 8, 16, 32, 64, 4096, 65535]))
_OFTEN = st.integers(0, 9).map(bool)  # True nine times in ten: most fields plausible, a few not


def _mostly(draw: st.DrawFn, plausible: object, hostile: st.SearchStrategy) -> object:
    return plausible if draw(_OFTEN) else draw(hostile)


def _ds(values: tuple[str, ...] | list[str]) -> bytes:
    return text("\\".join(values))


def _us(value: int) -> bytes:
    return struct.pack("<H", value & 0xFFFF)


@st.composite
def series(draw: st.DrawFn) -> tuple[list[bytes], str]:
    """The files of one series (PS3.10 bytes) and a label of what kind of damage it has."""
    n = draw(st.integers(1, 5))
    modality = _mostly(draw, b"CT", st.sampled_from([b"MR", b"CR", b"", None]))
    rows, cols = _mostly(draw, (4, 3), st.tuples(_US, _US))
    bits = _mostly(draw, 16, st.sampled_from([8, 32, 1, 0, 12, 64]))
    signed = draw(st.sampled_from([0, 1, 2]))
    orientation = _mostly(draw, _AXIAL, _ORIENTATIONS)
    spacing = _mostly(draw, "2.5", st.sampled_from(["1", "-1", "0", "NaN", "1e-6"]))
    pixel_spacing = _mostly(
        draw, ("0.5", "0.5"), st.one_of(st.none(), st.lists(_NUMBERS, max_size=3).map(tuple))
    )
    rescale = _mostly(draw, ("1", "-1024"), st.one_of(st.none(), st.tuples(_NUMBERS, _NUMBERS)))
    ts = _mostly(draw, EXPLICIT_LE, st.sampled_from([IMPLICIT_LE, RLE, JPEG_BASELINE, JPEG_LOSSLESS]))
    samples = _mostly(draw, 1, st.sampled_from([3, 0]))
    photometric = _mostly(draw, b"MONOCHROME2", st.sampled_from([b"MONOCHROME1", b"RGB ", b"XX"]))
    damage = set()
    files = []
    for k in range(n):
        uid = f"1.2.826.0.1.3680043.8.498.55.{k + 1}".encode()
        slice_rows, slice_cols = (rows, cols) if draw(st.integers(0, 9)) else (draw(_US), draw(_US))
        if (slice_rows, slice_cols) != (rows, cols):
            damage.add("mixed_sizes")
        z = float(k) * float(spacing) if spacing != "NaN" else math.nan
        position = ("0", "0", f"{z:g}")
        if not draw(st.integers(0, 9)):
            position = draw(st.one_of(st.lists(_NUMBERS, max_size=4).map(tuple), st.just(("0", "0", "0"))))
            damage.add("position")
        elements = [
            Element(0x00080016, "UI", text(CT_IMAGE_STORAGE)),
            Element(0x00080018, "UI", text(uid.decode())),
            Element(0x0020000D, "UI", text("1.2.826.0.1.3680043.8.498.55")),
            Element(0x0020000E, "UI", text("1.2.826.0.1.3680043.8.498.55.0")),
            Element(SAMPLES, "US", _us(samples)),
            Element(PHOTOMETRIC, "CS", _even_cs(photometric)),
            Element(ROWS, "US", _us(slice_rows)),
            Element(COLUMNS, "US", _us(slice_cols)),
            Element(BITS_ALLOCATED, "US", _us(bits)),
            Element(BITS_STORED, "US", _us(_mostly(draw, bits, st.sampled_from([12, 0, 17])))),
            Element(HIGH_BIT, "US", _us(max(bits - 1, 0))),
            Element(PIXEL_REPRESENTATION, "US", _us(signed)),
        ]
        if modality is not None:
            elements.append(Element(MODALITY, "CS", _even_cs(modality)))
        if draw(st.integers(0, 9)):
            elements.append(Element(IOP, "DS", _ds(orientation)))
        else:
            damage.add("no_orientation")
        if draw(st.integers(0, 9)):
            elements.append(Element(IPP, "DS", _ds(position)))
        else:
            damage.add("no_position")
        if pixel_spacing is not None:
            elements.append(Element(PIXEL_SPACING, "DS", _ds(pixel_spacing)))
        if draw(st.booleans()):
            elements.append(Element(SLICE_THICKNESS, "DS", _ds([draw(_NUMBERS)])))
        if rescale is not None and draw(st.integers(0, 19)):
            elements.append(Element(RESCALE_INTERCEPT, "DS", _ds([rescale[1]])))
            elements.append(Element(RESCALE_SLOPE, "DS", _ds([rescale[0]])))
        if not draw(st.integers(0, 9)):
            elements.append(Element(IMAGE_TYPE, "CS", b"DERIVED\\SECONDARY\\LOCALIZER "))
        if not draw(st.integers(0, 9)):
            elements.append(Element(FRAMES, "IS", _ds([draw(st.sampled_from(["1", "2", "0", "abc", "-1"]))])))
        if draw(st.booleans()):
            elements.append(Element(WINDOW_CENTER, "DS", _ds([draw(_NUMBERS)])))
            elements.append(Element(WINDOW_WIDTH, "DS", _ds([draw(_NUMBERS)])))
        expected = slice_rows * slice_cols * max(bits, 8) // 8 * max(samples, 1)
        if draw(st.integers(0, 9)):
            if expected <= 4096 and draw(st.integers(0, 4)):
                data = draw(st.binary(min_size=expected, max_size=expected))
            else:
                data = draw(st.binary(max_size=64))
                damage.add("pixel_length")
            if ts in (
                RLE,
                JPEG_BASELINE,
                JPEG_LOSSLESS,
            ):  # encapsulated: basic offset table item + one fragment of garbage
                data = (
                    _item(b"")
                    + _item(data + b"\x00" * (len(data) % 2))
                    + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
                )
                elements.append(Element(PIXEL_DATA, "OB", data, 0xFFFFFFFF))
            else:
                elements.append(
                    Element(PIXEL_DATA, "OW" if bits > 8 else "OB", data + b"\x00" * (len(data) % 2))
                )
        else:
            damage.add("no_pixels")
        elements.sort(key=lambda e: e.tag)
        files.append(
            file_meta(text(CT_IMAGE_STORAGE), uid, ts) + encode(elements, explicit=ts != IMPLICIT_LE)
        )
    if draw(st.integers(0, 9)) == 0:  # a file cut short on disk
        i = draw(st.integers(0, n - 1))
        files[i] = files[i][: draw(st.integers(0, len(files[i])))]
        damage.add("truncated_file")
    return files, ",".join(sorted(damage)) or "plausible"


def _item(value: bytes) -> bytes:
    return struct.pack("<HHL", 0xFFFE, 0xE000, len(value)) + value


def _even_cs(value: bytes) -> bytes:
    return value + b" " if len(value) % 2 else value


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    shm = Path("/dev/shm")
    root = Path(tempfile.mkdtemp(prefix="radbridge-fuzz-volume-", dir=shm if shm.is_dir() else None))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _check_volume(volume: SeriesVolume) -> None:
    """What every consumer of a SeriesVolume relies on (the SEG/SR writers, the gRPC header)."""
    assert volume.voxels.ndim == 3
    assert volume.voxels.shape[0] == len(volume.slice_refs)  # resampled: more slices than images
    assert {r.source for r in volume.slice_refs if r.received} == set(range(len(volume.sources)))
    assert all(math.isfinite(v) and v >= 0 for v in volume.spacing_mm), volume.spacing_mm
    assert len(volume.orientation) == 6 and all(math.isfinite(v) for v in volume.orientation)
    assert len(volume.position) == 3 and all(math.isfinite(v) for v in volume.position)
    assert all("PixelData" not in ds for ds in volume.sources)  # headers only are kept
    assert volume.voxels.dtype in (np.int16, np.float32)
    assert np.isfinite(volume.voxels).all()  # a rescale must not overflow into inf


def _jpeg_slice(bits_allocated: int) -> bytes:
    """One JPEG-baseline CT slice whose header claims ``bits_allocated``, over a garbage fragment."""
    fragment = _item(b"") + _item(b"\x64\x1e" * 8) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    elements = [
        Element(0x00080016, "UI", text(CT_IMAGE_STORAGE)),
        Element(0x00080018, "UI", text("1.2.3.9")),
        Element(MODALITY, "CS", b"CT"),
        Element(SAMPLES, "US", _us(1)),
        Element(PHOTOMETRIC, "CS", b"MONOCHROME2 "),
        Element(ROWS, "US", _us(8)),
        Element(COLUMNS, "US", _us(6)),
        Element(BITS_ALLOCATED, "US", _us(bits_allocated)),
        Element(BITS_STORED, "US", _us(bits_allocated)),
        Element(HIGH_BIT, "US", _us(bits_allocated - 1)),
        Element(PIXEL_REPRESENTATION, "US", _us(1)),
        Element(PIXEL_DATA, "OB", fragment, 0xFFFFFFFF),
    ]
    return file_meta(text(CT_IMAGE_STORAGE), b"1.2.3.9", JPEG_BASELINE) + encode(elements)


@settings(max_examples=examples(1500))
@given(case=series())
# python-gdcm aborted the whole process (C++ terminate) on JPEG frames claiming 1, 32 or 64 bits.
@example(case=([_jpeg_slice(64)], "pixel_length"))
@example(case=([_jpeg_slice(1)], "pixel_length"))
@example(  # NaN slice positions: once passed every spacing check (all comparisons with NaN are False)
    case=(
        [
            file_meta(text(CT_IMAGE_STORAGE), f"1.2.3.{k}".encode(), EXPLICIT_LE)
            + encode(
                [
                    Element(0x00080016, "UI", text(CT_IMAGE_STORAGE)),
                    Element(0x00080018, "UI", text(f"1.2.3.{k}")),
                    Element(MODALITY, "CS", b"CT"),
                    Element(IPP, "DS", _ds(("0", "0", "NaN"))),
                    Element(IOP, "DS", _ds(_AXIAL)),
                    Element(SAMPLES, "US", _us(1)),
                    Element(PHOTOMETRIC, "CS", b"MONOCHROME2 "),
                    Element(ROWS, "US", _us(2)),
                    Element(COLUMNS, "US", _us(2)),
                    Element(BITS_ALLOCATED, "US", _us(16)),
                    Element(BITS_STORED, "US", _us(16)),
                    Element(HIGH_BIT, "US", _us(15)),
                    Element(PIXEL_REPRESENTATION, "US", _us(0)),
                    Element(PIXEL_DATA, "OW", b"\x00" * 8),
                ]
            )
            for k in range(3)
        ],
        "position",
    )
)
def test_read_series_returns_a_sane_volume_or_a_volume_error(
    workdir: Path, case: tuple[list[bytes], str]
) -> None:
    files, damage = case
    directory = Path(tempfile.mkdtemp(dir=workdir))
    try:
        paths = []
        for k, data in enumerate(files):
            path = directory / f"{k}.dcm"
            path.write_bytes(data)
            paths.append(path)
        try:
            volume = read_series(paths, max_voxel_bytes=BUDGET_BYTES)
        except VolumeError as exc:
            assert str(exc), "a VolumeError carries its reason (it becomes the job's last_error)"
            count_input("volume", "VolumeError")
            return
        _check_volume(volume)
        count_input("volume", "volume" if damage == "plausible" else "volume despite damage")
    finally:
        shutil.rmtree(directory, ignore_errors=True)
