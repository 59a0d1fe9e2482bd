"""Unit tests of read_instance_ids: the light parse on the C-STORE path (no network)."""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import pydicom.data
import pytest
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom.dsutils import encode, split_dataset

from vannah_pipelines.dicom.inspection import read_instance_ids
from vannah_pipelines.dicom.synthetic import make_instance
from vannah_pipelines.errors import InvalidDicomError, UnsafeUidError

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"


def _encoded(ts: str, **overrides: object) -> tuple[bytes, dict[str, str]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid UIDs on purpose
        ds = make_instance("MR", rows=8, columns=8, **overrides)
        data = encode(
            ds,
            ts == ImplicitVRLittleEndian,
            ts != ExplicitVRBigEndian,
            ts == DeflatedExplicitVRLittleEndian,
        )
    assert data is not None
    return data, {k: str(ds.get(k, "")) for k in ("SOPInstanceUID", "StudyInstanceUID")}


@pytest.mark.parametrize(
    "ts",
    [
        ImplicitVRLittleEndian,
        ExplicitVRLittleEndian,
        ExplicitVRBigEndian,
        DeflatedExplicitVRLittleEndian,
    ],
)
def test_read_instance_ids_reads_every_uncompressed_transfer_syntax(ts: str) -> None:
    data, uids = _encoded(ts)
    ids = read_instance_ids(data, ts)
    assert ids.sop_instance_uid == uids["SOPInstanceUID"]
    assert ids.study_instance_uid == uids["StudyInstanceUID"]
    assert ids.sop_class_uid == "1.2.840.10008.5.1.4.1.1.4"


def test_read_instance_ids_reads_encapsulated_pixel_data() -> None:
    path = TEST_FILES / "JPEG2000.dcm"
    meta, offset = split_dataset(path)
    ids = read_instance_ids(path.read_bytes()[offset:], meta.TransferSyntaxUID)
    assert ids.sop_instance_uid == pydicom.dcmread(path).SOPInstanceUID


def test_read_instance_ids_rejects_every_truncation() -> None:
    data, _ = _encoded(ExplicitVRLittleEndian)
    for cut in [*range(1, 400, 7), len(data) - 1, len(data) // 2]:
        with pytest.raises(InvalidDicomError):
            read_instance_ids(data[:cut], ExplicitVRLittleEndian)


@pytest.mark.parametrize("name", ["MR_truncated.dcm", "rtplan_truncated.dcm"])
def test_read_instance_ids_rejects_pydicom_truncated_files(name: str) -> None:
    path = TEST_FILES / name
    meta, offset = split_dataset(path)
    with pytest.raises(InvalidDicomError) as info:
        read_instance_ids(path.read_bytes()[offset:], meta.TransferSyntaxUID)
    assert not isinstance(info.value, UnsafeUidError)


def test_read_instance_ids_rejects_random_bytes() -> None:
    rng = random.Random(7)
    for _ in range(50):
        with pytest.raises(InvalidDicomError):
            read_instance_ids(rng.randbytes(rng.randint(1, 5000)), ExplicitVRLittleEndian)


def test_read_instance_ids_rejects_garbage_deflate() -> None:
    with pytest.raises(InvalidDicomError):
        read_instance_ids(b"not deflated at all", DeflatedExplicitVRLittleEndian)


@pytest.mark.parametrize(
    ("overrides", "attribute"),
    [
        ({"SOPInstanceUID": None}, "SOPInstanceUID"),
        ({"StudyInstanceUID": "../../etc"}, "StudyInstanceUID"),
        ({"SeriesInstanceUID": "1.2.abc"}, "SeriesInstanceUID"),
        ({"SOPInstanceUID": "1.2.3/../4"}, "SOPInstanceUID"),
        ({"StudyInstanceUID": "1." * 40 + "1"}, "StudyInstanceUID"),
        ({"SOPClassUID": ""}, "SOPClassUID"),
    ],
)
def test_read_instance_ids_rejects_missing_or_unsafe_uids(
    overrides: dict[str, object], attribute: str
) -> None:
    data, _ = _encoded(ExplicitVRLittleEndian, **overrides)
    with pytest.raises(UnsafeUidError) as info:
        read_instance_ids(data, ExplicitVRLittleEndian)
    assert info.value.attribute == attribute


def test_read_instance_ids_rejects_unknown_transfer_syntax() -> None:
    data, _ = _encoded(ExplicitVRLittleEndian)
    with pytest.raises(InvalidDicomError):
        read_instance_ids(data, "1.2.3.4.5")
