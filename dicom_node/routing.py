"""Routing: declarative match tables from the config -> (series, rule) pairs.

A rule matches a series when every field it gives matches (modality and
calling AE by list membership; body part and series description by
case-insensitive regular expression). Every matching rule yields one analysis.
Series of non-image objects (SR, SEG, KO, PR, ...) are never routed.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom

from dicom_node.config import RoutingRule
from dicom_node.index import InstanceRow

NON_IMAGE_MODALITIES = frozenset({"SR", "SEG", "KO", "PR", "REG", "RTSTRUCT", "RTPLAN", "DOC", "OT_SR"})


@dataclass(frozen=True)
class SeriesInfo:
    """What routing looks at, read from one header of the series."""

    series_instance_uid: str
    modality: str
    body_part: str
    series_description: str
    calling_aet: str
    paths: tuple[Path, ...]


def group_series(rows: Sequence[InstanceRow]) -> list[SeriesInfo]:
    by_series: dict[str, list[InstanceRow]] = defaultdict(list)
    for row in rows:
        by_series[row.series_instance_uid].append(row)
    series = []
    for uid, members in sorted(by_series.items()):
        first = members[0]
        try:
            ds = pydicom.dcmread(
                first.path, stop_before_pixels=True, specific_tags=["BodyPartExamined", "SeriesDescription"]
            )
            body_part = str(ds.get("BodyPartExamined", "") or "")
            description = str(ds.get("SeriesDescription", "") or "")
        except Exception:  # routing still works on modality alone
            body_part = description = ""
        series.append(
            SeriesInfo(
                series_instance_uid=uid,
                modality=first.modality,
                body_part=body_part,
                series_description=description,
                calling_aet=first.calling_aet,
                paths=tuple(m.path for m in members),
            )
        )
    return series


def rule_matches(rule: RoutingRule, series: SeriesInfo) -> bool:
    m = rule.match
    if m.modality and series.modality.upper() not in {v.upper() for v in m.modality}:
        return False
    if m.calling_aet and series.calling_aet not in m.calling_aet:
        return False
    if m.body_part and not re.search(m.body_part, series.body_part, re.IGNORECASE):
        return False
    return not (
        m.series_description and not re.search(m.series_description, series.series_description, re.IGNORECASE)
    )


def route(
    series: Sequence[SeriesInfo], rules: Sequence[RoutingRule], min_instances: int = 1
) -> list[tuple[SeriesInfo, RoutingRule]]:
    """Every (series, rule) pair to analyze, in a stable order."""
    pairs = []
    for s in series:
        if s.modality.upper() in NON_IMAGE_MODALITIES or len(s.paths) < min_instances:
            continue
        pairs.extend((s, rule) for rule in rules if rule_matches(rule, s))
    return pairs
