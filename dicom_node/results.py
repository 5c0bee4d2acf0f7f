"""Index-space results -> DICOM SEG, TID 1500 SRs and TID 2000 narrative SR (highdicom).

Pure functions of (sorted source headers, result, masks): no spool, no jobs,
so the Slicer module can write the same objects. UIDs are derived from
(source series, model, model version, object kind): a re-run replaces the
earlier objects in the PACS instead of duplicating them.

Two TID 1500 reports, one per kind of reader:
- "measurements" (9702) is the complete, standard report for 3D Slicer / dcmqi:
  TID 1411 volumetric groups that reference the SEG's segments, TID 1410 boxes,
  TID 1501 qualitative findings and loose measurements.
- "keyslices" (9704) holds only TID 1410 planar groups, each with one image
  SCOORD, which is what OHIF 3.13 needs to load a TID 1500 SR at all (it reads
  the first SCOORD of every group): one outline per segment on its key slice
  (the slice of largest mask area) with its area, and every box. Each group
  carries a Finding Site (OHIF's label) and the same Tracking UID as the group
  for that segment or box in "measurements", so both reports name one finding.
"""

from __future__ import annotations

import hashlib
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import highdicom as hd
import numpy as np
from pydicom import config as pydicom_config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from dicom_node import segwriter
from dicom_node._contours import major_components, outline
from dicom_node.masks import FractionalMask, PackedMask
from dicom_node.slices import SliceRef
from dicom_node.source_values import conform_sources
from dicom_node.text import SPECIFIC_CHARACTER_SET, clean, clean_language, raw
from protos.radbridge.v1 import inference_pb2 as pb

if TYPE_CHECKING:  # keyimages needs Pillow: imported where key images are drawn, never in Slicer
    from dicom_node import keyimages as ki

MANUFACTURER = "RadBridge"
DEFAULT_UID_ROOT = "1.2.826.0.1.3680043.8.498."
SERIES_NUMBERS = {"seg": 9701, "measurements": 9702, "narrative": 9703, "keyslices": 9704, "keyimages": 9705}
TITLE = hd.sr.CodedConcept("18748-4", "LN", "Diagnostic Imaging Report")
FINDINGS_SECTION = hd.sr.CodedConcept("59776-5", "LN", "Findings")
IMPRESSIONS_SECTION = hd.sr.CodedConcept("19005-8", "LN", "Impressions")
LANGUAGE = hd.sr.CodedConcept("121049", "DCM", "Language of Content Item and Descendants")
NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")
MM2 = hd.sr.CodedConcept("mm2", "UCUM", "mm2")
MAX_OUTLINE_POINTS = 200  # vertices of a key-slice outline (SCOORD POLYLINE)
PROBABILITY = hd.sr.CodedConcept("C0033204", "UMLS", "Probability")
LANGUAGES = {
    "en": hd.sr.CodedConcept("en", "RFC5646", "English"),
    "zh": hd.sr.CodedConcept("zh", "RFC5646", "Chinese"),
}
LOCAL_SCHEME = "99RADBRIDGE"  # private coding scheme (PS3.16 8.2: "99" prefix)
PROVENANCE = hd.sr.CodedConcept("PROV", LOCAL_SCHEME, "Model provenance")
ALGORITHM_NAME = hd.sr.CodedConcept("111001", "DCM", "Algorithm Name")
ALGORITHM_VERSION = hd.sr.CodedConcept("111003", "DCM", "Algorithm Version")
WEIGHTS_SHA256 = hd.sr.CodedConcept("SHA256", LOCAL_SCHEME, "Model weights SHA-256")
PROMPT_ID = hd.sr.CodedConcept("PROMPT", LOCAL_SCHEME, "Prompt identifier")
RAW_OUTPUT = hd.sr.CodedConcept("RAW", LOCAL_SCHEME, "Raw model output")
TASK_NAME = hd.sr.CodedConcept("TASK", LOCAL_SCHEME, "Model task")
INPUT_GEOMETRY = hd.sr.CodedConcept("GEOMETRY", LOCAL_SCHEME, "Input geometry")
PROJECTION = frozenset({"CR", "DX", "MG", "XA", "RF", "IO", "PX"})
SR = TypeVar("SR", hd.sr.Comprehensive3DSR, hd.sr.EnhancedSR)
REFERENCED_SOP_CLASS_UID = 0x00081150
REFERENCED_SOP_INSTANCE_UID = 0x00081155


@dataclass(frozen=True)
class OutputObject:
    """One produced DICOM object and what it is."""

    kind: str  # "seg" | "measurements" | "keyslices" | "narrative" | "keyimages"
    dataset: Dataset

    @property
    def sop_instance_uid(self) -> str:
        return str(self.dataset.SOPInstanceUID)


def derive_uid(uid_root: str, *parts: object) -> str:
    """A UID that depends only on parts (pydicom's hash-based generator)."""
    return generate_uid(prefix=uid_root, entropy_srcs=[str(p) for p in parts])


def _code(c: pb.Code) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(c.value, c.scheme, c.meaning)


def _clean_code(c: pb.Code) -> None:
    """Code Value (SH, or Long Code Value past 16), Coding Scheme Designator (SH), Code Meaning (LO)."""
    c.value = clean(c.value, "UC", max_bytes=64) or "unknown"
    c.scheme = clean(c.scheme, "SH") or LOCAL_SCHEME
    c.meaning = clean(c.meaning, "LO") or c.value


def clean_result(result: pb.AnalysisResult) -> pb.AnalysisResult:
    """A copy of ``result`` whose every string is valid for the VR it will be written into.

    The one place where model- and service-provided text enters the objects (dicom_node.text):
    labels, code meanings, names and versions as LO (they also become UT tracking identifiers),
    report text and answers as UT, the raw model output verbatim where UT allows it.
    """
    out = pb.AnalysisResult()
    out.CopyFrom(result)
    model = out.model
    model.name = clean(model.name, "LO") or "unknown"
    model.backend = clean(model.backend, "LO")
    model.version = clean(model.version, "LO")
    model.weights_sha256 = clean(model.weights_sha256, "LO")
    for task in out.tasks:
        for m in task.masks:
            m.label = clean(m.label, "LO")
            _clean_code(m.category)
            _clean_code(m.type)
        for meas in task.measurements:
            _clean_code(meas.concept)
            _clean_code(meas.unit)
        for finding in task.findings:
            finding.label = clean(finding.label, "LO")
            _clean_code(finding.finding)
        for box in task.boxes:
            box.label = clean(box.label, "LO")
            _clean_code(box.finding)
        if task.HasField("report"):
            task.report.findings = clean(task.report.findings, "UT")
            task.report.impression = clean(task.report.impression, "UT")
            task.report.language = clean_language(task.report.language)
        task.answer = clean(task.answer, "UT")
        task.prompt_id = clean(task.prompt_id, "LO")
        task.raw_output = raw(task.raw_output, "UT")
    return out


def _lab(values: Sequence[int]) -> hd.color.CIELabColor | None:
    if len(values) != 3:
        return None
    return hd.color.CIELabColor(
        values[0] / 65535 * 100, values[1] / 65535 * 255 - 128, values[2] / 65535 * 255 - 128
    )


def _drop_unknown_pixel_spacing(seg: Dataset) -> None:
    """A zero Pixel Spacing (e.g. a CR without calibration) is invalid; omit the macro instead."""
    shared = seg.SharedFunctionalGroupsSequence[0]
    measures = shared.get("PixelMeasuresSequence")
    if measures and any(float(v) <= 0 for v in measures[0].get("PixelSpacing", [1, 1])):
        del shared.PixelMeasuresSequence


def _pixel_area_mm2(ds: Dataset, frame: int | None = None) -> float | None:
    """Area of one pixel from PixelSpacing (else ImagerPixelSpacing, as volume.py); a frame of a
    multi-frame image from its Pixel Measures (per-frame, else shared); None if unknown."""
    holders = [ds]
    if frame is not None:
        groups = [
            ds.PerFrameFunctionalGroupsSequence[frame - 1],
            *ds.get("SharedFunctionalGroupsSequence", []),
        ]
        holders = [g.PixelMeasuresSequence[0] for g in groups if g.get("PixelMeasuresSequence")]
    for holder in holders:
        for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
            try:
                row, col = (float(v) for v in holder.get(keyword) or ())
            except (TypeError, ValueError):
                continue
            if row > 0 and col > 0:
                return row * col
    return None


def _segment_pixels(masks: Sequence[np.ndarray]) -> np.ndarray:
    """Segments 1..n as highdicom takes them: one uint8 label map (1 byte a voxel) when no two
    overlap, which is the usual case; else the 4-D stack (n bytes a voxel, and highdicom sums it
    in int64 to find the overlaps). Both give the same SEG frames."""
    if len(masks) > 255:
        return np.stack(masks, axis=-1)
    labels = np.zeros(masks[0].shape, dtype=np.uint8)
    flat = labels.reshape(-1)
    for number, mask in enumerate(masks, start=1):
        where = np.flatnonzero(np.asarray(mask, dtype=bool))  # cost follows the segment, not the volume
        if flat[where].any():
            return np.stack(masks, axis=-1)
        flat[where] = number
    return labels


def _fractional_pixels(masks: Sequence[np.ndarray | FractionalMask]) -> np.ndarray:
    """Segments 1..n as highdicom takes a FRACTIONAL SEG: float32 (slices, rows, columns, n) in 0..1
    (4 bytes a voxel and segment: probability maps are the exception, not the default)."""
    stack = np.zeros((*masks[0].shape, len(masks)), dtype=np.float32)
    for i, mask in enumerate(masks):
        stack[..., i] = mask.fraction() if isinstance(mask, FractionalMask) else np.asarray(mask, dtype=bool)
    return stack


def _referenced_instances(content: Dataset | DicomSequence) -> set[str]:
    """SOP Instance UIDs that the IMAGE and COMPOSITE items of an SR content tree reference (what
    highdicom's ``collect_evidence`` requires among the evidence), read from the datasets as they
    are: no content item objects are made."""
    root = content[0] if isinstance(content, DicomSequence) else content
    found: set[str] = set()
    pending = [root]
    while pending:
        for item in pending.pop().get("ContentSequence", []):
            if item.get("ValueType") in ("IMAGE", "COMPOSITE"):
                found.add(str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID))
            if "ContentSequence" in item:
                pending.append(item)
    return found


def _sop_reference(sop_class_uid: str, sop_instance_uid: str) -> Dataset:
    """A Referenced SOP Class / Instance UID item. The UIDs are the sources' own, already checked
    when they were read: they are not validated again for every item of every SR."""
    item = Dataset()
    for tag, value in (
        (REFERENCED_SOP_CLASS_UID, sop_class_uid),
        (REFERENCED_SOP_INSTANCE_UID, sop_instance_uid),
    ):
        item[tag] = DataElement(tag, "UI", value, validation_mode=pydicom_config.IGNORE)
    return item


def _hierarchical_references(groups: Mapping[tuple[str, str], list[Dataset]]) -> list[Dataset]:
    """Study items (Study Instance UID, Referenced Series Sequence), each series item with its
    Referenced SOP Sequence: the SR Document General module's evidence layout."""
    studies: dict[str, list[Dataset]] = defaultdict(list)
    for (study_uid, series_uid), instances in groups.items():
        series = Dataset()
        series.SeriesInstanceUID = series_uid
        series.ReferencedSOPSequence = instances
        studies[study_uid].append(series)
    items = []
    for study_uid, series_items in studies.items():
        study = Dataset()
        study.StudyInstanceUID = study_uid
        study.ReferencedSeriesSequence = series_items
        items.append(study)
    return items


def _outline_in_box(component: np.ndarray, max_points: int) -> np.ndarray:
    """``outline`` of a 2D component traced on its bounding box (with a 1-pixel background border),
    then moved back: the same vertices as on the whole plane (the tracing is translation-invariant
    and the vertices are integers), without scanning and hole-filling all 512x512 pixels."""
    rows = np.flatnonzero(component.any(axis=1))
    cols = np.flatnonzero(component.any(axis=0))
    if not len(rows):
        return outline(component, max_points)  # raises: an empty mask has no outline
    r0, c0 = max(int(rows[0]) - 1, 0), max(int(cols[0]) - 1, 0)
    box = component[r0 : int(rows[-1]) + 2, c0 : int(cols[-1]) + 2]
    return outline(box, max_points) + np.array([c0, r0], dtype=np.float32)


def _instance_key(ds: Dataset) -> tuple[str, str, str, str]:
    return ds.SOPClassUID, ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID


class ResultWriter:
    """Builds the output objects of one analysis of one series."""

    def __init__(
        self,
        sources: Sequence[Dataset],
        result: pb.AnalysisResult,
        masks: dict[int, np.ndarray],
        uid_root: str = DEFAULT_UID_ROOT,
        previous: Mapping[str, Sequence[Dataset]] | None = None,
        slices: Sequence[SliceRef] = (),
        geometry_note: str = "",
    ) -> None:
        """``previous``: by kind, the objects an earlier analysis of this series wrote (headers are
        enough); the new SRs name them in PredecessorDocumentsSequence, and instance numbers go on.

        ``slices`` (``SeriesVolume.slices``): which source image and frame each mask slice is, or
        none (an interpolated position: no SEG frame, no SCOORD); empty means slice i is
        ``sources[i]``. ``geometry_note`` (``SeriesVolume.note``) is written into the narrative SR.
        """
        if not sources:
            raise ValueError("At least one source image is needed.")
        # highdicom refuses a malformed birth date, study date/time, sex, decimal number or
        # character set: copies with those values repaired (or emptied) go to the builders
        # (dicom_node.source_values); ``repaired`` names them for the study history.
        self.sources, self.repaired = conform_sources(sources)
        self.slices = list(slices) or [SliceRef(i) for i in range(len(self.sources))]
        if any(r.source is not None and not 0 <= r.source < len(self.sources) for r in self.slices):
            raise ValueError("A slice names a source image that is not among the sources.")
        self.received = [k for k, r in enumerate(self.slices) if r.source is not None]
        if not self.received:
            raise ValueError("No slice of the volume is a received image.")
        self.multiframe = any(r.frame is not None for r in self.slices)
        self.geometry_note = clean(geometry_note, "UT")
        self.previous = {kind: list(objs) for kind, objs in (previous or {}).items()}
        # The input's identity: the same images give the same instance UIDs (a re-run after a crash
        # replaces, never duplicates); images added later give new instances (a revision).
        digest = hashlib.sha256("\\".join(sorted(str(ds.SOPInstanceUID) for ds in self.sources)).encode())
        self.input_key = digest.hexdigest()[:32]
        self.result = clean_result(result)
        self.masks = masks
        self.uid_root = uid_root
        self.model = self.result.model
        self.series_uid = str(sources[0].SeriesInstanceUID)
        self.modality = str(sources[0].get("Modality", ""))
        self.algorithm = hd.AlgorithmIdentificationSequence(
            name=self.model.name,
            family=codes.cid7162.ArtificialIntelligence,
            version=self.model.version or "unknown",
        )
        self.algorithm_id = hd.sr.AlgorithmIdentification(
            name=self.model.name, version=self.model.version or "unknown"
        )
        self._key_slices: dict[int, int | None] = {}  # the key-slice SR and the key images share them
        self._source_keys: list[tuple[str, str, str, str]] | None = None

    # -- identities ------------------------------------------------------------
    def uid(self, *parts: object) -> str:
        return derive_uid(self.uid_root, self.series_uid, self.model.name, self.model.version, *parts)

    def instance_uid(self, kind: str) -> str:
        """Series UIDs stay per (series, model, kind); the instance UID also follows the input."""
        return self.uid(kind, "instance", self.input_key)

    def instance_number(self, kind: str) -> int:
        return 1 + len(self.previous.get(kind, []))

    def _description(self, what: str) -> str:
        tag = " (non-clinical)" if self.model.non_clinical else " (AI draft, unverified)"
        return clean(f"{what} by {self.model.name}{tag}", "LO")

    def build_all(self, key_images: bool = False) -> list[OutputObject]:
        """SEG (if any mask), TID 1500 SR (if anything to measure), key-slice TID 1500 SR (if any
        mask or box), narrative SR (if text); with ``key_images``, Secondary Capture images of the
        key slices with the result burned in (if any mask or box)."""
        outputs: list[OutputObject] = []
        infos = [m for t in self.result.tasks for m in t.masks]
        seg = self.build_seg() if infos else None
        if seg is not None:
            outputs.append(OutputObject("seg", seg))
        if any(t.measurements or t.boxes or t.findings for t in self.result.tasks):
            outputs.append(OutputObject("measurements", self.build_measurement_report(seg)))
        key_slices = self.build_key_slice_report()
        if key_slices is not None:
            outputs.append(OutputObject("keyslices", key_slices))
        if any(t.HasField("report") or t.answer for t in self.result.tasks):
            outputs.append(OutputObject("narrative", self.build_narrative()))
        for output in outputs:
            # Text may be non-ASCII (a Chinese label or report): declare UTF-8 in every object. The
            # values copied from the sources are decoded str, so they are re-encoded correctly.
            output.dataset.SpecificCharacterSet = SPECIFIC_CHARACTER_SET
        if key_images:
            outputs.extend(self.key_image_outputs())
        return outputs

    def key_image_outputs(self) -> list[OutputObject]:
        """The key images as output objects (none without a mask or box)."""
        outputs = [OutputObject("keyimages", sc) for sc in self.build_key_images()]
        for output in outputs:
            output.dataset.SpecificCharacterSet = SPECIFIC_CHARACTER_SET
        return outputs

    # -- SEG ---------------------------------------------------------------------
    def _segment_descriptions(self) -> tuple[list[pb.MaskInfo], list[hd.seg.SegmentDescription]]:
        infos = sorted((m for t in self.result.tasks for m in t.masks), key=lambda m: m.segment_number)
        if [m.segment_number for m in infos] != list(range(1, len(infos) + 1)):
            raise ValueError("Segment numbers must be 1..n without gaps.")
        descriptions = [
            hd.seg.SegmentDescription(
                segment_number=m.segment_number,
                segment_label=m.label or m.type.meaning,
                segmented_property_category=_code(m.category),
                segmented_property_type=_code(m.type),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=self.algorithm,
                tracking_uid=self.uid("tracking", "segment", m.segment_number),  # = its SR groups' (AIR)
                tracking_id=m.label or m.type.meaning,
                display_color=_lab(m.cielab),
            )
            for m in infos
        ]
        return infos, descriptions

    def build_seg(self) -> Dataset:
        """The SEG, written by ``dicom_node.segwriter`` (frames only where a segment is present).

        The same object as ``build_seg_highdicom`` (tests/unit/dicom_node/test_segwriter.py),
        built without highdicom's per-(segment, slice) scan and per-frame pydicom datasets."""
        infos, descriptions = self._segment_descriptions()
        masks = [self.masks[m.segment_number] for m in infos]
        for mask in masks:
            if mask.shape[0] != len(self.slices):
                raise ValueError(f"Masks have {mask.shape[0]} slices for {len(self.slices)} source images.")
        if self.multiframe:
            if len(self.sources) != 1:
                raise ValueError("A multi-frame source must be the only source image of the volume.")
            sources = self.sources
            frame_numbers: list[int] | None = [int(self.slices[k].frame) for k in self.received]  # type: ignore[arg-type]
        else:
            sources = [self.sources[self.slices[k].source] for k in self.received]  # type: ignore[index]
            frame_numbers = None
        identity = segwriter.SegIdentity(
            series_instance_uid=self.uid("seg", "series"),
            series_number=SERIES_NUMBERS["seg"],
            sop_instance_uid=self.instance_uid("seg"),
            instance_number=self.instance_number("seg"),
            manufacturer=MANUFACTURER,
            manufacturer_model_name=self.model.name,
            software_versions=self.model.version or "unknown",
            device_serial_number="0",
            content_label="RADBRIDGE",
            content_description=self._description("SEG"),
            series_description=self._description("SEG"),
            contributing_equipment=[self._contributing_equipment()],
            dimension_organization_uid=self.uid("seg", "dimension-organization"),
        )
        try:
            seg = segwriter.build_segmentation(
                sources,
                masks,
                self.received,
                descriptions,
                identity,
                fractional=any(isinstance(mask, FractionalMask) for mask in masks),
                frame_numbers=frame_numbers,
                specific_character_set=SPECIFIC_CHARACTER_SET,  # build_all declares UTF-8 in every object
            )
        except segwriter.UnsupportedGeometry:
            return self.build_seg_highdicom()
        if self.modality in PROJECTION and "PatientOrientation" in self.sources[0]:
            seg.PatientOrientation = self.sources[0].PatientOrientation
        _drop_unknown_pixel_spacing(seg)
        return seg

    def build_seg_highdicom(self) -> hd.seg.Segmentation:
        """The SEG as ``highdicom.seg.Segmentation`` builds it: the reference that ``build_seg``
        is checked against (and the writer for slide-coordinate sources); slower with many
        segments."""
        infos, descriptions = self._segment_descriptions()
        masks = [self.masks[m.segment_number] for m in infos]
        fractional = any(isinstance(mask, FractionalMask) for mask in masks)
        pixels = _fractional_pixels(masks) if fractional else _segment_pixels(masks)
        if pixels.shape[0] != len(self.slices):
            raise ValueError(f"Masks have {pixels.shape[0]} slices for {len(self.slices)} source images.")
        pixels, seg_sources, frame_numbers = self._on_received(pixels)
        seg = hd.seg.Segmentation(
            source_images=seg_sources,
            pixel_array=pixels,
            # A probability map makes the whole SEG FRACTIONAL (PROBABILITY, 0..255); its binary
            # segments are then 0 or 255. Binary masks alone keep the BINARY SEG.
            segmentation_type=(
                hd.seg.SegmentationTypeValues.FRACTIONAL
                if fractional
                else hd.seg.SegmentationTypeValues.BINARY
            ),
            fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
            max_fractional_value=255,
            segment_descriptions=descriptions,
            series_instance_uid=self.uid("seg", "series"),
            series_number=SERIES_NUMBERS["seg"],
            sop_instance_uid=self.instance_uid("seg"),
            instance_number=self.instance_number("seg"),
            manufacturer=MANUFACTURER,
            manufacturer_model_name=self.model.name,
            software_versions=self.model.version or "unknown",
            device_serial_number="0",
            content_description=self._description("SEG"),
            content_label="RADBRIDGE",
            series_description=self._description("SEG"),
            contributing_equipment=[self._contributing_equipment()],
        )
        if self.modality in PROJECTION and "PatientOrientation" in self.sources[0]:
            seg.PatientOrientation = self.sources[0].PatientOrientation
        if frame_numbers:
            self._restore_frame_numbers(seg, frame_numbers)
        _drop_unknown_pixel_spacing(seg)
        self._derive_dimension_organization(seg)
        return seg

    def _on_received(self, pixels: np.ndarray) -> tuple[np.ndarray, list[Dataset], list[int]]:
        """The SEG's input on the received images only, and for a multi-frame source the source
        frame number of each mask slice given to highdicom (empty otherwise).

        Single-frame sources: one mask per received image (interpolated slices dropped). A
        multi-frame source: highdicom is given a header copy holding only the analysed frames, in
        slice order, because it refuses a source whose frames repeat a position (other temporal
        positions, echoes, stacks); ``_restore_frame_numbers`` then puts the source's own frame
        numbers back into every SEG frame's Source Image reference."""
        if not self.multiframe:
            if len(self.received) == len(self.slices) and all(
                r.source == k for k, r in enumerate(self.slices)
            ):
                return pixels, self.sources, []
            sources = [self.sources[self.slices[k].source] for k in self.received]  # type: ignore[index]
            return pixels[self.received], sources, []
        if len(self.sources) != 1:
            raise ValueError("A multi-frame source must be the only source image of the volume.")
        source = self.sources[0]
        numbers = [int(self.slices[k].frame) for k in self.received]  # type: ignore[arg-type]
        view = Dataset()
        view.file_meta = getattr(source, "file_meta", Dataset())
        for element in source:
            if element.keyword not in ("PerFrameFunctionalGroupsSequence", "PixelData", "NumberOfFrames"):
                view.add(element)
        view.NumberOfFrames = len(numbers)
        view.PerFrameFunctionalGroupsSequence = [
            source.PerFrameFunctionalGroupsSequence[n - 1] for n in numbers
        ]
        return pixels[self.received], [view], numbers

    @staticmethod
    def _restore_frame_numbers(seg: Dataset, numbers: Sequence[int]) -> None:
        """Frame i of the header copy given to highdicom is source frame ``numbers[i - 1]``.

        highdicom shares one reference item between the SEG frames (segments) of a source frame:
        each item is renumbered once."""
        refs = {
            id(ref): ref
            for frame in seg.PerFrameFunctionalGroupsSequence
            for derivation in frame.get("DerivationImageSequence", [])
            for ref in derivation.get("SourceImageSequence", [])
            if "ReferencedFrameNumber" in ref
        }
        for ref in refs.values():
            ref.ReferencedFrameNumber = numbers[int(ref.ReferencedFrameNumber) - 1]

    def _derive_dimension_organization(self, seg: Dataset) -> None:
        """highdicom draws a random Dimension Organization UID; derive it, so a re-run (or the
        Slicer panel on the same series) writes the same object."""
        uid = self.uid("seg", "dimension-organization")
        for item in seg.get("DimensionOrganizationSequence", []):
            item.DimensionOrganizationUID = uid
        for item in seg.get("DimensionIndexSequence", []):
            item.DimensionOrganizationUID = uid

    # -- TID 1500 ----------------------------------------------------------------
    def _observation_context(self) -> hd.sr.ObservationContext:
        device = hd.sr.DeviceObserverIdentifyingAttributes(
            uid=self.uid("device"),
            name=self.model.name,
            manufacturer_name=MANUFACTURER,
            model_name=clean(f"{self.model.backend} {self.model.version}", "LO"),
        )
        return hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(
                observer_type=codes.DCM.Device, observer_identifying_attributes=device
            )
        )

    def _tracking(self, *parts: object, label: str) -> hd.sr.TrackingIdentifier:
        return hd.sr.TrackingIdentifier(
            uid=self.uid("tracking", *parts), identifier=clean(label, "LO") or "unnamed"
        )

    def _source_for(self, slice_index: int) -> tuple[Dataset, int | None]:
        """The received image (and frame) of a volume slice; for an interpolated slice, the
        nearest received one (a SCOORD can only name an image that exists)."""
        if not 0 <= slice_index < len(self.slices):
            raise ValueError(f"Slice index {slice_index} is outside the series ({len(self.slices)}).")
        ref = self._nearest_received(slice_index)
        return self.sources[ref.source], ref.frame  # type: ignore[index]

    def _nearest_received(self, slice_index: int) -> SliceRef:
        return self.slices[self._received_index(slice_index)]

    def build_measurement_report(self, seg: Dataset | None) -> hd.sr.Comprehensive3DSR:
        groups: list[object] = []
        infos = {m.segment_number: m for t in self.result.tasks for m in t.masks}
        measurements: dict[int, list[hd.sr.Measurement]] = {}
        loose: list[pb.Measurement] = []
        for task in self.result.tasks:
            for m in task.measurements:
                if m.segment_number and m.segment_number in infos and seg is not None:
                    measurements.setdefault(m.segment_number, []).append(
                        hd.sr.Measurement(name=_code(m.concept), value=m.value, unit=_code(m.unit))
                    )
                else:
                    loose.append(m)
        for number in sorted(measurements):
            info = infos[number]
            tracking = self._tracking("segment", number, label=info.label)
            # TID 1411 with a Referenced Segment (no frame numbers): valid for one image too.
            single = len(self.sources) == 1 and not self.multiframe
            ref = hd.sr.ReferencedSegment(
                sop_class_uid=seg.SOPClassUID,  # type: ignore[union-attr]
                sop_instance_uid=seg.SOPInstanceUID,  # type: ignore[union-attr]
                segment_number=number,
                source_images=(
                    [
                        hd.sr.SourceImageForSegmentation(
                            self.sources[0].SOPClassUID, self.sources[0].SOPInstanceUID
                        )
                    ]
                    if single
                    else None
                ),
                source_series=None if single else hd.sr.SourceSeriesForSegmentation(self.series_uid),
            )
            groups.append(
                hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=tracking,
                    referenced_segment=ref,
                    finding_type=_code(info.type),
                    algorithm_id=self.algorithm_id,
                    measurements=measurements[number],
                )
            )
        for i, task in enumerate(self.result.tasks):
            groups.extend(self._box_group(i, j, box, with_site=False) for j, box in enumerate(task.boxes))
            for j, finding in enumerate(task.findings):
                groups.append(
                    hd.sr.MeasurementsAndQualitativeEvaluations(
                        tracking_identifier=self._tracking(
                            "finding", i, j, label=finding.label or finding.finding.meaning
                        ),
                        finding_type=_code(finding.finding),
                        algorithm_id=self.algorithm_id,
                        qualitative_evaluations=[
                            hd.sr.QualitativeEvaluation(
                                name=_code(finding.finding),
                                value=codes.SCT.Present if finding.present else codes.SCT.Absent,
                            )
                        ],
                        measurements=self._score(finding.score),
                    )
                )
        for k, m in enumerate(loose):
            groups.append(
                hd.sr.MeasurementsAndQualitativeEvaluations(
                    tracking_identifier=self._tracking("measurement", k, label=m.concept.meaning),
                    algorithm_id=self.algorithm_id,
                    measurements=[
                        hd.sr.Measurement(name=_code(m.concept), value=m.value, unit=_code(m.unit))
                    ],
                )
            )
        evidence = [*self.sources, *([seg] if seg is not None else [])]
        return self._tid1500(groups, evidence, "measurements", "Measurements")

    def _tid1500(
        self, groups: Sequence[object], evidence: Sequence[Dataset], kind: str, what: str
    ) -> hd.sr.Comprehensive3DSR:
        procedure = (
            codes.SCT.ComputedTomography
            if self.modality == "CT"
            else hd.sr.CodedConcept("363680008", "SCT", "Radiographic imaging procedure")
        )
        report = hd.sr.MeasurementReport(
            observation_context=self._observation_context(),
            procedure_reported=procedure,
            imaging_measurements=groups,  # type: ignore[arg-type]
            title=codes.cid7021.ImagingMeasurementReport,
        )
        return self._new_sr(hd.sr.Comprehensive3DSR, evidence, report, self._sr_identity(kind, what))

    @staticmethod
    def _outline(component: np.ndarray) -> np.ndarray:
        return _outline_in_box(component, MAX_OUTLINE_POINTS)

    def _new_sr(
        self,
        cls: type[SR],
        evidence: Sequence[Dataset],
        content: Dataset | DicomSequence,
        identity: dict[str, object],
    ) -> SR:
        """The SR that ``cls(evidence=evidence, content=content, **identity)`` builds
        (``_new_sr_highdicom``; tests/unit/dicom_node/test_results.py checks they are equal).

        highdicom makes a reference item for each evidence instance (a pydicom dataset and two
        validated UIDs, for every one of 300-1000 source images, in each SR) and walks the content
        tree to check that the evidence covers it. Here highdicom is given only the evidence that
        the content names (and the first source, whose patient and study the SR copies), so it
        still checks the content; the Current Requested Procedure Evidence (and Pertinent Other
        Evidence) Sequence for all ``evidence`` is then written here, grouped and ordered as
        highdicom groups it, from UIDs read once per writer."""
        if not evidence:
            return self._new_sr_highdicom(cls, evidence, content, identity)  # highdicom's error
        keys = self._evidence_keys(evidence)
        named = _referenced_instances(content)
        few = [evidence[0], *(ds for ds, key in zip(evidence[1:], keys[1:], strict=True) if key[1] in named)]
        sr = cls(evidence=few, content=content, **identity)  # type: ignore[arg-type]
        same: dict[tuple[str, str], list[Dataset]] = defaultdict(list)
        other: dict[tuple[str, str], list[Dataset]] = defaultdict(list)
        seen: set[str] = set()
        study_uid = sr.StudyInstanceUID
        for sop_class, sop_instance, study, series in keys:
            if sop_instance in seen:  # an instance is named once
                continue
            seen.add(sop_instance)
            group = same if study == study_uid else other
            group[(study, series)].append(_sop_reference(sop_class, sop_instance))
        for keyword, groups in (
            ("CurrentRequestedProcedureEvidenceSequence", same),
            ("PertinentOtherEvidenceSequence", other),
        ):
            if groups:
                setattr(sr, keyword, _hierarchical_references(groups))
            elif keyword in sr:
                delattr(sr, keyword)
        return sr

    def _new_sr_highdicom(
        self,
        cls: type[SR],
        evidence: Sequence[Dataset],
        content: Dataset | DicomSequence,
        identity: dict[str, object],
    ) -> SR:
        """The SR as highdicom builds it from all the evidence: what ``_new_sr`` is checked against."""
        return cls(evidence=evidence, content=content, **identity)  # type: ignore[arg-type]

    def _evidence_keys(self, evidence: Sequence[Dataset]) -> list[tuple[str, str, str, str]]:
        """(SOP Class, SOP Instance, Study Instance, Series Instance UID) of each evidence instance;
        the sources' are read once for all the SRs of this writer."""
        if self._source_keys is None:
            self._source_keys = [_instance_key(ds) for ds in self.sources]
        by_source = {id(ds): key for ds, key in zip(self.sources, self._source_keys, strict=True)}
        return [by_source.get(id(ds)) or _instance_key(ds) for ds in evidence]

    @staticmethod
    def _region(src: Dataset, frame: int | None, points: np.ndarray) -> hd.sr.ImageRegion:
        """A POLYLINE SCOORD in (column, row) pixel coordinates of one source image (and frame)."""
        return hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=points,
            source_image=hd.sr.SourceImageForRegion(
                src.SOPClassUID, src.SOPInstanceUID, referenced_frame_numbers=[frame] if frame else None
            ),
        )

    def _box_group(
        self, i: int, j: int, box: pb.Box, with_site: bool
    ) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
        """Box j of task i: a closed 5-point POLYLINE "Bounded by" (Slicer shows it as a box)."""
        src, frame = self._source_for(box.slice_index)
        r0, c0, r1, c1 = box.row_min, box.column_min, box.row_max, box.column_max
        points = np.array([[c0, r0], [c1, r0], [c1, r1], [c0, r1], [c0, r0]], dtype=np.float32)
        return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=self._tracking("box", i, j, label=box.label or box.finding.meaning),
            referenced_region=self._region(src, frame, points),
            finding_type=_code(box.finding),
            geometric_purpose=codes.SCT.BoundedBy,
            algorithm_id=self.algorithm_id,
            finding_sites=[hd.sr.FindingSite(anatomic_location=_code(box.finding))] if with_site else None,
            measurements=self._score(box.score),
        )

    # -- key slices (TID 1500 for OHIF) ----------------------------------------------
    def key_slice(self, segment_number: int) -> int | None:
        """Index of the received slice where the segment's mask has the largest area (first on ties;
        interpolated slices are not candidates)."""
        if segment_number not in self._key_slices:
            self._key_slices[segment_number] = self._find_key_slice(segment_number)
        return self._key_slices[segment_number]

    def _find_key_slice(self, segment_number: int) -> int | None:
        mask = self.masks.get(segment_number)
        if mask is None:
            return None
        if isinstance(mask, PackedMask | FractionalMask):
            areas = mask.slice_counts()
        else:
            mask = np.asarray(mask, dtype=bool)
            areas = np.count_nonzero(mask.reshape(mask.shape[0], -1), axis=1)
        if len(self.received) != len(areas):
            keep = np.zeros(len(areas), dtype=bool)
            keep[self.received] = True
            areas = np.where(keep, areas, 0)
        return int(areas.argmax()) if areas.any() else None

    def _segment_outline_groups(
        self, info: pb.MaskInfo, k: int
    ) -> list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations]:
        """The segment's major connected components outlined on key slice k, each with its area."""
        src, frame = self._source_for(k)
        pixel_mm2 = _pixel_area_mm2(src, frame)  # a component's own pixels: holes are not counted
        label = info.label or info.type.meaning
        groups = []
        for part, component in enumerate(
            major_components(np.asarray(self.masks[info.segment_number][k], bool))
        ):
            area = float(component.sum()) * pixel_mm2 if pixel_mm2 else None
            # The largest part keeps the Tracking UID of this segment's volume group in "measurements".
            tracking = (
                self._tracking("segment", info.segment_number, label=label)
                if part == 0
                else self._tracking(
                    "segment", info.segment_number, "part", part, label=f"{label} ({part + 1})"
                )
            )
            groups.append(
                hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=tracking,
                    referenced_region=self._region(src, frame, self._outline(component)),
                    finding_type=_code(info.type),
                    algorithm_id=self.algorithm_id,
                    finding_sites=[hd.sr.FindingSite(anatomic_location=_code(info.type))],
                    measurements=(
                        [hd.sr.Measurement(name=codes.SCT.Area, value=round(area, 2), unit=MM2)]
                        if area is not None
                        else None
                    ),
                )
            )
        return groups

    def build_key_slice_report(self) -> hd.sr.Comprehensive3DSR | None:
        """TID 1500 whose every group has one image SCOORD (OHIF loads it); None if there is none."""
        groups: list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations] = []
        slices: set[int] = set()  # indices into the sources
        for info in sorted((m for t in self.result.tasks for m in t.masks), key=lambda m: m.segment_number):
            if (k := self.key_slice(info.segment_number)) is not None:
                groups.extend(self._segment_outline_groups(info, k))
                slices.add(self._nearest_received(k).source)  # type: ignore[arg-type]
        for i, task in enumerate(self.result.tasks):
            for j, box in enumerate(task.boxes):
                groups.append(self._box_group(i, j, box, with_site=True))
                slices.add(self._nearest_received(box.slice_index).source)  # type: ignore[arg-type]
        if not groups:
            return None
        evidence = [self.sources[k] for k in sorted(slices)]  # only the images the SCOORDs name
        return self._tid1500(groups, evidence, "keyslices", "Key slices")

    def _sr_identity(self, kind: str, what: str) -> dict[str, object]:
        """Derived UIDs, numbering and draft status shared by the SRs (UNVERIFIED: an AI draft)."""
        return {
            "series_instance_uid": self.uid(kind, "series"),
            "series_number": SERIES_NUMBERS[kind],
            "sop_instance_uid": self.instance_uid(kind),
            "instance_number": self.instance_number(kind),
            "previous_versions": self.previous.get(kind) or None,
            "manufacturer": MANUFACTURER,
            # General Equipment names the algorithm, as in the SEG (readers group results by it).
            "manufacturer_model_name": self.model.name,
            "software_versions": self.model.version or "unknown",
            "is_complete": True,
            "is_verified": False,
            "series_description": self._description(what),
            "contributing_equipment": [self._contributing_equipment()],
        }

    @staticmethod
    def _score(score: float) -> list[hd.sr.Measurement] | None:
        if score < 0:
            return None
        return [hd.sr.Measurement(name=PROBABILITY, value=float(score), unit=NO_UNITS)]

    def _provenance(self) -> hd.sr.ContainerContentItem:
        """Model identity, weights checksum, prompt ids and raw outputs, kept for audit."""
        contains = hd.sr.RelationshipTypeValues.CONTAINS

        def text(concept: hd.sr.CodedConcept, value: str) -> hd.sr.TextContentItem:
            return hd.sr.TextContentItem(name=concept, value=value, relationship_type=contains)

        entries = [
            text(ALGORITHM_NAME, self.model.name or "unknown"),
            text(ALGORITHM_VERSION, self.model.version or "unknown"),
        ]
        if self.model.weights_sha256:
            entries.append(text(WEIGHTS_SHA256, self.model.weights_sha256))
        if self.geometry_note:
            entries.append(text(INPUT_GEOMETRY, self.geometry_note))
        for task in self.result.tasks:
            entries.append(text(TASK_NAME, pb.TaskKind.Name(task.task).removeprefix("TASK_KIND_").lower()))
            if task.prompt_id:
                entries.append(text(PROMPT_ID, task.prompt_id))
            if task.raw_output:
                entries.append(text(RAW_OUTPUT, task.raw_output))
        container = hd.sr.ContainerContentItem(name=PROVENANCE, relationship_type=contains)
        container.ContentSequence = hd.sr.ContentSequence(entries)
        return container

    # -- key images (Secondary Capture, burned in) ----------------------------------
    def key_image_slices(self) -> list[int]:
        """The slices the key images show (keyimages.choose_key_slices)."""
        from dicom_node import keyimages as ki

        infos = sorted((m for t in self.result.tasks for m in t.masks), key=lambda m: m.segment_number)
        boxes = [(b.slice_index, b.score) for t in self.result.tasks for b in t.boxes]
        chosen = ki.choose_key_slices([self.key_slice(m.segment_number) for m in infos], boxes)
        # Only received images can be shown: an interpolated slice stands for its nearest one.
        return list(dict.fromkeys(self._received_index(k) for k in chosen))

    def _received_index(self, slice_index: int) -> int:
        return min(self.received, key=lambda r: (abs(r - slice_index), r))

    def _overlay(self, k: int) -> ki.Overlay:
        from dicom_node import keyimages as ki

        outlines = []
        for m in sorted((m for t in self.result.tasks for m in t.masks), key=lambda m: m.segment_number):
            plane = np.asarray(self.masks[m.segment_number][k], dtype=bool)
            if plane.any():
                outlines.append((m.label or m.type.meaning, ki.colour(m.segment_number, m.cielab), plane))
        boxes = []
        for task in self.result.tasks:
            for box in task.boxes:
                if self._received_index(box.slice_index) == k:
                    label = box.label or box.finding.meaning
                    if box.score >= 0:
                        label = f"{label} {box.score:.2f}"
                    boxes.append(
                        (label, ki.BOX_COLOUR, (box.row_min, box.column_min, box.row_max, box.column_max))
                    )
        return ki.Overlay(outlines, boxes)

    def _title_lines(self) -> list[str]:
        from dicom_node import keyimages as ki

        model = f"{self.model.name} {self.model.version}".strip()
        tag = " - non-clinical reference" if self.model.non_clinical else ""
        return [ki.BANNER, f"Model: {model}{tag}"]

    def build_key_images(self) -> list[hd.sc.SCImage]:
        """One RGB Secondary Capture per key slice, result burned in (see dicom_node.keyimages)."""
        from dicom_node import keyimages as ki

        images = []
        first = self.instance_number("keyimages")
        for i, k in enumerate(self.key_image_slices()):
            src, frame = self._source_for(k)
            if frame is not None:
                raise ValueError("Key images of multi-frame sources are not written yet")
            values, rescaled = ki.slice_values(src)
            grey = ki.windowed(values, ki.display_window(src, values, rescaled))
            rgb = ki.render(grey, self._overlay(k), self._title_lines())
            scale = rgb.shape[1] // grey.shape[1]
            spacing = [float(v) for v in src.get("PixelSpacing") or ()]
            orientation = ki.patient_orientation(src)
            with warnings.catch_warnings():  # a source's one-component person name is copied as it is
                warnings.filterwarnings("ignore", "The string .* is unlikely to represent", UserWarning)
                sc = hd.sc.SCImage.from_ref_dataset(
                    ref_dataset=src,
                    pixel_array=rgb,
                    photometric_interpretation="RGB",
                    bits_allocated=8,
                    coordinate_system="PATIENT",
                    series_instance_uid=self.uid("keyimages", "series"),
                    series_number=SERIES_NUMBERS["keyimages"],
                    sop_instance_uid=self.uid("keyimages", "instance", self.input_key, k),
                    instance_number=first + i,
                    manufacturer=MANUFACTURER,
                    patient_orientation=orientation or ("L", "P"),
                    pixel_spacing=(
                        (spacing[0] / scale, spacing[1] / scale)
                        if len(spacing) == 2 and min(spacing) > 0
                        else None
                    ),
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    manufacturer_model_name=self.model.name,
                    software_versions=self.model.version or "unknown",
                    series_description=self._description("AI key images"),
                    contributing_equipment=[self._contributing_equipment()],
                )
            for element in sc:  # highdicom copies dates and times as DA/TM objects; keep plain text
                if element.VR in ("DA", "TM", "DT") and element.VM == 1 and element.value:
                    element.value = str(element.value)
            if orientation is None:
                sc.PatientOrientation = None  # Type 2: known to be unknown
            sc.Laterality = src.get("Laterality", None)  # Type 2C (paired body parts); empty if unknown
            sc.ImageType = ["DERIVED", "SECONDARY"]
            sc.ConversionType = "WSD"  # a workstation rendered it
            sc.BurnedInAnnotation = "YES"
            sc.LossyImageCompression = "00"
            sc.DerivationDescription = clean(
                f"{ki.BANNER}. Source image windowed, {self.model.name} result drawn over it", "ST"
            )
            sc.ImageComments = clean(f"{ki.BANNER}; {' '.join(self._title_lines()[1:])}", "LT")
            ref = Dataset()
            ref.ReferencedSOPClassUID = src.SOPClassUID
            ref.ReferencedSOPInstanceUID = src.SOPInstanceUID
            sc.SourceImageSequence = [ref]
            images.append(sc)
        return images

    def _contributing_equipment(self) -> hd.ContributingEquipment:
        """The AI as Processing Equipment (IHE AIR: the producing algorithm named in the header)."""
        return hd.ContributingEquipment(
            manufacturer=MANUFACTURER,
            purpose_of_reference=codes.DCM.ProcessingEquipment,
            manufacturer_model_name=self.model.name,
            software_versions=self.model.version or "unknown",
            contribution_description=clean(
                f"AI result by {self.model.name} ({self.model.backend or 'unknown backend'})", "ST"
            ),
        )

    # -- TID 2000 narrative ----------------------------------------------------------
    def build_narrative(self) -> hd.sr.EnhancedSR:
        root = hd.sr.ContainerContentItem(name=TITLE, template_id="2000")
        items: list[hd.sr.ContentItem] = []
        language = next((t.report.language for t in self.result.tasks if t.HasField("report")), "en") or "en"
        lang = LANGUAGES.get(language.split("-")[0], hd.sr.CodedConcept(language, "RFC5646", language))
        items.append(
            hd.sr.CodeContentItem(
                name=LANGUAGE, value=lang, relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD
            )
        )
        items.extend(self._observation_context())
        findings, impressions = [], []
        for task in self.result.tasks:
            if task.HasField("report"):
                if task.report.findings:
                    findings.append(task.report.findings)
                if task.report.impression:
                    impressions.append(task.report.impression)
            if task.answer:
                findings.append(task.answer)
        if self.model.non_clinical:
            impressions.append("Non-clinical reference output; not for diagnostic use.")
        if self.geometry_note:
            findings.append(f"Input geometry: {self.geometry_note}.")
        for section, concept, texts in (
            (FINDINGS_SECTION, codes.DCM.Finding, findings),
            (IMPRESSIONS_SECTION, codes.DCM.Impression, impressions),
        ):
            if not texts:
                continue
            container = hd.sr.ContainerContentItem(
                name=section, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
            )
            container.ContentSequence = hd.sr.ContentSequence(
                [
                    hd.sr.TextContentItem(
                        name=concept, value=text, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
                    )
                    for text in texts
                ]
            )
            items.append(container)
        items.append(self._provenance())
        root.ContentSequence = hd.sr.ContentSequence(items)
        sr = self._new_sr(hd.sr.EnhancedSR, self.sources, root, self._sr_identity("narrative", "Report"))
        sr.SpecificCharacterSet = SPECIFIC_CHARACTER_SET
        return sr
