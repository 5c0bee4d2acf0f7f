"""A real CT series -> node volume -> Med3DVLM (tiny, forced report) -> narrative SR, validated by dciodvfy."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import pytest

from dicom_node.results import ResultWriter
from dicom_node.volume import read_series
from inference_service.assembly import result_to_pb
from inference_service.backends.base import ModelConfig, WorkItem
from inference_service.backends.med3dvlm import Med3DVLMBackend
from inference_service.types import AnalysisResult, AnalysisSpec, Geometry, TaskKind, Volume
from radbridge.synth import ct_series, write_series
from tests.peers import assert_valid_dicom_object
from tests.unit.inference_service.tiny_checkpoints import MED3DVLM_TINY_SIZE, build_med3dvlm, force_output

pytestmark = [
    pytest.mark.integration,
    pytest.mark.usefixtures("require_dcmtk", "require_dicom3tools"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning"),
]


def test_med3dvlm_ct_report_becomes_a_valid_narrative_sr(tmp_path: Path) -> None:
    backend = Med3DVLMBackend(
        ModelConfig(
            name="med3dvlm-tiny",
            backend="med3dvlm",
            path=build_med3dvlm(tmp_path / "ckpt"),
            options={"size": list(MED3DVLM_TINY_SIZE), "max_new_tokens": 120, "version": "tiny-1"},
        )
    )
    backend.load()
    series = read_series(write_series(ct_series(n_slices=24), tmp_path / "ct"))
    g = Geometry(series.voxels.shape, series.spacing_mm, series.orientation, series.position, "CT", True)
    text = "Bilateral lungs are clear. No pleural effusion. The spine is intact."
    force_output(backend, text, "<eos>")
    (task,) = backend.run(
        [WorkItem(Volume(series.voxels, g), AnalysisSpec("m", (TaskKind.REPORT,)))], TaskKind.REPORT
    )
    assert task.report is not None and task.report.findings == text

    result = result_to_pb(AnalysisResult(backend.identity, [task]))
    objects = {o.kind: o.dataset for o in ResultWriter(series.sources, result, {}).build_all()}
    assert "narrative" in objects
    for kind, ds in objects.items():
        path = tmp_path / f"{kind}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert_valid_dicom_object(path)
    narrative = (tmp_path / "narrative.dcm").read_bytes()
    assert text.encode() in narrative
    assert backend.identity.weights_sha256.encode() in narrative  # model provenance, as for every backend
    assert b"med3dvlm" in narrative and b"tiny-1" in narrative
    sr = hd.sr.srread(tmp_path / "narrative.dcm")
    referenced = {i.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
                  for r in s.ReferencedSeriesSequence for i in r.ReferencedSOPSequence}  # fmt: skip
    assert referenced == {ds.SOPInstanceUID for ds in series.sources}
