"""The one settings object: Orthanc-style keys, env overrides, clear refusals."""

import json
from pathlib import Path

import pytest

from vannah_pipelines.errors import ConfigError
from vannah_pipelines.settings import load_settings


def _write(tmp_path: Path, values: dict[str, object]) -> Path:
    path = tmp_path / "vannah.json"
    path.write_text(json.dumps(values))
    return path


def test_load_settings_accepts_orthanc_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VANNAH_DICOM_PORT", raising=False)
    config = _write(
        tmp_path,
        {
            "DicomAet": "SITEA",
            "DicomPort": 11112,
            "RemoteAccessAllowed": True,
            "AuthenticationEnabled": False,
            "DicomTlsEnabled": False,
        },
    )
    settings = load_settings(config)
    assert (settings.dicom_aet, settings.dicom_port, settings.bind_host) == (
        "SITEA",
        11112,
        "0.0.0.0",
    )


def test_load_settings_refuses_product_doc_example_until_auth_and_tls_exist(tmp_path: Path) -> None:
    # The product documentation's example, verbatim: accepted as syntax, refused as features.
    config = _write(
        tmp_path,
        {
            "DicomAet": "VANNAHCLOUD",
            "DicomPort": 4242,
            "RemoteAccessAllowed": True,
            "AuthenticationEnabled": True,
            "DicomTlsEnabled": True,
        },
    )
    with pytest.raises(ConfigError, match=r"AuthenticationEnabled.*not implemented"):
        load_settings(config)


def test_load_settings_refuses_tls_with_a_clear_message(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="DicomTlsEnabled"):
        load_settings(_write(tmp_path, {"DicomTlsEnabled": True}))


def test_load_settings_env_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VANNAH_DICOM_PORT", "5555")
    monkeypatch.setenv("VANNAH_CONFIG", str(_write(tmp_path, {"DicomPort": 4243})))
    assert load_settings().dicom_port == 5555
    monkeypatch.delenv("VANNAH_DICOM_PORT")
    assert load_settings().dicom_port == 4243


@pytest.mark.parametrize(
    "values, match",
    [
        ({"DicomPort": "not a port"}, "dicom_port"),
        ({"NoSuchKey": 1}, "NoSuchKey"),
        ({"DicomAet": "A" * 17}, "dicom_aet"),
        ({"DicomAet": "X", "dicom_aet": "Y"}, "twice"),
    ],
)
def test_load_settings_rejects_bad_values(
    tmp_path: Path, values: dict[str, object], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        load_settings(_write(tmp_path, values))


def test_load_settings_rejects_unreadable_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(bad)
