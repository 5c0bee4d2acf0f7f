"""The searchable attributes kept in the index at ingest and for outputs the node writes."""

from __future__ import annotations

import datetime

from pydicom.dataset import Dataset
from pydicom.valuerep import DA, TM

from dicom_node.attributes import dumps, searchable_attributes


def test_date_and_time_objects_are_stored_in_their_dicom_form() -> None:
    """highdicom and pydicom-built headers hold DA/TM/DT objects; the index stores JSON text."""
    ds = Dataset()
    ds.StudyDate = DA(datetime.date(2020, 1, 2))
    ds.StudyTime = TM(datetime.time(10, 11, 12, 500))
    ds.SeriesDate = "20200103"
    ds.Modality = "CT"
    doc = searchable_attributes(ds)
    assert doc["00080020"] == {"vr": "DA", "Value": ["20200102"]}
    assert doc["00080030"] == {"vr": "TM", "Value": ["101112.000500"]}
    assert doc["00080021"] == {"vr": "DA", "Value": ["20200103"]}
    assert '"00080060":{"vr":"CS","Value":["CT"]}' in dumps(doc)
