"""Key-image Secondary Capture: the AI result burned into RGB copies of a few source slices.

Why: many PACS and viewers show neither DICOM SEG nor TID 1500 SR, but every one shows a Secondary
Capture image. One plain SC Image Storage instance (1.2.840.10008.5.1.4.1.1.7, RGB) per key slice,
not one Multi-frame True Color SC: the single-frame class is the one every archive and viewer
accepts, each image names exactly its own source slice in SourceImageSequence, and the series pages
like any other series.

Key slices: per segment the slice of largest mask area, then the slices with boxes (highest score
first), without duplicates and at most ``MAX_KEY_IMAGES``. Each image is the source slice windowed
(the series' window, else a soft-tissue window for CT, else the slice's 1st..99th percentile),
enlarged to at least ``MIN_WIDTH`` columns so the labels stay legible, with the segments' outlines
(the same major components as the key-slice SR) and the boxes drawn in the segments' colours, and
labelled in the pixels ("AI RESULT - NOT FOR PRIMARY DIAGNOSIS", model, legend) and in the header
(BurnedInAnnotation YES, ImageType DERIVED\\SECONDARY, ConversionType WSD, an AI SeriesDescription).
Text is drawn with Pillow (already a dependency), no other library. Pillow's own font draws ASCII
only (not even "é"); a label with other characters (a bilingual model's Chinese finding names,
accented Latin, Cyrillic) is drawn with an installed font that has every one of its glyphs: one of
``FALLBACK_FONTS`` (Debian's fonts-dejavu-core, fonts-wqy-microhei, fonts-noto-cjk), else one that
fontconfig's ``fc-list :charset=...`` names. With none, the label is drawn as before (empty boxes)
and a warning says which package to install.
"""

from __future__ import annotations

import functools
import logging
import math
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset

from dicom_node._contours import major_components, outline

logger = logging.getLogger(__name__)

MAX_KEY_IMAGES = 8
MIN_WIDTH = 512  # smaller images are enlarged (nearest neighbour) by an integer factor
SOFT_TISSUE_WINDOW = (40.0, 400.0)  # CT centre / width in HU when the series names none
BANNER = "AI RESULT - NOT FOR PRIMARY DIAGNOSIS"
PALETTE = ((255, 64, 64), (64, 200, 255), (255, 200, 0), (80, 255, 80), (255, 64, 255), (255, 140, 0))
BOX_COLOUR = (255, 255, 0)
#: Fonts tried, in order, for a label that Pillow's own font cannot draw (Debian paths).
FALLBACK_FONTS = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",  # fonts-dejavu-core: Latin, Greek, Cyrillic
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",  # fonts-wqy-microhei: CJK
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",  # fonts-noto-cjk
)
_NO_GLYPH = "\U0010fffd"  # a private-use code point no font draws: what a font's missing glyph looks like
_PROBE_SIZE = 16


@dataclass(frozen=True)
class Overlay:
    """What is drawn on one key slice: outlines (label, colour, 2-D bool mask) and boxes
    (label, colour, (row_min, column_min, row_max, column_max))."""

    outlines: Sequence[tuple[str, tuple[int, int, int], np.ndarray]]
    boxes: Sequence[tuple[str, tuple[int, int, int], tuple[float, float, float, float]]]


def choose_key_slices(
    segment_slices: Sequence[int | None], box_slices: Sequence[tuple[int, float]], limit: int = MAX_KEY_IMAGES
) -> list[int]:
    """The key slices, ascending: each segment's largest-area slice (segment order) first, then box
    slices by score (highest first); duplicates once; at most ``limit``."""
    ranked = [k for k in segment_slices if k is not None]
    ranked += [k for k, _ in sorted(box_slices, key=lambda b: -b[1])]
    chosen: list[int] = []
    for k in ranked:
        if k not in chosen:
            chosen.append(k)
        if len(chosen) == limit:
            break
    return sorted(chosen)


def lab_to_rgb(lab: Sequence[int]) -> tuple[int, int, int] | None:
    """A DICOM-scaled CIELab colour (0..65535 each, as in a SEG) as 8-bit sRGB (D65); None if not 3 values."""
    if len(lab) != 3:
        return None
    lightness, a, b = lab[0] / 65535 * 100, lab[1] / 65535 * 255 - 128, lab[2] / 65535 * 255 - 128
    fy = (lightness + 16) / 116
    fx, fz = fy + a / 500, fy - b / 200

    def inverse(t: float) -> float:
        return t**3 if t > 6 / 29 else 3 * (6 / 29) ** 2 * (t - 4 / 29)

    x, y, z = 0.95047 * inverse(fx), inverse(fy), 1.08883 * inverse(fz)
    linear = (
        3.2406 * x - 1.5372 * y - 0.4986 * z,
        -0.9689 * x + 1.8758 * y + 0.0415 * z,
        0.0557 * x - 0.2040 * y + 1.0570 * z,
    )

    def gamma(c: float) -> int:
        c = min(max(c, 0.0), 1.0)
        v = 12.92 * c if c <= 0.0031308 else 1.055 * c ** (1 / 2.4) - 0.055
        return round(255 * v)

    r, g, bl = (gamma(c) for c in linear)
    return r, g, bl


def colour(number: int, lab: Sequence[int]) -> tuple[int, int, int]:
    """The segment's recommended colour, else a palette colour by segment number."""
    return lab_to_rgb(lab) or PALETTE[(number - 1) % len(PALETTE)]


def _first(value: object) -> float | None:
    if isinstance(value, pydicom.multival.MultiValue):
        value = value[0] if len(value) else None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def display_window(ds: Dataset, values: np.ndarray, rescaled: bool) -> tuple[float, float]:
    """(centre, width): the image's own window, else soft tissue for CT in HU, else the slice's
    1st..99th percentile (a projection image without a window)."""
    centre, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    if (
        centre is not None
        and width is not None
        and width > 0
        and ds.get("PhotometricInterpretation") != "MONOCHROME1"
    ):
        return centre, width
    if str(ds.get("Modality", "")) == "CT" and rescaled:
        return SOFT_TISSUE_WINDOW
    lo, hi = (float(v) for v in np.percentile(values, [1, 99]))
    return (lo + hi) / 2, max(hi - lo, 1.0)


def windowed(values: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Modality values -> uint8 grey (PS3.3 C.11.2.1.2 linear window, simplified)."""
    centre, width = window
    scaled = (values.astype(np.float32) - (centre - width / 2)) / width
    return np.clip(np.round(scaled * 255), 0, 255).astype(np.uint8)


def slice_values(ds: Dataset) -> tuple[np.ndarray, bool]:
    """One source image's pixels in modality units (rescaled if it has a rescale) and whether
    rescaled; read again from the file when the header was kept without pixels (volume.read_series)."""
    from dicom_node.volume import _modality_values  # one decoder and its checks for the whole node

    if "PixelData" not in ds:
        filename = getattr(ds, "filename", None)
        if not filename:
            raise ValueError(
                "A key image needs the source image's pixels, and its header has neither pixels nor a file."
            )
        ds = pydicom.dcmread(filename)
    values, rescaled = _modality_values(ds)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1" and rescaled:
        values = values.max() + values.min() - values  # display as MONOCHROME2
    return values, rescaled


Font = ImageFont.ImageFont | ImageFont.FreeTypeFont


def _font(size: int) -> Font:
    try:
        return ImageFont.load_default(size=size)  # FreeType build of Pillow: a scalable font
    except (TypeError, ValueError, OSError):  # pragma: no cover - Pillow without FreeType
        return ImageFont.load_default()


@functools.lru_cache(maxsize=64)
def _sized(path: str, size: int) -> Font:
    return _font(size) if not path else ImageFont.truetype(path, size)


@functools.lru_cache(maxsize=4096)
def _draws(path: str, char: str) -> bool:
    """Whether the font at ``path`` ("" = Pillow's own) has a glyph for ``char``: its bitmap is
    not the one drawn for a code point no font has."""
    if char.isspace() or not char.isprintable():  # nothing to draw; no font search for controls
        return True
    font = _sized(path, _PROBE_SIZE)

    def bitmap(c: str) -> tuple[tuple[int, int], bytes]:
        mask = font.getmask(c)
        return mask.size, bytes(mask)

    return bitmap(char) != bitmap(_NO_GLYPH)


def _fontconfig_files(chars: frozenset[str]) -> list[str]:
    """Font files fontconfig says cover all of ``chars`` (regular styles first); none without fc-list."""
    fc_list = shutil.which("fc-list")
    if fc_list is None:
        return []
    query = ":charset=" + " ".join(f"{ord(c):x}" for c in sorted(chars))
    try:
        out = subprocess.run(
            [fc_list, query, "file"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    files = sorted({line.split(":", 1)[0].strip() for line in out.splitlines() if line.strip()})
    styled = ("bold", "italic", "oblique", "light", "condensed")
    return sorted(files, key=lambda f: any(s in Path(f).name.lower() for s in styled))


@functools.lru_cache(maxsize=256)
def _font_file(chars: frozenset[str]) -> str:
    """The font file that draws every one of ``chars``: "" for Pillow's own font, also when no
    installed font can (the label is then drawn with missing glyphs, and a warning is logged)."""
    if all(_draws("", c) for c in chars):
        return ""
    for path in (*FALLBACK_FONTS, *_fontconfig_files(chars)):
        try:
            if Path(path).is_file() and all(_draws(path, c) for c in chars):
                return path
        except OSError:  # not a font FreeType can open: the next one
            continue
    logger.warning(
        "key image label has characters no installed font draws",
        extra={
            "event": "keyimages.missing_glyphs",
            "characters": len([c for c in chars if not _draws("", c)]),
            "hint": "install fonts-wqy-microhei (CJK) or fonts-dejavu-core",
        },
    )
    return ""


def font_for(text: str, size: int) -> Font:
    """A font of ``size`` pixels that draws every character of ``text`` (see the module docstring)."""
    return _sized(_font_file(frozenset(text)), size)


def render(
    grey: np.ndarray, overlay: Overlay, title_lines: Sequence[str], scale: int | None = None
) -> np.ndarray:
    """(rows, columns) uint8 grey -> (rows*f, columns*f, 3) uint8 RGB with the overlay and labels burned in."""
    rows, cols = grey.shape
    f = scale or max(1, math.ceil(MIN_WIDTH / cols))
    big = np.repeat(np.repeat(grey, f, axis=0), f, axis=1)
    image = Image.fromarray(np.stack([big] * 3, axis=-1), mode="RGB")
    draw = ImageDraw.Draw(image)
    width = max(1, (cols * f) // 256)
    for _, rgb, mask in overlay.outlines:
        for component in major_components(mask):
            points = outline(component, 400) * f
            draw.line([(float(x), float(y)) for x, y in points], fill=rgb, width=width)
    size = max(10, (cols * f) // 40)
    for label, rgb, (r0, c0, r1, c1) in overlay.boxes:
        draw.rectangle([c0 * f, r0 * f, c1 * f - 1, r1 * f - 1], outline=rgb, width=width)
        draw.text((c0 * f + 2, max(0, r0 * f - size - 2)), label, fill=rgb, font=font_for(label, size))
    # Labels: the banner and model on a black band at the top, the legend at the bottom.
    band = (size + 4) * len(title_lines) + 4
    draw.rectangle([0, 0, cols * f, band], fill=(0, 0, 0))
    for i, line in enumerate(title_lines):
        colour = (255, 255, 0) if i == 0 else (255, 255, 255)
        draw.text((4, 4 + i * (size + 4)), line, fill=colour, font=font_for(line, size))
    legend = [(label, rgb) for label, rgb, _ in overlay.outlines]
    for label, rgb, _ in overlay.boxes:  # each box is also labelled where it is drawn
        if (label, rgb) not in legend:
            legend.append((label, rgb))
    y = rows * f - (size + 4) * len(legend) - 4
    if legend:
        width_px = max(draw.textlength(label, font=font_for(label, size)) for label, _ in legend)
        draw.rectangle([0, y - 2, 12 + size + width_px, rows * f], fill=(0, 0, 0))
    for label, rgb in legend:
        draw.rectangle([4, y + 2, 4 + size - 4, y + size - 2], fill=rgb)
        draw.text((8 + size, y), label, fill=(255, 255, 255), font=font_for(label, size))
        y += size + 4
    return np.asarray(image, dtype=np.uint8)


def patient_orientation(ds: Dataset) -> tuple[str, str] | None:
    """The row and column directions as PatientOrientation letters (e.g. L, P for an axial slice),
    from ImageOrientationPatient or the source's own PatientOrientation; None if unknown."""
    own = ds.get("PatientOrientation")
    if own is not None and len(own) == 2 and all(str(v) for v in own):
        return str(own[0]), str(own[1])
    iop = ds.get("ImageOrientationPatient")
    if iop is None or len(iop) != 6:
        return None
    letters = (("L", "R"), ("P", "A"), ("H", "F"))

    def direction(v: Sequence[float]) -> str:
        order = sorted(range(3), key=lambda i: -abs(v[i]))
        return "".join(letters[i][0 if v[i] > 0 else 1] for i in order if abs(v[i]) > 0.25)[:3] or "L"

    values = [float(v) for v in iop]
    return direction(values[:3]), direction(values[3:])
