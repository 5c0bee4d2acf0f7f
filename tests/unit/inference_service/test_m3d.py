"""M3D-LaMed: the re-implemented classes, the published layout, and the backend on a tiny checkpoint.

The tiny checkpoint is built with our classes (tiny sizes, the published key
names), saved with ``save_pretrained`` and loaded through the production
loader offline, as the other backends' tests do.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from inference_service.backends import m3d_modeling as mm
from inference_service.backends.base import ModelConfig, WorkItem
from inference_service.backends.m3d import M3DBackend
from inference_service.backends.registry import backend_class
from inference_service.errors import CheckpointError, InvalidInput, UnsupportedTask
from inference_service.types import AnalysisSpec, Geometry, TaskKind, Volume
from inference_service.volume3d import stack
from tests.unit.inference_service.tiny_checkpoints import force_output, to_pytorch_bin_shards
from tests.unit.inference_service.tiny_m3d import (
    build_m3d,
    m3d_tokenizer,
    set_constant_mask_logits,
    tiny_config,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning"
)

#: The vision/projector names the published checkpoints hold (MONAI 1.3 ViT inside), per ViT block N.
PUBLISHED_VISION_KEYS = {
    "model.vision_tower.vision_tower.cls_token",
    "model.vision_tower.vision_tower.patch_embedding.position_embeddings",
    "model.vision_tower.vision_tower.patch_embedding.patch_embeddings.1.weight",
    "model.vision_tower.vision_tower.patch_embedding.patch_embeddings.1.bias",
    "model.vision_tower.vision_tower.norm.weight",
    "model.vision_tower.vision_tower.norm.bias",
    "model.mm_projector.projector.0.weight",
    "model.mm_projector.projector.0.bias",
    "model.mm_projector.projector.2.weight",
    "model.mm_projector.projector.2.bias",
} | {
    f"model.vision_tower.vision_tower.blocks.0.{name}"
    for name in (
        "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.out_proj.weight", "attn.out_proj.bias",
        "norm2.weight", "norm2.bias", "mlp.linear1.weight", "mlp.linear1.bias", "mlp.linear2.weight",
        "mlp.linear2.bias",
    )
}  # fmt: skip


#: The Phi-3 LM's own names (one decoder layer).
def _published_seg_keys(blocks: int = 1) -> set[str]:
    """``model.seg_module.*`` / ``model.seg_projector.*`` as the published SegVol head names them."""
    wb = ("weight", "bias")
    enc = "model.seg_module.image_encoder"
    keys = {f"{enc}.patch_embedding.position_embeddings"}
    keys |= {f"{enc}.patch_embedding.patch_embeddings.1.{p}" for p in wb} | {f"{enc}.norm.{p}" for p in wb}
    for n in range(blocks):
        for m in ("norm1", "attn.out_proj", "norm2", "mlp.linear1", "mlp.linear2"):
            keys |= {f"{enc}.blocks.{n}.{m}.{p}" for p in wb}
        keys.add(f"{enc}.blocks.{n}.attn.qkv.weight")
    pe = "model.seg_module.prompt_encoder"
    keys |= {
        f"{pe}.pe_layer.positional_encoding_gaussian_matrix",
        f"{pe}.not_a_point_embed.weight",
        f"{pe}.no_mask_embed.weight",
    } | {f"{pe}.point_embeddings.{i}.weight" for i in range(4)}
    keys |= {f"{pe}.mask_downscaling.{i}.{p}" for i in (0, 1, 3, 4, 6) for p in wb}
    md = "model.seg_module.mask_decoder"
    attn = [
        f"transformer.layers.{n}.{a}"
        for n in range(2)
        for a in ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token")
    ]
    attn.append("transformer.final_attn_token_to_image")
    keys |= {
        f"{md}.{a}.{proj}.{p}"
        for a in attn
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj")
        for p in wb
    }
    norms = [
        f"transformer.layers.{n}.{x}"
        for n in range(2)
        for x in ("norm1", "norm2", "norm3", "norm4", "mlp.lin1", "mlp.lin2")
    ] + ["transformer.norm_final_attn", "txt_align_upscaled_embedding"]
    norms += [f"output_upscaling.{i}" for i in (0, 1, 3)]
    norms += [f"output_hypernetworks_mlps.{i}.layers.{j}" for i in range(4) for j in range(3)]
    norms += [f"iou_prediction_head.layers.{j}" for j in range(3)]
    keys |= {f"{md}.{x}.{p}" for x in norms for p in wb} | {
        f"{md}.iou_token.weight",
        f"{md}.mask_tokens.weight",
    }
    keys |= {f"model.seg_projector.{i}.{p}" for i in (0, 2) for p in wb}
    return keys  # fmt: skip


PUBLISHED_PHI3_KEYS = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} | {
    f"model.layers.0.{name}.weight"
    for name in (
        "self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj", "input_layernorm",
        "post_attention_layernorm",
    )
}  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_m3d(tmp_path_factory.mktemp("m3d") / "phi3")


def _backend(path: Path, **options) -> M3DBackend:  # noqa: ANN003
    b = M3DBackend(ModelConfig(name="m3d-tiny", backend="m3d", path=path, options=options))
    b.load()
    return b


@pytest.fixture(scope="module")
def backend(checkpoint: Path) -> M3DBackend:
    return _backend(checkpoint)


def _ct(shape: tuple[int, int, int] = (20, 40, 36), seed: int = 0) -> Volume:
    """A body-like HU block in air, axial slices (IOP 1,0,0,0,1,0)."""
    rng = np.random.default_rng(seed)
    hu = np.full(shape, -1000.0, np.float32)
    hu[2:-2, 5:-5, 4:-4] = rng.normal(40, 30, (shape[0] - 4, shape[1] - 10, shape[2] - 8))
    g = Geometry(shape, (2.5, 0.8, 0.8), (1, 0, 0, 0, 1, 0), (0, 0, 0), "CT")
    return Volume(hu, g)


def _item(task: TaskKind, **spec) -> WorkItem:  # noqa: ANN003
    return WorkItem(_ct(), AnalysisSpec("m3d-tiny", (task,), **spec))


# -- the published layout -----------------------------------------------------------------------
class TestPublishedLayout:
    def test_saved_checkpoint_has_the_published_names_and_config_keys(self, checkpoint: Path) -> None:
        names = set(load_file(checkpoint / "model.safetensors"))
        assert names == PUBLISHED_VISION_KEYS | PUBLISHED_PHI3_KEYS | _published_seg_keys()
        config = json.loads((checkpoint / "config.json").read_text())
        assert config["model_type"] == "lamed_phi3"
        assert config["architectures"] == ["LamedPhi3ForCausalLM"]
        for key, value in {
            "image_channel": 1, "vision_tower": "vit3d", "vision_select_layer": -1,
            "vision_select_feature": "patch", "mm_projector_type": "spp", "proj_layer_type": "mlp",
            "proj_layer_num": 2, "proj_pooling_type": "spatial", "proj_pooling_size": 2,
            "segmentation_module": "segvol",
        }.items():  # fmt: skip
            assert config[key] == value, key
        assert config["image_size"] == [8, 32, 32] and config["patch_size"] == [2, 8, 8]

    def test_published_defaults_are_the_real_architecture(self) -> None:
        c = mm.LamedPhi3Config()
        assert (list(c.image_size), list(c.patch_size), c.mm_hidden_size) == (
            [32, 256, 256],
            [4, 16, 16],
            768,
        )
        assert (c.vision_num_layers, c.vision_num_heads, c.vision_mlp_dim) == (12, 12, 3072)
        assert c.patch_grid == (8, 16, 16) and c.num_visual_tokens() == 256

    def test_a_published_style_config_without_our_extra_keys_loads(self, tmp_path: Path) -> None:
        """The published config.json carries no img_token_id / vision_num_* keys: defaults apply."""
        from transformers import AutoConfig

        raw = {"model_type": "lamed_phi3", "architectures": ["LamedPhi3ForCausalLM"], "hidden_size": 3072,
               "image_size": [32, 256, 256], "patch_size": [4, 16, 16], "mm_hidden_size": 768,
               "seg_token_id": 32014, "tune_mm_mlp_adapter": False,
               "auto_map": {"AutoConfig": "configuration_phi3.Phi3Config"}}  # fmt: skip
        (tmp_path / "config.json").write_text(json.dumps(raw))
        c = AutoConfig.from_pretrained(tmp_path, trust_remote_code=False)
        assert isinstance(c, mm.LamedPhi3Config) and c.vision_num_layers == 12 and c.img_token_id is None

    def test_bad_geometry_is_rejected_in_the_config(self) -> None:
        with pytest.raises(ValueError, match="whole number of patches"):
            mm.LamedPhi3Config(image_size=[30, 256, 256])
        with pytest.raises(ValueError, match="not divisible by proj_pooling_size"):
            mm.LamedPhi3Config(image_size=[12, 256, 256])

    def test_a_renamed_key_is_named_in_the_error(self, checkpoint: Path, tmp_path: Path) -> None:
        broken = tmp_path / "renamed"
        broken.mkdir()
        for f in checkpoint.iterdir():
            if f.is_file():
                (broken / f.name).write_bytes(f.read_bytes())
        state = load_file(checkpoint / "model.safetensors")
        old = "model.mm_projector.projector.2.weight"
        state["model.mm_projector.proj.2.weight"] = state.pop(old)
        save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(
            CheckpointError, match=r"missing model\.mm_projector\.projector\.2\.weight"
        ) as err:
            _backend(broken)
        assert "unexpected model.mm_projector.proj.2.weight" in str(err.value)

    def test_a_missing_key_is_named_in_the_error(self, checkpoint: Path, tmp_path: Path) -> None:
        broken = tmp_path / "missing"
        broken.mkdir()
        for f in checkpoint.iterdir():
            if f.is_file():
                (broken / f.name).write_bytes(f.read_bytes())
        state = load_file(checkpoint / "model.safetensors")
        del state["model.vision_tower.vision_tower.cls_token"]
        save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(CheckpointError, match=r"missing model\.vision_tower\.vision_tower\.cls_token"):
            _backend(broken)

    def test_seg_head_weights_without_segmentation_module_are_accepted_and_unused(
        self, tmp_path: Path
    ) -> None:
        """A config without ``segmentation_module`` builds no head; stray head weights do not break loading."""
        ckpt = build_m3d(tmp_path / "no-seg", seg=False)
        state = load_file(ckpt / "model.safetensors")
        state["model.seg_projector.0.weight"] = torch.zeros(32, 32)
        state["model.seg_module.mask_decoder.iou_token.weight"] = torch.zeros(1, 16)
        save_file(state, ckpt / "model.safetensors", metadata={"format": "pt"})
        b = _backend(ckpt)
        assert b.tasks == {TaskKind.REPORT, TaskKind.VQA}
        with pytest.raises(UnsupportedTask):
            b.run([_item(TaskKind.SEGMENT, labels=("liver",))], TaskKind.SEGMENT)

    def test_sharded_pytorch_bin_layout_loads(self, tmp_path: Path) -> None:
        ckpt = build_m3d(tmp_path / "bin")
        to_pytorch_bin_shards(ckpt)
        b = _backend(ckpt)
        assert b.model.config.img_token_id == b.processor.tokenizer.convert_tokens_to_ids("<im_patch>")

    def test_single_pytorch_bin_layout_is_checked_too(self, tmp_path: Path) -> None:
        ckpt = build_m3d(tmp_path / "single-bin")
        state = load_file(ckpt / "model.safetensors")
        (ckpt / "model.safetensors").unlink()
        del state["model.mm_projector.projector.0.bias"]
        torch.save(state, ckpt / "pytorch_model.bin")
        with pytest.raises(CheckpointError, match=r"missing model\.mm_projector\.projector\.0\.bias"):
            _backend(ckpt)

    def test_llama_variant_loads_through_the_auto_classes(self, tmp_path: Path) -> None:
        b = _backend(build_m3d(tmp_path / "llama", family="llama"))
        assert isinstance(b.model, mm.LamedLlamaForCausalLM)
        force_output(b, "Liver lesion.", "</s>")
        (r,) = b.run([_item(TaskKind.REPORT)], TaskKind.REPORT)
        assert r.report.findings == "Liver lesion."

    def test_not_an_m3d_checkpoint_is_refused(self, tmp_path: Path) -> None:
        from transformers import Phi3Config, Phi3ForCausalLM

        tok = m3d_tokenizer()
        Phi3ForCausalLM(
            Phi3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, pad_token_id=0)
        ).save_pretrained(tmp_path / "plain")  # fmt: skip
        tok.save_pretrained(tmp_path / "plain")
        with pytest.raises(CheckpointError, match="not M3D-LaMed"):
            _backend(tmp_path / "plain")

    def test_missing_tokenizer_is_named(self, checkpoint: Path, tmp_path: Path) -> None:
        ckpt = tmp_path / "notok"
        ckpt.mkdir()
        for name in ("config.json", "model.safetensors", "generation_config.json"):
            (ckpt / name).write_bytes((checkpoint / name).read_bytes())
        with pytest.raises(CheckpointError, match="missing its tokenizer"):
            _backend(ckpt)


# -- shapes and the splice ----------------------------------------------------------------------
class TestShapes:
    def _real_size_vision(self) -> tuple[mm.ViT3DTower, mm.SpatialPoolingProjector, mm.LamedPhi3Config]:
        config = mm.LamedPhi3Config()  # published: 32x256x256, 4x16x16 patches, ViT-B, Phi-3 width 3072
        return mm.ViT3DTower(config), mm.SpatialPoolingProjector(config), config

    def test_real_size_encoder_and_projector_shapes_on_meta(self) -> None:
        with torch.device("meta"):
            tower, projector, config = self._real_size_vision()
            features = tower(torch.empty(2, 1, 32, 256, 256))
            tokens = projector(features)
        assert features.shape == (2, 2048, 768)
        assert tokens.shape == (2, 256, config.hidden_size) and config.hidden_size == 3072

    def test_real_size_seg_head_gives_logits_at_the_cube_size_on_meta(self) -> None:
        from inference_service.backends.m3d_segvol import SegVolHead

        with torch.device("meta"):
            config = mm.LamedPhi3Config(segmentation_module="segvol")
            head = SegVolHead(config)
            logits = head(torch.empty(2, 1, 32, 256, 256), torch.empty(2, 768))
        assert logits.shape == (2, 1, 32, 256, 256)
        up = head.mask_decoder.output_upscaling[1].normalized_shape
        assert tuple(up) == (192, 16, 32, 32)  # the published LayerNorm over the 2x-upscaled grid

    def test_published_size_model_on_meta_has_the_published_parameter_layout(self) -> None:
        """Phi-3-mini LM + ViT-B + SegVol head, no memory: 12 ViT blocks in each encoder, 32 LM layers."""
        with torch.device("meta"):
            model = mm.LamedPhi3ForCausalLM(
                mm.LamedPhi3Config(segmentation_module="segvol", img_token_id=32011)
            )
            visual = model.encode_images(torch.empty(1, 1, 32, 256, 256))
        assert visual.shape == (1, 256, 3072) and model.lm_head.weight.shape == (32064, 3072)
        names = set(model.state_dict())
        assert "model.vision_tower.vision_tower.blocks.11.attn.qkv.weight" in names
        assert "model.vision_tower.vision_tower.blocks.12.attn.qkv.weight" not in names
        assert "model.seg_module.image_encoder.blocks.11.mlp.linear2.bias" in names
        assert "model.layers.31.self_attn.qkv_proj.weight" in names
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert shapes["model.vision_tower.vision_tower.patch_embedding.patch_embeddings.1.weight"] == (
            768,
            1024,
        )
        assert shapes["model.vision_tower.vision_tower.patch_embedding.position_embeddings"] == (1, 2048, 768)
        assert shapes["model.mm_projector.projector.0.weight"] == (3072, 768)
        assert shapes["model.seg_projector.2.weight"] == (768, 3072)

    @pytest.mark.slow
    def test_real_size_encoder_and_projector_on_cpu(self) -> None:
        torch.manual_seed(0)
        tower, projector, config = self._real_size_vision()
        with torch.inference_mode():
            tokens = projector(tower(torch.rand(1, 1, 32, 256, 256)))
        assert tokens.shape == (1, 256, 3072) and torch.isfinite(tokens).all()

    def test_patch_order_is_depth_major_with_patch_voxels_depth_major(self) -> None:
        """Token t = (gd, gh, gw) in row-major order; its vector = its voxels (pd, ph, pw) row-major."""
        x = torch.arange(1 * 1 * 4 * 4 * 6, dtype=torch.float32).reshape(1, 1, 4, 4, 6)
        out = mm.Patchify((2, 2, 3))(x)
        assert out.shape == (1, 2 * 2 * 2, 12)
        # token 3 = grid (0, 1, 1): depth 0..1, rows 2..3, columns 3..5
        expected = x[0, 0, 0:2, 2:4, 3:6].reshape(-1)
        assert torch.equal(out[0, 3], expected)

    def test_spatial_pooling_averages_2x2x2_neighbours_in_grid_order(self) -> None:
        config = tiny_config(m3d_tokenizer(), proj_layer_type="linear", proj_layer_num=1)
        projector = mm.SpatialPoolingProjector(config)
        with torch.no_grad():
            projector.projector[0].weight.zero_()
            projector.projector[0].weight[0, 0] = 1.0  # output channel 0 = input channel 0
            projector.projector[0].bias.zero_()
        grid = torch.arange(64, dtype=torch.float32).reshape(4, 4, 4)  # the tiny 4x4x4 patch grid
        features = torch.zeros(1, 64, 16)
        features[0, :, 0] = grid.reshape(-1)
        out = projector(features)
        assert out.shape == (1, 8, 32)
        expected = grid.reshape(2, 2, 2, 2, 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(8, 8).mean(dim=1)
        assert torch.allclose(out[0, :, 0], expected)

    def test_splice_puts_each_visual_vector_where_a_placeholder_was(self) -> None:
        """Hand-set weights: token embeddings all 0, visual token k = the constant k + 1."""
        tok = m3d_tokenizer()
        img = tok.convert_tokens_to_ids("<im_patch>")
        config = tiny_config(tok, img_token_id=img)
        model = mm.LamedPhi3ForCausalLM(config).eval()
        n = config.num_visual_tokens()
        with torch.no_grad():
            model.model.embed_tokens.weight.zero_()
        model.encode_images = lambda images: (  # noqa: ARG005
            torch.arange(1, n + 1, dtype=torch.float32)[None, :, None].expand(
                images.shape[0], n, config.hidden_size
            )
        )
        pad = tok.convert_tokens_to_ids("<unk>")
        text = tok.encode("Is there a lesion?", add_special_tokens=False)
        rows = [
            [pad, pad, pad] + [img] * n + text,
            [img] * n + text + [pad, pad, pad],
        ]  # left and right padded
        ids = torch.tensor(rows)
        embeds = model.embed_with_images(ids, torch.zeros(2, 1, 8, 32, 32))
        for row in range(2):
            where = (ids[row] == img).nonzero().flatten()
            assert torch.equal(embeds[row, where, 0], torch.arange(1, n + 1, dtype=torch.float32))
            others = (ids[row] != img).nonzero().flatten()
            assert torch.count_nonzero(embeds[row, others]) == 0

    def test_splice_matches_the_published_positional_splice_for_the_published_prompt(self) -> None:
        """The published code overwrites positions 1..N after <s>; ours must agree on that prompt."""
        tok = m3d_tokenizer()
        img = tok.convert_tokens_to_ids("<im_patch>")
        torch.manual_seed(1)
        model = mm.LamedPhi3ForCausalLM(tiny_config(tok, img_token_id=img)).eval()
        n = model.config.num_visual_tokens()
        ids = torch.tensor(
            [[tok.convert_tokens_to_ids("<s>")] + [img] * n + tok.encode("Liver?", add_special_tokens=False)]
        )
        images = torch.rand(1, 1, 8, 32, 32)
        with torch.no_grad():
            ours = model.embed_with_images(ids, images)
            embeds = model.model.embed_tokens(ids)
            published = torch.cat([embeds[:, :1], model.encode_images(images), embeds[:, n + 1 :]], dim=1)
        assert torch.equal(ours, published)

    def test_published_splice_fills_the_n_positions_after_each_rows_first_token(self) -> None:
        """Without <s>, the published code keeps the first placeholder and overwrites the first text token."""
        tok = m3d_tokenizer()
        img = tok.convert_tokens_to_ids("<im_patch>")
        config = tiny_config(tok, img_token_id=img)
        model = mm.LamedPhi3ForCausalLM(config).eval()
        model.splice_mode = "published"
        n = config.num_visual_tokens()
        with torch.no_grad():
            model.model.embed_tokens.weight.zero_()
        model.encode_images = lambda images: (  # noqa: ARG005
            torch.arange(1, n + 1, dtype=torch.float32)[None, :, None].expand(
                images.shape[0], n, config.hidden_size
            )
        )
        pad = tok.convert_tokens_to_ids("<unk>")
        text = tok.encode("Liver?", add_special_tokens=False)
        ids = torch.tensor([[pad, pad] + [img] * n + text, [img] * n + text + [pad, pad]])
        mask = (ids != pad).long()
        embeds = model.embed_with_images(ids, torch.zeros(2, 1, 8, 32, 32), mask)
        for row, start in ((0, 2), (1, 0)):
            assert torch.equal(
                embeds[row, start + 1 : start + 1 + n, 0], torch.arange(1, n + 1, dtype=torch.float32)
            )
            assert (
                float(embeds[row, start].abs().sum()) == 0.0
            )  # the first placeholder keeps its own embedding

    @pytest.mark.parametrize(("bos", "option", "mode"), [
        (False, None, "published"), (True, None, "placeholders"), (False, "placeholders", "placeholders"),
        (True, "published", "published"),
    ])  # fmt: skip
    def test_default_splice_is_the_trained_conditioning(
        self, tmp_path: Path, bos: bool, option: str | None, mode: str
    ) -> None:
        b = _backend(build_m3d(tmp_path / "c", bos=bos), **({"splice": option} if option else {}))
        assert b.model.splice_mode == mode
        force_output(b, "Fine.", "</s>")
        (r,) = b.run([_item(TaskKind.VQA, question="Liver?")], TaskKind.VQA)
        assert r.answer == "Fine."

    def test_unknown_splice_option_is_refused(self, checkpoint: Path) -> None:
        with pytest.raises(CheckpointError, match="options.splice"):
            _backend(checkpoint, splice="middle")

    def test_wrong_placeholder_count_is_a_clear_error(self) -> None:
        tok = m3d_tokenizer()
        img = tok.convert_tokens_to_ids("<im_patch>")
        model = mm.LamedPhi3ForCausalLM(tiny_config(tok, img_token_id=img)).eval()
        with pytest.raises(ValueError, match=r"exactly 8 <im_patch> tokens.*\[3\]"):
            model.embed_with_images(torch.tensor([[img] * 3 + [5]]), torch.zeros(1, 1, 8, 32, 32))


# -- the backend --------------------------------------------------------------------------------
class TestBackend:
    def test_registered_and_identified(self, backend: M3DBackend) -> None:
        assert backend_class("m3d") is M3DBackend
        ident = backend.identity
        assert ident.backend == "m3d" and ident.name == "m3d-tiny" and len(ident.weights_sha256) == 64
        assert ident.weights_sha256[:12] in ident.version
        assert backend.modalities == {"CT"}
        assert backend.tasks == {
            TaskKind.REPORT,
            TaskKind.VQA,
            TaskKind.SEGMENT,
        }  # the checkpoint has the head

    def test_forced_report_becomes_a_report_result(self, backend: M3DBackend) -> None:
        force_output(
            backend, "Findings: Hypodense lesion in the right liver lobe.\nImpression: Cyst.", "</s>"
        )
        (r,) = backend.run([_item(TaskKind.REPORT)], TaskKind.REPORT)
        assert not r.unparsed and r.task is TaskKind.REPORT
        assert (r.report.findings, r.report.impression) == (
            "Hypodense lesion in the right liver lobe.",
            "Cyst.",
        )
        assert r.prompt_id.startswith("m3d-tiny:report:")

    def test_plain_caption_is_the_findings(self, backend: M3DBackend) -> None:
        """M3D-Cap captions carry no section labels."""
        force_output(backend, "Multiple liver metastases.", "</s>")
        (r,) = backend.run([_item(TaskKind.REPORT)], TaskKind.REPORT)
        assert (r.report.findings, r.report.impression) == ("Multiple liver metastases.", "")

    def test_prompt_is_placeholders_then_text_and_the_volume_is_the_model_cube(
        self, backend: M3DBackend
    ) -> None:
        seen = {}
        original = backend.model.generate

        def spy(**kwargs):  # noqa: ANN003, ANN202
            seen.update(kwargs)
            return original(**kwargs)

        backend.model.generate = spy
        try:
            force_output(backend, "Yes.", "</s>")
            (r,) = backend.run([_item(TaskKind.VQA, question="Is the liver enlarged?")], TaskKind.VQA)
        finally:
            del backend.model.generate
        assert r.answer == "Yes." and r.prompt_id == "m3d-tiny:vqa"
        tok = backend.processor.tokenizer
        ids = seen["input_ids"][0].tolist()
        n = backend.model.config.num_visual_tokens()
        assert ids[:n] == [tok.convert_tokens_to_ids("<im_patch>")] * n
        assert tok.decode(ids[n:]) == "Is the liver enlarged?"
        images = seen["images"]
        assert images.shape == (1, 1, 8, 32, 32) and float(images.min()) >= 0 and float(images.max()) <= 1

    def test_a_batch_of_volumes_is_one_left_padded_generate(self, backend: M3DBackend) -> None:
        calls = []
        original = backend.model.generate

        def spy(**kwargs):  # noqa: ANN003, ANN202
            calls.append(kwargs)
            return original(**kwargs)

        backend.model.generate = spy
        try:
            force_output(backend, "No.", "</s>")
            items = [_item(TaskKind.VQA, question="Cyst?"), _item(TaskKind.VQA, question="Any liver lesion?")]
            results = backend.run(items, TaskKind.VQA)
        finally:
            del backend.model.generate
        assert [r.answer for r in results] == ["No.", "No."]
        (call,) = calls
        assert (
            call["images"].shape[0] == 2 and call["attention_mask"][0, 0] == 0
        )  # the shorter row is left-padded

    def test_batched_logits_equal_one_at_a_time(self, backend: M3DBackend) -> None:
        """The placeholder-id splice keeps left padding harmless (a positional splice would not)."""
        items = [_item(TaskKind.VQA, question="Cyst?"), WorkItem(_ct(seed=3), _item(TaskKind.VQA).spec)]
        questions = ["Cyst?", "Any hypodense liver lesion?"]
        volumes = stack([backend._prepare(it) for it in items])

        def first_logits(vols: np.ndarray, prompts: list[str]) -> torch.Tensor:
            inputs = backend.build_inputs(vols, prompts)
            with torch.inference_mode():
                out = backend.model.generate(
                    **inputs,
                    max_new_tokens=3,
                    do_sample=False,
                    output_logits=True,
                    return_dict_in_generate=True,
                )
            return torch.stack(out.logits, dim=1)  # batch, step, vocab

        together = first_logits(volumes, questions)
        alone = torch.cat([first_logits(volumes[i : i + 1], questions[i : i + 1]) for i in range(2)])
        assert torch.allclose(together, alone, atol=1e-5)
        assert not torch.allclose(alone[0], alone[1], atol=1e-5)  # the rows really differ

    def test_vqa_needs_a_question(self, backend: M3DBackend) -> None:
        with pytest.raises(InvalidInput, match="question"):
            backend.run([_item(TaskKind.VQA)], TaskKind.VQA)

    def test_unsupported_task(self, backend: M3DBackend) -> None:
        with pytest.raises(UnsupportedTask):
            backend.run([_item(TaskKind.DETECT)], TaskKind.DETECT)

    def test_non_ct_is_refused(self, backend: M3DBackend) -> None:
        img = np.zeros((1, 32, 32), np.float32)
        mr = Volume(img, Geometry((1, 32, 32), (1, 1, 1), (1, 0, 0, 0, 1, 0), (0, 0, 0), "MR"))
        with pytest.raises(InvalidInput, match="CT"):
            backend.run([WorkItem(mr, AnalysisSpec("m3d-tiny", (TaskKind.REPORT,)))], TaskKind.REPORT)


def test_radbridge_models_lists_a_configured_m3d_checkpoint(
    tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The registry example of the README: config -> registry -> gRPC ListModels -> CLI."""
    from radbridge.cli import main

    cfg = tmp_path / "models.toml"
    cfg.write_text(
        f"""
[inference_service]
port = 0
default_model = "m3d"

[models.m3d]
backend = "m3d"
path = "{checkpoint}"
dtype = "float32"
options = {{ max_new_tokens = 256, axes = "IPL", foreground_hu = -500.0, version = "phi3-tiny" }}
"""
    )
    assert main(["models", "--config", str(cfg)]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("m3d"))
    assert "backend=m3d" in line and "version=phi3-tiny" in line and "report" in line and "vqa" in line


class TestSegmentation:
    @pytest.fixture
    def seg_backend(self, tmp_path: Path) -> M3DBackend:
        b = _backend(build_m3d(tmp_path / "seg"))
        set_constant_mask_logits(b.model)
        return b

    def test_seg_token_gives_a_mask_mapped_back_to_the_source_voxels(self, seg_backend: M3DBackend) -> None:
        force_output(seg_backend, "It is [SEG].", "</s>")
        item = _item(TaskKind.SEGMENT, labels=("liver",))
        (r,) = seg_backend.run([item], TaskKind.SEGMENT)
        assert r.answer == "It is ." and not r.unparsed
        (mask,) = r.masks
        assert mask.label == "liver" and mask.segment_number == 1 and mask.voxels.dtype == np.bool_
        assert mask.voxels.shape == item.volume.voxels.shape
        # a full-cube mask in model space is the foreground crop box in source space
        expected = np.zeros(item.volume.voxels.shape, bool)
        expected[2:-2, 5:-5, 4:-4] = True
        assert np.array_equal(mask.voxels, expected)
        assert r.prompt_id.startswith("m3d-tiny:segment:")

    def test_no_seg_token_means_no_mask(self, seg_backend: M3DBackend) -> None:
        force_output(seg_backend, "There is no liver.", "</s>")
        (r,) = seg_backend.run([_item(TaskKind.SEGMENT, labels=("liver",))], TaskKind.SEGMENT)
        assert r.masks == [] and r.unparsed and r.answer == "There is no liver."

    def test_segmentation_needs_exactly_one_label(self, seg_backend: M3DBackend) -> None:
        with pytest.raises(InvalidInput, match="one label"):
            seg_backend.run([_item(TaskKind.SEGMENT)], TaskKind.SEGMENT)

    def test_the_prompt_of_the_head_is_the_state_that_predicts_seg(self, seg_backend: M3DBackend) -> None:
        """LISA/M3D convention: the last hidden state one position before [SEG], projected."""
        model = seg_backend.model
        tok = seg_backend.processor.tokenizer
        seg = tok.convert_tokens_to_ids("[SEG]")
        n = model.config.num_visual_tokens()
        img = tok.convert_tokens_to_ids("<im_patch>")
        prompt = [img] * n + tok.encode("Liver?", add_special_tokens=False)
        answer = (
            tok.encode("It is ", add_special_tokens=False) + [seg] + tok.encode(".", add_special_tokens=False)
        )
        sequences = torch.tensor([prompt + answer])
        images = torch.rand(1, 1, 8, 32, 32)
        seen = []
        handle = model.model.seg_projector.register_forward_hook(lambda m, args, out: seen.append(args[0]))
        try:
            (logits,) = model.segment(images, sequences, torch.ones_like(sequences), start=len(prompt))
        finally:
            handle.remove()
        with torch.no_grad():
            hidden = model(input_ids=sequences, images=images, output_hidden_states=True).hidden_states[-1]
        before_seg = len(prompt) + answer.index(seg) - 1
        assert torch.allclose(seen[0], hidden[0, before_seg][None], atol=1e-6)
        assert logits.shape == (1, 8, 32, 32)


def test_seg_token_id_that_disagrees_with_the_tokenizer_is_refused(tmp_path: Path) -> None:
    ckpt = build_m3d(tmp_path / "bad-seg-id")
    config = json.loads((ckpt / "config.json").read_text())
    config["seg_token_id"] = 3
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"seg_token_id 3 is not the tokenizer's \[SEG\]"):
        _backend(ckpt)


def test_max_batch_option_caps_the_lane(checkpoint: Path) -> None:
    """The scheduler reads ``backend.max_batch`` (0: its own limit) to size a lane's CT batches."""
    assert _backend(checkpoint).max_batch == 0
    assert _backend(checkpoint, max_batch=2).max_batch == 2
