"""Faults during a move: a corrupt source, a run killed between steps, the object server
stopped mid-migration, a re-send of the study while it moves. Nothing is lost, no source is
deleted without a verified, recorded copy, and the next run completes without duplicates."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

from tests.conftest import S3_TEST_BUCKET, object_tier_settings
from tests.servers import S3Server, seaweedfs_server
from tests.storage.lifecycle_support import (
    days_later,
    ingest_study,
    instances,
    land_and_ingest,
    make_settings,
    read_all,
    study_bytes,
    study_tier,
)
from vannah_pipelines.catalog.reader import CatalogReader
from vannah_pipelines.dicom.synthetic import make_instance, to_part10
from vannah_pipelines.storage.base import Tier
from vannah_pipelines.storage.lifecycle import COPIED, RECORDED, pending_moves, run_lifecycle
from vannah_pipelines.storage.tiers import StorageTiers


class Killed(BaseException):
    """What a killed process would not get to handle: the run stops where it is."""


def _kill_at(step: str):  # type: ignore[no-untyped-def]
    def hook(at: str, study_uid: str) -> None:
        if at == step:
            raise Killed(study_uid)

    return hook


def _keys(settings, tier: Tier, study_uid: str) -> list[str]:  # type: ignore[no-untyped-def]
    return sorted(StorageTiers(settings)[tier].keys(f"{study_uid}/"))


def _location_rows(settings) -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
    reader = CatalogReader(settings.catalog_dir)
    try:
        return reader.query("SELECT sop_instance_uid, tier FROM instance_locations ORDER BY 1")
    finally:
        reader.close()


def test_a_corrupt_source_is_not_moved_nor_deleted_and_the_run_goes_on(
    tmp_path: Path, object_tiers: dict[str, object]
) -> None:
    settings = make_settings(tmp_path, object_tiers)
    study = ingest_study(settings, n=3)
    other = ingest_study(settings, n=2)
    bad = next(i for i in instances(settings, study.uid) if i.instance_number == 2)
    path = settings.hot_dir / bad.storage_key
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    path.write_bytes(bytes(data))

    result = run_lifecycle(settings, as_of=days_later(40), changed_by="test")
    [failed] = result.failed
    assert failed.study_uid == study.uid and failed.recorded == 2
    assert len(failed.failures) == 1 and bad.sop_instance_uid in failed.failures[0]
    assert "ChecksumMismatchError" in failed.failures[0]
    assert study_tier(settings, other.uid) == "warm"  # the other study moved all the same
    assert study_tier(settings, study.uid) == "mixed"
    tiers = {i.sop_instance_uid: i.tier for i in instances(settings, study.uid)}
    assert tiers[bad.sop_instance_uid] == "hot"
    sizes = {i.sop_instance_uid: i.size_bytes for i in instances(settings, study.uid)}
    per_tier = study_bytes(settings, study.uid)
    assert per_tier["hot"] == sizes[bad.sop_instance_uid] > 0
    assert per_tier["warm"] == per_tier["all"] - per_tier["hot"] > 0
    assert per_tier["cold"] == 0
    assert path.read_bytes() == bytes(data)  # kept, as it is, for an operator to look at
    assert bad.storage_key not in _keys(settings, Tier.WARM, study.uid)
    assert [p.study_uid for p in pending_moves(settings)] == [study.uid]
    # Every run reports it again until someone repairs it.
    again = run_lifecycle(settings, as_of=days_later(40), changed_by="test")
    assert [s.study_uid for s in again.failed] == [study.uid] and again.instances_moved == 0


def test_a_run_killed_after_the_copy_is_completed_by_the_next_without_duplicates(
    tmp_path: Path, object_tiers: dict[str, object]
) -> None:
    settings = make_settings(tmp_path, object_tiers)
    study = ingest_study(settings, n=3)
    with contextlib.suppress(Killed):
        run_lifecycle(settings, as_of=days_later(40), changed_by="test", hook=_kill_at(COPIED))
        raise AssertionError("not killed")
    # Copied, not recorded: the catalog still says hot, both copies are there.
    assert study_tier(settings, study.uid) == "hot"
    assert len(_keys(settings, Tier.WARM, study.uid)) == 3
    assert len(_keys(settings, Tier.HOT, study.uid)) == 3
    assert _location_rows(settings) == []
    assert read_all(settings, study.uid) == study.blobs

    result = run_lifecycle(settings, as_of=days_later(40), changed_by="test")
    [done] = result.studies
    assert (done.reused, done.copied, done.recorded, done.deleted) == (3, 0, 3, 3)
    assert study_tier(settings, study.uid) == "warm"
    assert _keys(settings, Tier.HOT, study.uid) == []
    assert [t for _, t in _location_rows(settings)] == ["warm"] * 3  # one row each
    assert read_all(settings, study.uid) == study.blobs
    assert pending_moves(settings) == []


def test_a_run_killed_after_the_append_leaves_the_sources_to_the_next(
    tmp_path: Path, object_tiers: dict[str, object]
) -> None:
    settings = make_settings(tmp_path, object_tiers)
    study = ingest_study(settings, n=2)
    with contextlib.suppress(Killed):
        run_lifecycle(settings, as_of=days_later(400), changed_by="test", hook=_kill_at(RECORDED))
        raise AssertionError("not killed")
    assert study_tier(settings, study.uid) == "cold"
    assert len(_keys(settings, Tier.HOT, study.uid)) == 2  # not deleted yet: still readable
    assert [p.study_uid for p in pending_moves(settings)] == [study.uid]

    result = run_lifecycle(settings, as_of=days_later(400), changed_by="test")
    [done] = result.studies
    assert result.moves[0].resumed and (done.recorded, done.deleted) == (0, 2)
    assert _keys(settings, Tier.HOT, study.uid) == [] and pending_moves(settings) == []
    assert [t for _, t in _location_rows(settings)] == ["cold"] * 2


def test_the_object_server_stopped_mid_migration_loses_nothing(
    tmp_path: Path, moto_s3: S3Server
) -> None:
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(seaweedfs_server(buckets=(S3_TEST_BUCKET,)))
        tiers = object_tier_settings(server, moto_s3)
        settings = make_settings(tmp_path, tiers, storage_timeout_seconds=2)
        first = ingest_study(settings, n=2)
        second = ingest_study(settings, n=2)
        stopped: list[str] = []

        def stop_server(step: str, study_uid: str) -> None:
            if step == COPIED and not stopped:
                stopped.append(study_uid)
                stack.close()  # the warm tier's server goes away mid-run

        result = run_lifecycle(settings, as_of=days_later(40), changed_by="test", hook=stop_server)
    assert stopped
    moved_first = stopped[0]
    blobs = {first.uid: first.blobs, second.uid: second.blobs}
    assert {s.study_uid for s in result.failed} == {first.uid, second.uid}
    for study_uid, sent in blobs.items():
        # Nothing deleted: every instance is still hot, and read whatever the catalog says
        # (the first study is recorded warm: the read falls back to the hot copy).
        assert len(_keys(settings, Tier.HOT, study_uid)) == 2
        assert read_all(settings, study_uid) == sent
    assert study_tier(settings, moved_first) == "warm"
    assert study_tier(settings, ({first.uid, second.uid} - {moved_first}).pop()) == "hot"
    assert {p.study_uid for p in pending_moves(settings)} == {first.uid, second.uid}


def test_a_resend_during_a_move_is_never_lost(
    tmp_path: Path, object_tiers: dict[str, object]
) -> None:
    settings = make_settings(tmp_path, object_tiers)
    study = ingest_study(settings, n=3)
    same, changed, untouched = sorted(
        instances(settings, study.uid), key=lambda i: i.instance_number or 0
    )
    ds = make_instance(
        "CT",
        study_uid=study.uid,
        series_uid=changed.series_instance_uid,
        instance_number=changed.instance_number or 0,
        rows=16,
        columns=16,
        seed=99,
        SOPInstanceUID=changed.sop_instance_uid,
    )
    new_bytes = to_part10(ds)
    assert new_bytes != study.blobs[changed.sop_instance_uid]

    def resend(step: str, study_uid: str) -> None:
        if step == COPIED:  # copied, not recorded yet: the modality sends the study again
            land_and_ingest(
                settings,
                [
                    (same.sop_instance_uid, study.blobs[same.sop_instance_uid]),
                    (changed.sop_instance_uid, new_bytes),
                ],
            )

    result = run_lifecycle(settings, as_of=days_later(40), changed_by="test", hook=resend)
    assert not result.failed
    now = {i.sop_instance_uid: i for i in instances(settings, study.uid)}
    # The new version of `changed` is current, and hot; the identical re-send is the same
    # version, which the move's location row places in the warm tier.
    assert now[changed.sop_instance_uid].tier == "hot"
    assert now[changed.sop_instance_uid].checksum != changed.checksum
    assert now[same.sop_instance_uid].tier == now[untouched.sop_instance_uid].tier == "warm"
    assert study_tier(settings, study.uid) == "mixed"
    expected = dict(study.blobs) | {changed.sop_instance_uid: new_bytes}
    assert read_all(settings, study.uid) == expected
    hot = _keys(settings, Tier.HOT, study.uid)
    assert now[changed.sop_instance_uid].storage_key in hot  # a current row uses it
    assert changed.storage_key in hot  # the superseded version is left alone
    assert same.storage_key not in hot and untouched.storage_key not in hot

    # The next run moves the new version; nothing is left to do after it.
    later = run_lifecycle(settings, as_of=days_later(40), changed_by="test")
    assert [s.recorded for s in later.studies] == [1] and not later.failed
    assert study_tier(settings, study.uid) == "warm"
    assert read_all(settings, study.uid) == expected
    assert run_lifecycle(settings, as_of=days_later(40), changed_by="test").moves == []


def test_identical_bytes_resent_after_a_move_leave_no_stray_hot_copy(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    study = ingest_study(settings, n=2)
    assert run_lifecycle(settings, as_of=days_later(40), changed_by="test").instances_moved == 2
    sop, data = next(iter(study.blobs.items()))
    land_and_ingest(settings, [(sop, data)])  # the same version again: the same object
    assert len(_keys(settings, Tier.HOT, study.uid)) == 1
    assert study_tier(settings, study.uid) == "warm"  # the move's location row still wins

    result = run_lifecycle(settings, as_of=days_later(40), changed_by="test")
    [done] = result.studies
    assert result.moves[0].resumed and (done.recorded, done.deleted) == (0, 1)
    assert _keys(settings, Tier.HOT, study.uid) == []
    assert read_all(settings, study.uid) == study.blobs
    assert run_lifecycle(settings, as_of=days_later(40), changed_by="test").moves == []


def _weed_pid(server: S3Server) -> int:
    """The pid of the `weed server` this test started (found by its S3 port)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"weed") and f"-s3.port={server.port}".encode() in argv:
            return int(proc.name)
    raise AssertionError("weed server process not found")


def test_an_object_server_that_hangs_mid_migration_then_resumes_is_completed_next_run(
    tmp_path: Path, moto_s3: S3Server
) -> None:
    with seaweedfs_server(buckets=(S3_TEST_BUCKET,)) as server:
        pid = _weed_pid(server)
        settings = make_settings(
            tmp_path, object_tier_settings(server, moto_s3), storage_timeout_seconds=1
        )
        first = ingest_study(settings, n=1)
        second = ingest_study(settings, n=1)
        paused: list[str] = []

        def pause(step: str, study_uid: str) -> None:
            if step == COPIED and not paused:
                paused.append(study_uid)
                os.kill(pid, signal.SIGSTOP)  # answers nothing: every call times out

        try:
            result = run_lifecycle(settings, as_of=days_later(40), changed_by="t", hook=pause)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert paused and {s.study_uid for s in result.failed} == {first.uid, second.uid}
        for study in (first, second):
            assert len(_keys(settings, Tier.HOT, study.uid)) == 1  # nothing deleted
            assert read_all(settings, study.uid) == study.blobs

        again = run_lifecycle(settings, as_of=days_later(40), changed_by="t")
        assert not again.failed and again.objects_deleted == 2
        for study in (first, second):
            assert study_tier(settings, study.uid) == "warm"
            assert _keys(settings, Tier.HOT, study.uid) == []
            assert read_all(settings, study.uid) == study.blobs
        assert sorted(t for _, t in _location_rows(settings)) == ["warm", "warm"]
        assert pending_moves(settings) == []
