"""``delivery_status`` (the latest row of each delivery) built from compacted and pending
rows answers as the plain latest row per key over every row ever appended: in the serving
database, the CatalogReader and the DuckLake."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pytest

from vannah_pipelines.catalog.changes import (
    DELIVERIES,
    OPEN_DELIVERY_STATES,
    append_change,
    change_rows,
    latest_sql,
)
from vannah_pipelines.catalog.compaction import compact, publish
from vannah_pipelines.catalog.holder import CatalogHolder
from vannah_pipelines.catalog.lake import (
    LakeConfig,
    append_lake_change,
    attach_lake,
    ensure_tables,
    open_reader,
)
from vannah_pipelines.catalog.reader import CatalogReader
from vannah_pipelines.catalog.writer import CATALOG_DB, CatalogWriter

T0 = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)
AI, BUCKET = "dicom AI_ENGINE@ai.internal:4243", "s3://vhc-archive/ (af-south-1)"
COLUMNS = ", ".join(DELIVERIES.schema.names)
# Queries shaped as routing's: the whole log, what is due, the backlog, one batch's check.
QUERIES: list[tuple[str, list[Any]]] = [
    (f"SELECT {COLUMNS} FROM {{view}}", []),
    (
        f"SELECT {COLUMNS} FROM {{view}} WHERE status IN ('queued', 'failed') "
        "AND next_attempt_at <= ? AND destination = ?",
        [T0 + timedelta(days=1), AI],
    ),
    (
        "SELECT destination, status, count(*), min(queued_at) FROM {view} GROUP BY ALL",
        [],
    ),
    (
        "SELECT sop_instance_uid, checksum, rule, destination FROM {view} "
        "WHERE sop_instance_uid IN (SELECT unnest(?))",
        [["1.2", "1.5", "1.7", "9.9"]],
    ),
    # open_deliveries: the open rows of delivery_status.
    (f"SELECT {COLUMNS} FROM {{open}}", []),
    (
        f"SELECT {COLUMNS} FROM {{open}} WHERE status IN ('queued', 'failed') "
        "AND next_attempt_at <= ? AND destination = ?",
        [T0 + timedelta(days=1), AI],
    ),
    (f"SELECT {COLUMNS} FROM {{open}} WHERE status = 'dead'", []),
]


def _delivery(sop: str, status: str, **values: Any) -> dict[str, Any]:
    row = {
        "sop_instance_uid": sop,
        "checksum": values.pop("checksum", "ab" * 32),
        "rule": values.pop("rule", "CT to AI"),
        "destination": values.pop("destination", AI),
        "study_instance_uid": "1.2.3",
        "status": status,
        "attempts": values.pop("attempts", 0),
        "priority": "ROUTINE",
        "queued_at": T0,
        "next_attempt_at": T0 if status in ("queued", "failed") else None,
    }
    return {**row, **values}


# Each step: (minutes after T0, rows of one append). Two appends at one changed_at are
# ordered by their change ids (the later append wins).
BEFORE_COMPACTION: list[tuple[int, list[dict[str, Any]]]] = [
    (0, [_delivery(s, "queued") for s in ("1.1", "1.2", "1.3", "1.4")]),
    (0, [_delivery("1.4", "queued", destination=BUCKET, rule="All to the bucket")]),
    (1, [_delivery("1.1", "sent", attempts=1), _delivery("1.3", "failed", attempts=1)]),
    (2, [_delivery("1.4", "failed", attempts=1)]),
    (2, [_delivery("1.4", "queued", attempts=1)]),  # same changed_at: this one is later
    (10, [_delivery("1.5", "sent", attempts=1), _delivery("1.8", "dead", attempts=8)]),
    (1, [_delivery("1.6", "committed", attempts=1)]),
]
AFTER_COMPACTION: list[tuple[int, list[dict[str, Any]]]] = [
    # 1.2: open when compacted, its latest row pending (sent); 1.3: failed -> dead.
    (60, [_delivery("1.2", "sent", attempts=1), _delivery("1.3", "dead", attempts=8)]),
    # 1.4 to the AI: a tie in the pending rows, broken by change_id (cancelled wins).
    (60, [_delivery("1.4", "queued", attempts=2)]),
    (60, [_delivery("1.4", "cancelled", attempts=2)]),
    # 1.5: a pending row older than the compacted one (another host's clock): it loses.
    (5, [_delivery("1.5", "queued")]),
    # 1.6: a second rule for a compacted instance; 1.7: a delivery only pending, with a tie.
    (60, [_delivery("1.6", "queued", rule="All to the bucket", destination=BUCKET)]),
    (61, [_delivery("1.7", "queued", checksum="cd" * 32)]),
    (61, [_delivery("1.7", "failed", checksum="cd" * 32, attempts=1)]),
]


def _append(writer: CatalogWriter, steps: list[tuple[int, list[dict[str, Any]]]]) -> None:
    for minutes, rows in steps:
        at = T0 + timedelta(minutes=minutes)
        append_change(writer, DELIVERIES, rows, changed_by="test", changed_at=at)


def _expected(con: duckdb.DuckDBPyConnection, history: str) -> list[list[tuple[Any, ...]]]:
    """Each query's answer over the plain latest row per key of `history` (every row)."""
    con.execute(f"CREATE OR REPLACE TEMP VIEW _oracle AS {latest_sql(DELIVERIES, history)}")
    states = ", ".join(f"'{s}'" for s in OPEN_DELIVERY_STATES)
    con.execute(
        f"CREATE OR REPLACE TEMP VIEW _oracle_open AS SELECT * FROM _oracle "
        f"WHERE status IN ({states})"
    )
    return [
        sorted(con.execute(q.format(view="_oracle", open="_oracle_open"), p).fetchall())
        for q, p in QUERIES
    ]


def _answers(query: Any) -> list[list[tuple[Any, ...]]]:
    return [
        sorted(query(q.format(view="delivery_status", open="open_deliveries"), p))
        for q, p in QUERIES
    ]


def _check_files(root: Path) -> None:
    """The serving database and a CatalogReader answer as latest_sql over every change file
    ever written (read from the files themselves: the compacted ones and the batch files)."""
    with duckdb.connect(str(root / CATALOG_DB), read_only=True) as con:
        expected = _expected(con, f"(SELECT {COLUMNS} FROM deliveries)")
        assert _answers(lambda q, p: con.execute(q, p).fetchall()) == expected
    reader = CatalogReader(root)
    try:
        assert _answers(reader.query) == expected
    finally:
        reader.close()
    statuses = {r[5] for r in expected[0]}
    assert {"queued", "failed", "sent", "dead"} <= statuses


def test_delivery_status_answers_as_the_latest_row_over_every_row(tmp_path: Path) -> None:
    root = tmp_path / "catalog"
    writer = CatalogWriter(root)
    writer.ensure()
    _append(writer, BEFORE_COMPACTION)
    publish(root)  # compacts: generation 1 holds every row so far
    _check_files(root)
    _append(writer, AFTER_COMPACTION)
    _check_files(root)  # compacted rows overlaid with pending ones
    with duckdb.connect(str(root / CATALOG_DB), read_only=True) as con:
        latest = {
            (s, r, d): st
            for s, r, d, st in con.execute(
                "SELECT sop_instance_uid, rule, destination, status FROM delivery_status"
            ).fetchall()
        }
    assert latest[("1.2", "CT to AI", AI)] == "sent"
    assert latest[("1.3", "CT to AI", AI)] == "dead"
    assert latest[("1.4", "CT to AI", AI)] == "cancelled"
    assert latest[("1.4", "All to the bucket", BUCKET)] == "queued"
    assert latest[("1.5", "CT to AI", AI)] == "sent"
    assert latest[("1.6", "All to the bucket", BUCKET)] == "queued"
    assert latest[("1.7", "CT to AI", AI)] == "failed"
    compact(root, grace_seconds=0)
    publish(root)
    _check_files(root)  # everything compacted again


def test_a_reader_opened_before_the_appends_overlays_them(tmp_path: Path) -> None:
    root = tmp_path / "catalog"
    writer = CatalogWriter(root)
    writer.ensure()
    _append(writer, BEFORE_COMPACTION)
    reader = CatalogReader(root)  # nothing compacted yet: every row is in the overlay
    try:
        with duckdb.connect() as con:
            con.execute(
                f"CREATE TABLE every_row AS SELECT {COLUMNS} FROM "
                f"{writer.source_sql(DELIVERIES.directory)}"
            )
            assert _answers(reader.query) == _expected(con, "every_row")
        publish(root)
        # A new generation with appends since in its overlay, then more appends to it
        # (keys it holds already, and new ones).
        for steps in (AFTER_COMPACTION[:3], AFTER_COMPACTION[3:]):
            _append(writer, steps)
            reader.refresh()
            with duckdb.connect() as con:
                con.execute(
                    f"CREATE TABLE every_row AS SELECT {COLUMNS} FROM "
                    f"{writer.source_sql(DELIVERIES.directory)}"
                )
                assert _answers(reader.query) == _expected(con, "every_row")
    finally:
        reader.close()


def test_a_service_reader_loads_no_delivery_file_and_has_no_delivery_views(
    tmp_path: Path,
) -> None:
    """The services' readers (CatalogHolder: deliveries=False) never load the delivery
    log's batch files, so routing's appends cost them nothing; asking them for the
    delivery log is an error, not a stale answer. A routing reader loads them."""
    root = tmp_path / "catalog"
    writer = CatalogWriter(root)
    writer.ensure()
    _append(writer, BEFORE_COMPACTION)
    publish(root)
    _append(writer, AFTER_COMPACTION)
    service = CatalogHolder(root, refresh_seconds=0.0).get()
    routing = CatalogReader(root)
    try:
        assert service.pending_files() == 0
        assert routing.pending_files() == len(AFTER_COMPACTION)
        for view in ("delivery_status", "open_deliveries"):
            with pytest.raises(duckdb.CatalogException, match=view):
                service.query(f"SELECT count(*) FROM {view}")
        assert service.query("SELECT count(*) FROM instances") == [(0,)]
        assert routing.query("SELECT count(*) FROM open_deliveries")[0][0] > 0
    finally:
        routing.close()
        service.close()


def test_the_lake_answers_as_the_latest_row_over_every_row(
    lake_config: LakeConfig, tmp_path: Path
) -> None:
    con = attach_lake(lake_config)
    ensure_tables(con, lake_config)
    appended: list[pa.Table] = []
    for minutes, rows in BEFORE_COMPACTION + AFTER_COMPACTION:
        table = change_rows(
            DELIVERIES, rows, changed_by="test", changed_at=T0 + timedelta(minutes=minutes)
        )
        assert append_lake_change(con, lake_config, DELIVERIES, table)
        appended.append(table)
    con.close()
    with duckdb.connect() as oracle:
        oracle.register("every_row", pa.concat_tables(appended))
        expected = _expected(oracle, "every_row")
    lake = open_reader(lake_config)
    try:
        assert _answers(lambda q, p: lake.execute(q, p).fetchall()) == expected
    finally:
        lake.close()
    reader = CatalogReader(tmp_path / "another-host", lake=lake_config)
    try:
        assert _answers(reader.query) == expected
    finally:
        reader.close()


@pytest.mark.parametrize("pending", [0, 1, 3])
def test_overlaid_latest_matches_latest_sql_on_random_logs(pending: int) -> None:
    """Random logs split into a compacted part (its latest rows) and `pending` appends."""
    import random

    from vannah_pipelines.catalog.changes import open_deliveries_sql, overlaid_latest_sql

    rng = random.Random(pending)
    steps = [
        (
            rng.randrange(30),
            [
                _delivery(
                    f"1.{k}",
                    rng.choice(["queued", "sent", "failed", "dead", "cancelled"]),
                    destination=rng.choice([AI, BUCKET]),
                )
                for k in rng.sample(range(12), 4)
            ],
        )
        for _ in range(12)
    ]
    tables = [
        change_rows(DELIVERIES, rows, changed_by="t", changed_at=T0 + timedelta(minutes=m))
        for m, rows in steps
    ]
    split = len(tables) - pending
    with duckdb.connect() as con:
        con.register("every_row", pa.concat_tables(tables))
        con.register("early", pa.concat_tables(tables[:split]))
        con.register("late", pa.concat_tables(tables[split:]) if pending else tables[0][:0])
        con.execute(f"CREATE TABLE compacted AS {latest_sql(DELIVERIES, 'early')}")
        con.execute(
            "CREATE VIEW delivery_status AS "
            + overlaid_latest_sql(DELIVERIES, "compacted", "(SELECT * FROM late)")
        )
        states = ", ".join(f"'{s}'" for s in OPEN_DELIVERY_STATES)
        con.execute(f"CREATE TABLE compacted_open AS FROM compacted WHERE status IN ({states})")
        con.execute(
            "CREATE VIEW open_deliveries AS "
            + open_deliveries_sql("compacted", "compacted_open", "(SELECT * FROM late)")
        )
        expected = _expected(con, "every_row")
        assert _answers(lambda q, p: con.execute(q, p).fetchall()) == expected
