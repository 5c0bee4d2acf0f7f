"""dicom_node.deidentify: the keyed crosswalk, the cleaned gRPC header, and the Basic Profile on data sets."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_node.client import build_header, make_spec
from dicom_node.config import (
    DeidentificationSection,
    NodeSettings,
    RoutingRule,
    RoutingSection,
    SpoolSection,
    settings_from,
)
from dicom_node.deidentify import (
    MemoryCrosswalkStore,
    UidCrosswalk,
    check_pixels,
    deidentify,
    deidentify_header,
    load_key,
    pseudonymous_uid,
    reidentify,
    reidentify_result,
    require_key,
)
from dicom_node.errors import DeidentificationRefused
from dicom_node.index import Index
from dicom_node.volume import SeriesVolume
from protos.radbridge.v1 import inference_pb2 as pb
from radbridge.synth import SyntheticPatient, ct_series
from radbridge_common.settings import ConfigError, read_layers
from tests.peers import dciodvfy

KEY = b"k" * 32
PATIENT = SyntheticPatient(
    name="DOE^JANE^Q", patient_id="MRN-5551234", birth_date="19610707", accession="ACC98765"
)


def _phi_series(n: int = 3) -> list[Dataset]:
    series = ct_series(n_slices=n, patient=PATIENT)
    for ds in series:
        ds.InstitutionName = "ST ELSEWHERE HOSPITAL"
        ds.ReferringPhysicianName = "HOUSE^GREGORY"
        ds.StationName = "CTSTATION7"
        ds.BodyPartExamined = "JOHN SMITH CHEST"
        ds.add_new(0x00091010, "LO", "PRIVATE MRN-5551234")
        ds.StationAETitle = "CTSTATION7AE"
        ds.file_meta.SourceApplicationEntityTitle = "CTSTATION7AE"
        ref = Dataset()
        ref.ReferencedSOPClassUID = ds.SOPClassUID
        ref.ReferencedSOPInstanceUID = series[0].SOPInstanceUID
        ds.SourceImageSequence = [ref]
    return series


def _phi_values(ds: Dataset) -> list[str]:
    return [
        "DOE",
        "MRN-5551234",
        "19610707",
        "ACC98765",
        "ST ELSEWHERE",
        "HOUSE",
        "CTSTATION7",
        "JOHN SMITH",
        "20260101",  # study / series / content date
        str(ds.StudyInstanceUID),
        str(ds.SeriesInstanceUID),
        str(ds.SOPInstanceUID),
        str(ds.FrameOfReferenceUID),
    ]


def _all_text(ds: Dataset) -> str:
    """Every value of the data set, file meta and nested items included, as one string."""
    parts: list[str] = []

    def walk(d: Dataset) -> None:
        for elem in d:
            if elem.VR == "SQ":
                for item in elem.value:
                    walk(item)
            elif elem.tag != 0x7FE00010:
                parts.append(str(elem.value))

    walk(ds)
    if hasattr(ds, "file_meta"):
        walk(ds.file_meta)
    return "\n".join(parts)


class TestUidCrosswalk:
    def test_deterministic_and_shaped_as_a_uid(self) -> None:
        uid = "1.2.826.0.1.3680043.8.498.1"
        first, again = pseudonymous_uid(KEY, uid), UidCrosswalk(KEY).pseudonym(uid)
        assert first == again
        assert first.startswith("2.25.") and len(first) <= 64
        assert pydicom.uid.UID(first).is_valid and first != uid

    def test_different_keys_give_different_pseudonyms(self) -> None:
        uid = "1.2.3.4"
        assert pseudonymous_uid(KEY, uid) != pseudonymous_uid(b"j" * 32, uid)
        assert pseudonymous_uid(KEY, uid) != pseudonymous_uid(KEY, "1.2.3.5")

    def test_reversible_only_through_the_stored_crosswalk(self, tmp_path: Path) -> None:
        index = Index(tmp_path / "index.sqlite")
        try:
            crosswalk = UidCrosswalk(KEY, index)
            pseudonym = crosswalk.pseudonym("1.2.3.4")
            crosswalk.flush()
            # A fresh crosswalk over the same index (a restarted node) reverses it.
            assert UidCrosswalk(KEY, index).original(pseudonym) == "1.2.3.4"
            # The same key without this node's table cannot.
            assert UidCrosswalk(KEY, MemoryCrosswalkStore()).original(pseudonym) is None
        finally:
            index.close()

    def test_short_key_is_refused(self) -> None:
        with pytest.raises(ValueError, match="at least 16 bytes"):
            UidCrosswalk(b"short")


class TestKey:
    def test_from_file(self, tmp_path: Path) -> None:
        (tmp_path / "deid.key").write_bytes(b"0123456789abcdef0123\n")
        assert load_key(DeidentificationSection(key_file=tmp_path / "deid.key")) == b"0123456789abcdef0123"

    def test_from_environment(self) -> None:
        key = load_key(DeidentificationSection(key_env="DEID_KEY"), {"DEID_KEY": "x" * 20})
        assert key == b"x" * 20

    def test_missing_key_is_a_config_error_at_start(self) -> None:
        settings = NodeSettings(routing=RoutingSection(rules=[RoutingRule(name="out", deidentify=True)]))
        with pytest.raises(ConfigError, match="deidentify = true but no crosswalk key"):
            require_key(settings)
        assert require_key(NodeSettings()) is None  # no de-identifying rule: no key needed

    def test_the_node_does_not_start_without_its_key(self, tmp_path: Path) -> None:
        from dicom_node.node import Node

        rule = RoutingRule(name="out", deidentify=True)
        settings = NodeSettings(routing=RoutingSection(rules=[rule]), spool=SpoolSection(tmp_path / "spool"))
        with pytest.raises(ConfigError, match="no crosswalk key"):
            Node(settings, "127.0.0.1:1")
        assert not (tmp_path / "spool").exists()  # refused before anything was created

    def test_key_file_from_the_environment(self, tmp_path: Path) -> None:
        (tmp_path / "deid.key").write_bytes(KEY)
        env = {"RADBRIDGE_DEIDENTIFICATION__KEY_FILE": str(tmp_path / "deid.key")}
        settings = settings_from(read_layers(None, env))
        assert load_key(settings.deidentification) == KEY

    def test_unreadable_short_or_unset_keys_name_the_source(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match="key_file .* cannot be read"):
            load_key(DeidentificationSection(key_file=tmp_path / "absent.key"))
        (tmp_path / "short.key").write_bytes(b"abc")
        with pytest.raises(ConfigError, match="is 3 bytes; at least 16"):
            load_key(DeidentificationSection(key_file=tmp_path / "short.key"))
        with pytest.raises(ConfigError, match="DEID_KEY .* not set"):
            load_key(DeidentificationSection(key_env="DEID_KEY"), {})

    def test_the_key_itself_is_not_a_config_key(self) -> None:
        with pytest.raises(ConfigError, match="Unknown config key.*deidentification.key"):
            settings_from({"deidentification": {"key": "0123456789abcdef"}})
        with pytest.raises(ConfigError, match="must not start with RADBRIDGE_"):
            settings_from({"deidentification": {"key_env": "RADBRIDGE_KEY"}})


def _header(body_part: str, modality: str = "CT") -> pb.VolumeHeader:
    import numpy as np

    volume = SeriesVolume(
        voxels=np.zeros((2, 4, 4), np.int16),
        spacing_mm=(2.5, 0.7, 0.7),
        orientation=(1, 0, 0, 0, 1, 0),
        position=(-10.0, -20.0, 30.0),
        modality=modality,
        rescaled=True,
        body_part=body_part,
        window=(40.0, 400.0),
        sources=[],
    )
    spec = make_spec(["segment"], question="Effusion?", labels=["lung"], correlation_id="job-7")
    return build_header(volume, spec, pb.PIXEL_TYPE_INT16, 64)


class TestHeader:
    def test_free_text_body_part_and_job_id_do_not_leave(self) -> None:
        crosswalk = UidCrosswalk(KEY)
        out = deidentify_header(_header("JOHN SMITH CHEST", "JOHN"), crosswalk, "1.2.3.9")
        assert out.geometry.body_part == "" and out.geometry.modality == ""
        assert out.spec.correlation_id == pseudonymous_uid(KEY, "1.2.3.9")
        assert crosswalk.original(out.spec.correlation_id) == "1.2.3.9"  # flushed to the store
        assert b"JOHN" not in out.SerializeToString() and b"job-7" not in out.SerializeToString()

    def test_defined_terms_rule_text_and_geometry_stay(self) -> None:
        original = _header("chest")
        out = deidentify_header(original, UidCrosswalk(KEY), "1.2.3.9")
        assert out.geometry.body_part == "CHEST" and out.geometry.modality == "CT"
        assert out.spec.question == "Effusion?" and list(out.spec.labels) == ["lung"]
        assert list(out.geometry.image_position_patient) == [-10.0, -20.0, 30.0]
        assert out.geometry.window_width == 400.0 and out.total_bytes == 64
        assert original.spec.correlation_id == "job-7"  # the original header is untouched

    def test_burned_in_annotation_is_refused(self) -> None:
        ds = Dataset()
        ds.BurnedInAnnotation = "YES"
        with pytest.raises(DeidentificationRefused, match="Burned In Annotation YES"):
            check_pixels([Dataset(), ds], "out")
        ds.BurnedInAnnotation = "NO"
        check_pixels([ds], "out")


class TestReidentifyResult:
    def test_pseudonyms_in_text_come_back_as_originals(self) -> None:
        crosswalk = UidCrosswalk(KEY)
        pseudonym = crosswalk.pseudonym("1.2.840.99.7")
        stranger = pseudonymous_uid(b"z" * 32, "1.2.3")  # not ours: left as it is
        result = pb.AnalysisResult(
            tasks=[
                pb.TaskResult(
                    report=pb.ReportText(findings=f"Series {pseudonym}: clear."),
                    findings=[pb.Finding(label=f"{pseudonym}")],
                    raw_output=f"{stranger} {pseudonym}0",  # a longer number is not the pseudonym
                )
            ]
        )
        assert reidentify_result(result, crosswalk) == 2
        assert result.tasks[0].report.findings == "Series 1.2.840.99.7: clear."
        assert result.tasks[0].findings[0].label == "1.2.840.99.7"
        assert result.tasks[0].raw_output == f"{stranger} {pseudonym}0"


class TestDataset:
    def test_no_identifying_value_is_left_and_the_profile_is_declared(self) -> None:
        series = _phi_series()
        out = deidentify(series[1], UidCrosswalk(KEY))
        text = _all_text(out)
        for value in _phi_values(series[1]):
            assert value not in text, value
        assert out.PatientIdentityRemoved == "YES"
        assert out.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "StudyDate", "AccessionNumber"):
            assert keyword in out and not out[keyword].value, keyword  # Z: present, zero length
        assert "InstitutionName" not in out and "StationName" not in out  # X
        assert "BodyPartExamined" not in out and (0x0009, 0x1010) not in out
        assert out.SOPClassUID == series[1].SOPClassUID  # UIDs of the standard stay
        assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
        assert series[1].PatientName == str(PATIENT.name)  # the input is not modified

    def test_uids_are_consistent_across_the_series_and_reversible(self) -> None:
        series = _phi_series()
        crosswalk = UidCrosswalk(KEY)
        outs = [deidentify(ds, crosswalk) for ds in series]
        assert len({ds.StudyInstanceUID for ds in outs}) == 1
        assert len({ds.SOPInstanceUID for ds in outs}) == len(series)
        assert outs[2].SourceImageSequence[0].ReferencedSOPInstanceUID == outs[0].SOPInstanceUID
        back = reidentify(outs[2], crosswalk)
        assert back.StudyInstanceUID == series[2].StudyInstanceUID
        assert back.SOPInstanceUID == series[2].SOPInstanceUID
        assert back.FrameOfReferenceUID == series[2].FrameOfReferenceUID
        assert back.SourceImageSequence[0].ReferencedSOPInstanceUID == series[0].SOPInstanceUID
        assert back.file_meta.MediaStorageSOPInstanceUID == series[2].SOPInstanceUID

    def test_a_defined_body_part_is_kept(self) -> None:
        ds = ct_series(n_slices=1)[0]
        assert deidentify(ds, UidCrosswalk(KEY)).BodyPartExamined == "CHEST"

    @pytest.mark.integration
    @pytest.mark.usefixtures("require_dicom3tools")
    def test_dciodvfy_finds_no_new_error(self, tmp_path: Path) -> None:
        original = _phi_series(1)[0]
        out = deidentify(original, UidCrosswalk(KEY))
        original.save_as(tmp_path / "original.dcm", enforce_file_format=True)
        out.save_as(tmp_path / "deid.dcm", enforce_file_format=True)
        before = set(dciodvfy(tmp_path / "original.dcm"))
        after = set(dciodvfy(tmp_path / "deid.dcm"))
        assert after - before == set()
