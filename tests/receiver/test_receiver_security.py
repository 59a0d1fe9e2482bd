"""DIMSE security against real DCMTK: DICOM TLS on both DIMSE paths, known peers, called AE
title, user identity, C-MOVE to a TLS peer, the audit trail, a peer that never completes
its TLS handshake."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.pdu_primitives import UserIdentityNegotiation
from pynetdicom.sop_class import (
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)
from receiver_raw_scu import RawAssociation, associate_rq
from receiver_support import DCMTK_ENV, Worker, free_port, wait_sealed

from receiver.contexts import STUDY_ROOT_FIND
from receiver.status import StoreStatus
from tests.tls_support import Pki, make_pki
from vannah_pipelines.catalog.ingest import IngestPaths, ingest_batches
from vannah_pipelines.dicom.synthetic import make_instance, to_part10
from vannah_pipelines.dimse.store_scu import StoreAssociationError, StoreSCU
from vannah_pipelines.dimse.tls import client_tls_context
from vannah_pipelines.landing.layout import LandingZone
from vannah_pipelines.settings import load_settings

PATHS = ["fast", "pynetdicom"]
VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT = "1.2.840.10008.1.2"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
USERS = {"alice": "wonderland1", "bob": "builder22"}
FIND_KEYS = ["-S", "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _tls_settings(pki: Pki, **overrides: Any) -> dict[str, Any]:
    return {
        "dicom_tls_enabled": True,
        "dicom_tls_certificate": pki.server_cert,
        "dicom_tls_private_key": pki.server_key,
        "dicom_tls_trusted_certificates": pki.ca,
        **overrides,
    }


def _tls_args(pki: Pki, who: str = "client") -> list[str]:
    key, cert = (
        (pki.client_key, pki.client_cert) if who == "client" else (pki.rogue_key, pki.rogue_cert)
    )
    return ["+tls", str(key), str(cert), "+cf", str(pki.ca)]


def _run(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=DCMTK_ENV)


def _output(result: subprocess.CompletedProcess[str]) -> str:
    return result.stdout + result.stderr


def _instance(folder: Path, modality: str = "CT") -> tuple[Path, Dataset]:
    ds = make_instance(modality)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_bytes(to_part10(ds))
    return path, ds


def _audit(worker: Worker) -> list[dict[str, Any]]:
    settings = load_settings(data_dir=worker.data_dir)
    rows = []
    for path in sorted(settings.audit_dir.rglob("*.jsonl")):
        rows += [json.loads(line) for line in path.read_text().splitlines()]
    return rows


def _wait_audit(worker: Worker, count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 30
    rows = _audit(worker)
    while len(rows) < count and time.monotonic() < deadline:
        time.sleep(0.05)
        rows = _audit(worker)
    return rows


def _client_context(pki: Pki, who: str = "client") -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
    context.check_hostname = False
    key, cert = (
        (pki.client_key, pki.client_cert) if who == "client" else (pki.rogue_key, pki.rogue_cert)
    )
    context.load_cert_chain(str(cert), str(key))
    return context


def _pynetdicom_scu(
    port: int, pki: Pki | None, identity: tuple[int, bytes, bytes] | None, calling: str = "PYSCU"
) -> Any:
    scu = AE(ae_title=calling)
    scu.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    scu.add_requested_context(CTImageStorage)
    ext_neg = []
    if identity is not None:
        item = UserIdentityNegotiation()
        item.user_identity_type, item.primary_field, item.secondary_field = identity
        item.positive_response_requested = True
        ext_neg.append(item)
    tls_args = (_client_context(pki), None) if pki is not None else None
    return scu.associate(
        "127.0.0.1", port, ae_title="VANNAHCLOUD", ext_neg=ext_neg, tls_args=tls_args
    )


def _find_statuses(assoc: Any) -> list[int]:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    return [int(s.Status) for s, _ in assoc.send_c_find(query, STUDY_ROOT_FIND) if s]


# --- DICOM TLS ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_dcmtk_echo_store_find_over_tls(
    start_worker: Callable[..., Worker], pki: Pki, tmp_path: Path, path: str
) -> None:
    worker = start_worker(path, **_tls_settings(pki))
    port = str(worker.port)
    echo = _run(["echoscu", *_tls_args(pki), "127.0.0.1", port])
    assert echo.returncode == 0, _output(echo)
    file, ds = _instance(tmp_path / "src")
    store = _run(["storescu", *_tls_args(pki), "127.0.0.1", port, str(file)])
    assert store.returncode == 0, _output(store)
    find = _run(["findscu", *_tls_args(pki), *FIND_KEYS, "127.0.0.1", port])
    assert find.returncode == 0, _output(find)
    landed = wait_sealed(worker.data_dir, {str(ds.SOPInstanceUID)})
    assert str(ds.SOPInstanceUID) in landed
    if path == "fast":
        assert worker.fast.served == 3  # TLS echo, storage and C-FIND on the fast path
    # One audit event per association, the store one with its counts (no patient data).
    worker.wait_idle()
    rows = _wait_audit(worker, 3)
    actions = sorted(row["action"] for row in rows)
    assert actions == ["echo", "query", "store"]
    stored = next(row for row in rows if row["action"] == "store")
    assert stored["instances"] == 1 and stored["bytes"] > 0
    assert stored["study_uids"] == [str(ds.StudyInstanceUID)]
    assert stored["outcome"] == "success" and stored["calling_ae"] == "STORESCU"
    assert str(ds.PatientID) not in json.dumps(rows)


@pytest.mark.parametrize("path", PATHS)
def test_tls_client_certificate_from_untrusted_ca_is_refused(
    start_worker: Callable[..., Worker], pki: Pki, tmp_path: Path, path: str
) -> None:
    worker = start_worker(path, **_tls_settings(pki))
    file, _ds = _instance(tmp_path / "src")
    store = _run(["storescu", *_tls_args(pki, "rogue"), "127.0.0.1", str(worker.port), str(file)])
    assert store.returncode != 0
    assert not worker.landed()
    echo = _run(["echoscu", *_tls_args(pki), "127.0.0.1", str(worker.port)])
    assert echo.returncode == 0, _output(echo)
    refused = [r for r in _wait_audit(worker, 2) if r["outcome"] == "refused"]
    assert refused and "TLS handshake failed" in refused[0]["detail"]


def test_tls_client_without_certificate_is_refused_when_required(
    start_worker: Callable[..., Worker], pki: Pki
) -> None:
    anonymous = ["+tla", "+cf", str(pki.ca)]
    required = start_worker("fast", **_tls_settings(pki))
    echo = _run(["echoscu", *anonymous, "127.0.0.1", str(required.port)])
    assert echo.returncode != 0
    optional = start_worker(
        "optional", **_tls_settings(pki, dicom_tls_remote_certificate_required=False)
    )
    echo = _run(["echoscu", *anonymous, "127.0.0.1", str(optional.port)])
    assert echo.returncode == 0, _output(echo)
    plain = _run(["echoscu", "127.0.0.1", str(required.port)])
    assert plain.returncode != 0  # no TLS at all


@pytest.mark.parametrize("path", PATHS)
def test_peer_that_never_finishes_the_tls_handshake_does_not_block_others(
    start_worker: Callable[..., Worker], pki: Pki, path: str
) -> None:
    worker = start_worker(path, **_tls_settings(pki))
    silent = socket.create_connection(("127.0.0.1", worker.port))
    garbage = socket.create_connection(("127.0.0.1", worker.port))
    garbage.sendall(b"\x16\x03\x01\x00\x05hello")  # a TLS record that is no ClientHello
    try:
        for _ in range(3):
            echo = _run(["echoscu", *_tls_args(pki), "127.0.0.1", str(worker.port)])
            assert echo.returncode == 0, _output(echo)
    finally:
        silent.close()
        garbage.close()


# --- known peers and called AE title ------------------------------------------------------


def _rejection(port: int, calling: str, called: str, abstract_syntax: str) -> bytes:
    raw = RawAssociation("127.0.0.1", port)
    try:
        request = associate_rq(
            [(1, abstract_syntax, [IMPLICIT])], calling_ae=calling, called_ae=called, max_pdu=16384
        )
        pdu_type, answer = raw.associate(request)
    finally:
        raw.close()
    return bytes([pdu_type]) + answer[7:10]


@pytest.mark.parametrize("path", PATHS)
def test_unknown_calling_ae_is_rejected_unless_it_only_stores_or_echoes(
    start_worker: Callable[..., Worker], path: str
) -> None:
    modalities = {"ct": {"AET": "CTSCAN", "Host": "127.0.0.1", "Port": 104}}
    worker = start_worker(path, dicom_modalities=modalities, dicom_check_modality_host=True)
    # A-ASSOCIATE-RJ: rejected-permanent, DICOM UL service-user, calling AE not recognized.
    assert (
        _rejection(worker.port, "STRANGER", "VANNAHCLOUD", STUDY_ROOT_FIND) == b"\x03\x01\x01\x03"
    )
    assert _rejection(worker.port, "CTSCAN", "VANNAHCLOUD", STUDY_ROOT_FIND)[0] == 0x02
    assert _rejection(worker.port, "STRANGER", "VANNAHCLOUD", CT_IMAGE)[0] == 0x02
    assert _rejection(worker.port, "STRANGER", "VANNAHCLOUD", VERIFICATION)[0] == 0x02
    find = _run(["findscu", "-aet", "STRANGER", *FIND_KEYS, "127.0.0.1", str(worker.port)])
    assert "Calling AE Title Not Recognized" in _output(find)
    known = _run(["findscu", "-aet", "CTSCAN", *FIND_KEYS, "127.0.0.1", str(worker.port)])
    assert known.returncode == 0, _output(known)
    worker.wait_idle()
    refused = [r for r in _wait_audit(worker, 4) if r["outcome"] == "refused"]
    assert [r["calling_ae"] for r in refused] == ["STRANGER", "STRANGER"]
    assert refused[0]["status"] == "A-ASSOCIATE-RJ 1/1/3"


def test_known_ae_title_from_another_host_is_rejected(
    start_worker: Callable[..., Worker],
) -> None:
    modalities = {"ct": {"AET": "CTSCAN", "Host": "10.1.2.3", "Port": 104}}
    worker = start_worker("fast", dicom_modalities=modalities, dicom_check_modality_host=True)
    assert _rejection(worker.port, "CTSCAN", "VANNAHCLOUD", STUDY_ROOT_FIND) == b"\x03\x01\x01\x03"
    unchecked = start_worker("unchecked", dicom_modalities=modalities)
    assert _rejection(unchecked.port, "CTSCAN", "VANNAHCLOUD", STUDY_ROOT_FIND)[0] == 0x02


@pytest.mark.parametrize("path", PATHS)
def test_wrong_called_ae_is_rejected_with_check_called_aet(
    start_worker: Callable[..., Worker], pki: Pki, path: str
) -> None:
    worker = start_worker(path, dicom_check_called_aet=True, **_tls_settings(pki))
    wrong = _run(["echoscu", *_tls_args(pki), "-aec", "OTHER", "127.0.0.1", str(worker.port)])
    assert "Called AE Title Not Recognized" in _output(wrong)
    assert "Rejected Permanent, Source: Service User" in _output(wrong)
    right = _run(["echoscu", *_tls_args(pki), "-aec", "VANNAHCLOUD", "127.0.0.1", str(worker.port)])
    assert right.returncode == 0, _output(right)


# --- user identity -----------------------------------------------------------------------


def _auth(**overrides: Any) -> dict[str, Any]:
    return {
        "authentication_enabled": True,
        "registered_users": USERS,
        "user_roles": {"bob": ["read"]},
        **overrides,
    }


@pytest.mark.parametrize("path", PATHS)
def test_storescu_user_identity_accepted_and_refused(
    start_worker: Callable[..., Worker], pki: Pki, tmp_path: Path, path: str
) -> None:
    worker = start_worker(path, **_tls_settings(pki), **_auth())
    file, ds = _instance(tmp_path / "src")
    base = ["storescu", *_tls_args(pki), "-rsp", "--user", "alice"]
    good = _run([*base, "--password", "wonderland1", "127.0.0.1", str(worker.port), str(file)])
    assert good.returncode == 0, _output(good)
    bad = _run([*base, "--password", "wrong", "127.0.0.1", str(worker.port), str(file)])
    assert bad.returncode != 0
    assert "Rejected Transient" in _output(bad), _output(bad)
    assert str(ds.SOPInstanceUID) in wait_sealed(worker.data_dir, {str(ds.SOPInstanceUID)})
    worker.wait_idle()
    rows = _wait_audit(worker, 2)
    stored = next(r for r in rows if r["action"] == "store")
    assert (stored["subject"], stored["auth_method"]) == ("alice", "dimse-user")
    refused = next(r for r in rows if r["outcome"] == "refused")
    assert refused["status"] == "A-ASSOCIATE-RJ 2/2/1"


@pytest.mark.parametrize("path", PATHS)
def test_query_needs_a_user_identity_or_a_known_peer(
    start_worker: Callable[..., Worker], pki: Pki, path: str
) -> None:
    worker = start_worker(path, **_tls_settings(pki), **_auth())
    anonymous = _run(["findscu", *_tls_args(pki), *FIND_KEYS, "127.0.0.1", str(worker.port)])
    assert "Calling AE Title Not Recognized" in _output(anonymous)
    assoc = _pynetdicom_scu(worker.port, pki, (2, b"alice", b"wonderland1"))
    assert assoc.is_established
    assert assoc.acceptor.user_identity is not None  # the positive response asked for
    assert _find_statuses(assoc) == [0x0000]
    assoc.release()
    refused = _pynetdicom_scu(worker.port, pki, (2, b"alice", b"nope"))
    assert refused.is_rejected


def test_jwt_user_identity(start_worker: Callable[..., Worker]) -> None:
    import jwt

    secret = "k" * 32
    worker = start_worker("pynetdicom", **_auth(jwt_hs256_secret=secret))
    token = jwt.encode({"sub": "carol", "roles": ["read"], "exp": time.time() + 60}, secret)
    assoc = _pynetdicom_scu(worker.port, None, (5, token.encode(), b""))
    assert assoc.is_established
    assert _find_statuses(assoc) == [0x0000]
    assoc.release()
    expired = jwt.encode({"sub": "carol", "exp": time.time() - 3600}, secret)
    assert _pynetdicom_scu(worker.port, None, (5, expired.encode(), b"")).is_rejected


@pytest.mark.parametrize("path", PATHS)
def test_principal_without_write_may_not_store(
    start_worker: Callable[..., Worker], path: str
) -> None:
    worker = start_worker(path, **_auth())
    assoc = _pynetdicom_scu(worker.port, None, (2, b"bob", b"builder22"))
    assert assoc.is_established
    status = assoc.send_c_store(make_instance("CT"))
    assert int(status.Status) == StoreStatus.NOT_AUTHORIZED
    assoc.release()
    assert not worker.landed()


# --- C-MOVE to a TLS peer ----------------------------------------------------------------


def _storescp(key: Path, cert: Path, ca: Path) -> list[str]:
    return ["storescp", "+tls", str(key), str(cert), "+cf", str(ca), "-aet", "TLSDEST"]


def _wait_listening(port: int) -> None:
    deadline = time.monotonic() + 30
    while True:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        assert time.monotonic() < deadline, f"nothing listens on {port}"
        time.sleep(0.05)


@pytest.fixture
def tls_storescp(pki: Pki, tmp_path: Path) -> Iterator[tuple[int, Path]]:
    port = free_port()
    out = tmp_path / "storescp"
    out.mkdir()
    proc = subprocess.Popen(
        [*_storescp(pki.server_key, pki.server_cert, pki.ca), "-od", str(out), str(port)],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_listening(port)
    yield port, out
    proc.terminate()
    proc.wait(timeout=30)


def test_cmove_to_a_tls_peer_goes_over_tls(
    start_worker: Callable[..., Worker],
    pki: Pki,
    tmp_path: Path,
    tls_storescp: tuple[int, Path],
) -> None:
    dest_port, out = tls_storescp
    modalities = {
        "tlsdest": {"AET": "TLSDEST", "Host": "127.0.0.1", "Port": dest_port, "UseDicomTls": True}
    }
    worker = start_worker("fast", dicom_modalities=modalities, **_tls_settings(pki))
    file, ds = _instance(tmp_path / "src")
    store = _run(["storescu", *_tls_args(pki), "127.0.0.1", str(worker.port), str(file)])
    assert store.returncode == 0, _output(store)
    wait_sealed(worker.data_dir, {str(ds.SOPInstanceUID)})
    settings = load_settings(data_dir=worker.data_dir)
    ingest_batches(
        IngestPaths(
            settings.landing_dir, settings.hot_dir, settings.catalog_dir, settings.quarantine_dir
        ),
        [b.batch_id for b in LandingZone(settings.landing_dir).sealed_batches()],
    )
    # DCMTK's movescu has no TLS options: the C-MOVE request comes from pynetdicom over TLS.
    scu = AE(ae_title="TLSDEST")  # a known peer moving to itself
    scu.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = scu.associate(
        "127.0.0.1", worker.port, ae_title="VANNAHCLOUD", tls_args=(_client_context(pki), None)
    )
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = str(ds.StudyInstanceUID)
    responses = list(
        assoc.send_c_move(query, "TLSDEST", StudyRootQueryRetrieveInformationModelMove)
    )
    assoc.release()
    assert int(responses[-1][0].Status) == 0x0000, responses[-1][0]
    assert int(responses[-1][0].NumberOfCompletedSuboperations) == 1
    received = [p for p in out.rglob("*") if p.is_file()]
    assert len(received) == 1
    assert received[0].read_bytes().endswith(to_part10(ds)[-64:])
    worker.wait_idle()
    moved = [r for r in _wait_audit(worker, 2) if r["action"] == "move"]
    assert moved and moved[0]["outcome"] == "success"


def test_tls_peer_with_an_untrusted_certificate_is_refused_by_our_scu(
    pki: Pki, tmp_path: Path
) -> None:
    # A destination presenting a certificate of another CA: our check refuses it.
    rogue = make_pki(tmp_path / "rogue-pki")
    port = free_port()
    proc = subprocess.Popen(
        [*_storescp(rogue.server_key, rogue.server_cert, pki.ca), "-od", str(tmp_path), str(port)],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        modalities = {
            "tlsdest": {"AET": "TLSDEST", "Host": "127.0.0.1", "Port": port, "UseDicomTls": True}
        }
        _wait_listening(port)
        settings = load_settings(
            data_dir=tmp_path / "data", dicom_modalities=modalities, **_tls_settings(pki)
        )
        with pytest.raises(StoreAssociationError, match="TLS handshake failed"):
            StoreSCU.request(
                "127.0.0.1",
                port,
                calling_ae="VANNAHCLOUD",
                called_ae="TLSDEST",
                proposals=[(CT_IMAGE, [IMPLICIT])],
                timeout=30,
                tls=client_tls_context(settings),
            )
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_tls_handshake_in_progress_counts_as_a_pending_connection(
    start_worker: Callable[..., Worker], pki: Pki
) -> None:
    worker = start_worker("fast", dimse_max_pending_connections=1, **_tls_settings(pki))
    pending = worker.server.pending
    assert pending is not None
    silent = socket.create_connection(("127.0.0.1", worker.port))
    deadline = time.monotonic() + 30
    while pending.count < 1:
        assert time.monotonic() < deadline, "the silent connection was never accepted"
        time.sleep(0.01)
    blocked = _run(["echoscu", *_tls_args(pki), "127.0.0.1", str(worker.port)])
    assert blocked.returncode != 0  # closed at once: the one pending slot is taken
    silent.close()  # the handshake fails, the slot is released
    while pending.count:
        assert time.monotonic() < deadline, "the slot was not released"
        time.sleep(0.01)
    echo = _run(["echoscu", *_tls_args(pki), "127.0.0.1", str(worker.port)])
    assert echo.returncode == 0, _output(echo)


@pytest.mark.parametrize("path", PATHS)
def test_principal_without_read_may_not_query(
    start_worker: Callable[..., Worker], path: str
) -> None:
    worker = start_worker(path, **_auth(user_roles={"dave": []}, registered_users={"dave": "pw"}))
    assoc = _pynetdicom_scu(worker.port, None, (2, b"dave", b"pw"))
    assert assoc.is_established
    assert _find_statuses(assoc) == [0x0124]
    assoc.release()
