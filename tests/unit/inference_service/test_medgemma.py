"""MedGemma backend on a tiny random Gemma 3 checkpoint, loaded through the production loader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from inference_service.backends.base import ModelConfig, WorkItem
from inference_service.backends.medgemma import MedGemmaBackend, prepare
from inference_service.errors import CheckpointError
from inference_service.preprocess import SquareFit
from inference_service.types import AnalysisSpec, Geometry, TaskKind, Volume
from tests.unit.inference_service.tiny_checkpoints import build_medgemma, force_output, to_pytorch_bin_shards

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning"
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_medgemma(tmp_path_factory.mktemp("medgemma"))


@pytest.fixture
def backend(checkpoint: Path) -> MedGemmaBackend:
    b = MedGemmaBackend(
        ModelConfig(
            name="medgemma-tiny",
            backend="medgemma",
            path=checkpoint,
            labels={"pleural effusion": ["60046008", "SCT", "Pleural effusion"]},
            options={"max_new_tokens": 120},
        )
    )
    b.load()
    return b


def _cxr(rows: int = 300, cols: int = 200) -> Volume:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 4096, size=(1, rows, cols)).astype(np.float32)
    g = Geometry((1, rows, cols), (0, 0.2, 0.2), (1, 0, 0, 0, 1, 0), (0, 0, 0), "CR", rescaled=False)
    return Volume(img, g)


def _run(backend: MedGemmaBackend, task: TaskKind, volume: Volume | None = None, **spec) -> object:  # noqa: ANN003
    item = WorkItem(volume or _cxr(), AnalysisSpec("medgemma-tiny", (task,), **spec))
    (result,) = backend.run([item], task)
    return result


def test_identity_carries_version_and_weights_checksum(backend: MedGemmaBackend) -> None:
    ident = backend.identity
    assert ident.backend == "medgemma" and len(ident.weights_sha256) == 64
    assert ident.weights_sha256[:12] in ident.version


def test_forced_report_is_split_into_findings_and_impression(backend: MedGemmaBackend) -> None:
    force_output(backend, "Findings: Small right pleural effusion.\nImpression: Effusion.", "<end_of_turn>")
    r = _run(backend, TaskKind.REPORT)
    assert r.report.findings == "Small right pleural effusion."
    assert r.report.impression == "Effusion."
    assert r.raw_output.startswith("Findings:") and r.prompt_id.startswith("medgemma-tiny:report:")


def test_forced_chinese_report(backend: MedGemmaBackend) -> None:
    force_output(backend, "所见：双肺纹理清晰，未见明确结节。\n结论：无异常。", "<end_of_turn>")
    r = _run(backend, TaskKind.REPORT, language="zh")
    assert r.report.language == "zh"
    assert r.report.findings == "双肺纹理清晰，未见明确结节。"
    assert r.report.impression == "无异常。"
    assert r.prompt_id.endswith("+zh")


def test_box_2d_lands_on_the_right_source_pixels(backend: MedGemmaBackend) -> None:
    rows, cols = 300, 200  # non-square: the model sees a centred zero-padded square
    fit = SquareFit(rows, cols, backend.image_size)
    target = (60.0, 40.0, 180.0, 150.0)  # r0, c0, r1, c1 in source pixels
    # Where that box sits on 0..1000 of the padded square:
    norm = [
        round((v + pad) / fit.side * 1000)
        for v, pad in zip(target, (fit.pad_top, fit.pad_left) * 2, strict=True)
    ]
    force_output(
        backend,
        f'```json\n[{{"box_2d": [{norm[0]}, {norm[1]}, {norm[2]}, {norm[3]}], "label": "pleural effusion"}}]\n```',
        "<end_of_turn>",
    )
    r = _run(backend, TaskKind.DETECT, volume=_cxr(rows, cols))
    (box,) = r.boxes
    got = (box.row_min, box.column_min, box.row_max, box.column_max)
    assert got == pytest.approx(target, abs=fit.side / 1000)
    assert box.finding.value == "60046008"  # coded from the model's label vocabulary


@pytest.mark.parametrize("text", ['[{"box_2d": [1, 2, 3]}]', '{"box_2d": [10, 20, 30, 4', "no boxes here"])
def test_malformed_box_output_is_unparsed_not_a_crash(backend: MedGemmaBackend, text: str) -> None:
    force_output(backend, text, "<end_of_turn>")
    r = _run(backend, TaskKind.DETECT)
    assert r.unparsed and r.raw_output == text and not r.boxes


def test_empty_report_is_unparsed(backend: MedGemmaBackend) -> None:
    force_output(backend, "", "<end_of_turn>")
    r = _run(backend, TaskKind.REPORT)
    assert r.unparsed and r.report is None


def test_classification_scores_are_probabilities(backend: MedGemmaBackend) -> None:
    backend.logits_processors = []
    r = _run(backend, TaskKind.CLASSIFY, labels=("pleural effusion", "nodule"))
    assert [f.label for f in r.findings] == ["pleural effusion", "nodule"]
    assert all(0.0 <= f.score <= 1.0 for f in r.findings)
    assert r.findings[0].finding.value == "60046008"
    assert r.findings[1].finding.scheme == "99RADBRIDGE"


def test_text_equals_plain_transformers_greedy_generate(backend: MedGemmaBackend, checkpoint: Path) -> None:
    """No fidelity lost in the bridge: same input, same tokens as a plain generate."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    backend.logits_processors = []
    volume = _cxr()
    r = _run(backend, TaskKind.VQA, volume=volume, question="Is the heart enlarged?")
    ours = backend.last_generated_ids[0].tolist()

    processor = AutoProcessor.from_pretrained(checkpoint, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(
        checkpoint, local_files_only=True, dtype=torch.float32
    ).eval()
    image = prepare(volume, backend.image_size).images[0]
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is the heart enlarged?"}]}
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[[image]], return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=120, do_sample=False)
    plain = out[0, inputs["input_ids"].shape[1] :].tolist()
    assert ours == plain
    assert r.answer == processor.tokenizer.decode(plain, skip_special_tokens=True).strip()


def test_batched_generation_equals_one_at_a_time(backend: MedGemmaBackend) -> None:
    backend.logits_processors = []
    vols = [_cxr(300, 200), _cxr(200, 260)]
    items = [
        WorkItem(v, AnalysisSpec("m", (TaskKind.VQA,), question=q))
        for v, q in zip(vols, ["Effusion?", "Is there a pneumothorax here?"], strict=True)
    ]
    batched = [r.answer for r in backend.run(items, TaskKind.VQA)]
    single = [backend.run([i], TaskKind.VQA)[0].answer for i in items]
    assert batched == single


def test_sharded_checkpoint_loads(tmp_path: Path) -> None:
    path = build_medgemma(tmp_path / "sharded", max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").exists()
    b = MedGemmaBackend(ModelConfig(name="m", backend="medgemma", path=path))
    b.load()
    assert b.identity.weights_sha256


def test_older_pytorch_bin_sharded_layout_loads_the_same_weights(tmp_path: Path) -> None:
    import shutil

    from transformers import AutoModelForImageTextToText

    new = build_medgemma(tmp_path / "new")
    reference = AutoModelForImageTextToText.from_pretrained(new, local_files_only=True).state_dict()
    old = tmp_path / "old"
    shutil.copytree(new, old)
    to_pytorch_bin_shards(old)
    assert not (old / "model.safetensors").exists() and (old / "pytorch_model.bin.index.json").exists()
    b = MedGemmaBackend(ModelConfig(name="m", backend="medgemma", path=old))
    b.load()
    loaded = b.model.state_dict()
    assert loaded.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(loaded[key], value), key


@pytest.mark.parametrize(
    "missing", ["config.json", "model.safetensors", "tokenizer.json", "processor_config.json"]
)
def test_missing_checkpoint_file_is_named_at_load(tmp_path: Path, checkpoint: Path, missing: str) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    (broken / missing).unlink()
    if missing == "tokenizer.json":
        (broken / "tokenizer_config.json").unlink()
    b = MedGemmaBackend(ModelConfig(name="m", backend="medgemma", path=broken))
    with pytest.raises(CheckpointError, match=missing.split(".")[0].split("_")[0]):
        b.load()


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        MedGemmaBackend(ModelConfig(name="m", backend="medgemma", path=tmp_path / "nope")).load()


def test_ct_series_goes_in_as_sampled_three_window_slices(backend: MedGemmaBackend) -> None:
    from radbridge.synth import phantom_hu

    hu = phantom_hu(100).astype(np.float32)
    vol = Volume(hu, Geometry(hu.shape, (2.5, 0.7, 0.7), (1, 0, 0, 0, 1, 0), (0, 0, 0), "CT"))
    prepared = prepare(vol, backend.image_size)
    assert len(prepared.images) == 85 and prepared.fit is None
    rgb = np.asarray(prepared.images[40])
    assert rgb.shape == (backend.image_size, backend.image_size, 3)
    assert not np.array_equal(rgb[..., 0], rgb[..., 1])  # different windows per channel
    inputs = backend.build_inputs([prepared], ["Describe"])
    assert inputs["pixel_values"].shape[0] == 85  # one image per slice, one turn


def test_choice_among_labels_scores_each_label_answer(backend: MedGemmaBackend) -> None:
    """Label-set classification: batched (left-padded) scores equal each label scored alone."""
    import dataclasses

    backend.config = dataclasses.replace(
        backend.config, options={**backend.config.options, "classify_mode": "choice"}
    )
    labels = ("pleural effusion", "normal", "pneumothorax")
    r = _run(backend, TaskKind.CLASSIFY, labels=labels)
    assert [f.label for f in r.findings] == list(labels)
    assert sum(f.score for f in r.findings) == pytest.approx(1.0, abs=1e-3)
    assert sum(f.present for f in r.findings) == 1
    prep = prepare(_cxr(), backend.image_size)
    prompt = "Which one of the following best describes this image: pleural effusion, normal, pneumothorax? Answer with exactly one of them."
    batched = backend.label_log_probs(prep, prompt, labels)
    alone = [backend.label_log_probs(prep, prompt, [label])[0] for label in labels]
    assert batched == pytest.approx(alone, abs=1e-4)
    best = max(range(3), key=lambda i: alone[i])
    assert r.findings[best].present and r.findings[0].finding.value == "60046008"
