"""Synthetic, clearly fake DICOM studies for tests, benchmarks and demos (never patient data)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta
from io import BytesIO
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid


@dataclass(frozen=True)
class ModalitySpec:
    """Storage SOP class and image shape of one modality."""

    sop_class_uid: str
    rows: int
    columns: int
    bits: int
    photometric: str = "MONOCHROME2"
    body_part: str = "CHEST"


# The ten modalities of the product documentation, each with its proper storage SOP class.
MODALITIES: dict[str, ModalitySpec] = {
    "CT": ModalitySpec("1.2.840.10008.5.1.4.1.1.2", 512, 512, 16),
    "MR": ModalitySpec("1.2.840.10008.5.1.4.1.1.4", 256, 256, 16, body_part="BRAIN"),
    "US": ModalitySpec("1.2.840.10008.5.1.4.1.1.6.1", 480, 640, 8, "RGB", "ABDOMEN"),
    "CR": ModalitySpec("1.2.840.10008.5.1.4.1.1.1", 512, 512, 16),
    "DX": ModalitySpec("1.2.840.10008.5.1.4.1.1.1.1", 512, 512, 16),
    "MG": ModalitySpec("1.2.840.10008.5.1.4.1.1.1.2", 512, 384, 16, body_part="BREAST"),
    "NM": ModalitySpec("1.2.840.10008.5.1.4.1.1.20", 128, 128, 16, body_part="HEART"),
    "PT": ModalitySpec("1.2.840.10008.5.1.4.1.1.128", 128, 128, 16, body_part="WHOLEBODY"),
    "XA": ModalitySpec("1.2.840.10008.5.1.4.1.1.12.1", 512, 512, 8, body_part="HEART"),
    "RF": ModalitySpec("1.2.840.10008.5.1.4.1.1.12.2", 512, 512, 8, body_part="ABDOMEN"),
}


def make_instance(
    modality: str = "CT",
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    patient_id: str = "VHC-TEST-1",
    patient_name: str = "Test^Patient",
    study_date: str = "20240115",
    instance_number: int = 1,
    series_number: int = 1,
    rows: int | None = None,
    columns: int | None = None,
    seed: int = 0,
    **overrides: object,
) -> FileDataset:
    """Return a valid Part-10 data set of `modality` with synthetic pixels.

    Any keyword in `overrides` is set on the data set afterwards (a value of ``None``
    deletes the element), so tests can make it invalid on purpose.
    """
    spec = MODALITIES[modality]
    rows = rows or spec.rows
    columns = columns or spec.columns
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(spec.sop_class_uid)
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset("synthetic", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.set_original_encoding(False, True)  # explicit VR little endian, as the file meta says
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = spec.sop_class_uid
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = study_date
    ds.StudyTime = "101500"
    ds.SeriesDate = study_date
    ds.ContentDate = study_date
    ds.AccessionNumber = f"ACC{abs(hash(ds.StudyInstanceUID)) % 10**8:08d}"
    ds.ReferringPhysicianName = "Referring^Doctor"
    ds.StudyID = "1"
    ds.StudyDescription = f"Synthetic {modality} study"
    ds.SeriesDescription = f"Synthetic {modality} series {series_number}"
    ds.Modality = modality
    ds.BodyPartExamined = spec.body_part
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    ds.InstitutionName = "VannahHealthCloud Test Site"
    ds.Rows = rows
    ds.Columns = columns
    samples = 3 if spec.photometric == "RGB" else 1
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = spec.photometric
    ds.BitsAllocated = spec.bits
    ds.BitsStored = spec.bits if spec.bits == 8 else 12
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    if samples == 3:
        ds.PlanarConfiguration = 0
    if spec.bits == 16:
        ds.WindowCenter = 1024
        ds.WindowWidth = 2048
    rng = np.random.default_rng(seed + instance_number)
    dtype = np.uint16 if spec.bits == 16 else np.uint8
    high = 4096 if spec.bits == 16 else 256
    shape = (rows, columns, samples) if samples == 3 else (rows, columns)
    ds.PixelData = rng.integers(0, high, size=shape, dtype=dtype).tobytes()
    for keyword, value in overrides.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def to_part10(ds: Dataset) -> bytes:
    """Encode `ds` as a Part-10 file (preamble, file meta, data set)."""
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@dataclass(frozen=True)
class SyntheticStudy:
    """A written study: its UIDs and files."""

    study_uid: str
    modality: str
    files: list[Path]


def write_study(
    folder: Path,
    modality: str = "CT",
    *,
    series: int = 1,
    instances_per_series: int = 3,
    patient_id: str = "VHC-TEST-1",
    study_date: str = "20240115",
    rows: int | None = None,
    columns: int | None = None,
) -> SyntheticStudy:
    """Write a synthetic study as Part-10 files under `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = generate_uid()
    files: list[Path] = []
    for s in range(1, series + 1):
        series_uid = generate_uid()
        for i in range(1, instances_per_series + 1):
            ds = make_instance(
                modality,
                study_uid=study_uid,
                series_uid=series_uid,
                patient_id=patient_id,
                study_date=study_date,
                series_number=s,
                instance_number=i,
                rows=rows,
                columns=columns,
            )
            path = folder / f"{ds.SOPInstanceUID}.dcm"
            path.write_bytes(to_part10(ds))
            files.append(path)
    return SyntheticStudy(study_uid, modality, files)


def study_dates(start: date, count: int) -> list[str]:
    """`count` consecutive DA values from `start` (for date-range tests)."""
    return [(start + timedelta(days=i)).strftime("%Y%m%d") for i in range(count)]
