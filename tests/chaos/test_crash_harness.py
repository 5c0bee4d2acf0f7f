"""20+ SIGKILLs of `radbridge serve` while studies stream in: nothing acknowledged is lost, and every
study's results reach Orthanc exactly once (see tests/chaos/harness.py for what that means).

More cycles by hand: ``TCP_NODELAY=1 python -m tests.chaos.harness --kills 50 --studies 24 --seed 7``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.chaos.harness import run_harness
from tests.peers import DICOMWEB_PLUGIN, ORTHANC_BIN

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
