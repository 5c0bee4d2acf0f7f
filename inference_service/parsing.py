"""Parsers of model text: never raise on bad output; return None and keep the raw text.

Pure Python, no torch: the same parsers serve every backend and are easy to test.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

SECTION = re.compile(
    r"(?im)^\s*(?:\*\*)?\s*(findings|impressions?|结论|印象|所见|检查所见|影像所见)\s*(?:\*\*)?\s*[:：]"
)
FINDINGS_WORDS = {"findings", "所见", "检查所见", "影像所见"}
LOC = re.compile(r"<loc(\d{4})>")
SEG = re.compile(r"<seg(\d{3})>")


def split_report(text: str) -> tuple[str, str] | None:
    """(findings, impression) from a report with labelled sections; plain text -> (text, "")."""
    text = text.strip()
    if not text:
        return None
    marks = list(SECTION.finditer(text))
    if not marks:
        return text, ""
    parts: dict[str, str] = {}
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        key = "findings" if m.group(1).lower() in FINDINGS_WORDS else "impression"
        body = text[m.end() : end].strip()
        parts[key] = (parts.get(key, "") + "\n" + body).strip()
    lead = text[: marks[0].start()].strip()
    findings = (lead + "\n" + parts.get("findings", "")).strip()
    return findings, parts.get("impression", "")


@dataclass(frozen=True)
class NormalizedBox:
    """A box on 0..scale of the square model input, (y0, x0, y1, x1)."""

    y0: float
    x0: float
    y1: float
    x1: float
    label: str


def parse_box_2d(text: str, scale: float = 1000.0) -> list[NormalizedBox] | None:
    """MedGemma 1.5 localization JSON: [{"box_2d": [y0, x0, y1, x1], "label": "..."}, ...]."""
    body = text.strip()
    fence = re.search(r"```(?:json)?\s*(.*?)```", body, re.S)
    if fence:
        body = fence.group(1).strip()
    start = min((i for i in (body.find("["), body.find("{")) if i >= 0), default=-1)
    if start < 0:
        return None
    try:
        data = json.loads(body[start:])
    except ValueError:
        return None
    items = data if isinstance(data, list) else [data]
    boxes = []
    for item in items:
        if not isinstance(item, dict):
            return None
        coords = item.get("box_2d")
        if not (
            isinstance(coords, list) and len(coords) == 4 and all(isinstance(v, int | float) for v in coords)
        ):
            return None
        y0, x0, y1, x1 = (min(max(float(v), 0.0), scale) for v in coords)
        boxes.append(NormalizedBox(y0, x0, y1, x1, str(item.get("label", ""))))
    return boxes


@dataclass(frozen=True)
class LocSegObject:
    """One PaliGemma object: 4 loc bins (y0, x0, y1, x1 of 1024) + optional 16 seg codes."""

    bins: tuple[int, int, int, int]
    seg_codes: tuple[int, ...]
    label: str


def parse_loc_seg(text: str) -> list[LocSegObject] | None:
    """'<loc..>x4 [<seg..>x16] label ; ...' -> objects; None if any object is malformed."""
    objects = []
    for chunk in [c.strip() for c in text.split(";") if c.strip()]:
        locs = [min(int(v), 1023) for v in LOC.findall(chunk)]
        segs = [int(v) for v in SEG.findall(chunk)]
        if len(locs) != 4 or len(segs) not in (0, 16) or any(v > 127 for v in segs):
            return None
        label = SEG.sub("", LOC.sub("", chunk)).strip()
        objects.append(LocSegObject(tuple(locs), tuple(segs), label))  # type: ignore[arg-type]
    return objects or None


def yes_no(text: str) -> bool | None:
    t = text.strip().lower()
    if t.startswith(("yes", "是", "有")):
        return True
    if t.startswith(("no", "否", "无", "没有")):
        return False
    return None
