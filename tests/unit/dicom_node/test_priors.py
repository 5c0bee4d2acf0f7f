"""Prior fetching's configuration and choice of priors (dicom_node.priors)."""

from __future__ import annotations

import pytest

from dicom_node.config import NodeSettings, settings_from
from dicom_node.priors import PriorStudy, choose_priors
from radbridge_common.settings import ConfigError

SOURCE = {"pull": {"sources": {"pacs": {"host": "127.0.0.1", "port": 4242, "ae_title": "ORTHANC"}}}}


def _rules(**keys: object) -> dict:
    return {"routing": {"rules": [{"name": "ct", "match": {"modality": ["CT"]}, **keys}]}}


def test_a_rule_with_priors_from_a_configured_source_loads() -> None:
    settings = settings_from(
        {**SOURCE, **_rules(pull_priors=2, priors_from="pacs", priors_same_modality=True)}
    )
    (rule,) = settings.routing.rules
    assert (rule.pull_priors, rule.priors_from, rule.priors_same_modality) == (2, "pacs", True)


def test_priors_are_off_by_default() -> None:
    assert all(rule.pull_priors == 0 and not rule.priors_from for rule in NodeSettings().routing.rules)


def test_an_unknown_priors_source_is_a_config_error_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"routing\.rules\[0\]\.priors_from: 'nowhere' .*configured: pacs"):
        settings_from({**SOURCE, **_rules(pull_priors=1, priors_from="nowhere")})


def test_priors_without_a_source_is_a_config_error_naming_the_keys() -> None:
    with pytest.raises(ConfigError, match=r"pull_priors = 1 needs priors_from"):
        settings_from({**SOURCE, **_rules(pull_priors=1)})


@pytest.mark.parametrize("count", [-1, 21])
def test_a_bad_prior_count_is_a_config_error(count: object) -> None:
    with pytest.raises(ConfigError, match="pull_priors must be 0"):
        settings_from({**SOURCE, **_rules(pull_priors=count, priors_from="pacs")})


def _study(uid: str, date: str, time: str = "", modalities: tuple[str, ...] = ("CT",)) -> PriorStudy:
    return PriorStudy(uid, date, time, frozenset(modalities))


def test_the_most_recent_other_studies_are_chosen() -> None:
    studies = [
        _study("1.1", "20200101"),
        _study("1.2", "20240101", "08:00:00"),
        _study("1.3", "20240101", "120000"),
        _study("1.9", "20260101"),  # the current study
        _study("1.4", ""),  # no date: last
    ]
    assert [s.study_instance_uid for s in choose_priors(studies, "1.9", 2, None)] == ["1.3", "1.2"]
    assert [s.study_instance_uid for s in choose_priors(studies, "1.9", 9, None)][-1] == "1.4"


def test_same_modality_keeps_only_studies_sharing_one() -> None:
    studies = [
        _study("1.1", "20250101", modalities=("MR",)),
        _study("1.2", "20200101", modalities=("CT", "SR")),
    ]
    assert [s.study_instance_uid for s in choose_priors(studies, "1.9", 1, frozenset({"CT"}))] == ["1.2"]
    assert [s.study_instance_uid for s in choose_priors(studies, "1.9", 1, None)] == ["1.1"]


def test_no_other_study_means_no_prior() -> None:
    assert choose_priors([_study("1.9", "20260101")], "1.9", 3, None) == []
