"""Synthetic but realistic DICOM studies for the demo and the tests.

The CT is a 512x512 axial series of a chest-like phantom: air outside, a soft
tissue body with a fat rim, two lungs whose cross-section changes along z, a
spine and ribs. Values are stored as unsigned 16-bit with a -1024 intercept,
as scanners do. No real patient data is involved.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

ROWS = COLS = 512
PIXEL_MM = 0.7
SLICE_MM = 2.5
UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's root, with deterministic entropy


@dataclass(frozen=True)
class SyntheticPatient:
    """Demographics of a synthetic patient (fake, but PHI-shaped for log tests)."""

    name: str = "SYNTHETIC^CHEST^PHANTOM"
    patient_id: str = "RB-SYN-0001"
    birth_date: str = "19700101"
    sex: str = "O"
    accession: str = "RBACC0001"


def phantom_hu(n_slices: int = 120, seed: int = 7) -> np.ndarray:
    """The chest phantom in HU, shape (slices, rows, columns), int16."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:ROWS, 0:COLS].astype(np.float32)
    cy, cx = ROWS / 2 + 10, COLS / 2
    out = np.empty((n_slices, ROWS, COLS), dtype=np.int16)
    for k in range(n_slices):
        t = k / max(n_slices - 1, 1)  # 0 = top (apex), 1 = bottom (base)
        hu = np.full((ROWS, COLS), -1000.0, dtype=np.float32)
        body = ((xx - cx) / 175) ** 2 + ((yy - cy) / 125) ** 2 <= 1
        inner = ((xx - cx) / 160) ** 2 + ((yy - cy) / 112) ** 2 <= 1
        hu[body] = -100.0  # fat rim
        hu[inner] = 40.0  # soft tissue
        # Lungs grow from apex to base, then shrink under the diaphragm.
        scale = np.sin(np.pi * min(t * 1.15, 1.0)) if t < 0.87 else 0.0
        if scale > 0.05:
            for side in (-1, 1):
                lx, ly = cx + side * 72, cy - 8
                ax, ay = 55 * scale + 10, 80 * scale + 10
                lung = ((xx - lx) / ax) ** 2 + ((yy - ly) / ay) ** 2 <= 1
                hu[lung] = -850.0
        # Spine (posterior), sternum (anterior) and a ring of ribs.
        hu[((xx - cx) ** 2 + (yy - (cy + 85)) ** 2) <= 18**2] = 700.0
        hu[((xx - cx) ** 2 + (yy - (cy - 105)) ** 2) <= 7**2] = 500.0
        ring = np.abs(np.hypot((xx - cx) / 150, (yy - cy) / 102) - 1) < 0.035
        ribs = ring & ((np.floor(np.degrees(np.arctan2(yy - cy, xx - cx)) / 15) + k // 8) % 2 == 0)
        hu[ribs & inner] = 450.0
        hu += rng.normal(0, 8, size=hu.shape).astype(np.float32)
        out[k] = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    return out


def _uid(*parts: object) -> str:
    return generate_uid(prefix=UID_ROOT, entropy_srcs=[str(p) for p in parts])


def ct_series(
    n_slices: int = 120,
    patient: SyntheticPatient | None = None,
    seed: int = 7,
    study_uid: str | None = None,
) -> list[Dataset]:
    """A complete CT Image Storage series of the phantom, in slice order."""
    patient = patient or SyntheticPatient()
    hu = phantom_hu(n_slices, seed)
    study_uid = study_uid or _uid("study", seed, n_slices)
    series_uid = _uid("series", study_uid)
    frame_uid = _uid("for", study_uid)
    origin = (-(COLS - 1) * PIXEL_MM / 2, -(ROWS - 1) * PIXEL_MM / 2)
    datasets = []
    for k in range(n_slices):
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = _uid("sop", series_uid, k)
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260101"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
        ds.AccessionNumber = patient.accession
        ds.Modality = "CT"
        ds.Manufacturer = "RadBridge"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "CT CHEST (synthetic phantom)"
        ds.SeriesDescription = "Axial 2.5mm"
        ds.PatientName = patient.name
        ds.PatientID = patient.patient_id
        ds.PatientBirthDate = patient.birth_date
        ds.PatientSex = patient.sex
        ds.BodyPartExamined = "CHEST"
        ds.SliceThickness = SLICE_MM
        ds.KVP = 120
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 2
        ds.InstanceNumber = k + 1
        z = -k * SLICE_MM
        ds.ImagePositionPatient = [f"{origin[0]:.4f}", f"{origin[1]:.4f}", f"{z:.4f}"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = z
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = ROWS, COLS
        ds.PixelSpacing = [PIXEL_MM, PIXEL_MM]
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter = 40
        ds.WindowWidth = 400
        ds.PixelData = (hu[k].astype(np.int32) + 1024).astype("<u2").tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.file_meta = meta
        datasets.append(ds)
    return datasets


def write_series(datasets: list[Dataset], directory: Path) -> list[Path]:
    """Write datasets as DICOM Part 10 files named by SOP Instance UID."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = directory / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def cr_chest_path() -> Path:
    """pydicom-data's RG1_UNCI chest CR (1955x1841, MONOCHROME1), from the local package."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file("RG1_UNCI.dcm", download=False)
    if path is None:
        raise FileNotFoundError("RG1_UNCI.dcm is not installed; pip install pydicom-data.")
    return Path(str(path))


__all__ = ["SyntheticPatient", "ct_series", "cr_chest_path", "phantom_hu", "write_series"]
