"""Slicer's DICOM database as the panel sees it: image series to analyse, RadBridge results to load.

Works on any object with the ``ctkDICOMDatabase`` methods the panel uses (``patients``,
``studiesForPatient``, ``seriesForStudy``, ``filesForSeries``, ``fileValue``), so it is tested
with a small stand-in over real files and runs unchanged on ``slicer.dicomDatabase``. Only the
first file of each series is asked for its attributes (the database caches them); patient names
and IDs are never read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .dicom_objects import kind_from_attributes

#: ctkDICOMDatabase.fileValue tags ("gggg,eeee").
_TAGS = {
    "modality": "0008,0060",
    "manufacturer": "0008,0070",
    "series_number": "0020,0011",
    "series_description": "0008,103E",
    "study_description": "0008,1030",
    "study_date": "0008,0020",
}
_OUTPUT_LABELS = {"seg": "SEG", "measurements": "SR", "narrative": "report SR", "keyslices": "key-slice SR"}


class DicomDatabase(Protocol):
    """The part of ctkDICOMDatabase the panel uses."""

    def patients(self) -> Sequence[str]: ...
    def studiesForPatient(self, patient: str) -> Sequence[str]: ...  # noqa: N802 (Qt's name)
    def seriesForStudy(self, study: str) -> Sequence[str]: ...  # noqa: N802
    def filesForSeries(self, series: str) -> Sequence[str]: ...  # noqa: N802
    def fileValue(self, path: str, tag: str) -> str: ...  # noqa: N802


@dataclass(frozen=True)
class SeriesEntry:
    """One series of the database, described without patient data."""

    study_uid: str
    series_uid: str
    modality: str
    series_number: str
    series_description: str
    study_description: str
    study_date: str
    files: tuple[str, ...]
    #: "seg", "measurements", "narrative" or "keyslices" for a series RadBridge wrote.
    radbridge_kind: str | None = None

    @property
    def image_count(self) -> int:
        return len(self.files)

    @property
    def title(self) -> str:
        """What the panel's series list shows, e.g. ``CT chest · 3 Axial · CT · 120 images``."""
        study = self.study_description or self.study_date or "study"
        series = " ".join(p for p in (self.series_number, self.series_description) if p) or "series"
        count = f"{self.image_count} image" + ("" if self.image_count == 1 else "s")
        text = f"{study} · {series} · {self.modality or '?'} · {count}"
        if self.radbridge_kind:
            text += f" · RadBridge {_OUTPUT_LABELS[self.radbridge_kind]}"
        return text


def _value(db: DicomDatabase, path: str, key: str) -> str:
    return str(db.fileValue(path, _TAGS[key]) or "").strip()


def list_series(db: DicomDatabase) -> list[SeriesEntry]:
    """Every series with at least one file: newest study first, then by series number."""
    entries = []
    for patient in db.patients():
        for study in db.studiesForPatient(patient):
            for series in db.seriesForStudy(study):
                files = tuple(str(f) for f in db.filesForSeries(series))
                if not files:
                    continue
                first = files[0]
                modality = _value(db, first, "modality")
                number = _value(db, first, "series_number")
                entries.append(
                    SeriesEntry(
                        study_uid=str(study),
                        series_uid=str(series),
                        modality=modality,
                        series_number=number,
                        series_description=_value(db, first, "series_description"),
                        study_description=_value(db, first, "study_description"),
                        study_date=_value(db, first, "study_date"),
                        files=files,
                        radbridge_kind=kind_from_attributes(
                            modality, _value(db, first, "manufacturer"), number
                        ),
                    )
                )

    def order(e: SeriesEntry) -> tuple[Any, ...]:
        number = int(e.series_number) if e.series_number.isdigit() else 0
        return (-int(e.study_date) if e.study_date.isdigit() else 0, e.study_uid, number, e.series_uid)

    return sorted(entries, key=order)


def referenced_series_uid(ds: Any) -> str | None:
    """The image series a RadBridge SEG or SR was made from (the SEG's Referenced Series; an SR's
    evidence series that is not a SEG)."""
    if str(ds.get("Modality", "")) == "SEG":
        refs = ds.get("ReferencedSeriesSequence") or []
        return str(refs[0].SeriesInstanceUID) if refs else None
    for study in ds.get("CurrentRequestedProcedureEvidenceSequence") or []:
        for series in study.get("ReferencedSeriesSequence") or []:
            classes = {str(i.ReferencedSOPClassUID) for i in series.get("ReferencedSOPSequence") or []}
            if classes and not classes <= {"1.2.840.10008.5.1.4.1.1.66.4"}:  # not only SEG objects
                return str(series.SeriesInstanceUID)
    return None


@dataclass(frozen=True)
class StoredResults:
    """RadBridge's objects for one source series and one model, ready for ``read_results``."""

    source_series_uid: str
    model: str
    paths: tuple[Path, ...]


def stored_results(entries: Sequence[SeriesEntry], chosen: SeriesEntry) -> list[StoredResults]:
    """RadBridge's SEG/SR in ``chosen``'s study, grouped by source series and model.

    ``chosen`` may be the image series (its results only) or one of RadBridge's own series (the
    results of the series it was made from).
    """
    import pydicom

    groups: dict[tuple[str, str], list[Path]] = {}
    for entry in entries:
        if entry.study_uid != chosen.study_uid or entry.radbridge_kind is None:
            continue
        for path in entry.files:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            source = referenced_series_uid(ds)
            if source is None:
                continue
            model = str(ds.get("ManufacturerModelName", "") or "")
            groups.setdefault((source, model), []).append(Path(path))
    if chosen.radbridge_kind is not None:
        ds = pydicom.dcmread(chosen.files[0], stop_before_pixels=True)
        wanted = referenced_series_uid(ds)
    else:
        wanted = chosen.series_uid
    return [
        StoredResults(source, model, tuple(paths))
        for (source, model), paths in sorted(groups.items())
        if source == wanted
    ]
