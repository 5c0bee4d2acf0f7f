from __future__ import annotations

import numpy as np
import pytest

from inference_service.backends.base import ModelConfig, WorkItem
from inference_service.backends.llava import LlavaBackend
from inference_service.types import AnalysisSpec, Geometry, TaskKind, Volume
from tests.unit.inference_service.tiny_checkpoints import build_llava, force_output

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning"
)


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> LlavaBackend:
    b = LlavaBackend(
        ModelConfig(
            name="sunmed-tiny", backend="llava", path=build_llava(tmp_path_factory.mktemp("llava") / "c")
        )
    )
    b.load()
    return b


def _item(language: str) -> WorkItem:
    img = np.random.default_rng(0).random((1, 64, 48)).astype(np.float32)
    vol = Volume(
        img, Geometry((1, 64, 48), (0, 0.2, 0.2), (1, 0, 0, 0, 1, 0), (0, 0, 0), "DX", rescaled=False)
    )
    return WorkItem(vol, AnalysisSpec("sunmed-tiny", (TaskKind.REPORT,), language=language))


def test_chinese_report_by_request(backend: LlavaBackend) -> None:
    force_output(backend, "所见：右侧少量胸腔积液。\n结论：胸腔积液。", "<eos>")
    (r,) = backend.run([_item("zh")], TaskKind.REPORT)
    assert r.report.language == "zh"
    assert (r.report.findings, r.report.impression) == ("右侧少量胸腔积液。", "胸腔积液。")
    assert r.prompt_id.startswith("sunmed-tiny:report_zh:")


def test_english_report_by_request(backend: LlavaBackend) -> None:
    force_output(backend, "Findings: Normal heart size.\nImpression: No acute disease.", "<eos>")
    (r,) = backend.run([_item("en")], TaskKind.REPORT)
    assert r.report.language == "en" and r.report.impression == "No acute disease."
    assert r.prompt_id.startswith("sunmed-tiny:report_en:")


def test_capabilities(backend: LlavaBackend) -> None:
    assert backend.tasks == {TaskKind.REPORT, TaskKind.VQA}
    assert backend.identity.backend == "llava" and len(backend.identity.weights_sha256) == 64
