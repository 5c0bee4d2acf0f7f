"""Small DICOM helpers several test modules share: values as a modality may send them, and a
series indexed as the SCP would have recorded it."""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from dicom_node.index import Index
from dicom_node.spool import InstanceRef

#: Values as archives hold them, none valid for its VR (dicom_node.source_values); the pixel
#: spacing is the synthetic CT's own, written with a decimal comma.
MALFORMED = {
    "PatientBirthDate": "1941-09-23",
    "PatientSex": "u",
    "PatientAge": "45 y",
    "PatientWeight": "72kg",
    "StudyDate": "2024/01/02",
    "StudyTime": "10:20:30",
    "PixelSpacing": "0,7\\0,7",
    "SpecificCharacterSet": "ISO_IR 999",
}
#: What the results carry instead (None: left empty).
CONFORMED = {
    "PatientBirthDate": "19410923",
    "PatientSex": None,  # "U" is not M, F or O: unknown is empty
    "PatientAge": "045Y",
    "PatientWeight": None,
    "StudyDate": "20240102",
    "StudyTime": "102030",
    "PixelSpacing": [0.7, 0.7],
    "SpecificCharacterSet": "ISO_IR 192",
}
#: pytest filters for the warnings pydicom gives while reading them.
MALFORMED_WARNINGS = (
    "ignore:Invalid value for VR:UserWarning",
    "ignore:Unknown encoding 'ISO_IR 999':UserWarning",
    "ignore:Incorrect value for Specific Character Set:UserWarning",
    "ignore:The PN component:UserWarning",
    "ignore:With tag:UserWarning",  # pydicom's wrapper around one of these while writing
)


def set_raw(ds: Dataset, keyword: str, text: str) -> None:
    """Put ``text`` into ``ds`` as the bytes a file would hold, unchecked (a malformed value as a
    modality sends it; pydicom would refuse or convert it if set as a value)."""
    tag = Tag(tag_for_keyword(keyword))
    value = text.encode() + b" " * (len(text) % 2)
    ds[tag] = RawDataElement(tag, dictionary_VR(tag), len(value), value, 0, False, True)


def index_series(index: Index, files: list[Path], attributes: bool = False) -> str:
    """Record ``files`` (one study) in ``index`` as the SCP would have; returns the study UID.
    ``attributes``: with the Modality and SeriesNumber the status views read."""
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        ref = InstanceRef(
            ds.SOPInstanceUID, ds.SOPClassUID, ds.StudyInstanceUID, ds.SeriesInstanceUID,
            "1.2.840.10008.1.2.1", path, 1,
        )  # fmt: skip
        extra = {"Modality": "CT", "SeriesNumber": int(ds.SeriesNumber)} if attributes else None
        index.add_instance(ref, "CT", "SCU", now=0.0, attributes=extra)
    return str(ds.StudyInstanceUID)
