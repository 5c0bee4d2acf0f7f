"""Routing: declarative match tables from the config -> (series, rule) pairs.

A rule matches a series when every field it gives matches (modality and
calling AE by list membership; body part and series description by
case-insensitive regular expression). Every matching rule yields one analysis.
Series of non-image objects (SR, SEG, KO, PR, ...) are never routed.
"""

from __future__ import annotations

import re
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom

from dicom_node.client import TASKS
from dicom_node.config import RoutingRule
from dicom_node.index import InstanceRow
from protos.radbridge.v1 import inference_pb2 as pb

TASK_NAMES = {kind: name for name, kind in TASKS.items()}

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


@dataclass(frozen=True)
class RulePlan:
    """What one routing rule will really ask of the inference service."""

    rule: str
    model: str  # the model's name as the service reports it ("" when it is not loaded)
    runnable: tuple[str, ...]  # the rule's tasks the model declares
    skipped: tuple[str, ...]  # the rule's tasks it cannot do
    problem: str = ""  # in words, for the operator; empty when the rule is fine


def plan_rules(rules: Sequence[RoutingRule], models: Sequence[pb.ModelInfo]) -> dict[str, RulePlan]:
    """Check every rule against the models' declared tasks (``ListModels``).

    A task the model cannot do is skipped and named, so that the tasks it can do still run; a rule
    whose model is not loaded runs nothing and says so.
    """
    by_name = {m.identity.name: m for m in models}
    default = next((m for m in models if m.is_default), None)
    plans = {}
    for rule in rules:
        info = by_name.get(rule.model) if rule.model else default
        if info is None:
            loaded = ", ".join(sorted(by_name)) or "none"
            wanted = f"model {rule.model!r}" if rule.model else "a default model"
            problem = f"routing rule {rule.name!r}: {wanted} is not loaded by the inference service (loaded: {loaded})"
            plans[rule.name] = RulePlan(rule.name, "", (), tuple(rule.tasks), problem)
            continue
        declared = {TASK_NAMES[t] for t in info.tasks if t in TASK_NAMES}
        runnable = tuple(t for t in rule.tasks if t in declared)
        skipped = tuple(t for t in rule.tasks if t not in declared)
        problem = ""
        if skipped:
            problem = (
                f"routing rule {rule.name!r}: model {info.identity.name!r} cannot do {', '.join(skipped)} "
                f"(it does {', '.join(sorted(declared)) or 'nothing'})"
                + ("; its other tasks still run" if runnable else "; the rule runs nothing")
            )
        plans[rule.name] = RulePlan(rule.name, info.identity.name, runnable, skipped, problem)
    return plans


class RulePlanner:
    """The rules' plans from the service's ``ListModels``, asked once and again (at most every
    ``refresh_s``) when a rule's model is missing, e.g. after the service restarted with other models.
    ``list_models`` raising (service down) propagates: the caller waits the outage out."""

    def __init__(
        self,
        rules: Sequence[RoutingRule],
        list_models: Callable[[], Sequence[pb.ModelInfo]],
        refresh_s: float = 30.0,
    ) -> None:
        self.rules = list(rules)
        self._list_models = list_models
        self._refresh_s = refresh_s
        self._plans: dict[str, RulePlan] | None = None
        self._asked = 0.0
        self._lock = threading.Lock()

    def plans(self) -> dict[str, RulePlan]:
        with self._lock:
            if self._plans is None:
                self._plans = plan_rules(self.rules, self._list_models())
                self._asked = time.monotonic()
            return self._plans

    def plan(self, rule_name: str) -> RulePlan | None:
        plan = self.plans().get(rule_name)
        if plan is not None and not plan.model and time.monotonic() - self._asked > self._refresh_s:
            with self._lock:
                self._plans = None
            plan = self.plans().get(rule_name)
        return plan
