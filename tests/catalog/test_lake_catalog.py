"""The services' catalog on the DuckLake (real PostgreSQL and SeaweedFS): the same answers as
the embedded catalog, and served tables that an append keeps equal to a full derivation."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pytest

from tests.catalog.conftest import land
from tests.catalog.test_compaction import (
    _more,
    _study,
    answers,
    archive,  # noqa: F401  (the fixture, on this module's `paths`: ingested into the lake too)
    same,
)
from tests.catalog.test_lake import instance_rows
from vannah_pipelines.catalog.changes import (
    CHANGE_TABLES,
    INSTANCE_LOCATIONS,
    QUARANTINE_STATUS,
    change_rows,
    instances_with_locations_sql,
    latest_sql,
)
from vannah_pipelines.catalog.compaction import SERVING_TABLES, compact
from vannah_pipelines.catalog.ingest import IngestPaths, ingest_batches
from vannah_pipelines.catalog.lake import (
    INSTANCE_VERSIONS,
    LakeConfig,
    append_batch,
    append_lake_change,
    attach_lake,
    ensure_tables,
)
from vannah_pipelines.catalog.reader import CatalogReader
from vannah_pipelines.catalog.schema import (
    current_select,
    patient_select,
    series_select,
    study_select,
)


@pytest.fixture
def paths(tmp_path: Path, lake_config: LakeConfig) -> IngestPaths:
    """Local data folders whose ingest also appends every batch to a new lake."""
    return IngestPaths(
        tmp_path / "landing",
        tmp_path / "hot",
        tmp_path / "catalog",
        tmp_path / "quarantine",
        lake=lake_config,
    )


def test_the_lake_answers_as_the_embedded_catalog(
    archive: IngestPaths,  # noqa: F811
    lake_config: LakeConfig,
    tmp_path: Path,
) -> None:
    """pydicom's test files (their own SOP UIDs, some sent twice), a study of each of ten
    modalities, a quarantined file: QIDO-RS JSON, C-FIND rows at every level and WADO-RS
    metadata of every study are the same from the local catalog (before and after
    compaction) and from a reader on the lake that has no local file at all."""
    local = CatalogReader(archive.catalog_dir)
    elsewhere = tmp_path / "another-host"  # an empty folder: the lake is all it has
    on_lake = CatalogReader(elsewhere, lake=lake_config)
    expected = answers(local)
    assert any(k.startswith("metadata") and v for k, v in expected.items())
    assert expected["quarantine"] and len(expected["versions"]) > 40
    assert same(answers(on_lake), expected)

    compact(archive.catalog_dir)
    local.refresh()
    assert same(answers(local), expected)
    assert same(answers(on_lake), expected)

    # More on both (a new instance in a study, a re-send with new bytes, a new study):
    # the open lake reader sees them on its next query, with no reload.
    _more(archive)
    local.refresh()
    after = answers(local)
    assert after != expected
    assert same(answers(on_lake), after)
    assert on_lake.refresh() == 0 and on_lake.pending_files() == 0
    assert not list(elsewhere.glob("**/*.parquet"))
    local.close()
    on_lake.close()


def test_a_retried_ingest_appends_a_batch_the_lake_missed(
    paths: IngestPaths, lake_config: LakeConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that wrote the local batch file and died before the lake took the batch:
    its retry appends the batch from the local file, once."""
    from vannah_pipelines.catalog import ingest

    batch = land(paths, _study("CT", 3, "VHC-R-1"))

    def die(*args: Any, **kwargs: Any) -> bool:
        raise OSError("killed before the lake append")

    monkeypatch.setattr(ingest.LakeAppender, "append", die)
    with pytest.raises(OSError):
        ingest_batches(paths, [batch])
    monkeypatch.undo()
    result = ingest_batches(paths, [batch])
    assert result.already_indexed == [batch]
    reader = CatalogReader(paths.catalog_dir / "elsewhere", lake=lake_config)
    assert reader.query("SELECT count(*) FROM instance_versions") == [(3,)]
    assert reader.query("SELECT count(*) FROM instances") == [(3,)]
    result = ingest_batches(paths, [batch])  # gone from the landing zone: nothing to do
    assert reader.query("SELECT count(*) FROM instance_versions") == [(3,)]
    reader.close()


def _from_scratch(con: duckdb.DuckDBPyConnection, lake: str) -> dict[str, list[Any]]:
    """Every served table derived from the raw lake tables, with the serving database's
    SQL (what compaction computes over the whole archive)."""
    locations = f"({latest_sql(INSTANCE_LOCATIONS, f'{lake}.{INSTANCE_LOCATIONS.name}')})"
    versions = (
        f"(SELECT * EXCLUDE (header_json), 'lake:' || batch_id AS source_file "
        f"FROM {lake}.{INSTANCE_VERSIONS})"
    )
    con.execute(
        "CREATE OR REPLACE TEMP TABLE _i AS "
        + current_select(f"({instances_with_locations_sql(versions, locations)})")
    )
    con.execute(f"CREATE OR REPLACE TEMP TABLE _s AS {study_select('_i')}")
    queries = {
        "compacted_instances": "SELECT * FROM _i",
        "compacted_series": series_select("_i"),
        "compacted_studies": "SELECT * FROM _s",
        "compacted_patients": patient_select("_s"),
        "compacted_quarantine": f"SELECT * FROM {lake}.quarantine",
        # Every state-change table: the latest row per key of all its rows.
        **{
            f"compacted_{c.name}": latest_sql(c, f"{lake}.{c.name}") for c in CHANGE_TABLES.values()
        },
    }
    return {name: _rows(con, f"SELECT * FROM ({sql})") for name, sql in queries.items()}


def _rows(con: duckdb.DuckDBPyConnection, sql: str) -> list[Any]:
    result = con.execute(sql)
    names = [d[0] for d in result.description or []]
    return sorted(
        (tuple(sorted(zip(names, row, strict=True))) for row in result.fetchall()), key=repr
    )


def _maintained(con: duckdb.DuckDBPyConnection, lake: str) -> dict[str, list[Any]]:
    return {name: _rows(con, f"SELECT * FROM {lake}.{name}") for name in SERVING_TABLES}


def test_appends_keep_the_served_tables_equal_to_a_full_derivation(
    lake_config: LakeConfig,
) -> None:
    """Batches, a re-send (new bytes, later), a patient change, a location change and a
    quarantine release: after each append the tables the writer maintains for the keys
    it touches equal what the serving database's SQL derives from every raw row."""
    con = attach_lake(lake_config)
    ensure_tables(con, lake_config)
    lake = lake_config.alias
    t0 = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)
    study_a, study_b = "1.2.826.0.1.3680043.10.54.801", "1.2.826.0.1.3680043.10.54.802"
    steps: list[tuple[str, Any]] = [
        (
            "b1",
            pa.concat_tables([instance_rows("b1", study_a, 6), instance_rows("b1", study_b, 3)]),
        ),
        ("b2", instance_rows("b2", study_a, 2, received=t0 + timedelta(hours=2))),
    ]
    # A re-send of study B's first instance under another patient ID.
    resent = instance_rows("b3", study_b, 1, received=t0 + timedelta(hours=3)).to_pylist()
    resent[0]["patient_id"], resent[0]["checksum"] = "PID-MOVED", "f" * 64
    steps.append(("b3", pa.Table.from_pylist(resent, schema=instance_rows("x", study_b, 1).schema)))
    for batch_id, rows in steps:
        assert append_batch(con, lake_config, batch_id, {INSTANCE_VERSIONS: rows})
        assert _maintained(con, lake) == _from_scratch(con, lake), batch_id
    sop, checksum = con.execute(
        f"SELECT sop_instance_uid, checksum FROM {lake}.compacted_instances "
        f"WHERE study_instance_uid = '{study_a}' ORDER BY 1 LIMIT 1"
    ).fetchone() or ("", "")
    moved = change_rows(
        INSTANCE_LOCATIONS,
        [{"sop_instance_uid": sop, "checksum": checksum, "tier": "cold", "storage_key": "g/1"}],
        changed_by="test",
    )
    assert append_lake_change(con, lake_config, INSTANCE_LOCATIONS, moved)
    assert not append_lake_change(con, lake_config, INSTANCE_LOCATIONS, moved)  # retried
    assert _maintained(con, lake) == _from_scratch(con, lake)
    assert con.execute(
        f"SELECT tier, instance_availability FROM {lake}.compacted_instances "
        "WHERE sop_instance_uid = ?",
        [sop],
    ).fetchall() == [("cold", "NEARLINE")]
    assert con.execute(
        f"SELECT instance_availability FROM {lake}.compacted_studies WHERE study_instance_uid = ?",
        [study_a],
    ).fetchall() == [("NEARLINE",)]
    released = change_rows(
        QUARANTINE_STATUS,
        [{"quarantine_key": "b1/bad-0.dcm", "status": "released", "released_batch_id": "b9"}],
        changed_by="test",
    )
    assert append_lake_change(con, lake_config, QUARANTINE_STATUS, released)
    assert _maintained(con, lake) == _from_scratch(con, lake)
    patients = con.execute(f"SELECT patient_id FROM {lake}.compacted_patients ORDER BY 1")
    assert [r[0] for r in patients.fetchall()] == ["PID-801", "PID-MOVED"]
    con.close()


def test_append_cost_follows_the_batch(lake_config: LakeConfig) -> None:
    """The time of an append (with its served-table upkeep) and of a point query, with 40
    and then 200 studies in the lake: printed (-s) for docs/deployment.md; asserted only
    against a bound that catches a whole-lake rebuild per append."""
    con = attach_lake(lake_config)
    ensure_tables(con, lake_config)
    reader = CatalogReader(Path("/nonexistent-vannah"), lake=lake_config)
    timings: dict[int, tuple[float, float]] = {}
    n = 0
    for size in (40, 200):
        while n < size:
            fill = pa.concat_tables(
                [
                    instance_rows(f"fill-{n}", f"1.2.826.0.1.3680043.10.55.{n + k}", 100)
                    for k in range(20)
                ]
            )
            append_batch(con, lake_config, f"fill-{n}", {INSTANCE_VERSIONS: fill})
            n += 20
        rows = instance_rows(f"probe-{size}", f"1.2.826.0.1.3680043.10.56.{size}", 500)
        started = time.perf_counter()
        append_batch(con, lake_config, f"probe-{size}", {INSTANCE_VERSIONS: rows})
        append_s = time.perf_counter() - started
        study = f"1.2.826.0.1.3680043.10.55.{size // 2}"
        started = time.perf_counter()
        found = reader.query("SELECT count(*) FROM instances WHERE study_instance_uid = ?", [study])
        query_s = time.perf_counter() - started
        assert found == [(100,)]
        timings[size] = (append_s, query_s)
        print(
            f"lake of {size * 100 + 500} instances: append 500 {append_s * 1000:.0f} ms, "
            f"point query {query_s * 1000:.0f} ms"
        )
    assert timings[200][0] < 20.0
    reader.close()
    con.close()


def test_vannah_lake_init_creates_the_tables_from_the_environment(
    lake_config: LakeConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``vannah lake init`` with the lake given as VANNAH_CATALOG_LAKE_* variables (as a
    deployment sets them): a reader can then open the lake before any ingest."""
    from tests.conftest import lake_settings
    from vannah_pipelines.cli import main

    for name, value in lake_settings(lake_config).items():
        monkeypatch.setenv(
            f"VANNAH_{name.upper()}", str(value).lower() if value is False else str(value)
        )
    assert main(["--data-dir", str(tmp_path), "lake", "init"]) == 0
    assert main(["--data-dir", str(tmp_path), "lake", "init"]) == 0  # idempotent
    reader = CatalogReader(tmp_path / "catalog", lake=lake_config)
    assert reader.query("SELECT count(*) FROM studies") == [(0,)]
    reader.close()


def test_a_quarantine_release_reaches_the_lake(paths: IngestPaths, lake_config: LakeConfig) -> None:
    """``release_quarantined`` appends its status change locally and to the lake (same
    change id); the released file, ingested again, is then an instance on the lake."""
    from tests.catalog.conftest import poisoned_instance
    from vannah_pipelines.catalog.quarantine import release_quarantined

    ingest_batches(paths, [land(paths, [poisoned_instance()])])
    on_lake = CatalogReader(paths.catalog_dir / "elsewhere", lake=lake_config)
    ((key, status),) = on_lake.query("SELECT quarantine_key, status FROM quarantine")
    assert status == "quarantined"
    release = release_quarantined(paths, key, reason="fixed", changed_by="test")
    assert on_lake.query("SELECT status, released_batch_id FROM quarantine") == [
        ("released", release.batch_id)
    ]
    local = CatalogReader(paths.catalog_dir)
    assert local.query("SELECT status FROM quarantine") == [("released",)]
    on_lake.close()
    local.close()
