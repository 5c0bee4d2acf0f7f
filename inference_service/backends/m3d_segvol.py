"""M3D-LaMed's ``[SEG]`` head: a SegVol-style volumetric SAM, prompted by the LM's [SEG] state.

How the published model makes a mask: the LM's last hidden state that predicts
the ``[SEG]`` token (the mean if several) goes through ``seg_projector`` (an
MLP to the ViT width) and becomes the one prompt token of a 3D SAM:
a ViT (no class token) encodes the cube into a patch grid; a two-way
transformer lets the output tokens (1 IoU + 4 mask tokens + the prompt)
and the grid attend to each other; two transposed convolutions upscale the
grid 4x; the first mask token's hypernetwork MLP gives per-voxel weights,
plus the similarity of the grid with the prompt; the logits are resized
trilinearly to the input cube. Parameter names follow the published
``model.seg_module.*`` (image_encoder / prompt_encoder / mask_decoder).

Sizes fixed in the published code are kept (decoder depth 2, 8 heads, MLP
2048, IoU head 256, mask input channels 16); the widths come from the config
(``mm_hidden_size``, 768 published) so tiny checkpoints can exist.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from inference_service.backends.m3d_modeling import LamedVisionMixin, PatchEmbedding, ViTBlock, _triple

DECODER_DEPTH = 2
DECODER_HEADS = 8
DECODER_MLP = 2048
IOU_HIDDEN = 256
MASK_IN_CHANS = 16
MASK_TOKENS = 4  # 3 multimask outputs + 1 single


class SegEncoder(nn.Module):
    """The SegVol ViT: the encoder layout without a class token."""

    def __init__(self, config: LamedVisionMixin) -> None:
        super().__init__()
        width = int(config.mm_hidden_size)
        image = _triple(config.image_size, "image_size")
        patch = _triple(config.patch_size, "patch_size")
        self.patch_embedding = PatchEmbedding(int(config.image_channel), image, patch, width)
        self.blocks = nn.ModuleList(
            ViTBlock(width, int(config.vision_num_heads), int(config.vision_mlp_dim))
            for _ in range(int(config.vision_num_layers))
        )
        self.norm = nn.LayerNorm(width)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(images)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class LayerNorm2d(nn.Module):
    """Channel LayerNorm over (b, c, h, w), SAM's."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class RandomFourierPositions(nn.Module):
    """Dense positional encoding of the patch grid from a fixed random 3 x (width/2) matrix."""

    def __init__(self, half_width: int) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(3, half_width))

    def forward(self, grid: tuple[int, int, int]) -> torch.Tensor:
        gaussian = self.positional_encoding_gaussian_matrix
        axes = [(torch.arange(n, device=gaussian.device, dtype=gaussian.dtype) + 0.5) / n for n in grid]
        a0, a1, a2 = torch.meshgrid(*axes, indexing="ij")
        coords = torch.stack([a1, a0, a2], dim=-1)  # the published (x, y, z) = (axis 1, axis 0, axis 2)
        proj = 2 * math.pi * ((2 * coords - 1) @ gaussian)
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1).permute(3, 0, 1, 2)


class PromptEncoder(nn.Module):
    """Only the text-prompt path runs; point, box and mask embeddings exist for the weight layout."""

    def __init__(self, width: int, grid: tuple[int, int, int]) -> None:
        super().__init__()
        self.grid = grid
        self.pe_layer = RandomFourierPositions(width // 2)
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, width) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, width)
        c = MASK_IN_CHANS
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, c // 4, kernel_size=2, stride=2),
            LayerNorm2d(c // 4),
            nn.GELU(),
            nn.Conv2d(c // 4, c, kernel_size=2, stride=2),
            LayerNorm2d(c),
            nn.GELU(),
            nn.Conv2d(c, width, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, width)

    def forward(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sparse (b, 1, width), dense (b, width, *grid)) for a text prompt (b, width)."""
        dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1, 1).expand(text.shape[0], -1, *self.grid)
        return text[:, None, :], dense


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, downsample: int = 1) -> None:
        super().__init__()
        inner = width // downsample
        if inner % heads:
            raise ValueError(f"Decoder width {inner} is not divisible by {heads} heads.")
        self.heads = heads
        self.q_proj = nn.Linear(width, inner)
        self.k_proj = nn.Linear(width, inner)
        self.v_proj = nn.Linear(width, inner)
        self.out_proj = nn.Linear(inner, width)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.heads, c // self.heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = F.scaled_dot_product_attention(
            self._split(self.q_proj(q)), self._split(self.k_proj(k)), self._split(self.v_proj(v))
        )
        b, h, n, c = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * c))


class TokenMLP(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.lin1 = nn.Linear(width, hidden)
        self.lin2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(F.relu(self.lin1(x)))


class TwoWayBlock(nn.Module):
    """Tokens self-attend, attend to the grid, MLP; then the grid attends to the tokens."""

    def __init__(self, width: int, first: bool) -> None:
        super().__init__()
        self.first = first
        self.self_attn = Attention(width, DECODER_HEADS)
        self.norm1 = nn.LayerNorm(width)
        self.cross_attn_token_to_image = Attention(width, DECODER_HEADS, 2)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = TokenMLP(width, DECODER_MLP)
        self.norm3 = nn.LayerNorm(width)
        self.norm4 = nn.LayerNorm(width)
        self.cross_attn_image_to_token = Attention(width, DECODER_HEADS, 2)

    def forward(
        self, tokens: torch.Tensor, grid: torch.Tensor, token_pe: torch.Tensor, grid_pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.first:  # the first layer's tokens carry no positional term and no residual
            tokens = self.self_attn(tokens, tokens, tokens)
        else:
            q = tokens + token_pe
            tokens = tokens + self.self_attn(q, q, tokens)
        tokens = self.norm1(tokens)
        tokens = self.norm2(tokens + self.cross_attn_token_to_image(tokens + token_pe, grid + grid_pe, grid))
        tokens = self.norm3(tokens + self.mlp(tokens))
        grid = self.norm4(grid + self.cross_attn_image_to_token(grid + grid_pe, tokens + token_pe, tokens))
        return tokens, grid


class TwoWayTransformer(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TwoWayBlock(width, i == 0) for i in range(DECODER_DEPTH))
        self.final_attn_token_to_image = Attention(width, DECODER_HEADS, 2)
        self.norm_final_attn = nn.LayerNorm(width)

    def forward(
        self, grid: torch.Tensor, grid_pe: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        grid = grid.flatten(2).transpose(1, 2)
        grid_pe = grid_pe.flatten(2).transpose(1, 2)
        token_pe, queries = tokens, tokens
        for layer in self.layers:
            queries, grid = layer(queries, grid, token_pe, grid_pe)
        queries = queries + self.final_attn_token_to_image(queries + token_pe, grid + grid_pe, grid)
        return self.norm_final_attn(queries), grid


class HeadMLP(nn.Module):
    def __init__(self, width: int, hidden: int, out: int, depth: int) -> None:
        super().__init__()
        dims = [width] + [hidden] * (depth - 1) + [out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class MaskDecoder(nn.Module):
    def __init__(self, width: int, grid: tuple[int, int, int]) -> None:
        super().__init__()
        self.transformer = TwoWayTransformer(width)
        self.iou_token = nn.Embedding(1, width)
        self.mask_tokens = nn.Embedding(MASK_TOKENS, width)
        up = tuple(2 * g for g in grid)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose3d(width, width // 4, kernel_size=2, stride=2),
            nn.LayerNorm((width // 4, *up)),
            nn.GELU(),
            nn.ConvTranspose3d(width // 4, width // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            HeadMLP(width, width, width // 8, 3) for _ in range(MASK_TOKENS)
        )
        self.iou_prediction_head = HeadMLP(width, IOU_HIDDEN, MASK_TOKENS, 3)
        self.txt_align_upscaled_embedding = nn.Linear(width, width // 8)

    def forward(
        self,
        grid: torch.Tensor,
        grid_pe: torch.Tensor,
        sparse: torch.Tensor,
        dense: torch.Tensor,
        text: torch.Tensor,
    ) -> torch.Tensor:
        """Single-mask logits (b, 1, *4x grid) for a batch of encoded grids and text prompts."""
        b, c, *shape = grid.shape
        out_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight])[None].expand(b, -1, -1)
        tokens = torch.cat([out_tokens, sparse], dim=1)
        hs, src = self.transformer(grid + dense, grid_pe.expand(b, -1, -1, -1, -1), tokens)
        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, *shape))
        b, c8, *up = upscaled.shape
        flat = upscaled.reshape(b, c8, -1)
        weights = self.output_hypernetworks_mlps[0](hs[:, 1])  # the single-mask output token
        similarity = self.txt_align_upscaled_embedding(text)
        return ((weights + similarity)[:, None, :] @ flat).reshape(b, 1, *up)


class SegVolHead(nn.Module):
    """``model.seg_module``: image_encoder + prompt_encoder + mask_decoder, text-prompted."""

    def __init__(self, config: LamedVisionMixin) -> None:
        super().__init__()
        width = int(config.mm_hidden_size)
        grid = config.patch_grid
        self.grid = grid
        self.image_encoder = SegEncoder(config)
        self.prompt_encoder = PromptEncoder(width, grid)
        self.mask_decoder = MaskDecoder(width, grid)

    def forward(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Mask logits (b, 1, D, H, W) at the input cube's size."""
        b = images.shape[0]
        grid = self.image_encoder(images).transpose(1, 2).reshape(b, -1, *self.grid)
        sparse, dense = self.prompt_encoder(text.to(grid.dtype))
        pe = self.prompt_encoder.pe_layer(self.grid)[None]
        logits = self.mask_decoder(grid, pe, sparse, dense, text.to(grid.dtype))
        return F.interpolate(logits, size=images.shape[2:], mode="trilinear", align_corners=False)


def seg_projector(hidden: int, width: int) -> nn.Sequential:
    """``model.seg_projector``: the [SEG] state (LM width) -> a prompt of the ViT width."""
    return nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, width), nn.Dropout(0.1))
