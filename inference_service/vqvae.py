"""The PaliGemma segmentation-token decoder (VQ-VAE), in PyTorch, loading big_vision's npz.

16 ``<segNNN>`` codes index a 128-entry codebook; the 4x4 grid of embeddings
goes through a 1x1 conv, two residual blocks and four stride-2 transposed
convolutions to a 64x64 map in about [-1, 1]; > 0 is "inside". The npz
(``vae-oid.npz``) stores PyTorch-layout tensors under these keys:
``_vq_vae._embedding``; ``decoder.0``; residual blocks ``decoder.2.net.{0,2,4}``
and ``decoder.3.net.{0,2,4}``; transposed convs ``decoder.4/6/8/10``; the
output conv ``decoder.12`` (each as ``.weight`` and ``.bias``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from inference_service.errors import CheckpointError

CODES_PER_MASK = 16
GRID = 4
MASK_SIZE = 64
CONVS = ["decoder.0", *[f"decoder.{b}.net.{i}" for b in (2, 3) for i in (0, 2, 4)]]
UPSAMPLES = ["decoder.4", "decoder.6", "decoder.8", "decoder.10"]
OUTPUT = "decoder.12"
EMBEDDING = "_vq_vae._embedding"


class _ResBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(dim, dim, 3, padding=1), nn.ReLU(), nn.Conv2d(dim, dim, 3, padding=1), nn.ReLU(),
            nn.Conv2d(dim, dim, 1),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class MaskDecoder(nn.Module):
    """Codes (batch, 16) -> masks (batch, 64, 64), float in about [-1, 1]."""

    def __init__(self, embedding: np.ndarray, weights: dict[str, np.ndarray]) -> None:
        super().__init__()
        self.embedding = nn.Parameter(
            torch.from_numpy(np.asarray(embedding, np.float32)), requires_grad=False
        )
        dim_in = self.embedding.shape[1]
        dim = weights["decoder.0.weight"].shape[0]
        self.inp = nn.Conv2d(dim_in, dim, 1)
        self.res = nn.Sequential(_ResBlock(dim), _ResBlock(dim))
        ups = []
        for name in UPSAMPLES:
            cin, cout = weights[f"{name}.weight"].shape[:2]  # ConvTranspose2d layout (in, out, kh, kw)
            ups += [nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1), nn.ReLU()]
        self.up = nn.Sequential(*ups)
        self.out = nn.Conv2d(weights[f"{OUTPUT}.weight"].shape[1], 1, 1)
        targets = {"decoder.0": self.inp, OUTPUT: self.out}
        for b, block in zip((2, 3), self.res, strict=True):
            for i in (0, 2, 4):
                targets[f"decoder.{b}.net.{i}"] = block.net[i]
        for name, layer in zip(UPSAMPLES, self.up[::2], strict=True):
            targets[name] = layer
        with torch.no_grad():
            for name, layer in targets.items():
                w, b = weights[f"{name}.weight"], weights[f"{name}.bias"]
                if tuple(layer.weight.shape) != w.shape:
                    raise CheckpointError(
                        f"{name}.weight has shape {w.shape}, expected {tuple(layer.weight.shape)}."
                    )
                layer.weight.copy_(torch.from_numpy(np.asarray(w, np.float32)))
                layer.bias.copy_(torch.from_numpy(np.asarray(b, np.float32)))
        self.eval()

    @classmethod
    def from_npz(cls, path: Path) -> MaskDecoder:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"Segmentation decoder {path} does not exist.")
        with np.load(path) as npz:
            data = {k: npz[k] for k in npz.files}
        needed = [EMBEDDING] + [f"{n}.{p}" for n in (*CONVS, *UPSAMPLES, OUTPUT) for p in ("weight", "bias")]
        missing = [k for k in needed if k not in data]
        if missing:
            raise CheckpointError(f"Segmentation decoder {path.name} is missing {missing[0]}.")
        return cls(data[EMBEDDING], data)

    @torch.inference_mode()
    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        if codes.ndim != 2 or codes.shape[1] != CODES_PER_MASK:
            raise ValueError(f"Expected (batch, {CODES_PER_MASK}) codes, got {tuple(codes.shape)}.")
        x = self.embedding[codes.long()]  # (b, 16, d)
        x = x.reshape(codes.shape[0], GRID, GRID, -1).permute(0, 3, 1, 2)
        x = self.out(self.up(self.res(torch.relu(self.inp(x)))))
        return x[:, 0]

    def decode(self, codes: Sequence[int]) -> np.ndarray:
        """One mask: 16 codes -> (64, 64) float32."""
        return self(torch.tensor([list(codes)])).cpu().numpy()[0]
