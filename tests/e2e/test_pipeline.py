"""The whole loop with real peers: dcmtk storescu -> `radbridge serve` -> Orthanc.

A synthetic 512x512 CT (120 slices, sent shuffled) and pydicom-data's RG1_UNCI
chest CR go in; SEG + TID 1500 SR + narrative SR come out in Orthanc, inside
the source studies. Every object passes dciodvfy (and dsrdump for SRs), reads
back with highdicom, and the SEG voxels equal the reference algorithm's output
on the right source slices.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from dicom_node.volume import read_series
from inference_service.backends.reference import segment_ct
from radbridge.synth import SyntheticPatient, cr_chest_path, ct_series, write_series
from tests.peers import OrthancServer, assert_valid_dicom_object, free_port, storescu

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.usefixtures("require_dcmtk", "require_dicom3tools"),
]
PATIENT = SyntheticPatient(name="PHITEST^SENTINEL^NAME", patient_id="PHI-ID-424242", accession="PHIACC777")
SEG_UID = "1.2.840.10008.5.1.4.1.1.66.4"
WAIT_S = 300


class Serve:
    """`radbridge serve` as a subprocess, the way an operator runs it."""

    def __init__(self, config: Path, log: Path) -> None:
        self.log_path = log
        self._log = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "radbridge.cli", "serve", "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env={**os.environ, "TCP_NODELAY": "1"},
        )
        line = self.proc.stdout.readline()  # "radbridge: AE ... listening on host:port; ..."
        if "listening" not in line:
            self.stop()
            raise RuntimeError(f"serve did not start: {line!r}\n{log.read_text()[-3000:]}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode


def _config(
    tmp_path: Path,
    scp_port: int,
    orthanc: OrthancServer,
    *,
    http_port: int | None = None,
    quiet_window_s: float = 2.0,
    extra: str = "",
) -> Path:
    """The node's config for these tests; ``extra`` is TOML appended as is (more sections)."""
    cfg = tmp_path / "radbridge.toml"
    cfg.write_text(
        f"""
[scp]
port = {scp_port}
ae_title = "RADBRIDGE"

[http]
port = {http_port or free_port()}

[spool]
directory = "{tmp_path / "spool"}"

[completion]
quiet_window_s = {quiet_window_s}

[worker]
poll_interval_s = 0.2
backoff_s = 1.0

[export.targets.orthanc]
host = "127.0.0.1"
port = {orthanc.dicom_port}
ae_title = "{orthanc.aet}"
{extra}"""
    )
    return cfg


def _study_objects(orthanc: OrthancServer, study_uid: str) -> dict[str, list[dict]]:
    by_modality: dict[str, list[dict]] = {}
    for inst in orthanc.find_instances(StudyInstanceUID=study_uid):
        tags = inst["MainDicomTags"]
        modality = orthanc.get_json(f"/instances/{inst['ID']}/simplified-tags").get("Modality", "")
        by_modality.setdefault(modality, []).append({"id": inst["ID"], "sop": tags["SOPInstanceUID"]})
    return by_modality


def _wait_for_outputs(
    orthanc: OrthancServer, study_uid: str, expected: dict[str, int]
) -> dict[str, list[dict]]:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        objs = _study_objects(orthanc, study_uid)
        if all(len(objs.get(m, [])) >= n for m, n in expected.items()):
            return objs
        time.sleep(1.0)
    raise AssertionError(
        f"Orthanc did not receive {expected} in time; has {_study_objects(orthanc, study_uid)}"
    )


def _status(config: Path, *args: str) -> dict:
    """`radbridge status --config config [args]` as JSON."""
    out = subprocess.run(
        [sys.executable, "-m", "radbridge.cli", "status", "--config", str(config), *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def study_status(config: Path, study_uid: str) -> tuple[dict, list[dict]]:
    """(the study as `radbridge status --study` shows it, with its history; its jobs)."""
    from dicom_node.spool import uid_key

    doc = _status(config, "--study", uid_key(study_uid))
    (study,) = doc["studies"]
    return study, doc["jobs"]


@pytest.fixture
def pipeline(tmp_path: Path, orthanc: OrthancServer) -> Iterator[tuple[Serve, Path, OrthancServer, int]]:
    port = free_port()
    cfg = _config(tmp_path, port, orthanc)
    serve = Serve(cfg, tmp_path / "serve.log")
    yield serve, cfg, orthanc, port
    serve.stop()


def test_ct_and_cr_round_trip_through_orthanc(pipeline, tmp_path: Path) -> None:  # noqa: ANN001
    serve, cfg, orthanc, scp_port = pipeline
    ct_dir = tmp_path / "ct"
    ct_files = write_series(ct_series(n_slices=120, patient=PATIENT, seed=11), ct_dir)
    shuffled = list(ct_files)
    random.Random(5).shuffle(shuffled)
    cr = cr_chest_path()
    # A third study whose series cannot form a volume (two images at one position, other pixels;
    # a gap would be resampled, see test_geometry_pipeline).
    bad_series = ct_series(n_slices=12, patient=PATIENT, seed=12)
    bad_series[5].ImagePositionPatient = bad_series[4].ImagePositionPatient
    bad_files = write_series(bad_series, tmp_path / "bad")

    result = storescu([*shuffled, cr, *bad_files], "127.0.0.1", scp_port, "RADBRIDGE")
    assert result.returncode == 0 and not result.errors, result.stderr

    ct_study = str(pydicom.dcmread(ct_files[0], stop_before_pixels=True).StudyInstanceUID)
    cr_ds = pydicom.dcmread(cr, stop_before_pixels=True)
    bad_study = str(pydicom.dcmread(bad_files[0], stop_before_pixels=True).StudyInstanceUID)
    ct_objs = _wait_for_outputs(orthanc, ct_study, {"SEG": 1, "SR": 3})
    cr_objs = _wait_for_outputs(orthanc, str(cr_ds.StudyInstanceUID), {"SEG": 1, "SR": 3})

    # Every produced object: dciodvfy clean, dsrdump for SRs, highdicom reads it.
    downloaded: dict[str, Path] = {}
    for study_objs in (ct_objs, cr_objs):
        for modality in ("SEG", "SR"):
            for obj in study_objs[modality]:
                path = tmp_path / f"{modality}-{obj['sop']}.dcm"
                path.write_bytes(orthanc.instance_file(obj["id"]))
                assert_valid_dicom_object(path)
                ds = pydicom.dcmread(path)
                if modality == "SEG":
                    hd.seg.Segmentation.from_dataset(ds)
                else:
                    hd.sr.srread(path)
                downloaded[obj["sop"]] = path

    # CT SEG voxels == reference algorithm on the sorted volume, slice by slice.
    vol = read_series(ct_files)
    expected = segment_ct(vol.voxels, vol.spacing_mm[0] * vol.spacing_mm[1] * vol.spacing_mm[2] / 1000)
    (seg_obj,) = ct_objs["SEG"]
    seg = hd.seg.segread(downloaded[seg_obj["sop"]])
    labels = {seg.get_segment_description(n).segment_label: n for n in seg.segment_numbers}
    uids = [ds.SOPInstanceUID for ds in vol.sources]
    for label, key in (("Lungs", "lungs"), ("Bone", "bone"), ("Soft tissue", "soft")):
        got = seg.get_pixels_by_source_instance(
            uids, segment_numbers=[labels[label]], skip_overlap_checks=True
        )
        np.testing.assert_array_equal(got[..., 0].astype(bool), expected[key], err_msg=label)

    # CR SEG: the single frame references the CR and keeps its PatientOrientation.
    (cr_seg_obj,) = cr_objs["SEG"]
    cr_seg = pydicom.dcmread(downloaded[cr_seg_obj["sop"]])
    assert cr_seg.PatientOrientation == cr_ds.PatientOrientation
    assert cr_seg.ReferencedSeriesSequence[0].SeriesInstanceUID == cr_ds.SeriesInstanceUID

    # The unusable series is reported in the job state with its reason; its images are kept.
    deadline = time.monotonic() + 60
    failed = []
    while time.monotonic() < deadline and not failed:
        failed = [j for j in _status(cfg)["jobs"] if j["kind"] == "analyze" and j["state"] == "FAILED"]
        time.sleep(0.5)
    assert failed and "share one slice position" in failed[0]["error"]
    assert _status(cfg)["instances"] == 120 + 1 + len(bad_files)
    assert not _study_objects(orthanc, bad_study)  # nothing produced for it

    # Running the same study again replaces: the same SOP Instance UIDs, no duplicates.
    first = sorted(o["sop"] for m in ("SEG", "SR") for o in ct_objs[m])
    routes_before = sum(1 for j in _status(cfg)["jobs"] if j["kind"] == "route")
    result = storescu(ct_files, "127.0.0.1", scp_port, "RADBRIDGE")
    assert result.returncode == 0 and not result.errors
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        jobs = _status(cfg)["jobs"]
        routes = sum(1 for j in jobs if j["kind"] == "route")
        if routes > routes_before and not any(j["state"] in ("PENDING", "RUNNING") for j in jobs):
            break
        time.sleep(0.5)
    else:
        raise AssertionError("the second run did not finish")
    assert all(j["state"] == "SUCCEEDED" for j in _status(cfg)["jobs"] if j["kind"] == "export")
    again = _study_objects(orthanc, ct_study)
    assert sorted(o["sop"] for m in ("SEG", "SR") for o in again[m]) == first

    # No patient identifiers in the service log.
    assert serve.stop() == 0
    log = serve.log_path.read_text()
    assert log.strip(), "serve wrote no log lines"
    for value in (
        PATIENT.name,
        PATIENT.patient_id,
        PATIENT.accession,
        str(cr_ds.PatientName),
        cr_ds.PatientID,
    ):
        assert value and value not in log
