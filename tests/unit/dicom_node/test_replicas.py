"""ReplicaPool: least busy first, a failed replica passed over for its cool-down, slots given back."""

from __future__ import annotations

import pytest

from dicom_node.config import InferenceSection
from dicom_node.errors import InferenceRejected, InferenceUnavailable
from dicom_node.replicas import ReplicaPool


class FakeClient:
    """Stands in for InferenceClient: fails as told, records being closed."""

    def __init__(self, address: str, outcomes: dict[str, Exception | None], closed: list[str]) -> None:
        self.address = address
        self._outcome = outcomes.get(address)
        self._closed = closed

    def analyze_upload(self, upload: object, on_progress: object = None) -> str:
        if self._outcome is not None:
            raise self._outcome
        return f"done by {self.address}"

    def list_models(self, timeout_s: float) -> object:
        if self._outcome is not None:
            raise self._outcome
        return type("Models", (), {"models": [self.address]})()

    def close(self) -> None:
        self._closed.append(self.address)

    def healthy(self, timeout_s: float = 2.0) -> bool:
        return SERVING.get(self.address, True)


#: What each fake replica's grpc.health.v1 answers (SERVING unless set here).
SERVING: dict[str, bool] = {}


@pytest.fixture(autouse=True)
def _all_serving() -> None:
    SERVING.clear()


def _pool(outcomes: dict[str, Exception | None] | None = None, cooldown_s: float = 30.0):
    closed: list[str] = []
    pool = ReplicaPool(
        ["a:1", "b:2", "a:1"], lambda address: FakeClient(address, outcomes or {}, closed), cooldown_s
    )
    return pool, closed


def test_least_busy_replica_first_and_slots_given_back() -> None:
    pool, closed = _pool()
    assert pool.addresses == ["a:1", "b:2"]  # duplicates dropped, order kept
    first, second = pool.client(), pool.client()
    assert {first.address, second.address} == {"a:1", "b:2"}
    assert pool.in_flight() == {"a:1": 1, "b:2": 1}
    third = pool.client()  # both busy: the one used longest ago
    assert third.address == first.address
    first.close()
    first.close()  # idempotent
    assert pool.in_flight()[first.address] == 1
    third.close()
    assert pool.client().address == first.address  # now the least busy
    assert closed == [first.address, first.address]


def test_failed_replica_is_passed_over_during_its_cooldown() -> None:
    pool, _ = _pool({"a:1": InferenceUnavailable("UNAVAILABLE: connection refused")})
    client = pool.client()
    assert client.address == "a:1"
    with pytest.raises(InferenceUnavailable):
        client.analyze_upload(object())
    client.close()
    for _ in range(3):  # b is busy and a idle, yet a stays set aside
        busy = pool.client()
        assert busy.address == "b:2"
        assert busy.analyze_upload(object()) == "done by b:2"
    assert pool.in_flight() == {"a:1": 0, "b:2": 3}


def test_a_rejection_is_not_an_outage() -> None:
    pool, _ = _pool({"a:1": InferenceRejected("INVALID_ARGUMENT: bad volume")})
    client = pool.client()
    with pytest.raises(InferenceRejected):
        client.analyze_upload(object())
    client.close()
    assert pool.client().address == "b:2"
    assert pool.client().address == "a:1"  # not set aside: a bad volume says nothing about the replica


def test_all_failed_still_tries_one_and_cooldown_expires() -> None:
    pool, _ = _pool({"a:1": InferenceUnavailable("down"), "b:2": InferenceUnavailable("down")}, 0.0)
    for _ in range(2):
        c = pool.client()
        with pytest.raises(InferenceUnavailable):
            c.analyze_upload(object())
        c.close()
    assert pool.client().address in {"a:1", "b:2"}


def test_list_models_from_the_first_replica_that_answers() -> None:
    pool, closed = _pool({"a:1": InferenceUnavailable("down")})
    assert pool.list_models(1.0) == ["b:2"]
    assert closed == ["a:1", "b:2"]
    dead, _ = _pool({"a:1": InferenceUnavailable("down"), "b:2": InferenceUnavailable("down too")})
    with pytest.raises(InferenceUnavailable, match="down too"):
        dead.list_models(1.0)


def test_config_replicas_and_bad_addresses() -> None:
    assert InferenceSection().replicas() == []
    section = InferenceSection(address="gpu1:50051", addresses=["gpu2:50051", "gpu1:50051"])
    assert section.replicas() == ["gpu1:50051", "gpu2:50051"]
    with pytest.raises(ValueError, match="host:port"):
        InferenceSection(addresses=["gpu2"])
    with pytest.raises(ValueError, match="required"):
        ReplicaPool([], lambda a: FakeClient(a, {}, []))


def _fail_a_job(pool: ReplicaPool, address: str) -> None:
    client = pool.client()
    assert client.address == address
    with pytest.raises(InferenceUnavailable):
        client.analyze_upload(object())
    client.close()


def test_a_replica_failing_jobs_while_serving_waits_out_its_cooldown() -> None:
    """Health checks do not bring back a replica that answers SERVING while its analyses fail
    (overloaded, a broken model): jobs would be sent back to it every health interval."""
    pool, _ = _pool({"a:1": InferenceUnavailable("DEADLINE_EXCEEDED")})
    _fail_a_job(pool, "a:1")
    assert pool.check_health() == {"a:1": True, "b:2": True}
    assert [pool.client().address for _ in range(3)] == ["b:2"] * 3  # a stays aside though idle


def test_a_replica_seen_down_and_serving_again_comes_back_before_its_cooldown() -> None:
    """A restart: its failed job is forgiven once the health checks see it down, then serving."""
    for seen_down_during_the_job in (False, True):
        pool, _ = _pool({"a:1": InferenceUnavailable("UNAVAILABLE")})
        client = pool.client()
        assert client.address == "a:1"
        if seen_down_during_the_job:
            SERVING["a:1"] = False
            pool.check_health()
        with pytest.raises(InferenceUnavailable):
            client.analyze_upload(object())
        client.close()
        SERVING["a:1"] = False
        assert pool.check_health() == {"a:1": False, "b:2": True}
        assert pool.client().address == "b:2"
        SERVING["a:1"] = True  # restarted
        assert pool.check_health() == {"a:1": True, "b:2": True}
        assert pool.client().address == "a:1", f"seen down during the job: {seen_down_during_the_job}"


def test_a_replica_not_serving_is_set_aside_until_it_serves() -> None:
    pool, _ = _pool()
    SERVING["b:2"] = False
    pool.check_health()
    assert [pool.client().address for _ in range(2)] == ["a:1", "a:1"]  # b idle but not serving
    SERVING["b:2"] = True
    pool.check_health()
    assert pool.client().address == "b:2"
