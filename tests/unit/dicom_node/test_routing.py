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


# -- rules checked against the models' declared tasks ---------------------------------------


def _model(name: str, tasks: list[int], default: bool = False):  # noqa: ANN202
    from protos.radbridge.v1 import inference_pb2 as pb

    return pb.ModelInfo(identity=pb.ModelIdentity(name=name), tasks=tasks, is_default=default)


def test_plan_names_the_tasks_a_model_cannot_do_and_keeps_the_others() -> None:
    from dicom_node.routing import plan_rules
    from protos.radbridge.v1 import inference_pb2 as pb

    models = [
        _model("reference", [pb.TASK_KIND_SEGMENT, pb.TASK_KIND_REPORT, pb.TASK_KIND_DETECT], default=True),
        _model(
            "paligemma", [pb.TASK_KIND_CLASSIFY, pb.TASK_KIND_DETECT, pb.TASK_KIND_REPORT, pb.TASK_KIND_VQA]
        ),
    ]
    rules = [
        RoutingRule(name="ct", tasks=["segment", "report"]),
        RoutingRule(name="cxr", model="paligemma", tasks=["segment", "detect"]),
        RoutingRule(name="gone", model="medgemma", tasks=["report"]),
        RoutingRule(name="none", model="paligemma", tasks=["segment"]),
    ]
    plans = plan_rules(rules, models)
    assert plans["ct"].runnable == ("segment", "report") and plans["ct"].problem == ""
    assert plans["ct"].model == "reference"  # the default model
    assert plans["cxr"].runnable == ("detect",) and plans["cxr"].skipped == ("segment",)
    assert plans["cxr"].problem == (
        "routing rule 'cxr': model 'paligemma' cannot do segment (it does classify, detect, report, vqa); "
        "its other tasks still run"
    )
    assert plans["gone"].runnable == () and plans["gone"].problem == (
        "routing rule 'gone': model 'medgemma' is not loaded by the inference service (loaded: paligemma, reference)"
    )
    assert plans["none"].problem.endswith("; the rule runs nothing")


def test_planner_asks_again_when_a_model_is_missing() -> None:
    from dicom_node.routing import RulePlanner
    from protos.radbridge.v1 import inference_pb2 as pb

    answers = [[], [_model("reference", [pb.TASK_KIND_SEGMENT], default=True)]]
    calls = []

    def list_models():  # noqa: ANN202
        calls.append(1)
        return answers[min(len(calls) - 1, 1)]

    planner = RulePlanner([RoutingRule(name="ct", tasks=["segment"])], list_models, refresh_s=0.0)
    assert planner.plans()["ct"].runnable == ()
    assert planner.plan("ct").runnable == ("segment",)  # refreshed: the service has the model now
    assert len(calls) == 2
