"""Hostile peers against the receiver's limits (issue 7), on both DIMSE paths.

Each test checks the DIMSE status or the A-ABORT a hostile input gets, that the receiver
serves the next association, and, where memory is the point, the receiver worker's peak
RSS (``VmHWM`` in ``/proc/<pid>/status``, reset through ``clear_refs`` before the input).
Memory tests run ``python -m receiver`` with one worker; the others run a worker's server
in this process (``build_server``), with the fast path on or off.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import socket
import struct
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dsutils import encode
from receiver_raw_scu import (
    RawAssociation,
    associate_rq,
    command_elements,
    pdata,
    read_command,
    store_command,
)
from receiver_support import ReceiverProcess, Worker

import receiver.limits
from receiver.contexts import MODALITY_WORKLIST_FIND, STUDY_ROOT_FIND
from receiver.status import StoreStatus
from vannah_pipelines.dicom.synthetic import make_instance
from vannah_pipelines.landing import space

CT = "1.2.840.10008.5.1.4.1.1.2"
VERIFICATION = "1.2.840.10008.1.1"
DEADLINE = 30.0  # bounds a hang, not a performance threshold
MIB = 1 << 20
PATHS = ["fast", "pynetdicom"]
A_ABORT = 0x07


# --------------------------------------------------------------------------- helpers


def _ct(**overrides: object) -> tuple[bytes, str]:
    """A small CT data set, explicit VR little endian, and its SOP Instance UID."""
    ds = make_instance("CT", rows=16, columns=16, **overrides)
    data = encode(ds, False, True)
    assert data is not None
    return data, str(ds.SOPInstanceUID)


def _with_pixel_bytes(data: bytes, size: int) -> bytes:
    """`data` (pixel data removed) with an OB Pixel Data element of `size` zero bytes."""
    pos = data.index(b"\xe0\x7f\x10\x00")
    return data[:pos] + b"\xe0\x7f\x10\x00OB\x00\x00" + struct.pack("<L", size) + bytes(size)


def _echo_succeeds(port: int) -> bool:
    ae = AE(ae_title="LIMITSCU")
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("127.0.0.1", port, ae_title="VANNAHCLOUD")
    try:
        if not assoc.is_established:
            return False
        status = assoc.send_c_echo()
        return bool(status) and int(status.Status) == 0
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def _store_rq() -> bytes:
    return associate_rq(
        [(1, CT, [ExplicitVRLittleEndian]), (3, VERIFICATION, ["1.2.840.10008.1.2"])]
    )


def _associated(port: int) -> RawAssociation:
    assoc = RawAssociation("127.0.0.1", port, timeout=DEADLINE)
    pdu_type, _ = assoc.associate(_store_rq())
    assert pdu_type == 0x02, "association not accepted"
    return assoc


def _response(assoc: RawAssociation) -> dict[int, bytes]:
    """Read one command set (P-DATA-TF PDUs); return its elements by element number."""
    command = read_command(assoc.sock)
    assert command is not None, "another PDU instead of a response"
    return command_elements(command)


def _status_and_comment(assoc: RawAssociation) -> tuple[int, str]:
    elements = _response(assoc)
    status = struct.unpack("<H", elements[0x0900])[0]
    return status, elements.get(0x0902, b"").decode("ascii").strip()


def _send_store(assoc: RawAssociation, uid: str, data: bytes, fragment: int = 200_000) -> None:
    assoc.send(pdata([(1, 0x03, store_command(CT, uid))]))
    if not data:
        assoc.send(pdata([(1, 0x02, b"")]))
    for start in range(0, len(data), fragment):
        last = start + fragment >= len(data)
        assoc.send(pdata([(1, 0x02 if last else 0x00, data[start : start + fragment])]))


def _aborted(assoc: RawAssociation) -> bool:
    """Whether the receiver answered A-ABORT before closing (what else came is skipped)."""
    data = assoc.read_until_closed()
    pos = 0
    while pos + 6 <= len(data):
        pdu_type, _, length = struct.unpack_from(">BBL", data, pos)
        if pdu_type == A_ABORT:
            return True
        pos += 6 + length
    return False


def _landed(data_dir: Path) -> list[Path]:
    root = data_dir / "landing"
    return [p for p in root.rglob("*") if p.suffix == ".dcm" or ".tmp-" in p.name]


# --------------------------------------------------------------------------- in-process


# --------------------------------------------------------------------------- subprocess


def _worker_pid(rx: ReceiverProcess) -> int:
    """The one receiver worker (a child of the supervisor that is not the resource tracker)."""
    assert rx.proc is not None
    children = Path(f"/proc/{rx.proc.pid}/task/{rx.proc.pid}/children").read_text().split()
    workers = [
        int(pid)
        for pid in children
        if b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    assert len(workers) == 1, workers
    return workers[0]


def _memory_kib(pid: int) -> dict[str, int]:
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


@dataclass
class Measured:
    """A worker's RSS before a hostile input and its peak during it, in MiB."""

    pid: int
    before: float = 0.0
    peak: float = 0.0

    def start(self) -> None:
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")  # reset VmHWM to VmRSS
        self.before = _memory_kib(self.pid)["VmRSS"] / 1024

    def stop(self) -> float:
        self.peak = _memory_kib(self.pid)["VmHWM"] / 1024
        return self.peak - self.before


@pytest.fixture
def receiver_worker(
    receiver_process: Callable[..., ReceiverProcess],
) -> Callable[..., tuple[ReceiverProcess, Measured]]:
    """Factory: ``python -m receiver`` (one worker) on a path, warmed up, and its meter."""

    def start(path: str, **env: str) -> tuple[ReceiverProcess, Measured]:
        env = {
            "VANNAH_RECEIVER_FAST_STORE": "true" if path == "fast" else "false",
            **{f"VANNAH_{k.upper()}": v for k, v in env.items()},
        }
        rx = receiver_process(workers=1, env=env)
        # Warm up: the code paths under test loaded, buffers at their working size.
        assert _echo_succeeds(rx.port)
        data, uid = _ct()
        assoc = _associated(rx.port)
        _send_store(assoc, uid, data)
        assert _status_and_comment(assoc)[0] == StoreStatus.SUCCESS
        assoc.release()
        assoc.close()
        return rx, Measured(_worker_pid(rx))

    return start


# --------------------------------------------------------------------------- 1. inspection


@pytest.mark.parametrize("path", PATHS)
def test_receiver_refuses_fixed_size_value_of_wrong_length(
    start_worker: Callable[..., Worker], path: str
) -> None:
    """A 3-byte US (Rows) is refused 0xC000 with where, on both paths; nothing lands."""
    worker = start_worker(path)
    data, uid = _ct()
    rows = data.index(b"\x28\x00\x10\x00US\x02\x00")
    bad = data[:rows] + b"\x28\x00\x10\x00US\x03\x00\x10\x00\x00" + data[rows + 10 :]
    assoc = _associated(worker.port)
    _send_store(assoc, uid, bad)
    status, comment = _status_and_comment(assoc)
    assert status == StoreStatus.CANNOT_UNDERSTAND
    assert "(0028,0010) US of 3 bytes" in comment
    good, good_uid = _ct()
    _send_store(assoc, good_uid, good)
    assert _status_and_comment(assoc)[0] == StoreStatus.SUCCESS
    assoc.release()
    assoc.close()
    assert not [p for p in _landed(worker.data_dir) if uid in p.name]
    assert _echo_succeeds(worker.port)


# --------------------------------------------------------------------------- 2. memory


@pytest.mark.parametrize("path", PATHS)
def test_receiver_aborts_a_pdu_longer_than_advertised(
    receiver_worker: Callable[..., tuple[ReceiverProcess, Measured]], path: str
) -> None:
    """A P-DATA-TF declaring 1 GiB (over the 256 KiB advertised) is aborted on its header."""
    rx, meter = receiver_worker(path)
    meter.start()
    assoc = _associated(rx.port)
    assoc.send(struct.pack(">BBL", 0x04, 0, 1 << 30) + struct.pack(">LBB", (1 << 30) - 4, 1, 0x02))
    # A path that aborts on the header alone has answered by now: sending more would hit a
    # closed socket, whose reset can discard the A-ABORT before it is read. A path that
    # waits for some bytes gets them.
    answered, _, _ = select.select([assoc.sock], [], [], 2.0)
    if not answered:
        assoc.send(b"\x00" * 10)
    assert _aborted(assoc)
    assoc.close()
    assert _echo_succeeds(rx.port)
    growth = meter.stop()
    print(f"{path}: 1 GiB PDU: RSS {meter.before:.0f} MiB, peak {meter.peak:.0f} MiB")
    assert growth < 50, f"worker RSS grew {growth:.0f} MiB"


@pytest.mark.parametrize("path", PATHS)
def test_receiver_grows_its_buffer_only_as_bytes_arrive(
    receiver_worker: Callable[..., tuple[ReceiverProcess, Measured]], path: str
) -> None:
    """With the PDU limit lifted, a PDV declaring 1 GiB with 10 bytes sent costs no 1 GiB."""
    rx, meter = receiver_worker(path, dimse_max_pdu_bytes=str(2**32 - 1))
    meter.start()
    assoc = _associated(rx.port)
    _, uid = _ct()
    assoc.send(pdata([(1, 0x03, store_command(CT, uid))]))
    declared = 1 << 30
    assoc.send(
        struct.pack(">BBL", 0x04, 0, declared + 6) + struct.pack(">LBB", declared + 2, 1, 0x02)
    )
    assoc.send(b"\x00" * 10)
    assoc.sock.shutdown(socket.SHUT_WR)  # then the peer goes away
    assoc.read_until_closed()
    assoc.close()
    assert _echo_succeeds(rx.port)
    growth = meter.stop()
    print(f"{path}: 1 GiB PDV: RSS {meter.before:.0f} MiB, peak {meter.peak:.0f} MiB")
    assert growth < 50, f"worker RSS grew {growth:.0f} MiB"


@pytest.mark.parametrize("path", PATHS)
def test_receiver_refuses_a_data_set_over_max_instance_bytes(
    receiver_worker: Callable[..., tuple[ReceiverProcess, Measured]], path: str
) -> None:
    """64 MiB sent against a 2 MiB limit: the fast path drains it and answers 0xA700 (the
    association goes on); pynetdicom's path aborts. Neither buffers it."""
    rx, meter = receiver_worker(path, max_instance_bytes=str(2 * MIB))
    data, uid = _ct()
    big = _with_pixel_bytes(data, 64 * MIB)
    meter.start()
    assoc = _associated(rx.port)
    if path == "fast":
        _send_store(assoc, uid, big)
        status, comment = _status_and_comment(assoc)
        assert status == StoreStatus.OUT_OF_RESOURCES
        assert "larger than the 2097152-byte limit" in comment
        small, small_uid = _ct()
        _send_store(assoc, small_uid, small)
        assert _status_and_comment(assoc)[0] == StoreStatus.SUCCESS
        assoc.release()
    else:
        with contextlib.suppress(OSError):  # the receiver aborts while this still sends
            _send_store(assoc, uid, big)
        assert _aborted(assoc)
    assoc.close()
    assert _echo_succeeds(rx.port)
    growth = meter.stop()
    print(f"{path}: 64 MiB over a 2 MiB limit: RSS {meter.before:.0f}, peak {meter.peak:.0f}")
    assert growth < 32, f"worker RSS grew {growth:.0f} MiB"


# --------------------------------------------------------------------------- 2. time


@pytest.mark.parametrize("path", PATHS)
def test_receiver_aborts_a_slow_drip_in_mid_pdu(
    start_worker: Callable[..., Worker], path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PDU trickling in under dimse_min_bytes_per_second over a window is aborted."""
    monkeypatch.setattr(receiver.limits, "WINDOW_SECONDS", 0.5)
    worker = start_worker(path, dimse_min_bytes_per_second=1000)
    assoc = _associated(worker.port)
    _, uid = _ct()
    assoc.send(pdata([(1, 0x03, store_command(CT, uid))]))
    assoc.send(struct.pack(">BBL", 0x04, 0, 10_006) + struct.pack(">LBB", 10_002, 1, 0x02))
    assoc.sock.settimeout(0.1)
    answer = b""
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        try:
            assoc.send(b"\x00")  # 10 bytes/s, under 1000
        except OSError:
            break
        try:
            chunk = assoc.sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            break
        if not chunk:
            break
        answer += chunk
    assert answer[:1] == bytes([A_ABORT]), answer
    assoc.close()
    assert _echo_succeeds(worker.port)


@pytest.mark.parametrize("path", PATHS)
def test_receiver_aborts_an_association_past_its_deadline(
    start_worker: Callable[..., Worker], path: str
) -> None:
    """An association idle (or busy) past dimse_association_max_seconds is aborted."""
    worker = start_worker(path, dimse_association_max_seconds=1.0)
    assoc = _associated(worker.port)
    data, uid = _ct()
    _send_store(assoc, uid, data)
    assert _status_and_comment(assoc)[0] == StoreStatus.SUCCESS
    assert _aborted(assoc)  # then nothing more: the deadline ends it
    assoc.close()
    assert _echo_succeeds(worker.port)


@pytest.mark.parametrize("path", PATHS)
def test_receiver_closes_connections_past_the_pending_cap(
    start_worker: Callable[..., Worker], path: str
) -> None:
    """Past dimse_max_pending_connections silent connections, a new one is closed at once
    (well before the ACSE timeout); once one associates, new ones are served again."""
    worker = start_worker(path, dimse_max_pending_connections=2)
    pending = worker.server.pending
    assert pending is not None
    silent = [socket.create_connection(("127.0.0.1", worker.port)) for _ in range(2)]
    try:
        deadline = time.monotonic() + DEADLINE
        while pending.count < 2:
            assert time.monotonic() < deadline, "connections not counted"
            time.sleep(0.01)
        with socket.create_connection(("127.0.0.1", worker.port)) as extra:
            extra.settimeout(DEADLINE / 2)  # the ACSE timeout is 30 s: "at once" is before
            with contextlib.suppress(ConnectionResetError):
                assert extra.recv(1) == b""
        silent[0].sendall(_store_rq())
        silent[0].settimeout(DEADLINE)
        assert silent[0].recv(1) == b"\x02"  # A-ASSOCIATE-AC: no longer pending
        while pending.count > 1:
            assert time.monotonic() < deadline, "an associated connection still pending"
            time.sleep(0.01)
        assert _echo_succeeds(worker.port)
    finally:
        for sock in silent:
            sock.close()


# --------------------------------------------------------------------------- 3. disk space


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[tuple[Path, bool]]:
    """A 4 MiB tmpfs at tmp_path/disk, or (if mount fails) a plain folder whose free space
    is simulated (``space.free_bytes`` and ENOSPC from the write): the flag says which."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = shutil.which("mount")
    mounted = bool(mount) and (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)],
            capture_output=True,
            check=False,
        ).returncode
        == 0
    )
    yield disk, mounted
    if mounted:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, check=False)


@pytest.mark.parametrize("path", PATHS)
def test_receiver_refuses_a_write_into_the_free_space_reserve(
    small_disk: tuple[Path, bool],  # first: unmounted after the worker stops
    start_worker: Callable[..., Worker],
    path: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Free space under reserve + size: 0xA700 "disk space reserve reached", nothing
    written; a smaller instance that fits is stored."""
    disk, mounted = small_disk
    if not mounted:  # simulation: 4 MiB free, whatever the real disk has
        monkeypatch.setattr(space, "free_bytes", lambda _path: 4 * MIB)
    worker = start_worker(path, data_dir=disk / "data", free_space_reserve_mb=2)
    data, uid = _ct()
    assoc = _associated(worker.port)
    _send_store(assoc, uid, _with_pixel_bytes(data, 3 * MIB))
    status, comment = _status_and_comment(assoc)
    assert (status, comment) == (StoreStatus.OUT_OF_RESOURCES, "disk space reserve reached")
    assert not _landed(worker.data_dir)
    small, small_uid = _ct()
    _send_store(assoc, small_uid, small)
    assert _status_and_comment(assoc)[0] == StoreStatus.SUCCESS
    assoc.release()
    assoc.close()


@pytest.mark.parametrize("path", PATHS)
def test_receiver_answers_a_full_disk_and_serves_once_space_returns(
    small_disk: tuple[Path, bool],  # first: unmounted after the worker stops
    start_worker: Callable[..., Worker],
    path: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ENOSPC from the write: 0xA700 "disk full", no file left behind (not even a temp
    file); once space is freed the next instance is stored. The free-space check is made
    to pass (another writer filling the disk between the check and the write looks so)."""
    disk, mounted = small_disk
    monkeypatch.setattr(space, "free_bytes", lambda _path: 1 << 40)
    worker = start_worker(path, data_dir=disk / "data", free_space_reserve_mb=0)
    assoc = _associated(worker.port)
    data, uid = _ct()
    too_big = _with_pixel_bytes(data, 6 * MIB)  # a 4 MiB disk
    if not mounted:  # simulation: every write fails as on a full disk
        import errno

        from vannah_pipelines.landing import layout

        real_write = os.write

        def full(fd: int, data: bytes | memoryview) -> int:
            raise OSError(errno.ENOSPC, "No space left on device (simulated)")

        monkeypatch.setattr(layout.os, "write", full)
    _send_store(assoc, uid, too_big)
    status, comment = _status_and_comment(assoc)
    assert (status, comment) == (StoreStatus.OUT_OF_RESOURCES, "disk full")
    assert not [p for p in _landed(worker.data_dir) if uid in p.name]
    if not mounted:
        monkeypatch.setattr(layout.os, "write", real_write)
    small, small_uid = _ct()
    _send_store(assoc, small_uid, small)
    assert _status_and_comment(assoc)[0] == StoreStatus.SUCCESS
    assoc.release()
    assoc.close()
    assert [p for p in _landed(worker.data_dir) if small_uid in p.name]


# --------------------------------------------------------------------------- 5. logs

SECRET_DATE = "1990-13-45"  # stands for a patient's date of birth: never logged or echoed


def _find(port: int, sop_class: str, identifier: Dataset) -> list[tuple[int, str]]:
    ae = AE(ae_title="LOGSCU")
    ae.add_requested_context(sop_class)
    assoc = ae.associate("127.0.0.1", port, ae_title="VANNAHCLOUD")
    try:
        assert assoc.is_established
        answers = [
            (int(status.Status), str(status.get("ErrorComment", "")))
            for status, _identifier in assoc.send_c_find(identifier, sop_class)
            if status
        ]
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()
    return answers


@pytest.mark.parametrize("model", ["study-root", "worklist"])
def test_query_refusals_name_the_attribute_not_its_value(
    receiver_process: Callable[..., ReceiverProcess], model: str
) -> None:
    """A C-FIND (Q/R or worklist) refused for a bad value: neither the Error Comment nor
    the receiver's log (INFO and above, as run) carries the value or the patient's name."""
    rx = receiver_process(workers=1)
    identifier = Dataset()
    identifier.PatientName = "Secret^Patient*"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid values on purpose
        identifier.PatientBirthDate = SECRET_DATE
        if model == "study-root":
            sop_class = STUDY_ROOT_FIND
            identifier.QueryRetrieveLevel = "STUDY"
            identifier.StudyInstanceUID = ""
        else:
            sop_class = MODALITY_WORKLIST_FIND
            identifier.ScheduledProcedureStepSequence = [Dataset()]
        answers = _find(rx.port, sop_class, identifier)
    assert len(answers) == 1, answers
    status, comment = answers[0]
    assert status in (0xA900, 0xC000), answers
    assert comment.startswith("PatientBirthDate"), comment
    assert SECRET_DATE not in comment and "Secret" not in comment, comment
    rx.stop()
    log = rx.log()
    assert "LOGSCU" in log  # the association was logged, by AE title
    # (the whole value: a pid such as 19907 in the log contains "1990")
    assert SECRET_DATE not in log and "Secret" not in log, log


# --------------------------------------------------------------------------- 4. bind address


def test_receiver_listens_on_dicom_host_only(
    receiver_process: Callable[..., ReceiverProcess],
) -> None:
    """VANNAH_DICOM_HOST picks the DIMSE bind address (127.0.0.2: not 127.0.0.1)."""
    rx = receiver_process(workers=1, env={"VANNAH_DICOM_HOST": "127.0.0.2"})
    ae = AE(ae_title="BINDSCU")
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("127.0.0.2", rx.port, ae_title="VANNAHCLOUD")
    try:
        assert assoc.is_established
        assert int(assoc.send_c_echo().Status) == 0
    finally:
        assoc.release()
        ae.shutdown()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", rx.port), timeout=DEADLINE).close()
