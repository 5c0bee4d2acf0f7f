"""A study whose images carry malformed values still gets its results, valid DICOM.

Archives hold such images every day ("1941-09-23" for a birth date, "10:20:30" for a time, a
lower-case or unknown sex, "0,7\\0,7" for a pixel spacing, an unknown character set). highdicom
refuses them, which had lost the whole analysis of the series, and the volume had read the
spacing as unknown; the writers now get repaired values and the reader reads the decimal comma
(dicom_node.source_values). Here the analysis runs
through the worker with the reference engine in process, key images included, and every object
it writes passes dciodvfy (and dsrdump for the SRs) and reads back with highdicom.
"""

from __future__ import annotations

import logging
from pathlib import Path

import highdicom as hd
import pydicom
import pytest

from dicom_node.config import NodeSettings, RoutingRule, RoutingSection, RuleMatch, SpoolSection
from dicom_node.index import Index, JobState
from dicom_node.spool import Spool
from dicom_node.volume import read_series
from dicom_node.worker import StepContext, run_job
from radbridge.synth import ct_series, write_series
from tests.dicom_fixtures import CONFORMED, MALFORMED, MALFORMED_WARNINGS, index_series, set_raw
from tests.peers import assert_valid_dicom_object
from tests.reference_run import analyze_reference

pytestmark = [
    pytest.mark.integration,
    pytest.mark.usefixtures("require_dcmtk", "require_dicom3tools"),
    pytest.mark.filterwarnings(*MALFORMED_WARNINGS),
]
#: What every result object carries instead (the pixel spacing is the SEG's alone: below).
TOP_LEVEL = ("PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "SpecificCharacterSet")


def _malformed_series(directory: Path) -> list[Path]:
    files = write_series(ct_series(n_slices=16, seed=5), directory)
    for path in files:
        ds = pydicom.dcmread(path)
        for keyword, text in MALFORMED.items():
            set_raw(ds, keyword, text)
        ds.save_as(path, enforce_file_format=True)
    return files


class _InProcessClient:
    """The reference engine's answer for the series, as the node's gRPC client would return it."""

    address = "in-process"

    def __init__(self, files: list[Path]) -> None:
        volume = read_series(files)
        self.spacing = volume.spacing_mm
        self.outcome = analyze_reference(volume)

    def analyze_upload(self, *args: object, **kwargs: object):  # noqa: ANN201
        return self.outcome

    def close(self) -> None:
        pass


def test_malformed_patient_and_study_values_do_not_lose_the_results(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = _malformed_series(tmp_path / "ct")
    client = _InProcessClient(files)
    rule = RoutingRule(name="ct", match=RuleMatch(modality=["CT"]), key_images=True)
    settings = NodeSettings(spool=SpoolSection(tmp_path / "spool"), routing=RoutingSection(rules=[rule]))
    spool = Spool(tmp_path / "spool")
    ctx = StepContext(settings, spool, Index(spool.index_path), client_factory=lambda: client)
    study = index_series(ctx.index, files)
    ctx.index.complete_study(study, 1.0, now=10.0)

    with caplog.at_level(logging.DEBUG):
        assert run_job(ctx.index.claim_job(), ctx) is JobState.SUCCEEDED  # route
        assert run_job(ctx.index.claim_job(), ctx) is JobState.SUCCEEDED  # analyze

    outputs = sorted(ctx.spool.output_dir(study).iterdir())
    kinds = {p.name.split("-")[0] for p in outputs}
    assert {"seg", "measurements", "keyslices", "narrative", "keyimages"} <= kinds, kinds
    for path in outputs:
        assert_valid_dicom_object(path)
        ds = pydicom.dcmread(path)
        for keyword in TOP_LEVEL:
            assert keyword in ds and (ds[keyword].value or None) == CONFORMED[keyword], (path.name, keyword)
        assert ds.PatientID == pydicom.dcmread(files[0], stop_before_pixels=True).PatientID
    seg = hd.seg.Segmentation.from_dataset(
        pydicom.dcmread(next(p for p in outputs if p.name.startswith("seg-")))
    )
    assert seg.number_of_segments >= 1
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert list(measures.PixelSpacing) == CONFORMED["PixelSpacing"]
    assert client.spacing == pytest.approx((2.5, 0.7, 0.7))  # what the analysis measured with
    sr = next(p for p in outputs if p.name.startswith("measurements-"))
    assert hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(sr)).StudyDate == "20240102"

    events = {e["event"]: e["detail"] for e in ctx.index.events(study)}
    assert events["source values repaired"].endswith(", ".join(sorted(MALFORMED)))
    ours = [r for r in caplog.records if r.name.startswith("dicom_node")]
    logged = "\n".join(r.getMessage() + str(r.__dict__) for r in ours)
    written = next(r for r in ours if getattr(r, "event", "") == "analyze.written")
    assert written.repaired_values == ", ".join(sorted(MALFORMED))  # the keywords are said ...
    for text in MALFORMED.values():  # ... the values are patient data and are not
        if len(text) > 2:
            assert text not in logged and text not in events["source values repaired"]
    assert pydicom.dcmread(files[0]).get_item("PatientBirthDate").value == b"1941-09-23"  # spool untouched
