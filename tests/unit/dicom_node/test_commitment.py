"""Storage Commitment: the N-ACTION dataset, reading N-EVENT-REPORTs, and the export job's states.

The job's states are driven here through the index alone (no sockets): a request recorded for a
claimed export job is judged by ``run_job`` without sending anything. The protocol itself runs
against real peers in tests/integration/test_storage_commitment.py.
"""

from __future__ import annotations

import time
from io import BytesIO
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pynetdicom.dsutils import decode, encode

from dicom_node.commitment import (
    ALL_COMMITTED,
    FAILURES_EXIST,
    PUSH_MODEL,
    PUSH_MODEL_INSTANCE,
    build_action,
    judge,
    parse_report,
)
from dicom_node.config import ExportSection, ExportTarget, NodeSettings, SpoolSection
from dicom_node.index import Commitment, CommitmentState, Delivery, Index, Job, JobKind, JobState
from dicom_node.spool import Spool, uid_key
from dicom_node.status import StudyStatus, derive, describe
from dicom_node.worker import StepContext, run_job
from tests.peers import free_port

CT = "1.2.840.10008.5.1.4.1.1.2"
SEG = "1.2.840.10008.5.1.4.1.1.66.4"
A, B, C = "1.2.3.4.1", "1.2.3.4.2", "1.2.3.4.3"


def _item(sop_class: str, uid: str, reason: int | None = None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = uid
    if reason is not None:
        item.FailureReason = reason
    return item


def _report(
    transaction: str = "2.25.7", committed: tuple[str, ...] = (), failed: dict | None = None
) -> Dataset:
    info = Dataset()
    info.TransactionUID = transaction
    if committed:
        info.ReferencedSOPSequence = [_item(CT, uid) for uid in committed]
    if failed:
        info.FailedSOPSequence = [_item(CT, uid, reason) for uid, reason in failed.items()]
    return info


class TestBuildAction:
    def test_carries_the_transaction_and_every_instance_and_survives_the_wire(self) -> None:
        ds = build_action("2.25.42", [(CT, A), (SEG, B)])
        wire = encode(ds, True, True)  # Implicit VR Little Endian, as the N-ACTION context may be
        assert wire is not None
        back = decode(BytesIO(wire), True, True)
        assert back.TransactionUID == "2.25.42"
        assert [
            (i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID) for i in back.ReferencedSOPSequence
        ] == [
            (CT, A),
            (SEG, B),
        ]
        assert "FailedSOPSequence" not in back

    def test_refuses_an_empty_request(self) -> None:
        with pytest.raises(ValueError, match="at least one instance"):
            build_action("2.25.42", [])

    def test_uses_the_push_model_sop_class_and_its_well_known_instance(self) -> None:
        assert PUSH_MODEL == "1.2.840.10008.1.20.1"
        assert PUSH_MODEL_INSTANCE == "1.2.840.10008.1.20.1.1"


class TestParseReport:
    def test_event_1_lists_what_was_committed(self) -> None:
        report = parse_report(ALL_COMMITTED, _report(committed=(A, B)))
        assert report.transaction_uid == "2.25.7"
        assert report.committed == [(CT, A), (CT, B)] and report.failed == []

    def test_event_2_lists_failures_with_their_reasons(self) -> None:
        report = parse_report(FAILURES_EXIST, _report(committed=(A,), failed={B: 0x0112, C: 0x0110}))
        assert report.committed == [(CT, A)]
        assert report.failed == [(CT, B, 0x0112), (CT, C, 0x0110)]

    @pytest.mark.parametrize(
        ("event_type", "info", "message"),
        [
            (3, _report(committed=(A,)), "Event Type ID 3"),
            (ALL_COMMITTED, Dataset(), "no Transaction UID"),
            (FAILURES_EXIST, _report(committed=(A,)), "without a Failed SOP Sequence"),
            (ALL_COMMITTED, _report(committed=("",)), "no SOP Instance UID"),
        ],
    )
    def test_refuses_what_is_not_a_commitment_report(
        self, event_type: int, info: Dataset, message: str
    ) -> None:
        with pytest.raises(ValueError, match=message):
            parse_report(event_type, info)


class TestJudge:
    def test_committed_only_when_every_instance_asked_for_is_listed(self) -> None:
        state, detail = judge([(CT, A), (CT, B)], parse_report(ALL_COMMITTED, _report(committed=(B, A))))
        assert state is CommitmentState.COMMITTED and detail == "2 instance(s) committed"

    def test_failures_name_the_instance_by_key_and_the_reason(self) -> None:
        report = parse_report(FAILURES_EXIST, _report(committed=(A,), failed={B: 0x0112}))
        state, detail = judge([(CT, A), (CT, B)], report)
        assert state is CommitmentState.FAILED
        assert detail == (
            f"1 of 2 instance(s) not committed: instance {uid_key(B)}: Failure Reason 0x0112 (no such object instance)"
        )
        assert B not in detail  # keyed hashes only, never the UID

    def test_an_instance_missing_from_an_all_committed_report_is_a_failure(self) -> None:
        state, detail = judge([(CT, A), (CT, C)], parse_report(ALL_COMMITTED, _report(committed=(A,))))
        assert state is CommitmentState.FAILED
        assert f"instance {uid_key(C)}: not listed in the report" in detail

    def test_a_failure_without_a_reason_and_an_unknown_reason_are_described(self) -> None:
        report = parse_report(FAILURES_EXIST, _report(failed={A: None, B: 0xABCD}))
        _, detail = judge([(CT, A), (CT, B)], report)
        assert "failed, no Failure Reason" in detail and "Failure Reason 0xABCD (unknown)" in detail


class TestTargetSettings:
    def test_storage_commitment_is_for_dicom_targets_only(self) -> None:
        with pytest.raises(ValueError, match="dicom export targets only"):
            ExportTarget(type="dicomweb", url="http://pacs/dicom-web", storage_commitment=True)

    @pytest.mark.parametrize("timeout", [0, -1.0])
    def test_the_timeout_must_be_positive(self, timeout: float) -> None:
        with pytest.raises(ValueError, match="commitment_timeout_s"):
            ExportTarget(storage_commitment=True, commitment_timeout_s=timeout)

    def test_the_hold_must_not_be_negative(self) -> None:
        with pytest.raises(ValueError, match="commitment_hold_s"):
            ExportTarget(storage_commitment=True, commitment_hold_s=-1)


# -- the export job's states, through the index ----------------------------------------------
STUDY = "1.2.3.9"


def _ctx(tmp_path: Path, max_attempts: int = 3) -> StepContext:
    target = ExportTarget(
        port=free_port(),
        ae_title="PACS",
        storage_commitment=True,
        commitment_timeout_s=60,
        commitment_hold_s=0,
    )
    settings = NodeSettings(
        spool=SpoolSection(tmp_path / "spool"),
        export=ExportSection(targets={"pacs": target}, max_attempts=max_attempts, backoff_s=0.01),
    )
    spool = Spool(tmp_path / "spool")
    return StepContext(
        settings, spool, Index(spool.index_path), client_factory=lambda: pytest.fail("no inference")
    )


def _claimed_with_request(ctx: StepContext, transaction: str, deadline_in_s: float = 60.0) -> Job:
    """A claimed export job whose commitment request is already recorded (as after its N-ACTION)."""
    ctx.index.add_job(
        JobKind.EXPORT, "seg->pacs", STUDY, {"path": "/spool/outputs/seg-x.dcm", "target": "pacs"}
    )
    job = ctx.index.claim_job()
    assert job is not None
    now = time.time()
    ctx.index.add_commitment(
        Commitment(
            transaction,
            job.id,
            STUDY,
            "pacs",
            [(SEG, A)],
            CommitmentState.AWAITING,
            "",
            now,
            now + deadline_in_s,
        )
    )
    return job


def _study() -> dict:
    now = time.time()
    return {
        "study_instance_uid": STUDY,
        "state": "COMPLETE",
        "reason": "",
        "last_received_time": now,
        "updated_time": now,
    }


def _only_job(ctx: StepContext) -> Job:
    (job,) = ctx.index.jobs()
    return job


class TestExportJob:
    def test_waits_without_an_attempt_then_succeeds_once_the_report_commits(self, tmp_path: Path) -> None:
        ctx = _ctx(tmp_path)
        job = _claimed_with_request(ctx, "2.25.1")
        assert run_job(job, ctx) is JobState.PENDING
        waiting = _only_job(ctx)
        assert waiting.delivery is Delivery.AWAITING_COMMITMENT and waiting.attempts == 0
        assert waiting.next_try_time > time.time() + 50  # parked until the deadline, not polled
        status, reasons = derive(_study(), ctx.index.jobs())
        assert status is StudyStatus.EXPORTING
        assert reasons[0].startswith("export of the seg to 'pacs': sent, awaiting commitment (sent to PACS@")
        assert ctx.index.claim_job() is None

        assert ctx.index.resolve_commitment(
            "2.25.1", CommitmentState.COMMITTED, "PACS: 1 instance(s) committed"
        )
        woken = ctx.index.claim_job()  # the report woke it
        assert woken is not None and woken.attempts == 1
        assert run_job(woken, ctx) is JobState.SUCCEEDED
        done = _only_job(ctx)
        assert done.delivery is Delivery.COMMITTED
        assert derive(_study(), ctx.index.jobs()) == (StudyStatus.DELIVERED, [])
        doc = describe(ctx.index, _study())
        assert doc["deliveries"] == [{"what": "export of the seg to 'pacs'", "delivery": "committed"}]
        assert ctx.index.open_commitment(done.id) is None  # judged: a re-run sends anew

    def test_a_failed_commitment_is_retried_and_shown_with_its_reason(self, tmp_path: Path) -> None:
        ctx = _ctx(tmp_path, max_attempts=1)
        job = _claimed_with_request(ctx, "2.25.2")
        detail = f"PACS: 1 of 1 instance(s) not committed: instance {uid_key(A)}: Failure Reason 0x0112"
        assert ctx.index.resolve_commitment("2.25.2", CommitmentState.FAILED, detail)
        assert not ctx.index.resolve_commitment(
            "2.25.2", CommitmentState.COMMITTED, "late repeat"
        )  # first counts
        assert run_job(job, ctx) is JobState.DEAD_LETTER  # max_attempts = 1: parked like any export failure
        parked = _only_job(ctx)
        assert parked.delivery is Delivery.COMMITMENT_FAILED
        assert (
            parked.last_error.startswith("CommitmentFailed: PACS@127.0.0.1:")
            and "0x0112" in parked.last_error
        )
        status, reasons = derive(_study(), ctx.index.jobs())
        assert status is StudyStatus.DEAD_LETTER and "did not commit the object" in reasons[0]
        (delivery,) = describe(ctx.index, _study())["deliveries"]
        assert delivery["delivery"].startswith("commitment failed: CommitmentFailed:")

    def test_no_report_by_the_deadline_fails_with_the_reason(self, tmp_path: Path) -> None:
        ctx = _ctx(tmp_path)
        job = _claimed_with_request(ctx, "2.25.3", deadline_in_s=-1)
        assert run_job(job, ctx) is JobState.PENDING  # retried per the export policy (attempt 1 of 3)
        retried = _only_job(ctx)
        assert retried.delivery is Delivery.COMMITMENT_FAILED
        assert "no storage commitment report (N-EVENT-REPORT)" in retried.last_error
        assert ctx.index.commitment("2.25.3").state is CommitmentState.TIMED_OUT
        assert not ctx.index.resolve_commitment("2.25.3", CommitmentState.COMMITTED, "too late")

    def test_the_request_and_the_wait_survive_a_restart(self, tmp_path: Path) -> None:
        ctx = _ctx(tmp_path)
        job = _claimed_with_request(ctx, "2.25.4")
        assert run_job(job, ctx) is JobState.PENDING
        ctx.index.close()
        reopened = Index(ctx.spool.index_path)
        request = reopened.open_commitment(job.id)
        assert request is not None and request.state is CommitmentState.AWAITING
        assert request.instances == [(SEG, A)] and request.target == "pacs"
        assert reopened.jobs()[0].delivery is Delivery.AWAITING_COMMITMENT
        assert reopened.resolve_commitment(
            "2.25.4", CommitmentState.COMMITTED, "PACS: 1 instance(s) committed"
        )
        history = [e["event"] for e in reopened.events(STUDY)]
        assert history[-2:] == ["export awaiting commitment", "export committed"]
        reopened.close()

    def test_a_re_armed_export_forgets_its_delivery(self, tmp_path: Path) -> None:
        ctx = _ctx(tmp_path)
        job = _claimed_with_request(ctx, "2.25.5")
        ctx.index.resolve_commitment("2.25.5", CommitmentState.COMMITTED, "ok")
        assert run_job(job, ctx) is JobState.SUCCEEDED
        ctx.index.add_job(
            JobKind.EXPORT, "seg->pacs", STUDY, {"path": "/spool/outputs/seg-x.dcm", "target": "pacs"}
        )
        assert _only_job(ctx).delivery is Delivery.NONE and _only_job(ctx).state is JobState.PENDING


class TestTargetConfig:
    def test_keys_come_from_the_toml_and_the_environment(self, tmp_path: Path) -> None:
        from dicom_node.config import settings_from
        from radbridge_common.settings import read_layers

        cfg = tmp_path / "node.toml"
        cfg.write_text(
            '[export.targets.pacs]\nae_title = "ORTHANC"\nstorage_commitment = true\ncommitment_timeout_s = 30\n'
        )
        env = {"RADBRIDGE_EXPORT__TARGETS__PACS__COMMITMENT_HOLD_S": "0.5"}
        target = settings_from(read_layers(cfg, env)).export.targets["pacs"]
        assert (target.storage_commitment, target.commitment_timeout_s, target.commitment_hold_s) == (
            True,
            30,
            0.5,
        )
        assert ExportTarget().storage_commitment is False  # off unless asked for

    def test_an_unknown_commitment_key_names_itself(self, tmp_path: Path) -> None:
        from dicom_node.config import settings_from
        from radbridge_common.settings import ConfigError, read_layers

        cfg = tmp_path / "node.toml"
        cfg.write_text("[export.targets.pacs]\nstorage_comitment = true\n")
        with pytest.raises(ConfigError, match="storage_comitment"):
            settings_from(read_layers(cfg, {}))
