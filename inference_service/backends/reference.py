"""The weight-free reference backend: deterministic classical image analysis.

It exercises every output type (masks, measurements, boxes, report text) so the
whole bridge can be run and tested without model weights. It makes no clinical
claim, and says so in every result it produces.

CT (values in HU): body = largest connected region above -500 HU with holes
filled per slice; lungs = air below -400 HU inside the filled body, components
of at least 5 mL; bone = above 250 HU inside the body; soft tissue = body minus
lungs and bone (segments never overlap). CR/DX: foreground by Otsu threshold,
largest component, holes filled; intensity statistics inside it.
"""

from __future__ import annotations

import mmap
import operator
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from inference_service.backends.base import Backend, ModelConfig, ProgressCallback, WorkItem
from inference_service.errors import InvalidInput, UnsupportedTask
from inference_service.types import (
    Box,
    Code,
    Finding,
    Mask,
    Measurement,
    ModelIdentity,
    ReportText,
    TaskKind,
    TaskResult,
    Volume,
)

VERSION = "1.0.0"
BODY_HU = -500.0
LUNG_HU = -400.0
BONE_HU = 250.0
MIN_LUNG_ML = 5.0

SCT = "SCT"
ANATOMICAL_STRUCTURE = Code("91723000", SCT, "Anatomical Structure")
TISSUE = Code("85756007", SCT, "Tissue")
LUNG = Code("39607008", SCT, "Lung")
BONE = Code("272673000", SCT, "Bone")
SOFT_TISSUE = Code("87784001", SCT, "Soft tissue")
BODY_STRUCTURE = Code("123037004", SCT, "Body structure")
VOLUME = Code("118565006", SCT, "Volume")
AREA = Code("42798000", SCT, "Area")
MEAN = Code("373098007", SCT, "Mean")
STDDEV = Code("386136009", SCT, "Standard Deviation")
ML = Code("mL", "UCUM", "milliliter")
MM2 = Code("mm2", "UCUM", "square millimeter")
NO_UNITS = Code("1", "UCUM", "no units")

# CIELab (DICOM-scaled) display colours: lungs blue-ish, bone ivory, soft tissue red-ish.
LAB_LUNG = (39400, 34000, 19000)
LAB_BONE = (60000, 32896, 38000)
LAB_SOFT = (40000, 48000, 40000)
LAB_FOREGROUND = (52000, 28000, 48000)

DISCLAIMER = (
    "Produced by the RadBridge reference algorithm (fixed thresholds, no trained model); "
    "no diagnostic interpretation is made."
)

Box3 = tuple[slice, slice, slice]

CT_MODALITIES = frozenset({"CT"})
XRAY_MODALITIES = frozenset({"CR", "DX"})


def _threshold(hu: np.ndarray, op: Callable[[np.ndarray, Any], np.ndarray], value: float) -> np.ndarray:
    """``op(hu, value)`` compared in ``hu``'s own dtype: an integer volume against a whole-number
    threshold is compared with a Python int (a float threshold would widen every voxel to float64
    first, which costs more than the comparison)."""
    if hu.dtype.kind in "iu" and float(value).is_integer():
        return op(hu, int(value))
    return op(hu, value)


def _bounding_box(hu: np.ndarray, value: float, slab: int = 16) -> Box3 | None:
    """The box (slices, rows, columns) holding every voxel above ``value``, or None when none is:
    found a slab at a time, so that no whole-volume mask exists."""
    any_slice = np.zeros(hu.shape[0], dtype=bool)
    plane = np.zeros(hu.shape[1:3], dtype=bool)
    for start in range(0, hu.shape[0], slab):
        part = _threshold(hu[start : start + slab], operator.gt, value)
        any_slice[start : start + slab] = part.any(axis=(1, 2))
        plane |= part.any(axis=0)
    if not any_slice.any():
        return None
    ks, rs, cs = (np.flatnonzero(a) for a in (any_slice, plane.any(axis=1), plane.any(axis=0)))
    return (
        slice(int(ks[0]), int(ks[-1]) + 1),
        slice(int(rs[0]), int(rs[-1]) + 1),
        slice(int(cs[0]), int(cs[-1]) + 1),
    )


def _inside(outer: Box3, inner: tuple[slice, ...]) -> Box3:
    """``inner`` (relative to the ``outer`` box) in the coordinates of the volume."""
    a, b, c = (slice(o.start + i.start, o.start + i.stop) for o, i in zip(outer, inner, strict=True))
    return a, b, c


#: Up to this many components, counting each one over the labels is cheaper than find_objects.
_FEW = 8


def _component_sizes(
    labels: np.ndarray, n: int, objects: list[tuple[slice, ...] | None] | None = None
) -> np.ndarray:
    """Voxels per label (index 0, the background, counts 0). np.bincount would first copy the whole
    label volume to int64 (8 bytes a voxel) and read all of it. A few components are counted one
    at a time over the labels; more, each inside its own bounding box from
    ``ndimage.find_objects`` (given as ``objects``, or found here), where the few large components
    are most of the work. Boxes that overlap a lot (many large interleaved components) fall back
    to bincount, a slab at a time."""
    sizes = np.zeros(n + 1, dtype=np.int64)
    if objects is None and n <= _FEW:
        for i in range(1, n + 1):
            sizes[i] = np.count_nonzero(labels == i)
        return sizes
    objects = ndimage.find_objects(labels) if objects is None else objects
    if sum(int(np.prod([s.stop - s.start for s in b])) for b in objects if b is not None) > 2 * labels.size:
        for start in range(0, labels.shape[0], 16):
            sizes += np.bincount(labels[start : start + 16].ravel(), minlength=n + 1)
        sizes[0] = 0
        return sizes
    for i, box in enumerate(objects, start=1):
        if box is not None:
            sizes[i] = np.count_nonzero(labels[box] == i)
    return sizes


def _majority(labels: np.ndarray, n: int) -> tuple[int, np.ndarray] | None:
    """The component holding more than half of all labelled voxels, and its mask, if there is one:
    then it is the largest, whatever the others' sizes (no tie is possible). A guess from every
    8th slice is checked with one exact count, so the usual case (one body, a little else) never
    counts every component."""
    sample = np.bincount(labels[::8].ravel(), minlength=n + 1)
    sample[0] = 0
    guess = int(sample.argmax())
    if guess == 0:
        return None
    mask = labels == guess
    if 2 * np.count_nonzero(mask) > np.count_nonzero(labels):
        return guess, mask
    return None


def _largest(labels: np.ndarray, n: int) -> tuple[int, tuple[slice, ...]]:
    """The largest component's label (the first in scan order on a tie) and its bounding box."""
    majority = _majority(labels, n) if n > 1 else None
    if majority is not None:
        best, box = majority[0], _mask_box(majority[1])
    elif n <= _FEW:
        best = int(_component_sizes(labels, n).argmax())
        box = _mask_box(labels == best)
    else:
        objects = ndimage.find_objects(labels)
        best = int(_component_sizes(labels, n, objects).argmax())
        box = objects[best - 1]
    if box is None:  # cannot happen: the largest component has voxels
        raise RuntimeError("The largest component has no voxels.")
    return best, box


def _label(mask: np.ndarray, structure: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """ndimage.label into uint16 (2 bytes a voxel) when the labels fit, else int32."""
    labels = np.empty(mask.shape, dtype=np.uint16)
    try:
        n = ndimage.label(mask, structure=structure, output=labels)
    except RuntimeError:  # more than 65535 components
        del labels
        return ndimage.label(mask, structure=structure)
    return labels, int(n)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = _label(mask)
    if n == 0:
        return mask
    return labels == int(_component_sizes(labels, n).argmax())


#: 4-connectivity within a slice and none across slices: one 3-D labelling does every slice at once.
_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)


def _fill_per_slice(mask: np.ndarray, slab: int = 64) -> np.ndarray:
    """``binary_fill_holes`` of every slice (4-connected background): the background components
    that touch no slice edge are holes. Slices are independent, so a few at a time are labelled in
    one call (one C call per slab, and the labels of one slab in memory, not of the volume)."""
    out = np.empty_like(mask)
    for start in range(0, mask.shape[0], slab):
        part = mask[start : start + slab]
        labels, n = _label(~part, structure=_IN_PLANE)
        if n == 0:
            out[start : start + slab] = part
            continue
        outside = np.zeros(n + 1, dtype=bool)
        for edge in (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]):
            outside[np.unique(edge)] = True
        hole = ~outside
        hole[0] = False  # label 0 is the mask itself
        np.logical_or(part, hole[labels], out=out[start : start + slab])
    return out


def _mask_box(mask: np.ndarray) -> Box3 | None:
    """The bounding box of a bool volume's set voxels, or None when it has none."""
    plane = mask.any(axis=0)
    ks = np.flatnonzero(mask.any(axis=(1, 2)))
    if ks.size == 0:
        return None
    rs, cs = np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0))
    return (
        slice(int(ks[0]), int(ks[-1]) + 1),
        slice(int(rs[0]), int(rs[-1]) + 1),
        slice(int(cs[0]), int(cs[-1]) + 1),
    )


def _lazy_zeros(shape: tuple[int, ...]) -> np.ndarray:
    """A zeroed bool array on its own anonymous mapping, in small pages: only the pages written
    become resident. (np.zeros asks for transparent huge pages, so writing the body's rows of each
    slice would make every 2 MB page of a whole-volume mask resident.)"""
    size = int(np.prod(shape))
    if size == 0:
        return np.zeros(shape, dtype=bool)
    area = mmap.mmap(-1, size)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        area.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(area, dtype=bool).reshape(shape)


@dataclass
class CtSegments:
    """segment_ct's masks cut to the body's bounding box ``box`` in a volume of ``shape``: outside
    the box every mask is empty, so nothing beyond it is computed or held. A mask asked for whole
    (``full``) replaces its crop, so no mask is ever held twice."""

    shape: tuple[int, ...]
    box: Box3
    crops: dict[str, np.ndarray]
    _full: dict[str, np.ndarray] = field(default_factory=dict)

    def crop(self, key: str) -> np.ndarray:
        """The mask inside ``box`` (a view of the whole mask once that exists)."""
        return self._full[key][self.box] if key in self._full else self.crops[key]

    def count(self, key: str) -> int:
        return int(np.count_nonzero(self.crop(key)))

    def full(self, key: str) -> np.ndarray:
        """The whole-volume mask, made once; the rows outside the box take no resident memory."""
        if key not in self._full:
            out = _lazy_zeros(self.shape)
            out[self.box] = self.crops.pop(key)
            self._full[key] = out
        return self._full[key]

    def drop(self, key: str) -> None:
        self.crops.pop(key, None)
        self._full.pop(key, None)


def segment_ct_box(hu: np.ndarray, voxel_ml: float) -> CtSegments:
    """segment_ct, worked inside the bounding box of the voxels above BODY_HU, then of the body.

    Why it is exact: every mask is a subset of the body, and the body of the candidates, so
    nothing outside those boxes can be set; labelling order inside a box follows the volume's scan
    order, so ties for the largest component break the same way; and a background region that
    reaches the body box's edge reaches the slice edge through the empty rows and columns beyond
    it, so per-slice hole filling inside the box is the same as on the whole slice."""
    box = _bounding_box(hu, BODY_HU)
    if box is None:
        empty = np.zeros((0, 0, 0), dtype=bool)
        nothing = (slice(0, 0),) * 3
        return CtSegments(hu.shape, nothing, dict.fromkeys(("body", "lungs", "bone", "soft"), empty))
    labels, n = _label(_threshold(hu[box], operator.gt, BODY_HU))
    best, inner = _largest(labels, n)
    body = labels[inner] == best
    del labels
    box = _inside(box, inner)
    sub = hu[box]
    body = _fill_per_slice(body)
    lungs = body & _threshold(sub, operator.lt, LUNG_HU)
    air = _mask_box(lungs)  # air is usually a small part of the body: label only its box
    if air is not None:
        labels, n = _label(lungs[air])
        sizes = _component_sizes(labels, n)
        min_voxels = MIN_LUNG_ML / voxel_ml if voxel_ml > 0 else 1000
        keep = sizes >= min_voxels  # a lookup table: far faster than np.isin on the label volume
        keep[0] = False
        lungs[air] = keep[labels]
        del labels
    bone = body & _threshold(sub, operator.gt, BONE_HU)
    # lungs and bone lie in the body and never meet (< LUNG_HU vs > BONE_HU): the rest is an xor.
    soft = np.logical_xor(body, lungs)
    soft ^= bone
    return CtSegments(hu.shape, box, {"body": body, "lungs": lungs, "bone": bone, "soft": soft})


def segment_ct(hu: np.ndarray, voxel_ml: float) -> dict[str, np.ndarray]:
    """Body, lungs, bone and soft tissue masks of a CT volume in HU (any real dtype), each the
    size of the volume."""
    seg = segment_ct_box(hu, voxel_ml)
    return {key: seg.full(key) for key in list(seg.crops)}


def _otsu(values: np.ndarray) -> float:
    hist, edges = np.histogram(values, bins=256)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = np.divide(m0, w0, out=np.zeros_like(m0, dtype=float), where=w0 > 0)
    mu1 = np.divide(m0[-1] - m0, w1, out=np.zeros_like(m0, dtype=float), where=w1 > 0)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centres[int(between.argmax())])


def segment_xray(image: np.ndarray) -> np.ndarray:
    """Foreground of a projection image (values MONOCHROME2: brighter = denser)."""
    threshold = _otsu(image.ravel())
    fg = _largest_component(image > threshold)
    return ndimage.binary_fill_holes(fg)


def _bbox(mask2d: np.ndarray) -> tuple[int, int, int, int] | None:
    rows = np.flatnonzero(mask2d.any(axis=1))
    cols = np.flatnonzero(mask2d.any(axis=0))
    if rows.size == 0:
        return None
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


class ReferenceBackend(Backend):
    """Threshold-based CT and projection X-ray analysis; needs no weights."""

    kind = "reference"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self._memo: tuple[weakref.ref[np.ndarray], CtSegments, dict[str, int]] | None = None

    def _ct_masks(self, volume: Volume) -> tuple[CtSegments, dict[str, int]]:
        """segment_ct's masks (cut to the body's box) and every mask's voxel count, computed once
        per volume even when several tasks ask; whole-volume masks are made only for the segments a
        SEGMENT task returns. The memo holds the voxels weakly and is dropped with them, so no
        volume outlives its request here."""
        memo = self._memo
        if memo is None or memo[0]() is not volume.voxels:
            seg = segment_ct_box(volume.voxels, volume.geometry.voxel_volume_ml)
            counts = {k: seg.count(k) for k in seg.crops}
            seg.drop("body")  # no task returns it
            self._memo = (weakref.ref(volume.voxels), seg, counts)
            weakref.finalize(volume.voxels, self._forget, id(seg))
            return seg, counts
        return memo[1], memo[2]

    def _forget(self, seg_id: int) -> None:
        if self._memo is not None and id(self._memo[1]) == seg_id:
            self._memo = None

    def _mask_voxels(self, mask: np.ndarray) -> np.ndarray:
        """The binary mask, or with ``options.probability_maps`` a probability map: the mask
        smoothed in-plane (Gaussian, sigma 1 voxel), so that its edges carry fractional values.
        It exercises the FRACTIONAL path end to end; it is not a calibrated probability."""
        if not self.config.options.get("probability_maps", False):
            return mask
        out = np.empty(mask.shape, dtype=np.uint8)
        for k in range(mask.shape[0]):
            soft = ndimage.gaussian_filter(mask[k].astype(np.float32), sigma=1.0)
            out[k] = np.clip(np.round(soft * 255), 0, 255).astype(np.uint8)
        return out

    @property
    def tasks(self) -> frozenset[TaskKind]:
        return frozenset({TaskKind.SEGMENT, TaskKind.REPORT, TaskKind.DETECT})

    @property
    def modalities(self) -> frozenset[str]:
        return CT_MODALITIES | XRAY_MODALITIES

    @property
    def identity(self) -> ModelIdentity:
        return ModelIdentity(name=self.config.name, backend=self.kind, version=VERSION, non_clinical=True)

    def run(
        self,
        batch: Sequence[WorkItem],
        task: TaskKind,
        progress: ProgressCallback | None = None,
    ) -> list[TaskResult]:
        if task not in self.tasks:
            raise UnsupportedTask(f"The reference backend cannot do task {task.value!r}.")
        results = []
        for i, item in enumerate(batch):
            results.append(self._run_one(item.volume, task))
            if progress:
                progress((i + 1) / len(batch), f"{task.value} {i + 1}/{len(batch)}")
        return results

    def _run_one(self, volume: Volume, task: TaskKind) -> TaskResult:
        modality = volume.geometry.modality
        if modality in CT_MODALITIES:
            return self._ct(volume, task)
        if modality in XRAY_MODALITIES:
            return self._xray(volume, task)
        raise UnsupportedTask(f"The reference backend does not accept modality {modality!r}.")

    # -- CT ---------------------------------------------------------------
    def _ct(self, volume: Volume, task: TaskKind) -> TaskResult:
        g = volume.geometry
        if not g.rescaled or volume.voxels.ndim != 3:
            raise InvalidInput("The reference CT analysis needs a grey volume in Hounsfield units.")
        voxel_ml = g.voxel_volume_ml
        seg, counts = self._ct_masks(volume)
        ml = {k: float(n) * voxel_ml for k, n in counts.items()}
        result = TaskResult(task=task, prompt_id=f"reference-ct-{task.value}")
        if task is TaskKind.SEGMENT:
            specs = [
                (1, "Lungs", ANATOMICAL_STRUCTURE, LUNG, LAB_LUNG, "lungs"),
                (2, "Bone", TISSUE, BONE, LAB_BONE, "bone"),
                (3, "Soft tissue", TISSUE, SOFT_TISSUE, LAB_SOFT, "soft"),
            ]
            for number, label, cat, typ, lab, key in specs:
                result.masks.append(Mask(number, label, cat, typ, lab, self._mask_voxels(seg.full(key))))
                result.measurements.append(Measurement(VOLUME, round(ml[key], 1), ML, number))
        elif task is TaskKind.DETECT:
            lungs = seg.crop("lungs")
            area = np.count_nonzero(lungs, axis=(1, 2)) if lungs.size else np.zeros(1, dtype=np.intp)
            if area.max() > 0:
                k = int(area.argmax())
                lung_slice = np.zeros(g.shape[1:], dtype=bool)
                lung_slice[seg.box[1:]] = lungs[k]
                k += seg.box[0].start
                labels, n = ndimage.label(lung_slice)
                for j in range(1, n + 1):
                    comp = labels == j
                    if comp.sum() * g.spacing_mm[1] * g.spacing_mm[2] < 100.0:
                        continue
                    r0, c0, r1, c1 = _bbox(comp)  # type: ignore[misc]
                    result.boxes.append(Box(k, r0, c0, r1, c1, LUNG, "Lung", -1.0))
        else:  # REPORT
            findings = (
                f"Threshold analysis of {g.shape[0]} slices. Body volume {ml['body']:.0f} mL; "
                f"aerated lung (< {LUNG_HU:.0f} HU) {ml['lungs']:.0f} mL; "
                f"bone (> {BONE_HU:.0f} HU) {ml['bone']:.0f} mL; soft tissue {ml['soft']:.0f} mL."
            )
            result.report = ReportText(findings=findings, impression=DISCLAIMER, language="en")
            result.findings.append(Finding(LUNG, -1.0, ml["lungs"] > 0, "Aerated lung"))
        result.raw_output = result.report.findings if result.report else ""
        return result

    # -- CR / DX ----------------------------------------------------------
    def _xray(self, volume: Volume, task: TaskKind) -> TaskResult:
        g = volume.geometry
        if volume.voxels.ndim != 3 or g.shape[0] != 1:
            raise InvalidInput("The reference X-ray analysis needs one grey image.")
        image = volume.voxels[0].astype(np.float32)
        fg = segment_xray(image)
        inside = image[fg]
        lo, hi = float(image.min()), float(image.max())
        norm = (inside - lo) / (hi - lo) if hi > lo else np.zeros_like(inside)
        mean, std = float(norm.mean()) if norm.size else 0.0, float(norm.std()) if norm.size else 0.0
        pixel_mm2 = g.spacing_mm[1] * g.spacing_mm[2]
        result = TaskResult(task=task, prompt_id=f"reference-xray-{task.value}")
        if task is TaskKind.SEGMENT:
            result.masks.append(
                Mask(
                    1,
                    "Foreground",
                    ANATOMICAL_STRUCTURE,
                    BODY_STRUCTURE,
                    LAB_FOREGROUND,
                    self._mask_voxels(fg[None]),
                )
            )
            result.measurements.append(Measurement(MEAN, round(mean, 4), NO_UNITS, 1))
            result.measurements.append(Measurement(STDDEV, round(std, 4), NO_UNITS, 1))
            if pixel_mm2 > 0:
                result.measurements.append(Measurement(AREA, round(fg.sum() * pixel_mm2, 1), MM2, 1))
        elif task is TaskKind.DETECT:
            box = _bbox(fg)
            if box:
                result.boxes.append(Box(0, *box, BODY_STRUCTURE, "Foreground", -1.0))
        else:
            fraction = float(fg.mean())
            findings = (
                f"Projection image {g.shape[1]}x{g.shape[2]} pixels. Foreground covers "
                f"{100 * fraction:.1f}% of the image; normalized mean intensity {mean:.3f} "
                f"(SD {std:.3f})."
            )
            result.report = ReportText(findings=findings, impression=DISCLAIMER, language="en")
        result.raw_output = result.report.findings if result.report else ""
        return result
