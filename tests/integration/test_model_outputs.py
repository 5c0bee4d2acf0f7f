"""Forced model output -> parse -> geometry inverse -> SR on the real CR, validated by dciodvfy."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import pytest

from dicom_node.results import ResultWriter
from dicom_node.volume import read_series
from inference_service.assembly import result_to_pb
from inference_service.backends.base import ModelConfig, WorkItem
from inference_service.backends.medgemma import MedGemmaBackend
from inference_service.preprocess import SquareFit
from inference_service.types import AnalysisResult, AnalysisSpec, Geometry, TaskKind, Volume
from radbridge.synth import cr_chest_path
from tests.peers import assert_valid_dicom_object
from tests.unit.inference_service.tiny_checkpoints import build_medgemma, force_output

pytestmark = [
    pytest.mark.integration,
    pytest.mark.usefixtures("require_dcmtk", "require_dicom3tools"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning"),
]


def test_medgemma_box_and_report_become_valid_srs_on_the_cr(tmp_path: Path) -> None:
    backend = MedGemmaBackend(
        ModelConfig(
            name="medgemma-tiny",
            backend="medgemma",
            path=build_medgemma(tmp_path / "ckpt"),
            labels={"pleural effusion": ["60046008", "SCT", "Pleural effusion"]},
        )
    )
    backend.load()
    series = read_series([cr_chest_path()])
    g = Geometry(series.voxels.shape, series.spacing_mm, series.orientation, series.position, "CR", False)
    volume = Volume(series.voxels, g)
    fit = SquareFit(g.shape[1], g.shape[2], backend.image_size)
    target = (1000.0, 200.0, 1500.0, 800.0)  # rows/cols on the 1955x1841 source
    norm = [
        round((v + p) / fit.side * 1000) for v, p in zip(target, (fit.pad_top, fit.pad_left) * 2, strict=True)
    ]

    results = []
    force_output(backend, f'[{{"box_2d": {norm}, "label": "pleural effusion"}}]', "<end_of_turn>")
    results += backend.run([WorkItem(volume, AnalysisSpec("m", (TaskKind.DETECT,)))], TaskKind.DETECT)
    force_output(
        backend,
        "Findings: Blunted right costophrenic angle.\nImpression: Small right pleural effusion.",
        "<end_of_turn>",
    )
    results += backend.run([WorkItem(volume, AnalysisSpec("m", (TaskKind.REPORT,)))], TaskKind.REPORT)
    force_output(backend, "所见：右侧少量胸腔积液。\n结论：胸腔积液。", "<end_of_turn>")
    results += backend.run(
        [WorkItem(volume, AnalysisSpec("m", (TaskKind.REPORT,), language="zh"))], TaskKind.REPORT
    )
    result = result_to_pb(AnalysisResult(backend.identity, results))

    objects = {o.kind: o.dataset for o in ResultWriter(series.sources, result, {}).build_all()}
    for kind, ds in objects.items():
        path = tmp_path / f"{kind}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert_valid_dicom_object(path)

    sr = hd.sr.srread(tmp_path / "measurements.dcm")
    (group,) = sr.content.get_planar_roi_measurement_groups()
    points = group.roi.value  # (x=column, y=row) pairs of the closed polyline
    cols, rows = points[:, 0], points[:, 1]
    tol = fit.side / 1000
    assert rows.min() == pytest.approx(target[0], abs=tol) and rows.max() == pytest.approx(target[2], abs=tol)
    assert cols.min() == pytest.approx(target[1], abs=tol) and cols.max() == pytest.approx(target[3], abs=tol)
    assert (
        group.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        == series.sources[0].SOPInstanceUID
    )
    narrative = (tmp_path / "narrative.dcm").read_bytes()
    assert "右侧少量胸腔积液".encode() in narrative
    assert backend.identity.weights_sha256.encode() in narrative


def test_paligemma_loc_seg_tokens_become_a_valid_seg_on_the_right_pixels(tmp_path: Path) -> None:
    import numpy as np

    from inference_service.backends.paligemma import PaliGemmaBackend
    from tests.unit.inference_service.tiny_checkpoints import build_paligemma, write_constant_npz

    backend = PaliGemmaBackend(
        ModelConfig(
            name="pali-tiny",
            backend="paligemma",
            path=build_paligemma(tmp_path / "pali"),
            labels={"effusion": ["60046008", "SCT", "Pleural effusion"]},
            options={"vae_path": str(write_constant_npz(tmp_path / "vae.npz", 1.0)), "max_new_tokens": 40},
        )
    )
    backend.load()
    series = read_series([cr_chest_path()])
    g = Geometry(series.voxels.shape, series.spacing_mm, series.orientation, series.position, "CR", False)
    fit = SquareFit(g.shape[1], g.shape[2], backend.image_size)
    target = (1000.0, 200.0, 1500.0, 800.0)
    bins = [
        min(round((v + p) / fit.side * 1024), 1023)
        for v, p in zip(target, (fit.pad_top, fit.pad_left) * 2, strict=True)
    ]
    text = "".join(f"<loc{b:04d}>" for b in bins) + "".join(f"<seg{i:03d}>" for i in range(16)) + " effusion"
    force_output(backend, text, "<eos>")
    (task,) = backend.run(
        [WorkItem(Volume(series.voxels, g), AnalysisSpec("p", (TaskKind.SEGMENT,)))], TaskKind.SEGMENT
    )
    result = result_to_pb(AnalysisResult(backend.identity, [task]))
    masks = {m.segment_number: m.voxels for m in task.masks}

    objects = {o.kind: o.dataset for o in ResultWriter(series.sources, result, masks).build_all()}
    assert set(objects) == {"seg", "measurements", "keyslices"}
    for kind, ds in objects.items():
        path = tmp_path / f"pali-{kind}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert_valid_dicom_object(path)
    seg = hd.seg.segread(tmp_path / "pali-seg.dcm")
    pixels = seg.get_pixels_by_source_instance([series.sources[0].SOPInstanceUID], segment_numbers=[1])[
        0, ..., 0
    ]
    rows, cols = np.flatnonzero(pixels.any(axis=1)), np.flatnonzero(pixels.any(axis=0))
    tol = fit.side / 1024 + 1
    assert rows[0] == pytest.approx(target[0], abs=tol) and rows[-1] + 1 == pytest.approx(target[2], abs=tol)
    assert cols[0] == pytest.approx(target[1], abs=tol) and cols[-1] + 1 == pytest.approx(target[3], abs=tol)
    assert seg.get_segment_description(1).segmented_property_type.value == "60046008"
