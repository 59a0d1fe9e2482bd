"""State-change tables: atomic appends, the latest row per key wins, joined into the views."""

import os
import random
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pyarrow as pa
import pydicom.data
import pytest

from tests.catalog.conftest import land
from vannah_pipelines.catalog.changes import (
    CHANGE_TABLES,
    INSTANCE_LOCATIONS,
    QUARANTINE_STATUS,
    append_change,
    change_rows,
    empty_sql,
    instances_with_locations_sql,
    latest_sql,
    new_change_id,
    quarantine_with_status_sql,
    require_change_id,
)
from vannah_pipelines.catalog.compaction import publish
from vannah_pipelines.catalog.ingest import IngestPaths, ingest_batches
from vannah_pipelines.catalog.writer import CATALOG_DB, CatalogWriter
from vannah_pipelines.dicom.synthetic import make_instance, to_part10
from vannah_pipelines.errors import CatalogError

T0 = datetime(2026, 3, 4, 12, 0, tzinfo=UTC)


def _location(sop: str, tier: str, key: str, checksum: str = "ab" * 32) -> dict[str, str]:
    return {"sop_instance_uid": sop, "checksum": checksum, "tier": tier, "storage_key": key}


def _latest(writer: CatalogWriter, table: str) -> list[tuple[object, ...]]:
    source = writer.source_sql(CHANGE_TABLES[table].directory)
    keys = ", ".join(CHANGE_TABLES[table].key_columns)
    with duckdb.connect() as con:
        return con.execute(
            f"SELECT * EXCLUDE (day) FROM ({latest_sql(table, source)}) ORDER BY {keys}"
        ).fetchall()


def test_ensure_writes_a_zero_row_schema_file_per_change_table(tmp_path: Path) -> None:
    writer = CatalogWriter(tmp_path)
    writer.ensure()
    for table in CHANGE_TABLES.values():
        path = tmp_path / "changes" / table.name / "day=1970-01-01" / "schema.parquet"
        assert path.is_file()
        with duckdb.connect() as con:
            assert con.execute(
                f"SELECT count(*) FROM {writer.source_sql(table.directory)}"
            ).fetchall() == [(0,)]
            names = [
                r[0]
                for r in con.execute(
                    f"DESCRIBE SELECT * FROM {writer.source_sql(table.directory)}"
                ).fetchall()
            ]
        assert names == [*table.schema.names, "day"]


def test_append_change_writes_one_atomic_file_per_append(tmp_path: Path) -> None:
    writer = CatalogWriter(tmp_path)
    writer.ensure()
    change = append_change(
        writer,
        "instance_locations",
        [_location("1.2.3", "warm", "a"), _location("1.2.4", "warm", "b")],
        changed_by="test",
        changed_at=T0,
    )
    assert change.rows == 2 and change.changed_at == T0
    assert change.path == (
        tmp_path
        / "changes"
        / "instance_locations"
        / "day=2026-03-04"
        / f"{change.change_id}.parquet"
    )
    rows = _latest(writer, "instance_locations")
    assert [(r[0], r[2], r[3], r[5], r[6]) for r in rows] == [
        ("1.2.3", "warm", "a", change.change_id, "test"),
        ("1.2.4", "warm", "b", change.change_id, "test"),
    ]
    assert not list(tmp_path.rglob(".tmp-*"))


def test_latest_row_wins_regardless_of_file_order(tmp_path: Path) -> None:
    writer = CatalogWriter(tmp_path)
    writer.ensure()
    # Appended newest first: file names (change ids) and days run against changed_at.
    moves = [("cold", T0 + timedelta(days=60)), ("warm", T0 + timedelta(days=30)), ("hot", T0)]
    for tier, when in moves:
        append_change(
            writer,
            INSTANCE_LOCATIONS,
            [_location("1.2.3", tier, tier)],
            changed_by="t",
            changed_at=when,
        )
    assert [(r[2], r[4]) for r in _latest(writer, "instance_locations")] == [
        ("cold", T0 + timedelta(days=60))
    ]
    # The same rows, in any order, as an in-memory table: the same answer.
    with duckdb.connect() as con:
        all_rows = con.execute(
            f"SELECT * EXCLUDE (day) FROM {writer.source_sql(INSTANCE_LOCATIONS.directory)}"
        ).to_arrow_table()
        for seed in range(5):
            order = list(range(all_rows.num_rows))
            random.Random(seed).shuffle(order)
            con.register("shuffled", all_rows.take(order))
            assert con.execute(
                f"SELECT tier FROM ({latest_sql('instance_locations', 'shuffled')})"
            ).fetchall() == [("cold",)]
            # Idempotent: the latest of the latest is the latest.
            inner = f"({latest_sql('instance_locations', 'shuffled')})"
            assert con.execute(
                f"SELECT tier FROM ({latest_sql('instance_locations', inner)})"
            ).fetchall() == [("cold",)]
            con.unregister("shuffled")


def test_appends_at_the_same_changed_at_are_ordered_by_change_id(tmp_path: Path) -> None:
    writer = CatalogWriter(tmp_path)
    writer.ensure()
    ids = []
    for tier in ("warm", "cold", "hot", "warm"):
        ids.append(
            append_change(
                writer,
                INSTANCE_LOCATIONS,
                [_location("1.2.3", tier, tier)],
                changed_by="t",
                changed_at=T0,
            ).change_id
        )
    assert ids == sorted(ids) and len(set(ids)) == 4  # time-ordered, unique
    [row] = _latest(writer, "instance_locations")
    assert (row[2], row[5]) == ("warm", ids[-1])
    # change_id decides even when the newer file was written first.
    rows = change_rows(
        INSTANCE_LOCATIONS,
        [_location("1.2.9", "cold", "x")],
        changed_by="t",
        changed_at=T0,
        change_id=ids[-1],
    )
    older = change_rows(
        INSTANCE_LOCATIONS,
        [_location("1.2.9", "hot", "y")],
        changed_by="t",
        changed_at=T0,
        change_id=ids[0],
    )
    with duckdb.connect() as con:
        con.register("rows", pa.concat_tables([rows, older]))
        assert con.execute(
            f"SELECT tier FROM ({latest_sql(INSTANCE_LOCATIONS, 'rows')})"
        ).fetchall() == [("cold",)]


def test_new_change_id_is_strictly_increasing_in_a_process() -> None:
    same = datetime(2026, 1, 1, tzinfo=UTC)
    ids = [new_change_id(same) for _ in range(1000)]
    assert ids == sorted(ids) and len(set(ids)) == 1000
    assert all(require_change_id(i) == i for i in ids)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([], "at least one row"),
        ([{"sop_instance_uid": "1.2", "checksum": "ab", "tier": "hot"}], "storage_key is required"),
        ([_location("1.2", "lukewarm", "k")], "tier must be one of"),
        ([{**_location("1.2", "hot", "k"), "size": 3}], "unknown column"),
        ([_location("1.2", "hot", "k"), _location("1.2", "cold", "k")], "two rows for one key"),
        ([{"quarantine_key": "x", "status": "released"}], "unknown column"),
    ],
)
def test_append_change_refuses_rows_that_do_not_fit(
    tmp_path: Path, rows: list[dict[str, str]], message: str
) -> None:
    writer = CatalogWriter(tmp_path)
    writer.ensure()
    with pytest.raises(CatalogError, match=message):
        append_change(writer, "instance_locations", rows, changed_by="t")
    with pytest.raises(CatalogError, match="no state-change table"):
        append_change(writer, "../instances", [_location("1.2", "hot", "k")], changed_by="t")
    with pytest.raises(CatalogError, match="not a change id"):
        require_change_id("../../etc/passwd")
    assert not list((tmp_path / "changes").rglob("day=2*"))


def _ingest_one_study(paths: IngestPaths) -> list[tuple[str, str, str]]:
    blobs = []
    study = "1.2.826.0.1.3680043.8.498.1"
    for _ in range(3):
        ds = make_instance("CT", study_uid=study, series_uid=study + ".1", rows=8, columns=8)
        blobs.append((ds.SOPInstanceUID, to_part10(ds)))
    real = pydicom.data.get_testdata_file("CT_small.dcm")
    assert real is not None
    blobs.append((str(pydicom.dcmread(real).SOPInstanceUID), Path(real).read_bytes()))
    ingest_batches(paths, [land(paths, blobs)])
    publish(paths.catalog_dir)
    with duckdb.connect(str(paths.catalog_dir / CATALOG_DB), read_only=True) as con:
        return con.execute(
            "SELECT sop_instance_uid, checksum, study_instance_uid FROM instances ORDER BY 1"
        ).fetchall()


def test_one_location_append_moves_an_instance_in_the_published_views(paths: IngestPaths) -> None:
    instances = _ingest_one_study(paths)
    sop, checksum, study = next(i for i in instances if i[2] == "1.2.826.0.1.3680043.8.498.1")
    con = duckdb.connect(str(paths.catalog_dir / CATALOG_DB), read_only=True)  # opened before

    def state() -> tuple[object, ...]:
        row = con.execute(
            "SELECT tier, storage_key, instance_availability FROM instances "
            "WHERE sop_instance_uid = ?",
            [sop],
        ).fetchone()
        assert row is not None
        series = con.execute(
            "SELECT tier, instance_availability FROM series WHERE study_instance_uid = ?", [study]
        ).fetchone()
        studies = con.execute(
            "SELECT instance_availability, number_of_study_related_instances, tier FROM studies "
            "WHERE study_instance_uid = ?",
            [study],
        ).fetchone()
        return (*row, series, studies)

    before = state()
    assert before[0] == "hot" and before[2] == "ONLINE"
    assert before[3] == ("hot", "ONLINE") and before[4] == ("ONLINE", 3, "hot")
    append_change(
        CatalogWriter(paths.catalog_dir),
        "instance_locations",
        [_location(sop, "cold", f"archive/{sop}.dcm", checksum)],
        changed_by="test:tiering",
    )
    # No publish, no rewrite: the open connection sees the move on its next query.
    assert state() == (
        "cold",
        f"archive/{sop}.dcm",
        "NEARLINE",
        ("mixed", "NEARLINE"),  # its series-mates are still hot: neither tier alone
        ("NEARLINE", 3, "mixed"),
    )
    # Another version's row (another checksum) does not move this one.
    append_change(
        CatalogWriter(paths.catalog_dir),
        "instance_locations",
        [_location(sop, "hot", "elsewhere", "cd" * 32)],
        changed_by="test",
    )
    assert state()[0] == "cold"
    # Every other instance kept its row as ingested.
    others = con.execute("SELECT DISTINCT tier FROM instances WHERE sop_instance_uid <> ?", [sop])
    assert others.fetchall() == [("hot",)]
    versions = con.execute(
        "SELECT tier FROM instance_versions WHERE sop_instance_uid = ?", [sop]
    ).fetchall()
    assert versions == [("cold",)]
    con.close()


def test_readers_see_whole_appends_only(tmp_path: Path) -> None:
    writer = CatalogWriter(tmp_path)
    writer.ensure()
    per_append, appends = 7, 40
    seen: list[int] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def read() -> None:
        try:
            with duckdb.connect() as con:
                source = writer.source_sql(INSTANCE_LOCATIONS.directory)
                while not done.is_set():
                    seen.append(con.execute(f"SELECT count(*) FROM {source}").fetchall()[0][0])
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for n in range(appends):
            append_change(
                writer,
                INSTANCE_LOCATIONS,
                [_location(f"1.2.{n}.{i}", "warm", f"k{i}") for i in range(per_append)],
                changed_by="t",
            )
    finally:
        done.set()
        reader.join()
    assert not errors, errors
    assert seen and all(count % per_append == 0 for count in seen), sorted(set(seen))
    assert (
        len(list((tmp_path / "changes" / "instance_locations").glob("day=2*/*.parquet"))) == appends
    )


def test_ensure_removes_temp_files_of_dead_appenders_only(tmp_path: Path) -> None:
    writer = CatalogWriter(tmp_path)
    writer.ensure()
    folder = tmp_path / "changes" / "quarantine_status" / "day=2026-03-04"
    folder.mkdir(parents=True)
    dead = folder / f".tmp-{new_change_id()}.parquet.999999999.1"
    live = folder / f".tmp-{new_change_id()}.parquet.{os.getpid()}.1"
    dead.write_bytes(b"half")
    live.write_bytes(b"half")
    writer.ensure()
    assert not dead.exists() and live.exists()


def test_helpers_run_over_in_memory_tables_and_empty_sources() -> None:
    with duckdb.connect() as con:
        con.execute(
            "CREATE TABLE inst AS SELECT '1.2' AS sop_instance_uid, 'ab' AS checksum, "
            "'hot' AS tier, 'k1' AS storage_key, 10 AS size_bytes"
        )
        sql = instances_with_locations_sql("inst", empty_sql(INSTANCE_LOCATIONS))
        assert con.execute(sql).fetchall() == [("1.2", "ab", "hot", "k1", 10)]
        con.register(
            "moves",
            change_rows(INSTANCE_LOCATIONS, [_location("1.2", "warm", "k2", "ab")], changed_by="t"),
        )
        assert con.execute(instances_with_locations_sql("inst", "moves")).fetchall() == [
            ("1.2", "ab", "warm", "k2", 10)
        ]
        con.execute("CREATE TABLE q AS SELECT 'b/1.2.dcm' AS quarantine_key, 'bad' AS reason")
        assert con.execute(
            quarantine_with_status_sql("q", empty_sql(QUARANTINE_STATUS))
        ).fetchall() == [("b/1.2.dcm", "bad", "quarantined", None, None, None)]
