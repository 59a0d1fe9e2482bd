"""The catalog as a DuckLake on real servers: PostgreSQL (metadata) and SeaweedFS (S3 data).

Both servers are started by session fixtures (tests/conftest.py, tests/servers.py) on
loopback; each test gets its own PostgreSQL database and its own prefix in the bucket.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from tests.conftest import S3_TEST_BUCKET
from tests.processes import stop_process_group
from tests.servers import PostgresServer, S3Server
from vannah_pipelines.catalog.lake import (
    BATCHES,
    INSTANCE_VERSIONS,
    QUARANTINE,
    WRITER_LOCK,
    LakeConfig,
    append_batch,
    attach_lake,
    ensure_tables,
)
from vannah_pipelines.catalog.schema import INSTANCE_SCHEMA, QUARANTINE_SCHEMA
from vannah_pipelines.errors import CatalogError

REPO = Path(__file__).resolve().parents[2]
READ_TIMEOUT = 60.0  # bounds a hang, not a performance threshold
T0 = datetime(2026, 11, 30, 9, 0, tzinfo=UTC)


@pytest.fixture
def config(lake_config: LakeConfig) -> LakeConfig:
    """A new lake: a fresh PostgreSQL database and a fresh prefix in the test bucket."""
    return lake_config


@pytest.fixture
def writer(config: LakeConfig) -> Iterator[duckdb.DuckDBPyConnection]:
    con = attach_lake(config)
    ensure_tables(con, config)
    yield con
    con.close()


def instance_rows(batch_id: str, study: str, count: int, received: datetime = T0) -> pa.Table:
    """`count` instance rows of one study (two series), in INSTANCE_SCHEMA."""
    rows = []
    for i in range(count):
        series = f"{study}.{i % 2 + 1}"
        rows.append(
            {
                "patient_id": f"PID-{study[-3:]}",
                "patient_name": "Lake^Test",
                "study_instance_uid": study,
                "study_date": "20261130",
                "series_instance_uid": series,
                "modality": "CT",
                "series_number": i % 2 + 1,
                "sop_instance_uid": f"{series}.{i + 1}",
                "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
                "instance_number": i + 1,
                "rows": 64,
                "columns": 64,
                "transfer_syntax_uid": "1.2.840.10008.1.2.1",
                "size_bytes": 9000 + i,
                "checksum": f"{i:064x}",
                "tier": "hot",
                "storage_key": f"{study}/{series}/{i + 1}.dcm",
                "received_at": received,
                "indexed_at": received + timedelta(seconds=1),
                "calling_ae": "LAKESCU",
                "source": "dimse",
                "batch_id": batch_id,
                "header_json": json.dumps({"00080018": {"vr": "UI", "Value": [f"{i}"]}}),
            }
        )
    return pa.Table.from_pylist(rows, schema=INSTANCE_SCHEMA)


def quarantine_rows(batch_id: str, count: int) -> pa.Table:
    rows = [
        {
            "batch_id": batch_id,
            "file_name": f"bad-{i}.dcm",
            "quarantine_key": f"{batch_id}/bad-{i}.dcm",
            "reason": "missing SOPInstanceUID",
            "size_bytes": 12,
            "source": "dimse",
            "received_at": T0,
            "quarantined_at": T0 + timedelta(seconds=2),
        }
        for i in range(count)
    ]
    return pa.Table.from_pylist(rows, schema=QUARANTINE_SCHEMA)


class ReaderProcess:
    """`python -m tests.catalog.lake_reader`: one open read-only connection in its own process."""

    def __init__(self, config: LakeConfig) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.catalog.lake_reader"],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        assert self.process.stdin is not None and self.process.stdout is not None
        self.stdin, self.stdout = self.process.stdin, self.process.stdout
        self.stdin.write(json.dumps(dataclasses.asdict(config)).encode() + b"\n")
        self.stdin.flush()

    def wait_ready(self) -> None:
        line = self.stdout.readline()
        assert line == b"ready\n", f"reader process failed to open the lake (rc={self.poll()})"

    def poll(self) -> int | None:
        return self.process.poll()

    def query(self, sql: str) -> pa.Table:
        self.stdin.write(sql.replace("\n", " ").encode() + b"\n")
        self.stdin.flush()
        size = int.from_bytes(self._read(8), "big")
        return pa.ipc.open_stream(self._read(size)).read_all()

    def _read(self, size: int) -> bytes:
        data = self.stdout.read(size)
        assert data is not None and len(data) == size, f"reader process died (rc={self.poll()})"
        return data

    def close(self) -> None:
        self.stdin.close()
        try:
            self.process.wait(timeout=READ_TIMEOUT)
        finally:
            stop_process_group(self.process, grace=5)


@pytest.fixture
def readers(config: LakeConfig) -> Iterator[list[ReaderProcess]]:
    """Two reader processes on the lake, started together (each opens its own connection)."""
    started = [ReaderProcess(config), ReaderProcess(config)]
    try:
        yield started
    finally:
        for reader in started:
            reader.close()


def test_a_batch_is_read_back_by_two_reader_processes(
    config: LakeConfig, writer: duckdb.DuckDBPyConnection, readers: list[ReaderProcess]
) -> None:
    for reader in readers:
        reader.wait_ready()
        assert reader.query("SELECT count(*) AS n FROM instance_versions")["n"][0].as_py() == 0

    study_a, study_b = "1.2.826.0.1.3680043.10.54.101", "1.2.826.0.1.3680043.10.54.202"
    instances = pa.concat_tables(
        [instance_rows("batch-1", study_a, 12), instance_rows("batch-1", study_b, 7)]
    )
    quarantine = quarantine_rows("batch-1", 2)
    assert append_batch(
        writer, config, "batch-1", {INSTANCE_VERSIONS: instances, QUARANTINE: quarantine}
    )

    # The readers' connections were opened before the commit: their next query sees it.
    expected = instances.sort_by("sop_instance_uid")
    for reader in readers:
        got = reader.query("SELECT * FROM instance_versions ORDER BY sop_instance_uid")
        assert got.cast(INSTANCE_SCHEMA).equals(expected)
        got_q = reader.query(
            f"SELECT {', '.join(QUARANTINE_SCHEMA.names)} FROM quarantine ORDER BY file_name"
        )
        assert got_q.cast(QUARANTINE_SCHEMA).equals(quarantine.sort_by("file_name"))
        studies = reader.query(
            "SELECT study_instance_uid, number_of_study_related_series AS series, "
            "number_of_study_related_instances AS n FROM studies ORDER BY 1"
        ).to_pylist()
        assert studies == [
            {"study_instance_uid": study_a, "series": 2, "n": 12},
            {"study_instance_uid": study_b, "series": 2, "n": 7},
        ]
        point = reader.query(
            f"SELECT sop_instance_uid FROM instances WHERE study_instance_uid = '{study_b}' "
            "ORDER BY 1"
        )
        assert point.column(0).to_pylist() == sorted(
            instance_rows("b", study_b, 7).column("sop_instance_uid").to_pylist()
        )


def test_a_retried_batch_does_not_duplicate_rows(
    config: LakeConfig, writer: duckdb.DuckDBPyConnection
) -> None:
    study = "1.2.826.0.1.3680043.10.54.303"
    batch = {
        INSTANCE_VERSIONS: instance_rows("batch-r", study, 5),
        QUARANTINE: quarantine_rows("batch-r", 1),
    }
    assert append_batch(writer, config, "batch-r", batch) is True
    assert append_batch(writer, config, "batch-r", batch) is False  # same connection
    other = attach_lake(config)  # a re-executed run: another connection, as another process
    try:
        assert append_batch(other, config, "batch-r", batch) is False
    finally:
        other.close()

    def count(table: str) -> int:
        row = writer.execute(f"SELECT count(*) FROM lake.{table}").fetchone()
        assert row is not None
        return int(row[0])

    assert (count(INSTANCE_VERSIONS), count(QUARANTINE), count(BATCHES)) == (5, 1, 2)
    assert count(WRITER_LOCK) == 1
    # A re-sent instance in a new batch is a new version, not a duplicate of the batch.
    later = instance_rows("batch-s", study, 5, received=T0 + timedelta(hours=1))
    assert append_batch(writer, config, "batch-s", {INSTANCE_VERSIONS: later}) is True
    assert count(INSTANCE_VERSIONS) == 10
    writer.execute(
        "CREATE TEMP VIEW instance_versions AS SELECT * FROM lake.instance_versions"
    )  # the catalog's current-version rule over the lake table
    current = writer.execute(
        "SELECT count(*), min(batch_id) FROM (SELECT * FROM instance_versions QUALIFY "
        "row_number() OVER (PARTITION BY sop_instance_uid ORDER BY received_at DESC) = 1)"
    ).fetchone()
    assert current == (5, "batch-s")


def test_the_data_files_are_in_the_seaweedfs_bucket(
    config: LakeConfig, writer: duckdb.DuckDBPyConnection, seaweedfs: S3Server
) -> None:
    rows = instance_rows("batch-f", "1.2.826.0.1.3680043.10.54.404", 3)
    assert append_batch(writer, config, "batch-f", {INSTANCE_VERSIONS: rows})
    files = [
        row[0]
        for row in writer.execute(
            "SELECT data_file FROM ducklake_list_files('lake', ?)", [INSTANCE_VERSIONS]
        ).fetchall()
    ]
    assert files, "no data file: the rows were inlined into PostgreSQL instead of Parquet"
    prefix = config.data_path.removeprefix(f"s3://{S3_TEST_BUCKET}/")
    client = seaweedfs.client()
    listed = client.list_objects_v2(Bucket=S3_TEST_BUCKET, Prefix=prefix)  # type: ignore[attr-defined]
    keys = {obj["Key"] for obj in listed.get("Contents", [])}
    for url in files:
        assert url.startswith(f"s3://{S3_TEST_BUCKET}/{prefix}"), url
        key = url.removeprefix(f"s3://{S3_TEST_BUCKET}/")
        assert key in keys, f"{key} not in the bucket: {sorted(keys)}"
        body = client.get_object(Bucket=S3_TEST_BUCKET, Key=key)["Body"].read()  # type: ignore[attr-defined]
        assert body[:4] == b"PAR1" and body[-4:] == b"PAR1"
    # The bookkeeping rows stay in PostgreSQL: an append adds no tiny file for them.
    for table in (BATCHES, WRITER_LOCK):
        listed_files = writer.execute("SELECT * FROM ducklake_list_files('lake', ?)", [table])
        assert listed_files.fetchall() == [], table
    # The catalog rows and the served tables the append maintains: nothing else.
    assert all("/instance_versions/" in key or "/compacted_" in key for key in keys), sorted(keys)


def test_rows_of_another_batch_are_refused_and_nothing_is_written(
    config: LakeConfig, writer: duckdb.DuckDBPyConnection
) -> None:
    rows = instance_rows("batch-x", "1.2.826.0.1.3680043.10.54.505", 2)
    with pytest.raises(CatalogError, match="another batch_id"):
        append_batch(writer, config, "batch-y", {INSTANCE_VERSIONS: rows})
    with pytest.raises(CatalogError, match="missing"):
        append_batch(writer, config, "batch-x", {INSTANCE_VERSIONS: rows.drop(["checksum"])})
    with pytest.raises(CatalogError, match="not appendable"):
        append_batch(writer, config, "batch-x", {BATCHES: rows})
    counts = writer.execute(
        "SELECT (SELECT count(*) FROM lake.instance_versions), (SELECT count(*) FROM lake.batches)"
    ).fetchone()
    assert counts == (0, 0)


def _append_together(config: LakeConfig, batches: list[tuple[str, pa.Table]]) -> list[bool]:
    """Append each (batch_id, rows) from its own connection, all starting at one moment."""
    connections = [attach_lake(config) for _ in batches]  # separate DuckDB instances
    barrier = threading.Barrier(len(batches))

    def append(con: duckdb.DuckDBPyConnection, batch_id: str, rows: pa.Table) -> bool:
        barrier.wait(timeout=READ_TIMEOUT)
        return append_batch(con, config, batch_id, {INSTANCE_VERSIONS: rows})

    try:
        with ThreadPoolExecutor(len(batches)) as pool:
            futures = [
                pool.submit(append, con, batch_id, rows)
                for con, (batch_id, rows) in zip(connections, batches, strict=True)
            ]
            return [future.result(timeout=READ_TIMEOUT) for future in futures]
    finally:
        for con in connections:
            con.close()


def test_two_writers_appending_the_same_batch_at_once_add_it_once(
    config: LakeConfig, writer: duckdb.DuckDBPyConnection
) -> None:
    rows = instance_rows("batch-d", "1.2.826.0.1.3680043.10.54.606", 50)
    results = _append_together(config, [("batch-d", rows), ("batch-d", rows)])
    assert sorted(results) == [False, True]
    counts = writer.execute(
        "SELECT count(*), count(DISTINCT sop_instance_uid) FROM lake.instance_versions"
    ).fetchone()
    assert counts == (50, 50)


def test_two_writers_appending_different_batches_at_once_both_commit(
    config: LakeConfig, writer: duckdb.DuckDBPyConnection
) -> None:
    one = instance_rows("batch-1", "1.2.826.0.1.3680043.10.54.701", 30)
    two = instance_rows("batch-2", "1.2.826.0.1.3680043.10.54.702", 20)
    assert _append_together(config, [("batch-1", one), ("batch-2", two)]) == [True, True]
    counts = writer.execute(
        "SELECT batch_id, count(*) FROM lake.instance_versions GROUP BY 1 ORDER BY 1"
    ).fetchall()
    assert counts == [("batch-1", 30), ("batch-2", 20)]


def test_from_parts_quotes_the_connection_string_values(
    postgres: PostgresServer, config: LakeConfig
) -> None:
    dbname = config.postgres.rsplit("dbname=", 1)[1]
    quoted = LakeConfig.from_parts(
        host=postgres.host,
        port=postgres.port,
        dbname=dbname,
        user=postgres.user,
        password="it's a \\ secret",  # ignored by the test server (trust), parsed by libpq
        data_path=config.data_path,
        s3_key_id=config.s3_key_id,
        s3_secret=config.s3_secret,
        s3_endpoint=config.s3_endpoint,
        s3_use_ssl=False,
    )
    assert "password='it\\'s a \\\\ secret'" in quoted.postgres
    assert "secret" not in repr(quoted)  # neither password nor S3 secret end up in a log
    con = attach_lake(quoted)
    try:
        ensure_tables(con, quoted)
        assert con.execute("SELECT count(*) FROM lake.instance_versions").fetchone() == (0,)
    finally:
        con.close()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"alias": "lake; DROP"}, "identifier"),
        ({"data_path": "/local/folder"}, "s3://"),
        ({"postgres": " "}, "empty"),
    ],
)
def test_a_bad_lake_config_is_refused(changes: dict[str, str], message: str) -> None:
    base = {"postgres": "host=db dbname=lake", "data_path": "s3://bucket/catalog/"}
    with pytest.raises(CatalogError, match=message):
        LakeConfig(**{**base, **changes})


def test_a_lake_made_by_an_older_version_gains_the_new_columns(
    writer: duckdb.DuckDBPyConnection, config: LakeConfig
) -> None:
    """The lake's serving tables get the columns a newer version derives (``studies.tier``)
    when the writer next ensures them; earlier rows read NULL until they are rewritten."""
    lake = config.alias
    writer.execute(f"ALTER TABLE {lake}.compacted_studies DROP COLUMN tier")
    columns = {r[0] for r in writer.execute(f"DESCRIBE {lake}.compacted_studies").fetchall()}
    assert "tier" not in columns
    ensure_tables(writer, config)
    ensure_tables(writer, config)  # idempotent
    described = writer.execute(f"DESCRIBE {lake}.compacted_studies").fetchall()
    assert [(r[0], r[1]) for r in described if r[0] == "tier"] == [("tier", "VARCHAR")]
    assert "_vannah_expected" not in {
        r[0] for r in writer.execute("SELECT schema_name FROM duckdb_schemas()").fetchall()
    }
    study = "1.2.826.0.1.3680043.10.54.404"
    batch = {INSTANCE_VERSIONS: instance_rows("batch-u", study, 2)}
    assert append_batch(writer, config, "batch-u", batch) is True
    row = writer.execute(
        f"SELECT tier FROM {lake}.compacted_studies WHERE study_instance_uid = ?", [study]
    ).fetchone()
    assert row == ("hot",)
