"""Coercion: applied to a copy, never to the data set the archive holds."""

from __future__ import annotations

from vannah_pipelines.dicom.synthetic import make_instance
from vannah_pipelines.routing.coerce import apply_coercion
from vannah_pipelines.routing.rules import Coercion


def test_apply_coercion_sets_replaces_prefixes_and_removes_on_a_copy() -> None:
    ds = make_instance("CT", patient_id="12345", InstitutionName="Vannah General")
    before = ds.to_json_dict()
    coercion = Coercion.model_validate(
        {
            "set": {"InstitutionName": "Teleradiology Partner", "ReferringPhysicianName": "Doe^J"},
            "replace": {"StationName": "ANON", "PatientComments": "none"},
            "prefix": {"PatientID": "VHC-", "OtherPatientIDs": "X-"},
            "remove": ["PatientBirthDate", "IssuerOfPatientID"],
        }
    )
    out = apply_coercion(ds, coercion)
    assert out.InstitutionName == "Teleradiology Partner"
    assert str(out.ReferringPhysicianName) == "Doe^J"
    assert out.PatientID == "VHC-12345"
    assert "PatientBirthDate" not in out
    assert "PatientComments" not in out and "OtherPatientIDs" not in out  # absent: untouched
    assert ("StationName" in out) == ("StationName" in ds)
    if "StationName" in ds:
        assert out.StationName == "ANON"
    assert out.SOPInstanceUID == ds.SOPInstanceUID
    assert ds.to_json_dict() == before  # the archive's data set is unchanged
    assert apply_coercion(ds, None) is not ds
