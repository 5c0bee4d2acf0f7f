"""Preprocessing presets in pure numpy, each with an invertible geometry record.

Models see square images of a fixed size; every box and mask they return must
land on the right source pixels. ``SquareFit`` records the zero padding to a
square and the resize, and maps model-space coordinates and masks back exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

#: MedGemma 1.5 CT windows (HU): wide, soft tissue/mediastinum, brain.
CT_WINDOWS: tuple[tuple[float, float], ...] = ((-1024.0, 1024.0), (-135.0, 215.0), (0.0, 80.0))
MAX_CT_SLICES = 85


def window(image: np.ndarray, low: float, high: float) -> np.ndarray:
    """Values clipped to [low, high] and scaled to [0, 1]."""
    return np.clip((image.astype(np.float32) - low) / max(high - low, 1e-6), 0.0, 1.0)


def voi(image: np.ndarray, center_width: tuple[float, float] | None = None) -> np.ndarray:
    """A DICOM VOI window if given, else robust min-max (0.5 / 99.5 percentiles)."""
    if center_width is not None and center_width[1] > 0:
        c, w = center_width
        return window(image, c - w / 2, c + w / 2)
    lo, hi = np.percentile(image, [0.5, 99.5])
    return window(image, float(lo), float(hi) if hi > lo else float(lo) + 1.0)


def ct_rgb(hu: np.ndarray) -> np.ndarray:
    """One CT slice as uint8 RGB, one window per channel (MedGemma 1.5 CT input)."""
    return np.stack([(window(hu, lo, hi) * 255).round().astype(np.uint8) for lo, hi in CT_WINDOWS], axis=-1)


def grey_rgb(image01: np.ndarray) -> np.ndarray:
    g = (np.clip(image01, 0, 1) * 255).round().astype(np.uint8)
    return np.stack([g, g, g], axis=-1)


#: Named intensity presets a model entry may choose with ``preprocess = "..."``.
#: "" (auto): CT in HU -> three windows in RGB, anything else -> the DICOM window or min-max.
PRESETS = ("", "window", "minmax", "ct3")


def to_rgb(
    image: np.ndarray,
    modality: str,
    rescaled: bool,
    dicom_window: tuple[float, float] | None,
    preset: str = "",
) -> np.ndarray:
    """One slice -> uint8 RGB by a named preset (see PRESETS)."""
    if preset not in PRESETS:
        raise ValueError(
            f"Unknown preprocess preset {preset!r}; known: {', '.join(p or 'auto' for p in PRESETS)}."
        )
    is_hu = modality == "CT" and rescaled
    if preset == "ct3" or (preset == "" and is_hu):
        if not is_hu:
            raise ValueError("The ct3 preset needs CT values in Hounsfield units.")
        return ct_rgb(image)
    if preset == "minmax":
        return grey_rgb(voi(image, None))
    return grey_rgb(voi(image, dicom_window))


def sample_slices(n_slices: int, max_slices: int = MAX_CT_SLICES) -> list[int]:
    """Uniformly spaced slice indices (all of them when there are few)."""
    if n_slices <= max_slices:
        return list(range(n_slices))
    return [int(round(i)) for i in np.linspace(0, n_slices - 1, max_slices)]


@dataclass(frozen=True)
class SquareFit:
    """Zero-pad (rows, columns) to a centred square of ``side``, then resize to ``size``."""

    rows: int
    columns: int
    size: int

    @property
    def side(self) -> int:
        return max(self.rows, self.columns)

    @property
    def pad_top(self) -> int:
        return (self.side - self.rows) // 2

    @property
    def pad_left(self) -> int:
        return (self.side - self.columns) // 2

    @property
    def scale(self) -> float:
        """Model pixels per source pixel."""
        return self.size / self.side

    def apply(self, image: np.ndarray) -> np.ndarray:
        """uint8 (H, W[, 3]) -> uint8 (size, size[, 3]), bilinear."""
        if image.shape[:2] != (self.rows, self.columns):
            raise ValueError(f"Image {image.shape[:2]} does not match {(self.rows, self.columns)}.")
        padded = np.zeros((self.side, self.side, *image.shape[2:]), dtype=image.dtype)
        padded[self.pad_top : self.pad_top + self.rows, self.pad_left : self.pad_left + self.columns] = image
        if self.side == self.size:
            return padded
        return np.asarray(Image.fromarray(padded).resize((self.size, self.size), Image.BILINEAR))

    def to_source(self, y: float, x: float) -> tuple[float, float]:
        """A model-space point (y, x) in pixels -> source (row, column), clamped to the image."""
        row = y / self.scale - self.pad_top
        col = x / self.scale - self.pad_left
        return float(np.clip(row, 0, self.rows)), float(np.clip(col, 0, self.columns))

    def box_from_normalized(
        self, y0: float, x0: float, y1: float, x1: float, scale: float
    ) -> tuple[float, ...]:
        """A box on 0..scale of the square model input (e.g. 1000, 1024 bins) -> source pixels."""
        f = self.size / scale
        r0, c0 = self.to_source(min(y0, y1) * f, min(x0, x1) * f)
        r1, c1 = self.to_source(max(y0, y1) * f, max(x0, x1) * f)
        return r0, c0, r1, c1

    def mask_to_source(self, mask: np.ndarray) -> np.ndarray:
        """A (size, size) bool mask in model space -> (rows, columns) bool in source space."""
        if mask.shape != (self.size, self.size):
            raise ValueError(f"Mask {mask.shape} is not {self.size}x{self.size}.")
        image = Image.fromarray(mask.astype(np.uint8) * 255)
        square = np.asarray(image.resize((self.side, self.side), Image.NEAREST)) > 127
        return square[self.pad_top : self.pad_top + self.rows, self.pad_left : self.pad_left + self.columns]
