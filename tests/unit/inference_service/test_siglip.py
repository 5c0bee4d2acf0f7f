from __future__ import annotations

import numpy as np
import pytest
import torch

from inference_service.backends.base import ModelConfig, WorkItem
from inference_service.backends.siglip import MAX_TEXT_TOKENS, SiglipBackend
from inference_service.types import AnalysisSpec, Geometry, TaskKind, Volume
from tests.unit.inference_service.tiny_checkpoints import build_siglip

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning"
)


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> SiglipBackend:
    path = build_siglip(tmp_path_factory.mktemp("siglip") / "ckpt")
    b = SiglipBackend(
        ModelConfig(name="medsiglip-tiny", backend="siglip", path=path,
                    labels={"effusion": ["60046008", "SCT", "Pleural effusion"], "nodule": ["27925004", "SCT", "Nodule"]})
    )  # fmt: skip
    b.load()
    return b


def _cr(seed: int = 0) -> Volume:
    img = np.random.default_rng(seed).integers(0, 4000, (1, 90, 60)).astype(np.float32)
    return Volume(
        img, Geometry((1, 90, 60), (0, 0.2, 0.2), (1, 0, 0, 0, 1, 0), (0, 0, 0), "CR", rescaled=False)
    )


def test_zero_shot_scores_equal_sigmoid_of_the_model_logits(backend: SiglipBackend) -> None:
    (r,) = backend.run([WorkItem(_cr(), AnalysisSpec("m", (TaskKind.CLASSIFY,)))], TaskKind.CLASSIFY)
    assert [f.finding.value for f in r.findings] == ["60046008", "27925004"]
    texts = ["a chest X-ray showing effusion", "a chest X-ray showing nodule"]
    tokens = backend.processor.tokenizer(
        texts, padding="max_length", max_length=MAX_TEXT_TOKENS, return_tensors="pt"
    )
    assert tokens["input_ids"].shape[1] == 64
    pixels = backend.processor(images=[backend._image(_cr())], return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        logits = backend.model(input_ids=tokens["input_ids"], pixel_values=pixels).logits_per_image
    expected = torch.sigmoid(logits)[0].tolist()
    assert [f.score for f in r.findings] == pytest.approx(expected, abs=1e-4)


def test_embeddings_are_unit_vectors_and_differ_per_image(backend: SiglipBackend) -> None:
    items = [WorkItem(_cr(s), AnalysisSpec("m", (TaskKind.EMBED,))) for s in (0, 1)]
    a, b = backend.run(items, TaskKind.EMBED)
    assert len(a.embedding) == 32
    assert np.linalg.norm(a.embedding) == pytest.approx(1.0, abs=1e-5)
    assert not np.allclose(a.embedding, b.embedding)


def test_embedding_travels_over_grpc_messages(backend: SiglipBackend) -> None:
    from inference_service.assembly import task_result_to_pb

    (r,) = backend.run([WorkItem(_cr(), AnalysisSpec("m", (TaskKind.EMBED,)))], TaskKind.EMBED)
    msg = task_result_to_pb(r)
    assert list(msg.embedding) == pytest.approx(r.embedding, abs=1e-6)


def test_label_text_embeddings_are_computed_once_per_label_set(backend: SiglipBackend) -> None:
    """A batch runs the image tower once and the text tower once per label set; scores as one by one."""
    calls: list[str] = []
    real_text, real_image = backend.model.get_text_features, backend.model.get_image_features
    backend.model.get_text_features = lambda **kw: calls.append("text") or real_text(**kw)  # type: ignore[method-assign]
    backend.model.get_image_features = lambda **kw: calls.append("image") or real_image(**kw)  # type: ignore[method-assign]
    try:
        backend._text.clear()
        items = [WorkItem(_cr(), AnalysisSpec("m", (TaskKind.CLASSIFY,), labels=("effusion", lb))) for lb in
                 ("nodule", "nodule", "pneumothorax")]  # fmt: skip
        batch = backend.run(items, TaskKind.CLASSIFY)
        assert calls.count("image") == 1 and calls.count("text") == 2
        again = [backend.run([item], TaskKind.CLASSIFY)[0] for item in items]
        assert calls.count("text") == 2  # both label sets came from the cache
    finally:
        del backend.model.get_text_features, backend.model.get_image_features
    assert [[f.score for f in r.findings] for r in batch] == [[f.score for f in r.findings] for r in again]
