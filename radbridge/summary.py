"""A short human summary of produced SEG/SR files, read back with highdicom."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import pydicom
from pydicom.uid import SegmentationStorage


def _texts(items: Sequence, out: list[str]) -> None:  # noqa: ANN001
    for item in items:
        if item.ValueType == "TEXT":
            out.append(f"  {item.ConceptNameCodeSequence[0].CodeMeaning}: {item.TextValue}")
        if "ContentSequence" in item:
            _texts(item.ContentSequence, out)


def summarize(paths: Sequence[Path]) -> str:
    lines: list[str] = []
    for path in paths:
        ds = pydicom.dcmread(path)
        lines.append(f"{Path(path).name}: {ds.Modality} '{ds.get('SeriesDescription', '')}'")
        if ds.SOPClassUID == SegmentationStorage:
            seg = hd.seg.Segmentation.from_dataset(ds)
            for number in seg.segment_numbers:
                desc = seg.get_segment_description(number)
                lines.append(f"  segment {number}: {desc.segment_label}")
        elif ds.Modality == "SR":
            sr = hd.sr.srread(path)
            groups = []
            try:
                groups = sr.content.get_volumetric_roi_measurement_groups()
            except (AttributeError, ValueError):
                groups = []
            for group in groups:
                for m in group.get_measurements():
                    lines.append(
                        f"  {group.tracking_identifier}: {m.name.meaning} {m.value:.1f} {m.unit.value}"
                    )
            templates = [t.TemplateIdentifier for t in ds.get("ContentTemplateSequence", [])]
            if "1500" not in templates:
                _texts(ds.get("ContentSequence", []), lines)
    return "\n".join(lines)
