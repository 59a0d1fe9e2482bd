"""The destination senders against real peers: DCMTK storescp (the AI engine), a SeaweedFS
bucket, and a second instance of our own DICOMweb as the STOW-RS destination; what arrives
is compared byte for byte with what the archive holds."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from dicomweb_client import DICOMwebClient

from dicomweb.multipart import decode_parts
from tests.dicomweb.conftest import start_server
from tests.routing.senders_data import outgoing, study_files
from tests.servers import S3Server, StoreSCP, storescp_server
from vannah_pipelines.catalog.ingest import IngestPaths, ingest_batches
from vannah_pipelines.dimse.route_sender import DicomSender
from vannah_pipelines.dimse.store_scu import data_set_offset
from vannah_pipelines.landing.layout import LandingZone
from vannah_pipelines.routing.rules import (
    Coercion,
    DicomDestination,
    S3Destination,
    StowDestination,
)
from vannah_pipelines.routing.senders import ALREADY_THERE, S3Sender, Sender, build_sender
from vannah_pipelines.settings import Settings, load_settings

pytestmark = pytest.mark.integration

WRITER_KEY = "route-writer-key-0123456789abcdef"


def _data_set(part10: bytes) -> bytes:
    return part10[data_set_offset(BytesIO(part10)) :]


def _send(sender: Sender, batch: list[Any]) -> list[Any]:
    try:
        return sender.send(batch)
    finally:
        sender.close()


# ---------------------------------------------------------------- DICOM AE


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreSCP]:
    with storescp_server(tmp_path / "scp", "AI_ENGINE", ("+xa",)) as scp:
        yield scp


def _ae(scp: StoreSCP) -> DicomDestination:
    return DicomDestination(aet=scp.aet, host="127.0.0.1", port=scp.port)


def test_dicom_sender_delivers_identical_data_sets_to_storescp(storescp: StoreSCP) -> None:
    blobs = study_files()
    batch = [outgoing(b) for b in blobs]
    sender = build_sender(_ae(storescp), secrets={}, calling_aet="VANNAH", dicom=DicomSender)
    results = _send(sender, batch)
    assert all(r.ok and r.detail == "C-STORE 0x0000" for r in results), results
    assert [r.bytes_sent for r in results] == [len(b) for b in blobs]
    received = storescp.received()
    for o, data in zip(batch, blobs, strict=True):
        assert _data_set(received[o.sop_instance_uid].read_bytes()) == _data_set(data)


def test_dicom_sender_coerces_the_copy_sent(storescp: StoreSCP, tmp_path: Path) -> None:
    archive = tmp_path / "archive.dcm"
    archive.write_bytes(study_files(1)[-1])
    before = archive.read_bytes()
    sender = build_sender(
        _ae(storescp),
        secrets={},
        calling_aet="VANNAH",
        coercion=Coercion(prefix={"PatientID": "VHC-"}),
        dicom=DicomSender,
    )
    [result] = _send(sender, [outgoing(archive)])
    assert result.ok, result
    [path] = storescp.received().values()
    assert pydicom.dcmread(path).PatientID == "VHC-" + pydicom.dcmread(archive).PatientID
    assert archive.read_bytes() == before


# ---------------------------------------------------------------- S3


def _bucket(seaweedfs: S3Server) -> str:
    name = f"route-{uuid.uuid4().hex[:12]}"
    seaweedfs.client().create_bucket(Bucket=name)  # type: ignore[attr-defined]
    return name


def _s3(seaweedfs: S3Server, bucket: str) -> S3Destination:
    return S3Destination(
        type="s3",
        bucket=bucket,
        endpoint=seaweedfs.url,
        region=seaweedfs.region,
        prefix="site1",
        credentials="weed",
    )


def test_s3_sender_stores_identical_objects_and_skips_them_the_second_time(
    seaweedfs: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    destination = _s3(seaweedfs, _bucket(seaweedfs))
    secrets = {"weed": f"{seaweedfs.access_key}:{seaweedfs.secret_key}"}
    blobs = study_files()
    batch = [outgoing(b) for b in blobs]
    sender = build_sender(destination, secrets=secrets, calling_aet="VANNAH")
    assert isinstance(sender, S3Sender)
    results = _send(sender, batch)
    assert all(r.ok and r.detail == "stored" for r in results), results
    client: Any = seaweedfs.client()
    for o, data in zip(batch, blobs, strict=True):
        key = f"site1/{o.study_instance_uid}/{o.series_instance_uid}/{o.sop_instance_uid}.dcm"
        found = client.get_object(Bucket=destination.bucket, Key=key)
        assert found["Body"].read() == data
        assert found["Metadata"]["sha256"] == o.checksum

    again = build_sender(destination, secrets=secrets, calling_aet="VANNAH")
    assert isinstance(again, S3Sender)
    uploads: list[str] = []
    real_write = again.storage.write

    def counting_write(key: str, *args: Any) -> None:
        uploads.append(key)
        real_write(key, *args)

    monkeypatch.setattr(again.storage, "write", counting_write)
    results = _send(again, batch)
    assert [(r.ok, r.detail, r.bytes_sent) for r in results] == [(True, ALREADY_THERE, 0)] * len(
        batch
    )
    assert uploads == []


def test_s3_sender_hashes_an_object_without_checksum_metadata_and_replaces_a_different_one(
    seaweedfs: S3Server,
) -> None:
    destination = _s3(seaweedfs, _bucket(seaweedfs))
    secrets = {"weed": f"{seaweedfs.access_key}:{seaweedfs.secret_key}"}
    same, other = study_files(2)[-2:]
    o_same, o_other = outgoing(same), outgoing(other)
    client: Any = seaweedfs.client()
    keys = [destination.object_key(o.study_instance_uid, o.series_instance_uid,
                                   o.sop_instance_uid) for o in (o_same, o_other)]  # fmt: skip
    client.put_object(Bucket=destination.bucket, Key=keys[0], Body=same)  # no sha256 metadata
    client.put_object(Bucket=destination.bucket, Key=keys[1], Body=other[:-2] + b"\0\0")
    sender = build_sender(destination, secrets=secrets, calling_aet="VANNAH")
    first, second = _send(sender, [o_same, o_other])
    assert (first.ok, first.detail) == (True, ALREADY_THERE)
    assert (second.ok, second.detail) == (True, "stored")
    assert client.get_object(Bucket=destination.bucket, Key=keys[1])["Body"].read() == other


def test_s3_sender_with_wrong_credentials_is_refused_permanently(seaweedfs: S3Server) -> None:
    destination = _s3(seaweedfs, _bucket(seaweedfs))
    sender = build_sender(destination, secrets={"weed": "nobody:wrong"}, calling_aet="VANNAH")
    [result] = _send(sender, [outgoing(study_files(1)[-1])])
    assert not result.ok and not result.transient, result
    assert result.detail.startswith(f"s3://{destination.bucket} ("), result.detail


# ---------------------------------------------------------------- STOW-RS


@pytest.fixture(scope="module")
def dicomweb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Settings, str]]:
    """A second instance of our DICOMweb, requiring credentials: a key with write rights."""
    settings = load_settings(
        data_dir=tmp_path_factory.mktemp("stow-destination") / "data",
        authentication_enabled=True,
        api_keys={"router": {"key": WRITER_KEY, "roles": ["read", "write"]}},
        free_space_reserve_mb=0,
    )
    server, thread, port = start_server(settings)
    try:
        yield settings, f"http://127.0.0.1:{port}/dicom-web"
    finally:
        server.should_exit = True
        thread.join(timeout=20)


def _ingest(settings: Settings) -> None:
    paths = IngestPaths(
        settings.landing_dir, settings.hot_dir, settings.catalog_dir, settings.quarantine_dir
    )
    batches = [b.path.name for b in LandingZone(settings.landing_dir).sealed_batches()]
    assert batches, "nothing was landed"
    result = ingest_batches(paths, batches)
    assert result.quarantined == 0, result.quarantine_reasons


@pytest.mark.parametrize("credential", ["token", "apiKey"])
def test_stow_sender_stores_in_our_dicomweb_and_wado_gives_the_same_bytes(
    dicomweb: tuple[Settings, str], credential: str
) -> None:
    settings, url = dicomweb
    destination = StowDestination.model_validate({"type": "stow", "url": url, credential: "dw"})
    blobs = study_files()
    batch = [outgoing(b) for b in blobs]
    sender = build_sender(destination, secrets={"dw": WRITER_KEY}, calling_aet="VANNAH")
    sender.max_instances = 2  # type: ignore[attr-defined]  # three requests for five
    results = _send(sender, batch)
    assert all(r.ok and r.detail == "stored (STOW-RS 200)" for r in results), results
    _ingest(settings)

    headers = {"X-API-Key": WRITER_KEY}
    client = DICOMwebClient(url, headers=headers)
    study = batch[0].study_instance_uid
    expected = {o.sop_instance_uid for o in batch}
    deadline = time.monotonic() + 20
    while True:  # the service refreshes its catalog at most every 0.5 s, in the background
        found = client.search_for_instances(study_instance_uid=study)
        uids = {i["00080018"]["Value"][0] for i in found}
        if uids == expected or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert uids == expected
    for o, data in zip(batch, blobs, strict=True):
        response = requests.get(
            f"{url}/studies/{study}/series/{o.series_instance_uid}/instances/{o.sop_instance_uid}",
            headers={**headers, "Accept": 'multipart/related; type="application/dicom"; '
                     "transfer-syntax=*"},
            timeout=30,
        )  # fmt: skip
        assert response.status_code == 200, response.text[:300]
        [(_, part)] = decode_parts(response.content, response.headers["Content-Type"])
        assert part == data


def test_stow_sender_with_a_wrong_key_gets_a_permanent_401(dicomweb: tuple[Settings, str]) -> None:
    _, url = dicomweb
    batch = [outgoing(b) for b in study_files(1)]
    for credential in ("token", "apiKey"):
        destination = StowDestination.model_validate({"type": "stow", "url": url, credential: "dw"})
        sender = build_sender(destination, secrets={"dw": "not-the-key"}, calling_aet="VANNAH")
        results = _send(sender, batch)
        assert all(not r.ok and not r.transient for r in results), results
        assert all(r.detail.startswith("STOW-RS 401") for r in results), results
