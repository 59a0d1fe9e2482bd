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


def _pem_files(tmp_path: Path) -> dict[str, str]:
    # Settings check only that the files exist; the TLS tests use real certificates.
    names = {}
    for key in ("DicomTlsCertificate", "DicomTlsPrivateKey", "DicomTlsTrustedCertificates"):
        path = tmp_path / f"{key}.pem"
        path.write_text("-----BEGIN CERTIFICATE-----\n")
        names[key] = str(path)
    return names


def test_load_settings_takes_the_product_doc_example_with_its_credentials(tmp_path: Path) -> None:
    # The product documentation's example, verbatim, plus what each feature needs.
    doc = {
        "DicomAet": "VANNAHCLOUD",
        "DicomPort": 4242,
        "RemoteAccessAllowed": True,
        "AuthenticationEnabled": True,
        "DicomTlsEnabled": True,
    }
    with pytest.raises(ConfigError, match=r"AuthenticationEnabled: no credential"):
        load_settings(_write(tmp_path, doc))
    full = {**doc, "RegisteredUsers": {"alice": "pw"}, **_pem_files(tmp_path)}
    settings = load_settings(_write(tmp_path, full))
    assert settings.authentication_enabled and settings.dicom_tls_enabled
    assert settings.registered_users["alice"].get_secret_value() == "pw"
    assert "pw" not in repr(settings)  # secrets never printed


@pytest.mark.parametrize(
    "values, match",
    [
        ({"DicomTlsEnabled": True}, "DicomTlsCertificate and DicomTlsPrivateKey"),
        ({"SslEnabled": True}, "SslCertificate must name a PEM file"),
        ({"SslEnabled": True, "SslCertificate": "/nonexistent.pem"}, "not a readable file"),
    ],
)
def test_load_settings_refuses_tls_without_its_files(
    tmp_path: Path, values: dict[str, object], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        load_settings(_write(tmp_path, values))


def test_tls_needs_trusted_certificates_unless_peers_need_none(tmp_path: Path) -> None:
    files = _pem_files(tmp_path)
    trusted = files.pop("DicomTlsTrustedCertificates")
    config = {"DicomTlsEnabled": True, **files}
    with pytest.raises(ConfigError, match="DicomTlsTrustedCertificates"):
        load_settings(_write(tmp_path, config))
    assert load_settings(_write(tmp_path, {**config, "DicomTlsTrustedCertificates": trusted}))
    relaxed = {**config, "DicomTlsRemoteCertificateRequired": False}
    assert not load_settings(_write(tmp_path, relaxed)).dicom_tls_remote_certificate_required


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


def test_lake_settings_are_both_or_neither_and_the_s3_secret_comes_from_env_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vannah_pipelines.catalog.lake import LakeConfig

    assert LakeConfig.from_settings(load_settings(data_dir=tmp_path)) is None  # embedded
    with pytest.raises(ConfigError, match="set both"):
        load_settings(catalog_lake_postgres="host=db dbname=lake")
    lake = {"catalog_lake_postgres": "host=db password=pw-db", "catalog_lake_data_path": "s3://b/"}
    with pytest.raises(ConfigError, match="environment only"):
        load_settings(_write(tmp_path, {**lake, "catalog_lake_s3_secret": "s3-secret"}))
    monkeypatch.setenv("VANNAH_CATALOG_LAKE_S3_SECRET", "s3-secret")
    settings = load_settings(_write(tmp_path, {**lake, "catalog_lake_s3_use_ssl": False}))
    config = LakeConfig.from_settings(settings)
    assert config is not None
    assert (config.postgres, config.data_path) == ("host=db password=pw-db", "s3://b/")
    assert (config.s3_secret, config.s3_use_ssl) == ("s3-secret", False)
    for text in (repr(settings), repr(config)):
        assert "s3-secret" not in text and "pw-db" not in text
