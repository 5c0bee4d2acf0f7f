"""M3D-LaMed re-implemented on transformers' Phi-3 / Llama causal LMs.

M3D-LaMed (BAAI-DCAI/M3D) reads a CT cube of 1x32x256x256 (depth, height,
width; values in [0, 1]) with a 3D ViT-B (patches 4x16x16 -> 8x16x16 = 2048
tokens of 768), averages 2x2x2 neighbouring patch tokens (-> 4x8x8 = 256) and
maps them with a two-layer MLP to the LM's width. Those 256 vectors replace
the embeddings of the 256 ``<im_patch>`` placeholder tokens of the prompt.

Module and parameter names follow the published checkpoints
(GoodBaiBai88/M3D-LaMed-Phi-3-4B, -Llama-2-7B; MONAI 1.3 ViT inside) so that
``from_pretrained(local_dir)`` reads them with ``trust_remote_code=False``:

    model.vision_tower.vision_tower.{cls_token, patch_embedding.position_embeddings,
        patch_embedding.patch_embeddings.1.{weight,bias}, blocks.N.{norm1,attn.qkv,
        attn.out_proj,norm2,mlp.linear1,mlp.linear2}.*, norm.*}
    model.mm_projector.projector.{0,2}.{weight,bias}
    model.{embed_tokens,layers.N.*,norm}.*, lm_head.weight   (the LM's own)

With ``segmentation_module`` "segvol" (as published) the ``[SEG]`` head is
built too (``m3d_segvol``: ``model.seg_module.*``, ``model.seg_projector.*``);
without it, such weights are ignored on load.

Differences from the published code: by default (``splice_mode``
"placeholders") the visual tokens go where the ``<im_patch>`` ids are; the
published code overwrites positions 1..256, the same for a prompt ``<s>`` +
256 placeholders + text, shifted by one without ``<s>``, and wrong for a
left-padded batch. ``splice_mode = "published"`` reproduces it per row, after
the left padding. The ViT's depth, heads and MLP width are config keys
(``vision_num_layers``, ``vision_num_heads``, ``vision_mlp_dim``; absent from
the published config, whose ViT-B values are the defaults) so tiny test
checkpoints can exist.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    Phi3Config,
    Phi3ForCausalLM,
    Phi3Model,
    PreTrainedConfig,
)
from transformers.models.llama.modeling_llama import LlamaPreTrainedModel
from transformers.models.phi3.modeling_phi3 import Phi3PreTrainedModel

#: The image placeholder token of the published tokenizers.
IMAGE_TOKEN = "<im_patch>"
#: The token after which the published model emits a mask.
SEG_TOKEN = "[SEG]"
#: Parameter prefixes of the published [SEG] head, not built by this re-implementation.
SEG_PREFIXES = ("model.seg_module.", "model.seg_projector.")


def _triple(value: int | Sequence[int], name: str) -> tuple[int, int, int]:
    out = (int(value),) * 3 if isinstance(value, int) else tuple(int(v) for v in value)
    if len(out) != 3 or min(out) < 1:
        raise ValueError(f"{name} must be three positive sizes (depth, height, width), got {value!r}.")
    return out  # type: ignore[return-value]


class LamedVisionMixin:
    """Checks and derived sizes over the vision keys of the published config."""

    image_size: Sequence[int]
    patch_size: Sequence[int]
    image_channel: int
    mm_hidden_size: int
    hidden_size: int
    proj_pooling_size: int
    proj_pooling_type: str
    proj_layer_type: str
    proj_layer_num: int
    mm_projector_type: str
    vision_tower: str
    segmentation_module: str | None
    seg_token_id: int | None
    vision_select_layer: int
    vision_select_feature: str
    vision_num_layers: int
    vision_num_heads: int
    vision_mlp_dim: int

    def check_vision(self) -> None:
        """Reject a vision geometry the encoder and projector cannot tile."""
        image = _triple(self.image_size, "image_size")
        patch = _triple(self.patch_size, "patch_size")
        pool = int(self.proj_pooling_size)
        grid = [i // p for i, p in zip(image, patch, strict=True)]
        if any(i % p for i, p in zip(image, patch, strict=True)):
            raise ValueError(f"image_size {image} is not a whole number of patches {patch}.")
        if self.proj_pooling_type == "spatial" and any(g % pool for g in grid):
            raise ValueError(f"The patch grid {grid} is not divisible by proj_pooling_size {pool}.")
        if self.mm_projector_type != "spp":
            raise ValueError(
                f"Only the spatial-pooling projector ('spp') is implemented, not {self.mm_projector_type!r}."
            )
        if "vit3d" not in str(self.vision_tower).lower():
            raise ValueError(f"Only the 'vit3d' vision tower is implemented, not {self.vision_tower!r}.")

    @property
    def patch_grid(self) -> tuple[int, int, int]:
        image = _triple(self.image_size, "image_size")
        patch = _triple(self.patch_size, "patch_size")
        return tuple(i // p for i, p in zip(image, patch, strict=True))  # type: ignore[return-value]

    def num_visual_tokens(self) -> int:
        """Visual tokens per volume (256 for the published 32x256x256 / 4x16x16 / pool 2)."""
        d, h, w = self.patch_grid
        if self.proj_pooling_type == "spatial":
            s = int(self.proj_pooling_size)
            return (d // s) * (h // s) * (w // s)
        return d * h * w // int(self.proj_pooling_size) ** 3


@strict
class LamedVisionFields(PreTrainedConfig):
    """M3D-LaMed's vision keys with the published (ViT-B) defaults, declared once for both language
    models. A config base, not a mixin, because transformers makes each config class a dataclass and
    a dataclass takes fields only from bases that are dataclasses. Listed after the language
    model's config in the bases, so that config's own defaults win for the keys they share."""

    image_channel: int = 1
    image_size: list[int] | tuple[int, ...] = (32, 256, 256)
    patch_size: list[int] | tuple[int, ...] = (4, 16, 16)
    vision_tower: str = "vit3d"
    vision_select_layer: int = -1
    vision_select_feature: str = "patch"
    mm_hidden_size: int = 768
    mm_projector_type: str = "spp"
    proj_layer_type: str = "mlp"
    proj_layer_num: int = 2
    proj_pooling_type: str = "spatial"
    proj_pooling_size: int = 2
    segmentation_module: str | None = None
    seg_token_id: int | None = None
    img_token_id: int | None = None
    vision_num_layers: int = 12
    vision_num_heads: int = 12
    vision_mlp_dim: int = 3072


@strict
class LamedPhi3Config(LamedVisionMixin, Phi3Config, LamedVisionFields):
    """Phi-3 config + M3D-LaMed's vision keys (``model_type`` "lamed_phi3", as published)."""

    model_type = "lamed_phi3"

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        self.check_vision()


@strict
class LamedLlamaConfig(LamedVisionMixin, LlamaConfig, LamedVisionFields):
    """Llama config + M3D-LaMed's vision keys (``model_type`` "lamed_llama", as published)."""

    model_type = "lamed_llama"

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        self.check_vision()


# -- the 3D ViT (MONAI 1.3 ViT layout: perceptron patch embedding, pre-norm blocks) -------------
class Patchify(nn.Module):
    """(b, c, D, H, W) -> (b, patches, pd*ph*pw*c): patches in depth-major order, each patch's
    voxels depth-major with the channel last (the order the published linear embedding expects)."""

    def __init__(self, patch: tuple[int, int, int]) -> None:
        super().__init__()
        self.patch = patch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        pd, ph, pw = self.patch
        x = x.reshape(b, c, d // pd, pd, h // ph, ph, w // pw, pw)
        x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # b, gd, gh, gw, pd, ph, pw, c
        return x.reshape(b, (d // pd) * (h // ph) * (w // pw), pd * ph * pw * c)


class PatchEmbedding(nn.Module):
    def __init__(
        self, channels: int, image: tuple[int, int, int], patch: tuple[int, int, int], width: int
    ) -> None:
        super().__init__()
        n = 1
        for i, p in zip(image, patch, strict=True):
            n *= i // p
        self.patch_embeddings = nn.Sequential(
            Patchify(patch), nn.Linear(patch[0] * patch[1] * patch[2] * channels, width)
        )
        self.position_embeddings = nn.Parameter(torch.zeros(1, n, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch_embeddings(x) + self.position_embeddings


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused qkv projection laid out (q|k|v, head, dim)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"ViT width {width} is not divisible by {heads} heads.")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, width = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, width))


class FeedForward(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(width, hidden)
        self.linear2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(F.gelu(self.linear1(x)))


class ViTBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = FeedForward(width, mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT3D(nn.Module):
    """Patch embedding + learned positions, a class token, pre-norm blocks, a final norm."""

    def __init__(self, config: LamedVisionMixin) -> None:
        super().__init__()
        width = int(config.mm_hidden_size)
        image = _triple(config.image_size, "image_size")
        patch = _triple(config.patch_size, "patch_size")
        self.patch_embedding = PatchEmbedding(int(config.image_channel), image, patch, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        heads, mlp = int(config.vision_num_heads), int(config.vision_mlp_dim)
        self.blocks = nn.ModuleList(ViTBlock(width, heads, mlp) for _ in range(int(config.vision_num_layers)))
        self.norm = nn.LayerNorm(width)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.patch_embedding(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        states = []
        for block in self.blocks:
            x = block(x)
            states.append(x)
        return self.norm(x), states


class ViT3DTower(nn.Module):
    """Selects the published feature: the last normed layer's patch tokens (class token dropped)."""

    def __init__(self, config: LamedVisionMixin) -> None:
        super().__init__()
        self.select_layer = int(config.vision_select_layer)
        self.select_feature = str(config.vision_select_feature)
        if self.select_feature not in ("patch", "cls_patch"):
            raise ValueError(
                f"vision_select_feature must be 'patch' or 'cls_patch', not {self.select_feature!r}."
            )
        self.vision_tower = ViT3D(config)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        last, states = self.vision_tower(images)
        features = last if self.select_layer == -1 else states[self.select_layer]
        return features[:, 1:] if self.select_feature == "patch" else features


class SpatialPoolingProjector(nn.Module):
    """Average-pool the patch grid by ``proj_pooling_size`` in 3D, then an MLP to the LM width."""

    def __init__(self, config: LamedVisionMixin) -> None:
        super().__init__()
        self.grid = config.patch_grid
        self.pool = int(config.proj_pooling_size)
        self.pooling_type = str(config.proj_pooling_type)
        if self.pooling_type not in ("spatial", "sequence"):
            raise ValueError(f"proj_pooling_type must be 'spatial' or 'sequence', not {self.pooling_type!r}.")
        width, out = int(config.mm_hidden_size), int(config.hidden_size)
        depth = int(config.proj_layer_num)
        kind = str(config.proj_layer_type)
        if kind not in ("mlp", "linear"):
            raise ValueError(f"proj_layer_type must be 'mlp' or 'linear', not {kind!r}.")
        layers: list[nn.Module] = [nn.Linear(width, out)]
        for _ in range(1, depth):
            if kind == "mlp":
                layers.append(nn.GELU())
            layers.append(nn.Linear(out, out))
        self.projector = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, width = x.shape
        if self.pooling_type == "spatial":
            grid = x.transpose(1, 2).reshape(b, width, *self.grid)
            x = F.avg_pool3d(grid, kernel_size=self.pool, stride=self.pool).flatten(2).transpose(1, 2)
        else:
            x = F.avg_pool1d(x.transpose(1, 2), kernel_size=self.pool**3, stride=self.pool**3).transpose(1, 2)
        return self.projector(x)


# -- the causal LMs with the splice --------------------------------------------------------------
def splice_visual_tokens(
    embeds: torch.Tensor, input_ids: torch.Tensor, features: torch.Tensor, image_token_id: int
) -> torch.Tensor:
    """Put row i's visual vectors where row i's placeholder ids are, in order.

    Each row must hold exactly as many placeholders as there are visual tokens
    per volume; anything else is a prompt the model cannot read.
    """
    mask = input_ids == image_token_id
    counts = mask.sum(dim=1).tolist()
    want = features.shape[1]
    if features.shape[0] != embeds.shape[0] or any(c != want for c in counts):
        raise ValueError(
            f"Each prompt needs exactly {want} {IMAGE_TOKEN} tokens for its volume; got {counts} "
            f"placeholders for {features.shape[0]} volume(s)."
        )
    out = embeds.clone()
    out[mask] = features.reshape(-1, features.shape[-1]).to(out.dtype)
    return out


def splice_published(
    embeds: torch.Tensor, features: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """The published splice: row i's visual vectors replace positions 1..N after its first real token
    (position 0 without padding; after the left padding otherwise), whatever the ids there are."""
    n = features.shape[1]
    starts = (
        attention_mask.long().argmax(dim=1).tolist() if attention_mask is not None else [0] * embeds.shape[0]
    )
    if features.shape[0] != embeds.shape[0] or any(s + 1 + n > embeds.shape[1] for s in starts):
        raise ValueError(f"Each prompt needs at least {n + 1} tokens for the published splice of its volume.")
    out = embeds.clone()
    for row, start in enumerate(starts):
        out[row, start + 1 : start + 1 + n] = features[row].to(out.dtype)
    return out


class _LamedCausalLM:
    """The splice and generation glue shared by the Phi-3 and Llama variants."""

    _keys_to_ignore_on_load_unexpected = [r"^model\.seg_module\.", r"^model\.seg_projector\."]

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(b, 1, D, H, W) in [0, 1] -> (b, proj_out_num, LM width)."""
        inner = self.model
        images = images.to(inner.mm_projector.projector[0].weight.dtype)
        return inner.mm_projector(inner.vision_tower(images))

    #: "placeholders": visual vectors where the <im_patch> ids are; "published": the published
    #: code's positional splice (the N positions after the row's first token), which is what the
    #: model was trained with. They agree when the tokenizer puts <s> before the placeholders.
    splice_mode: str = "placeholders"

    def embed_with_images(
        self, input_ids: torch.Tensor, images: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        token_id = self.config.img_token_id
        if token_id is None:
            raise ValueError(f"config.img_token_id is not set (the id of {IMAGE_TOKEN} in the tokenizer).")
        embeds = self.model.embed_tokens(input_ids)
        features = self.encode_images(images)
        if self.splice_mode == "published":
            return splice_published(embeds, features, attention_mask)
        return splice_visual_tokens(embeds, input_ids, features, int(token_id))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        images: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """The LM's forward; with ``images``, their visual tokens replace the placeholders' embeddings."""
        if images is not None and inputs_embeds is None and input_ids is not None:
            inputs_embeds = self.embed_with_images(input_ids, images, attention_mask)
            input_ids = None
        return super().forward(  # type: ignore[misc]
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )

    @torch.no_grad()
    def segment(
        self, images: torch.Tensor, sequences: torch.Tensor, attention_mask: torch.Tensor, start: int
    ) -> list[torch.Tensor | None]:
        """Mask logits (1, D, H, W) per row whose text from position ``start`` on holds [SEG], else None.

        The prompt for the mask is the LM's last hidden state at the position that
        predicts [SEG] (the mean over several), as the published model was trained;
        it is recomputed in one forward over prompt + answer.
        """
        inner = self.model  # type: ignore[attr-defined]
        seg_id = self.config.seg_token_id  # type: ignore[attr-defined]
        if getattr(inner, "seg_module", None) is None or seg_id is None:
            raise ValueError("This checkpoint has no [SEG] head (segmentation_module / seg_token_id unset).")
        is_seg = sequences == int(seg_id)
        is_seg[:, :start] = False
        predicts_seg = is_seg[:, 1:]
        if not predicts_seg.any():
            return [None] * sequences.shape[0]
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = self(
            input_ids=sequences,
            attention_mask=attention_mask,
            position_ids=position_ids,
            images=images,
            output_hidden_states=True,
            use_cache=False,
        ).hidden_states[-1][:, :-1]
        out: list[torch.Tensor | None] = []
        for row in range(sequences.shape[0]):
            if not predicts_seg[row].any():
                out.append(None)
                continue
            state = hidden[row][predicts_seg[row]].mean(dim=0, keepdim=True)
            prompt = inner.seg_projector(state)
            out.append(inner.seg_module(images[row : row + 1].to(prompt.dtype), prompt)[0])
        return out

    def prepare_inputs_for_generation(self, *args, images=None, is_first_iteration=False, **kwargs):  # type: ignore[no-untyped-def]
        """Images only in the prefill: decode steps read the cache."""
        inputs = super().prepare_inputs_for_generation(  # type: ignore[misc]
            *args, is_first_iteration=is_first_iteration, **kwargs
        )
        if images is not None and (is_first_iteration or not kwargs.get("use_cache", True)):
            inputs["images"] = images
        return inputs


def _add_multimodal_modules(model: nn.Module, config: LamedVisionMixin) -> None:
    """The published ``model.vision_tower`` / ``model.mm_projector``, and the [SEG] head when configured."""
    model.vision_tower = ViT3DTower(config)
    model.mm_projector = SpatialPoolingProjector(config)
    if config.segmentation_module:
        if "segvol" not in str(config.segmentation_module).lower():
            raise ValueError(
                f"Only the 'segvol' segmentation module is implemented, not {config.segmentation_module!r}."
            )
        from inference_service.backends.m3d_segvol import SegVolHead, seg_projector

        model.seg_module = SegVolHead(config)
        model.seg_projector = seg_projector(int(config.hidden_size), int(config.mm_hidden_size))


class LamedPhi3Model(Phi3Model):
    config_class = LamedPhi3Config

    def __init__(self, config: LamedPhi3Config) -> None:
        super().__init__(config)
        _add_multimodal_modules(self, config)


class LamedPhi3ForCausalLM(_LamedCausalLM, Phi3ForCausalLM):
    config_class = LamedPhi3Config

    def __init__(self, config: LamedPhi3Config) -> None:
        Phi3PreTrainedModel.__init__(self, config)  # the parent's would build a plain LM
        self.model = LamedPhi3Model(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


class LamedLlamaModel(LlamaModel):
    config_class = LamedLlamaConfig

    def __init__(self, config: LamedLlamaConfig) -> None:
        super().__init__(config)
        _add_multimodal_modules(self, config)


class LamedLlamaForCausalLM(_LamedCausalLM, LlamaForCausalLM):
    config_class = LamedLlamaConfig

    def __init__(self, config: LamedLlamaConfig) -> None:
        LlamaPreTrainedModel.__init__(self, config)  # the parent's would build a plain LM
        self.model = LamedLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


def register() -> None:
    """Make AutoConfig / AutoModelForCausalLM resolve the published model types (idempotent)."""
    for config_class, model_class in (
        (LamedPhi3Config, LamedPhi3ForCausalLM),
        (LamedLlamaConfig, LamedLlamaForCausalLM),
    ):
        with contextlib.suppress(ValueError):  # already registered by an earlier import
            AutoConfig.register(config_class.model_type, config_class)
        with contextlib.suppress(ValueError):
            AutoModelForCausalLM.register(config_class, model_class)


register()
