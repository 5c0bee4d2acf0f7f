"""CT volume preprocessing for native 3D models (Med3DVLM, M3D-LaMed), invertible.

A native 3D model reads one fixed-size cube (e.g. 128x256x256, depth x height x
width) in a fixed anatomical axis order. ``prepare_ct`` turns the node's volume
(HU voxels in (slice, row, column) order plus DICOM geometry) into that cube:

1. reorient: permute and flip the source axes so that the model's axes point
   the way the model was trained (``axes``, default "IPL": depth head->feet,
   height anterior->posterior, width patient right->left, i.e. axial slices as
   a radiologist views them);
2. foreground crop: the bounding box of voxels above ``foreground_hu`` (plus
   ``margin`` voxels), so scanner padding and air around the patient go away;
3. intensity: optional HU clip, then min-max to [0, 1] over the crop;
4. resize: trilinear to ``size`` (pixel-area convention, like
   ``torch.nn.functional.interpolate(..., align_corners=False)``).

Every step is recorded in the returned ``PreparedCT`` so that a model-space
point, box or mask maps back to source voxels (``to_source``,
``mask_to_source``). Pure numpy/scipy: no torch here, so callers without a
model (tests, the M3D backend, benches) share it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from inference_service.errors import InvalidInput
from inference_service.types import Geometry, Volume

#: Med3DVLM's input cube (depth, height, width).
DEFAULT_SIZE: tuple[int, int, int] = (128, 256, 256)
#: Direction of increasing index of each model axis, in patient terms.
DEFAULT_AXES = "IPL"
#: HU above which a voxel counts as patient (air is about -1000, fat about -100).
DEFAULT_FOREGROUND_HU = -500.0

#: Patient direction letters as LPS unit vectors.
_LETTERS: dict[str, tuple[float, float, float]] = {
    "L": (1.0, 0.0, 0.0),
    "R": (-1.0, 0.0, 0.0),
    "P": (0.0, 1.0, 0.0),
    "A": (0.0, -1.0, 0.0),
    "S": (0.0, 0.0, 1.0),
    "I": (0.0, 0.0, -1.0),
}


def source_directions(geometry: Geometry) -> np.ndarray:
    """Unit LPS direction of increasing slice, row and column index (3x3, one per row).

    The node stacks slices by ascending position along the normal
    row-direction x column-direction, so the slice axis points along that normal.
    """
    iop = np.asarray(geometry.orientation, dtype=np.float64)
    along_row, along_col = iop[:3], iop[3:]  # +column index, +row index
    normal = np.cross(along_row, along_col)
    norm = np.linalg.norm(normal)
    if norm < 1e-6:
        raise InvalidInput("Image orientation is degenerate (row and column directions are parallel).")
    return np.stack([normal / norm, along_col, along_row])


def _parse_axes(axes: str) -> np.ndarray:
    axes = axes.upper()
    if len(axes) != 3 or any(a not in _LETTERS for a in axes):
        raise ValueError(f"Model axes must be three of L/R/P/A/S/I, got {axes!r}.")
    vectors = np.array([_LETTERS[a] for a in axes])
    if abs(np.linalg.det(vectors)) < 0.5:
        raise ValueError(f"Model axes {axes!r} repeat an anatomical direction.")
    return vectors


def orientation_plan(
    geometry: Geometry, axes: str = DEFAULT_AXES
) -> tuple[tuple[int, ...], tuple[bool, ...]]:
    """(perm, flips): model axis k reads source axis perm[k], reversed where flips[k].

    The permutation is the one whose source directions best match the model's
    (largest total |cosine|), so oblique acquisitions take their nearest axes.
    """
    src = source_directions(geometry)
    target = _parse_axes(axes)
    cos = target @ src.T  # [model axis, source axis]
    perm = max(itertools.permutations(range(3)), key=lambda p: sum(abs(cos[k, p[k]]) for k in range(3)))
    flips = tuple(bool(cos[k, perm[k]] < 0) for k in range(3))
    return tuple(perm), flips


@dataclass(frozen=True)
class PreparedCT:
    """A model-ready cube and the record that maps it back to the source volume.

    ``array`` is float32 in [0, 1] with shape ``size`` (model axis order).
    Model axis k is source axis ``perm[k]``, reversed where ``flips[k]``; the
    reoriented volume was cropped to ``crop[k] = (start, stop)`` and resized
    by ``scale[k]`` model voxels per cropped voxel.
    """

    array: np.ndarray
    source_shape: tuple[int, int, int]
    perm: tuple[int, ...]
    flips: tuple[bool, ...]
    crop: tuple[tuple[int, int], ...]
    size: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]  # of one model voxel, model axis order
    intensity_range: tuple[float, float]  # HU mapped to 0 and 1

    @property
    def scale(self) -> tuple[float, ...]:
        return tuple(self.size[k] / (self.crop[k][1] - self.crop[k][0]) for k in range(3))

    @property
    def reoriented_shape(self) -> tuple[int, ...]:
        return tuple(self.source_shape[p] for p in self.perm)

    def to_source(self, point: Sequence[float]) -> tuple[float, float, float]:
        """A model-space voxel position (continuous index, model axis order) ->
        source (slice, row, column) continuous index, clamped to the volume."""
        out = [0.0, 0.0, 0.0]
        reoriented = self.reoriented_shape
        for k in range(3):
            start, _ = self.crop[k]
            c = (float(point[k]) + 0.5) / self.scale[k] - 0.5 + start  # pixel-area convention
            if self.flips[k]:
                c = reoriented[k] - 1 - c
            out[self.perm[k]] = float(np.clip(c, 0, self.source_shape[self.perm[k]] - 1))
        return out[0], out[1], out[2]

    def _nearest(self, k: int) -> np.ndarray:
        """For each cropped voxel along model axis k, its nearest model voxel."""
        start, stop = self.crop[k]
        c = np.arange(stop - start, dtype=np.float64)
        m = np.floor((c + 0.5) * self.scale[k])
        return np.clip(m, 0, self.size[k] - 1).astype(np.intp)

    def to_source_array(self, model_array: np.ndarray, fill: float | bool = 0) -> np.ndarray:
        """A model-space array (e.g. a mask) -> the source voxel grid (nearest neighbour);
        voxels outside the crop get ``fill``."""
        if tuple(model_array.shape) != tuple(self.size):
            raise ValueError(f"Array {model_array.shape} is not the model size {self.size}.")
        reoriented = np.full(self.reoriented_shape, fill, dtype=model_array.dtype)
        box = tuple(slice(a, b) for a, b in self.crop)
        reoriented[box] = model_array[np.ix_(self._nearest(0), self._nearest(1), self._nearest(2))]
        flipped = np.flip(reoriented, axis=[k for k in range(3) if self.flips[k]])
        return np.ascontiguousarray(np.transpose(flipped, np.argsort(self.perm)))

    def mask_to_source(self, mask: np.ndarray) -> np.ndarray:
        """A model-space bool mask (or probability > 0.5) -> bool mask over the source volume."""
        return self.to_source_array(np.asarray(mask) > 0.5 if mask.dtype != np.bool_ else mask, False)


def _foreground_box(arr: np.ndarray, threshold: float, margin: int) -> tuple[tuple[int, int], ...]:
    fg = arr > threshold
    if not fg.any():
        return tuple((0, n) for n in arr.shape)
    box = []
    for k in range(3):
        other = tuple(a for a in range(3) if a != k)
        hit = np.flatnonzero(fg.any(axis=other))
        box.append((max(int(hit[0]) - margin, 0), min(int(hit[-1]) + 1 + margin, arr.shape[k])))
    return tuple(box)


def prepare_ct(
    volume: Volume,
    *,
    size: Sequence[int] = DEFAULT_SIZE,
    axes: str = DEFAULT_AXES,
    foreground_hu: float | None = DEFAULT_FOREGROUND_HU,
    margin: int = 0,
    hu_window: tuple[float, float] | None = None,
) -> PreparedCT:
    """The node's CT volume -> a ``PreparedCT`` of ``size`` in the model's axis order.

    ``foreground_hu=None`` skips the crop; ``hu_window=(low, high)`` clips HU
    before the min-max (None: min-max over the cropped values as published).
    Raises ``InvalidInput`` for a volume that is not a single-channel CT in HU.
    """
    g = volume.geometry
    if g.modality != "CT" or not g.rescaled:
        raise InvalidInput(f"A 3D CT model needs a CT volume in Hounsfield units, got {g.modality}.")
    if g.samples_per_pixel != 1 or volume.voxels.ndim != 3:
        raise InvalidInput("A 3D CT model needs single-channel voxels (slices, rows, columns).")
    size = tuple(int(s) for s in size)
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"Model size must be three positive integers, got {size}.")
    perm, flips = orientation_plan(g, axes)

    arr = np.transpose(np.asarray(volume.voxels, dtype=np.float32), perm)
    arr = np.flip(arr, axis=[k for k in range(3) if flips[k]])
    crop = (
        _foreground_box(arr, foreground_hu, margin)
        if foreground_hu is not None
        else tuple((0, n) for n in arr.shape)
    )
    arr = arr[tuple(slice(a, b) for a, b in crop)]

    if hu_window is not None:
        lo, hi = float(hu_window[0]), float(hu_window[1])
        arr = np.clip(arr, lo, hi)
    else:
        lo, hi = float(arr.min()), float(arr.max())
    arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)

    zoom = tuple(size[k] / arr.shape[k] for k in range(3))
    if arr.shape != size:
        arr = ndimage.zoom(arr, zoom, order=1, mode="nearest", grid_mode=True)
    arr = np.clip(arr, 0.0, 1.0).astype(np.float32, copy=False)

    src_spacing = g.spacing_mm
    spacing = tuple(float(src_spacing[perm[k]]) / zoom[k] for k in range(3))
    return PreparedCT(
        array=np.ascontiguousarray(arr),
        source_shape=tuple(int(n) for n in volume.voxels.shape[:3]),  # type: ignore[arg-type]
        perm=perm,
        flips=flips,
        crop=crop,
        size=size,  # type: ignore[arg-type]
        spacing_mm=spacing,  # type: ignore[arg-type]
        intensity_range=(lo, hi),
    )


def stack(prepared: Sequence[PreparedCT]) -> np.ndarray:
    """A batch of prepared cubes as one (batch, 1, depth, height, width) float32 array."""
    if not prepared:
        raise ValueError("No volumes to stack.")
    sizes = {p.size for p in prepared}
    if len(sizes) != 1:
        raise ValueError(f"Prepared volumes differ in size: {sorted(sizes)}.")
    return np.stack([p.array for p in prepared])[:, None]
