"""HTTPS: ``python -m dicomweb`` with SslEnabled and one PEM file (chain + key, as Orthanc
reads it), a test CA made here with `cryptography`, and dicomweb-client verifying it."""

from __future__ import annotations

import json
import os
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from dicomweb_client import DICOMwebClient
from pydicom.uid import generate_uid

from dicomweb.__main__ import uvicorn_config
from tests.dicomweb.conftest import land_and_ingest
from tests.processes import dicomweb_process
from tests.servers import free_port
from tests.tls_support import make_pki
from vannah_pipelines.dicom.synthetic import make_instance, to_part10
from vannah_pipelines.platform import banner
from vannah_pipelines.settings import load_settings

API_KEY = "https-test-key-0123456789abcdef"


def make_certificates(folder: Path) -> tuple[Path, Path]:
    """The test CA, and ONE PEM file with the server certificate, the CA and the key (the
    form Orthanc's SslCertificate takes)."""
    pki = make_pki(folder)
    server_file = folder / "https.pem"
    server_file.write_bytes(
        pki.server_cert.read_bytes() + pki.ca.read_bytes() + pki.server_key.read_bytes()
    )
    server_file.chmod(0o600)
    return pki.ca, server_file


@dataclass
class HttpsService:
    url: str
    port: int
    ca: Path
    study: str


@pytest.fixture(scope="module")
def https_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpsService]:
    folder = tmp_path_factory.mktemp("https")
    ca, server_pem = make_certificates(folder)
    data_dir = folder / "data"
    settings = load_settings(data_dir=data_dir)
    study = generate_uid()
    ds = make_instance("CT", study_uid=study, rows=16, columns=16)
    land_and_ingest(settings, [(str(ds.SOPInstanceUID), to_part10(ds))])
    port = free_port()
    env = {
        **os.environ,
        "VANNAH_DATA_DIR": str(data_dir),
        "VANNAH_DICOMWEB_PORT": str(port),
        "VANNAH_SSL_ENABLED": "true",
        "VANNAH_SSL_CERTIFICATE": str(server_pem),
        "VANNAH_AUTHENTICATION_ENABLED": "true",
        "VANNAH_API_KEYS": json.dumps({"ris": {"key": API_KEY, "roles": ["read"]}}),
    }
    env.pop("VANNAH_CONFIG", None)
    with dicomweb_process(env, port, folder / "dicomweb.log"):
        yield HttpsService(f"https://localhost:{port}/dicom-web", port, ca, study)


def test_https_dicomweb_client_verifies_the_test_ca(https_service: HttpsService) -> None:
    session = requests.Session()
    session.trust_env = False  # else REQUESTS_CA_BUNDLE from the environment wins over verify
    session.verify = str(https_service.ca)
    dw = DICOMwebClient(https_service.url, session=session, headers={"X-API-Key": API_KEY})
    (answer,) = dw.search_for_studies()
    assert answer["0020000D"]["Value"] == [https_service.study]
    assert len(dw.retrieve_study_metadata(https_service.study)) == 1
    # Credentials are still required over TLS (dicomweb-client put its headers on `session`).
    anonymous = requests.Session()
    anonymous.trust_env = False
    refused = anonymous.get(https_service.url + "/studies", verify=str(https_service.ca))
    assert refused.status_code == 401


def test_https_refuses_plain_http_and_unknown_ca(https_service: HttpsService) -> None:
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(https_service.url + "/studies", headers={"X-API-Key": API_KEY})
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(
            f"http://localhost:{https_service.port}/dicom-web/studies",
            headers={"X-API-Key": API_KEY},
            timeout=10,
        )
    context = ssl.create_default_context(cafile=str(https_service.ca))
    with (
        socket.create_connection(("127.0.0.1", https_service.port)) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        assert tls.version() in ("TLSv1.2", "TLSv1.3")


def test_https_uvicorn_config_and_banner(tmp_path: Path) -> None:
    _ca, server_pem = make_certificates(tmp_path)
    settings = load_settings(
        data_dir=tmp_path / "data", ssl_enabled=True, ssl_certificate=server_pem
    )
    config = uvicorn_config(settings)
    assert config.ssl_certfile == config.ssl_keyfile == str(server_pem)
    assert f"https://127.0.0.1:{settings.dicomweb_port}/dicom-web" in banner(settings)
    assert settings.base_url.startswith("https://")
    plain = load_settings(data_dir=tmp_path / "data")
    assert uvicorn_config(plain).ssl_certfile is None
    assert f"http://127.0.0.1:{plain.dicomweb_port}/dicom-web" in banner(plain)
