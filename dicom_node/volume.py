"""Series -> volume: the last place pixels are read from DICOM.

Instances are split into stacks by orientation and matrix size (localizers
left out), sorted by their position along the slice normal (never by
InstanceNumber), checked for even spacing, rescaled to modality units, and
MONOCHROME1 is inverted so that brighter always means denser.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from dicom_node._pixels import undecodable_reason
from dicom_node.errors import VolumeError, VolumeTooLarge

PROJECTION_MODALITIES = frozenset({"CR", "DX", "MG", "XA", "RF", "IO", "PX"})
SPACING_TOLERANCE = 0.05  # relative deviation allowed between slice gaps
FLOAT32 = np.dtype(np.float32)
FLOAT32_MAX = float(np.finfo(np.float32).max)
DEFER_BYTES = 16 * 1024  # values larger than this (pixel data) are read when first used
DEFAULT_ORIENTATION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


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
    sources: list[Dataset]  # header-only, in slice order; index i = slice i
    skipped: int = 0  # instances left out (other stacks, localizers)


def _float_tuple(value: Sequence[object] | None, n: int) -> tuple[float, ...] | None:
    """``n`` finite numbers from a multi-valued DS, else None (absent, wrong count, NaN, text):
    a NaN position passes every spacing comparison and would give a volume with NaN geometry."""
    if value is None:
        return None
    try:
        if len(value) != n:
            return None
        numbers = tuple(float(v) for v in value)  # type: ignore[arg-type]
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
        number = float(value)
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


def _stack_key(ds: Dataset) -> tuple[object, ...]:
    iop = _float_tuple(ds.get("ImageOrientationPatient"), 6)
    return (tuple(round(v, 3) for v in iop) if iop else None, int(ds.Rows), int(ds.Columns))


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


def _has_rescale(ds: Dataset) -> bool:
    return ds.get("RescaleSlope") is not None and ds.get("RescaleIntercept") is not None


def _volume_dtype(stack: Sequence[Dataset]) -> np.dtype:
    """int16 when every slice's modality values are integers that fit (CT in HU: slope 1, integral
    intercept, 12-16 stored bits): half the memory of float32 and sent as is; else float32."""
    for ds in stack:
        if ds.get("PhotometricInterpretation") == "MONOCHROME1" or int(ds.get("SamplesPerPixel", 1)) != 1:
            return np.dtype(np.float32)
        slope, intercept = _number(ds, "RescaleSlope", 1.0), _number(ds, "RescaleIntercept", 0.0)
        assert slope is not None and intercept is not None
        bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
        signed = int(ds.get("PixelRepresentation") or 0) == 1
        lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        values = (lo * slope + intercept, hi * slope + intercept)
        if slope != int(slope) or intercept != int(intercept) or min(values) < -32768 or max(values) > 32767:
            return np.dtype(np.float32)
    return np.dtype(np.int16)


def _modality_values(ds: Dataset, dtype: np.dtype = FLOAT32) -> tuple[np.ndarray, bool]:
    """Decoded pixels in modality units (rescaled) or raw, in ``dtype``; and whether rescaled."""
    ts = ds.file_meta.get("TransferSyntaxUID", "unknown") if hasattr(ds, "file_meta") else "unknown"
    reason = undecodable_reason(ds, ts)
    if reason is not None:
        raise VolumeError(reason)
    try:
        arr = ds.pixel_array
    except Exception as exc:  # unsupported or corrupt compression
        raise VolumeError(f"Pixel data cannot be decoded (transfer syntax {ts}): {exc}") from exc
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise VolumeError("Only single-sample (grey) images are supported for volumes.")
    if arr.shape != (int(ds.Rows), int(ds.Columns)):  # e.g. frames inferred from the data's length
        raise VolumeError(f"Decoded pixel data has shape {arr.shape}, not Rows x Columns of one image.")
    slope, intercept = _number(ds, "RescaleSlope"), _number(ds, "RescaleIntercept")
    if slope is not None and intercept is not None:
        if abs(slope) * 2.0 ** (8 * arr.dtype.itemsize) + abs(intercept) > FLOAT32_MAX:
            raise VolumeError("RescaleSlope and RescaleIntercept map pixels beyond float32's range.")
        if dtype.kind == "i":  # integral slope and intercept (see _volume_dtype): exact in int32
            return (arr.astype(np.int32) * int(slope) + int(intercept)).astype(dtype), True
        return (arr.astype(np.float32) * slope + intercept).astype(dtype), True
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        top = float(2 ** int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16) - 1)
        return (top - arr.astype(np.float32)).astype(dtype), False
    return arr.astype(dtype), False


def read_series(paths: Sequence[Path], max_voxel_bytes: int = 0) -> SeriesVolume:
    """Read and assemble one series; raises VolumeError with the reason if it cannot.

    ``max_voxel_bytes`` (0 = no limit): a volume that would need more is refused from its headers,
    before any pixel is decoded (VolumeTooLarge), rather than risking the process's memory.
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
    if any(f != 1 for f in frames):
        raise VolumeError(
            "Multi-frame instances are not supported yet."
            if all(f is not None and f >= 1 and f == int(f) for f in frames)
            else "NumberOfFrames is not a positive integer."
        )
    if not all(int(ds.get("Rows") or 0) > 0 and int(ds.get("Columns") or 0) > 0 for ds in datasets):
        raise VolumeError("An instance has no Rows or Columns (or zero): its pixels have no shape.")
    modality = str(datasets[0].get("Modality", ""))
    if not modality:
        raise VolumeError("The series has no Modality.")
    if modality in PROJECTION_MODALITIES or len(datasets) == 1:
        return _single_image(datasets, modality)
    return _stack(datasets, modality, max_voxel_bytes)


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


def _stack(datasets: list[Dataset], modality: str, max_voxel_bytes: int = 0) -> SeriesVolume:
    candidates = [ds for ds in datasets if not _is_localizer(ds)]
    stacks: dict[tuple[object, ...], list[Dataset]] = defaultdict(list)
    for ds in candidates:
        stacks[_stack_key(ds)].append(ds)
    key, stack = max(stacks.items(), key=lambda kv: len(kv[1])) if stacks else (None, [])
    if key is None or key[0] is None:
        raise VolumeError("The instances have no valid Image Orientation (Patient); cannot order slices.")
    iop = np.array(_float_tuple(stack[0].ImageOrientationPatient, 6))
    normal = np.cross(iop[:3], iop[3:])
    positions = []
    for ds in stack:
        ipp = _float_tuple(ds.get("ImagePositionPatient"), 3)
        if ipp is None:
            raise VolumeError("An instance has no valid Image Position (Patient); cannot order slices.")
        positions.append(float(np.dot(normal, ipp)))
    order = np.argsort(positions, kind="stable")
    stack = [stack[i] for i in order]
    pos = np.array(positions)[order]
    gaps = np.diff(pos)
    if len(stack) > 1:
        if np.any(np.abs(gaps) < 1e-3):
            raise VolumeError("Two or more instances share one slice position.")
        mean_gap = float(gaps.mean())
        if np.any(np.abs(gaps - mean_gap) > SPACING_TOLERANCE * abs(mean_gap)):
            raise VolumeError(f"Slice spacing is not uniform (gaps {gaps.min():.2f}..{gaps.max():.2f} mm).")
    else:
        mean_gap = _optional_number(stack[0], "SliceThickness") or 0.0
    rescaled_all = {_has_rescale(ds) for ds in stack}
    if len(rescaled_all) != 1:
        raise VolumeError("Some instances have a rescale and others do not.")
    first = stack[0]
    dtype = _volume_dtype(stack)
    shape = (len(stack), int(first.Rows), int(first.Columns))
    needed = int(np.prod(shape)) * dtype.itemsize
    if max_voxel_bytes and needed > max_voxel_bytes:
        raise VolumeTooLarge(
            f"The series' volume needs {needed / 1e6:.0f} MB ({shape[0]} x {shape[1]} x {shape[2]} "
            f"{dtype.name}), over the {max_voxel_bytes / 1e6:.0f} MB its analysis may use under "
            "worker.memory_budget_bytes."
        )
    voxels = np.empty(shape, dtype=dtype)
    for k, ds in enumerate(stack):
        if (int(ds.Rows), int(ds.Columns)) != voxels.shape[1:]:
            raise VolumeError("The instances of the stack differ in size.")
        values, _ = _modality_values(ds, voxels.dtype)
        voxels[k] = values
        del ds.PixelData  # the sources are kept as headers only
    return SeriesVolume(
        voxels=voxels,
        spacing_mm=(abs(mean_gap), *_pixel_spacing(first)),
        orientation=tuple(float(v) for v in iop),
        position=_float_tuple(first.ImagePositionPatient, 3),  # type: ignore[arg-type]
        modality=modality,
        rescaled=rescaled_all.pop(),
        body_part=str(first.get("BodyPartExamined", "")),
        window=_window(first),
        sources=stack,
        skipped=len(datasets) - len(stack),
    )
