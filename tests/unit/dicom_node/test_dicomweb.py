"""The read-only DICOMweb of the spool (QIDO-RS, WADO-RS) over real HTTP on loopback.

One server per module, filled through the real ingest paths: STOW-RS by
dicomweb-client for received instances, ``Index.add_output`` (as
``worker.run_analyze`` does) for a SEG and two SRs written by ``ResultWriter``.
Queried with dicomweb-client and httpx; every answer is compared exactly.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames

from dicom_node.config import NodeSettings, SpoolSection
from dicom_node.http import HttpServer, create_app
from dicom_node.index import Index
from dicom_node.results import ResultWriter
from dicom_node.spool import Spool
from dicom_node.worker import keep_output
from protos.radbridge.v1 import inference_pb2 as pb
from radbridge.synth import SyntheticPatient, ct_series

STUDY_UID = "0020000D"
SERIES_UID = "0020000E"
SOP_UID = "00080018"
MODALITY = "00080060"
MODALITIES_IN_STUDY = "00080061"
STUDY_SERIES = "00201206"
STUDY_INSTANCES = "00201208"
SERIES_INSTANCES = "00201209"
RETRIEVE_URL = "00081190"
PIXEL_DATA = "7FE00010"
CONTENT_SEQUENCE = "0040A730"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
ANY_SYNTAX = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
TINY = (11, 13)  # rows x columns of the SEG's source: 143 pixels, not a multiple of 8


@dataclass
class Node:
    """The running server, its spool and index, and everything put into it."""

    port: int
    spool: Spool
    index: Index
    studies: dict[str, list[Dataset]]  # name -> the instances sent (in order)
    outputs: dict[str, Dataset]  # ResultWriter kind -> the object written

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/dicom-web"

    def client(self) -> DICOMwebClient:
        return DICOMwebClient(url=self.url)

    def uid(self, name: str) -> str:
        return str(self.studies[name][0].StudyInstanceUID)


def _testdata(name: str) -> Dataset:
    return pydicom.dcmread(get_testdata_file(name))


def _tiny_ct() -> list[Dataset]:
    """A 3-slice CT of 11 x 13 pixels (cut from the synthetic phantom), its own patient and study."""
    patient = SyntheticPatient(name="Roe^Richard", patient_id="RB-TINY", accession="RBACC0003")
    out = []
    for ds in ct_series(n_slices=3, patient=patient, seed=3):
        rows, cols = TINY
        full = np.frombuffer(ds.PixelData, dtype="<u2").reshape(int(ds.Rows), int(ds.Columns))
        ds.Rows, ds.Columns = rows, cols
        ds.PixelData = np.ascontiguousarray(full[250 : 250 + rows, 200 : 200 + cols]).tobytes()
        out.append(ds)
    return out


def _outputs(sources: list[Dataset]) -> dict[str, Dataset]:
    """A two-segment BINARY SEG (6 frames), a key-slice TID 1500 SR and a narrative SR."""
    rng = np.random.default_rng(5)
    first = rng.random((len(sources), *TINY)) > 0.5
    masks = {1: first, 2: ~first}  # non-overlapping; every frame non-empty

    def code(value: str, meaning: str) -> pb.Code:
        return pb.Code(value=value, scheme="SCT", meaning=meaning)

    anatomy = code("91723000", "Anatomical Structure")
    result = pb.AnalysisResult(
        model=pb.ModelIdentity(name="unit-model", backend="test", version="0.1"),
        tasks=[
            pb.TaskResult(
                task=pb.TASK_KIND_SEGMENT,
                masks=[
                    pb.MaskInfo(
                        segment_number=1, label="Lung", category=anatomy, type=code("39607008", "Lung")
                    ),
                    pb.MaskInfo(
                        segment_number=2, label="Nodule", category=anatomy, type=code("27925004", "Nodule")
                    ),
                ],
            ),
            pb.TaskResult(
                task=pb.TASK_KIND_REPORT,
                # a finding longer than the bulk-data threshold: text stays inline all the same
                report=pb.ReportText(findings="Lungs clear. " * 100, impression="Normal.", language="en"),
            ),
        ],
    )
    return {o.kind: o.dataset for o in ResultWriter(sources, result, masks).build_all()}


def _add_output(spool: Spool, index: Index, kind: str, ds: Dataset) -> None:
    """Write and index one output object exactly as ``worker.run_analyze`` does."""
    keep_output(spool, index, kind, ds)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    root = tmp_path_factory.mktemp("dicomweb")
    settings = NodeSettings(spool=SpoolSection(directory=root))
    spool = Spool(root)
    index = Index(spool.index_path)
    server = HttpServer(create_app(settings, spool, index), "127.0.0.1", 0)
    port = server.start()
    jane = ct_series(n_slices=3, patient=SyntheticPatient(name="Doe^Jane", patient_id="RB-A"), seed=1)
    john = ct_series(n_slices=2, patient=SyntheticPatient(name="Doe^John", patient_id="RB-B"), seed=2)
    for ds in john:
        ds.StudyDate = "20250615"
    studies = {  # one STOW request each, in this order: QIDO lists studies in arrival order
        "jane": jane,
        "john": john,
        "tiny": _tiny_ct(),
        "ct_small": [_testdata("CT_small.dcm")],  # 20040119, explicit VR LE
        "mr_small": [_testdata("MR_small.dcm")],  # 20040826
        "j2k": [_testdata("693_J2KI.dcm")],  # no StudyDate, JPEG 2000
    }
    client = DICOMwebClient(url=f"http://127.0.0.1:{port}/dicom-web")
    for datasets in studies.values():
        response = client.store_instances([copy.deepcopy(ds) for ds in datasets])
        assert len(response.ReferencedSOPSequence) == len(datasets)
    outputs = _outputs(studies["tiny"])
    for kind, ds in outputs.items():
        _add_output(spool, index, kind, ds)
    yield Node(port, spool, index, studies, outputs)
    server.stop()
    index.close()


# -- helpers ------------------------------------------------------------------------------
def _uids(docs: list[dict[str, Any]], tag: str = STUDY_UID) -> list[str]:
    return [doc[tag]["Value"][0] for doc in docs]


def _qido(node: Node, path: str, **params: Any) -> list[dict[str, Any]]:
    r = httpx.get(f"{node.url}{path}", params=params, headers={"Accept": "application/dicom+json"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/dicom+json")
    return r.json()


def _parts(response: httpx.Response) -> list[tuple[str, bytes]]:
    """(Content-Type, body) of each part of a multipart/related response."""
    content_type = response.headers["content-type"]
    assert content_type.startswith("multipart/related")
    boundary = next(
        p.split("=", 1)[1].strip('"') for p in content_type.split(";") if p.strip().startswith("boundary=")
    )
    body = b"\r\n" + response.content
    pieces = body.split(b"\r\n--" + boundary.encode())
    assert pieces[0] == b"" and pieces[-1] == b"--\r\n", "malformed multipart framing"
    out = []
    for piece in pieces[1:-1]:
        head, data = piece[2:].split(b"\r\n\r\n", 1)
        headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n"))
        out.append((headers["Content-Type"], data))
    return out


def _little_endian(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def _instance_url(node: Node, ds: Dataset) -> str:
    return (
        f"{node.url}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}"
    )


def _spooled_path(node: Node, ds: Dataset) -> Path:
    (inst,) = node.index.search_instances(
        str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
    )
    return inst.path


# -- QIDO-RS: studies ----------------------------------------------------------------------
def test_search_studies_without_filter_lists_all_in_arrival_order(node: Node) -> None:
    docs = node.client().search_for_studies()
    assert _uids(docs) == [node.uid(n) for n in ("jane", "john", "tiny", "ct_small", "mr_small", "j2k")]
    jane = docs[0]
    assert jane == {
        "00080005": {"vr": "CS", "Value": ["ISO_IR 100"]},
        "00080020": {"vr": "DA", "Value": ["20260101"]},
        "00080030": {"vr": "TM", "Value": ["120000"]},
        "00080050": {"vr": "SH", "Value": ["RBACC0001"]},
        "00080090": {"vr": "PN"},
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe^Jane"}]},
        "00100020": {"vr": "LO", "Value": ["RB-A"]},
        "00100030": {"vr": "DA", "Value": ["19700101"]},
        "00100040": {"vr": "CS", "Value": ["O"]},
        STUDY_UID: {"vr": "UI", "Value": [node.uid("jane")]},
        "00200010": {"vr": "SH", "Value": ["1"]},
        "00081030": {"vr": "LO", "Value": ["CT CHEST (synthetic phantom)"]},
        MODALITIES_IN_STUDY: {"vr": "CS", "Value": ["CT"]},
        STUDY_SERIES: {"vr": "IS", "Value": [1]},
        STUDY_INSTANCES: {"vr": "IS", "Value": [3]},
        RETRIEVE_URL: {"vr": "UR", "Value": [f"{node.url}/studies/{node.uid('jane')}"]},
    }


def test_search_studies_by_patient_id(node: Node) -> None:
    docs = node.client().search_for_studies(search_filters={"PatientID": "RB-B"})
    assert _uids(docs) == [node.uid("john")]
    assert _uids(_qido(node, "/studies", **{"00100020": "1CT1"})) == [node.uid("ct_small")]  # by tag
    assert _qido(node, "/studies", PatientID="RB") == []  # no wildcard: exact


def test_search_studies_by_a_list_of_study_uids(node: Node) -> None:
    wanted = f"{node.uid('mr_small')},{node.uid('jane')}"
    docs = node.client().search_for_studies(search_filters={"StudyInstanceUID": wanted})
    assert _uids(docs) == [node.uid("jane"), node.uid("mr_small")]
    backslash = _qido(node, "/studies", StudyInstanceUID=f"{node.uid('j2k')}\\{node.uid('john')}")
    assert _uids(backslash) == [node.uid("john"), node.uid("j2k")]


def test_search_studies_by_patient_name_wildcard(node: Node) -> None:
    client = node.client()
    assert _uids(client.search_for_studies(search_filters={"PatientName": "Doe*"})) == [
        node.uid("jane"),
        node.uid("john"),
    ]
    assert _uids(client.search_for_studies(search_filters={"PatientName": "Doe^J?hn"})) == [node.uid("john")]
    assert _uids(client.search_for_studies(search_filters={"PatientName": "*Samples^MR*"})) == [
        node.uid("mr_small")
    ]
    assert client.search_for_studies(search_filters={"PatientName": "Smith*"}) == []


def test_person_names_match_exactly_unless_fuzzy_matching_is_asked(node: Node) -> None:
    """PS3.4 C.2.2.2.1: a value matches exactly (person names regardless of case); QIDO-RS
    fuzzymatching=true (OHIF sends it) makes a name a prefix and other text case-blind."""
    assert _qido(node, "/studies", PatientName="Doe") == []  # not "Doe^Jane" nor "Doe^John"
    assert _qido(node, "/studies", PatientName="Doe^Ja") == []
    assert _uids(_qido(node, "/studies", PatientName="doe^JANE")) == [node.uid("jane")]
    assert _uids(_qido(node, "/studies", PatientName="Doe^Jane^^")) == [node.uid("jane")]  # empty components
    fuzzy = {"fuzzymatching": "true"}
    assert _uids(_qido(node, "/studies", PatientName="doe", **fuzzy)) == [node.uid("jane"), node.uid("john")]
    assert _uids(_qido(node, "/studies", PatientName="Doe^Ja", **fuzzy)) == [node.uid("jane")]
    assert _qido(node, "/studies", PatientName="doe", fuzzymatching="false") == []


def test_other_text_matches_case_sensitively_and_brackets_are_literal(node: Node) -> None:
    chest = _uids(_qido(node, "/studies", StudyDescription="*CHEST*"))
    assert node.uid("jane") in chest
    assert _qido(node, "/studies", StudyDescription="*chest*") == []
    assert _uids(_qido(node, "/studies", StudyDescription="*chest*", fuzzymatching="true")) == chest
    assert _qido(node, "/studies", PatientName="Doe^[JK]ane") == []  # not a character class


def test_search_studies_by_study_date_range(node: Node) -> None:
    client = node.client()

    def by_date(value: str) -> list[str]:
        return _uids(client.search_for_studies(search_filters={"StudyDate": value}))

    assert by_date("20250101-20251231") == [node.uid("john")]
    assert by_date("20040101-20041231") == [node.uid("ct_small"), node.uid("mr_small")]
    assert by_date("20040119-20040119") == [node.uid("ct_small")]  # bounds are inclusive
    assert by_date("-20050101") == [node.uid("ct_small"), node.uid("mr_small")]
    assert by_date("20260101-") == [node.uid("jane"), node.uid("tiny")]
    assert by_date("20040826") == [node.uid("mr_small")]  # a single date
    assert by_date("19000101-21000101") == [  # the study without a StudyDate never matches
        node.uid(n) for n in ("jane", "john", "tiny", "ct_small", "mr_small")
    ]


def test_search_studies_by_modalities_in_study(node: Node) -> None:
    client = node.client()
    assert _uids(client.search_for_studies(search_filters={"ModalitiesInStudy": "MR"})) == [
        node.uid("mr_small")
    ]
    assert _uids(client.search_for_studies(search_filters={"ModalitiesInStudy": "SEG"})) == [
        node.uid("tiny")  # the output SEG counts
    ]
    assert _uids(_qido(node, "/studies", ModalitiesInStudy="MR,SEG")) == [
        node.uid("tiny"),
        node.uid("mr_small"),
    ]
    assert client.search_for_studies(search_filters={"ModalitiesInStudy": "US"}) == []


def test_search_studies_limit_and_offset(node: Node) -> None:
    client = node.client()
    order = [node.uid(n) for n in ("jane", "john", "tiny", "ct_small", "mr_small", "j2k")]
    assert _uids(client.search_for_studies(limit=2)) == order[:2]
    assert _uids(client.search_for_studies(limit=2, offset=2)) == order[2:4]
    assert _uids(client.search_for_studies(offset=5)) == order[5:]
    assert client.search_for_studies(offset=6) == []
    filtered = client.search_for_studies(limit=1, offset=1, search_filters={"PatientName": "Doe*"})
    assert _uids(filtered) == [node.uid("john")]  # paging applies after matching


def test_outputs_add_their_modality_and_counts_to_the_study(node: Node) -> None:
    (doc,) = node.client().search_for_studies(search_filters={"StudyInstanceUID": node.uid("tiny")})
    assert doc[MODALITIES_IN_STUDY] == {"vr": "CS", "Value": ["CT", "SEG", "SR"]}
    assert doc[STUDY_SERIES] == {"vr": "IS", "Value": [4]}  # CT + SEG + key-slice SR + narrative SR
    assert doc[STUDY_INSTANCES] == {"vr": "IS", "Value": [6]}  # 3 CT + 3 outputs
    assert doc["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "Roe^Richard"}]}  # from a received one


def test_search_series_of_a_study(node: Node) -> None:
    study = node.uid("tiny")
    docs = node.client().search_for_series(study)
    ct, outputs = node.studies["tiny"][0], node.outputs
    expected = [
        (ct.SeriesInstanceUID, "CT", 2, 3),
        (outputs["seg"].SeriesInstanceUID, "SEG", 9701, 1),
        (outputs["keyslices"].SeriesInstanceUID, "SR", 9704, 1),
        (outputs["narrative"].SeriesInstanceUID, "SR", 9703, 1),
    ]
    got = [
        (
            d[SERIES_UID]["Value"][0],
            d[MODALITY]["Value"][0],
            d["00200011"]["Value"][0],
            d[SERIES_INSTANCES]["Value"][0],
        )
        for d in docs
    ]
    assert got == expected
    for doc in docs:
        assert doc[STUDY_UID] == {"vr": "UI", "Value": [study]}
        series = doc[SERIES_UID]["Value"][0]
        assert doc[RETRIEVE_URL] == {"vr": "UR", "Value": [f"{node.url}/studies/{study}/series/{series}"]}
        assert SOP_UID not in doc
    only_seg = node.client().search_for_series(study, search_filters={"Modality": "SEG"})
    assert _uids(only_seg, SERIES_UID) == [outputs["seg"].SeriesInstanceUID]


def test_search_instances_of_a_study_and_of_a_series(node: Node) -> None:
    study = node.uid("tiny")
    client = node.client()
    docs = client.search_for_instances(study)
    ct = node.studies["tiny"]
    expected_ct = sorted(ds.SOPInstanceUID for ds in ct)
    outputs = sorted(ds.SOPInstanceUID for ds in node.outputs.values())
    assert sorted(_uids(docs, SOP_UID)) == sorted(expected_ct + outputs)
    series = ct[0].SeriesInstanceUID
    in_series = client.search_for_instances(study, series)
    assert sorted(_uids(in_series, SOP_UID)) == expected_ct
    for doc in in_series:
        sop = doc[SOP_UID]["Value"][0]
        assert doc[RETRIEVE_URL]["Value"] == [f"{node.url}/studies/{study}/series/{series}/instances/{sop}"]
        assert doc["00280010"] == {"vr": "US", "Value": [TINY[0]]}
        assert doc["00280011"] == {"vr": "US", "Value": [TINY[1]]}
    (seg,) = client.search_for_instances(
        study, search_filters={"SOPClassUID": node.outputs["seg"].SOPClassUID}
    )
    assert seg[SOP_UID]["Value"] == [node.outputs["seg"].SOPInstanceUID]
    assert seg["00280008"] == {"vr": "IS", "Value": [6]}  # NumberOfFrames


def test_unknown_study_is_an_empty_search_and_a_404_retrieve(node: Node) -> None:
    unknown = "1.2.3.4.5.6.7.8.9"
    client = node.client()
    assert client.search_for_studies(search_filters={"StudyInstanceUID": unknown}) == []
    assert client.search_for_series(unknown) == []
    assert client.search_for_instances(unknown) == []
    assert _qido(node, f"/studies/{unknown}/series/{unknown}/instances") == []
    for path in (f"/studies/{unknown}/metadata", f"/studies/{unknown}"):
        r = httpx.get(f"{node.url}{path}")
        assert r.status_code == 404
        assert r.json()["error"]["code"] == 404


# -- WADO-RS: metadata -----------------------------------------------------------------------
def test_series_metadata_one_document_per_instance_with_pixel_bulk_data(node: Node) -> None:
    jane = node.studies["jane"]
    docs = node.client().retrieve_series_metadata(jane[0].StudyInstanceUID, jane[0].SeriesInstanceUID)
    assert sorted(_uids(docs, SOP_UID)) == sorted(ds.SOPInstanceUID for ds in jane)
    for doc in docs:
        ds = next(d for d in jane if d.SOPInstanceUID == doc[SOP_UID]["Value"][0])
        assert doc[PIXEL_DATA] == {"vr": "OW", "BulkDataURI": f"{_instance_url(node, ds)}/bulk/7FE00010"}
        assert doc["00020010"] == {"vr": "UI", "Value": [EXPLICIT_LE]}
        assert doc["00200032"] == ds["ImagePositionPatient"].to_json_dict(None, 0)
        assert doc["00281053"] == {"vr": "DS", "Value": [1]}  # RescaleSlope
    (bulk,) = node.client().retrieve_bulkdata(docs[0][PIXEL_DATA]["BulkDataURI"])
    ds = next(d for d in jane if d.SOPInstanceUID == docs[0][SOP_UID]["Value"][0])
    assert bulk == ds.PixelData


def test_bulk_data_uri_has_the_servers_port_when_host_has_none(node: Node) -> None:
    """dicomweb-client and some proxies send ``Host`` without the port: the URI must still work."""
    ds = node.studies["j2k"][0]
    r = httpx.get(f"{_instance_url(node, ds)}/metadata", headers={"Host": "127.0.0.1"})
    assert r.status_code == 200
    (doc,) = r.json()
    uri = doc[PIXEL_DATA]["BulkDataURI"]
    assert uri == f"{_instance_url(node, ds)}/bulk/7FE00010"
    assert doc[PIXEL_DATA]["vr"] == "OB"  # compressed: OB
    assert doc["00020010"] == {"vr": "UI", "Value": [str(ds.file_meta.TransferSyntaxUID)]}
    r = httpx.get(uri)
    assert r.status_code == 200
    ((media, data),) = _parts(r)
    assert media == "application/octet-stream"
    assert data == ds.PixelData  # the encapsulated value as stored


def test_sr_metadata_keeps_its_content_sequence_inline(node: Node) -> None:
    sr = node.outputs["narrative"]
    doc = node.client().retrieve_instance_metadata(  # dicomweb-client unwraps the one-item list
        sr.StudyInstanceUID, sr.SeriesInstanceUID, sr.SOPInstanceUID
    )
    assert PIXEL_DATA not in doc
    stored = pydicom.dcmread(_spooled_path(node, sr))
    assert doc[CONTENT_SEQUENCE] == stored.to_json_dict()[CONTENT_SEQUENCE]
    assert "BulkDataURI" not in str(doc)
    texts: list[str] = []

    def walk(items: list[dict[str, Any]]) -> None:
        for item in items:
            texts.extend(item.get("0040A160", {}).get("Value", []))  # TextValue
            walk(item.get(CONTENT_SEQUENCE, {}).get("Value", []))

    walk(doc[CONTENT_SEQUENCE]["Value"])
    assert ("Lungs clear. " * 100).rstrip() in texts  # 1299 characters: above the bulk threshold
    assert "Normal." in texts


# -- WADO-RS: frames -------------------------------------------------------------------------
def test_uncompressed_frame_is_the_stored_pixel_data(node: Node) -> None:
    client = node.client()
    for ds in (node.studies["jane"][1], node.studies["ct_small"][0], node.studies["tiny"][2]):
        (frame,) = client.retrieve_instance_frames(
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, frame_numbers=[1]
        )
        assert frame == ds.PixelData
    ds = node.studies["jane"][0]
    r = httpx.get(f"{_instance_url(node, ds)}/frames/1", headers={"Accept": ANY_SYNTAX})
    assert _parts(r) == [(f"application/octet-stream; transfer-syntax={EXPLICIT_LE}", ds.PixelData)]


def test_j2k_frame_as_stored_with_any_transfer_syntax(node: Node) -> None:
    ds = node.studies["j2k"][0]
    syntax = str(ds.file_meta.TransferSyntaxUID)
    r = httpx.get(f"{_instance_url(node, ds)}/frames/1", headers={"Accept": ANY_SYNTAX})
    assert r.status_code == 200
    ((media, data),) = _parts(r)
    assert media == f"image/jp2; transfer-syntax={syntax}"
    assert data == next(generate_frames(ds.PixelData, number_of_frames=1))
    assert data[:4] == b"\xff\x4f\xff\x51"  # a J2K codestream (SOC, SIZ)
    (frame,) = node.client().retrieve_instance_frames(
        ds.StudyInstanceUID,
        ds.SeriesInstanceUID,
        ds.SOPInstanceUID,
        [1],
        media_types=(("image/jp2", syntax),),
    )
    assert frame == data


def test_j2k_frame_decoded_by_default(node: Node) -> None:
    ds = node.studies["j2k"][0]
    expected = np.ascontiguousarray(ds.pixel_array).tobytes()
    (frame,) = node.client().retrieve_instance_frames(
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, frame_numbers=[1]
    )
    assert frame == expected
    for accept in (
        None,
        f'multipart/related; type="application/octet-stream"; transfer-syntax={EXPLICIT_LE}',
    ):
        r = httpx.get(f"{_instance_url(node, ds)}/frames/1", headers={"Accept": accept} if accept else {})
        assert _parts(r) == [(f"application/octet-stream; transfer-syntax={EXPLICIT_LE}", expected)]


JPEG_LS = "1.2.840.10008.1.2.4.80"


@pytest.mark.parametrize("name", ["j2k", "jane"])
def test_a_frame_in_a_syntax_we_do_not_produce_is_406_not_another_syntax(node: Node, name: str) -> None:
    """PS3.18 8.7.3.5: a frame asked for only as JPEG-LS (neither stored so nor transcoded to) is
    406 with a JSON reason; it was answered decoded, in a syntax the client had not accepted."""
    ds = node.studies[name][0]
    url = f"{_instance_url(node, ds)}/frames/1"
    r = httpx.get(url, headers={"Accept": f'multipart/related; type="image/jls"; transfer-syntax={JPEG_LS}'})
    assert r.status_code == 406 and JPEG_LS in r.json()["error"]["message"], r.text
    both = (
        f'multipart/related; type="image/jls"; transfer-syntax={JPEG_LS}, '
        f'multipart/related; type="application/octet-stream"; transfer-syntax={EXPLICIT_LE}'
    )
    ((media, _),) = _parts(httpx.get(url, headers={"Accept": both}))  # the second choice is served
    assert media == f"application/octet-stream; transfer-syntax={EXPLICIT_LE}"


def test_binary_seg_frames_are_the_packed_bits_of_each_frame(node: Node) -> None:
    seg = node.outputs["seg"]
    frames, rows, cols = int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns)
    assert (frames, rows * cols % 8) == (6, 143 % 8)  # frames 2.. start inside a byte
    bits = np.unpackbits(np.frombuffer(seg.PixelData, dtype=np.uint8), bitorder="little")
    pixels = bits[: frames * rows * cols].reshape(frames, rows * cols)
    expected = [np.packbits(pixels[n], bitorder="little").tobytes() for n in range(frames)]
    assert len(expected[0]) == 18
    client = node.client()
    for n in range(1, frames + 1):
        (frame,) = client.retrieve_instance_frames(
            seg.StudyInstanceUID, seg.SeriesInstanceUID, seg.SOPInstanceUID, frame_numbers=[n]
        )
        assert frame == expected[n - 1], f"frame {n}"
    r = httpx.get(f"{_instance_url(node, seg)}/frames/2,5", headers={"Accept": ANY_SYNTAX})
    media = f"application/octet-stream; transfer-syntax={EXPLICIT_LE}"
    assert _parts(r) == [(media, expected[1]), (media, expected[4])]
    # and what the frames hold is the mask that was written
    np.testing.assert_array_equal(pixels.reshape(frames, rows, cols), seg.pixel_array)


@pytest.mark.parametrize("number", ["0", "7", "3,7"])
def test_frame_outside_the_instance_is_404_json(node: Node, number: str) -> None:
    seg = node.outputs["seg"]
    r = httpx.get(f"{_instance_url(node, seg)}/frames/{number}", headers={"Accept": ANY_SYNTAX})
    assert r.status_code == 404
    assert r.headers["content-type"] == "application/json"
    bad = number.split(",")[-1]
    assert r.json() == {
        "error": {"code": 404, "message": f"Frame {bad} does not exist (the instance has 6)."}
    }


# -- WADO-RS: whole instances ------------------------------------------------------------------
@pytest.mark.parametrize("name", ["jane", "j2k", "seg"])
def test_retrieve_instance_is_the_spooled_file_byte_for_byte(node: Node, name: str) -> None:
    ds = node.outputs[name] if name in node.outputs else node.studies[name][0]
    spooled = _spooled_path(node, ds).read_bytes()
    r = httpx.get(_instance_url(node, ds), headers={"Accept": 'multipart/related; type="application/dicom"'})
    assert r.status_code == 200
    ((media, data),) = _parts(r)
    assert media == f"application/dicom; transfer-syntax={ds.file_meta.TransferSyntaxUID}"
    assert data == spooled
    got = node.client().retrieve_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert got == pydicom.dcmread(BytesIO(spooled))
    assert got.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
    assert got.PixelData == ds.PixelData


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[Node]:
    """An empty server of its own, for instances that would disturb the shared one's listings."""
    spool = Spool(tmp_path)
    index = Index(spool.index_path)
    server = HttpServer(create_app(NodeSettings(spool=SpoolSection(directory=tmp_path)), spool, index))
    port = server.start()
    yield Node(port, spool, index, {}, {})
    server.stop()
    index.close()


def test_multi_frame_and_odd_sized_uncompressed_frames(fresh: Node) -> None:
    emri = _testdata("emri_small.dcm")  # 10 frames of 64 x 64 x 16 bit
    rgb = _testdata("SC_rgb_small_odd.dcm")  # 3 x 3 RGB, 8 bit: 27 bytes, padded to 28 when stored
    fresh.client().store_instances([copy.deepcopy(emri), copy.deepcopy(rgb)])
    frames = np.asarray(emri.pixel_array)
    client = fresh.client()
    got = client.retrieve_instance_frames(
        emri.StudyInstanceUID, emri.SeriesInstanceUID, emri.SOPInstanceUID, frame_numbers=[1, 7, 10]
    )
    assert got == [_little_endian(frames[i]) for i in (0, 6, 9)]
    (frame,) = client.retrieve_instance_frames(
        rgb.StudyInstanceUID, rgb.SeriesInstanceUID, rgb.SOPInstanceUID, frame_numbers=[1]
    )
    assert frame == np.ascontiguousarray(rgb.pixel_array).tobytes()
    assert len(frame) == 27


# -- regressions: bugs these tests found, fixed in d7b486b ------------------------------------------
def test_stow_instance_retrieve_url_answers_with_the_instance(fresh: Node) -> None:
    ds = ct_series(n_slices=1, seed=9)[0]
    response = fresh.client().store_instances([copy.deepcopy(ds)])
    (item,) = response.ReferencedSOPSequence
    assert item.RetrieveURL == _instance_url(fresh, ds)
    r = httpx.get(item.RetrieveURL, headers={"Accept": 'multipart/related; type="application/dicom"'})
    assert r.status_code == 200
    ((_, data),) = _parts(r)
    assert data == _spooled_path(fresh, ds).read_bytes()


def test_big_endian_frame_is_served_little_endian(fresh: Node) -> None:
    ds = _testdata("MR_small_bigendian.dcm")
    fresh.client().store_instances([copy.deepcopy(ds)])
    r = httpx.get(f"{_instance_url(fresh, ds)}/frames/1")
    ((media, data),) = _parts(r)
    assert media == f"application/octet-stream; transfer-syntax={EXPLICIT_LE}"
    assert data == _little_endian(ds.pixel_array)


def test_nested_bulk_data_uri_answers_with_the_nested_value(fresh: Node) -> None:
    ds = ct_series(n_slices=1, seed=10)[0]
    icon = Dataset()
    icon.Rows = icon.Columns = 64
    icon.SamplesPerPixel = 1
    icon.PhotometricInterpretation = "MONOCHROME2"
    icon.BitsAllocated = icon.BitsStored = 8
    icon.HighBit = 7
    icon.PixelRepresentation = 0
    icon.PixelData = bytes(range(256)) * 16  # 4096 bytes: above the bulk threshold
    ds.IconImageSequence = [icon]
    fresh.client().store_instances([copy.deepcopy(ds)])
    doc = fresh.client().retrieve_instance_metadata(
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    )
    nested = doc["00880200"]["Value"][0][PIXEL_DATA]
    assert nested["BulkDataURI"] != doc[PIXEL_DATA]["BulkDataURI"]
    (data,) = fresh.client().retrieve_bulkdata(nested["BulkDataURI"])
    assert data == icon.PixelData


def test_retrieve_instance_refuses_a_json_accept_with_406(node: Node) -> None:
    ds = node.studies["jane"][0]
    r = httpx.get(_instance_url(node, ds), headers={"Accept": "application/dicom+json"})
    assert r.status_code == 406


def test_healthz(node: Node) -> None:
    r = httpx.get(f"http://127.0.0.1:{node.port}/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}
