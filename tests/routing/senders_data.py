"""Instances for the sender tests: pydicom's test files (with fresh UIDs) and synthetic
ones, stored as archive files, and the Outgoing each is sent as."""

from __future__ import annotations

import hashlib
from io import BytesIO
from pathlib import Path
from typing import BinaryIO

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from vannah_pipelines.dicom.synthetic import make_instance, to_part10
from vannah_pipelines.dicom.transcoding import EXPLICIT_LE
from vannah_pipelines.routing.senders import Outgoing

RLE = "1.2.840.10008.1.2.5"
# Explicit VR little endian CT and MR, and an RLE Lossless MR.
TEST_FILES = ("CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm")


def pydicom_file(name: str, study: str, series: str) -> bytes:
    """pydicom's test file `name` with fresh UIDs in `study`/`series`, pixels untouched."""
    found = get_testdata_file(name)
    assert found is not None, name
    ds = pydicom.dcmread(str(found))
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def study_files(count: int = 2) -> list[bytes]:
    """One study: the pydicom files (one of them RLE-compressed) and `count` synthetic CTs."""
    study, series = generate_uid(), generate_uid()
    blobs = [pydicom_file(name, study, series) for name in TEST_FILES]
    for number in range(1, count + 1):
        ds = make_instance(
            "CT", study_uid=study, series_uid=series, instance_number=number, rows=32, columns=32
        )
        blobs.append(to_part10(ds))
    return blobs


def outgoing(data: bytes | Path, **changes: str) -> Outgoing:
    """The Outgoing of archive bytes (or an archive file, opened on each send)."""
    raw = data.read_bytes() if isinstance(data, Path) else data
    ds = pydicom.dcmread(BytesIO(raw), stop_before_pixels=True)

    def opener() -> BinaryIO:
        return data.open("rb") if isinstance(data, Path) else BytesIO(data)

    fields = {
        "study_instance_uid": str(ds.StudyInstanceUID),
        "series_instance_uid": str(ds.SeriesInstanceUID),
        "sop_instance_uid": str(ds.SOPInstanceUID),
        "sop_class_uid": str(ds.SOPClassUID),
        "transfer_syntax_uid": str(ds.file_meta.get("TransferSyntaxUID", EXPLICIT_LE)),
        **changes,
    }
    return Outgoing(
        **fields,
        checksum=hashlib.sha256(raw).hexdigest(),
        size=len(raw),
        open=opener,
    )
