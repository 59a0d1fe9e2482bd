"""The fast DICOM JSON encoder gives pydicom's answer (or keeps more where pydicom drops)."""

import io
import json
from pathlib import Path

import pydicom
import pydicom.data
import pytest

from vannah_pipelines.dicom.headers import json_int, json_text, read_header
from vannah_pipelines.dicom.json_model import to_dicom_json
from vannah_pipelines.dicom.synthetic import MODALITIES, make_instance, to_part10

_FILES = sorted((Path(pydicom.data.__file__).parent / "test_files").rglob("*.dcm"))


def _bulk(_: object) -> str:
    return "bulk"


@pytest.mark.parametrize(
    "name, data",
    [(f.name, f.read_bytes()) for f in _FILES]
    + [(m, to_part10(make_instance(m, rows=8, columns=8))) for m in MODALITIES],
)
def test_to_dicom_json_matches_pydicom(name: str, data: bytes) -> None:
    expected = pydicom.dcmread(io.BytesIO(data), force=True).to_json_dict(
        1024, _bulk, suppress_invalid_tags=True
    )
    ours = to_dicom_json(pydicom.dcmread(io.BytesIO(data), force=True), 1024, _bulk)
    json.dumps(ours)  # serialisable
    for tag, value in expected.items():
        assert ours.get(tag) == value, (name, tag)
    # Extra elements only where pydicom gave up on an invalid value (we keep the data).
    assert set(ours) - set(expected) <= {"300C0002", "08200500"}, name


def test_json_text_and_int_read_catalog_values() -> None:
    ds = make_instance(
        "CT", PatientName="Doe^Jane=ドウ^ジェーン", ImageType=["ORIGINAL", "PRIMARY"]
    )
    ds.SpecificCharacterSet = ["ISO_IR 100", "ISO 2022 IR 87"]
    attrs = pydicom.dcmread(io.BytesIO(to_part10(ds))).to_json_dict()
    assert json_text(attrs, "00100010") == "Doe^Jane=ドウ^ジェーン"
    assert json_text(attrs, "00080008") == "ORIGINAL\\PRIMARY"
    assert json_int(attrs, "00280010") == 512
    assert json_text(attrs, "00181030") is None


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("Trailing\\", [{"Alphabetic": "Trailing"}, None]),
        ("\\b", [None, {"Alphabetic": "b"}]),
        ("a==c", [{"Alphabetic": "a", "Phonetic": "c"}]),
    ],
)
def test_person_names_with_empty_values_are_read_not_refused(
    tmp_path: Path, name: str, value: list[object]
) -> None:
    """pydicom's own conversion raises IndexError on an empty value among several person
    names (PS3.18 F.2.5 encodes it as null); ingest must index such a file."""
    path = tmp_path / "pn.dcm"
    path.write_bytes(to_part10(make_instance("CT", patient_name=name)))
    header = read_header(path)
    assert header.attributes["00100010"] == {"vr": "PN", "Value": value}
    roundtrip = pydicom.dataset.Dataset.from_json({"00100010": header.attributes["00100010"]})
    assert str(roundtrip.PatientName) == str(header.dataset.PatientName)
