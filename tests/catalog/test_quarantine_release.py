"""`vannah quarantine list` and `release`: a quarantined file goes back through the landing
zone and the real ingest, and the release is a quarantine_status change."""

import hashlib
import threading
from pathlib import Path

import duckdb
import pydicom
import pydicom.data
import pytest

from tests.catalog.conftest import land
from vannah_pipelines.catalog.ingest import IngestPaths, ingest_batches
from vannah_pipelines.catalog.quarantine import (
    QuarantineError,
    list_quarantine,
    release_quarantined,
    require_quarantine_key,
)
from vannah_pipelines.catalog.writer import CATALOG_DB
from vannah_pipelines.cli import main
from vannah_pipelines.dicom.synthetic import make_instance, to_part10
from vannah_pipelines.landing.layout import LandingZone


@pytest.fixture
def cli(paths: IngestPaths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The global options that point `vannah` at the same folders as `paths`."""
    monkeypatch.delenv("VANNAH_CONFIG", raising=False)
    assert paths.catalog_dir == tmp_path / "catalog"
    return ["--data-dir", str(tmp_path)]


def _ct_small() -> tuple[str, bytes]:
    path = pydicom.data.get_testdata_file("CT_small.dcm")
    assert path is not None
    data = Path(path).read_bytes()
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID), data


def _quarantine_view(paths: IngestPaths) -> list[tuple[object, ...]]:
    with duckdb.connect(str(paths.catalog_dir / CATALOG_DB), read_only=True) as con:
        return con.execute(
            "SELECT quarantine_key, status, released_batch_id, status_reason "
            "FROM quarantine ORDER BY quarantined_at"
        ).fetchall()


def test_release_of_a_truncated_file_is_ingested_and_quarantined_again_under_a_new_key(
    paths: IngestPaths, cli: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    uid, data = _ct_small()
    truncated = data[: len(data) - 1000]  # the pixel data is cut short
    first = land(paths, [(uid, truncated)])
    assert ingest_batches(paths, [first]).quarantined == 1
    key = f"{first}/{uid}.dcm"

    assert main([*cli, "quarantine", "list"]) == 0
    out = capsys.readouterr().out
    assert key in out and "quarantined" in out

    assert main([*cli, "quarantine", "release", key, "--reason", "parser fixed"]) == 0
    out = capsys.readouterr().out
    [sealed] = LandingZone(paths.landing_dir).sealed_batches()
    assert f"released {key} into landing batch {sealed.batch_id}" in out
    assert [i.path.read_bytes() for i in sealed.instances()] == [truncated]
    assert _quarantine_view(paths) == [(key, "released", sealed.batch_id, "parser fixed")]
    assert (paths.quarantine_dir / key).read_bytes() == truncated  # kept

    # Twice: refused, nothing landed.
    assert main([*cli, "quarantine", "release", key]) == 1
    assert "already released" in capsys.readouterr().err
    assert len(LandingZone(paths.landing_dir).sealed_batches()) == 1

    # The normal ingest quarantines it again: a new row, under a new key.
    result = ingest_batches(paths, [sealed.batch_id])
    assert (result.instances, result.quarantined) == (0, 1)
    rows = {q.quarantine_key: q for q in list_quarantine(paths.catalog_dir)}
    new_key = f"{sealed.batch_id}/{uid}.dcm"
    assert set(rows) == {key, new_key}
    assert rows[key].status == "released" and rows[new_key].status == "quarantined"
    # It keeps the facts it arrived with.
    for field in ("calling_ae", "peer", "source", "received_at", "checksum", "sop_instance_uid"):
        assert getattr(rows[new_key], field) == getattr(rows[key], field), field
    assert [q.quarantine_key for q in list_quarantine(paths.catalog_dir, "quarantined")] == [
        new_key
    ]
    assert main([*cli, "quarantine", "list", "--status", "released"]) == 0
    out = capsys.readouterr().out
    assert key in out and new_key not in out


def test_release_of_a_valid_file_quarantined_whole_indexes_it(
    paths: IngestPaths, cli: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """The sensor quarantines a batch whole, unparsed, when its ingest kept failing; once
    the cause is fixed, a release gets its files indexed."""
    uid, data = _ct_small()
    ds = make_instance("MR", rows=8, columns=8)
    batch = land(paths, [(uid, data), (str(ds.SOPInstanceUID), to_part10(ds))])
    ingest_batches(paths, [batch], quarantine={batch: "OSError: hot tier was read-only"})
    quarantined = list_quarantine(paths.catalog_dir)
    assert len(quarantined) == 2
    assert main([*cli, "quarantine", "release", f"{batch}/{uid}.dcm"]) == 0
    assert main([*cli, "ingest"]) == 0
    assert "indexed 1 instances" in capsys.readouterr().out
    with duckdb.connect(str(paths.catalog_dir / CATALOG_DB), read_only=True) as con:
        row = con.execute(
            "SELECT sop_instance_uid, checksum, calling_ae, received_at, tier FROM instances"
        ).fetchall()
    original = next(q for q in quarantined if q.sop_instance_uid == uid)
    assert row == [(uid, hashlib.sha256(data).hexdigest(), "TESTSCU", original.received_at, "hot")]
    statuses = {q.sop_instance_uid: q.status for q in list_quarantine(paths.catalog_dir)}
    assert statuses == {uid: "released", str(ds.SOPInstanceUID): "quarantined"}


@pytest.mark.parametrize(
    "key",
    [
        "../../etc/passwd",
        "/etc/passwd",
        "20260101T000000000000-dimse-1-0/../../../etc/passwd",
        "20260101T000000000000-dimse-1-0/../1.2.dcm",
        "20260101T000000000000-dimse-1-0/1.2.dcm/x",
        "20260101T000000000000-dimse-1-0/",
        "x/1.2.dcm",
        "20260101T000000000000-dimse-1-0/1.2.dcm\n",
        "",
    ],
)
def test_release_refuses_keys_that_are_not_quarantine_keys(
    paths: IngestPaths, cli: list[str], capsys: pytest.CaptureFixture[str], key: str
) -> None:
    with pytest.raises(QuarantineError, match="not a quarantine key"):
        require_quarantine_key(key)
    assert main([*cli, "quarantine", "release", key]) == 1
    assert "not a quarantine key" in capsys.readouterr().err
    assert not LandingZone(paths.landing_dir).sealed_batches()


def test_release_refuses_an_unknown_key_and_a_changed_file(
    paths: IngestPaths, cli: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    unknown = "20260101T000000000000-dimse-1-0/1.2.3.dcm"
    assert main([*cli, "quarantine", "release", unknown]) == 1
    assert f"no quarantined file {unknown}" in capsys.readouterr().err
    batch = land(paths, [("1.2.3", b"not dicom" * 40)])
    ingest_batches(paths, [batch])
    key = f"{batch}/1.2.3.dcm"
    (paths.quarantine_dir / key).write_bytes(b"swapped")
    with pytest.raises(QuarantineError, match="changed since it was quarantined"):
        release_quarantined(paths, key, reason=None, changed_by="test")
    (paths.quarantine_dir / key).unlink()
    with pytest.raises(QuarantineError, match="missing"):
        release_quarantined(paths, key, reason=None, changed_by="test")
    assert not LandingZone(paths.landing_dir).sealed_batches()
    assert [q.status for q in list_quarantine(paths.catalog_dir)] == ["quarantined"]


def test_two_concurrent_releases_of_one_key_land_it_once(paths: IngestPaths) -> None:
    batch = land(paths, [("1.2.3", b"not dicom" * 40)])
    ingest_batches(paths, [batch])
    key = f"{batch}/1.2.3.dcm"
    outcomes: list[str] = []

    def release() -> None:
        try:
            release_quarantined(paths, key, reason="retry", changed_by="test")
            outcomes.append("released")
        except QuarantineError as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=release) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes)[-1] == "released" and outcomes.count("released") == 1
    assert all("already released" in o for o in outcomes if o != "released")
    assert len(LandingZone(paths.landing_dir).sealed_batches()) == 1
