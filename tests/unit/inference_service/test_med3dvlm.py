"""Med3DVLM: tiny checkpoints in the published layout through the production loader, the splice,
the real-size shapes, and the contrastive pair."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from inference_service.backends.base import ModelConfig, WorkItem
from inference_service.backends.med3dvlm import Med3DVLMBackend
from inference_service.backends.med3dvlm_modeling import (
    DualStreamMixerProjector,
    Med3DVLMConfig,
    Med3DVLMForCausalLM,
    VisionTower,
)
from inference_service.errors import CheckpointError, InvalidInput, UnsupportedTask
from inference_service.types import AnalysisSpec, Geometry, TaskKind, Volume
from tests.unit.inference_service.tiny_checkpoints import (
    MED3DVLM_TINY_SIZE,
    build_med3dvlm,
    build_med3dvlm_clip,
    force_output,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning"
)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("med3dvlm")
    return build_med3dvlm(root / "vlm"), build_med3dvlm_clip(root / "clip")


def _config(vlm: Path, clip: Path | None = None, **options: object) -> ModelConfig:
    opts: dict[str, object] = {"size": list(MED3DVLM_TINY_SIZE), "max_new_tokens": 80, **options}
    if clip is not None:
        opts["clip_path"] = str(clip)
    return ModelConfig(
        name="med3dvlm-tiny",
        backend="med3dvlm",
        path=vlm,
        options=opts,
        labels={"pleural effusion": ["60046008", "SCT", "Pleural effusion"]},
    )


@pytest.fixture(scope="module")
def backend(checkpoints: tuple[Path, Path]) -> Med3DVLMBackend:
    b = Med3DVLMBackend(_config(*checkpoints))
    b.load()
    return b


def _ct(seed: int = 0, shape: tuple[int, int, int] = (40, 60, 50)) -> Volume:
    """A body box of soft tissue with a bright block whose place depends on the seed."""
    rng = np.random.default_rng(seed)
    vox = np.full(shape, -1000.0, dtype=np.float32)
    vox[4:36, 6:54, 5:45] = rng.normal(40.0, 20.0, (32, 48, 40)).astype(np.float32)
    s, r, c = (int(v) for v in rng.integers(4, 20, 3))
    vox[s : s + 14, r : r + 20, c : c + 16] = 900.0
    return Volume(vox, Geometry(shape, (2.5, 0.7, 0.7), (1, 0, 0, 0, 1, 0), (0, 0, 0), "CT"))


def _item(volume: Volume, task: TaskKind, **spec: object) -> WorkItem:
    return WorkItem(volume, AnalysisSpec("med3dvlm-tiny", (task,), **spec))  # type: ignore[arg-type]


# -- loading the published layout -----------------------------------------------------
def test_loads_offline_through_auto_classes(backend: Med3DVLMBackend) -> None:
    assert isinstance(backend.model, Med3DVLMForCausalLM)  # AutoModelForCausalLM chose our class
    assert backend.model.config.model_type == "vlm_qwen"
    tok = backend.processor.tokenizer
    assert backend.model.config.image_token_id == tok.convert_tokens_to_ids("<im_patch>")
    assert backend.identity.backend == "med3dvlm" and len(backend.identity.weights_sha256) == 64
    assert backend.tasks == {TaskKind.REPORT, TaskKind.VQA, TaskKind.EMBED, TaskKind.CLASSIFY}
    assert backend.modalities == {"CT"} and backend.max_batch == 1  # CPU: one CT per pass


def test_forced_report(backend: Med3DVLMBackend) -> None:
    text = "The liver is enlarged with a 3 cm hypodense lesion in segment 7."
    force_output(backend, text, "<eos>")
    (r,) = backend.run([_item(_ct(), TaskKind.REPORT)], TaskKind.REPORT)
    assert not r.unparsed and r.report is not None
    assert r.report.findings == text and r.report.impression == "" and r.report.language == "en"
    assert r.prompt_id.startswith("med3dvlm-tiny:report:") and r.raw_output == text


def test_forced_vqa_and_question_required(backend: Med3DVLMBackend) -> None:
    force_output(backend, "Liver", "<eos>")
    (r,) = backend.run([_item(_ct(), TaskKind.VQA, question="Which organ is abnormal?")], TaskKind.VQA)
    assert r.answer == "Liver" and r.prompt_id == "med3dvlm-tiny:vqa"
    with pytest.raises(InvalidInput, match="VQA needs a question"):
        backend.run([_item(_ct(), TaskKind.VQA)], TaskKind.VQA)


def test_refuses_non_ct(backend: Med3DVLMBackend) -> None:
    mr = Volume(
        np.zeros((4, 8, 8), np.float32), Geometry((4, 8, 8), (1, 1, 1), (1, 0, 0, 0, 1, 0), (0, 0, 0), "MR")
    )
    with pytest.raises(UnsupportedTask, match="CT volumes only"):
        backend.run([_item(mr, TaskKind.REPORT)], TaskKind.REPORT)


def test_batched_generation_equals_one_at_a_time(backend: Med3DVLMBackend) -> None:
    """Two CTs in one forward pass (left-padded prompts of different lengths) = each alone."""
    backend.logits_processors = []
    items = [
        _item(_ct(1), TaskKind.VQA, question="Is there a mass?"),
        _item(_ct(2), TaskKind.VQA, question="Where?"),
    ]
    together = [r.answer for r in backend.run(items, TaskKind.VQA)]
    alone = [backend.run([i], TaskKind.VQA)[0].answer for i in items]
    assert together == alone


def test_the_image_conditions_the_answer(backend: Med3DVLMBackend) -> None:
    model = backend.model
    prep = [backend.prepare(_item(_ct(s), TaskKind.REPORT)) for s in (1, 2)]
    inputs = backend.build_inputs(["Describe.", "Describe."], prep)
    with torch.no_grad():
        logits = model(input_ids=inputs["input_ids"], images=inputs["images"]).logits[:, -1]
        text_only = model(input_ids=inputs["input_ids"]).logits[:, -1]
    assert not torch.allclose(logits[0], logits[1])  # a different CT, a different next token distribution
    assert not torch.allclose(logits[0], text_only[0])


# -- the splice, with hand-set weights ------------------------------------------------
def test_splice_puts_visual_tokens_exactly_on_the_placeholders(backend: Med3DVLMBackend) -> None:
    config = Med3DVLMConfig(**backend.model.config.to_dict())
    model = Med3DVLMForCausalLM(config).eval()
    hidden, n = config.hidden_size, config.proj_out_num
    p, pad = config.image_token_id, 0
    with torch.no_grad():  # embedding row i is the constant i
        model.model.embed_tokens.weight.copy_(
            torch.arange(config.vocab_size, dtype=torch.float32)[:, None].expand(-1, hidden)
        )
    features = 1000.0 + torch.arange(2 * n * hidden, dtype=torch.float32).reshape(2, n, hidden)
    ids = torch.tensor(
        [
            [pad, pad, 50, *[p] * n, 60, 61],  # left padding, text before and after
            [40, 43, 44, *[p] * (n // 2), 41, *[p] * (n - n // 2), 42],  # need not be contiguous
        ]
    )
    with torch.no_grad():
        embeds = model.splice(ids, features)
    for row in range(2):
        where = (ids[row] == p).nonzero().flatten()
        assert torch.equal(embeds[row, where], features[row])  # in order, every one
        others = (ids[row] != p).nonzero().flatten()
        assert torch.equal(embeds[row, others, 0], ids[row, others].float())  # text embeddings untouched
    with pytest.raises(ValueError, match=f"exactly {n} image placeholder tokens; got \\[{n - 1}"):
        model.splice(torch.cat([ids[:1, :3], ids[:1, 4:]], dim=1), features[:1])  # one placeholder short


def test_forward_with_images_is_the_splice_of_encoded_images(backend: Med3DVLMBackend) -> None:
    model = backend.model
    prep = [backend.prepare(_item(_ct(3), TaskKind.REPORT))]
    inputs = backend.build_inputs([" Where?"], prep)
    with torch.no_grad():
        via_images = model(input_ids=inputs["input_ids"], images=inputs["images"]).logits
        embeds = model.splice(inputs["input_ids"], model.encode_images(inputs["images"]))
        via_embeds = model(inputs_embeds=embeds).logits
    assert torch.allclose(via_images, via_embeds, atol=1e-5)


# -- the real-size architecture ---------------------------------------------------------
def test_real_size_encoder_and_projector_give_256_tokens_of_the_lm_width() -> None:
    """128x256x256 -> DCFormer-small (s3: 256 x 384, s4: 32 x 768) -> 256 x 3584 (Qwen2.5-7B's width).

    Real arithmetic on the CPU, batch 1, float32: about 2 s and under 1 GiB.
    """
    config = Med3DVLMConfig(hidden_size=3584)
    tower = VisionTower(config).eval()
    projector = DualStreamMixerProjector(
        config.low_input_size, config.low_output_size, config.high_input_size, config.high_output_size, 3584
    )
    with torch.inference_mode():
        low, high = tower(torch.rand(1, 1, 128, 256, 256))
        tokens = projector([low, high])
    assert tuple(low.shape) == (1, 256, 384) and tuple(high.shape) == (1, 32, 768)
    assert tuple(tokens.shape) == (1, 256, 3584) and bool(torch.isfinite(tokens).all())


#: Published module names (mirthAI/Med3DVLM: VLMQwenForCausalLM -> model.vision_tower.vision_tower =
#: DecompModel "small", model.mm_projector = MixerLowHighHybridMLP), one per kind of weight.
PUBLISHED_KEYS = (
    "model.embed_tokens.weight",
    "lm_head.weight",
    "model.vision_tower.vision_tower.encoder.s0.0.0.c1.0.weight",
    "model.vision_tower.vision_tower.encoder.s0.0.0.c1.1.running_var",
    "model.vision_tower.vision_tower.encoder.s0.0.3.c3.1.num_batches_tracked",
    "model.vision_tower.vision_tower.encoder.s1.0.proj.weight",
    "model.vision_tower.vision_tower.encoder.s1.1.dwconv.c2.0.bias",
    "model.vision_tower.vision_tower.encoder.s3.5.mlp.mlp.3.weight",
    "model.vision_tower.vision_tower.encoder.s4.1.scale",
    "model.mm_projector.low_mixer.0.ln1.weight",
    "model.mm_projector.low_mixer.1.mlp1.mm_projector.0.weight",
    "model.mm_projector.high_mixer.1.mlp2.mm_projector.1.1.bias",
)


def test_key_names_are_the_published_layout() -> None:
    config = Med3DVLMConfig(
        hidden_size=3584, intermediate_size=16, num_hidden_layers=1, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=16,
    )  # fmt: skip
    with torch.device("meta"):
        keys = set(Med3DVLMForCausalLM(config).state_dict())
    assert set(PUBLISHED_KEYS) <= keys
    vision = [k for k in keys if k.startswith("model.vision_tower.")]
    projector = [k for k in keys if k.startswith("model.mm_projector.")]
    # stem 4 decomposed convs x 3 branches x (conv w, b + BN w, b, mean, var, count) = 84;
    # 13 blocks x (21 dwconv + 4 mlp + 1 scale) + 4 stage projections = 342; 4 mixer layers x 12 = 48.
    assert (len(vision), len(projector)) == (84 + 342, 48)


def test_a_renamed_key_is_named_at_load(tmp_path: Path) -> None:
    path = build_med3dvlm(tmp_path / "vlm")
    weights = load_file(path / "model.safetensors")
    old = "model.mm_projector.low_mixer.0.ln1.weight"
    weights["model.mm_projector.low_mixer.0.norm1.weight"] = weights.pop(old)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"missing weight {old}.*unexpected weight .*norm1.weight"):
        Med3DVLMBackend(_config(path)).load()


def test_missing_tokenizer_and_wrong_model_type(tmp_path: Path) -> None:
    path = build_med3dvlm(tmp_path / "vlm")
    (path / "tokenizer.json").unlink()
    (path / "tokenizer_config.json").unlink()
    with pytest.raises(CheckpointError, match="missing its tokenizer"):
        Med3DVLMBackend(_config(path)).load()
    clip = build_med3dvlm_clip(tmp_path / "clip")
    with pytest.raises(CheckpointError, match="'dec_clip' checkpoint, not Med3DVLM's 'vlm_qwen'"):
        Med3DVLMBackend(_config(clip)).load()


# -- the contrastive pair ---------------------------------------------------------------
def test_embed_is_a_unit_vector_per_ct(backend: Med3DVLMBackend) -> None:
    results = backend.run([_item(_ct(1), TaskKind.EMBED), _item(_ct(2), TaskKind.EMBED)], TaskKind.EMBED)
    e = np.array([r.embedding for r in results])
    assert e.shape == (2, backend.clip.config.hidden_size)
    assert np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5) and not np.allclose(e[0], e[1])


def test_zero_shot_classify_scores_each_label_by_sigmoid(backend: Med3DVLMBackend) -> None:
    item = _item(_ct(1), TaskKind.CLASSIFY, labels=("pleural effusion", "liver lesion"))
    (r,) = backend.run([item], TaskKind.CLASSIFY)
    clip, tok = backend.clip, backend.clip_tokenizer
    with torch.no_grad():
        image = clip.encode_image(backend.images([backend.prepare(item)]))
        t = tok(["pleural effusion", "liver lesion"], padding=True, return_tensors="pt")
        text = clip.encode_text(t["input_ids"], t["attention_mask"])
        expected = torch.sigmoid((image @ text.T) * clip.t_prime.exp() + clip.bias)[0].tolist()
    assert [f.score for f in r.findings] == [round(s, 4) for s in expected]
    assert r.findings[0].finding.value == "60046008"  # the configured code
    assert [f.present for f in r.findings] == [s >= 0.5 for s in expected]


def test_without_clip_path_no_embed_or_classify(checkpoints: tuple[Path, Path]) -> None:
    b = Med3DVLMBackend(_config(checkpoints[0]))
    b.load()
    assert b.tasks == {TaskKind.REPORT, TaskKind.VQA}
    with pytest.raises(UnsupportedTask, match="classify"):
        b.run([_item(_ct(), TaskKind.CLASSIFY)], TaskKind.CLASSIFY)


def test_published_clip_config_without_text_config_needs_text_encoder_path(
    tmp_path: Path, checkpoints: tuple[Path, Path]
) -> None:
    import json
    import shutil

    clip = tmp_path / "clip"
    shutil.copytree(checkpoints[1], clip)
    cfg = json.loads((clip / "config.json").read_text())
    text_config = cfg.pop("text_config")
    (clip / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="options.text_encoder_path .* medicalai/ClinicalBERT"):
        Med3DVLMBackend(_config(checkpoints[0], clip)).load()
    text_dir = tmp_path / "clinicalbert"
    text_dir.mkdir()
    (text_dir / "config.json").write_text(json.dumps(text_config))
    b = Med3DVLMBackend(_config(checkpoints[0], clip, text_encoder_path=str(text_dir)))
    b.load()
    assert len(b.run([_item(_ct(), TaskKind.EMBED)], TaskKind.EMBED)[0].embedding) == 12


# -- configuration and listing ----------------------------------------------------------
def test_radbridge_models_lists_med3dvlm(tmp_path: Path, checkpoints: tuple[Path, Path], capsys) -> None:  # noqa: ANN001
    from radbridge.cli import main

    cfg = tmp_path / "models.toml"
    cfg.write_text(
        f"""
[inference_service]
port = 0
default_model = "med3dvlm"

[models.med3dvlm]
backend = "med3dvlm"
path = "{checkpoints[0]}"
options = {{ size = [32, 64, 64], version = "tiny-1", clip_path = "{checkpoints[1]}" }}
"""
    )
    assert main(["models", "--config", str(cfg)]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("med3dvlm"))
    assert "backend=med3dvlm" in line and "version=tiny-1" in line
    assert all(t in line for t in ("report", "vqa", "classify", "embed"))


def test_preprocessing_options_reach_prepare_ct(checkpoints: tuple[Path, Path]) -> None:
    item = _item(_ct(), TaskKind.REPORT)
    cropped = Med3DVLMBackend(_config(checkpoints[0])).prepare(item)
    assert cropped.crop == ((4, 36), (6, 54), (5, 45)) and cropped.size == MED3DVLM_TINY_SIZE
    whole = Med3DVLMBackend(_config(checkpoints[0], crop=False, axes="SPL", hu_window=[-1000, 1000])).prepare(
        item
    )
    assert whole.crop == ((0, 40), (0, 60), (0, 50)) and whole.flips == (False, False, False)
    assert whole.intensity_range == (-1000.0, 1000.0)
    with pytest.raises(InvalidInput, match="three of L/R/P/A/S/I"):
        Med3DVLMBackend(_config(checkpoints[0], axes="XYZ")).prepare(item)


def test_published_splice_overwrites_the_positions_after_the_first_placeholder(
    backend: Med3DVLMBackend,
) -> None:
    """options.splice = "published": the conditioning of the published generate (positions 1..N of
    "<im_patch>" * N + prompt), so the first placeholder keeps its embedding, the prompt's first token goes."""
    config = Med3DVLMConfig(**{**backend.model.config.to_dict(), "published_splice": True})
    model = Med3DVLMForCausalLM(config).eval()
    hidden, n, p = config.hidden_size, config.proj_out_num, config.image_token_id
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(
            torch.arange(config.vocab_size, dtype=torch.float32)[:, None].expand(-1, hidden)
        )
    features = 1000.0 + torch.arange(n * hidden, dtype=torch.float32).reshape(1, n, hidden)
    ids = torch.tensor([[0, 0, *[p] * n, 70, 71, 72]])  # left padding, then the published prompt
    with torch.no_grad():
        embeds = model.splice(ids, features)
    assert torch.equal(embeds[0, 3 : 3 + n], features[0])  # after the first placeholder
    assert embeds[0, 2, 0] == p and embeds[0, -2:, 0].tolist() == [71.0, 72.0]  # 70 was overwritten
    with pytest.raises(ValueError, match="placeholder"):
        model.splice(ids[:, : 2 + n], features)  # too short for N positions after the first one


def test_splice_option_at_load(checkpoints: tuple[Path, Path]) -> None:
    b = Med3DVLMBackend(_config(checkpoints[0], splice="published"))
    b.load()
    assert b.model.config.published_splice
    force_output(b, "No acute findings.", "<eos>")
    (r,) = b.run([_item(_ct(), TaskKind.REPORT)], TaskKind.REPORT)
    assert r.report is not None and r.report.findings == "No acute findings."
    with pytest.raises(CheckpointError, match="options.splice must be 'placeholders' or 'published'"):
        Med3DVLMBackend(_config(checkpoints[0], splice="middle")).load()


#: The keys a published Med3DVLM-Qwen-2.5-7B config.json carries: Qwen2.5-7B-Instruct's plus those
#: the published training script writes (initialize_vision_modules), with the published values.
PUBLISHED_CONFIG = {
    "architectures": ["VLMQwenForCausalLM"], "model_type": "vlm_qwen", "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 3584,
    "initializer_range": 0.02, "intermediate_size": 18944, "max_position_embeddings": 32768,
    "max_window_layers": 28, "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": 131072,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 151666, "input_size": [256, 256, 128], "patch_size": [16, 16, 16], "dim": 768, "depth": 12,
    "vision_tower": "dcformer", "vision_select_layer": -2, "vision_select_feature": "cls_patch",
    "mm_projector_type": "mixer", "mm_mlp_depth": 2, "proj_out_num": 256, "low_output_size": [192, 128],
    "high_output_size": [64, 128], "low_input_size": [256, 384], "high_input_size": [32, 768],
    "mm_hidden_size": 768, "tune_mm_mlp_adapter": False,
}  # fmt: skip


def test_published_config_builds_the_published_weight_shapes(tmp_path: Path) -> None:
    import json

    from transformers import AutoConfig

    (tmp_path / "config.json").write_text(json.dumps(PUBLISHED_CONFIG))
    config = AutoConfig.from_pretrained(tmp_path, local_files_only=True)
    assert isinstance(config, Med3DVLMConfig) and config.rope_parameters["rope_theta"] == 1000000.0
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Med3DVLMForCausalLM(config).state_dict().items()}
    enc, mix = "model.vision_tower.vision_tower.encoder", "model.mm_projector"
    assert shapes[f"{enc}.s0.0.0.c1.0.weight"] == (64, 1, 7, 1, 1)  # stem: 7-wide, stride 4
    assert shapes[f"{enc}.s0.0.1.c3.0.weight"] == (64, 64, 1, 1, 3)
    assert shapes[f"{enc}.s1.0.dwconv.c1.0.weight"] == (96, 1, 13, 1, 1)  # depthwise, kernels 13/11/9/7
    assert shapes[f"{enc}.s4.1.dwconv.c2.0.weight"] == (768, 1, 1, 7, 1)
    assert shapes[f"{enc}.s4.0.proj.weight"] == (768, 384, 1, 1, 1)
    assert shapes[f"{enc}.s3.5.mlp.mlp.0.weight"] == (1536, 384)
    assert shapes[f"{mix}.low_mixer.0.mlp1.mm_projector.0.weight"] == (192, 256)  # token mixing 256 -> 192
    assert shapes[f"{mix}.low_mixer.0.mlp2.mm_projector.0.weight"] == (1792, 384)  # width 384 -> 3584/2
    assert shapes[f"{mix}.high_mixer.0.mlp1.mm_projector.0.weight"] == (64, 32)
    assert shapes[f"{mix}.high_mixer.1.mlp2.mm_projector.1.1.weight"] == (3584, 3584)
    assert shapes["lm_head.weight"] == (151666, 3584)


async def test_grpc_round_trip_batches_concurrent_cts(tmp_path: Path, checkpoints: tuple[Path, Path]) -> None:
    """Three CT series sent at once over gRPC: the lane runs them as 2 + 1 (the backend's max_batch)."""
    import asyncio

    from dicom_node.client import InferenceClient, make_spec
    from dicom_node.volume import SeriesVolume
    from inference_service.backends.registry import ModelRegistry
    from inference_service.config import settings_from
    from inference_service.server import run_server
    from radbridge_common.settings import read_layers

    cfg = tmp_path / "service.toml"
    cfg.write_text(
        f"""
[inference_service]
port = 0
default_model = "med3dvlm"
max_batch = 4
batch_wait_ms = 1000

[models.med3dvlm]
backend = "med3dvlm"
path = "{checkpoints[0]}"
options = {{ size = [32, 64, 64], max_batch = 2, version = "tiny-1" }}
"""
    )
    settings = settings_from(read_layers(cfg, {}))
    registry = ModelRegistry.load(settings)
    force_output(registry.get("med3dvlm"), "Normal CT of the chest.", "<eos>")
    running = await run_server(settings, registry)
    try:
        client = InferenceClient(f"127.0.0.1:{running.port}")

        def analyze(seed: int):  # noqa: ANN202
            ct = _ct(seed)
            hu = ct.voxels.astype(np.int16)  # the node sends CT as int16 HU
            volume = SeriesVolume(
                hu, (2.5, 0.7, 0.7), (1, 0, 0, 0, 1, 0), (0, 0, 0), "CT", True, "CHEST", None, []
            )
            return client.analyze(volume, make_spec(["report"], model="med3dvlm"), lambda p: None)

        outcomes = await asyncio.gather(*[asyncio.to_thread(analyze, s) for s in range(3)])
        client.close()
        batches = running.scheduler.lane_batches("med3dvlm", TaskKind.REPORT)
    finally:
        await running.stop(0)
    assert sorted(batches) == [1, 2]
    for outcome in outcomes:
        (task,) = outcome.result.tasks
        assert task.report.findings == "Normal CT of the chest."
        assert outcome.result.model.backend == "med3dvlm" and outcome.result.model.version == "tiny-1"
