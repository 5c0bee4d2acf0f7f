"""Series -> volume: the last place pixels are read from DICOM.

Every image plane of the series -- a classic single-frame instance, or one frame of an
enhanced (multi-frame) CT/MR/PET instance described by its functional groups -- becomes a
``_Plane``; one code path then assembles them. Planes are split into stacks (orientation, matrix
size; Temporal Position Identifier and Echo Numbers of classic images; for enhanced images the
instance, Stack ID, Temporal Position Index, echo time and b-value;
localizers left out) and the largest stack is analysed (named in ``SeriesVolume.note`` when there
were others). The stack is sorted by position along the slice normal (never by InstanceNumber),
rescaled to modality units (per frame), and MONOCHROME1 is inverted so that brighter always means
denser.

Uneven spacing (a missing slice, irregular gaps) is put on a regular grid along the slice axis,
in the spirit of 3D Slicer's acquisition-geometry regularization (our choice of grid: the
smallest gap as step; received slices keep their own pixels, grid positions between them are
linearly interpolated). ``SeriesVolume.slices`` says which received image and frame each volume slice is,
so results are written back on the received images only. Refused, with the reason: mixed
orientations within one stack of an enhanced image, stacks tilted against each other by less
than NON_PARALLEL_DEG, images at one position with different pixels, gaps too irregular to grid.

Pixels go straight into the preallocated volume, one slice at a time: a classic instance's native
little-endian 16-bit grey pixels are read from its file at the Pixel Data offset and rescaled in
place (``_NativeReader``, bit-identical to pydicom's decoding, which every other encoding uses).

highdicom's ``Image.get_volume`` was not used: it takes one regular stack and cannot say how
an irregular one was regularized nor keep the frame of each slice for the SEG's references.
"""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.pixels import iter_pixels
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom_node._pixels import undecodable_reason
from dicom_node.errors import VolumeError, VolumeTooLarge
from dicom_node.slices import SliceRef
from dicom_node.source_values import ds_float

PROJECTION_MODALITIES = frozenset({"CR", "DX", "MG", "XA", "RF", "IO", "PX"})
SPACING_TOLERANCE = 0.05  # relative deviation allowed between slice gaps
SAME_ORIENTATION_DEG = 0.1  # planes closer than this in orientation are one stack (scanner rounding)
NON_PARALLEL_DEG = 5.0  # stacks tilted by less than this against the analysed one: refused
FLOAT32 = np.dtype(np.float32)
FLOAT32_MAX = float(np.finfo(np.float32).max)
DEFER_BYTES = 16 * 1024  # values larger than this (pixel data) are read when first used
DEFAULT_ORIENTATION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
PIXEL_DATA_TAG = 0x7FE00010
#: Native pixel data whose bytes are this machine's int16/uint16 as they lie in the file.
NATIVE_LITTLE_ENDIAN = frozenset({str(ImplicitVRLittleEndian), str(ExplicitVRLittleEndian)})


@dataclass(frozen=True)
class SeriesVolume:
    """Voxels (slices, rows, columns) plus geometry and the sorted source headers."""

    voxels: np.ndarray  # modality units: int16 when exact (CT in HU), else float32
    spacing_mm: tuple[float, float, float]  # slice, row, column
    orientation: tuple[float, ...]
    position: tuple[float, float, float]
    modality: str
    rescaled: bool
    body_part: str
    window: tuple[float, float] | None
    sources: list[Dataset]  # header-only received images, in slice order (one for a multi-frame image)
    skipped: int = 0  # images or frames left out (other stacks, localizers, duplicates)
    #: Per volume slice, the received image (index into ``sources``) and frame it is, or an
    #: interpolated position; empty means slice i is ``sources[i]`` (a classic regular series).
    slices: tuple[SliceRef, ...] = ()
    note: str = ""  # what was done to the geometry (stack chosen, slices resampled), for the reader

    @property
    def slice_refs(self) -> tuple[SliceRef, ...]:
        return self.slices or tuple(SliceRef(i) for i in range(len(self.sources)))


def _float_tuple(value: Sequence[object] | None, n: int) -> tuple[float, ...] | None:
    """``n`` finite numbers from a multi-valued DS, else None (absent, wrong count, NaN, text):
    a NaN position passes every spacing comparison and would give a volume with NaN geometry."""
    if value is None:
        return None
    try:
        if len(value) != n:
            return None
        numbers = tuple(ds_float(v) for v in value)  # a decimal comma is read as a point
    except (TypeError, ValueError):
        return None
    return numbers if all(math.isfinite(v) for v in numbers) else None


def _number(ds: Dataset, keyword: str, default: float | None = None) -> float | None:
    """A numeric attribute (the first value if several) as a finite float, ``default`` if absent.

    Raises VolumeError naming the attribute when it is present but not a finite number: a peer's
    "abc" or NaN must fail the series with its reason, not the worker with a ValueError.
    """
    value = ds.get(keyword)
    if isinstance(value, pydicom.multival.MultiValue):
        value = value[0] if len(value) else None
    if value is None or value == "":
        return default
    try:
        number = ds_float(value)
    except (TypeError, ValueError, OverflowError):
        raise VolumeError(f"{keyword} is not a number.") from None
    if not math.isfinite(number):
        raise VolumeError(f"{keyword} is not a finite number.")
    return number


def _optional_number(ds: Dataset, keyword: str) -> float | None:
    """An informative attribute (window, slice thickness): a malformed value counts as absent."""
    try:
        return _number(ds, keyword)
    except VolumeError:
        return None


def _is_localizer(ds: Dataset) -> bool:
    return "LOCALIZER" in [str(v).upper() for v in (ds.get("ImageType") or [])]


def _window(ds: Dataset) -> tuple[float, float] | None:
    c, w = _optional_number(ds, "WindowCenter"), _optional_number(ds, "WindowWidth")
    if c is None or w is None:
        return None
    return c, w


def _pixel_spacing(ds: Dataset) -> tuple[float, float]:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = _float_tuple(ds.get(keyword), 2)
        if value and all(v > 0 for v in value):
            return value  # type: ignore[return-value]
    return 0.0, 0.0


def _transfer_syntax(ds: Dataset) -> str:
    return str(ds.file_meta.get("TransferSyntaxUID", "unknown")) if hasattr(ds, "file_meta") else "unknown"


def _check_decodable(ds: Dataset) -> None:
    reason = undecodable_reason(ds, _transfer_syntax(ds))
    if reason is not None:
        raise VolumeError(reason)
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise VolumeError("Only single-sample (grey) images are supported for volumes.")


def _check_rescale_range(slope: float, intercept: float, itemsize: int) -> None:
    if abs(slope) * 2.0 ** (8 * itemsize) + abs(intercept) > FLOAT32_MAX:
        raise VolumeError("RescaleSlope and RescaleIntercept map pixels beyond float32's range.")


def _to_modality(
    arr: np.ndarray, ds: Dataset, slope: float | None, intercept: float | None, dtype: np.dtype
) -> tuple[np.ndarray, bool]:
    """One decoded frame in modality units (rescaled) or raw, in ``dtype``; and whether rescaled."""
    if slope is not None and intercept is not None:
        _check_rescale_range(slope, intercept, arr.dtype.itemsize)
        if dtype.kind == "i":  # integral slope and intercept (see _volume_dtype): exact in int32
            return (arr.astype(np.int32) * int(slope) + int(intercept)).astype(dtype), True
        return (arr.astype(np.float32) * slope + intercept).astype(dtype), True
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        top = float(2 ** int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16) - 1)
        return (top - arr.astype(np.float32)).astype(dtype), False
    return arr.astype(dtype), False


def _modality_values(ds: Dataset, dtype: np.dtype = FLOAT32) -> tuple[np.ndarray, bool]:
    """A single-frame instance's pixels in modality units (rescaled) or raw; and whether rescaled."""
    _check_decodable(ds)
    try:
        arr = ds.pixel_array
    except Exception as exc:  # unsupported or corrupt compression
        raise VolumeError(
            f"Pixel data cannot be decoded (transfer syntax {_transfer_syntax(ds)}): {exc}"
        ) from exc
    if arr.shape != (int(ds.Rows), int(ds.Columns)):  # e.g. frames inferred from the data's length
        raise VolumeError(f"Decoded pixel data has shape {arr.shape}, not Rows x Columns of one image.")
    return _to_modality(arr, ds, _number(ds, "RescaleSlope"), _number(ds, "RescaleIntercept"), dtype)


# -- planes: one per classic instance or per frame of an enhanced image -------------------------


@dataclass(frozen=True)
class _Plane:
    """One image plane and its geometry, whichever way the series carried it."""

    ds: Dataset
    frame: int | None  # 1-based frame number in a multi-frame instance; None for a single-frame one
    iop: tuple[float, ...] | None
    ipp: tuple[float, ...] | None
    pixel_spacing: tuple[float, float]
    thickness: float | None
    slope: float | None
    intercept: float | None
    group: tuple[object, ...]  # what besides orientation and size splits stacks (see stack_key)
    group_label: str  # that group in words, for the note
    localizer: bool
    shape: tuple[int, int]  # Rows, Columns (read once: every pydicom look-up costs)

    def stack_key(self) -> tuple[object, ...]:
        """What must be equal within one stack (the orientation is compared with a tolerance)."""
        return (*self.group, *self.shape)


def _item(seq_owner: Dataset | None, keyword: str) -> Dataset | None:
    """The first item of a sequence attribute, or None."""
    if seq_owner is None:
        return None
    seq = seq_owner.get(keyword)
    return seq[0] if seq else None


def _functional(per_frame: Dataset | None, shared: Dataset | None, keyword: str) -> Dataset | None:
    """A functional group macro's item: per-frame first, then shared (PS3.3 C.7.6.16)."""
    return _item(per_frame, keyword) or _item(shared, keyword)


def _classic_planes(ds: Dataset, shape: tuple[int, int]) -> list[_Plane]:
    ps = _pixel_spacing(ds)
    group = (None, str(ds.get("TemporalPositionIdentifier", "")), str(ds.get("EchoNumbers", "")))
    label = ", ".join(
        f"{name} {value}" for name, value in (("temporal position", group[1]), ("echo", group[2])) if value
    )
    return [
        _Plane(
            ds=ds,
            frame=None,
            iop=_float_tuple(ds.get("ImageOrientationPatient"), 6),
            ipp=_float_tuple(ds.get("ImagePositionPatient"), 3),
            pixel_spacing=ps,
            thickness=_optional_number(ds, "SliceThickness"),
            slope=_number(ds, "RescaleSlope"),
            intercept=_number(ds, "RescaleIntercept"),
            group=group,
            group_label=label,
            localizer=_is_localizer(ds),
            shape=shape,
        )
    ]


def _frame_values(owner: Dataset | None, keyword: str) -> str:
    if owner is None or owner.get(keyword) is None:
        return ""
    return str(owner.get(keyword))


def _enhanced_planes(ds: Dataset, n_frames: int, shape: tuple[int, int]) -> list[_Plane]:
    """One plane per frame from the functional groups (Enhanced CT/MR/PET, Legacy Converted)."""
    shared = _item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if not per_frame:
        raise VolumeError(
            "A multi-frame instance without Per-Frame Functional Groups (e.g. NM, US or XA cine) "
            "cannot be placed in 3D; only enhanced CT/MR/PET images are analysed as volumes."
        )
    if len(per_frame) != n_frames:
        raise VolumeError(
            f"The multi-frame instance has {len(per_frame)} Per-Frame Functional Groups for {n_frames} frames."
        )
    localizer_image = _is_localizer(ds)
    planes = []
    for number, frame in enumerate(per_frame, start=1):
        orientation = _functional(frame, shared, "PlaneOrientationSequence")
        position = _functional(frame, shared, "PlanePositionSequence")
        measures = _functional(frame, shared, "PixelMeasuresSequence")
        transform = _functional(frame, shared, "PixelValueTransformationSequence")
        content = _item(frame, "FrameContentSequence")
        echo = _functional(frame, shared, "MREchoSequence")
        diffusion = _functional(frame, shared, "MRDiffusionSequence")
        frame_type = (
            _functional(frame, shared, "CTImageFrameTypeSequence")
            or _functional(frame, shared, "MRImageFrameTypeSequence")
            or _functional(frame, shared, "PETFrameTypeSequence")
        )
        stack_id = _frame_values(content, "StackID")
        temporal = _frame_values(content, "TemporalPositionIndex")
        echo_time = _frame_values(echo, "EffectiveEchoTime")
        b_value = _frame_values(diffusion, "DiffusionBValue")
        label = ", ".join(
            f"{name} {value}"
            for name, value in (
                ("stack", stack_id),
                ("temporal position", temporal),
                ("echo time", echo_time),
                ("b-value", b_value),
            )
            if value
        )
        frame_kind = [str(v).upper() for v in (frame_type.get("FrameType") or [])] if frame_type else []
        planes.append(
            _Plane(
                ds=ds,
                frame=number,
                iop=_float_tuple(orientation.get("ImageOrientationPatient") if orientation else None, 6),
                ipp=_float_tuple(position.get("ImagePositionPatient") if position else None, 3),
                pixel_spacing=_pixel_spacing(measures) if measures else (0.0, 0.0),
                thickness=_optional_number(measures, "SliceThickness") if measures else None,
                slope=_number(transform, "RescaleSlope") if transform else None,
                intercept=_number(transform, "RescaleIntercept") if transform else None,
                group=(str(ds.SOPInstanceUID), stack_id, temporal, echo_time, b_value),
                group_label=label,
                localizer=localizer_image or "LOCALIZER" in frame_kind,
                shape=shape,
            )
        )
    return planes


def _volume_dtype(planes: Sequence[_Plane]) -> np.dtype:
    """int16 when every slice's modality values are integers that fit (CT in HU: slope 1, integral
    intercept, 12-16 stored bits): half the memory of float32 and sent as is; else float32."""
    ranges: dict[int, tuple[int, int]] = {}  # per instance (the frames of one share it)
    for p in planes:
        ds = p.ds
        if id(ds) not in ranges:
            if ds.get("PhotometricInterpretation") == "MONOCHROME1" or int(ds.get("SamplesPerPixel", 1)) != 1:
                return np.dtype(np.float32)
            bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
            signed = int(ds.get("PixelRepresentation") or 0) == 1
            ranges[id(ds)] = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        lo, hi = ranges[id(ds)]
        slope = 1.0 if p.slope is None else p.slope
        intercept = 0.0 if p.intercept is None else p.intercept
        values = (lo * slope + intercept, hi * slope + intercept)
        if slope != int(slope) or intercept != int(intercept) or min(values) < -32768 or max(values) > 32767:
            return np.dtype(np.float32)
    return np.dtype(np.int16)


# -- reading ------------------------------------------------------------------------------------


def read_series(
    paths: Sequence[Path], max_voxel_bytes: int = 0, admit: Callable[[int], None] | None = None
) -> SeriesVolume:
    """Read and assemble one series; raises VolumeError with the reason if it cannot.

    ``max_voxel_bytes`` (0 = no limit): a volume that would need more is refused from its headers,
    before any pixel is decoded (VolumeTooLarge), rather than risking the process's memory.
    ``admit(voxel_bytes)``, if given, is called once the size is known and before anything is
    allocated (dicom_node.memory: it reserves the analysis's memory, waiting for it if need be).
    """
    if not paths:
        raise VolumeError("The series has no instances.")
    datasets = []
    for path in paths:
        try:
            # Pixel data stays on disk until its slice is decoded into the volume (one slice in
            # memory at a time, not the whole series twice).
            ds = pydicom.dcmread(path, defer_size=DEFER_BYTES)
        except Exception as exc:
            raise VolumeError(f"An instance of the series cannot be read: {exc}") from exc
        if "PixelData" not in ds:
            continue
        datasets.append(ds)
    if not datasets:
        raise VolumeError("No instance of the series has pixel data.")
    frames = [_number(ds, "NumberOfFrames", 1.0) for ds in datasets]
    if not all(f is not None and f >= 1 and f == int(f) for f in frames):
        raise VolumeError("NumberOfFrames is not a positive integer.")
    shapes = [(int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)) for ds in datasets]
    if not all(rows > 0 and columns > 0 for rows, columns in shapes):
        raise VolumeError("An instance has no Rows or Columns (or zero): its pixels have no shape.")
    modality = str(datasets[0].get("Modality", "")).strip().upper()  # CS is upper case; "ct" is CT
    if not modality:
        raise VolumeError("The series has no Modality.")

    def enhanced(ds: Dataset, f: float | None) -> bool:
        """Several frames, or one frame placed by functional groups (a 1-frame enhanced CT/MR)."""
        return f != 1 or ("PerFrameFunctionalGroupsSequence" in ds and modality not in PROJECTION_MODALITIES)

    multi = [ds for ds, f in zip(datasets, frames, strict=True) if enhanced(ds, f)]
    if not multi and (modality in PROJECTION_MODALITIES or len(datasets) == 1):
        return _single_image(datasets, modality)
    if multi and modality in PROJECTION_MODALITIES:
        raise VolumeError(
            f"Multi-frame {modality} instances (cine, tomosynthesis) are not analysed as volumes."
        )
    planes: list[_Plane] = []
    for ds, f, shape in zip(datasets, frames, shapes, strict=True):
        if enhanced(ds, f):
            planes.extend(_enhanced_planes(ds, int(f or 1), shape))
        else:
            planes.extend(_classic_planes(ds, shape))
    return _stack(planes, modality, max_voxel_bytes, admit)


def _single_image(datasets: list[Dataset], modality: str) -> SeriesVolume:
    ds = datasets[0]
    values, rescaled = _modality_values(ds)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1" and rescaled:
        values = values.max() + values.min() - values
    iop = _float_tuple(ds.get("ImageOrientationPatient"), 6) or DEFAULT_ORIENTATION
    ipp = _float_tuple(ds.get("ImagePositionPatient"), 3) or (0.0, 0.0, 0.0)
    thickness = abs(_optional_number(ds, "SliceThickness") or 0.0)
    del ds.PixelData
    return SeriesVolume(
        voxels=values[None].astype(np.float32),
        spacing_mm=(thickness, *_pixel_spacing(ds)),
        orientation=iop,
        position=ipp,  # type: ignore[arg-type]
        modality=modality,
        rescaled=rescaled,
        body_part=str(ds.get("BodyPartExamined", "")),
        window=_window(ds),
        sources=[ds],
        skipped=len(datasets) - 1,
    )


# -- stacks ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grid:
    """A regular grid along the slice axis for received positions (sorted, distinct)."""

    index: np.ndarray  # grid slice of each received position
    size: int
    step_mm: float
    note: str  # "" when the received slices were regular already
    exact: bool = True  # every received slice lies on a grid position (else: nearest, interpolated)


def _axis(normal: np.ndarray | None) -> str:
    return "z" if normal is not None and abs(abs(float(normal[2])) - 1.0) < 1e-3 else "position"


def regular_grid(positions: Sequence[float], axis: str = "position") -> Grid:
    """Where received slice positions (mm along the normal, ascending) go on a regular grid.

    Even gaps (within SPACING_TOLERANCE): the received slices are the grid. Gaps that are whole
    multiples of the smallest (missing slices): the grid is the smallest gap and every received
    slice is a grid slice. Other gaps: the grid step is at most the smallest gap, from the first
    to the last received slice. A grid of more than twice the received slices is refused.
    """
    pos = np.asarray(positions, dtype=float)
    n = len(pos)
    if n < 2:
        return Grid(np.arange(n), n, 0.0, "")
    if not math.isfinite(float(pos[-1]) - float(pos[0])):  # Python floats: inf, not a numpy overflow
        raise VolumeError("Slice positions span more than a float can hold; they cannot be resampled.")
    gaps = np.diff(pos)
    mean_gap = float(gaps.mean())
    if np.all(np.abs(gaps - mean_gap) <= SPACING_TOLERANCE * mean_gap):
        return Grid(np.arange(n), n, mean_gap, "")
    base = float(gaps.min())
    span = float(pos[-1] - pos[0])
    tol = SPACING_TOLERANCE * base
    multiples = np.floor(gaps / base + 0.5)
    whole = bool(np.all(np.abs(gaps - multiples * base) <= SPACING_TOLERANCE * base))
    needed = float(multiples.sum()) + 1 if whole else span / base + 1
    if not math.isfinite(needed) or needed > 2 * n:  # before any cast: 1e308 mm gaps are input too
        raise VolumeError(
            f"Slice spacing is too irregular to resample (gaps {gaps.min():.2f}..{gaps.max():.2f} mm would need "
            f"{needed:.0f} slices on a {base:.2f} mm grid for {n} received images)."
        )
    if whole:
        index = np.concatenate([[0], np.cumsum(multiples)]).astype(int)
        size = int(index[-1]) + 1
        step = span / (size - 1)
        holes = [
            f"{int(m) - 1} missing slice{'s' if m > 2 else ''} between {axis}={pos[i]:.2f} and {axis}={pos[i + 1]:.2f} mm"
            for i, m in enumerate(multiples)
            if m > 1
        ]
        note = f"{'; '.join(holes)}; resampled to {step:.2f} mm (missing positions linearly interpolated)"
    else:
        size = int(math.ceil(span / base - 1e-6)) + 1
        step = span / (size - 1)
        index = np.floor((pos - pos[0]) / step + 0.5).astype(int)
        note = (
            f"irregular slice spacing (gaps {gaps.min():.2f}..{gaps.max():.2f} mm); resampled to {step:.2f} mm "
            "by linear interpolation between the received slices (results mapped to the nearest received slice)"
        )
    if size > 2 * n:
        raise VolumeError(
            f"Slice spacing is too irregular to resample (gaps {gaps.min():.2f}..{gaps.max():.2f} mm would need "
            f"{size} slices on a {step:.2f} mm grid for {n} received images)."
        )
    return Grid(index, size, step, note, exact=bool(np.all(np.abs(pos - pos[0] - index * step) <= tol)))


def _plane_window(p: _Plane) -> tuple[float, float] | None:
    if p.frame is None:
        return _window(p.ds)
    shared = _item(p.ds, "SharedFunctionalGroupsSequence")
    voi = _functional(p.ds.PerFrameFunctionalGroupsSequence[p.frame - 1], shared, "FrameVOILUTSequence")
    return _window(voi) if voi is not None else None


def _normal(iop: Sequence[float]) -> np.ndarray:
    v = np.asarray(iop, dtype=float)
    n = np.cross(v[:3], v[3:])
    norm = float(np.linalg.norm(n))
    if norm < 1e-6:
        raise VolumeError("Image Orientation (Patient) has parallel row and column directions.")
    return n / norm


def _orientation_angle(a: Sequence[float], b: Sequence[float]) -> float:
    """The larger angle (degrees) between the row directions and between the column directions."""
    va, vb = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    angles = []
    for x, y in ((va[:3], vb[:3]), (va[3:], vb[3:])):
        cos = float(np.dot(x, y) / max(np.linalg.norm(x) * np.linalg.norm(y), 1e-12))
        angles.append(math.degrees(math.acos(max(-1.0, min(1.0, cos)))))
    return max(angles)


def _normal_angle(a: Sequence[float], b: Sequence[float]) -> float:
    """Degrees between two slice planes (0 = parallel, whichever way the normals point)."""
    return math.degrees(math.acos(min(1.0, abs(float(np.dot(_normal(a), _normal(b)))))))


def _choose_stack(planes: list[_Plane]) -> tuple[list[_Plane], str, int]:
    """The largest stack (ties: the first met), a note naming it when there were others, and
    how many stacks there were. Planes whose orientations agree within SAME_ORIENTATION_DEG (scanner
    rounding) share a stack. Refused: an enhanced image's Stack ID holding several orientations or
    sizes, and stacks tilted against each other by less than NON_PARALLEL_DEG (not one stack, and
    not a reformat in another plane either)."""
    stacks: list[tuple[tuple[object, ...], tuple[float, ...] | None, list[_Plane]]] = []
    for p in planes:
        if p.localizer:
            continue
        key = p.stack_key()
        for k, ref, members in stacks:
            if k == key and (
                (ref is None and p.iop is None)
                or (
                    ref is not None
                    and p.iop is not None
                    and _orientation_angle(ref, p.iop) < SAME_ORIENTATION_DEG
                )
            ):
                members.append(p)
                break
        else:
            stacks.append((key, p.iop, [p]))
    if not stacks:
        raise VolumeError("Every image of the series is a localizer; there is no stack to analyse.")
    chosen = max(range(len(stacks)), key=lambda i: len(stacks[i][2]))
    _, iop, stack = stacks[chosen]
    if iop is None:
        raise VolumeError("The instances have no valid Image Orientation (Patient); cannot order slices.")
    first = stack[0]
    for i, (_, other_iop, other) in enumerate(stacks):
        if i == chosen or other_iop is None:
            continue
        same_group = other[0].group == first.group
        if same_group and first.frame is not None and first.group[1]:
            raise VolumeError(
                f"Stack {first.group[1]!r} of the multi-frame image mixes orientations or matrix sizes."
            )
        angle = _normal_angle(iop, other_iop)
        if same_group and angle < NON_PARALLEL_DEG and len(other) > 1:
            raise VolumeError(f"The slices are not parallel (orientations differ by {angle:.1f} degrees).")
    note = ""
    if len(stacks) > 1:
        unit = "frames" if first.frame is not None else "images"
        left = sum(len(members) for i, (_, _, members) in enumerate(stacks) if i != chosen)
        what = f" ({first.group_label})" if first.group_label else ""
        note = (
            f"the series holds {len(stacks)} stacks; analysed the largest{what}, {len(stack)} {unit}; "
            f"{left} {unit} of the other stacks not analysed"
        )
    return stack, note, len(stacks)


@dataclass(frozen=True)
class _NativeSlice:
    """Where a classic instance's uncompressed little-endian 16-bit grey pixels are: still in its
    file (Pixel Data larger than DEFER_BYTES), or the bytes pydicom read with the header."""

    path: str
    offset: int
    data: bytes | None  # None: read ``path`` from ``offset``
    signed: bool
    bits_stored: int


def _native_slice(p: _Plane) -> _NativeSlice | None:
    """The plane's pixel bytes as they lie in the file, when reading them there gives exactly
    what pydicom would decode (native little endian, 16 bits allocated, one sample, MONOCHROME2,
    Pixel Data of exactly one frame's length); else None (pydicom decodes it, and refuses what it
    cannot)."""
    ds = p.ds
    if p.frame is not None or sys.byteorder != "little":
        return None
    try:
        raw = ds.get_item(PIXEL_DATA_TAG, keep_deferred=True)
        path = getattr(ds, "filename", None)
        if (
            not isinstance(raw, RawDataElement)  # a converted element: pydicom holds its value
            or (raw.value is None and not isinstance(path, str))  # deferred, but from no file
            or (raw.value is not None and not isinstance(raw.value, bytes))
            or _transfer_syntax(ds) not in NATIVE_LITTLE_ENDIAN
            or ds.get("BitsAllocated") != 16
            or ds.get("SamplesPerPixel") != 1
            or ds.get("PhotometricInterpretation") != "MONOCHROME2"
            or ds.get("PixelRepresentation") not in (0, 1)
            or ds.get("NumberOfFrames", 1) not in (1, "1")
        ):
            return None
        bits_stored = ds.get("BitsStored")
        if not isinstance(bits_stored, int) or not 1 <= bits_stored <= 16:
            return None
        if raw.length != p.shape[0] * p.shape[1] * 2 or (
            raw.value is not None and len(raw.value) != raw.length
        ):
            return None
        return _NativeSlice(
            str(path), int(raw.value_tell), raw.value, ds.PixelRepresentation == 1, bits_stored
        )
    except Exception:  # anything odd in the header: pydicom decides, with its own error
        return None


def _wrap16(value: int) -> np.int16:
    """``value`` modulo 2**16 as an int16 (int16 arithmetic wraps the same way)."""
    return np.int16((value + 0x8000) % 0x10000 - 0x8000)


class _NativeReader:
    """Reads native slices straight into their place in the volume, rescaled in place: no int32
    or float temporaries for int16 volumes, one raw slice of scratch for float32 ones.

    Bit-identical to pydicom's ``pixel_array`` followed by ``_to_modality``: unused high bits are
    cleared (unsigned) or sign-extended (signed) as pydicom does; an int16 volume's values are
    computed modulo 2**16, which is what int32 arithmetic cast to int16 gives; a float32 volume's
    in float32, as numpy does for ``arr.astype(float32) * slope + intercept``.
    """

    def __init__(self, shape: tuple[int, int]) -> None:
        self._scratch: dict[bool, np.ndarray] = {}
        self._shape = shape

    def read(self, src: _NativeSlice, out: np.ndarray, slope: float | None, intercept: float | None) -> bool:
        """Fill ``out`` (one slice of the volume); False when the file holds fewer bytes than its
        header said (pydicom then reads it, and reports it)."""
        rescaled = slope is not None and intercept is not None
        if rescaled:
            _check_rescale_range(slope, intercept, 2)  # type: ignore[arg-type]
        if out.dtype == np.int16:
            buf = out  # the raw bits in place: uint16 and int16 wrap alike
        else:
            buf = self._scratch.get(src.signed)
            if buf is None:
                buf = self._scratch[src.signed] = np.empty(self._shape, dtype="<i2" if src.signed else "<u2")
        if src.data is not None:
            buf[...] = np.frombuffer(src.data, dtype=buf.dtype).reshape(buf.shape)
        elif not _read_into(src.path, src.offset, buf):
            return False
        shift = 16 - src.bits_stored
        if shift:
            if src.signed:
                np.left_shift(buf, shift, out=buf)
                np.right_shift(buf, shift, out=buf)
            else:
                np.bitwise_and(buf, buf.dtype.type((1 << src.bits_stored) - 1), out=buf)
        if out.dtype == np.int16:
            if rescaled:
                if int(slope) != 1:  # type: ignore[arg-type]
                    np.multiply(out, _wrap16(int(slope)), out=out)  # type: ignore[arg-type]
                if int(intercept) != 0:  # type: ignore[arg-type]
                    np.add(out, _wrap16(int(intercept)), out=out)  # type: ignore[arg-type]
        elif rescaled:
            np.multiply(buf, np.float32(slope), out=out)
            np.add(out, np.float32(intercept), out=out)
        else:
            np.copyto(out, buf, casting="unsafe")
        return True


def _read_into(path: str, offset: int, buf: np.ndarray) -> bool:
    """Fill ``buf`` with the bytes of ``path`` from ``offset``; False if the file ends first."""
    view = memoryview(buf).cast("B")
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        done = 0
        while done < len(view):
            n = f.readinto(view[done:])
            if not n:
                return False
            done += n
    return True


def _decode_planes(
    planes: Sequence[_Plane], dtype: np.dtype, target: Callable[[_Plane], np.ndarray]
) -> Iterator[_Plane]:
    """Write each plane's pixels, in modality units, into ``target(plane)`` and yield the plane:
    classic native 16-bit instances read straight from their files (``_NativeReader``), other
    classic instances through pydicom one by one, a multi-frame instance's frames in one pass over
    its pixel data."""
    by_ds: dict[int, list[_Plane]] = defaultdict(list)
    order: list[int] = []
    for p in planes:
        if id(p.ds) not in by_ds:
            order.append(id(p.ds))
        by_ds[id(p.ds)].append(p)
    native: _NativeReader | None = None
    for key in order:
        group = by_ds[key]
        ds = group[0].ds
        if group[0].frame is None:
            for p in group:
                src = _native_slice(p)
                if src is not None:
                    native = native or _NativeReader(p.shape)
                    if native.read(src, target(p), p.slope, p.intercept):
                        del p.ds.PixelData
                        yield p
                        continue
                values, _ = _modality_values(p.ds, dtype)
                target(p)[...] = values
                del p.ds.PixelData  # its bytes and pydicom's cached array: one slice held at a time
                yield p
            continue
        _check_decodable(ds)
        group = sorted(group, key=lambda p: p.frame or 0)
        try:
            frames = iter_pixels(ds, indices=[(p.frame or 1) - 1 for p in group])
            for p, arr in zip(group, frames, strict=True):
                if arr.shape != (int(ds.Rows), int(ds.Columns)):
                    raise VolumeError(f"Decoded frame has shape {arr.shape}, not Rows x Columns.")
                target(p)[...] = _to_modality(arr, ds, p.slope, p.intercept, dtype)[0]
                yield p
            del ds.PixelData
        except VolumeError:
            raise
        except Exception as exc:  # unsupported or corrupt compression, short pixel data
            raise VolumeError(
                f"Pixel data cannot be decoded (transfer syntax {_transfer_syntax(ds)}): {exc}"
            ) from exc


def _stack(
    planes: list[_Plane], modality: str, max_voxel_bytes: int = 0, admit: Callable[[int], None] | None = None
) -> SeriesVolume:
    stack, stack_note, _ = _choose_stack(planes)
    normal = _normal(stack[0].iop)  # type: ignore[arg-type]
    positions = []
    for p in stack:
        if p.ipp is None:
            raise VolumeError("An instance has no valid Image Position (Patient); cannot order slices.")
        positions.append(float(np.dot(normal, p.ipp)))
    order = np.argsort(positions, kind="stable")
    stack = [stack[i] for i in order]
    pos = [positions[i] for i in order]
    # Planes at one position (within 1 micrometre): one slice, if their pixels agree.
    slots: list[list[_Plane]] = []
    unique: list[float] = []
    for p, z in zip(stack, pos, strict=True):
        if unique and abs(z - unique[-1]) < 1e-3:
            slots[-1].append(p)
        else:
            slots.append([p])
            unique.append(z)
    rescaled_all = {p.slope is not None and p.intercept is not None for p in stack}
    if len(rescaled_all) != 1:
        raise VolumeError("Some instances have a rescale and others do not.")
    grid = regular_grid(unique, _axis(normal)) if len(unique) > 1 else None
    first = stack[0]
    dtype = _volume_dtype(stack)
    size = grid.size if grid else 1
    exact = grid is None or grid.exact
    shape = (size, *first.shape)
    buffers = 1 if exact else 2  # irregular: the received slices are kept beside the grid
    needed = int(np.prod(shape)) * dtype.itemsize * buffers
    if max_voxel_bytes and needed > max_voxel_bytes:
        raise VolumeTooLarge(
            f"The series' volume needs {needed / 1e6:.0f} MB ({shape[0]} x {shape[1]} x {shape[2]} "
            f"{dtype.name}), over the {max_voxel_bytes / 1e6:.0f} MB its analysis may use under "
            "worker.memory_budget_bytes."
        )
    if admit is not None:
        admit(needed)  # may wait until other analyses give their memory back
    index = grid.index if grid is not None else np.zeros(1, dtype=int)
    received = np.empty((len(unique), *shape[1:]), dtype=dtype) if not exact else None
    voxels = np.empty(shape, dtype=dtype)
    slot_of = {id(s[0]): k for k, s in enumerate(slots)}
    duplicates = {id(p): k for k, s in enumerate(slots) for p in s[1:]}
    # Each slot's first plane is decoded before its duplicates: slots are in order, and within a
    # multi-frame instance (decoded in frame order) the stable sort kept the lower frame first.
    wanted = [p for s in slots for p in s]
    skipped_dups = 0
    spare = np.empty(shape[1:], dtype=dtype) if duplicates else None  # a duplicate's pixels, to compare

    def target(p: _Plane) -> np.ndarray:
        k = slot_of.get(id(p))
        if k is None:
            return spare  # type: ignore[return-value]
        return voxels[index[k]] if received is None else received[k]

    for p in _decode_planes(wanted, dtype, target):
        if id(p) in slot_of:
            continue
        k = duplicates[id(p)]
        reference = voxels[index[k]] if received is None else received[k]
        if not np.array_equal(reference, spare):
            raise VolumeError(
                f"Two or more instances share one slice position ({unique[k]:.2f} mm along the normal) "
                "with different pixels."
            )
        skipped_dups += 1
    if not exact:
        _interpolate_irregular(voxels, received, np.asarray(unique), grid)  # type: ignore[arg-type]
    elif grid is not None and grid.size > len(unique):
        _interpolate_missing(voxels, grid.index)
    for p in stack:
        if "PixelData" in p.ds:
            del p.ds.PixelData  # the sources are kept as headers only
    sources: list[Dataset] = []
    source_index: dict[int, int] = {}
    refs: list[SliceRef] = [SliceRef(None)] * size
    for k, s in enumerate(slots):
        head = s[0]
        if id(head.ds) not in source_index:
            source_index[id(head.ds)] = len(sources)
            sources.append(head.ds)
        refs[int(index[k])] = SliceRef(source_index[id(head.ds)], head.frame)
    notes = [n for n in (stack_note, grid.note if grid else "") if n]
    if skipped_dups:
        notes.append(f"{skipped_dups} duplicate image(s) at an occupied position (same pixels) left out")
    spacing = grid.step_mm if grid is not None else first.thickness or 0.0
    identity = len(sources) == size and all(r.frame is None and r.source == i for i, r in enumerate(refs))
    total = len(planes)
    return SeriesVolume(
        voxels=voxels,
        spacing_mm=(abs(spacing), *first.pixel_spacing),
        orientation=tuple(float(v) for v in first.iop),  # type: ignore[union-attr]
        position=first.ipp,  # type: ignore[arg-type]
        modality=modality,
        rescaled=rescaled_all.pop(),
        body_part=str(first.ds.get("BodyPartExamined", "")),
        window=_plane_window(first),
        sources=sources,
        skipped=total - len(slots),
        slices=() if identity else tuple(refs),
        note="; ".join(notes),
    )


def _interpolate_missing(voxels: np.ndarray, index: np.ndarray) -> None:
    """Fill the grid slices between received ones (which sit on the grid) linearly."""
    for a, b in zip(index[:-1], index[1:], strict=True):
        a, b = int(a), int(b)
        if b - a < 2:
            continue
        lo, hi = voxels[a].astype(np.float32), voxels[b].astype(np.float32)
        for j in range(a + 1, b):
            w = (j - a) / (b - a)
            _put(voxels, j, (1 - w) * lo + w * hi)


def _interpolate_irregular(voxels: np.ndarray, received: np.ndarray, pos: np.ndarray, grid: Grid) -> None:
    """Every grid slice from the two received slices around it (their own pixels where one lies
    within SPACING_TOLERANCE of a step of the grid position)."""
    for j in range(grid.size):
        z = pos[0] + j * grid.step_mm
        i = int(np.clip(np.searchsorted(pos, z, side="right") - 1, 0, len(pos) - 2))
        w = float(np.clip((z - pos[i]) / (pos[i + 1] - pos[i]), 0.0, 1.0))
        tol = SPACING_TOLERANCE * grid.step_mm
        if abs(z - pos[i]) <= tol:
            voxels[j] = received[i]
        elif abs(pos[i + 1] - z) <= tol:
            voxels[j] = received[i + 1]
        else:
            _put(voxels, j, (1 - w) * received[i].astype(np.float32) + w * received[i + 1].astype(np.float32))


def _put(voxels: np.ndarray, j: int, values: np.ndarray) -> None:
    voxels[j] = np.rint(values) if voxels.dtype.kind == "i" else values
