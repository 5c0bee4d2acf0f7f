"""Storage Commitment Push Model on C-STORE export, against real peers.

Orthanc 1.10.1 is the commitment SCP: it answers the N-ACTION at once and sends the N-EVENT-REPORT
on a new association to the node's SCP (the node is declared in its DicomModalities). A pynetdicom
peer sends the report on the export's own association instead. dcmtk 3.6.7 has no Storage
Commitment SCP (storescp, dcmqrscp: no N-ACTION), so its storescp stands for a PACS without it.

The export jobs are driven with the worker's own ``run_job``; the node's SCP (``start_scp``) and
the job share one index, as in ``radbridge serve``.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, build_role, evt
from pynetdicom.sop_class import StorageCommitmentPushModel

from dicom_node.commitment import PUSH_MODEL_INSTANCE, build_action
from dicom_node.config import ExportSection, ExportTarget, NodeSettings, ScpSection, SpoolSection
from dicom_node.index import Commitment, CommitmentState, Delivery, Index, Job, JobKind, JobState
from dicom_node.results import ResultWriter
from dicom_node.scp import start_scp
from dicom_node.spool import Spool, uid_key
from dicom_node.status import StudyStatus, derive, describe
from dicom_node.volume import read_series
from dicom_node.worker import StepContext, run_job
from tests.conftest import StartScp
from tests.peers import OrthancServer, dcmtk_env, free_port

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("require_dcmtk")]
NODE_AE = "RADBRIDGE"


@pytest.fixture(scope="module")
def result_files(small_ct_files: list[Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The SEG and SRs the writers make of the reference backend's CT result, by kind."""
    from tests.reference_run import analyze_reference

    vol = read_series(small_ct_files)
    outcome = analyze_reference(vol)
    out = tmp_path_factory.mktemp("results")
    paths = {}
    for obj in ResultWriter(vol.sources, outcome.result, outcome.masks).build_all():
        paths[obj.kind] = out / f"{obj.kind}-{uid_key(str(obj.dataset.SOPInstanceUID), 24)}.dcm"
        obj.dataset.save_as(paths[obj.kind], enforce_file_format=True)
    assert {"seg", "measurements", "narrative"} <= set(paths)
    return paths


def _orthanc(tmp_path: Path, node_port: int, **extra: Any) -> OrthancServer:
    """Orthanc knowing the node (AET, host, port) as a modality it may send commitment reports to."""
    node = {"AET": NODE_AE, "Host": "127.0.0.1", "Port": node_port, "AllowStorageCommitment": True}
    return OrthancServer(tmp_path / "orthanc", modalities={"radbridge": node}, extra_config=extra)


def _ctx(index: Index, spool: Spool, target: ExportTarget, max_attempts: int = 1) -> StepContext:
    settings = NodeSettings(
        spool=SpoolSection(spool.root),
        export=ExportSection(targets={"pacs": target}, max_attempts=max_attempts, backoff_s=0.01),
    )
    return StepContext(settings, spool, index, client_factory=lambda: pytest.fail("no inference"))


def _target(port: int, ae_title: str = "ORTHANC", **keys: Any) -> ExportTarget:
    keys.setdefault("commitment_hold_s", 5.0)
    return ExportTarget(host="127.0.0.1", port=port, ae_title=ae_title, storage_commitment=True, **keys)


def _study_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def _queue(ctx: StepContext, *paths: Path) -> None:
    for path in paths:
        ctx.index.add_job(
            JobKind.EXPORT, f"{path.name}->pacs", _study_uid(path), {"path": str(path), "target": "pacs"}
        )


def _run_due(ctx: StepContext) -> list[JobState]:
    states = []
    while (job := ctx.index.claim_job(kinds=(JobKind.EXPORT,))) is not None:
        states.append(run_job(job, ctx))
    return states


def _study(uid: str) -> dict[str, Any]:
    now = time.time()
    return {
        "study_instance_uid": uid,
        "state": "COMPLETE",
        "reason": "",
        "last_received_time": now,
        "updated_time": now,
    }


def _until(predicate: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _job(ctx: StepContext, kind: str) -> Job:
    (job,) = [j for j in ctx.index.jobs() if Path(j.payload["path"]).name.startswith(f"{kind}-")]
    return job


class GatedRelay:
    """A TCP relay that holds each connection until ``open()``: here, Orthanc's association
    carrying the N-EVENT-REPORT waits until the test has looked at the state before it."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.gate = threading.Event()
        self.connections = 0
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._sockets: list[socket.socket] = [self._server]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            self.connections += 1
            self._sockets.append(client)
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        if not self.gate.wait(30):
            return
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        self._sockets.append(upstream)
        for src, dst in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self.gate.set()
        for sock in self._sockets:
            sock.close()


@pytest.fixture
def relay_factory() -> Iterator[Callable[[int], GatedRelay]]:
    relays: list[GatedRelay] = []

    def make(upstream_port: int) -> GatedRelay:
        relays.append(GatedRelay(upstream_port))
        return relays[-1]

    yield make
    for relay in relays:
        relay.close()


def test_delivery_is_committed_only_after_the_n_event_report(
    tmp_path: Path,
    start_node_scp: StartScp,
    result_files: dict[str, Path],
    relay_factory: Callable[[int], GatedRelay],
) -> None:
    node_port, spool, index = start_node_scp()
    relay = relay_factory(node_port)  # Orthanc reaches the node's SCP only through the gate
    with _orthanc(tmp_path, relay.port) as orthanc:
        ctx = _ctx(index, spool, _target(orthanc.dicom_port, commitment_hold_s=0.5))
        seg = result_files["seg"]
        study = _study_uid(seg)
        _queue(ctx, seg)
        assert _run_due(ctx) == [JobState.PENDING]  # C-STORE and N-ACTION done, no report yet
        job = _job(ctx, "seg")
        assert job.delivery is Delivery.AWAITING_COMMITMENT and job.attempts == 0
        assert len(orthanc.find_instances(StudyInstanceUID=study)) == 1  # stored at the PACS...
        status, reasons = derive(_study(study), ctx.index.jobs())
        assert status is StudyStatus.EXPORTING  # ...but not delivered until committed
        assert reasons == [
            f"export of the seg to 'pacs': sent, awaiting commitment (sent to ORTHANC@127.0.0.1:"
            f"{orthanc.dicom_port}, awaiting its storage commitment report)"
        ]
        _until(lambda: relay.connections == 1, "Orthanc's association for the report")
        assert ctx.index.open_commitment(job.id).state is CommitmentState.AWAITING

        relay.gate.set()  # the N-EVENT-REPORT reaches the node's SCP
        _until(lambda: ctx.index.open_commitment(job.id).state is not CommitmentState.AWAITING, "the report")
        request = ctx.index.open_commitment(job.id)
        assert (
            request.state is CommitmentState.COMMITTED
            and request.detail == "ORTHANC: 1 instance(s) committed"
        )
        assert _run_due(ctx) == [JobState.SUCCEEDED]  # the report woke the job at once
        done = _job(ctx, "seg")
        assert done.delivery is Delivery.COMMITTED and done.attempts == 1
        assert derive(_study(study), ctx.index.jobs()) == (StudyStatus.DELIVERED, [])
        assert describe(ctx.index, _study(study))["deliveries"] == [
            {"what": "export of the seg to 'pacs'", "delivery": "committed"}
        ]
        events = [e["event"] for e in ctx.index.events(study)]
        assert events == ["export awaiting commitment", "export committed", "export done"]


def test_a_report_arriving_after_a_restart_completes_the_export(
    tmp_path: Path, result_files: dict[str, Path], relay_factory: Callable[[int], GatedRelay]
) -> None:
    spool = Spool(tmp_path / "spool")
    index = Index(spool.index_path)
    before = start_scp(ScpSection(port=0, ae_title=NODE_AE), spool, index)
    relay = relay_factory(before.server_address[1])
    with _orthanc(tmp_path, relay.port) as orthanc:
        target = _target(orthanc.dicom_port, commitment_hold_s=0.2)
        _queue(_ctx(index, spool, target), result_files["seg"])
        assert _run_due(_ctx(index, spool, target)) == [JobState.PENDING]
        _until(lambda: relay.connections == 1, "Orthanc's association for the report")
        before.shutdown()  # the node stops while the report waits at the gate
        index.close()

        index = Index(spool.index_path)  # and starts again, on the same spool
        after = start_scp(ScpSection(port=0, ae_title=NODE_AE), spool, index)
        try:
            ctx = _ctx(index, spool, target)
            assert _job(ctx, "seg").delivery is Delivery.AWAITING_COMMITMENT
            relay.upstream_port = after.server_address[1]
            relay.gate.set()
            _until(lambda: _job(ctx, "seg").next_try_time <= time.time(), "the report to wake the job")
            assert _run_due(ctx) == [JobState.SUCCEEDED]
            assert _job(ctx, "seg").delivery is Delivery.COMMITTED
            assert (
                len(orthanc.find_instances(StudyInstanceUID=_study_uid(result_files["seg"]))) == 1
            )  # sent once
        finally:
            after.shutdown()
            index.close()


def test_an_object_acknowledged_but_not_kept_fails_commitment_and_is_retried(
    tmp_path: Path, start_node_scp: StartScp, result_files: dict[str, Path]
) -> None:
    # Orthanc 1.10.1 answers C-STORE 0x0000 for an instance its ReceivedInstanceFilter discards:
    # only storage commitment tells the node that the SR was not kept.
    lua = tmp_path / "drop-sr.lua"
    lua.write_text(
        "function ReceivedInstanceFilter(dicom, origin, info)\n  return dicom.Modality ~= 'SR'\nend\n"
    )
    node_port, spool, index = start_node_scp()
    with _orthanc(tmp_path, node_port, LuaScripts=[str(lua)]) as orthanc:
        ctx = _ctx(index, spool, _target(orthanc.dicom_port), max_attempts=2)
        seg, sr = result_files["seg"], result_files["narrative"]
        study = _study_uid(seg)
        _queue(ctx, seg, sr)
        assert _run_due(ctx) == [JobState.SUCCEEDED, JobState.PENDING]  # SR: retry 1 of 2
        assert _job(ctx, "seg").delivery is Delivery.COMMITTED
        time.sleep(0.05)  # the export backoff (0.01 s)
        assert _run_due(ctx) == [JobState.DEAD_LETTER]  # sent again, refused again: parked
        failed = _job(ctx, "narrative")
        assert failed.delivery is Delivery.COMMITMENT_FAILED and failed.attempts == 2
        sr_uid = str(pydicom.dcmread(sr, stop_before_pixels=True).SOPInstanceUID)
        assert failed.last_error == (
            f"CommitmentFailed: ORTHANC@127.0.0.1:{orthanc.dicom_port} did not commit the object: ORTHANC:"
            f" 1 of 1 instance(s) not committed: instance {uid_key(sr_uid)}: Failure Reason 0x0112"
            " (no such object instance)"
        )
        status, reasons = derive(_study(study), ctx.index.jobs())
        assert status is StudyStatus.DEAD_LETTER
        assert reasons == [f"export of the narrative to 'pacs': {failed.last_error}"]
        deliveries = {d["what"]: d["delivery"] for d in describe(ctx.index, _study(study))["deliveries"]}
        assert deliveries["export of the seg to 'pacs'"] == "committed"
        assert deliveries["export of the narrative to 'pacs'"] == f"commitment failed: {failed.last_error}"
        kept = {i["MainDicomTags"]["SOPInstanceUID"] for i in orthanc.find_instances(StudyInstanceUID=study)}
        assert sr_uid not in kept and len(kept) == 1


def test_no_report_within_the_timeout_is_an_export_failure(
    tmp_path: Path, start_node_scp: StartScp, result_files: dict[str, Path]
) -> None:
    _, spool, index = start_node_scp()
    # Orthanc commits to a node address where nothing listens: its report never arrives.
    with _orthanc(tmp_path, free_port()) as orthanc:
        target = _target(orthanc.dicom_port, commitment_hold_s=0.2, commitment_timeout_s=1.5)
        ctx = _ctx(index, spool, target, max_attempts=1)
        _queue(ctx, result_files["seg"])
        assert _run_due(ctx) == [JobState.PENDING]
        job = _job(ctx, "seg")
        assert job.delivery is Delivery.AWAITING_COMMITMENT
        transaction = ctx.index.open_commitment(job.id).transaction_uid
        assert job.next_try_time == pytest.approx(ctx.index.commitment(transaction).deadline_time)
        _until(lambda: time.time() >= job.next_try_time, "the commitment deadline")
        assert _run_due(ctx) == [JobState.DEAD_LETTER]
        failed = _job(ctx, "seg")
        assert failed.delivery is Delivery.COMMITMENT_FAILED
        assert failed.last_error == (
            f"CommitmentFailed: no storage commitment report (N-EVENT-REPORT) from ORTHANC@127.0.0.1:"
            f"{orthanc.dicom_port} within 1.5 s of the N-ACTION; check that the PACS knows our AE"
            " title, host and port, and that scp.allowed_calling_aets lets it associate"
        )
        assert ctx.index.commitment(transaction).state is CommitmentState.TIMED_OUT


class SameAssociationPacs:
    """A pynetdicom storage + commitment SCP that sends each N-EVENT-REPORT on the association that
    carried the N-ACTION (before its N-ACTION response), committing what it has stored."""

    def __init__(self) -> None:
        self.stored: set[str] = set()
        self.report_statuses: list[int] = []
        ae = AE(ae_title="SAMEASSOC")
        ae.add_supported_context("1.2.840.10008.5.1.4.1.1.66.4", ALL_TRANSFER_SYNTAXES)  # SEG
        ae.add_supported_context(StorageCommitmentPushModel)
        handlers = [(evt.EVT_C_STORE, self._store), (evt.EVT_N_ACTION, self._action)]
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
        self.port = self.server.server_address[1]

    def _store(self, event: evt.Event) -> int:
        self.stored.add(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def _action(self, event: evt.Event) -> tuple[int, Dataset | None]:
        request = event.action_information
        info = Dataset()
        info.TransactionUID = request.TransactionUID
        info.ReferencedSOPSequence = [
            item for item in request.ReferencedSOPSequence if item.ReferencedSOPInstanceUID in self.stored
        ]
        status, _ = event.assoc.send_n_event_report(info, 1, StorageCommitmentPushModel, PUSH_MODEL_INSTANCE)
        self.report_statuses.append(int(status.Status))
        return 0x0000, None

    def stop(self) -> None:
        self.server.shutdown()


def test_a_report_on_the_same_association_is_accepted(tmp_path: Path, result_files: dict[str, Path]) -> None:
    spool = Spool(tmp_path / "spool")  # no SCP at all: the report can only come on the export's association
    index = Index(spool.index_path)
    pacs = SameAssociationPacs()
    try:
        ctx = _ctx(index, spool, _target(pacs.port, ae_title="SAMEASSOC"))
        _queue(ctx, result_files["seg"])
        assert _run_due(ctx) == [JobState.SUCCEEDED]
        assert pacs.report_statuses == [0x0000]  # our answer to its N-EVENT-REPORT
        job = _job(ctx, "seg")
        assert job.delivery is Delivery.COMMITTED
        (event,) = [
            e for e in index.events(_study_uid(result_files["seg"])) if e["event"] == "export committed"
        ]
        assert event["detail"] == "SAMEASSOC: 1 instance(s) committed"
    finally:
        pacs.stop()
        index.close()


def test_a_pacs_without_storage_commitment_parks_the_export(
    tmp_path: Path, start_node_scp: StartScp, result_files: dict[str, Path]
) -> None:
    _, spool, index = start_node_scp()
    port = free_port()
    (tmp_path / "in").mkdir()
    storescp = subprocess.Popen(
        ["storescp", "-aet", "DCMTK", "-od", str(tmp_path / "in"), "--promiscuous", str(port)],
        env=dcmtk_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _until(lambda: _listening(port), "storescp")
        ctx = _ctx(index, spool, _target(port, ae_title="DCMTK"), max_attempts=6)
        _queue(ctx, result_files["seg"])
        assert _run_due(ctx) == [JobState.DEAD_LETTER]  # permanent: no retry changes the PACS
        job = _job(ctx, "seg")
        assert job.last_error == (
            f"PermanentExportError: DCMTK@127.0.0.1:{port} did not accept the Storage Commitment Push"
            " Model SOP class: enable storage commitment for our AE title at the PACS, or set"
            " storage_commitment = false."
        )
        assert job.delivery is Delivery.NONE and index.open_commitment(job.id) is None
    finally:
        storescp.terminate()
        storescp.wait(10)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


class TestNodeScpReports:
    """The node's SCP as the PACS's reports reach it: SCP role accepted, every answer specific."""

    @staticmethod
    def _send(port: int, event_type: int, info: Dataset) -> tuple[int, str]:
        ae = AE(ae_title="PACS")
        ae.add_requested_context(StorageCommitmentPushModel)
        role = build_role(StorageCommitmentPushModel, scp_role=True)  # as Orthanc proposes it
        assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE, ext_neg=[role])
        assert assoc.is_established
        try:
            (context,) = assoc.accepted_contexts
            accepted_role = "SCP" if context.as_scp else "SCU"  # our role, as the requestor sees it
            status, _ = assoc.send_n_event_report(
                info, event_type, StorageCommitmentPushModel, PUSH_MODEL_INSTANCE
            )
            return int(status.Status), accepted_role
        finally:
            assoc.release()

    def test_a_known_transaction_is_recorded_and_others_are_refused(self, start_node_scp: StartScp) -> None:
        port, _, index = start_node_scp()
        now = time.time()
        index.add_job(JobKind.EXPORT, "k", "1.2.3", {"path": "x", "target": "pacs"})
        job_id = index.jobs()[0].id
        asked = [("1.2.840.10008.5.1.4.1.1.66.4", "1.2.3.4.5")]
        index.add_commitment(
            Commitment("2.25.99", job_id, "1.2.3", "pacs", asked, CommitmentState.AWAITING, "", now, now + 60)
        )
        info = Dataset()
        info.TransactionUID = "2.25.99"
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = asked[0]
        info.ReferencedSOPSequence = [item]

        assert self._send(port, 1, info) == (0x0000, "SCP")  # the PACS acts as SCP on its association
        request = index.commitment("2.25.99")
        assert (
            request.state is CommitmentState.COMMITTED and request.detail == "PACS: 1 instance(s) committed"
        )
        assert self._send(port, 1, info)[0] == 0x0000  # a repeat is answered, the first report counts

        unknown = Dataset()
        unknown.TransactionUID = "2.25.100"
        unknown.ReferencedSOPSequence = [item]
        assert self._send(port, 1, unknown)[0] == 0x0115  # invalid argument value: not our transaction
        assert self._send(port, 7, info)[0] == 0x0113  # no such event type
        assert self._send(port, 2, info)[0] == 0x0115  # failures exist, yet no Failed SOP Sequence

    def test_an_n_action_to_the_node_is_an_unrecognised_operation(self, start_node_scp: StartScp) -> None:
        port, _, _ = start_node_scp()
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(StorageCommitmentPushModel)  # default roles: it would be the SCU
        assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
        assert assoc.is_established
        try:
            status, _ = assoc.send_n_action(
                build_action("2.25.5", [("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4")]),
                1,
                StorageCommitmentPushModel,
                PUSH_MODEL_INSTANCE,
            )
            assert status.Status == 0x0211
        finally:
            assoc.release()
