"""The SQLite index: instances, studies and jobs. The only SQL in the node.

WAL mode, one connection per thread, short transactions. A job has a kind, a
state, an attempt count and a next-try time; a restart turns RUNNING jobs back
into PENDING so nothing is left half done. Instances are either received
(C-STORE, STOW-RS) or outputs RadBridge wrote (SEG/SR); both carry their
searchable attributes (DICOM JSON) so the read-only DICOMweb can answer
QIDO-RS from here.
"""

from __future__ import annotations

import enum
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicom_node.spool import FILE_MODE, InstanceRef

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    sop_class_uid TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    modality TEXT NOT NULL DEFAULT '',
    calling_aet TEXT NOT NULL DEFAULT '',
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    received_time REAL NOT NULL,
    origin TEXT NOT NULL DEFAULT 'received',
    attributes TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS instances_study ON instances(study_instance_uid);
CREATE TABLE IF NOT EXISTS studies (
    study_instance_uid TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    last_received_time REAL NOT NULL,
    updated_time REAL NOT NULL,
    reason TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    dedupe_key TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL,
    payload TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_try_time REAL NOT NULL,
    last_error TEXT NOT NULL DEFAULT '',
    created_time REAL NOT NULL,
    updated_time REAL NOT NULL,
    UNIQUE(kind, dedupe_key)
);
CREATE INDEX IF NOT EXISTS jobs_due ON jobs(state, next_try_time);
CREATE TABLE IF NOT EXISTS study_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    study_instance_uid TEXT NOT NULL,
    time REAL NOT NULL,
    event TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS study_events_study ON study_events(study_instance_uid, id);
CREATE TABLE IF NOT EXISTS uid_crosswalk (
    pseudonym TEXT PRIMARY KEY,
    original TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS commitments (
    transaction_uid TEXT PRIMARY KEY,
    job_id INTEGER NOT NULL,
    study_instance_uid TEXT NOT NULL,
    target TEXT NOT NULL,
    instances TEXT NOT NULL,
    state TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '',
    requested_time REAL NOT NULL,
    deadline_time REAL NOT NULL,
    resolved_time REAL NOT NULL DEFAULT 0,
    judged INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS commitments_job ON commitments(job_id);
CREATE TABLE IF NOT EXISTS priors (
    study_instance_uid TEXT PRIMARY KEY,
    for_study_instance_uid TEXT NOT NULL,
    time REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS node (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""


class StudyState(enum.StrEnum):
    RECEIVING = "RECEIVING"
    COMPLETE = "COMPLETE"  # quiet window passed; routed
    UNROUTED = "UNROUTED"  # no rule matched any series


class JobState(enum.StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"  # not retryable; reason in last_error
    DEAD_LETTER = "DEAD_LETTER"  # retries exhausted


class JobKind(enum.StrEnum):
    ROUTE = "route"
    ANALYZE = "analyze"
    EXPORT = "export"
    PRIORS = "priors"  # fetch the patient's prior studies for a routed study (dicom_node.priors)


class Delivery(enum.StrEnum):
    """What the destination has acknowledged of an export job's object (``radbridge status``)."""

    NONE = ""  # not sent yet
    SENT = "sent"  # C-STORE / STOW-RS acknowledged; no commitment asked
    AWAITING_COMMITMENT = "sent, awaiting commitment"
    COMMITTED = "committed"
    COMMITMENT_FAILED = "commitment failed"


class CommitmentState(enum.StrEnum):
    AWAITING = "AWAITING"  # N-ACTION sent, no N-EVENT-REPORT yet
    COMMITTED = "COMMITTED"  # event type 1 listing every instance asked for
    FAILED = "FAILED"  # event type 2, or an instance missing from the report
    TIMED_OUT = "TIMED_OUT"  # no report before the deadline


class Origin(enum.StrEnum):
    RECEIVED = "received"  # from a peer; drives completion and routing
    OUTPUT = "output"  # written by RadBridge; visible over DICOMweb, never routed


ACTIVE = (JobState.PENDING, JobState.RUNNING)
#: The heavy lane: a job that was running when the node died runs alone in it afterwards.
ISOLATED_KINDS = (JobKind.ROUTE, JobKind.ANALYZE)
#: Columns added after the first release; ``Index`` adds them to an older database.
_LATER_COLUMNS = {
    "instances": {
        "origin": "TEXT NOT NULL DEFAULT 'received'",
        "attributes": "TEXT NOT NULL DEFAULT '{}'",
    },
    # times the node stopped while the job was RUNNING (poison detection)
    "jobs": {
        "interruptions": "INTEGER NOT NULL DEFAULT 0",
        "outage_waits": "INTEGER NOT NULL DEFAULT 0",
        "delivery": "TEXT NOT NULL DEFAULT ''",  # Delivery of an export job
    },
}
#: What a job of each kind was doing, for the reason of a poison failure.
_DOING = {
    "route": "routing this study",
    "analyze": "analysing this series",
    "export": "exporting this object",
    "priors": "fetching this patient's prior studies",
}


@dataclass(frozen=True)
class Job:
    id: int
    kind: JobKind
    dedupe_key: str
    study_instance_uid: str
    payload: dict[str, Any]
    state: JobState
    attempts: int
    next_try_time: float
    last_error: str
    interruptions: int = 0
    outage_waits: int = 0
    created_time: float = 0.0
    updated_time: float = 0.0
    delivery: Delivery = Delivery.NONE

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        return cls(
            id=row["id"],
            kind=JobKind(row["kind"]),
            dedupe_key=row["dedupe_key"],
            study_instance_uid=row["study_instance_uid"],
            payload=json.loads(row["payload"]),
            state=JobState(row["state"]),
            attempts=row["attempts"],
            next_try_time=row["next_try_time"],
            last_error=row["last_error"],
            interruptions=row["interruptions"],
            outage_waits=row["outage_waits"],
            created_time=row["created_time"],
            updated_time=row["updated_time"],
            delivery=Delivery(row["delivery"]),
        )


@dataclass(frozen=True)
class Commitment:
    """One Storage Commitment request (N-ACTION) of an export job, and what the PACS reported."""

    transaction_uid: str
    job_id: int
    study_instance_uid: str
    target: str
    instances: list[tuple[str, str]]  # (SOP Class UID, SOP Instance UID) asked for
    state: CommitmentState
    detail: str
    requested_time: float
    deadline_time: float
    resolved_time: float = 0.0

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Commitment:
        return cls(
            transaction_uid=row["transaction_uid"],
            job_id=row["job_id"],
            study_instance_uid=row["study_instance_uid"],
            target=row["target"],
            instances=[(c, i) for c, i in json.loads(row["instances"])],
            state=CommitmentState(row["state"]),
            detail=row["detail"],
            requested_time=row["requested_time"],
            deadline_time=row["deadline_time"],
            resolved_time=row["resolved_time"],
        )


@dataclass(frozen=True)
class ReceivedInstance:
    """A received instance, spooled durably, to be recorded (Index.add_instances)."""

    ref: InstanceRef
    modality: str
    calling_aet: str
    attributes: dict[str, Any] | None = None


@dataclass(frozen=True)
class InstanceRow:
    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    modality: str
    calling_aet: str
    path: Path


@dataclass(frozen=True)
class StoredInstance:
    """An instance as the read-only DICOMweb sees it."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    path: Path
    attributes: dict[str, Any]


@dataclass(frozen=True)
class SeriesSummary:
    study_instance_uid: str
    series_instance_uid: str
    instances: int
    attributes: dict[str, Any]  # of one instance of the series


@dataclass(frozen=True)
class StudySummary:
    study_instance_uid: str
    series: int
    instances: int
    modalities: list[str]
    attributes: dict[str, Any]  # of one instance of the study


def _make_private(db: Path) -> None:
    """Create the database file owner-only (0600) before SQLite opens it: SQLite gives its -wal and
    -shm files the database file's mode, so all three hold patient data readable by the owner only."""
    fd = os.open(db, os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)
    for suffix in ("-wal", "-shm"):  # left by an earlier version, created under its umask
        side = db.with_name(db.name + suffix)
        if side.exists():
            os.chmod(side, FILE_MODE)


class Index:
    """Thread-safe access to the SQLite index (one connection per thread)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._local = threading.local()
        _make_private(self.path)
        conn = self._conn()
        conn.executescript(SCHEMA)  # executescript manages its own transaction
        for table, columns in _LATER_COLUMNS.items():
            have = {r["name"] for r in conn.execute(f"PRAGMA table_info({table})")}
            for name, decl in columns.items():
                if name not in have:
                    conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection; every commit synced (WAL, synchronous=FULL)."""
        return self._thread_conn("conn", "FULL")

    def _relaxed_conn(self) -> sqlite3.Connection:
        """This thread's connection whose commits are not synced (WAL, synchronous=NORMAL): safe
        against a crash of the process, not of the machine; see ``add_instances``."""
        return self._thread_conn("relaxed", "NORMAL")

    def _thread_conn(self, name: str, synchronous: str) -> sqlite3.Connection:
        conn = getattr(self._local, name, None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={synchronous}")
            setattr(self._local, name, conn)
        return conn

    @contextmanager
    def _tx(self, *, synced: bool = True) -> Iterator[sqlite3.Connection]:
        conn = self._conn() if synced else self._relaxed_conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def close(self) -> None:
        for name in ("conn", "relaxed"):
            conn = getattr(self._local, name, None)
            if conn is not None:
                conn.close()
                setattr(self._local, name, None)

    # -- instances and studies ------------------------------------------------
    @staticmethod
    def _put_instance(
        db: sqlite3.Connection,
        ref: InstanceRef,
        modality: str,
        calling_aet: str,
        now: float,
        origin: Origin,
        attributes: dict[str, Any] | None,
    ) -> None:
        db.execute(
            "INSERT OR REPLACE INTO instances (sop_instance_uid, sop_class_uid, study_instance_uid, "
            "series_instance_uid, transfer_syntax_uid, modality, calling_aet, path, size, received_time, "
            "origin, attributes) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                ref.sop_instance_uid,
                ref.sop_class_uid,
                ref.study_instance_uid,
                ref.series_instance_uid,
                ref.transfer_syntax_uid,
                modality,
                calling_aet,
                str(ref.path),
                ref.size,
                now,
                origin,
                json.dumps(attributes or {}, separators=(",", ":"), ensure_ascii=False),
            ),
        )

    def add_instance(
        self,
        ref: InstanceRef,
        modality: str,
        calling_aet: str,
        now: float | None = None,
        attributes: dict[str, Any] | None = None,
        *,
        synced: bool = True,
    ) -> None:
        """Record a spooled instance; a late instance reopens a completed study."""
        self.add_instances([ReceivedInstance(ref, modality, calling_aet, attributes)], now, synced=synced)

    def add_instances(
        self, received: list[ReceivedInstance], now: float | None = None, *, synced: bool = True
    ) -> None:
        """Record spooled instances in one transaction (one WAL sync): all or none.

        ``synced=False`` (the C-STORE path, dicom_node.group_commit): the commit is not synced to
        disk; the next synced commit of any connection, or a WAL checkpoint, makes it durable. A
        power loss before that may lose the row but not the instance: its file was fsynced into
        the spool before, and after an unclean stop the node indexes the files the index lacks
        (dicom_node.recovery)."""
        now = time.time() if now is None else now
        with self._tx(synced=synced) as db:
            for item in received:
                self._record_received(db, item, now)

    def _record_received(self, db: sqlite3.Connection, item: ReceivedInstance, now: float) -> None:
        ref = item.ref
        self._put_instance(db, ref, item.modality, item.calling_aet, now, Origin.RECEIVED, item.attributes)
        before = db.execute(
            "SELECT state FROM studies WHERE study_instance_uid=?", (ref.study_instance_uid,)
        ).fetchone()
        if before is None:
            self._event(db, ref.study_instance_uid, now, "received", "first instance")
        elif before[0] != StudyState.RECEIVING:
            self._event(db, ref.study_instance_uid, now, "reopened", f"an instance arrived after {before[0]}")
        db.execute(
            "INSERT INTO studies VALUES (?,?,?,?,'') ON CONFLICT(study_instance_uid) DO UPDATE SET "
            "state=excluded.state, last_received_time=excluded.last_received_time, "
            "updated_time=excluded.updated_time, reason=''",
            (ref.study_instance_uid, StudyState.RECEIVING, now, now),
        )

    def add_output(self, ref: InstanceRef, modality: str, attributes: dict[str, Any]) -> None:
        """Record an object RadBridge wrote (SEG/SR): searchable, but it neither reopens nor routes."""
        with self._tx() as db:
            self._put_instance(db, ref, modality, "", time.time(), Origin.OUTPUT, attributes)

    def study_instances(self, study_uid: str) -> list[InstanceRow]:
        """The received instances of a study (what routing and analysis read)."""
        rows = self._conn().execute(
            "SELECT sop_instance_uid, sop_class_uid, series_instance_uid, modality, calling_aet, path "
            "FROM instances WHERE study_instance_uid=? AND origin=? "
            "ORDER BY series_instance_uid, sop_instance_uid",
            (study_uid, Origin.RECEIVED),
        )
        return [InstanceRow(r[0], r[1], r[2], r[3], r[4], Path(r[5])) for r in rows.fetchall()]

    def outputs_in_series(self, series_uid: str) -> list[Path]:
        """Files of the objects RadBridge wrote into one output series, oldest first."""
        rows = self._conn().execute(
            "SELECT path FROM instances WHERE series_instance_uid=? AND origin=? ORDER BY received_time",
            (series_uid, Origin.OUTPUT),
        )
        return [Path(r[0]) for r in rows.fetchall()]

    def has_instance(self, sop_instance_uid: str) -> bool:
        row = (
            self._conn()
            .execute("SELECT 1 FROM instances WHERE sop_instance_uid=?", (sop_instance_uid,))
            .fetchone()
        )
        return row is not None

    # -- read-only DICOMweb ---------------------------------------------------------
    def search_studies(self) -> list[StudySummary]:
        rows = (
            self._conn()
            .execute(
                "SELECT study_instance_uid, COUNT(DISTINCT series_instance_uid), COUNT(*), "
                "GROUP_CONCAT(DISTINCT modality), MIN(CASE origin WHEN 'received' THEN attributes END), "
                "MIN(attributes) FROM instances GROUP BY study_instance_uid ORDER BY MIN(received_time)"
            )
            .fetchall()
        )
        return [
            StudySummary(
                r[0], r[1], r[2], sorted(m for m in (r[3] or "").split(",") if m), json.loads(r[4] or r[5])
            )
            for r in rows
        ]

    def search_series(self, study_uid: str) -> list[SeriesSummary]:
        rows = (
            self._conn()
            .execute(
                "SELECT series_instance_uid, COUNT(*), MIN(attributes) FROM instances "
                "WHERE study_instance_uid=? GROUP BY series_instance_uid ORDER BY MIN(received_time)",
                (study_uid,),
            )
            .fetchall()
        )
        return [SeriesSummary(study_uid, r[0], r[1], json.loads(r[2])) for r in rows]

    def search_instances(
        self, study_uid: str, series_uid: str | None = None, sop_uid: str | None = None
    ) -> list[StoredInstance]:
        sql = (
            "SELECT study_instance_uid, series_instance_uid, sop_instance_uid, transfer_syntax_uid, path, "
            "attributes FROM instances WHERE study_instance_uid=?"
        )
        args: list[str] = [study_uid]
        if series_uid is not None:
            sql, args = sql + " AND series_instance_uid=?", [*args, series_uid]
        if sop_uid is not None:
            sql, args = sql + " AND sop_instance_uid=?", [*args, sop_uid]
        rows = self._conn().execute(sql + " ORDER BY series_instance_uid, received_time", args).fetchall()
        return [StoredInstance(r[0], r[1], r[2], r[3], Path(r[4]), json.loads(r[5])) for r in rows]

    def count_instances(self, origin: Origin = Origin.RECEIVED) -> int:
        """Instances of one origin: received ones by default (what `radbridge status` reports)."""
        return int(
            self._conn().execute("SELECT COUNT(*) FROM instances WHERE origin=?", (origin,)).fetchone()[0]
        )

    def quiet_studies(self, quiet_window_s: float, now: float | None = None) -> list[str]:
        now = time.time() if now is None else now
        rows = self._conn().execute(
            "SELECT study_instance_uid FROM studies WHERE state=? AND last_received_time<=?",
            (StudyState.RECEIVING, now - quiet_window_s),
        )
        return [r[0] for r in rows.fetchall()]

    def next_quiet_time(self, quiet_window_s: float) -> float | None:
        """When the earliest receiving study's quiet window ends (epoch s), or None if none is."""
        row = self._conn().execute(
            "SELECT MIN(last_received_time) FROM studies WHERE state=?", (StudyState.RECEIVING,)
        ).fetchone()
        return None if row[0] is None else float(row[0]) + quiet_window_s

    def restart_quiet_windows(self, now: float | None = None) -> int:
        """At start: the time the node was down is not quiet time (a sender cut off by the stop had
        no chance to resume), so every RECEIVING study's quiet window starts again now."""
        now = time.time() if now is None else now
        with self._tx() as db:
            return db.execute(
                "UPDATE studies SET last_received_time=? WHERE state=? AND last_received_time<?",
                (now, StudyState.RECEIVING, now),
            ).rowcount

    def complete_study(self, study_uid: str, quiet_window_s: float, now: float | None = None) -> bool:
        """RECEIVING -> COMPLETE and queue its route job, atomically, if still quiet."""
        now = time.time() if now is None else now
        with self._tx() as db:
            cur = db.execute(
                "UPDATE studies SET state=?, updated_time=? WHERE study_instance_uid=? AND state=? "
                "AND last_received_time<=?",
                (StudyState.COMPLETE, now, study_uid, StudyState.RECEIVING, now - quiet_window_s),
            )
            if cur.rowcount != 1:
                return False
            last = db.execute(
                "SELECT last_received_time FROM studies WHERE study_instance_uid=?", (study_uid,)
            ).fetchone()[0]
            self._put_job(db, JobKind.ROUTE, f"{study_uid}@{last}", study_uid, {}, now)
            self._event(db, study_uid, now, "complete", f"no instance for {quiet_window_s:g} s")
            return True

    def set_study_state(self, study_uid: str, state: StudyState, reason: str = "") -> None:
        now = time.time()
        with self._tx() as db:
            db.execute(
                "UPDATE studies SET state=?, reason=?, updated_time=? WHERE study_instance_uid=?",
                (state, reason, now, study_uid),
            )
            self._event(db, study_uid, now, str(state).lower(), reason)

    # -- study history -----------------------------------------------------------------
    @staticmethod
    def _event(db: sqlite3.Connection, study_uid: str, now: float, event: str, detail: str) -> None:
        db.execute(
            "INSERT INTO study_events (study_instance_uid, time, event, detail) VALUES (?,?,?,?)",
            (study_uid, now, event, detail[:500]),
        )

    def add_event(self, study_uid: str, event: str, detail: str = "", now: float | None = None) -> None:
        """One line of a study's history (what happened and why); no patient data in ``detail``."""
        with self._tx() as db:
            self._event(db, study_uid, time.time() if now is None else now, event, detail)

    def events(self, study_uid: str) -> list[dict[str, Any]]:
        rows = self._conn().execute(
            "SELECT time, event, detail FROM study_events WHERE study_instance_uid=? ORDER BY id",
            (study_uid,),
        )
        return [dict(r) for r in rows.fetchall()]

    def studies(self) -> list[dict[str, Any]]:
        rows = self._conn().execute("SELECT * FROM studies ORDER BY last_received_time").fetchall()
        return [dict(r) for r in rows]

    def study(self, study_uid: str) -> dict[str, Any] | None:
        row = (
            self._conn().execute("SELECT * FROM studies WHERE study_instance_uid=?", (study_uid,)).fetchone()
        )
        return dict(row) if row else None

    # -- prior studies ---------------------------------------------------------------
    def mark_prior(self, study_uid: str, for_study_uid: str) -> None:
        """Record ``study_uid`` as pulled as a prior (before its instances arrive): its own routing
        then fetches no priors (no cascade)."""
        with self._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO priors (study_instance_uid, for_study_instance_uid, time) VALUES (?,?,?)",
                (study_uid, for_study_uid, time.time()),
            )

    def is_prior(self, study_uid: str) -> bool:
        row = self._conn().execute("SELECT 1 FROM priors WHERE study_instance_uid=?", (study_uid,)).fetchone()
        return row is not None

    # -- jobs --------------------------------------------------------------------
    @staticmethod
    def _put_job(
        db: sqlite3.Connection, kind: JobKind, key: str, study_uid: str, payload: dict[str, Any], now: float
    ) -> None:
        """Insert a job, or re-arm a finished one with the same key (a re-run replaces)."""
        db.execute(
            "INSERT INTO jobs (kind, dedupe_key, study_instance_uid, payload, state, attempts, "
            "next_try_time, last_error, created_time, updated_time) VALUES (?,?,?,?,?,0,?,'',?,?) "
            "ON CONFLICT(kind, dedupe_key) DO UPDATE SET payload=excluded.payload, "
            "state=excluded.state, attempts=0, interruptions=0, outage_waits=0, delivery='', "
            "next_try_time=excluded.next_try_time, last_error='', "
            "updated_time=excluded.updated_time WHERE jobs.state NOT IN ('PENDING', 'RUNNING')",
            (kind, key, study_uid, json.dumps(payload, sort_keys=True), JobState.PENDING, now, now, now),
        )

    def add_job(self, kind: JobKind, key: str, study_uid: str, payload: dict[str, Any]) -> None:
        with self._tx() as db:
            self._put_job(db, kind, key, study_uid, payload, time.time())

    def claim_job(self, now: float | None = None, kinds: tuple[JobKind, ...] | None = None) -> Job | None:
        """Atomically take the oldest due job and mark it RUNNING."""
        now = time.time() if now is None else now
        kinds = kinds or tuple(JobKind)
        marks = ",".join("?" * len(kinds))
        with self._tx() as db:
            row = self._isolated_suspect(db, now, kinds)
            if row is None:
                return None
            if row is False:
                row = db.execute(
                    f"SELECT * FROM jobs WHERE state=? AND next_try_time<=? AND kind IN ({marks}) "
                    "ORDER BY next_try_time, id LIMIT 1",
                    (JobState.PENDING, now, *kinds),
                ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET state=?, attempts=attempts+1, updated_time=? WHERE id=?",
                (JobState.RUNNING, now, row["id"]),
            )
        job = Job.from_row(row)
        return Job(**{**job.__dict__, "state": JobState.RUNNING, "attempts": job.attempts + 1})

    @staticmethod
    def _isolated_suspect(
        db: sqlite3.Connection, now: float, kinds: tuple[JobKind, ...]
    ) -> sqlite3.Row | None | bool:
        """Suspects (jobs that were RUNNING when the node stopped) run alone among the analysis
        jobs, so that the next stop is charged to the job that caused it, not to its neighbours.

        Returns the suspect to claim now, None when nothing may start (a suspect runs, or one waits
        for the running jobs to drain), or False when no suspect is involved.
        """
        lane = tuple(k for k in kinds if k in ISOLATED_KINDS)
        if not lane:
            return False
        marks = ",".join("?" * len(ISOLATED_KINDS))
        running = db.execute(
            f"SELECT MAX(interruptions > 0), COUNT(*) FROM jobs WHERE state=? AND kind IN ({marks})",
            (JobState.RUNNING, *ISOLATED_KINDS),
        ).fetchone()
        if running[0]:
            return None  # a suspect is running alone
        lane_marks = ",".join("?" * len(lane))
        suspect = db.execute(
            f"SELECT * FROM jobs WHERE state=? AND next_try_time<=? AND interruptions>0 "
            f"AND kind IN ({lane_marks}) ORDER BY next_try_time, id LIMIT 1",
            (JobState.PENDING, now, *lane),
        ).fetchone()
        if suspect is None:
            return False
        return suspect if running[1] == 0 else None  # let the running jobs drain first

    def finish_job(self, job_id: int, state: JobState, error: str = "", next_try_time: float = 0.0) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET state=?, last_error=?, next_try_time=?, updated_time=? WHERE id=?",
                (state, error[:500], next_try_time, time.time(), job_id),
            )

    def wait_out_outage(self, job_id: int, error: str, next_try_time: float) -> None:
        """Back to PENDING after a dependency was down: the attempt is given back (an outage is not
        the job's fault) and the wait is counted for the backoff."""
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET state=?, attempts=MAX(attempts-1, 0), outage_waits=outage_waits+1, "
                "last_error=?, next_try_time=?, updated_time=? WHERE id=?",
                (JobState.PENDING, error[:500], next_try_time, time.time(), job_id),
            )

    def set_delivery(self, job_id: int, delivery: Delivery) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET delivery=? WHERE id=?", (delivery, job_id))

    def await_commitment(self, job_id: int, detail: str, until: float) -> None:
        """Park a sent export job (PENDING until ``until``, or until the report wakes it). The
        attempt is given back: the run that judges the report is the same attempt."""
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET state=?, attempts=MAX(attempts-1, 0), delivery=?, last_error=?, "
                "next_try_time=?, updated_time=? WHERE id=?",
                (JobState.PENDING, Delivery.AWAITING_COMMITMENT, detail[:500], until, time.time(), job_id),
            )

    # -- Storage Commitment (dicom_node.commitment) ------------------------------------
    def add_commitment(self, commitment: Commitment) -> None:
        """Record an N-ACTION before it is sent, so that a report racing in finds it."""
        c = commitment
        with self._tx() as db:
            db.execute(
                "INSERT INTO commitments (transaction_uid, job_id, study_instance_uid, target, instances, "
                "state, detail, requested_time, deadline_time) VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    c.transaction_uid,
                    c.job_id,
                    c.study_instance_uid,
                    c.target,
                    json.dumps([list(pair) for pair in c.instances]),
                    c.state,
                    c.detail,
                    c.requested_time,
                    c.deadline_time,
                ),
            )

    def commitment(self, transaction_uid: str) -> Commitment | None:
        row = (
            self._conn()
            .execute("SELECT * FROM commitments WHERE transaction_uid=?", (transaction_uid,))
            .fetchone()
        )
        return Commitment.from_row(row) if row else None

    def open_commitment(self, job_id: int) -> Commitment | None:
        """The job's latest commitment request not yet judged by the job (None: send anew)."""
        row = (
            self._conn()
            .execute(
                "SELECT * FROM commitments WHERE job_id=? AND judged=0 ORDER BY requested_time DESC LIMIT 1",
                (job_id,),
            )
            .fetchone()
        )
        return Commitment.from_row(row) if row else None

    def resolve_commitment(
        self, transaction_uid: str, state: CommitmentState, detail: str, now: float | None = None
    ) -> bool:
        """Record the PACS's report (the first one counts) and wake the waiting export job.
        False when the transaction is not awaiting a report (unknown, already resolved, timed out)."""
        now = time.time() if now is None else now
        with self._tx() as db:
            row = db.execute(
                "SELECT job_id, study_instance_uid FROM commitments WHERE transaction_uid=? AND state=?",
                (transaction_uid, CommitmentState.AWAITING),
            ).fetchone()
            if row is None:
                return False
            db.execute(
                "UPDATE commitments SET state=?, detail=?, resolved_time=? WHERE transaction_uid=?",
                (state, detail[:500], now, transaction_uid),
            )
            db.execute(
                "UPDATE jobs SET next_try_time=MIN(next_try_time, ?) WHERE id=? AND state=?",
                (now, row["job_id"], JobState.PENDING),
            )
            word = "committed" if state is CommitmentState.COMMITTED else "not committed"
            self._event(db, row["study_instance_uid"], now, f"export {word}", detail)
        return True

    def judge_commitment(self, transaction_uid: str, state: CommitmentState | None = None) -> None:
        """The job has acted on this request (``state``: TIMED_OUT when no report came)."""
        with self._tx() as db:
            if state is not None:
                db.execute(
                    "UPDATE commitments SET state=? WHERE transaction_uid=? AND state=?",
                    (state, transaction_uid, CommitmentState.AWAITING),
                )
            db.execute("UPDATE commitments SET judged=1 WHERE transaction_uid=?", (transaction_uid,))

    def retry_dead_letters(self, study_uid: str | None = None) -> int:
        """Operator's retry: DEAD_LETTER jobs (of one study, or all) become PENDING with fresh attempts."""
        now = time.time()
        where, args = "state=?", [JobState.DEAD_LETTER]
        if study_uid is not None:
            where, args = where + " AND study_instance_uid=?", [*args, study_uid]
        with self._tx() as db:
            studies = [
                r[0] for r in db.execute(f"SELECT DISTINCT study_instance_uid FROM jobs WHERE {where}", args)
            ]
            count = db.execute(
                "UPDATE jobs SET state=?, attempts=0, interruptions=0, outage_waits=0, next_try_time=?, "
                f"updated_time=? WHERE {where}",
                [JobState.PENDING, now, now, *args],
            ).rowcount
            for uid in studies:
                self._event(db, uid, now, "retry", "dead letters queued again by the operator")
        return count

    def resume_interrupted(self, max_attempts: dict[JobKind, int] | None = None) -> tuple[int, int]:
        """After a restart: RUNNING jobs were cut off by the stop. Each such stop counts as a failed
        attempt; a job that has used its attempts (``max_attempts`` per kind) is FAILED with the
        reason instead of being run again, so one poison series cannot take the node down in a loop.
        Returns (resumed, failed)."""
        now = time.time()
        resumed = failed = 0
        with self._tx() as db:
            rows = db.execute("SELECT * FROM jobs WHERE state=?", (JobState.RUNNING,)).fetchall()
            for row in rows:
                job = Job.from_row(row)
                stops = job.interruptions + 1
                limit = (max_attempts or {}).get(job.kind)
                if limit is not None and job.attempts >= limit:
                    reason = (
                        f"the node stopped {stops} time{'s' if stops != 1 else ''} while "
                        f"{_DOING[job.kind]} (attempt {job.attempts} of {limit}); not run again"
                    )
                    db.execute(
                        "UPDATE jobs SET state=?, interruptions=?, last_error=?, updated_time=? WHERE id=?",
                        (JobState.FAILED, stops, reason, now, job.id),
                    )
                    self._event(db, job.study_instance_uid, now, f"{job.kind} failed", reason)
                    failed += 1
                else:
                    db.execute(
                        "UPDATE jobs SET state=?, interruptions=?, next_try_time=?, updated_time=? WHERE id=?",
                        (JobState.PENDING, stops, now, now, job.id),
                    )
                    resumed += 1
        return resumed, failed

    def jobs(self, study_uid: str | None = None, kind: JobKind | None = None) -> list[Job]:
        sql, args = "SELECT * FROM jobs WHERE 1=1", []
        if study_uid is not None:
            sql, args = sql + " AND study_instance_uid=?", [*args, study_uid]
        if kind is not None:
            sql, args = sql + " AND kind=?", [*args, kind]
        return [Job.from_row(r) for r in self._conn().execute(sql + " ORDER BY id", args).fetchall()]

    def job_counts(self) -> dict[tuple[JobKind, JobState], int]:
        rows = self._conn().execute("SELECT kind, state, COUNT(*) FROM jobs GROUP BY kind, state").fetchall()
        return {(JobKind(r[0]), JobState(r[1])): int(r[2]) for r in rows}

    def count_start(self) -> int:
        """Record one start of the node on this spool; returns how many there have been."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO node (key, value) VALUES ('starts', 1) "
                "ON CONFLICT(key) DO UPDATE SET value = value + 1"
            )
            return int(db.execute("SELECT value FROM node WHERE key='starts'").fetchone()[0])

    def mark_running(self) -> bool:
        """Record that the node runs on this spool; returns whether its last stop was clean
        (``mark_clean_stop``): if not, rows of acknowledged instances may be missing."""
        with self._tx() as db:
            row = db.execute("SELECT value FROM node WHERE key='clean_stop'").fetchone()
            db.execute(
                "INSERT INTO node (key, value) VALUES ('clean_stop', 0) "
                "ON CONFLICT(key) DO UPDATE SET value = 0"
            )
        return bool(row and row[0])

    def mark_clean_stop(self) -> None:
        """Nothing more will be recorded: a synced commit (so every unsynced one before it is
        durable too) that tells the next start no recovery scan is needed."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO node (key, value) VALUES ('clean_stop', 1) "
                "ON CONFLICT(key) DO UPDATE SET value = 1"
            )

    def indexed_paths(self, study_uid: str) -> set[str]:
        """The spool path of every indexed instance of one study."""
        rows = self._conn().execute("SELECT path FROM instances WHERE study_instance_uid=?", (study_uid,))
        return {row[0] for row in rows}

    def indexed_study_uids(self) -> list[str]:
        """Every study that has an indexed instance."""
        return [row[0] for row in self._conn().execute("SELECT DISTINCT study_instance_uid FROM instances")]

    def starts(self) -> int:
        row = self._conn().execute("SELECT value FROM node WHERE key='starts'").fetchone()
        return int(row[0]) if row else 0

    # -- the de-identification crosswalk (dicom_node.deidentify) ---------------
    def put_crosswalk(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Record pseudonymous UID -> original UID pairs (idempotent)."""
        with self._tx() as db:
            db.executemany("INSERT OR IGNORE INTO uid_crosswalk (pseudonym, original) VALUES (?, ?)", pairs)

    def crosswalk_originals(self, pseudonyms: Iterable[str]) -> dict[str, str]:
        """The originals of those pseudonyms this node recorded."""
        wanted = list(pseudonyms)
        found: dict[str, str] = {}
        for i in range(0, len(wanted), 500):
            part = wanted[i : i + 500]
            sql = f"SELECT pseudonym, original FROM uid_crosswalk WHERE pseudonym IN ({','.join('?' * len(part))})"
            found.update((r[0], r[1]) for r in self._conn().execute(sql, part))
        return found

    def pending_count(self) -> int:
        return int(
            self._conn().execute("SELECT COUNT(*) FROM jobs WHERE state IN (?,?)", ACTIVE).fetchone()[0]
        )
