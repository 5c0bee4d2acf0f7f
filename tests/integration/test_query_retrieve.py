"""Query/Retrieve with real peers, both ways.

In: `radbridge pull` fetches a study from Orthanc by C-FIND + C-MOVE (to the
node's own SCP), by C-GET, and by QIDO-RS + WADO-RS, into the spool, where it is
indexed and its analysis queued. Out: dcmtk findscu queries the node's C-FIND SCP
for its studies and result series, and dcmtk movescu moves a result series from
the node to a dcmtk storescp; errors answer with their status.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from dicom_node.config import PullSource
from dicom_node.errors import PullError, StudyNotFound
from dicom_node.index import Index, JobKind, StudyState
from dicom_node.results import ResultWriter
from dicom_node.retrieve import pull_study
from dicom_node.spool import Spool
from dicom_node.volume import read_series
from dicom_node.worker import keep_output
from radbridge.cli import main
from tests import peers
from tests.conftest import StartScp
from tests.peers import (
    DICOMWEB_PLUGIN,
    ORTHANC_BIN,
    OrthancServer,
    assert_valid_dicom_object,
    dcmtk_env,
    free_port,
    missing_tools,
    storescu,
)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("require_dcmtk")]
NODE_AE = "RADBRIDGE"


@pytest.fixture(autouse=True)
def _qr_tools() -> None:
    missing = missing_tools("findscu", "movescu", "storescp")
    if missing:
        pytest.skip(f"dcmtk tools missing: {', '.join(missing)}; apt-get install dcmtk")


def _orthanc(workdir: Path, modalities: dict | None = None) -> OrthancServer:
    if not os.access(ORTHANC_BIN, os.X_OK):
        pytest.skip(f"Orthanc not installed ({ORTHANC_BIN}); apt-get install orthanc")
    if not Path(DICOMWEB_PLUGIN).exists():
        pytest.skip(f"Orthanc DICOMweb plugin missing ({DICOMWEB_PLUGIN}); apt-get install orthanc-dicomweb")
    return OrthancServer(workdir, modalities=modalities)


def _upload(orthanc: OrthancServer, files: list[Path]) -> str:
    result = storescu(files, "127.0.0.1", orthanc.dicom_port, orthanc.aet)
    assert result.returncode == 0 and not result.errors, result.stderr
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def _config(tmp_path: Path, spool: Spool, source: str) -> Path:
    cfg = tmp_path / "radbridge.toml"
    cfg.write_text(f'[scp]\nae_title = "{NODE_AE}"\n\n[spool]\ndirectory = "{spool.root}"\n\n{source}\n')
    return cfg


def _dicom_source(orthanc: OrthancServer, **keys: str) -> str:
    lines = [f'{k} = "{v}"' for k, v in keys.items()]
    return "\n".join(
        [
            "[pull.sources.pacs]",
            'host = "127.0.0.1"',
            f"port = {orthanc.dicom_port}",
            f'ae_title = "{orthanc.aet}"',
            *lines,
        ]
    )


def _assert_pulled(index: Index, study_uid: str, files: list[Path]) -> None:
    """Every instance is indexed as received, the study completed and its routing queued."""
    sent = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    rows = index.study_instances(study_uid)
    assert {r.sop_instance_uid for r in rows} == sent
    for row in rows:
        assert str(pydicom.dcmread(row.path, stop_before_pixels=True).SOPInstanceUID) == row.sop_instance_uid
    study = index.study(study_uid)
    assert study is not None and study["state"] == StudyState.COMPLETE
    assert [j.kind for j in index.jobs(study_uid)] == [JobKind.ROUTE]
    assert "pulled" in [e["event"] for e in index.events(study_uid)]


# -- pull: C-FIND + C-MOVE / C-GET, QIDO-RS + WADO-RS ----------------------------------------
def test_pull_by_cfind_and_cmove_through_the_cli(
    tmp_path: Path, start_node_scp: StartScp, small_ct_files: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    port, spool, index = start_node_scp()
    with _orthanc(tmp_path / "orthanc", {"radbridge": [NODE_AE, "127.0.0.1", port]}) as orthanc:
        study_uid = _upload(orthanc, small_ct_files)
        cfg = _config(tmp_path, spool, _dicom_source(orthanc))
        code = main(["pull", "--config", str(cfg), "--study", study_uid])
        out, err = capsys.readouterr()
    assert code == 0, err
    assert f"{len(small_ct_files)}/{len(small_ct_files)} instance(s) received" in err
    assert f"{len(small_ct_files)} of {len(small_ct_files)} instance(s) received, 0 failed" in out
    _assert_pulled(index, study_uid, small_ct_files)
    assert {r.calling_aet for r in index.study_instances(study_uid)} == {orthanc.aet}


def test_pull_by_accession_number_with_cget(
    tmp_path: Path, small_ct_files: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """C-GET: the instances come back on the pull's own association; no node running, no
    entry for the node at the PACS."""
    spool = Spool(tmp_path / "spool")
    accession = str(pydicom.dcmread(small_ct_files[0], stop_before_pixels=True).AccessionNumber)
    assert accession
    # Orthanc answers C-FIND and C-GET only for the AE titles it knows; the address is not used.
    with _orthanc(tmp_path / "orthanc", {"radbridge": [NODE_AE, "127.0.0.1", free_port()]}) as orthanc:
        study_uid = _upload(orthanc, small_ct_files)
        cfg = _config(tmp_path, spool, _dicom_source(orthanc, retrieve="get"))
        code = main(["pull", "--config", str(cfg), "--accession", accession, "--no-progress"])
        out, err = capsys.readouterr()
    assert code == 0, err
    index = Index(spool.index_path)
    try:
        _assert_pulled(index, study_uid, small_ct_files)
        assert {r.calling_aet for r in index.study_instances(study_uid)} == {orthanc.aet}  # the peer
    finally:
        index.close()


def test_pull_by_qido_and_wado_from_orthanc_dicomweb(tmp_path: Path, small_ct_files: list[Path]) -> None:
    spool = Spool(tmp_path / "spool")
    index = Index(spool.index_path)
    seen: list[tuple[int, int | None]] = []
    try:
        with _orthanc(tmp_path / "orthanc") as orthanc:
            study_uid = _upload(orthanc, small_ct_files)
            source = PullSource(type="dicomweb", url=orthanc.dicomweb_url)
            outcome = pull_study(
                source, spool, index, NODE_AE, study_uid=study_uid, progress=lambda r, e: seen.append((r, e))
            )
        n = len(small_ct_files)
        assert (outcome.expected, outcome.received, outcome.failed, outcome.indexed) == (n, n, 0, n)
        assert seen[-1] == (n, n) and [r for r, _ in seen] == sorted(r for r, _ in seen)
        _assert_pulled(index, study_uid, small_ct_files)
    finally:
        index.close()


def test_post_pull_on_the_node_http_front(tmp_path: Path, small_ct_files: list[Path]) -> None:
    """POST /pull: the same pull over HTTP (write scope), answered when it is over."""
    import requests

    from dicom_node.config import settings_from
    from dicom_node.http import HttpServer, create_app

    spool = Spool(tmp_path / "spool")
    index = Index(spool.index_path)
    try:
        with _orthanc(tmp_path / "orthanc") as orthanc:
            study_uid = _upload(orthanc, small_ct_files)
            settings = settings_from(
                {
                    "spool": {"directory": str(spool.root)},
                    "pull": {"sources": {"web": {"type": "dicomweb", "url": orthanc.dicomweb_url}}},
                }
            )
            server = HttpServer(create_app(settings, spool, index, host="127.0.0.1"), "127.0.0.1", 0)
            url = f"http://127.0.0.1:{server.start()}/pull"
            try:
                ok = requests.post(url, json={"source": "web", "study": study_uid}, timeout=120)
                missing = requests.post(url, json={"study": "1.2.3.4.5"}, timeout=60)
                unknown = requests.post(url, json={"source": "nope", "study": study_uid}, timeout=60)
                bad = requests.post(url, json={"study": "../x"}, timeout=60)
            finally:
                server.stop()
        n = len(small_ct_files)
        assert ok.status_code == 200, ok.text
        assert ok.json() == {
            "source": "web",
            "study_instance_uid": study_uid,
            "expected": n,
            "received": n,
            "failed": 0,
            "indexed": n,
        }
        _assert_pulled(index, study_uid, small_ct_files)
        assert missing.status_code == 404 and "has no study with StudyInstanceUID 1.2.3.4.5" in missing.text
        assert (
            unknown.status_code == 400 and "Unknown pull source 'nope'" in unknown.json()["error"]["message"]
        )
        assert bad.status_code == 400 and "Invalid UID" in bad.json()["error"]["message"]
    finally:
        index.close()


# -- pull errors ----------------------------------------------------------------------------
def test_unknown_study_is_a_clear_cli_error(
    tmp_path: Path, small_ct_files: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    spool = Spool(tmp_path / "spool")
    with _orthanc(tmp_path / "orthanc", {"radbridge": [NODE_AE, "127.0.0.1", free_port()]}) as orthanc:
        _upload(orthanc, small_ct_files[:2])
        cfg = _config(tmp_path, spool, _dicom_source(orthanc))
        code = main(["pull", "--config", str(cfg), "--study", "1.2.3.4.5.6.7", "--no-progress"])
        _, err = capsys.readouterr()
        assert code == 1
        assert (
            f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port} has no study with StudyInstanceUID 1.2.3.4.5.6.7"
            in err
        )
        with pytest.raises(StudyNotFound, match="has no study with AccessionNumber NOPE"):
            pull_study(
                PullSource(type="dicomweb", url=orthanc.dicomweb_url),
                spool,
                Index(spool.index_path),
                NODE_AE,
                accession="NOPE",
            )


def test_move_refusals_are_reported_with_the_pacs_status(
    tmp_path: Path, small_ct_files: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """Orthanc knows RADBRIDGE (at a port where nothing listens), not ELSEWHERE, not STRANGER."""
    spool = Spool(tmp_path / "spool")
    with _orthanc(tmp_path / "orthanc", {"radbridge": [NODE_AE, "127.0.0.1", free_port()]}) as orthanc:
        study_uid = _upload(orthanc, small_ct_files[:2])
        runs = {}
        for name, keys in {
            "unknown destination": {"move_destination": "ELSEWHERE"},
            "node not running": {},
            "unknown caller": {"calling_ae_title": "STRANGER"},
        }.items():
            cfg = _config(tmp_path, spool, _dicom_source(orthanc, **keys))
            code = main(["pull", "--config", str(cfg), "--study", study_uid, "--no-progress"])
            runs[name] = (code, capsys.readouterr().err)
    assert all(code == 1 for code, _ in runs.values()), runs
    err = runs["unknown destination"][1]
    assert "refused the C-MOVE: status 0x" in err and "move destination 'ELSEWHERE'" in err, err
    assert "refused the C-MOVE: status 0x" in runs["node not running"][1], runs
    assert "calling AE title 'STRANGER'" in runs["unknown caller"][1], runs
    index = Index(spool.index_path)
    try:
        assert index.study_instances(study_uid) == [] and index.jobs() == []
    finally:
        index.close()


def test_an_unreachable_pacs_is_named(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    index = Index(spool.index_path)
    port = free_port()
    try:
        with pytest.raises(
            PullError,
            match=rf"(Cannot connect to|unreachable).*PACS@127\.0\.0\.1:{port}|PACS@127\.0\.0\.1:{port}.*unreachable",
        ):
            pull_study(
                PullSource(host="127.0.0.1", port=port, ae_title="PACS"),
                spool,
                index,
                NODE_AE,
                study_uid="1.2.3",
            )
        with pytest.raises(PullError, match=rf"Cannot reach QIDO-RS at 127\.0\.0\.1:{port}"):
            pull_study(
                PullSource(type="dicomweb", url=f"http://127.0.0.1:{port}/dicom-web"),
                spool,
                index,
                NODE_AE,
                study_uid="1.2.3",
            )
    finally:
        index.close()


# -- the node as C-FIND / C-MOVE SCP ---------------------------------------------------------
@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """dcmtk storescp (AE STORESCP) on a free loopback port, writing into a directory."""
    out = tmp_path / "storescp"
    with peers.storescp(out) as port:
        yield port, out


@pytest.fixture
def node_with_results(
    start_node_scp: StartScp, storescp: tuple[int, Path], small_ct_files: list[Path]
) -> tuple[int, Index, dict[str, pydicom.Dataset]]:
    """The node's SCP holding a received CT study and the SEG/SR it wrote for it (as the worker
    keeps them); scp.move_destinations knows the storescp. Returns (port, index, results by kind)."""
    from tests.reference_run import analyze_reference

    port, spool, index = start_node_scp(move_destinations={"STORESCP": f"127.0.0.1:{storescp[0]}"})
    result = storescu(small_ct_files, "127.0.0.1", port, NODE_AE)
    assert result.returncode == 0 and not result.errors, result.stderr
    vol = read_series(small_ct_files)
    outcome = analyze_reference(vol)
    results = {}
    for obj in ResultWriter(vol.sources, outcome.result, outcome.masks).build_all():
        keep_output(spool, index, obj.kind, obj.dataset)
        results[obj.kind] = obj.dataset
    assert {"seg", "measurements", "narrative"} <= set(results)
    return port, index, results


def _findscu(port: int, out: Path, *keys: str) -> list[pydicom.Dataset]:
    out.mkdir(exist_ok=True)
    args = ["findscu", "-S", "-aet", "FINDSCU", "-aec", NODE_AE, "-X", "-od", str(out)]
    for key in keys:
        args += ["-k", key]
    proc = subprocess.run(
        [*args, "127.0.0.1", str(port)], capture_output=True, text=True, env=dcmtk_env(), timeout=60
    )
    errors = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith(("E:", "F:"))]
    assert proc.returncode == 0 and not errors, proc.stdout + proc.stderr
    return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def _movescu(port: int, destination: str, *keys: str) -> str:
    args = ["movescu", "-S", "-v", "-aet", "MOVESCU", "-aec", NODE_AE, "-aem", destination]
    for key in keys:
        args += ["-k", key]
    proc = subprocess.run(
        [*args, "127.0.0.1", str(port)], capture_output=True, text=True, env=dcmtk_env(), timeout=60
    )
    return proc.stdout + proc.stderr


def test_findscu_finds_the_study_and_its_result_series(
    tmp_path: Path,
    node_with_results: tuple[int, Index, dict[str, pydicom.Dataset]],
    small_ct_files: list[Path],
) -> None:
    port, _, results = node_with_results
    study_uid = str(results["seg"].StudyInstanceUID)
    studies = _findscu(
        port,
        tmp_path / "studies",
        "QueryRetrieveLevel=STUDY",
        "StudyInstanceUID",
        "ModalitiesInStudy",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
        "RetrieveAETitle",
    )
    assert len(studies) == 1
    study = studies[0]
    assert study.StudyInstanceUID == study_uid and study.QueryRetrieveLevel == "STUDY"
    assert {"CT", "SEG", "SR"} <= set(study.ModalitiesInStudy)
    assert int(study.NumberOfStudyRelatedInstances) == len(small_ct_files) + len(results)
    assert study.RetrieveAETitle == NODE_AE

    series = _findscu(
        port,
        tmp_path / "series",
        "QueryRetrieveLevel=SERIES",
        f"StudyInstanceUID={study_uid}",
        "SeriesInstanceUID",
        "Modality",
        "NumberOfSeriesRelatedInstances",
    )
    by_uid = {str(s.SeriesInstanceUID): s for s in series}
    for obj in results.values():
        assert by_uid[str(obj.SeriesInstanceUID)].Modality == obj.Modality
    assert str(pydicom.dcmread(small_ct_files[0], stop_before_pixels=True).SeriesInstanceUID) in by_uid

    segs = _findscu(
        port,
        tmp_path / "seg",
        "QueryRetrieveLevel=SERIES",
        f"StudyInstanceUID={study_uid}",
        "SeriesInstanceUID",
        "Modality=SEG",
    )
    assert [str(s.SeriesInstanceUID) for s in segs] == [str(results["seg"].SeriesInstanceUID)]
    nothing = _findscu(port, tmp_path / "none", "QueryRetrieveLevel=STUDY", "StudyInstanceUID=1.2.3.999")
    assert nothing == []
    name = str(pydicom.dcmread(small_ct_files[0], stop_before_pixels=True).PatientName)
    prefix = _findscu(port, tmp_path / "prefix", "QueryRetrieveLevel=STUDY", f"PatientName={name[:-1]}")
    assert prefix == []  # a person name matches exactly, not as a prefix (PS3.4 C.2.2.2.1)
    exact = _findscu(port, tmp_path / "exact", "QueryRetrieveLevel=STUDY", f"PatientName={name.upper()}")
    assert [str(s.StudyInstanceUID) for s in exact] == [study_uid]


def test_movescu_moves_a_result_series_to_storescp(
    node_with_results: tuple[int, Index, dict[str, pydicom.Dataset]], storescp: tuple[int, Path]
) -> None:
    port, _, results = node_with_results
    seg = results["seg"]
    out = _movescu(
        port,
        "STORESCP",
        "QueryRetrieveLevel=SERIES",
        f"StudyInstanceUID={seg.StudyInstanceUID}",
        f"SeriesInstanceUID={seg.SeriesInstanceUID}",
    )
    received = list(storescp[1].iterdir())
    assert len(received) == 1, out
    moved = pydicom.dcmread(received[0])
    assert moved.SOPInstanceUID == seg.SOPInstanceUID and moved.Modality == "SEG"
    assert_valid_dicom_object(received[0])


def test_an_unknown_move_destination_is_refused_with_a801(
    node_with_results: tuple[int, Index, dict[str, pydicom.Dataset]], storescp: tuple[int, Path]
) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as Move

    port, _, results = node_with_results
    out = _movescu(
        port, "NOBODY", "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={results['seg'].StudyInstanceUID}"
    )
    assert "Refused: MoveDestinationUnknown" in out, out  # dcmtk's name for 0xA801
    ae = AE(ae_title="MOVESCU")
    ae.add_requested_context(Move)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    try:
        query = pydicom.Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = str(results["seg"].StudyInstanceUID)
        statuses = [int(s.Status) for s, _ in assoc.send_c_move(query, "NOBODY", Move)]
        assert statuses == [0xA801]
        query.StudyInstanceUID = ""  # no unique key: refused with a comment, nothing sent
        responses = list(assoc.send_c_move(query, "STORESCP", Move))
        assert int(responses[-1][0].Status) == 0xA900
        assert "needs StudyInstanceUID" in str(responses[-1][0].ErrorComment)
    finally:
        assoc.release()
    assert list(storescp[1].iterdir()) == []
