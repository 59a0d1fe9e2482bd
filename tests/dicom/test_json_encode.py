"""The direct DICOM JSON encoder writes exactly pydicom's bytes, or declines."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pydicom
import pydicom.data
import pytest
from pydicom.dataset import Dataset
from pynetdicom.dsutils import encode

from vannah_pipelines.dicom.json_encode import NotEncodableError, encode_json_dataset
from vannah_pipelines.dicom.json_model import to_dicom_json

_FILES = sorted((Path(pydicom.data.__file__).parent / "test_files").rglob("*.dcm"))


def _pydicom_bytes(attributes: dict[str, Any], implicit: bool) -> bytes:
    data = encode(Dataset.from_json(attributes), implicit, True, False)
    assert data is not None
    return data


ANSWERS: list[dict[str, Any]] = [
    {
        "00080005": {"vr": "CS", "Value": ["ISO_IR 100"]},
        "00080020": {"vr": "DA", "Value": ["20240115"]},
        "00080030": {"vr": "TM", "Value": ["101500.123"]},
        "00080052": {"vr": "CS", "Value": ["STUDY"]},
        "00080061": {"vr": "CS", "Value": ["CT", "MR", "SR"]},
        "00080090": {"vr": "PN", "Value": [{"Alphabetic": "Referring^Doc"}]},
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe^Jane", "Phonetic": "do^jn"}]},
        "00100020": {"vr": "LO", "Value": ["P-1"]},
        "0020000D": {"vr": "UI", "Value": ["1.2.3.45"]},  # odd length: NUL padded
        "00201206": {"vr": "IS", "Value": [3]},
        "00201208": {"vr": "IS", "Value": [300]},
    },
    {
        "00080052": {"vr": "CS", "Value": ["IMAGE"]},
        "00080054": {"vr": "AE", "Value": ["VANNAHCLOUD"]},
        "00100010": {"vr": "PN", "Value": [None, {"Alphabetic": "b"}]},
        "00100030": {"vr": "DA"},
        "00200013": {"vr": "IS"},
        "00280010": {"vr": "US", "Value": [512]},
        "00280011": {"vr": "US"},
        "00081030": {"vr": "LO", "Value": ["a", "", "c"]},
        "00324000": {"vr": "LT", "Value": ["free text with  spaces"]},
        "00091010": {"vr": "LO", "Value": ["private"]},
    },
    {"00080005": {"vr": "CS"}, "00080052": {"vr": "CS", "Value": ["PATIENT"]}},
]


@pytest.mark.parametrize("implicit", [True, False])
@pytest.mark.parametrize("answer", ANSWERS, ids=["study", "image", "empty-charset"])
def test_answers_encode_as_pydicom_does(answer: dict[str, Any], implicit: bool) -> None:
    assert encode_json_dataset(answer, implicit=implicit) == _pydicom_bytes(answer, implicit)


@pytest.mark.parametrize("path", _FILES, ids=[f.name for f in _FILES])
def test_every_plain_element_of_pydicom_test_files_encodes_as_pydicom_does(path: Path) -> None:
    ds = pydicom.dcmread(io.BytesIO(path.read_bytes()), force=True)
    attributes = to_dicom_json(ds, 1024, lambda _e: "bulk")
    plain = {}
    for tag, element in attributes.items():
        try:
            encode_json_dataset({tag: element}, implicit=True)
        except NotEncodableError:
            continue
        plain[tag] = element
    for implicit in (True, False):
        assert encode_json_dataset(plain, implicit=implicit) == _pydicom_bytes(plain, implicit)


@pytest.mark.parametrize(
    "element",
    [
        {"vr": "SQ", "Value": [{}]},
        {"vr": "OB", "InlineBinary": "AAAA"},
        {"vr": "OW", "BulkDataURI": "http://x"},
        {"vr": "DS", "Value": [1.5]},
        {"vr": "LO", "Value": ["Müller"]},
        {"vr": "PN", "Value": [{"Alphabetic": "山田^太郎"}]},
        {"vr": "IS", "Value": ["12"]},
    ],
)
def test_anything_else_is_left_to_pydicom(element: dict[str, Any]) -> None:
    with pytest.raises(NotEncodableError):
        encode_json_dataset({"00100010": element}, implicit=False)
