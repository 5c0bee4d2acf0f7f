"""20+ SIGKILLs of `radbridge serve` while studies stream in: nothing acknowledged is lost, and every
study's results reach Orthanc exactly once (see tests/chaos/harness.py for what that means).

More cycles by hand: ``TCP_NODELAY=1 python -m tests.chaos.harness --kills 50 --studies 24 --seed 7``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pydicom
import pytest

from radbridge.synth import ct_series, write_series
from tests.chaos.harness import JobsView, _orthanc_results, _seg_references, run_harness
from tests.e2e.test_pipeline import Serve, _config
from tests.peers import DICOMWEB_PLUGIN, ORTHANC_BIN, OrthancServer, free_port, storescu

pytestmark = [
    pytest.mark.chaos,
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.usefixtures("require_dcmtk"),
]
KILLS = 20
STUDIES = 12
SEED = 20240611


def test_twenty_kills_lose_nothing_and_export_once(tmp_path: Path) -> None:
    if not os.access(ORTHANC_BIN, os.X_OK) or not Path(DICOMWEB_PLUGIN).exists():
        pytest.skip(
            "Orthanc with its DICOMweb plugin is not installed; apt-get install orthanc orthanc-dicomweb"
        )
    figures = run_harness(tmp_path, kills=KILLS, studies=STUDIES, seed=SEED)

    assert figures.kills >= KILLS
    assert figures.acknowledged == figures.instances, figures.table()
    assert figures.lost == 0, figures.table()
    assert figures.duplicates == 0, figures.table()
    assert figures.studies_completed == figures.studies == STUDIES, figures.table()
    assert not figures.problems, figures.table()


def test_reanalysed_study_replaces_its_results_at_the_destination(
    tmp_path: Path, orthanc: OrthancServer
) -> None:
    """What the harness found with a quiet window shorter than a restart (``--quiet-window 0.5``):
    a study completed early (here: by a late instance, no kill needed) is analysed again on the
    whole series, and the node re-exports objects with the *same* SOP Instance UIDs; Orthanc keeps
    the copy it has, so the destination holds results of the first instance only while every
    export job says SUCCEEDED. completion.py promises "results replace earlier ones".
    """
    port = free_port()
    cfg = _config(tmp_path, port, orthanc, quiet_window_s=1.0)
    datasets = ct_series(n_slices=16, seed=77)
    files = write_series(datasets, tmp_path / "ct")
    study = str(datasets[0].StudyInstanceUID)
    jobs = JobsView(tmp_path / "spool" / "index.sqlite3")
    serve = Serve(cfg, tmp_path / "serve.log")

    def settled(n_routes: int) -> bool:
        rows = jobs.jobs()
        return sum(r["kind"] == "route" for r in rows) >= n_routes and all(
            r["state"] == "SUCCEEDED" for r in rows
        )

    try:
        assert not storescu(files[:1], "127.0.0.1", port, "RADBRIDGE").errors
        deadline = time.monotonic() + 120
        while not (settled(1) and len(_orthanc_results(orthanc, study).get("SR", [])) == 3):
            assert time.monotonic() < deadline, "the first results never reached Orthanc"
            time.sleep(0.5)
        assert not storescu(files[1:], "127.0.0.1", port, "RADBRIDGE").errors  # late instances
        while not settled(2):
            assert time.monotonic() < deadline, "the study was not analysed again"
            time.sleep(0.5)
        (seg,) = _orthanc_results(orthanc, study)["SEG"]
        node_seg = next(r for r in jobs.instances("output") if r["modality"] == "SEG")
        node_refs = pydicom.dcmread(node_seg["path"], stop_before_pixels=True).ReferencedSeriesSequence[0]
        assert len(node_refs.ReferencedInstanceSequence) == len(files)  # the node's own copy is whole
        assert len(_seg_references(orthanc, study, seg)) == len(files), (
            "Orthanc still holds the SEG of the first analysis (same SOP Instance UID re-sent)"
        )
    finally:
        jobs.close()
        serve.stop()
