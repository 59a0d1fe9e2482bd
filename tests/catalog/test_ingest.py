"""Ingest: headers -> hot tier + Parquet catalog; quarantine; re-sends; crash safety."""

import errno
import hashlib
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pydicom
import pytest

from tests.catalog.conftest import land, poisoned_instance, pydicom_test_files
from vannah_pipelines.catalog import ingest as ingest_module
from vannah_pipelines.catalog.compaction import publish
from vannah_pipelines.catalog.ingest import IngestPaths, ingest_batches
from vannah_pipelines.catalog.reader import CatalogReader
from vannah_pipelines.catalog.writer import CatalogWriter
from vannah_pipelines.dicom.synthetic import MODALITIES, make_instance, to_part10, write_study
from vannah_pipelines.errors import InsufficientSpaceError
from vannah_pipelines.landing.layout import LandingZone
from vannah_pipelines.landing.space import is_disk_full
from vannah_pipelines.storage.base import Tier
from vannah_pipelines.storage.local import LocalStorage


def test_ingest_indexes_all_ten_modalities_with_their_attributes(
    paths: IngestPaths, tmp_path: Path
) -> None:
    sent: dict[str, bytes] = {}
    for modality in MODALITIES:
        study = write_study(
            tmp_path / "src" / modality,
            modality,
            series=2,
            instances_per_series=2,
            rows=32,
            columns=32,
        )
        for f in study.files:
            sent[f.stem] = f.read_bytes()
    batch_id = land(paths, list(sent.items()))
    result = ingest_batches(paths, [batch_id])
    assert result.instances == len(sent) == 40 and result.quarantined == 0
    assert dict(result.modalities) == dict.fromkeys(MODALITIES, 4)
    reader = CatalogReader(paths.catalog_dir)
    rows = reader.query(
        "SELECT sop_instance_uid, sop_class_uid, modality, study_instance_uid, "
        "series_instance_uid, patient_id, rows, columns, checksum, storage_key, size_bytes, "
        "calling_ae, tier FROM instances"
    )
    assert len(rows) == len(sent)
    for uid, sop_class, modality, study, series, pid, r, c, checksum, key, size, ae, tier in rows:
        source = pydicom.dcmread(pydicom.filebase.DicomBytesIO(sent[uid]))
        assert sop_class == MODALITIES[modality].sop_class_uid == source.SOPClassUID
        assert (study, series, pid) == (
            source.StudyInstanceUID,
            source.SeriesInstanceUID,
            source.PatientID,
        )
        assert (r, c, size, ae, tier) == (32, 32, len(sent[uid]), "TESTSCU", "hot")
        assert checksum == hashlib.sha256(sent[uid]).hexdigest()
        assert (paths.hot_dir / key).read_bytes() == sent[uid]  # byte-identical
    studies = reader.query(
        "SELECT modalities_in_study, number_of_study_related_series, "
        "number_of_study_related_instances FROM studies ORDER BY 1"
    )
    assert studies == [(m, 2, 4) for m in sorted(MODALITIES)]
    series = reader.query("SELECT DISTINCT number_of_series_related_instances FROM series")
    assert series == [(2,)]
    assert not any(paths.landing_dir.rglob("*.dcm"))  # removed from landing, last


def test_ingest_pydicom_test_files_keeps_transfer_syntax_and_bytes(paths: IngestPaths) -> None:
    files = pydicom_test_files()
    assert len(files) > 50
    last_sent: dict[str, tuple[Path, bytes]] = {}
    batches = []
    for f in files:  # one batch per file: re-used SOP UIDs become re-sends
        ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
        data = f.read_bytes()
        batches.append(land(paths, [(str(ds.SOPInstanceUID), data)]))
        last_sent[str(ds.SOPInstanceUID)] = (f, data)
    result = ingest_batches(paths, batches)
    reader = CatalogReader(paths.catalog_dir)
    quarantined = {r[0] for r in reader.query("SELECT sop_instance_uid FROM quarantine")}
    indexed = dict(reader.query("SELECT sop_instance_uid, storage_key FROM instances"))
    for uid, (f, data) in last_sent.items():
        if uid in quarantined and uid not in indexed:
            continue
        meta = pydicom.dcmread(f, stop_before_pixels=True, force=True).file_meta
        [(syntax, checksum)] = reader.query(
            "SELECT transfer_syntax_uid, checksum FROM instances WHERE sop_instance_uid = ?", [uid]
        )
        # A file without file meta is stored as the receiver negotiated it.
        assert syntax == (meta.get("TransferSyntaxUID") or "1.2.840.10008.1.2.1"), f.name
        if hashlib.sha256(data).hexdigest() == checksum:  # the latest version of the UID
            assert (paths.hot_dir / indexed[uid]).read_bytes() == data
    # Several test files deliberately share a SOP Instance UID: one current row each.
    assert len(indexed) == len(last_sent) - len(quarantined - set(indexed))
    assert result.instances + result.quarantined == len(files)
    # MR_truncated.dcm and rtplan_truncated.dcm never reach the catalog unquarantined.
    assert result.quarantine_reasons["truncated"] >= 2


def test_ingest_quarantines_bad_files_with_reason(paths: IngestPaths) -> None:
    good = make_instance("CT", rows=16, columns=16)
    no_study = make_instance("MR", rows=16, columns=16, StudyInstanceUID=None)
    bad_series = make_instance("MR", rows=16, columns=16, SeriesInstanceUID="../../etc")
    truncated = to_part10(make_instance("CT", rows=64, columns=64))[:-1000]
    truncated_uid = pydicom.dcmread(
        pydicom.filebase.DicomBytesIO(truncated), stop_before_pixels=True
    ).SOPInstanceUID
    blobs = [
        (good.SOPInstanceUID, to_part10(good)),
        (no_study.SOPInstanceUID, to_part10(no_study)),
        (bad_series.SOPInstanceUID, to_part10(bad_series)),
        (str(truncated_uid), truncated),
        ("1.2.3.4.5", os.urandom(3000)),
    ]
    result = ingest_batches(paths, [land(paths, blobs)])
    assert (result.instances, result.quarantined) == (1, 4)
    reader = CatalogReader(paths.catalog_dir)
    assert reader.query("SELECT sop_instance_uid FROM instances") == [(good.SOPInstanceUID,)]
    reasons = dict(reader.query("SELECT sop_instance_uid, reason FROM quarantine"))
    assert "StudyInstanceUID" in reasons[no_study.SOPInstanceUID]
    assert "SeriesInstanceUID" in reasons[bad_series.SOPInstanceUID]
    assert reasons[str(truncated_uid)].startswith("truncated")
    assert "1.2.3.4.5" in reasons
    for key in reader.query("SELECT quarantine_key FROM quarantine"):
        assert (paths.quarantine_dir / key[0]).is_file()  # kept, never dropped
    assert not (paths.hot_dir / "..").resolve().joinpath("etc").exists()


@pytest.mark.parametrize("ingest_order", [(0, 1), (1, 0)])
def test_ingest_resent_instance_latest_wins_whatever_the_run_order(
    paths: IngestPaths, ingest_order: tuple[int, int]
) -> None:
    first = make_instance("CT", rows=16, columns=16, SeriesDescription="first")
    second = make_instance(
        "CT",
        rows=16,
        columns=16,
        study_uid=first.StudyInstanceUID,
        series_uid=first.SeriesInstanceUID,
        SeriesDescription="second",
        SOPInstanceUID=first.SOPInstanceUID,
    )
    batches = [land(paths, [(first.SOPInstanceUID, to_part10(first))])]
    time.sleep(0.01)
    batches.append(land(paths, [(first.SOPInstanceUID, to_part10(second))]))
    for index in ingest_order:  # runs may finish in any order
        ingest_batches(paths, [batches[index]])
    reader = CatalogReader(paths.catalog_dir)
    assert reader.query("SELECT series_description FROM instances") == [("second",)]
    assert reader.query("SELECT count(*) FROM instance_versions") == [(2,)]
    [(key,)] = reader.query("SELECT storage_key FROM instances")
    assert (paths.hot_dir / key).read_bytes() == to_part10(second)
    for (old,) in reader.query("SELECT storage_key FROM instance_versions"):
        assert (paths.hot_dir / old).is_file()  # each version keeps its own bytes


def test_ingest_rerun_of_an_indexed_batch_adds_nothing(paths: IngestPaths) -> None:
    ds = make_instance("CT", rows=16, columns=16)
    batch_id = land(paths, [(ds.SOPInstanceUID, to_part10(ds))])
    assert ingest_batches(paths, [batch_id]).instances == 1
    again = ingest_batches(paths, [batch_id])
    assert (again.instances, again.missing) == (0, [batch_id])
    assert CatalogReader(paths.catalog_dir).query("SELECT count(*) FROM instance_versions") == [
        (1,)
    ]


_INGEST = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from vannah_pipelines.catalog.ingest import IngestPaths, ingest_batches
    root = Path(sys.argv[1])
    paths = IngestPaths(root / "landing", root / "hot", root / "catalog", root / "quarantine")
    if __name__ == "__main__":
        ingest_batches(paths, sys.argv[2:], workers=2)
    """
)


@pytest.mark.parametrize("kill_after", [0.3, 0.8, 1.5, 2.5])
def test_ingest_killed_at_any_point_then_rerun_loses_and_duplicates_nothing(
    tmp_path: Path, kill_after: float
) -> None:
    paths = IngestPaths(
        tmp_path / "landing", tmp_path / "hot", tmp_path / "catalog", tmp_path / "quarantine"
    )
    uids = []
    batch_ids = []
    for _ in range(4):
        blobs = []
        for _ in range(150):
            ds = make_instance("CT", rows=32, columns=32)
            blobs.append((ds.SOPInstanceUID, to_part10(ds)))
            uids.append(ds.SOPInstanceUID)
        batch_ids.append(land(paths, blobs))
    script = tmp_path / "ingest_script.py"
    script.write_text(_INGEST)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path), *batch_ids], start_new_session=True
    )
    time.sleep(kill_after)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    ingest_batches(paths, batch_ids)  # the re-run
    reader = CatalogReader(paths.catalog_dir)
    assert reader.query(
        "SELECT count(*), count(DISTINCT sop_instance_uid) FROM instance_versions"
    ) == [(600, 600)]
    assert sorted(r[0] for r in reader.query("SELECT sop_instance_uid FROM instances")) == sorted(
        uids
    )
    for (key,) in reader.query("SELECT storage_key FROM instances"):
        assert (paths.hot_dir / key).is_file()
    assert not any(p.suffix == ".dcm" for p in paths.landing_dir.rglob("*"))
    assert not list(paths.catalog_dir.rglob("*.tmp"))


def test_ingest_quarantines_a_file_pydicom_cannot_parse_and_indexes_its_batch_mates(
    paths: IngestPaths,
) -> None:
    """An odd-length US element makes pydicom raise BytesLengthException (not one of the
    errors read_header translates): that file is quarantined, the others are indexed."""
    good = [make_instance("CT", rows=16, columns=16) for _ in range(3)]
    poison_uid, poison = poisoned_instance()
    blobs = [(g.SOPInstanceUID, to_part10(g)) for g in good[:2]]
    blobs += [(poison_uid, poison), (good[2].SOPInstanceUID, to_part10(good[2]))]
    batch_id = land(paths, blobs)
    result = ingest_batches(paths, [batch_id])
    assert (result.instances, result.quarantined) == (3, 1)
    assert dict(result.quarantine_reasons) == {"BytesLengthException": 1}
    reader = CatalogReader(paths.catalog_dir)
    assert sorted(r[0] for r in reader.query("SELECT sop_instance_uid FROM instances")) == sorted(
        g.SOPInstanceUID for g in good
    )
    [(uid, reason, key, checksum)] = reader.query(
        "SELECT sop_instance_uid, reason, quarantine_key, checksum FROM quarantine"
    )
    assert uid == poison_uid
    assert reason.startswith("BytesLengthException: ") and "(0028,0010)" in reason
    assert (paths.quarantine_dir / key).read_bytes() == poison  # kept as received
    assert checksum == hashlib.sha256(poison).hexdigest()
    assert not any(paths.landing_dir.rglob("*.dcm"))


@pytest.mark.parametrize("workers", [1, 2])
def test_ingest_survives_any_exception_from_a_file(
    paths: IngestPaths, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    """Whatever a file makes the parser raise (here: RuntimeError, and an OSError raised
    while parsing from memory), it is quarantined; its batch-mates are indexed."""
    blobs = []
    for _ in range(70):  # above the pool threshold with workers=2
        ds = make_instance("CT", rows=8, columns=8)
        blobs.append((ds.SOPInstanceUID, to_part10(ds)))
    bad = {blobs[3][0]: RuntimeError("parser bug"), blobs[40][0]: OSError(5, "odd")}
    batch_id = land(paths, blobs)
    if workers == 1:
        real = ingest_module.read_header

        def flaky(path: Path, data: bytes | None = None) -> object:
            for uid, exc in bad.items():
                if path.name.startswith(uid):
                    raise exc
            return real(path, data)

        monkeypatch.setattr(ingest_module, "read_header", flaky)
    else:
        bad = {blobs[3][0]: RuntimeError("x")}
        with (paths.landing_dir / "sealed" / batch_id / f"{blobs[3][0]}.dcm").open("r+b") as f:
            f.seek(128)
            f.write(b"XXXX")  # no DICM: read leniently, fails validation
    result = ingest_batches(paths, [batch_id], workers=workers)
    assert (result.instances, result.quarantined) == (70 - len(bad), len(bad))
    reader = CatalogReader(paths.catalog_dir)
    reasons = dict(reader.query("SELECT sop_instance_uid, reason FROM quarantine"))
    assert set(reasons) == set(bad)
    if workers == 1:
        assert reasons[blobs[3][0]] == "RuntimeError: parser bug"
        assert reasons[blobs[40][0]] == "OSError: [Errno 5] odd"


def test_ingest_hot_tier_full_fails_the_run_and_quarantines_nothing(
    paths: IngestPaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC placing a file is the machine's fault, not the file's: the run fails, the
    batch stays sealed, nothing is quarantined; the rerun indexes everything."""
    blobs = []
    for _ in range(3):
        ds = make_instance("CT", rows=8, columns=8)
        blobs.append((ds.SOPInstanceUID, to_part10(ds)))
    batch_id = land(paths, blobs)
    real_put = LocalStorage.put

    def full(self: LocalStorage, key: str, source: Path, *, sync: bool = True) -> int:
        if self.tier is Tier.HOT and self.root == paths.hot_dir:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_put(self, key, source, sync=sync)

    monkeypatch.setattr(LocalStorage, "put", full)
    with pytest.raises(OSError) as caught:
        ingest_batches(paths, [batch_id])
    assert is_disk_full(caught.value)
    assert not list(paths.quarantine_dir.rglob("*.dcm"))
    assert len(LandingZone(paths.landing_dir).batch(batch_id).instances()) == 3
    monkeypatch.setattr(LocalStorage, "put", real_put)
    assert ingest_batches(paths, [batch_id]).instances == 3
    assert CatalogReader(paths.catalog_dir).query("SELECT count(*) FROM quarantine") == [(0,)]


def test_ingest_under_the_free_space_reserve_writes_nothing(paths: IngestPaths) -> None:
    ds = make_instance("CT", rows=8, columns=8)
    batch_id = land(paths, [(ds.SOPInstanceUID, to_part10(ds))])
    with pytest.raises(InsufficientSpaceError):
        ingest_batches(paths, [batch_id], free_space_reserve=2**62)
    assert not list(paths.hot_dir.rglob("*.dcm"))
    assert ingest_batches(paths, [batch_id], free_space_reserve=1).instances == 1


def test_ingest_quarantine_mode_quarantines_a_batch_whole_with_the_reason(
    paths: IngestPaths,
) -> None:
    ds = make_instance("CT", rows=8, columns=8)
    batch_id = land(paths, [(ds.SOPInstanceUID, to_part10(ds))])
    reason = "IngestFailed: ingest failed 3 times; last: RunFailed: worker killed"
    result = ingest_batches(paths, [batch_id], quarantine={batch_id: reason})
    assert (result.instances, result.quarantined) == (0, 1)
    reader = CatalogReader(paths.catalog_dir)
    assert reader.query("SELECT sop_instance_uid, reason FROM quarantine") == [
        (ds.SOPInstanceUID, reason)
    ]
    assert not LandingZone(paths.landing_dir).sealed_batches()


def test_catalog_writer_removes_temp_files_of_dead_writers_only(tmp_path: Path) -> None:
    writer = CatalogWriter(tmp_path)
    writer.ensure()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".catalog.duckdb.{dead.pid}.tmp"
    stale_wal = tmp_path / f".catalog.duckdb.{dead.pid}.tmp.wal"
    live = tmp_path / f".catalog.duckdb.{os.getppid()}.tmp"  # a live process's file
    for p in (stale, stale_wal, live):
        p.write_bytes(b"x")
    writer.ensure()  # the next writer, before it writes anything
    assert not stale.exists() and not stale_wal.exists()
    assert live.exists()
    publish(writer.root)
    assert live.exists()


def test_ingest_logs_identifiers_only_never_patient_data(
    paths: IngestPaths, caplog: pytest.LogCaptureFixture
) -> None:
    secret = {"PatientName": "Secret^Person", "PatientID": "PID-SECRET-1"}
    ok = make_instance("CT", rows=8, columns=8, **secret, AccessionNumber="ACC-SECRET")
    bad_uid, bad = poisoned_instance(**secret, AccessionNumber="ACC-SECRET")
    mangled = make_instance(
        "CT", rows=8, columns=8, **secret, StudyInstanceUID="not-a-uid-Secret^Person"
    )
    batch_id = land(
        paths,
        [
            (ok.SOPInstanceUID, to_part10(ok)),
            (bad_uid, bad),
            (mangled.SOPInstanceUID, to_part10(mangled)),
        ],
    )
    caplog.set_level(logging.DEBUG)
    caplog.clear()  # what building the test files logged
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = ingest_batches(paths, [batch_id])
    assert (result.instances, result.quarantined) == (1, 2)
    text = caplog.text + "".join(str(w.message) for w in caught)
    assert batch_id in text and bad_uid in text  # identifiers are logged
    for value in ("Secret", "PID-SECRET", "ACC-SECRET"):
        assert value not in text
    assert all(value not in str(result.quarantine_reasons) for value in ("Secret", "PID"))
