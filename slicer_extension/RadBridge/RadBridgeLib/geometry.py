"""Volume geometry between 3D Slicer (RAS, IJK order) and the radbridge.v1 contract (LPS, index order).

Conventions, stated once:

* Slicer: voxel arrays from ``slicer.util.arrayFromVolume`` are indexed ``[k, j, i]``
  with i = column, j = row, k = slice; the node's 4x4 ``IJKToRAS`` matrix maps
  ``(i, j, k, 1)`` to RAS millimetres (its columns 0..2 are the i, j, k axes scaled by
  their spacing, column 3 the RAS centre of voxel (0, 0, 0)).
* Contract (``pb.Geometry``): voxel bytes in C order (slice, row, column); LPS
  millimetres; ``image_orientation_patient`` = direction of increasing column index
  followed by direction of increasing row index (DICOM Image Orientation (Patient));
  slices advance along ``cross(row_cosines, column_cosines)`` by ``slice_spacing_mm``;
  ``image_position_patient`` = LPS centre of the first voxel of the first slice.
* RAS <-> LPS: negate x and y.

A Slicer volume whose k axis points against that normal (a left-handed IJK frame)
cannot be written as a ``pb.Geometry`` directly; :func:`canonical_slice_order`
flips the slices first (and the caller flips results back).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from protos.radbridge.v1 import inference_pb2 as pb

#: Diagonal of the RAS <-> LPS flip (its own inverse).
_FLIP = np.array([-1.0, -1.0, 1.0])
#: Tolerance on direction cosines (unit length, orthogonality, handedness).
ORTHO_TOL = 1e-4


def lps_to_ras(points: np.ndarray | tuple[float, ...] | list[float]) -> np.ndarray:
    """Negate x and y of one point (3,) or many (..., 3)."""
    return np.asarray(points, dtype=float) * _FLIP


def ras_to_lps(points: np.ndarray | tuple[float, ...] | list[float]) -> np.ndarray:
    """Negate x and y of one point (3,) or many (..., 3)."""
    return np.asarray(points, dtype=float) * _FLIP


def ijk_to_index(ijk: np.ndarray | tuple[float, ...] | list[float]) -> np.ndarray:
    """Slicer (i, j, k) = (column, row, slice) -> contract index (slice, row, column)."""
    return np.asarray(ijk, dtype=float)[..., ::-1].copy()


def index_to_ijk(index: np.ndarray | tuple[float, ...] | list[float]) -> np.ndarray:
    """Contract index (slice, row, column) -> Slicer (i, j, k)."""
    return np.asarray(index, dtype=float)[..., ::-1].copy()


def ijk_to_ras(matrix: np.ndarray, ijk: np.ndarray | tuple[float, ...] | list[float]) -> np.ndarray:
    """Apply a 4x4 IJKToRAS matrix to one (3,) or many (..., 3) IJK points."""
    m = np.asarray(matrix, dtype=float)
    p = np.asarray(ijk, dtype=float)
    return p @ m[:3, :3].T + m[:3, 3]


def ras_to_ijk(matrix: np.ndarray, ras: np.ndarray | tuple[float, ...] | list[float]) -> np.ndarray:
    """Inverse of :func:`ijk_to_ras` for the same IJKToRAS matrix (fractional IJK)."""
    inv = np.linalg.inv(np.asarray(matrix, dtype=float))
    p = np.asarray(ras, dtype=float)
    return p @ inv[:3, :3].T + inv[:3, 3]


@dataclass(frozen=True)
class VolumeGeometry:
    """Where a (slice, row, column) voxel array sits in the patient (LPS) frame.

    ``axes_lps`` holds three unit vectors, in index order: the directions of increasing
    slice, row and column index. ``spacing_mm`` is (slice, row, column) as well.
    """

    origin_lps: tuple[float, float, float]
    spacing_mm: tuple[float, float, float]
    axes_lps: tuple[tuple[float, float, float], tuple[float, float, float], tuple[float, float, float]]

    def __post_init__(self) -> None:
        if len(self.origin_lps) != 3 or len(self.spacing_mm) != 3 or len(self.axes_lps) != 3:
            raise ValueError("origin, spacing and axes must each have three entries.")
        if any(not s > 0 for s in self.spacing_mm):
            raise ValueError(f"Spacing must be positive, got {self.spacing_mm}.")
        a = np.asarray(self.axes_lps, dtype=float)
        if a.shape != (3, 3) or not np.allclose(a @ a.T, np.eye(3), atol=ORTHO_TOL):
            raise ValueError("The three axes must be orthonormal (sheared volumes are not supported).")

    # -- index <-> LPS ------------------------------------------------------------
    def index_to_lps_matrix(self) -> np.ndarray:
        """4x4 mapping (slice, row, column, 1) -> (L, P, S, 1)."""
        m = np.eye(4)
        m[:3, :3] = np.asarray(self.axes_lps, dtype=float).T * np.asarray(self.spacing_mm, dtype=float)
        m[:3, 3] = self.origin_lps
        return m

    def index_to_lps(self, index: np.ndarray | tuple[float, ...] | list[float]) -> np.ndarray:
        m = self.index_to_lps_matrix()
        return np.asarray(index, dtype=float) @ m[:3, :3].T + m[:3, 3]

    def lps_to_index(self, lps: np.ndarray | tuple[float, ...] | list[float]) -> np.ndarray:
        inv = np.linalg.inv(self.index_to_lps_matrix())
        return np.asarray(lps, dtype=float) @ inv[:3, :3].T + inv[:3, 3]

    # -- Slicer ------------------------------------------------------------------
    def ijk_to_ras_matrix(self) -> np.ndarray:
        return ijk_to_ras_matrix(self)

    @classmethod
    def from_ijk_to_ras(cls, matrix: np.ndarray) -> VolumeGeometry:
        """Decompose a Slicer IJKToRAS matrix (rotation x spacing + translation)."""
        m = np.asarray(matrix, dtype=float)
        if m.shape != (4, 4):
            raise ValueError(f"IJKToRAS must be 4x4, got {m.shape}.")
        if not np.allclose(m[3], [0.0, 0.0, 0.0, 1.0]):
            raise ValueError("IJKToRAS must be affine (last row 0 0 0 1).")
        cols_ras = m[:3, :3]  # columns: i, j, k axes (scaled) in RAS
        spacing_ijk = np.linalg.norm(cols_ras, axis=0)
        if np.any(spacing_ijk <= 0):
            raise ValueError("IJKToRAS has a zero-length axis.")
        dirs_lps = (cols_ras / spacing_ijk).T * _FLIP  # rows: i, j, k unit vectors in LPS
        return cls(
            origin_lps=tuple(float(v) for v in ras_to_lps(m[:3, 3])),  # type: ignore[arg-type]
            spacing_mm=tuple(float(v) for v in spacing_ijk[::-1]),  # type: ignore[arg-type]
            axes_lps=tuple(tuple(float(v) for v in d) for d in dirs_lps[::-1]),  # type: ignore[arg-type]
        )

    # -- contract ----------------------------------------------------------------
    @property
    def right_handed(self) -> bool:
        """True when slices advance along cross(row cosines, column cosines), as the contract needs."""
        slice_dir, row_dir, col_dir = (np.asarray(v, dtype=float) for v in self.axes_lps)
        return bool(np.dot(np.cross(col_dir, row_dir), slice_dir) > 0)


def ijk_to_ras_matrix(geometry: VolumeGeometry) -> np.ndarray:
    """Slicer's 4x4 IJKToRAS matrix for a geometry: (i, j, k, 1) -> (R, A, S, 1)."""
    index_to_lps = geometry.index_to_lps_matrix()
    m = np.eye(4)
    m[:3, :3] = (index_to_lps[:3, :3] * _FLIP[:, None])[:, ::-1]  # LPS->RAS rows, index->ijk columns
    m[:3, 3] = lps_to_ras(index_to_lps[:3, 3])
    return m


def canonical_slice_order(voxels: np.ndarray, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """Make the k axis point along cross(i, j), flipping the slices when it does not.

    Returns (voxels, IJKToRAS, flipped). ``flipped`` tells the caller to flip masks and
    slice indices of the results back (``mask[::-1]``, ``n - 1 - slice_index``).
    """
    m = np.asarray(matrix, dtype=float)
    if VolumeGeometry.from_ijk_to_ras(m).right_handed:
        return voxels, m, False
    n = voxels.shape[0]
    flipped = m.copy()
    flipped[:3, 3] = m[:3, :3] @ np.array([0.0, 0.0, n - 1.0]) + m[:3, 3]
    flipped[:3, 2] = -m[:3, 2]
    return voxels[::-1], flipped, True


def geometry_from_ijk_to_ras(
    matrix: np.ndarray,
    shape_kji: tuple[int, ...],
    *,
    modality: str = "CT",
    pixel_type: int = pb.PIXEL_TYPE_UNSPECIFIED,
    rescaled: bool = True,
    body_part: str = "",
    window: tuple[float, float] | None = None,
) -> pb.Geometry:
    """The contract's Geometry for a Slicer volume of array shape (k, j, i) and its IJKToRAS.

    Raises ValueError for a left-handed IJK frame (see :func:`canonical_slice_order`).
    """
    g = VolumeGeometry.from_ijk_to_ras(matrix)
    if not g.right_handed:
        raise ValueError(
            "The volume's k axis points against cross(i, j); call canonical_slice_order() first."
        )
    if len(shape_kji) not in (3, 4):
        raise ValueError(f"Shape must be (k, j, i) or (k, j, i, samples), got {shape_kji}.")
    slice_dir, row_dir, col_dir = g.axes_lps
    center, width = window or (0.0, 0.0)
    return pb.Geometry(
        slices=int(shape_kji[0]),
        rows=int(shape_kji[1]),
        columns=int(shape_kji[2]),
        samples_per_pixel=int(shape_kji[3]) if len(shape_kji) == 4 else 1,
        slice_spacing_mm=g.spacing_mm[0],
        row_spacing_mm=g.spacing_mm[1],
        column_spacing_mm=g.spacing_mm[2],
        # DICOM IOP: direction along a row (increasing column), then along a column (increasing row).
        image_orientation_patient=[*col_dir, *row_dir],
        image_position_patient=list(g.origin_lps),
        modality=modality,
        photometric_interpretation="RGB" if len(shape_kji) == 4 and shape_kji[3] == 3 else "MONOCHROME2",
        pixel_type=pixel_type,
        rescaled=rescaled,
        body_part=body_part,
        window_center=center,
        window_width=width,
    )


def volume_geometry_from_pb(geometry: pb.Geometry) -> VolumeGeometry:
    """The VolumeGeometry a contract Geometry describes (slice axis = cross(row, column cosines))."""
    iop = np.asarray(geometry.image_orientation_patient, dtype=float)
    if iop.shape != (6,) or len(geometry.image_position_patient) != 3:
        raise ValueError("Geometry needs 6 orientation cosines and 3 position coordinates.")
    col_dir, row_dir = iop[:3], iop[3:]
    slice_dir = np.cross(col_dir, row_dir)
    spacing = (
        geometry.slice_spacing_mm or 1.0,
        geometry.row_spacing_mm or 1.0,
        geometry.column_spacing_mm or 1.0,
    )
    return VolumeGeometry(
        origin_lps=tuple(float(v) for v in geometry.image_position_patient),  # type: ignore[arg-type]
        spacing_mm=tuple(float(v) for v in spacing),  # type: ignore[arg-type]
        axes_lps=tuple(tuple(float(x) for x in v) for v in (slice_dir, row_dir, col_dir)),  # type: ignore[arg-type]
    )


def ijk_to_ras_from_geometry(geometry: pb.Geometry) -> np.ndarray:
    """Slicer's 4x4 IJKToRAS for a contract Geometry (unknown spacings are taken as 1 mm)."""
    return ijk_to_ras_matrix(volume_geometry_from_pb(geometry))
