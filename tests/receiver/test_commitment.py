"""Storage Commitment with real processes: ``python -m receiver`` as the SCP (instances
stored with DCMTK storescu), a pynetdicom peer that reports on a new association to the
receiver, and DCMTK storescp as a peer without Storage Commitment."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, build_role, evt
from receiver_support import DCMTK_ENV, TEST_FILES, ReceiverProcess, free_port

from vannah_pipelines.dimse.commitment import (
    COMMITTED,
    FAILURES,
    NOT_SUPPORTED,
    PENDING,
    CommitmentResult,
    request_commitment,
)
from vannah_pipelines.dimse.peers import DicomPeer
from vannah_pipelines.routing.commitments import (
    REPORTED,
    STORAGE_COMMITMENT_INSTANCE,
    STORAGE_COMMITMENT_PUSH,
    CommitmentSpool,
    commitments_dir,
)

pytestmark = pytest.mark.integration  # DCMTK: installed by `make test`'s bootstrap

DEADLINE = 60.0  # bounds a hang; never a performance threshold
FILES = ("CT_small.dcm", "MR_small.dcm")
PEER_AET = "PEERSCP"


def _refs(names: tuple[str, ...]) -> list[tuple[str, str]]:
    refs = []
    for name in names:
        ds = pydicom.dcmread(TEST_FILES / name, stop_before_pixels=True)
        refs.append((str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
    return refs


def _store(port: int, names: tuple[str, ...]) -> None:
    subprocess.run(
        ["storescu", "-aet", "MODALITY", "-aec", "VANNAHCLOUD", "127.0.0.1", str(port)]
        + [str(TEST_FILES / name) for name in names],
        check=True,
        env=DCMTK_ENV,
        timeout=DEADLINE,
        capture_output=True,
    )


def _wait(predicate: Callable[[], Any]) -> Any:
    end = time.monotonic() + DEADLINE
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("condition not reached before the deadline")


def _store_and_commit(
    receiver_factory: Callable[..., ReceiverProcess],
    tmp_path: Path,
    calling_aet: str,
    wait_seconds: float,
) -> tuple[ReceiverProcess, CommitmentResult]:
    """Start a receiver, store one file with storescu, request its commitment."""
    rx = receiver_factory()
    _store(rx.port, FILES[:1])
    result = request_commitment(
        DicomPeer("VANNAHCLOUD", "127.0.0.1", rx.port),
        _refs(FILES[:1]),
        calling_aet=calling_aet,
        spool=CommitmentSpool(tmp_path / "router"),
        wait_seconds=wait_seconds,
    )
    return rx, result


@pytest.fixture
def receiver_factory(tmp_path: Path) -> Iterator[Callable[..., ReceiverProcess]]:
    started: list[ReceiverProcess] = []

    def start(**kwargs: Any) -> ReceiverProcess:
        rx = ReceiverProcess(data_dir=tmp_path / "data", workers=1, **kwargs).start()
        started.append(rx)
        return rx

    yield start
    for rx in started:
        if rx.proc is not None and rx.proc.poll() is None:
            rx.stop()


def test_receiver_commits_stored_instances_and_reports_unknown_on_same_association(
    receiver_factory: Callable[..., ReceiverProcess], tmp_path: Path
) -> None:
    rx = receiver_factory()
    _store(rx.port, FILES)
    refs = _refs(FILES)
    unknown = ("1.2.840.10008.5.1.4.1.1.2", generate_uid())
    spool = CommitmentSpool(tmp_path / "router" / "commitments")

    result = request_commitment(
        DicomPeer("VANNAHCLOUD", "127.0.0.1", rx.port),
        [*refs, unknown],
        calling_aet="ROUTER",
        spool=spool,
        wait_seconds=DEADLINE,
    )

    assert result.outcome == FAILURES, (result, rx.log())
    assert sorted(result.committed) == sorted(sop for _c, sop in refs)
    assert [(f.sop_instance_uid, f.failure_reason) for f in result.failed] == [(unknown[1], 0x0112)]
    record = spool.read(result.transaction_uid)
    assert record is not None
    assert record["state"] == REPORTED
    assert record["reported_on"] == "same-association"
    assert record["reported_by"] == "VANNAHCLOUD"
    # Delivered on the requesting association: nothing owed remains.
    assert not list((tmp_path / "data" / "commitments" / "owed").glob("*.json"))


def test_receiver_commits_everything_held_with_event_type_1(
    receiver_factory: Callable[..., ReceiverProcess], tmp_path: Path
) -> None:
    rx, result = _store_and_commit(receiver_factory, tmp_path, "ROUTER", DEADLINE)
    assert result.outcome == COMMITTED, (result, rx.log())
    assert result.failed == ()


class _PeerScp:
    """A pynetdicom Storage Commitment SCP that accepts each N-ACTION and reports later,
    when the test says, on an association of its own to the requestor."""

    def __init__(self) -> None:
        self.port = free_port()
        self.requests: list[Dataset] = []
        ae = AE(ae_title=PEER_AET)
        ae.add_supported_context(STORAGE_COMMITMENT_PUSH)
        self.ae = ae
        self.server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_N_ACTION, self._on_action)],
        )

    def _on_action(self, event: Any) -> tuple[int, None]:
        self.requests.append(event.action_information)
        return 0x0000, None

    def report(self, port: int, info: Dataset, event_type: int) -> int | None:
        ae = AE(ae_title=PEER_AET)
        ae.add_requested_context(STORAGE_COMMITMENT_PUSH)
        role = build_role(STORAGE_COMMITMENT_PUSH, scu_role=False, scp_role=True)
        assoc = ae.associate("127.0.0.1", port, ae_title="VANNAHCLOUD", ext_neg=[role])
        assert assoc.is_established
        try:
            status, _reply = assoc.send_n_event_report(
                info, event_type, STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE
            )
            return int(status.Status) if "Status" in status else None
        finally:
            assoc.release()

    def stop(self) -> None:
        self.server.shutdown()


def _item(sop_class: str, sop: str, **more: Any) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop
    item.update(more)
    return item


def _result_info(transaction_uid: str, committed: list[tuple[str, str]], failed: Any) -> Dataset:
    """A Storage Commitment Result built by hand (PS3.4 Table J.3-2), failures 0x0112."""
    info = Dataset()
    info.TransactionUID = transaction_uid
    info.ReferencedSOPSequence = [_item(c, s) for c, s in committed]
    if failed:
        info.FailedSOPSequence = [_item(c, s, FailureReason=0x0112) for c, s in failed]
    return info


def test_pending_commitment_completed_by_a_report_to_the_restarted_receiver(
    receiver_factory: Callable[..., ReceiverProcess], tmp_path: Path
) -> None:
    peer = _PeerScp()
    try:
        modalities = {"peer": [PEER_AET, "127.0.0.1", peer.port]}
        env = {"VANNAH_DICOM_MODALITIES": json.dumps(modalities)}
        rx = receiver_factory(env=env)
        spool = CommitmentSpool(commitments_dir(tmp_path / "data"))
        refs = [("1.2.840.10008.5.1.4.1.1.2", generate_uid()) for _ in range(3)]

        result = request_commitment(
            DicomPeer(PEER_AET, "127.0.0.1", peer.port),
            refs,
            calling_aet="VANNAHCLOUD",
            spool=spool,
            wait_seconds=0,
        )
        assert result.outcome == PENDING
        assert len(peer.requests) == 1
        assert peer.requests[0].TransactionUID == result.transaction_uid
        assert [
            (i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID)
            for i in peer.requests[0].ReferencedSOPSequence
        ] == refs

        # The pending record is on disk: a restarted receiver still knows the transaction.
        rx.stop()
        pending = spool.pending()
        assert [r["transaction_uid"] for r in pending] == [result.transaction_uid]
        rx.start()

        info = _result_info(result.transaction_uid, refs[:2], refs[2:])
        assert peer.report(rx.port, info, 2) == 0x0000, rx.log()
        record = spool.read(result.transaction_uid)
        assert record is not None
        assert record["state"] == REPORTED
        assert record["reported_on"] == "new-association"
        assert record["reported_by"] == PEER_AET
        assert record["committed"] == [list(ref) for ref in refs[:2]]
        assert record["failed"] == [
            {"sop_class_uid": refs[2][0], "sop_instance_uid": refs[2][1], "failure_reason": 0x0112}
        ]
        assert spool.pending() == []

        # PS3.7 10.1.1.1.8: a transaction we never requested is an invalid argument value.
        stray = _result_info(generate_uid(), refs[:1], [])
        assert peer.report(rx.port, stray, 1) == 0x0115
    finally:
        peer.stop()


def test_peer_without_storage_commitment_is_not_supported(tmp_path: Path) -> None:
    port = free_port()
    out = tmp_path / "storescp"
    out.mkdir()
    proc = subprocess.Popen(
        ["storescp", "-aet", "STORESCP", "-od", str(out), str(port)],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def listening() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return True
            except OSError:
                return False

        _wait(listening)
        spool = CommitmentSpool(tmp_path / "commitments")
        result = request_commitment(
            DicomPeer("STORESCP", "127.0.0.1", port),
            _refs(FILES[:1]),
            calling_aet="ROUTER",
            spool=spool,
        )
        assert result.outcome == NOT_SUPPORTED, result
        assert not result.supported
        assert "does not support Storage Commitment" in result.reason
        assert spool.pending() == []  # nothing was requested, so nothing waits
    finally:
        proc.terminate()
        proc.wait(timeout=DEADLINE)


def test_unreachable_peer_is_a_result_and_leaves_no_threads(tmp_path: Path) -> None:
    """A peer that is down is an `unreachable` result (no exception), and the SCU leaves
    no association thread behind."""
    before = threading.active_count()
    spool = CommitmentSpool(tmp_path / "c")
    result = request_commitment(
        DicomPeer("NOBODY", "127.0.0.1", free_port()),
        _refs(FILES[:1]),
        calling_aet="ROUTER",
        spool=spool,
        timeout=5,
    )
    assert result.outcome == "unreachable"
    assert "cannot connect" in result.reason
    _wait(lambda: threading.active_count() <= before)


def test_receiver_reports_on_a_new_association_to_a_requestor_that_left(
    tmp_path: Path,
) -> None:
    """Our SCU releases at once (wait 0); the archive reports on an association of its own
    to the requestor's AE in its dicom_modalities, here a second receiver whose spool holds
    the pending transaction."""
    router_port = free_port()
    router = ReceiverProcess(
        data_dir=tmp_path / "router" / "data",
        port=router_port,
        workers=1,
        env={"VANNAH_DICOM_AET": "ROUTER"},
    )
    modalities = {"router": ["ROUTER", "127.0.0.1", router_port]}
    archive = ReceiverProcess(
        data_dir=tmp_path / "archive" / "data",
        workers=1,
        env={"VANNAH_DICOM_MODALITIES": json.dumps(modalities)},
    )
    for rx in (router, archive):
        rx.data_dir.parent.mkdir(parents=True)
    router.start()
    try:
        archive.start()
        try:
            _store(archive.port, FILES)
            spool = CommitmentSpool(commitments_dir(router.data_dir))
            refs = _refs(FILES)
            result = request_commitment(
                DicomPeer("VANNAHCLOUD", "127.0.0.1", archive.port),
                refs,
                calling_aet="ROUTER",
                spool=spool,
                wait_seconds=0,
            )
            assert result.outcome == PENDING, (result, archive.log())

            def reported() -> dict[str, Any] | None:
                record = spool.read(result.transaction_uid)
                return record if record and record["state"] == REPORTED else None

            record = _wait(reported)
            assert sorted(sop for _c, sop in record["committed"]) == sorted(s for _c, s in refs)
            assert record["failed"] == []
            assert record["reported_by"] == "VANNAHCLOUD"
            owed = archive.data_dir / "commitments" / "owed"
            _wait(lambda: not list(owed.glob("*.json")))
        finally:
            archive.stop()
    finally:
        router.stop()


def test_receiver_keeps_a_result_it_cannot_deliver(
    receiver_factory: Callable[..., ReceiverProcess], tmp_path: Path
) -> None:
    """A requestor that left and is not in dicom_modalities: the result stays on disk."""
    _rx, result = _store_and_commit(receiver_factory, tmp_path, "STRANGER", 0)
    assert result.outcome == PENDING
    owed = CommitmentSpool(tmp_path / "data" / "commitments" / "owed")

    def undelivered() -> dict[str, Any] | None:
        record = owed.read(result.transaction_uid)
        return record if record and record["state"] == "undelivered" else None

    record = _wait(undelivered)
    assert record["requestor_aet"] == "STRANGER"
    assert [sop for _c, sop in record["committed"]] == [_refs(FILES[:1])[0][1]]
