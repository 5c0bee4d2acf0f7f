"""A late image: the study was analysed and delivered, then one more slice arrives.

The node re-analyses the series and delivers a revised result set: a new SEG over all the images
and new SRs whose PredecessorDocumentsSequence names the earlier SR of the same kind; the study's
history says why. Nothing earlier is overwritten (new SOP Instance UIDs, same series).
"""

from __future__ import annotations

import time
from pathlib import Path

import highdicom as hd
import pydicom
import pytest

from radbridge.synth import ct_series, write_series
from tests.e2e.test_pipeline import Serve, _config, _study_objects, _wait_for_outputs, study_status
from tests.peers import OrthancServer, assert_valid_dicom_object, free_port, storescu

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.usefixtures("require_dcmtk", "require_dicom3tools"),
]


def test_late_image_gives_a_revised_result_set(tmp_path: Path, orthanc: OrthancServer) -> None:
    port = free_port()
    cfg = _config(tmp_path, port, orthanc)
    files = write_series(ct_series(n_slices=16, seed=51), tmp_path / "ct")
    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    serve = Serve(cfg, tmp_path / "serve.log")
    try:
        assert storescu(files[:-1], "127.0.0.1", port, "RADBRIDGE").returncode == 0
        first = _wait_for_outputs(orthanc, study, {"SEG": 1, "SR": 3})
        time.sleep(1.0)
        assert storescu(files[-1:], "127.0.0.1", port, "RADBRIDGE").returncode == 0  # the late slice
        objs = _wait_for_outputs(orthanc, study, {"SEG": 2, "SR": 6})
        time.sleep(2.0)  # nothing more should come
        objs = _study_objects(orthanc, study)
        assert len(objs["SEG"]) == 2 and len(objs["SR"]) == 6
    finally:
        assert serve.stop() == 0

    def fetch(sop: str, name: str) -> pydicom.Dataset:
        (inst,) = [i for objs_ in objs.values() for i in objs_ if i["sop"] == sop]
        path = tmp_path / name
        path.write_bytes(orthanc.instance_file(inst["id"]))
        assert_valid_dicom_object(path)
        return pydicom.dcmread(path)

    old_sops = {i["sop"] for i in first["SEG"] + first["SR"]}
    new_srs = [fetch(i["sop"], f"sr-{n}.dcm") for n, i in enumerate(objs["SR"]) if i["sop"] not in old_sops]
    old_srs = {
        fetch(sop, f"old-{n}.dcm").SeriesNumber: sop
        for n, sop in enumerate(old_sops - {first["SEG"][0]["sop"]})
    }
    assert len(new_srs) == 3
    for sr in new_srs:
        assert sr.InstanceNumber == 2
        (predecessor,) = [
            ref.ReferencedSOPInstanceUID
            for study_ref in sr.PredecessorDocumentsSequence
            for series_ref in study_ref.ReferencedSeriesSequence
            for ref in series_ref.ReferencedSOPSequence
        ]
        assert predecessor == old_srs[sr.SeriesNumber]  # same kind, same series, the earlier instance
    (new_seg,) = [i for i in objs["SEG"] if i["sop"] not in old_sops]
    seg = hd.seg.Segmentation.from_dataset(fetch(new_seg["sop"], "seg-new.dcm"))
    sources = {
        str(ref.ReferencedSOPInstanceUID)
        for s in seg.ReferencedSeriesSequence
        for ref in s.ReferencedInstanceSequence
    }
    assert len(sources) == 16  # the late slice included
    events = [e["event"] for e in study_status(cfg, study)[0]["history"]]
    assert "reopened" in events and "analysis revised" in events
    assert events.index("reopened") < events.index("analysis revised")
