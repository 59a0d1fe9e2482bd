"""The readers' overlay of landed instances: rows as ingest makes them, visible until
ingested, bytes found wherever the file is, parsed once, bounded."""

import hashlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from tests.catalog.conftest import poisoned_instance, pydicom_test_files
from vannah_pipelines.catalog import landed as landed_module
from vannah_pipelines.catalog.ingest import IngestPaths, ingest_batches
from vannah_pipelines.catalog.landed import (
    LANDING_TIER,
    LandedIndex,
    LandedKeyError,
    LandedNotFoundError,
    open_landed,
)
from vannah_pipelines.catalog.schema import INSTANCE_SCHEMA, TABLES
from vannah_pipelines.dicom.synthetic import make_instance, to_part10
from vannah_pipelines.errors import NotFoundError, VannahError
from vannah_pipelines.landing.layout import LandingZone, OpenBatch, ReceiveFacts, RollingBatch
from vannah_pipelines.storage.base import instance_key
from vannah_pipelines.storage.local import LocalStorage

# Columns the overlay sets itself; every other one is exactly what ingest indexes.
_OVERLAY_OWN = {"tier", "storage_key", "indexed_at", "batch_id"}


def _facts(uid: str, ae: str = "MODALITY1") -> ReceiveFacts:
    return ReceiveFacts(
        uid,
        "1.2.840.10008.5.1.4.1.1.2",
        "1.2.840.10008.1.2.1",
        "dimse",
        calling_ae=ae,
        called_ae="VANNAHCLOUD",
        peer="127.0.0.1:1",
    )


def _write(batch: OpenBatch | RollingBatch, blobs: list[tuple[str, bytes]]) -> None:
    for uid, data in blobs:
        batch.write_instance(data, _facts(uid))


def _study(count: int, modality: str = "CT", size: int = 16) -> list[tuple[str, bytes]]:
    study = make_instance(modality).StudyInstanceUID
    series = make_instance(modality).SeriesInstanceUID
    blobs = []
    for i in range(count):
        ds = make_instance(
            modality,
            study_uid=study,
            series_uid=series,
            instance_number=i + 1,
            rows=size,
            columns=size,
        )
        blobs.append((str(ds.SOPInstanceUID), to_part10(ds)))
    return blobs


def test_landed_index_rows_are_the_rows_ingest_indexes(paths: IngestPaths) -> None:
    """pydicom's test files (several transfer syntaxes, re-sends of one UID, files ingest
    quarantines) and a synthetic study, landed as the receiver lands them: the overlay
    holds exactly what ingest then indexes, column for column."""
    zone = LandingZone(paths.landing_dir)
    batch = zone.open_batch("dimse")
    blobs = [(pydicom_uid(f), f.read_bytes()) for f in pydicom_test_files()]
    blobs += _study(3, "MR")
    _write(batch, blobs)
    index = LandedIndex(paths.landing_dir, 1000)
    assert index.refresh() and index.version == 1
    rows = index.rows()
    assert rows.schema == TABLES["instances"] == INSTANCE_SCHEMA
    assert index.parses == len(blobs)
    for row in rows.to_pylist():
        assert row["tier"] == LANDING_TIER and row["indexed_at"] is None
        assert row["batch_id"] == batch.batch_id
        assert row["storage_key"].startswith(f"open/{batch.batch_id}/")
        data = (paths.landing_dir / row["storage_key"]).read_bytes()
        assert row["checksum"] == hashlib.sha256(data).hexdigest()
        assert row["size_bytes"] == len(data)
        assert (row["calling_ae"], row["source"]) == ("MODALITY1", "dimse")

    sealed = batch.seal()
    assert sealed is not None
    assert index.refresh()  # moved: new key and batch id, not parsed again
    assert index.parses == len(blobs)
    before = index.rows().to_pylist()
    assert {r["batch_id"] for r in before} == {sealed.batch_id}

    result = ingest_batches(paths, [sealed.batch_id])
    indexed = pq.read_table(result.catalog_files[0]).to_pylist()
    assert result.instances == len(indexed) == len(before) > 50
    assert result.quarantined == len(blobs) - len(before) > 0  # left out of both

    def own(rows: list[dict[str, Any]]) -> list[tuple[tuple[str, str], ...]]:
        return sorted(
            tuple((c, repr(v)) for c, v in r.items() if c not in _OVERLAY_OWN) for r in rows
        )

    assert own(before) == own(indexed)  # column for column, every version
    hot_keys = {r["storage_key"] for r in indexed}
    for row in before:
        assert row["batch_id"] == indexed[0]["batch_id"]
        assert (
            instance_key(
                row["study_instance_uid"],
                row["series_instance_uid"],
                row["sop_instance_uid"],
                row["checksum"],
            )
            in hot_keys
        )
    assert index.refresh() and index.rows().num_rows == 0  # ingested: forgotten


def pydicom_uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True, force=True).SOPInstanceUID)


def test_landed_index_sealed_batch_stays_visible_and_openable_then_ingest_hands_over(
    paths: IngestPaths,
) -> None:
    zone = LandingZone(paths.landing_dir)
    batch = zone.open_batch("dimse")
    blobs = _study(3)
    _write(batch, blobs)
    index = LandedIndex(paths.landing_dir, 100)
    index.refresh()
    stale = index.rows().to_pylist()  # a reader may hold these keys across the seal
    assert len(stale) == 3

    def read(row: dict[str, Any]) -> bytes:
        with open_landed(
            paths.landing_dir,
            paths.hot_dir,
            row["storage_key"],
            row["checksum"],
            row["study_instance_uid"],
            row["series_instance_uid"],
            row["sop_instance_uid"],
        ) as handle:
            return handle.read()

    sent = dict(blobs)
    assert all(read(r) == sent[r["sop_instance_uid"]] for r in stale)

    sealed = batch.seal()  # renamed to sealed/<new id>
    assert sealed is not None and sealed.batch_id != batch.batch_id
    assert index.refresh()
    rows = index.rows().to_pylist()
    assert {r["storage_key"] for r in rows} == {f"sealed/{sealed.batch_id}/{u}.dcm" for u in sent}
    assert index.parses == 3
    assert all(read(r) == sent[r["sop_instance_uid"]] for r in rows + stale)

    ingest_batches(paths, [sealed.batch_id])
    assert not (paths.landing_dir / "sealed" / sealed.batch_id).exists()
    assert all(read(r) == sent[r["sop_instance_uid"]] for r in rows + stale)  # hot tier
    assert index.refresh() and index.rows().num_rows == 0


def test_landed_index_follows_a_split_and_a_stranded_batch_without_parsing_again(
    paths: IngestPaths,
) -> None:
    zone = LandingZone(paths.landing_dir)
    batch = zone.open_batch("dimse")
    _write(batch, _study(4))
    index = LandedIndex(paths.landing_dir, 100)
    index.refresh()
    sealed = batch.seal()
    assert sealed is not None
    halves = zone.split(sealed)
    assert index.refresh()
    rows = index.rows().to_pylist()
    assert sorted(r["batch_id"] for r in rows) == sorted([h.batch_id for h in halves] * 2)
    for r in rows:
        assert r["storage_key"] == f"sealed/{r['batch_id']}/{r['sop_instance_uid']}.dcm"
        assert (paths.landing_dir / r["storage_key"]).is_file()
    # A writer that died: another process seals its open batch.
    dead = zone.open_batch("dimse")
    _write(dead, _study(2))
    assert index.refresh() and index.rows().num_rows == 6
    os.close(dead._lock_fd)  # the writer dies: its flock goes
    [stranded] = zone.seal_stranded()
    assert index.refresh()
    keys = index.rows().column("storage_key").to_pylist()
    assert sum(k.startswith(f"sealed/{stranded.batch_id}/") for k in keys) == 2
    assert index.parses == 6


def test_landed_index_leaves_out_files_that_fail_to_parse(paths: IngestPaths) -> None:
    zone = LandingZone(paths.landing_dir)
    batch = zone.open_batch("dimse")
    good = _study(2)
    poison_uid, poison = poisoned_instance()
    truncated = _study(1)[0]
    other = make_instance("CT", rows=8, columns=8)
    bad = [
        (poison_uid, poison),  # pydicom raises BytesLengthException
        (truncated[0], truncated[1][: len(truncated[1]) // 2]),  # truncated pixel data
        ("1.2.3.4.5", b"not dicom at all" * 10),
        ("1.2.3.4.6", to_part10(other)),  # sent under another SOP Instance UID
    ]
    _write(batch, good + bad)
    index = LandedIndex(paths.landing_dir, 100)
    assert index.refresh()
    assert sorted(index.rows().column("sop_instance_uid").to_pylist()) == sorted(u for u, _ in good)
    assert index.parses == 6
    _write(batch, _study(1))
    assert index.refresh()
    assert index.parses == 7  # the bad ones are not parsed again
    sealed = batch.seal()
    assert sealed is not None
    result = ingest_batches(paths, [sealed.batch_id])
    assert (result.instances, result.quarantined) == (3, 4)  # ingest agrees


def test_landed_index_holds_at_most_max_instances_oldest_batches_first(
    paths: IngestPaths, caplog: pytest.LogCaptureFixture
) -> None:
    zone = LandingZone(paths.landing_dir)
    batches = []
    for _ in range(3):
        batch = zone.open_batch("dimse")
        _write(batch, _study(3))
        batches.append(batch)
    index = LandedIndex(paths.landing_dir, 5)
    with caplog.at_level(logging.WARNING, logger=landed_module.__name__):
        assert index.refresh()
    held = index.rows().column("batch_id").to_pylist()
    assert sorted(held) == sorted([batches[0].batch_id] * 3 + [batches[1].batch_id] * 2)
    assert index.parses == 5  # what is not held is not parsed either
    assert "landed overlay full" in caplog.text
    assert not index.refresh()  # nothing changed, still full: no parse, no change
    assert index.parses == 5

    sealed1 = batches[1].seal()  # its 2 held files move; the third one still waits
    assert sealed1 is not None
    assert index.refresh()
    held = index.rows().column("batch_id").to_pylist()
    assert sorted(held) == sorted([batches[0].batch_id] * 3 + [sealed1.batch_id] * 2)
    assert index.parses == 5

    sealed0 = batches[0].seal()
    assert sealed0 is not None
    ingest_batches(paths, [sealed0.batch_id])
    assert index.refresh()  # room: the sealed batch's last file first, then the oldest open
    rows = index.rows().to_pylist()
    assert sorted(r["batch_id"] for r in rows) == sorted(
        [sealed1.batch_id] * 3 + [batches[2].batch_id] * 2
    )
    assert index.parses == 8
    for row in rows:
        data = (paths.landing_dir / row["storage_key"]).read_bytes()
        assert row["checksum"] == hashlib.sha256(data).hexdigest()
        assert row["sop_instance_uid"] in row["storage_key"]


def test_landed_index_unchanged_refresh_parses_nothing(paths: IngestPaths) -> None:
    zone = LandingZone(paths.landing_dir)
    batch = zone.open_batch("stow")
    _write(batch, _study(2))
    index = LandedIndex(paths.landing_dir, 100)
    assert index.refresh()
    version, parses = index.version, index.parses
    for _ in range(20):
        assert not index.refresh()
    assert (index.version, index.parses) == (version, parses) == (1, 2)
    # A file renamed in within the same timestamp tick leaves the folder's mtime as it
    # was: a folder changed less than 2 s before it was listed is listed again.
    mtime = batch.path.stat().st_mtime_ns
    _write(batch, _study(1))
    os.utime(batch.path, ns=(mtime, mtime))
    assert index.refresh()
    assert (index.version, index.parses, index.rows().num_rows) == (2, 3, 3)


def test_landed_index_refreshed_by_many_threads_parses_each_file_once(
    paths: IngestPaths,
) -> None:
    """The receiver's rolling batch seals by age while readers refresh from 4 threads:
    every instance is visible once its write returns, and parsed once."""
    zone = LandingZone(paths.landing_dir)
    rolling = RollingBatch(zone, "dimse", max_files=7, max_age=0.05)
    index = LandedIndex(paths.landing_dir, 1000)
    stop = threading.Event()
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            while not stop.is_set():
                index.refresh()
                index.rows().num_rows  # noqa: B018
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    sent: list[str] = []
    try:
        for _ in range(10):
            blobs = _study(3, size=8)
            _write(rolling, blobs)
            sent += [u for u, _ in blobs]
            index.refresh()  # acknowledged, then a query: it must see them
            visible = set(index.rows().column("sop_instance_uid").to_pylist())
            assert visible >= set(sent)
            time.sleep(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join()
        rolling.close()
    assert not errors
    index.refresh()
    assert sorted(index.rows().column("sop_instance_uid").to_pylist()) == sorted(sent)
    assert index.parses == len(sent)
    assert all(k.startswith("sealed/") for k in index.rows().column("storage_key").to_pylist())


def test_open_landed_refuses_keys_that_are_not_landed_files(paths: IngestPaths) -> None:
    ds = make_instance("CT", rows=8, columns=8)
    sop, study, series = ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID
    checksum = "ab" * 32
    bid = "20260101T000000000000-dimse-12-0"
    for key in (
        f"open/{bid}/../../../hot/{sop}.dcm",
        f"/etc/{bid}/{sop}.dcm",
        f"hot/{bid}/{sop}.dcm",
        f"open/../{sop}.dcm",
        f"open/not-a-batch/{sop}.dcm",
        f"open/{bid}/1.2.3.dcm",  # another SOP's file
        f"open/{bid}/{sop}.txt",
        f"open/{bid}//{sop}.dcm",
        f"open/{bid}/{sop}.dcm/",
        "",
    ):
        with pytest.raises(LandedKeyError):
            open_landed(paths.landing_dir, paths.hot_dir, key, checksum, study, series, sop)
    with pytest.raises(LandedKeyError):
        open_landed(
            paths.landing_dir, paths.hot_dir, f"open/{bid}/{sop}.dcm", "../x", study, series, sop
        )
    with pytest.raises(VannahError):  # a UID that is not a UID
        open_landed(
            paths.landing_dir, paths.hot_dir, f"open/{bid}/{sop}.dcm", checksum, "../1", series, sop
        )
    with pytest.raises(LandedNotFoundError) as caught:
        open_landed(
            paths.landing_dir,
            LocalStorage(paths.hot_dir),
            f"sealed/{bid}/{sop}~2.dcm",
            checksum,
            study,
            series,
            sop,
        )
    assert isinstance(caught.value, NotFoundError)  # the services' 404


def _settle(*folders: Path) -> None:
    """Date folders 10 s back, as a landing zone nobody wrote to for a while."""
    old = time.time_ns() - 10_000_000_000
    for folder in folders:
        os.utime(folder, ns=(old, old))


def test_landed_index_refresh_and_parse_costs(paths: IngestPaths) -> None:
    """Measured, not asserted: printed with ``pytest -s``."""
    zone = LandingZone(paths.landing_dir)
    open_batches = []
    for _ in range(50):
        batch = zone.open_batch("dimse")
        _write(batch, _study(2, size=8))
        open_batches.append(batch)
    index = LandedIndex(paths.landing_dir, 20_000)
    index.refresh()
    assert index.rows().num_rows == 100

    def per_refresh(n: int = 2000) -> float:
        start = time.perf_counter()
        for _ in range(n):
            index.refresh()
        return (time.perf_counter() - start) / n * 1e6

    fresh = per_refresh(200)  # every batch folder written < 2 s ago: listed again
    _settle(zone.open_dir, zone.sealed_dir, *(b.path for b in open_batches))
    index.refresh()
    parses = index.parses
    settled = per_refresh()
    assert index.parses == parses
    print(
        f"\nrefresh, unchanged, 50 open batches: {settled:.1f} us settled, "
        f"{fresh:.1f} us within 2 s of their last write"
    )

    for modality, size, count in (("CT", 512, 20), ("MR", 256, 40), ("CT", 16, 100)):
        batch = zone.open_batch("dimse")
        blobs = _study(count, modality, size)
        _write(batch, blobs)
        before = index.parses
        start = time.perf_counter()
        index.refresh()
        took = time.perf_counter() - start
        assert index.parses - before == count
        kib = len(blobs[0][1]) / 1024
        print(
            f"parse {modality} {size}x{size} ({kib:.0f} KiB): "
            f"{took / count * 1000:.2f} ms/instance (refresh of {count} new files)"
        )
    rows = index.rows()
    print(f"overlay rows: {rows.num_rows}, {rows.nbytes / 1024:.0f} KiB of Arrow data")


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_a_landed_file_over_the_bound_is_left_to_ingest_unread(paths: IngestPaths) -> None:
    """The worst case a reader meets: a landed file as large as the receiver accepts. It is
    never read by the overlay (each reading process would hold it whole): the process's
    memory stays flat, and the small files beside it answer (it answers once ingested)."""
    zone = LandingZone(paths.landing_dir)
    batch = zone.open_batch("dimse")
    small = _study(1)
    big = make_instance("CT", rows=16, columns=16)
    data = to_part10(big) + b"\0" * (300 * 1024**2)  # 300 MiB: trailing padding
    _write(batch, [*small, (str(big.SOPInstanceUID), data)])
    del data
    index = LandedIndex(paths.landing_dir, 100, max_file_bytes=64 * 1024**2)
    before = _rss_mib()
    assert index.refresh()
    grew = _rss_mib() - before
    assert index.rows().column("sop_instance_uid").to_pylist() == [small[0][0]]
    assert index.parses == 1  # the big file was not read
    assert grew < 50, f"RSS grew {grew:.0f} MiB"
