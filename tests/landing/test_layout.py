"""Landing zone: atomic writes, sealing by size and age, stranded batches after a crash."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from vannah_pipelines.dicom.synthetic import make_instance, to_part10
from vannah_pipelines.errors import LandingError, UnsafeUidError
from vannah_pipelines.landing import layout
from vannah_pipelines.landing.layout import (
    Batch,
    InvalidBatchIdError,
    LandingZone,
    ReceiveFacts,
    RollingBatch,
    batch_time,
    require_batch_id,
    write_atomic,
)


def _facts(uid: str) -> ReceiveFacts:
    return ReceiveFacts(
        uid, "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1", "dimse", calling_ae="MODALITY"
    )


def test_write_atomic_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "x.dcm"
    write_atomic(target, b"abc")
    write_atomic(target, b"defg")
    assert target.read_bytes() == b"defg"
    assert [p.name for p in tmp_path.iterdir()] == ["x.dcm"]


def test_write_atomic_failure_cleans_up(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "x.dcm"  # parent missing: the open fails
    with pytest.raises(OSError):
        write_atomic(target, b"abc")
    assert not (tmp_path / "sub").exists()


def test_open_batch_write_and_seal(tmp_path: Path) -> None:
    zone = LandingZone(tmp_path)
    batch = zone.open_batch("dimse")
    ds = make_instance("CT", rows=8, columns=8)
    data = to_part10(ds)
    batch.write_instance(data, _facts(ds.SOPInstanceUID))
    assert zone.sealed_batches() == []
    sealed = batch.seal()
    assert sealed is not None and zone.sealed_batches() == [sealed]
    [landed] = sealed.instances()
    assert landed.path.read_bytes() == data
    assert landed.facts is not None and landed.facts.calling_ae == "MODALITY"
    assert not list(zone.open_dir.iterdir())


def test_open_batch_refuses_unsafe_uid_and_writes_nothing(tmp_path: Path) -> None:
    zone = LandingZone(tmp_path)
    batch = zone.open_batch("dimse")
    with pytest.raises(UnsafeUidError):
        batch.write_instance(b"x", _facts("../../evil"))
    assert batch.seal() is None  # empty: removed, not sealed
    assert zone.sealed_batches() == []
    assert {p.name for p in tmp_path.rglob("*")} == {"open", "sealed"}


def test_rolling_batch_seals_by_size_and_age(tmp_path: Path) -> None:
    zone = LandingZone(tmp_path)
    rolling = RollingBatch(zone, "dimse", max_files=3, max_age=0.3)
    try:
        for _ in range(7):
            ds = make_instance("CT", rows=8, columns=8)
            rolling.write_instance(to_part10(ds), _facts(ds.SOPInstanceUID))
        assert [len(b.instances()) for b in zone.sealed_batches()] == [3, 3]
        deadline = time.monotonic() + 10
        while len(zone.sealed_batches()) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)  # the age timer seals the last, partial batch
        assert [len(b.instances()) for b in zone.sealed_batches()] == [3, 3, 1]
    finally:
        rolling.close()


_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from vannah_pipelines.dicom.synthetic import make_instance, to_part10
    from vannah_pipelines.landing.layout import LandingZone, ReceiveFacts
    batch = LandingZone(Path(sys.argv[1])).open_batch("dimse")
    for _ in range(3):
        ds = make_instance("CT", rows=8, columns=8)
        batch.write_instance(to_part10(ds), ReceiveFacts(ds.SOPInstanceUID, ds.SOPClassUID,
                             "1.2.840.10008.1.2.1", "dimse"))
    print("ready", flush=True)
    time.sleep(600)
    """
)


def test_seal_stranded_seals_only_batches_of_dead_writers(tmp_path: Path) -> None:
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
        zone = LandingZone(tmp_path)
        assert zone.seal_stranded() == []  # alive: its lock is held
        assert zone.sealed_batches() == []
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
    [sealed] = zone.seal_stranded()
    assert len(sealed.instances()) == 3
    assert zone.sealed_batches() == [sealed]
    assert not list(zone.open_dir.iterdir())


@pytest.mark.parametrize("bad", ["../x", "20260101T000000000000-dimse-1-0/../../", "", None])
def test_require_batch_id_rejects_paths(bad: object) -> None:
    with pytest.raises(InvalidBatchIdError):
        require_batch_id(bad)


def test_resend_within_a_batch_keeps_every_version(tmp_path: Path) -> None:
    zone = LandingZone(tmp_path)
    batch = zone.open_batch("dimse")
    first = make_instance("CT", rows=8, columns=8)
    second = make_instance(
        "CT", rows=8, columns=8, SOPInstanceUID=first.SOPInstanceUID, SeriesDescription="again"
    )
    batch.write_instance(to_part10(first), _facts(first.SOPInstanceUID))
    batch.write_instance(to_part10(second), _facts(first.SOPInstanceUID))
    sealed = batch.seal()
    assert sealed is not None
    landed = sealed.instances()
    assert [i.sop_instance_uid for i in landed] == [first.SOPInstanceUID] * 2
    assert [i.path.read_bytes() for i in landed] == [to_part10(first), to_part10(second)]
    assert all(i.facts is not None for i in landed)


def _land(zone: LandingZone, n: int) -> list[str]:
    batch = zone.open_batch("dimse")
    uids = []
    for _ in range(n):
        ds = make_instance("CT", rows=8, columns=8)
        batch.write_instance(to_part10(ds), _facts(ds.SOPInstanceUID))
        uids.append(ds.SOPInstanceUID)
    assert batch.seal() is not None
    return uids


def test_split_moves_files_into_new_sealed_batches_with_their_receipts(tmp_path: Path) -> None:
    zone = LandingZone(tmp_path)
    uids = _land(zone, 5)
    [original] = zone.sealed_batches()
    halves = zone.split(original)
    assert [len(h.instances()) for h in halves] == [3, 2]
    assert zone.sealed_batches() == sorted(halves, key=lambda b: b.batch_id)
    assert not original.path.exists()
    landed = [i for h in halves for i in h.instances()]
    assert sorted(i.sop_instance_uid for i in landed) == sorted(uids)
    assert all(i.facts is not None and i.facts.calling_ae == "MODALITY" for i in landed)
    for half in halves:  # same seal time (arrival day, backlog age), source "split"
        assert batch_time(half.batch_id) == batch_time(original.batch_id)
        assert half.batch_id.split("-")[1] == "split"
    assert not list(zone.open_dir.iterdir())
    with pytest.raises(LandingError):
        zone.split(_single(zone))


def _single(zone: LandingZone) -> Batch:
    _land(zone, 1)
    return zone.sealed_batches()[-1]


def test_seal_stranded_recovers_a_tmp_batch_folder_holding_committed_files(
    tmp_path: Path,
) -> None:
    zone = LandingZone(tmp_path).ensure()
    stranded = zone.open_dir / ".tmp-20260101T000000000000-dimse-99-0"
    stranded.mkdir()
    (stranded / ".lock").touch()  # its writer died: nobody holds the lock
    ds = make_instance("CT", rows=8, columns=8)
    (stranded / f"{ds.SOPInstanceUID}.dcm").write_bytes(to_part10(ds))
    (stranded / ".tmp-1.2.3.dcm.5.6").write_bytes(b"half a file")  # never committed
    empty_fresh = zone.open_dir / ".tmp-20260101T000000000001-dimse-99-1"
    empty_fresh.mkdir()  # a live writer between mkdir and rename: left alone
    [sealed] = zone.seal_stranded()
    assert [i.sop_instance_uid for i in sealed.instances()] == [ds.SOPInstanceUID]
    assert sealed.batch_id.split("-")[1] == "dimse"
    assert [p.name for p in sealed.path.iterdir()] == [f"{ds.SOPInstanceUID}.dcm"]
    assert [p.name for p in zone.open_dir.iterdir()] == [empty_fresh.name]


def test_new_folders_are_made_durable(tmp_path: Path, synced_dirs: list[Path]) -> None:
    synced = synced_dirs
    synced.clear()
    zone = LandingZone(tmp_path / "landing")
    zone.ensure()
    assert {tmp_path, tmp_path / "landing"} <= set(synced)  # parents of the new folders
    synced.clear()
    batch = zone.open_batch("dimse")
    assert synced.count(zone.open_dir) >= 2  # tmp mkdir, then the rename
    synced.clear()
    ds = make_instance("CT", rows=8, columns=8)
    batch.write_instance(to_part10(ds), _facts(ds.SOPInstanceUID))
    sealed = batch.seal()
    assert sealed is not None
    assert {zone.sealed_dir, zone.open_dir} <= set(synced)  # move_to_sealed


def test_make_dirs_syncs_the_parent_of_every_new_level(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[Path] = []
    monkeypatch.setattr(layout, "fsync_dir", lambda p: synced.append(Path(p)))
    layout.make_dirs(tmp_path / "a" / "b" / "c")
    assert synced == [tmp_path, tmp_path / "a", tmp_path / "a" / "b"]
    synced.clear()
    layout.make_dirs(tmp_path / "a" / "b")
    assert synced == []
