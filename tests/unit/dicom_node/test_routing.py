from __future__ import annotations

from pathlib import Path

from dicom_node.config import RoutingRule, RuleMatch
from dicom_node.routing import SeriesInfo, route, rule_matches


def _series(modality: str = "CT", body: str = "CHEST", desc: str = "Axial", aet: str = "CT1") -> SeriesInfo:
    return SeriesInfo("1.2", modality, body, desc, aet, (Path("x"),))


def test_match_fields() -> None:
    rule = RoutingRule(
        name="r",
        match=RuleMatch(
            modality=["ct"], body_part="chest|thorax", series_description="^ax", calling_aet=["CT1"]
        ),
    )
    assert rule_matches(rule, _series())
    assert not rule_matches(rule, _series(modality="MR"))
    assert not rule_matches(rule, _series(body="HEAD"))
    assert not rule_matches(rule, _series(desc="Coronal"))
    assert not rule_matches(rule, _series(aet="OTHER"))


def test_every_matching_rule_routes_and_non_images_never() -> None:
    rules = [RoutingRule(name="a"), RoutingRule(name="b", match=RuleMatch(modality=["CT"]))]
    pairs = route([_series(), _series(modality="SR"), _series(modality="SEG")], rules)
    assert [r.name for _, r in pairs] == ["a", "b"]


def test_no_rule_no_pairs() -> None:
    assert route([_series(modality="MR")], [RoutingRule(name="ct", match=RuleMatch(modality=["CT"]))]) == []


def test_min_instances_skips_small_series() -> None:
    assert route([_series()], [RoutingRule(name="a")], min_instances=2) == []
    assert len(route([_series()], [RoutingRule(name="a")], min_instances=1)) == 1
