"""Pure-Python core of the RadBridge Slicer extension; it never imports slicer, qt or vtk."""

from .client import (
    TASKS,
    AnalysisResult,
    RadBridgeCancelled,
    RadBridgeClient,
    RadBridgeError,
    RadBridgeServerError,
)
from .geometry import (
    VolumeGeometry,
    canonical_slice_order,
    geometry_from_ijk_to_ras,
    ijk_to_index,
    ijk_to_ras,
    ijk_to_ras_from_geometry,
    ijk_to_ras_matrix,
    index_to_ijk,
    lps_to_ras,
    ras_to_ijk,
    ras_to_lps,
    volume_geometry_from_pb,
)

__all__ = [
    "TASKS",
    "AnalysisResult",
    "RadBridgeCancelled",
    "RadBridgeClient",
    "RadBridgeError",
    "RadBridgeServerError",
    "VolumeGeometry",
    "canonical_slice_order",
    "geometry_from_ijk_to_ras",
    "ijk_to_index",
    "ijk_to_ras",
    "ijk_to_ras_from_geometry",
    "ijk_to_ras_matrix",
    "index_to_ijk",
    "lps_to_ras",
    "ras_to_ijk",
    "ras_to_lps",
    "volume_geometry_from_pb",
]
