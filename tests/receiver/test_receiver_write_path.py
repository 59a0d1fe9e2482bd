"""The C-STORE write path: Part-10 header, multi-part atomic writes, parallel durable commits."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from pydicom.uid import UID
from pynetdicom.dsutils import create_file_meta, encode_file_meta

import vannah_pipelines.landing.layout as layout
from receiver.part10 import file_header
from vannah_pipelines.dicom.synthetic import make_instance, to_part10
from vannah_pipelines.landing.layout import (
    DirectorySync,
    LandingZone,
    ReceiveFacts,
    write_atomic,
)


@pytest.mark.parametrize(
    ("sop_class", "sop_instance", "transfer_syntax"),
    [
        ("1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.840.10008.1.2.1"),  # odd UIDs: padded
        ("1.2.840.10008.5.1.4.1.1.4", "1.2.33", "1.2.840.10008.1.2"),  # even
        ("1.2.840.10008.5.1.4.1.1.7", "2.25." + "9" * 59, "1.2.840.10008.1.2.1.99"),
        ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "1.2.840.10008.1.2.4.50"),
    ],
)
def test_file_header_matches_pynetdicoms_file_meta(
    sop_class: str, sop_instance: str, transfer_syntax: str
) -> None:
    """Landed files stay byte-identical to ``event.encoded_dataset(include_meta=True)``."""
    meta = create_file_meta(
        sop_class_uid=UID(sop_class),
        sop_instance_uid=UID(sop_instance),
        transfer_syntax=UID(transfer_syntax),
    )
    assert file_header(sop_class, sop_instance, transfer_syntax) == (
        b"\x00" * 128 + b"DICM" + encode_file_meta(meta)
    )


def test_write_atomic_writes_parts_back_to_back(tmp_path: Path) -> None:
    target = tmp_path / "x.dcm"
    body = bytearray(b"0123456789" * 1000)
    write_atomic(target, (b"head", memoryview(body)[10:], b""))
    assert target.read_bytes() == b"head" + bytes(body[10:])
    assert [p.name for p in tmp_path.iterdir()] == ["x.dcm"]


def _facts(uid: str) -> ReceiveFacts:
    return ReceiveFacts(uid, "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1", "dimse")


def test_directory_sync_shares_fsyncs_and_never_returns_early(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every caller returns after an fsync that started after its call (group commit)."""
    syncs: list[tuple[float, float]] = []
    lock = threading.Lock()

    def slow_fsync_dir(path: Path) -> None:
        start = time.monotonic()
        time.sleep(0.01)
        with lock:
            syncs.append((start, time.monotonic()))

    monkeypatch.setattr(layout, "fsync_dir", slow_fsync_dir)
    group = DirectorySync(tmp_path)
    calls: list[tuple[float, float]] = []

    def caller() -> None:
        for _ in range(5):
            called = time.monotonic()
            group.sync()
            with lock:
                calls.append((called, time.monotonic()))

    threads = [threading.Thread(target=caller) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 40
    assert len(syncs) < 40  # shared
    for called, returned in calls:
        assert any(called <= start and end <= returned for start, end in syncs)


def test_directory_sync_error_reaches_the_caller_and_later_syncs_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    group = DirectorySync(tmp_path)
    real = layout.fsync_dir

    def failing(path: Path) -> None:
        raise OSError(5, "I/O error")

    monkeypatch.setattr(layout, "fsync_dir", failing)
    with pytest.raises(OSError):
        group.sync()
    monkeypatch.setattr(layout, "fsync_dir", real)
    group.sync()


def test_concurrent_writes_into_one_batch_all_land(tmp_path: Path) -> None:
    zone = LandingZone(tmp_path)
    batch = zone.open_batch("dimse")
    instances = [make_instance("CT", rows=8, columns=8) for _ in range(40)]
    errors: list[BaseException] = []

    def write(chunk: list[object]) -> None:
        try:
            for ds in chunk:
                data = to_part10(ds)
                batch.write_instance((data[:200], data[200:]), _facts(ds.SOPInstanceUID))  # type: ignore[attr-defined]
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(instances[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert batch.count == 40
    sealed = batch.seal()
    assert sealed is not None
    landed = {i.sop_instance_uid: i for i in sealed.instances()}
    assert len(landed) == 40
    for ds in instances:
        instance = landed[ds.SOPInstanceUID]
        assert instance.path.read_bytes() == to_part10(ds)
        assert instance.facts is not None


def test_seal_waits_for_a_write_in_flight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write admitted before the seal lands inside the sealed batch, never outside it."""
    zone = LandingZone(tmp_path)
    batch = zone.open_batch("dimse")
    writing = threading.Event()
    release = threading.Event()
    real = layout.write_atomic

    def slow_write_atomic(path: Path, data: object, *, sync_dir: bool = True) -> None:
        writing.set()
        assert release.wait(10)
        real(path, data, sync_dir=sync_dir)  # type: ignore[arg-type]

    monkeypatch.setattr(layout, "write_atomic", slow_write_atomic)
    ds = make_instance("CT", rows=8, columns=8)
    writer = threading.Thread(
        target=batch.write_instance, args=(to_part10(ds), _facts(ds.SOPInstanceUID))
    )
    writer.start()
    assert writing.wait(10)
    sealed: list[object] = []
    sealer = threading.Thread(target=lambda: sealed.append(batch.seal()))
    sealer.start()
    time.sleep(0.1)
    assert sealer.is_alive()  # waiting for the write
    release.set()
    writer.join(10)
    sealer.join(10)
    [result] = sealed
    assert isinstance(result, layout.Batch)
    [instance] = result.instances()
    assert instance.path.read_bytes() == to_part10(ds)
    assert not list(zone.open_dir.iterdir())
