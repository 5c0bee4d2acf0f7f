"""PaliGemma backend on a tiny random checkpoint: loc boxes and seg masks land on source pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from inference_service.backends.base import ModelConfig, WorkItem
from inference_service.backends.paligemma import PaliGemmaBackend
from inference_service.preprocess import SquareFit
from inference_service.types import AnalysisSpec, Geometry, TaskKind, Volume
from tests.unit.inference_service.tiny_checkpoints import build_paligemma, force_output, write_constant_npz

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning"
)
ROWS, COLS = 240, 320


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_paligemma(tmp_path_factory.mktemp("pali"))


def _backend(checkpoint: Path, vae: Path | None) -> PaliGemmaBackend:
    options = {"vae_path": str(vae)} if vae else {}
    b = PaliGemmaBackend(
        ModelConfig(
            name="pali-tiny",
            backend="paligemma",
            path=checkpoint,
            labels={"effusion": ["60046008", "SCT", "Pleural effusion"]},
            options={**options, "max_new_tokens": 60},
        )
    )
    b.load()
    return b


def _dx() -> Volume:
    img = np.random.default_rng(1).integers(0, 1000, (1, ROWS, COLS)).astype(np.float32)
    return Volume(
        img, Geometry((1, ROWS, COLS), (0, 0.15, 0.15), (1, 0, 0, 0, 1, 0), (0, 0, 0), "DX", rescaled=False)
    )


def _loc(fit: SquareFit, r0: float, c0: float, r1: float, c1: float) -> str:
    bins = [
        min(int(round((v + pad) / fit.side * 1024)), 1023)
        for v, pad in zip((r0, c0, r1, c1), (fit.pad_top, fit.pad_left) * 2, strict=True)
    ]
    return "".join(f"<loc{b:04d}>" for b in bins)


def _run(b: PaliGemmaBackend, task: TaskKind, **spec):  # noqa: ANN003, ANN202
    (r,) = b.run([WorkItem(_dx(), AnalysisSpec("pali-tiny", (task,), **spec))], task)
    return r


def test_detect_loc_tokens_to_source_box(checkpoint: Path) -> None:
    b = _backend(checkpoint, None)
    fit = SquareFit(ROWS, COLS, b.image_size)
    force_output(
        b, _loc(fit, 50, 60, 150, 200) + " effusion ; " + _loc(fit, 10, 10, 40, 90) + " nodule", "<eos>"
    )
    r = _run(b, TaskKind.DETECT, labels=("effusion", "nodule"))
    assert [x.label for x in r.boxes] == ["effusion", "nodule"]
    tol = fit.side / 1024 + 1e-6
    first = r.boxes[0]
    assert (first.row_min, first.column_min, first.row_max, first.column_max) == pytest.approx(
        (50, 60, 150, 200), abs=tol
    )
    assert first.finding.value == "60046008"
    assert r.prompt_id.startswith("pali-tiny:detect:")
    assert "<loc" in r.raw_output


def test_segment_mask_fills_its_box_on_the_source(checkpoint: Path, tmp_path: Path) -> None:
    b = _backend(checkpoint, write_constant_npz(tmp_path / "vae.npz", 1.0))
    fit = SquareFit(ROWS, COLS, b.image_size)
    seg = "".join(f"<seg{i:03d}>" for i in range(16))
    force_output(b, _loc(fit, 50, 60, 150, 200) + seg + " effusion", "<eos>")
    r = _run(b, TaskKind.SEGMENT, labels=("effusion",))
    (mask,) = r.masks
    assert mask.voxels.shape == (1, ROWS, COLS) and mask.segment_number == 1
    rows = np.flatnonzero(mask.voxels[0].any(axis=1))
    cols = np.flatnonzero(mask.voxels[0].any(axis=0))
    tol = fit.side / 1024 + 1
    assert rows[0] == pytest.approx(50, abs=tol) and rows[-1] + 1 == pytest.approx(150, abs=tol)
    assert cols[0] == pytest.approx(60, abs=tol) and cols[-1] + 1 == pytest.approx(200, abs=tol)
    assert mask.voxels.sum() == (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)  # the whole box


def test_negative_map_gives_an_empty_mask(checkpoint: Path, tmp_path: Path) -> None:
    b = _backend(checkpoint, write_constant_npz(tmp_path / "vae.npz", -1.0))
    fit = SquareFit(ROWS, COLS, b.image_size)
    force_output(
        b, _loc(fit, 50, 60, 150, 200) + "".join(f"<seg{i:03d}>" for i in range(16)) + " effusion", "<eos>"
    )
    (mask,) = _run(b, TaskKind.SEGMENT).masks
    assert not mask.voxels.any()


@pytest.mark.parametrize(
    "text", ["<loc0100><loc0200> effusion", "<loc0100><loc0200><loc0300><loc0400><seg001> x", ""]
)
def test_malformed_tokens_are_unparsed(checkpoint: Path, tmp_path: Path, text: str) -> None:
    b = _backend(checkpoint, write_constant_npz(tmp_path / "vae.npz", 1.0))
    force_output(b, text, "<eos>")
    r = _run(b, TaskKind.SEGMENT)
    assert r.unparsed and not r.masks and r.raw_output == text


def test_report_and_classify_prompts(checkpoint: Path) -> None:
    b = _backend(checkpoint, None)
    force_output(b, "Findings: Clear lungs.\nImpression: Normal.", "<eos>")
    r = _run(b, TaskKind.REPORT)
    assert r.report.findings == "Clear lungs." and r.report.impression == "Normal."
    force_output(b, "effusion", "<eos>")
    r = _run(b, TaskKind.CLASSIFY)
    (finding,) = r.findings
    assert finding.finding.value == "60046008" and finding.label == "effusion"
    assert TaskKind.SEGMENT not in b.tasks  # no decoder configured
