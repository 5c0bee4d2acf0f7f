"""The reference backend run in-process and shaped as the node's gRPC client shapes its outcome.

For tests of the writers and of the converters that read their objects: the real analysis
without a server in between (the gRPC path has its own tests).
"""

from __future__ import annotations

from dicom_node.client import AnalysisOutcome
from dicom_node.volume import SeriesVolume
from inference_service.assembly import result_to_pb
from inference_service.backends.base import ModelConfig, WorkItem
from inference_service.backends.reference import ReferenceBackend
from inference_service.types import AnalysisResult, AnalysisSpec, Geometry, TaskKind, Volume


def analyze_reference(vol: SeriesVolume) -> AnalysisOutcome:
    """Segment, report and detect on ``vol`` with the reference backend."""
    backend = ReferenceBackend(ModelConfig("reference", "reference"))
    g = Geometry(vol.voxels.shape, vol.spacing_mm, vol.orientation, vol.position, vol.modality, vol.rescaled)
    item = WorkItem(
        Volume(vol.voxels, g), AnalysisSpec("", (TaskKind.SEGMENT, TaskKind.REPORT, TaskKind.DETECT))
    )
    tasks = [backend.run([item], t)[0] for t in item.spec.tasks]
    masks = {m.segment_number: m.voxels for t in tasks for m in t.masks}
    return AnalysisOutcome(result_to_pb(AnalysisResult(backend.identity, tasks)), masks)
