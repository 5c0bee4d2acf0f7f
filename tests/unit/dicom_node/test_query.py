"""The node's Study Root C-FIND / C-MOVE SCP over loopback associations (pynetdicom SCU and a
pynetdicom storage SCP as the move destination); the [scp] and [pull] settings that drive it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind as Find,
)
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelMove as Move,
)
from pynetdicom.sop_class import Verification

from dicom_node.config import settings_from
from radbridge_common.settings import ConfigError
from tests.conftest import StartScp
from tests.peers import free_port


@pytest.fixture
def sink() -> Iterator[tuple[int, list[Dataset]]]:
    """A pynetdicom storage SCP (AE SINK) keeping what it receives in memory."""
    received: list[Dataset] = []

    def store(event: evt.Event) -> int:
        received.append(event.dataset)
        return 0x0000

    ae = AE(ae_title="SINK")
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, store)])
    yield port, received
    server.shutdown()


@pytest.fixture
def node(
    start_node_scp: StartScp, sink: tuple[int, list[Dataset]], small_ct_files: list[Path]
) -> tuple[int, str]:
    """The node's SCP holding the small CT study (sent over C-STORE); (port, study UID)."""
    port, _, _ = start_node_scp(move_destinations={"SINK": f"127.0.0.1:{sink[0]}"})
    assoc = _assoc(port, Find)
    for path in small_ct_files[:4]:
        assert assoc.send_c_store(path).Status == 0x0000
    assoc.release()
    return port, str(pydicom.dcmread(small_ct_files[0], stop_before_pixels=True).StudyInstanceUID)


def _assoc(port: int, model: str):  # noqa: ANN202
    ae = AE(ae_title="QRSCU")
    ae.add_requested_context(model)
    for context in AllStoragePresentationContexts[:100]:
        ae.add_requested_context(context.abstract_syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="RADBRIDGE")
    assert assoc.is_established
    return assoc


def _find(port: int, **keys: object) -> list[tuple[int, Dataset | None]]:
    query = Dataset()
    for keyword, value in keys.items():
        setattr(query, keyword, value)
    assoc = _assoc(port, Find)
    try:
        return [(int(s.Status), ds) for s, ds in assoc.send_c_find(query, Find)]
    finally:
        assoc.release()


def test_image_level_find_matches_on_indexed_attributes(
    node: tuple[int, str], small_ct_files: list[Path]
) -> None:
    port, study_uid = node
    first = pydicom.dcmread(small_ct_files[0], stop_before_pixels=True)
    answers = _find(
        port,
        QueryRetrieveLevel="IMAGE",
        StudyInstanceUID=study_uid,
        SeriesInstanceUID=first.SeriesInstanceUID,
        SOPInstanceUID="",
        SOPClassUID="",
        PatientName="*",
    )
    assert [s for s, _ in answers] == [0xFF00] * 4 + [0x0000]
    found = {str(ds.SOPInstanceUID) for _, ds in answers if ds is not None}
    assert found == {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in small_ct_files[:4]
    }
    identifier = answers[0][1]
    assert identifier is not None and identifier.QueryRetrieveLevel == "IMAGE"
    assert identifier.SOPClassUID == first.SOPClassUID and identifier.PatientName == first.PatientName

    one = _find(port, QueryRetrieveLevel="IMAGE", SOPInstanceUID=first.SOPInstanceUID)  # no upper keys
    assert [s for s, _ in one] == [0xFF00, 0x0000]
    nobody = _find(port, QueryRetrieveLevel="STUDY", PatientName="NOSUCHPATIENT", StudyInstanceUID="")
    assert nobody == [(0x0000, None)]

    name = str(first.PatientName)  # C.2.2.2.1: exact (regardless of case for a name), not a prefix
    for key, found in ((name.lower(), 1), (name[:-1], 0), (name[:-1] + "*", 1)):
        answers = _find(port, QueryRetrieveLevel="STUDY", PatientName=key, StudyInstanceUID="")
        assert [s for s, _ in answers] == [0xFF00] * found + [0x0000], key


def test_a_query_without_a_level_is_refused_with_a_comment(node: tuple[int, str]) -> None:
    port, study_uid = node
    ((status, _),) = _find(port, StudyInstanceUID=study_uid)
    assert status == 0xA900


def test_cmove_of_one_instance_to_a_configured_destination(
    node: tuple[int, str], sink: tuple[int, list[Dataset]], small_ct_files: list[Path]
) -> None:
    port, study_uid = node
    first = pydicom.dcmread(small_ct_files[0])
    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.StudyInstanceUID = study_uid
    query.SeriesInstanceUID = first.SeriesInstanceUID
    query.SOPInstanceUID = first.SOPInstanceUID
    assoc = _assoc(port, Move)
    try:
        responses = list(assoc.send_c_move(query, "SINK", Move))
    finally:
        assoc.release()
    final = responses[-1][0]
    assert int(final.Status) == 0x0000 and int(final.NumberOfCompletedSuboperations) == 1
    assert [str(ds.SOPInstanceUID) for ds in sink[1]] == [str(first.SOPInstanceUID)]
    assert sink[1][0].PixelData == first.PixelData


def test_query_retrieve_can_be_turned_off(start_node_scp: StartScp) -> None:
    port, _, _ = start_node_scp(query_retrieve=False)
    ae = AE(ae_title="QRSCU")
    ae.add_requested_context(Find)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="RADBRIDGE")
    try:
        assert assoc.is_established
        assert [c.abstract_syntax for c in assoc.accepted_contexts] == [Verification]
    finally:
        assoc.release()


def test_settings_of_move_destinations_and_pull_sources() -> None:
    settings = settings_from(
        {
            "scp": {"move_destinations": {"WS": "10.0.0.5:104"}},
            "pull": {
                "sources": {"pacs": {"host": "pacs", "port": 4242, "ae_title": "PACS", "retrieve": "get"}}
            },
        }
    )
    assert settings.scp.move_destinations == {"WS": "10.0.0.5:104"}
    assert settings.pull.sources["pacs"].retrieve == "get" and settings.pull.sources["pacs"].type == "dicom"
    with pytest.raises(ConfigError, match="must be host:port"):
        settings_from({"scp": {"move_destinations": {"WS": "10.0.0.5"}}})
    with pytest.raises(ConfigError, match="not one of move, get"):
        settings_from({"pull": {"sources": {"pacs": {"retrieve": "fetch"}}}})
    with pytest.raises(ConfigError, match="A dicomweb pull source needs an http"):
        settings_from({"pull": {"sources": {"web": {"type": "dicomweb", "url": "pacs/dicom-web"}}}})
    with pytest.raises(ConfigError, match="A pull source's commitment_timeout_s"):  # not "export target"
        settings_from({"pull": {"sources": {"pacs": {"commitment_timeout_s": 0}}}})
    with pytest.raises(ConfigError, match="An export target's commitment_timeout_s"):
        settings_from({"export": {"targets": {"pacs": {"commitment_timeout_s": 0}}}})
    with pytest.raises(ConfigError, match=r"pull\.sources\.web\.token is refused"):
        settings_from({"pull": {"sources": {"web": {"type": "dicomweb", "url": "http://p/", "token": "x"}}}})
