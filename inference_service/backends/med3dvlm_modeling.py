"""Med3DVLM as transformers classes: DCFormer 3D encoder, dual-stream MLP-Mixer projector,
Qwen2 causal LM with visual tokens spliced in, and the DCFormer-text contrastive pair.

Written here from the paper (Med3DVLM, IEEE 2025) and the shapes of the public
checkpoint (mirthAI/Med3DVLM): module names follow the published state-dict
layout so ``from_pretrained`` loads a published directory as is, with
``trust_remote_code=False``. Importing this module registers the config types
``vlm_qwen`` (the VLM) and ``dec_clip`` (the contrastive pair) with the Auto classes.

Shapes, for the published 128x256x256 (depth, height, width) input:

- DCFormer (the "small" variant) works on (height, width, depth). A stem of four
  decomposed convolutions (stride 4) and four stages of decomposed-convolution
  blocks (each halving the grid) give feature maps of 64, 96, 192, 384, 768
  channels; every 3D kxkxk convolution is three 1D ones (kx1x1 + 1xkx1 + 1x1xk).
- The last two stages feed the projector: 8x8x4 = 256 "low" tokens of width
  384 and 4x4x2 = 32 "high" tokens of width 768.
- Each stream goes through MLP-Mixer layers (token mixing, then channel
  mixing): low 256 -> 192 -> 128 tokens, high 32 -> 64 -> 128 tokens, widths
  doubling up to the LM's hidden size; the two are concatenated: 256 tokens.
- Those 256 embeddings replace the embeddings of the ``<im_patch>`` placeholder
  tokens of the prompt (``config.image_token_id``), in order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2Model,
)
from transformers.models.qwen2.modeling_qwen2 import Qwen2PreTrainedModel

#: DCFormer "small", the encoder of the published model.
DCFORMER_CHANNELS = (64, 96, 192, 384, 768)
DCFORMER_BLOCKS = (1, 2, 3, 6, 2)
DCFORMER_KERNELS = (13, 11, 9, 7)
IMAGE_TOKEN = "<im_patch>"


# -- DCFormer -------------------------------------------------------------------------
class DecompConv3D(nn.Module):
    """A kxkxk 3D convolution decomposed into three 1D convolutions, summed.

    Each branch is Conv3d + BatchNorm (keys ``c1.0``/``c1.1`` ...); cost grows
    with 3k instead of k^3, which is what makes 128x256x256 input affordable.
    """

    def __init__(self, in_dim: int, out_dim: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        half = kernel // 2
        shapes = (
            ((kernel, 1, 1), (half, 0, 0)),
            ((1, kernel, 1), (0, half, 0)),
            ((1, 1, kernel), (0, 0, half)),
        )
        for i, (k, pad) in enumerate(shapes, start=1):
            conv = nn.Conv3d(in_dim, out_dim, kernel_size=k, padding=pad, stride=stride, groups=groups)
            setattr(self, f"c{i}", nn.Sequential(conv, nn.BatchNorm3d(out_dim)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c1(x) + self.c2(x) + self.c3(x)


class ChannelMLP(nn.Module):
    """Pointwise feed-forward (keys ``mlp.0`` and ``mlp.3``; dropout slots kept for the layout)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0), nn.Linear(hidden, dim), nn.Dropout(0.0)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


def decomposed_stem(in_dim: int, out_dim: int) -> nn.Sequential:
    """Stride-4 entry: one 7-wide decomposed conv, then three 3-wide ones (no activation)."""
    return nn.Sequential(
        DecompConv3D(in_dim, out_dim, 7, stride=4),
        DecompConv3D(out_dim, out_dim, 3),
        DecompConv3D(out_dim, out_dim, 3),
        DecompConv3D(out_dim, out_dim, 3),
    )


class DecompConvBlock(nn.Module):
    """ConvNeXt-like block: depthwise decomposed conv, channel MLP, layer scale, residual.

    The first block of a stage halves the grid (max-pool) and changes width (1x1 conv).
    """

    def __init__(self, in_dim: int, out_dim: int, kernel: int, downsample: bool) -> None:
        super().__init__()
        self.downsample = downsample
        if downsample:
            self.pool = nn.MaxPool3d(3, 2, 1)
            self.proj = nn.Conv3d(in_dim, out_dim, 1, 1, 0, bias=False)
        self.dwconv = DecompConv3D(out_dim, out_dim, kernel, groups=out_dim)
        self.mlp = ChannelMLP(out_dim, 4 * out_dim)
        self.scale = nn.Parameter(torch.full((out_dim,), 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample:
            x = self.proj(self.pool(x))
        y = self.dwconv(x).permute(0, 2, 3, 4, 1)  # channels last for the MLP
        y = (self.scale * self.mlp(y)).permute(0, 4, 1, 2, 3)
        return x + y


class DCFormerEncoder(nn.Module):
    """Stages ``s0`` (stem) .. ``s4``; returns every stage's features."""

    def __init__(
        self, in_channels: int, channels: Sequence[int], blocks: Sequence[int], kernels: Sequence[int]
    ) -> None:
        super().__init__()
        if len(channels) != 5 or len(blocks) != 5 or len(kernels) != 4:
            raise ValueError("DCFormer needs 5 channel widths, 5 block counts and 4 kernel sizes.")
        self.s0 = nn.Sequential(
            *[decomposed_stem(in_channels if i == 0 else channels[0], channels[0]) for i in range(blocks[0])]
        )
        for s in range(1, 5):
            stage = [
                DecompConvBlock(
                    channels[s - 1] if i == 0 else channels[s], channels[s], kernels[s - 1], i == 0
                )
                for i in range(blocks[s])
            ]
            setattr(self, f"s{s}", nn.Sequential(*stage))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = x.permute(0, 1, 3, 4, 2)  # (B, C, D, H, W) -> (B, C, H, W, D): the published axis order
        out = []
        for s in range(5):
            x = getattr(self, f"s{s}")(x)
            out.append(x)
        return out


class DCFormer(nn.Module):
    """The encoder plus token flattening: each stage as (B, D*H*W tokens in depth-major order, C)."""

    def __init__(
        self,
        in_channels: int = 1,
        channels: Sequence[int] = DCFORMER_CHANNELS,
        blocks: Sequence[int] = DCFORMER_BLOCKS,
        kernels: Sequence[int] = DCFORMER_KERNELS,
    ) -> None:
        super().__init__()
        self.channels = list(channels)
        self.encoder = DCFormerEncoder(in_channels, channels, blocks, kernels)

    def forward(self, volume: torch.Tensor) -> list[torch.Tensor]:
        # (B, C, H, W, D) -> (B, D, H, W, C) -> (B, D*H*W, C)
        return [f.permute(0, 4, 2, 3, 1).flatten(1, 3) for f in self.encoder(volume)]


class VisionTower(nn.Module):
    """DCFormer and the choice of stages handed to the projector (``vision_select_layer``)."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        if getattr(config, "vision_tower", "dcformer") != "dcformer":
            raise ValueError(f"Only the dcformer vision tower is implemented, not {config.vision_tower!r}.")
        self.select_layer = int(getattr(config, "vision_select_layer", -2))
        if self.select_layer >= 0:
            raise ValueError(f"vision_select_layer must be negative (last stages), got {self.select_layer}.")
        self.vision_tower = DCFormer(
            1,
            getattr(config, "dcformer_channels", None) or DCFORMER_CHANNELS,
            getattr(config, "dcformer_num_blocks", None) or DCFORMER_BLOCKS,
            getattr(config, "dcformer_kernel_sizes", None) or DCFORMER_KERNELS,
        )

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.vision_tower(images)[self.select_layer :]


# -- projector ------------------------------------------------------------------------
class MLPStack(nn.Module):
    """Linear, then (GELU, Linear) x (depth - 1); keys ``mm_projector.0``, ``mm_projector.1.1``..."""

    def __init__(self, in_dim: int, out_dim: int, depth: int) -> None:
        super().__init__()
        rest = [nn.Sequential(nn.GELU(), nn.Linear(out_dim, out_dim)) for _ in range(depth - 1)]
        self.mm_projector = nn.Sequential(nn.Linear(in_dim, out_dim), *rest)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mm_projector(x)


class MixerLayer(nn.Module):
    """MLP-Mixer step: (tokens, width) -> (tokens', width'): token mixing then channel mixing."""

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], depth: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(in_shape[1])
        self.ln2 = nn.LayerNorm(in_shape[1])
        self.mlp1 = MLPStack(in_shape[0], out_shape[0], depth)
        self.mlp2 = MLPStack(in_shape[1], out_shape[1], depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp1(self.ln1(x).transpose(1, 2)).transpose(1, 2)
        return self.mlp2(self.ln2(x))


class DualStreamMixerProjector(nn.Module):
    """Low-level (many tokens, narrow) and high-level (few tokens, wide) features, each mixed
    to (n_i tokens, LM width), then concatenated: n_low + n_high visual tokens."""

    def __init__(
        self,
        low_input: Sequence[int],
        low_tokens: Sequence[int],
        high_input: Sequence[int],
        high_tokens: Sequence[int],
        width: int,
        mlp_depth: int = 2,
    ) -> None:
        super().__init__()
        depth = len(low_tokens)
        if len(high_tokens) != depth:
            raise ValueError("low_output_size and high_output_size must have the same length.")
        if width % (2**depth):
            raise ValueError(f"LM width {width} must be divisible by 2**{depth}.")

        def stream(first: Sequence[int], tokens: Sequence[int]) -> nn.ModuleList:
            layers, shape = [], tuple(first)
            for i in range(depth):
                out = (tokens[i], width // 2 ** (depth - i - 1))
                layers.append(MixerLayer(shape, out, mlp_depth))
                shape = out
            return nn.ModuleList(layers)

        self.low_mixer = stream(low_input, low_tokens)
        self.high_mixer = stream(high_input, high_tokens)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        low, high = features
        for low_layer, high_layer in zip(self.low_mixer, self.high_mixer, strict=True):
            low, high = low_layer(low), high_layer(high)
        return torch.cat([low, high], dim=1)


# -- the VLM --------------------------------------------------------------------------
@strict
class Med3DVLMConfig(Qwen2Config):
    """Qwen2 config plus the published vision keys (``vision_tower``, ``mm_projector_type``, ...).

    ``dcformer_*`` are this implementation's keys for non-published encoder
    sizes (tests); absent, the published DCFormer-small is built.
    ``image_token_id`` is the placeholder's id (the published config does not
    store it; the backend sets it from the tokenizer's ``<im_patch>``).
    ``published_splice`` reproduces the published code's conditioning instead
    of replacing the placeholders: the visual tokens overwrite the N positions
    after the first placeholder (so that placeholder keeps its text embedding
    and the prompt's first token after the run is dropped), as in training.
    """

    model_type = "vlm_qwen"

    vision_tower: str = "dcformer"
    input_size: list[int] | tuple[int, ...] = (256, 256, 128)
    vision_select_layer: int = -2
    vision_select_feature: str = "cls_patch"
    mm_projector_type: str = "mixer"
    mm_mlp_depth: int = 2
    proj_out_num: int = 256
    low_input_size: list[int] | tuple[int, ...] = (256, 384)
    high_input_size: list[int] | tuple[int, ...] = (32, 768)
    low_output_size: list[int] | tuple[int, ...] = (192, 128)
    high_output_size: list[int] | tuple[int, ...] = (64, 128)
    mm_hidden_size: int = 768
    dcformer_channels: list[int] | tuple[int, ...] | None = None
    dcformer_num_blocks: list[int] | tuple[int, ...] | None = None
    dcformer_kernel_sizes: list[int] | tuple[int, ...] | None = None
    image_token_id: int | None = None
    published_splice: bool = False


class Med3DVLMModel(Qwen2Model):
    """Qwen2 decoder plus ``vision_tower`` and ``mm_projector`` (the published module names)."""

    config_class = Med3DVLMConfig

    def __init__(self, config: Med3DVLMConfig) -> None:
        super().__init__(config)
        if config.mm_projector_type != "mixer":
            raise ValueError(f"Only the 'mixer' projector is implemented, not {config.mm_projector_type!r}.")
        self.vision_tower = VisionTower(config)
        self.mm_projector = DualStreamMixerProjector(
            config.low_input_size,
            config.low_output_size,
            config.high_input_size,
            config.high_output_size,
            config.hidden_size,
            config.mm_mlp_depth,
        )
        self.post_init()


class Med3DVLMForCausalLM(Qwen2ForCausalLM):
    """Qwen2ForCausalLM whose prompt embeddings at ``<im_patch>`` positions are the CT's visual tokens."""

    config_class = Med3DVLMConfig

    def __init__(self, config: Med3DVLMConfig) -> None:
        # Skip Qwen2ForCausalLM.__init__: it would build (and then drop) a plain Qwen2Model.
        Qwen2PreTrainedModel.__init__(self, config)
        self.model = Med3DVLMModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) in [0, 1] -> (B, proj_out_num, hidden_size)."""
        vision = self.model.vision_tower
        first = next(vision.parameters())
        return self.model.mm_projector(vision(images.to(device=first.device, dtype=first.dtype)))

    def splice(self, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        """Token embeddings with row i's placeholders replaced, in order, by image_features[i]."""
        token_id = self.config.image_token_id
        if token_id is None:
            raise ValueError("config.image_token_id is not set (the id of the <im_patch> token).")
        embeds = self.model.embed_tokens(input_ids)
        mask = input_ids == token_id
        expected = image_features.shape[1]
        if self.config.published_splice:
            first = torch.where(mask.any(dim=1), mask.int().argmax(dim=1), input_ids.shape[1])[:, None]
            pos = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
            mask = (pos > first) & (pos <= first + expected)
        counts = mask.sum(dim=1).tolist()
        if image_features.shape[0] != input_ids.shape[0] or any(c != expected for c in counts):
            raise ValueError(
                f"Each prompt needs exactly {expected} image placeholder tokens; got {counts} "
                f"for {image_features.shape[0]} image(s)."
            )
        return embeds.masked_scatter(mask.unsqueeze(-1), image_features.to(embeds.dtype))

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
        # Only the prefill carries placeholders; decode steps (one token each, shorter than the
        # visual tokens) are not even inspected, which spares a device sync per generated token.
        if (
            images is not None
            and inputs_embeds is None
            and input_ids is not None
            and input_ids.shape[1] >= self.config.proj_out_num
            and self.config.image_token_id is not None
            and bool((input_ids == self.config.image_token_id).any())
        ):
            inputs_embeds = self.splice(input_ids, self.encode_images(images))
            input_ids = None
        return super().forward(
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


# -- the contrastive pair (DCFormer + text encoder, SigLIP loss) ----------------------
@strict
class Med3DVLMClipConfig(PreTrainedConfig):
    """The published ``dec_clip`` keys; ``text_config`` (this implementation's) holds the text
    encoder's config, which the published directory only names (``language_model_name_or_path``)."""

    model_type = "dec_clip"

    language_model_name_or_path: str = ""
    vision_encoder: str = "dcformer"
    input_size: list[int] | tuple[int, ...] = (256, 256, 128)
    dim: int = 768
    depth: int = 12
    hidden_size: int = 512
    mlp_depth: int = 2
    loss_type: str = "sigmoid"
    t_prime: float = 2.659260036932778  # log(1 / 0.07)
    bias: float = 0.0
    local_loss: bool = False
    gather_loss: bool = True
    efficient_loss: bool = False
    text_config: dict | None = None
    dcformer_channels: list[int] | tuple[int, ...] | None = None
    dcformer_num_blocks: list[int] | tuple[int, ...] | None = None
    dcformer_kernel_sizes: list[int] | tuple[int, ...] | None = None


class Med3DVLMClipModel(PreTrainedModel):
    """Image and text into one normalized space; sigmoid(t * cos + b) scores a pair (SigLIP)."""

    config_class = Med3DVLMClipConfig
    base_model_prefix = "clip"

    def __init__(self, config: Med3DVLMClipConfig) -> None:
        super().__init__(config)
        if config.vision_encoder != "dcformer":
            raise ValueError(
                f"Only the dcformer vision encoder is implemented, not {config.vision_encoder!r}."
            )
        if not config.text_config:
            raise ValueError(
                "The contrastive checkpoint has no text_config; give the text encoder's local directory "
                f"(the published config names {config.language_model_name_or_path!r})."
            )
        text_cfg = AutoConfig.for_model(**config.text_config)
        self.vision_encoder = DCFormer(
            1,
            config.dcformer_channels or DCFORMER_CHANNELS,
            config.dcformer_num_blocks or DCFORMER_BLOCKS,
            config.dcformer_kernel_sizes or DCFORMER_KERNELS,
        )
        self.language_encoder = AutoModel.from_config(text_cfg)
        text_width = getattr(text_cfg, "dim", None) or text_cfg.hidden_size
        self.mm_vision_proj = nn.Linear(self.vision_encoder.channels[-1], config.hidden_size)
        self.mm_language_proj = nn.Linear(text_width, config.hidden_size)
        if config.loss_type == "sigmoid":
            self.t_prime = nn.Parameter(torch.tensor(float(config.t_prime)))
            self.bias = nn.Parameter(torch.tensor(float(config.bias)))
        else:
            self.logit_scale = nn.Parameter(torch.tensor(float(config.t_prime)))
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:  # weights come from the checkpoint
        pass

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        last = self.vision_encoder(images.to(self.mm_vision_proj.weight.dtype))[-1]
        return F.normalize(self.mm_vision_proj(last.mean(dim=1)), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.language_encoder(input_ids, attention_mask=attention_mask)["last_hidden_state"]
        return F.normalize(self.mm_language_proj(hidden[:, 0]), dim=-1)

    def pair_logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """(images, texts) logits: SigLIP's exp(t') * cos + b, or CLIP's scale * cos."""
        cos = image_embeds @ text_embeds.T
        if self.config.loss_type == "sigmoid":
            return cos * self.t_prime.exp() + self.bias
        return cos * self.logit_scale

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        return self.pair_logits(self.encode_image(images), self.encode_text(input_ids, attention_mask))


AutoConfig.register("vlm_qwen", Med3DVLMConfig, exist_ok=True)
AutoModelForCausalLM.register(Med3DVLMConfig, Med3DVLMForCausalLM, exist_ok=True)
AutoConfig.register("dec_clip", Med3DVLMClipConfig, exist_ok=True)
AutoModel.register(Med3DVLMClipConfig, Med3DVLMClipModel, exist_ok=True)
