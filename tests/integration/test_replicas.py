"""`radbridge serve` with several inference service replicas: concurrent studies spread over them,
and a replica that does not answer is passed over so the study is analysed by another one."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pydicom
import pytest

from dicom_node.spool import uid_key
from inference_service.config import ServiceSection, ServiceSettings
from radbridge.embedded import EmbeddedInferenceService
from radbridge.synth import SyntheticPatient, ct_series, write_series
from tests.e2e.test_pipeline import Serve, _config, _wait_for_outputs
from tests.peers import OrthancServer, free_port, storescu

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.usefixtures("require_dcmtk", "require_dicom3tools"),
]


def _written(log: Path) -> dict[str, str]:
    """study key -> the replica that analysed it, from the node's "analyze.written" log lines."""
    found: dict[str, str] = {}
    for line in log.read_text().splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if event.get("event") == "analyze.written":
            found[event["study_key"]] = event["inference_address"]
    return found


def _studies(tmp_path: Path, n: int) -> list[tuple[list[Path], str]]:
    out = []
    for i in range(n):
        patient = SyntheticPatient(patient_id=f"REPL{i}", name=f"Replica^{i}")
        files = write_series(ct_series(n_slices=24, seed=70 + i, patient=patient), tmp_path / f"ct{i}")
        out.append((files, str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)))
    return out


def test_concurrent_studies_spread_over_two_replicas(tmp_path: Path, orthanc: OrthancServer) -> None:
    services = [
        EmbeddedInferenceService(ServiceSettings(inference_service=ServiceSection(port=free_port()))).start()
        for _ in range(2)
    ]
    replicas = [s.address for s in services]
    port = free_port()
    addresses = ", ".join(f'"{a}"' for a in replicas)
    cfg = _config(tmp_path, port, orthanc, extra=f"\n[inference]\naddresses = [{addresses}]\n")
    cfg.write_text(cfg.read_text().replace("[worker]\n", "[worker]\nthreads = 2\n"))
    serve = Serve(cfg, tmp_path / "serve.log")
    try:
        studies = _studies(tmp_path, 2)
        senders = [
            threading.Thread(target=storescu, args=(files, "127.0.0.1", port, "RADBRIDGE")) for files, _ in studies
        ]
        for t in senders:
            t.start()
        for t in senders:
            t.join()
        for _, study_uid in studies:
            _wait_for_outputs(orthanc, study_uid, {"SEG": 1, "SR": 3})
    finally:
        serve.stop()
        for s in services:
            s.stop()
    used = _written(tmp_path / "serve.log")
    assert set(used) == {uid_key(uid) for _, uid in studies}
    assert set(used.values()) == set(replicas), used


def test_a_replica_that_does_not_answer_is_passed_over(tmp_path: Path, orthanc: OrthancServer) -> None:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    live = EmbeddedInferenceService(ServiceSettings(inference_service=ServiceSection(port=free_port()))).start()
    live_address = live.address
    port = free_port()
    extra = f'\n[inference]\naddresses = ["{dead}", "{live_address}"]\nconnect_retries = 0\n'
    cfg = _config(tmp_path, port, orthanc, extra=extra)
    serve = Serve(cfg, tmp_path / "serve.log")
    try:
        ((files, study_uid),) = _studies(tmp_path, 1)
        started = time.monotonic()
        assert storescu(files, "127.0.0.1", port, "RADBRIDGE").returncode == 0
        _wait_for_outputs(orthanc, study_uid, {"SEG": 1, "SR": 3})
        elapsed = time.monotonic() - started
    finally:
        serve.stop()
        live.stop()
    log = (tmp_path / "serve.log").read_text()
    assert _written(tmp_path / "serve.log") == {uid_key(study_uid): live_address}
    down = [json.loads(line) for line in log.splitlines() if '"inference.replica_down"' in line]
    assert [d["address"] for d in down] == [dead], down  # tried once, then set aside
    assert elapsed < 60, f"failover took {elapsed:.0f} s"  # one backoff (1 s), not a deadline


def test_health_checks_set_a_stopped_replica_aside_and_bring_it_back() -> None:
    """Two real services; the pool asks their grpc.health.v1 service: a stopped one gets no work
    although the other is busier, and one serving again on the same port comes back without
    waiting out its cooldown."""
    from dicom_node.client import InferenceClient
    from dicom_node.replicas import ReplicaPool

    def service(port: int) -> EmbeddedInferenceService:
        return EmbeddedInferenceService(ServiceSettings(inference_service=ServiceSection(port=port))).start()

    port_b = free_port()
    a, b = service(free_port()), service(port_b)
    addr_a, addr_b = a.address, b.address
    pool = ReplicaPool([addr_a, addr_b], lambda address: InferenceClient(address), cooldown_s=600)
    revived = None
    try:
        assert pool.check_health() == {addr_a: True, addr_b: True}
        b.stop()
        assert pool.check_health() == {addr_a: True, addr_b: False}
        held = [pool.client() for _ in range(3)]
        assert {c.address for c in held} == {addr_a}, "a stopped replica gets no work"
        revived = service(port_b)
        pool.start_health_checks(0.2)
        deadline = time.monotonic() + 20
        picked = set()
        while time.monotonic() < deadline and addr_b not in picked:
            c = pool.client()
            picked.add(c.address)
            c.close()
            time.sleep(0.1)
        assert addr_b in picked, "the replica serving again came back before its 600 s cooldown"
        for c in held:
            c.close()
    finally:
        pool.close()
        a.stop()
        if revived is not None:
            revived.stop()
