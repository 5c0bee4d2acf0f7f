"""Crash harness: SIGKILL `radbridge serve` again and again while studies stream in; count what survives.

What it runs (all real processes on loopback):

* Orthanc (``tests.peers.OrthancServer``) as the export destination (C-STORE);
* ``radbridge serve`` as a subprocess, with a short quiet window so studies complete quickly;
* a *retrying sender* thread that pushes M synthetic CT studies: most with dcmtk ``storescu -v``
  (one association per attempt, from PATH), every third over STOW-RS in small requests;
* a killer (the calling thread) that SIGKILLs the node N times, each time at a chosen kind of
  point -- while an association or STOW request is carrying instances, while an analysis is
  RUNNING (mid-inference), while an export is RUNNING, or after a random delay -- and restarts it.

What counts as what:

* **acknowledged**: an instance the peer confirmed -- a ``Received Store Response (Success)`` line
  of ``storescu -v`` following its ``Sending file`` line, or its SOP Instance UID in the
  ReferencedSOPSequence of a 200/202 STOW-RS response. Anything else is resent by the sender once
  the node is back (an instance stored but whose answer was cut off is therefore sent twice: that
  is the at-least-once contract of DICOM, and the node must take it).
* **lost**: acknowledged, but at the end not in the node's index as a received instance, or its
  spooled file is missing, of another size, or does not parse to the same SOP Instance UID.
* **completed study**: every instance acknowledged, and Orthanc holds the study's results: one
  SEG series and the expected SR series, whose objects are exactly the node's output objects for
  the study, the latest SEG referencing every acknowledged instance of the series (results of the
  whole study, not of the part that had arrived before a crash).
* **"exactly once"** -- precisely: the node derives its output SOP Instance UIDs from the source
  series, the model and the source images, so re-running a job cut off by a crash re-creates the
  *same* objects. Delivery to the destination is at-least-once: an export killed after Orthanc
  stored the object but before the node recorded SUCCEEDED is sent again on restart, and Orthanc
  keeps the one copy it has (same UID). So "exactly once" here means exactly-once *effect*:

  - Orthanc holds, per study, no two objects with the same SOP Instance UID and none that is not
    one of the node's output objects, in exactly 1 SEG series and the expected SR series;
  - the node's index has exactly those output objects for the study and exactly one export job
    per (output object, target), in state SUCCEEDED (no FAILED / DEAD_LETTER / stuck job).

  ``duplicates`` counts every violation of these. Resends of the same UID (export jobs that ran
  more than once: ``export re-runs``) and analyses that ran again (``analysis re-runs``) are
  reported as figures, not as duplicates: they are the idempotent retries the design relies on.
  A study completed before all its images arrived (a sender that resumed after the quiet window)
  is analysed again when the rest arrives: that gives a *revision* (new instances in the same
  series, the SRs naming their predecessors), counted as ``revised results``, not as duplicates.

Run it by hand for more cycles (from the repository root)::

    TCP_NODELAY=1 python -m tests.chaos.harness --kills 50 --studies 24 --seed 7
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import requests

from radbridge.synth import ct_series, write_series
from tests.e2e.test_pipeline import Serve, _config
from tests.peers import OrthancServer, dcmtk_env, free_port

EXPECTED_OUTPUTS = {"SEG": 1, "SR": 3}  # per CT series with the default ct-reference rule
PHASES = ("association", "stow", "analyze", "export", "idle")
MODES = ("association", "analyze", "export", "random")
_SENDING = re.compile(r"^I: Sending file: (.+)$")
_RESPONSE = re.compile(r"^I: Received Store Response \((\w+)\)")


# -- figures ---------------------------------------------------------------------------
@dataclass
class Figures:
    seed: int
    kills: int = 0
    kill_modes: Counter[str] = field(default_factory=Counter)  # what each cycle aimed at
    kill_phases: Counter[str] = field(default_factory=Counter)  # what was really under way
    restarts: int = 0
    studies: int = 0
    studies_stow: int = 0
    instances: int = 0  # distinct instances in the studies
    instances_sent: int = 0  # send attempts, resends included
    acknowledged: int = 0
    lost: int = 0
    studies_completed: int = 0
    result_objects: int = 0  # SEG + SR instances at Orthanc
    duplicates: int = 0
    revisions: int = 0  # earlier result objects replaced by a revision (a study completed early)
    export_reruns: int = 0
    analysis_reruns: int = 0
    wall_s: float = 0.0
    problems: list[str] = field(default_factory=list)

    def table(self) -> str:
        phases = ", ".join(f"{p} {self.kill_phases.get(p, 0)}" for p in PHASES)
        modes = ", ".join(f"{m} {self.kill_modes.get(m, 0)}" for m in MODES)
        rows = [
            ("seed", self.seed),
            ("kills (SIGKILL)", self.kills),
            ("  aimed at", modes),
            ("  under way at the kill", phases),
            ("restarts", self.restarts),
            ("studies (of them STOW-RS)", f"{self.studies} ({self.studies_stow})"),
            ("instances", self.instances),
            ("instances sent (with resends)", self.instances_sent),
            ("acknowledged", self.acknowledged),
            ("lost", self.lost),
            ("studies completed", f"{self.studies_completed} of {self.studies}"),
            ("result objects at Orthanc", self.result_objects),
            ("duplicates", self.duplicates),
            ("revised results (study completed early)", self.revisions),
            ("export re-runs (same UID resent)", self.export_reruns),
            ("analysis re-runs", self.analysis_reruns),
            ("wall time", f"{self.wall_s:.1f} s"),
        ]
        width = max(len(k) for k, _ in rows)
        lines = ["crash harness figures", *(f"  {k:<{width}}  {v}" for k, v in rows)]
        lines += [f"  PROBLEM: {p}" for p in self.problems]
        return "\n".join(lines)


# -- the studies and the retrying sender -------------------------------------------------
@dataclass
class Study:
    index: int
    study_uid: str
    series_uid: str
    files: dict[str, Path]  # SOP Instance UID -> file
    stow: bool
    acked: set[str] = field(default_factory=set)

    @property
    def pending(self) -> list[str]:
        return [uid for uid in self.files if uid not in self.acked]


class Sender(threading.Thread):
    """Sends every study until each instance is acknowledged, resending what was not."""

    def __init__(
        self,
        studies: list[Study],
        scp_port: int,
        http_port: int,
        rng: random.Random,
        workdir: Path,
        stow_chunk: int = 4,
        gap_s: float = 1.0,
    ) -> None:
        super().__init__(name="chaos-sender", daemon=True)
        self.studies = studies
        self.scp_port = scp_port
        self.http_port = http_port
        self.rng = rng
        self.stow_chunk = stow_chunk
        self.gap_s = gap_s
        self.workdir = workdir
        self.sent = 0
        self.attempts = 0
        self.failures = 0
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        # The send under way ("association" / "stow"), how many instances it has had acknowledged so
        # far, and whether a request of it is on the wire right now.
        self.in_flight: str | None = None
        self.in_flight_acks = 0
        self.on_wire = False
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for study in self.studies:
                while study.pending and not self.stop_event.is_set():
                    ok = self._send_stow(study) if study.stow else self._send_storescu(study)
                    if not ok:
                        self.failures += 1
                        self.stop_event.wait(0.1 + 0.2 * self.rng.random())
                self.stop_event.wait(self.rng.uniform(0.5, 1.5) * self.gap_s)  # the next study, later
        except BaseException as exc:  # reported by the harness
            self.error = exc

    def _flight(self, what: str | None) -> None:
        with self.lock:
            self.in_flight = what
            self.in_flight_acks = 0
            self.on_wire = what == "association"  # a storescu process is on the wire all along

    def _ack(self, study: Study, uid: str) -> None:
        with self.lock:
            study.acked.add(uid)
            self.in_flight_acks += 1

    def _send_storescu(self, study: Study) -> bool:
        """One storescu association for the study's unacknowledged files; True if it ended cleanly."""
        by_path = {str(study.files[uid]): uid for uid in study.pending}
        args = ["storescu", "-v", "-R", "-aet", "CHAOS", "-aec", "RADBRIDGE", "127.0.0.1", str(self.scp_port)]
        self.attempts += 1
        self._flight("association")
        proc = subprocess.Popen(
            [*args, *by_path], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dcmtk_env()
        )
        timer = threading.Timer(120, proc.kill)
        timer.start()
        current: str | None = None
        errors = False
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip("\n")
                if m := _SENDING.match(line):
                    current = by_path.get(m.group(1))
                    self.sent += 1
                elif (m := _RESPONSE.match(line)) and current is not None:
                    if m.group(1) == "Success":
                        self._ack(study, current)
                    current = None
                elif line.startswith(("E:", "F:")):
                    errors = True
            proc.wait()
        finally:
            timer.cancel()
            self._flight(None)
        return proc.returncode == 0 and not errors and not study.pending

    def _send_stow(self, study: Study) -> bool:
        """STOW-RS requests of a few instances each; True if every request was answered in full."""
        pending = study.pending
        self._flight("stow")
        try:
            return self._send_stow_chunks(study, pending)
        finally:
            self._flight(None)

    def _send_stow_chunks(self, study: Study, pending: list[str]) -> bool:
        for start in range(0, len(pending), self.stow_chunk):
            chunk = pending[start : start + self.stow_chunk]
            boundary = uuid.uuid4().hex
            body = BytesIO()
            for uid in chunk:
                body.write(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
                body.write(study.files[uid].read_bytes())
                body.write(b"\r\n")
            body.write(f"--{boundary}--\r\n".encode())
            self.attempts += 1
            self.on_wire = True
            try:
                response = requests.post(
                    f"http://127.0.0.1:{self.http_port}/dicom-web/studies",
                    data=body.getvalue(),
                    headers={
                        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                        "Accept": "application/dicom+json",
                    },
                    timeout=60,
                )
            except requests.RequestException as exc:
                if "refused" not in str(exc):  # it reached the node: the parts went (partly) out
                    self.sent += len(chunk)
                return False
            finally:
                self.on_wire = False
            self.sent += len(chunk)
            if response.status_code not in (200, 202):
                return False
            for item in response.json().get("00081199", {}).get("Value", []):
                uid = item.get("00081155", {}).get("Value", [None])[0]
                if uid in study.files:
                    self._ack(study, uid)
            if response.status_code != 200:
                return False
        return not study.pending


# -- the node under test -----------------------------------------------------------------
class JobsView:
    """Read-only look at the node's SQLite index (it stays valid across the node's restarts)."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self._conn: sqlite3.Connection | None = None

    def _query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        for _ in range(50):
            try:
                if self._conn is None:
                    if not self.db.exists():
                        return []
                    self._conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5)
                    self._conn.row_factory = sqlite3.Row
                return self._conn.execute(sql, args).fetchall()
            except sqlite3.OperationalError:
                self.close()
                time.sleep(0.02)
        raise RuntimeError(f"cannot read {self.db}")

    def running(self) -> set[str]:
        return {r["kind"] for r in self._query("SELECT kind FROM jobs WHERE state='RUNNING'")}

    def jobs(self) -> list[sqlite3.Row]:
        return self._query("SELECT * FROM jobs ORDER BY id")

    def instances(self, origin: str) -> list[sqlite3.Row]:
        return self._query("SELECT * FROM instances WHERE origin=?", (origin,))

    def studies(self) -> list[sqlite3.Row]:
        return self._query("SELECT * FROM studies")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _orthanc_results(orthanc: OrthancServer, study_uid: str) -> dict[str, list[str]]:
    """SOP Instance UIDs of the SEG / SR instances Orthanc holds in the study, by modality."""
    found: dict[str, list[str]] = {}
    for series in orthanc.post_json(
        "/tools/find", {"Level": "Series", "Query": {"StudyInstanceUID": study_uid}, "Expand": True}
    ):
        modality = series["MainDicomTags"].get("Modality", "")
        if modality not in EXPECTED_OUTPUTS:
            continue
        for orthanc_id in series["Instances"]:
            tags = orthanc.get_json(f"/instances/{orthanc_id}/simplified-tags")
            found.setdefault(modality, []).append(tags["SOPInstanceUID"])
    return found


def _seg_references(orthanc: OrthancServer, study_uid: str, seg_uid: str) -> set[str]:
    (inst,) = orthanc.post_json(
        "/tools/find",
        {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid, "SOPInstanceUID": seg_uid}},
    )
    ds = pydicom.dcmread(BytesIO(orthanc.instance_file(inst)), stop_before_pixels=True)
    return {
        str(ref.ReferencedSOPInstanceUID)
        for series in ds.get("ReferencedSeriesSequence", [])
        for ref in series.get("ReferencedInstanceSequence", [])
    }


# -- the harness ---------------------------------------------------------------------------
class CrashHarness:
    def __init__(
        self,
        workdir: Path,
        *,
        kills: int = 20,
        studies: int = 12,
        slices: int = 16,
        seed: int = 1,
        quiet_window_s: float = 2.0,
        drain_timeout_s: float = 180.0,
        log: Any = print,
    ) -> None:
        self.workdir = Path(workdir)
        self.n_kills = kills
        self.n_studies = studies
        self.slices = slices
        self.rng = random.Random(seed)
        self.figures = Figures(seed=seed)
        self.quiet_window_s = quiet_window_s
        self.drain_timeout_s = drain_timeout_s
        self.log = log
        self.serve: Serve | None = None
        self._serve_count = 0

    # -- node lifecycle ------------------------------------------------------------------
    def _start_node(self) -> None:
        self._serve_count += 1
        self.serve = Serve(self.cfg, self.workdir / f"serve-{self._serve_count:03d}.log")

    def _kill_node(self) -> None:
        assert self.serve is not None
        self.serve.proc.send_signal(signal.SIGKILL)
        self.serve.proc.wait(30)
        self.serve.stop()  # closes its log; the process is gone
        self.serve = None

    # -- kill points ---------------------------------------------------------------------
    def _wait_for(self, mode: str, timeout_s: float) -> None:
        """Return at the point this mode aims at (or when timeout_s has passed)."""
        deadline = time.monotonic() + timeout_s
        if mode == "random":
            time.sleep(self.rng.uniform(0.2, 3.0))
            return
        delay = self.rng.uniform(0.0, 0.6) if mode == "analyze" else 0.0
        while time.monotonic() < deadline:
            if mode == "association":
                with self.sender.lock:
                    if self.sender.on_wire and self.sender.in_flight_acks >= 1:
                        return
                if not self.sender.is_alive():
                    return
            elif mode in self.jobs.running():
                if delay:  # somewhere inside the analysis, not at its first instant
                    time.sleep(delay)
                return
            time.sleep(0.005)

    def _phases_now(self) -> set[str]:
        phases = set()
        with self.sender.lock:
            if self.sender.in_flight and self.sender.on_wire:
                phases.add(self.sender.in_flight)
        phases |= self.jobs.running() & {"analyze", "export"}
        return phases or {"idle"}

    def _modes(self) -> list[str]:
        """A seeded schedule: each mode a quarter of the cycles; the association kills fall in the
        first two thirds, while the sender still has studies to send."""
        modes = [MODES[i % len(MODES)] for i in range(self.n_kills)]
        early = max(1, 2 * self.n_kills // 3)
        n_assoc = modes.count("association")
        slots = sorted(self.rng.sample(range(early), min(n_assoc, early)))
        others = [m for m in modes if m != "association"] + ["random"] * (n_assoc - len(slots))
        self.rng.shuffle(others)
        it = iter(others)
        return ["association" if i in slots else next(it) for i in range(self.n_kills)]

    # -- the run -------------------------------------------------------------------------------
    def run(self) -> Figures:
        started = time.monotonic()
        f = self.figures
        with OrthancServer(self.workdir / "orthanc") as orthanc:
            self.orthanc = orthanc
            scp_port, http_port = free_port(), free_port()
            self.cfg = _config(
                self.workdir,
                scp_port,
                orthanc,
                http_port=http_port,
                quiet_window_s=self.quiet_window_s,
                extra="\n[export]\nbackoff_s = 0.5\nmax_backoff_s = 2.0\n",
            )
            self.jobs = JobsView(self.workdir / "spool" / "index.sqlite3")
            studies = self._make_studies()
            f.studies, f.studies_stow = len(studies), sum(s.stow for s in studies)
            f.instances = sum(len(s.files) for s in studies)
            self._start_node()
            # Spread the studies over about the time the kill cycles take (~4 s each), so that
            # associations are still under way for the late cycles.
            gap_s = max(0.3, 0.8 * 4.0 * self.n_kills / max(1, len(studies)))
            self.sender = Sender(
                studies, scp_port, http_port, random.Random(self.rng.random()), self.workdir, gap_s=gap_s
            )
            self.sender.start()
            try:
                for cycle, mode in enumerate(self._modes(), 1):
                    if mode == "association" and not self.sender.is_alive():
                        mode = "random"  # nothing left on the wire to cut
                    self._wait_for(mode, timeout_s=15.0)
                    phases = self._phases_now()
                    self._kill_node()
                    f.kills += 1
                    f.kill_modes[mode] += 1
                    f.kill_phases.update(phases)
                    self.log(f"kill {cycle:3d}: aimed at {mode:<11} under way: {', '.join(sorted(phases))}")
                    time.sleep(self.rng.uniform(0.0, 0.5))  # down for a moment
                    self._start_node()
                    f.restarts += 1
                    time.sleep(self.rng.uniform(0.3, 1.5))  # let it work a little before the next kill
                self.sender.join(timeout=self.drain_timeout_s)
                if self.sender.is_alive() or self.sender.error:
                    f.problems.append(f"the sender did not finish: {self.sender.error!r}")
                    self.sender.stop_event.set()
                self._drain(studies)
                self._check(studies)
            finally:
                self.sender.stop_event.set()
                if self.serve is not None:
                    code = self.serve.stop()
                    if code != 0:
                        f.problems.append(f"radbridge serve exited {code} on SIGTERM")
                self.jobs.close()
        f.instances_sent = self.sender.sent
        f.wall_s = time.monotonic() - started
        return f

    def _make_studies(self) -> list[Study]:
        studies = []
        for i in range(self.n_studies):
            datasets = ct_series(n_slices=self.slices, seed=1000 + i)
            paths = write_series(datasets, self.workdir / "studies" / f"{i:03d}")
            studies.append(
                Study(
                    index=i,
                    study_uid=str(datasets[0].StudyInstanceUID),
                    series_uid=str(datasets[0].SeriesInstanceUID),
                    files={str(ds.SOPInstanceUID): p for ds, p in zip(datasets, paths, strict=True)},
                    stow=i % 3 == 2,
                )
            )
        return studies

    def _drain(self, studies: list[Study]) -> None:
        """Wait until every study is COMPLETE and no job is PENDING/RUNNING, then a little more."""
        deadline = time.monotonic() + self.drain_timeout_s
        while time.monotonic() < deadline:
            states = {r["study_instance_uid"]: r["state"] for r in self.jobs.studies()}
            active = [r for r in self.jobs.jobs() if r["state"] in ("PENDING", "RUNNING")]
            if all(states.get(s.study_uid) == "COMPLETE" for s in studies) and not active:
                time.sleep(2.0)  # a late duplicate export would land now
                return
            time.sleep(0.25)
        self.figures.problems.append(
            f"the node did not finish within {self.drain_timeout_s:.0f} s: "
            f"{Counter((r['kind'], r['state']) for r in self.jobs.jobs())}"
        )

    def _check(self, studies: list[Study]) -> None:
        f = self.figures
        received = {r["sop_instance_uid"]: r for r in self.jobs.instances("received")}
        outputs = self.jobs.instances("output")
        jobs = self.jobs.jobs()
        f.export_reruns = sum(1 for j in jobs if j["kind"] == "export" and j["attempts"] > 1)
        f.analysis_reruns = sum(max(0, j["attempts"] - 1) for j in jobs if j["kind"] == "analyze")
        for j in jobs:
            if j["state"] in ("FAILED", "DEAD_LETTER"):
                f.problems.append(f"{j['kind']} job {j['id']} {j['state']}: {j['last_error']}")
        for study in studies:
            f.acknowledged += len(study.acked)
            for uid in sorted(study.acked):
                problem = self._lost(uid, received.get(uid))
                if problem:
                    f.lost += 1
                    f.problems.append(f"study {study.index}: acknowledged {uid} {problem}")
            complete = self._check_results(study, outputs, jobs)
            f.studies_completed += complete and not study.pending

    @staticmethod
    def _lost(uid: str, row: sqlite3.Row | None) -> str:
        if row is None:
            return "is not in the index"
        path = Path(row["path"])
        if not path.is_file():
            return f"is indexed but its file {path} is missing"
        if path.stat().st_size != row["size"]:
            return f"has {path.stat().st_size} bytes on disk, {row['size']} indexed"
        try:
            got = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        except Exception as exc:
            return f"is unreadable ({type(exc).__name__})"
        return "" if got == uid else f"is stored as {got}"

    def _check_results(self, study: Study, outputs: list[sqlite3.Row], jobs: list[sqlite3.Row]) -> bool:
        """True when Orthanc holds exactly this study's results; counts duplicates on the way."""
        f = self.figures
        at_orthanc = _orthanc_results(self.orthanc, study.study_uid)
        f.result_objects += sum(len(v) for v in at_orthanc.values())
        mine = {r["sop_instance_uid"]: r for r in outputs if r["study_instance_uid"] == study.study_uid}
        problems: list[str] = []
        duplicates = 0
        latest: dict[str, tuple[int, str]] = {}  # output series -> (instance number, SOP UID)
        for uid, row in mine.items():
            ds = pydicom.dcmread(row["path"], stop_before_pixels=True)
            series, number = str(ds.SeriesInstanceUID), int(ds.InstanceNumber)
            if series not in latest or number > latest[series][0]:
                latest[series] = (number, uid)
        f.revisions += len(mine) - len(latest)
        for modality, expected in EXPECTED_OUTPUTS.items():
            uids = at_orthanc.get(modality, [])
            node_uids = {u for u, r in mine.items() if r["modality"] == modality}
            duplicates += len(uids) - len(set(uids))
            strangers = set(uids) - node_uids
            duplicates += len(strangers)
            series = {
                str(pydicom.dcmread(mine[u]["path"], stop_before_pixels=True).SeriesInstanceUID)
                for u in node_uids
            }
            if strangers or set(uids) != node_uids or len(series) != expected:
                problems.append(
                    f"{modality}: Orthanc has {len(uids)} ({len(strangers)} not the node's), the node wrote "
                    f"{len(node_uids)} in {len(series)} series, expected {expected} series"
                )
        exports = Counter(
            json.loads(j["payload"])["path"]
            for j in jobs
            if j["kind"] == "export" and j["study_instance_uid"] == study.study_uid
        )
        succeeded = Counter(
            json.loads(j["payload"])["path"]
            for j in jobs
            if j["kind"] == "export"
            and j["study_instance_uid"] == study.study_uid
            and j["state"] == "SUCCEEDED"
        )
        for row in mine.values():
            n, ok = exports.get(row["path"], 0), succeeded.get(row["path"], 0)
            if n > 1:
                duplicates += n - 1
            if ok != 1:
                problems.append(f"output {row['sop_instance_uid']}: {ok} SUCCEEDED export job(s) of {n}")
        seg_series = [u for _, u in latest.values() if mine[u]["modality"] == "SEG"]
        for seg in seg_series:  # the latest revision covers the whole series
            refs = (
                _seg_references(self.orthanc, study.study_uid, seg)
                if seg in at_orthanc.get("SEG", [])
                else set()
            )
            if refs != set(study.files):
                problems.append(
                    f"the latest SEG at Orthanc references {len(refs)} of the series' {len(study.files)} "
                    "instances (results of a partial study)"
                )
        f.duplicates += duplicates
        for p in problems:
            f.problems.append(f"study {study.index} ({'STOW-RS' if study.stow else 'storescu'}): {p}")
        return not problems and duplicates == 0


def run_harness(workdir: Path, **kwargs: Any) -> Figures:
    figures = CrashHarness(workdir, **kwargs).run()
    print(figures.table(), flush=True)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.harness", description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--studies", type=int, default=12)
    parser.add_argument("--slices", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quiet-window", type=float, default=2.0)
    parser.add_argument("--workdir", help="keep the run's files here (default: a temporary directory)")
    args = parser.parse_args(argv)
    options = dict(
        kills=args.kills,
        studies=args.studies,
        slices=args.slices,
        seed=args.seed,
        quiet_window_s=args.quiet_window,
    )
    with contextlib.ExitStack() as stack:
        workdir = (
            Path(args.workdir) if args.workdir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        )
        workdir.mkdir(parents=True, exist_ok=True)
        figures = run_harness(workdir, **options)
    ok = figures.lost == 0 and figures.duplicates == 0 and figures.studies_completed == figures.studies
    return 0 if ok and not figures.problems else 1


if __name__ == "__main__":
    sys.exit(main())
