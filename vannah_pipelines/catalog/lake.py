"""The catalog as a DuckLake: metadata in PostgreSQL, Parquet data files on S3-compatible storage.

The scale-out form of the catalog (docs/deployment.md, "Catalog on PostgreSQL and S3"): the
Dagster deployment appends batches, DICOMweb replicas and receivers on other hosts read, all
through DuckDB with the ``ducklake``, ``postgres_scanner`` and ``httpfs`` extensions. Those are
loaded from their PyPI packages (``duckdb-extension-*``, built for exactly the pinned DuckDB),
never downloaded at run time. The embedded default (local Parquet files, writer.py) needs none
of this.

Lake tables: ``instance_versions`` (every ingested version of an instance, INSTANCE_SCHEMA),
``quarantine`` (QUARANTINE_SCHEMA), ``batches`` (one row per appended batch and table: what
makes a retried batch a no-op) and ``writer_lock`` (one row every append updates, so that
concurrent appends conflict and one batch is never added twice). Every append is one DuckLake
transaction, so one snapshot: readers see a batch whole or not at all.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import random
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from vannah_pipelines.catalog.changes import (
    CHANGE_TABLES,
    DELIVERIES,
    INSTANCE_LOCATIONS,
    QUARANTINE_STATUS,
    ChangeAppend,
    ChangeTable,
    append_change,
    change_table,
    delivery_status_sql,
    instances_with_locations_sql,
    latest_sql,
    open_deliveries_sql,
    quarantine_with_status_sql,
)
from vannah_pipelines.catalog.compaction import SERVING_TABLES, create_empty_serving_tables
from vannah_pipelines.catalog.schema import (
    QUARANTINE_SCHEMA,
    TABLES,
    current_select,
    patient_select,
    series_select,
    study_select,
)
from vannah_pipelines.errors import CatalogError

if TYPE_CHECKING:
    from vannah_pipelines.settings import Settings

INSTANCE_VERSIONS = "instance_versions"
QUARANTINE = "quarantine"
BATCHES = "batches"
WRITER_LOCK = "writer_lock"

BATCH_SCHEMA = pa.schema(
    [
        pa.field("batch_id", pa.string()),
        pa.field("table_name", pa.string()),
        pa.field("row_count", pa.int64()),
        pa.field("committed_at", pa.timestamp("us", tz="UTC")),
    ]
)

# Lake table -> schema: the file catalog's ``instances`` rows are every version, so the lake
# names that table for what it holds; ``instances`` is the current-version view over it.
LAKE_TABLES: dict[str, pa.Schema] = {
    INSTANCE_VERSIONS: TABLES["instances"],
    QUARANTINE: QUARANTINE_SCHEMA,
    BATCHES: BATCH_SCHEMA,
    # One row that every append updates: DuckLake has no unique constraint, but two
    # transactions deleting (updating) the same row conflict, so concurrent appends are
    # serialised and the loser re-checks the batch ledger (see append_batch).
    WRITER_LOCK: pa.schema([pa.field("appends", pa.int64())]),
    # Every row of each state-change table (the history; the latest per key is served).
    **{c.name: c.schema for c in CHANGE_TABLES.values()},
}
# Where the header of a served row is: the lake's instance_versions (``lake:<batch_id>``).
LAKE_SOURCE = "lake:"
_INLINED = (BATCHES, WRITER_LOCK)
_INLINED_ROW_LIMIT = 1000  # rows per insert kept in PostgreSQL; a batch adds one per table
# Conflicting commits (another writer appended first) are retried this many times.
APPEND_ATTEMPTS = 20
# Appended rows are sorted so each Parquet row group covers a narrow UID range: a point query
# (``WHERE study_instance_uid = ?``) then skips most row groups by their min/max statistics.
_SORT_KEYS: dict[str, str] = {
    INSTANCE_VERSIONS: "study_instance_uid, series_instance_uid, sop_instance_uid",
    QUARANTINE: "file_name",
    **{c.name: ", ".join(c.key_columns) for c in CHANGE_TABLES.values()},
}
# The PyPI package holding each extension, and the extension's own name (LOAD derives the
# entry point from the file name: the ``postgres`` alias's file would not load).
EXTENSIONS: dict[str, str] = {
    "httpfs": "duckdb_extension_httpfs",
    "postgres_scanner": "duckdb_extension_postgres_scanner",
    "ducklake": "duckdb_extension_ducklake",
}
_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,62}")

log = logging.getLogger(__name__)


def _literal(value: str) -> str:
    """A SQL string literal (ATTACH and CREATE SECRET take no bound parameters)."""
    return "'" + value.replace("'", "''") + "'"


def _conninfo_value(value: str) -> str:
    """A libpq connection-string value, quoted (PostgreSQL docs, 34.1.1.1)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


@dataclass(frozen=True)
class LakeConfig:
    """Where the lake lives: a PostgreSQL database for metadata, an S3 prefix for data.

    `postgres` is a libpq connection string (``host=... port=... dbname=... user=...``; a
    password may come from it, ``PGPASSWORD`` or a ``.pgpass`` file). `data_path` is the
    ``s3://bucket/prefix/`` the Parquet files go under. `s3_endpoint` is ``host:port`` of an
    S3-compatible server (SeaweedFS, MinIO); empty means AWS S3 itself.
    """

    postgres: str = field(repr=False)  # may hold a password
    data_path: str
    s3_key_id: str = ""
    s3_secret: str = field(default="", repr=False)
    s3_endpoint: str = ""
    s3_region: str = "us-east-1"
    s3_use_ssl: bool = True
    s3_url_style: Literal["path", "vhost"] = "path"
    alias: str = "lake"

    def __post_init__(self) -> None:
        if not _IDENTIFIER.fullmatch(self.alias):
            raise CatalogError(f"lake alias must be a lower-case SQL identifier: {self.alias!r}")
        if not self.data_path.startswith("s3://"):
            raise CatalogError(f"lake data_path must be an s3:// URL: {self.data_path!r}")
        if not self.postgres.strip():
            raise CatalogError("lake postgres connection string is empty")

    @classmethod
    def from_parts(
        cls,
        *,
        host: str,
        dbname: str,
        user: str,
        data_path: str,
        port: int = 5432,
        password: str | None = None,
        **s3: str | bool,
    ) -> LakeConfig:
        """Build the libpq connection string from its pieces (values quoted); `s3` holds the
        other fields (``s3_key_id``, ``s3_secret``, ``s3_endpoint``, ...)."""
        pieces = {"host": host, "port": str(port), "dbname": dbname, "user": user}
        if password is not None:
            pieces["password"] = password
        conninfo = " ".join(f"{k}={_conninfo_value(v)}" for k, v in pieces.items())
        return cls(conninfo, data_path, **s3)  # type: ignore[arg-type]

    @classmethod
    def from_settings(cls, settings: Settings) -> LakeConfig | None:
        """The lake the settings describe (``catalog_lake_*``), or None: the embedded
        catalog of local files."""
        if settings.catalog_lake_postgres is None or settings.catalog_lake_data_path is None:
            return None
        return cls(
            postgres=settings.catalog_lake_postgres.get_secret_value(),
            data_path=settings.catalog_lake_data_path,
            s3_key_id=settings.catalog_lake_s3_key_id,
            s3_secret=settings.catalog_lake_s3_secret.get_secret_value(),
            s3_endpoint=settings.catalog_lake_s3_endpoint,
            s3_region=settings.catalog_lake_s3_region,
            s3_use_ssl=settings.catalog_lake_s3_use_ssl,
        )

    @property
    def bucket_scope(self) -> str:
        """``s3://bucket``: the scope of the S3 secret this lake creates."""
        return "s3://" + self.data_path.removeprefix("s3://").split("/", 1)[0]

    @property
    def data_prefix(self) -> str:
        """The data path with exactly one trailing slash."""
        return self.data_path.rstrip("/") + "/"


def extension_path(name: str) -> Path:
    """The extension file the PyPI package for `name` ships for this DuckDB version."""
    package = EXTENSIONS[name]
    version = duckdb.__version__
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = package.replace("_", "-")
        raise CatalogError(
            f"DuckDB extension {name!r} is not installed: pip install {pip_name}=={version}"
        )
    path = Path(spec.submodule_search_locations[0]) / "extensions" / f"v{version}"
    path = path / f"{name}.duckdb_extension"
    if not path.is_file():
        raise CatalogError(
            f"{package} has no build for DuckDB {version} ({path}): install the same version of "
            "duckdb and of its extension packages"
        )
    return path


def load_extensions(con: duckdb.DuckDBPyConnection) -> None:
    """LOAD httpfs, postgres_scanner and ducklake from their packages' files (no download)."""
    for name in EXTENSIONS:
        con.execute(f"LOAD {_literal(str(extension_path(name)))}")


def connect() -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB that never tries to fetch an extension from the network."""
    return duckdb.connect(
        config={"autoinstall_known_extensions": False, "autoload_known_extensions": False}
    )


def attach_lake(
    config: LakeConfig, con: duckdb.DuckDBPyConnection | None = None, *, read_only: bool = False
) -> duckdb.DuckDBPyConnection:
    """Load the extensions, create the S3 secret and ATTACH the lake as ``config.alias``.

    On a new PostgreSQL database the attach creates DuckLake's metadata tables. Returns the
    connection (a new in-memory one when `con` is None).
    """
    con = connect() if con is None else con
    load_extensions(con)
    secret = [
        "TYPE s3",
        f"KEY_ID {_literal(config.s3_key_id)}",
        f"SECRET {_literal(config.s3_secret)}",
        f"REGION {_literal(config.s3_region)}",
        f"URL_STYLE {_literal(config.s3_url_style)}",
        f"USE_SSL {'true' if config.s3_use_ssl else 'false'}",
        f"SCOPE {_literal(config.bucket_scope)}",
    ]
    if config.s3_endpoint:
        secret.append(f"ENDPOINT {_literal(config.s3_endpoint)}")
    con.execute(f"CREATE OR REPLACE SECRET {config.alias}_s3 ({', '.join(secret)})")
    options = [f"DATA_PATH {_literal(config.data_prefix)}"]
    if read_only:
        options.append("READ_ONLY")
    try:
        con.execute(
            f"ATTACH {_literal('ducklake:postgres:' + config.postgres)} AS {config.alias} "
            f"({', '.join(options)})"
        )
    except duckdb.Error as exc:
        hint = ""
        if read_only and "does not exist" in str(exc):
            hint = " (a new lake: `vannah lake init` or the first ingest run creates it)"
        raise CatalogError(f"cannot attach the DuckLake catalog: {exc}{hint}") from exc
    return con


def ensure_tables(con: duckdb.DuckDBPyConnection, config: LakeConfig) -> None:
    """Create the lake tables that are missing, and set their options (idempotent).

    Catalog rows are never inlined: every batch becomes Parquet files under the data path.
    The small bookkeeping tables (``batches``, ``writer_lock``) are inlined into PostgreSQL,
    so that an append adds no tiny file to S3 for them and the ledger look-up stays there.
    """
    lake = config.alias
    con.execute(f"CALL {lake}.set_option('data_inlining_row_limit', 0)")
    with _transaction(con):
        for table, schema in LAKE_TABLES.items():
            view = f"_vannah_lake_schema_{table}"
            con.register(view, schema.empty_table())
            try:
                con.execute(f"CREATE TABLE IF NOT EXISTS {lake}.{table} AS FROM {view} LIMIT 0")
            finally:
                con.unregister(view)
        create_empty_serving_tables(con, lake, if_not_exists=True)
    _add_missing_columns(con, lake)
    for table in _INLINED:
        con.execute(
            f"CALL {lake}.set_option('data_inlining_row_limit', ?, table_name => ?)",
            [_INLINED_ROW_LIMIT, table],
        )
    with _transaction(con):
        row = con.execute(f"SELECT count(*) FROM {lake}.{WRITER_LOCK}").fetchone()
        if row is not None and row[0] == 0:
            con.execute(f"INSERT INTO {lake}.{WRITER_LOCK} VALUES (0)")


def _add_missing_columns(con: duckdb.DuckDBPyConnection, lake: str) -> None:
    """Give the lake's serving tables the columns this version derives that an older one
    did not (DuckLake's ADD COLUMN: earlier rows read NULL), e.g. ``studies.tier``."""
    con.execute("CREATE SCHEMA IF NOT EXISTS memory._vannah_expected")
    try:
        create_empty_serving_tables(con, "memory._vannah_expected")
        for table in SERVING_TABLES:
            want = con.execute(f"DESCRIBE memory._vannah_expected.{table}").fetchall()
            have = {str(r[0]) for r in con.execute(f"DESCRIBE {lake}.{table}").fetchall()}
            for name, kind, *_ in want:
                if name not in have:
                    log.info("lake table %s gains column %s", table, name)
                    con.execute(f'ALTER TABLE {lake}.{table} ADD COLUMN "{name}" {kind}')
    finally:
        con.execute("DROP SCHEMA memory._vannah_expected CASCADE")


def init_lake(config: LakeConfig) -> None:
    """Create the lake (DuckLake metadata in PostgreSQL) and its tables if missing: what the
    writer does on its first append, done ahead so readers can start before any ingest
    (a reader attaches read-only and cannot create them). Idempotent."""
    con = attach_lake(config)
    try:
        ensure_tables(con, config)
    finally:
        con.close()


@contextlib.contextmanager
def _transaction(con: duckdb.DuckDBPyConnection) -> Iterator[None]:
    con.execute("BEGIN")
    try:
        yield
        con.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(duckdb.Error):
            con.execute("ROLLBACK")  # a failed COMMIT may have ended the transaction already
        raise


def has_batch(con: duckdb.DuckDBPyConnection, config: LakeConfig, batch_id: str) -> bool:
    """Whether the lake already holds `batch_id` (as of this connection's snapshot)."""
    row = con.execute(
        f"SELECT count(*) FROM {config.alias}.{BATCHES} WHERE batch_id = ?", [batch_id]
    ).fetchone()
    return row is not None and row[0] > 0


def append_batch(
    con: duckdb.DuckDBPyConnection,
    config: LakeConfig,
    batch_id: str,
    tables: Mapping[str, pa.Table],
) -> bool:
    """Append one batch's rows (lake table -> Arrow rows) in one transaction.

    Returns False, changing nothing, when the lake already holds `batch_id`: a retried batch
    (after a crash, or a run re-executed) never duplicates rows. Rows must carry `batch_id`
    in their ``batch_id`` column; they are cast to the table's schema (a missing or extra
    column is an error) and sorted by their UIDs.

    Concurrent writers: every append also updates the one row of ``writer_lock``, so two
    appends that overlap conflict at COMMIT (DuckLake has no unique constraint to do it); the
    loser is retried from the start (up to APPEND_ATTEMPTS times, with jittered backoff), sees
    the winner's ledger row if it was the same batch and returns False, else commits after it
    (DuckLake deletes the files of the lost attempt). A writer killed mid-append can leave an
    unreferenced file: ``ducklake_delete_orphaned_files`` removes those.
    """
    unknown = set(tables) - {INSTANCE_VERSIONS, QUARANTINE}
    if unknown:
        raise CatalogError(f"not appendable lake tables: {sorted(unknown)}")
    prepared: dict[str, pa.Table] = {}
    for name, rows in tables.items():
        schema = LAKE_TABLES[name]
        if set(rows.column_names) != set(schema.names):
            raise CatalogError(
                f"{name} rows do not match its schema: missing "
                f"{sorted(set(schema.names) - set(rows.column_names))}, extra "
                f"{sorted(set(rows.column_names) - set(schema.names))}"
            )
        rows = rows.select(schema.names).cast(schema)
        if rows.num_rows and set(rows.column("batch_id").unique().to_pylist()) != {batch_id}:
            raise CatalogError(f"{name} rows of batch {batch_id} carry another batch_id")
        prepared[name] = rows
    for attempt in range(1, APPEND_ATTEMPTS + 1):
        try:
            return _append_once(con, config, batch_id, prepared)
        except duckdb.TransactionException:
            # Another writer committed first: if that was this batch, the retry sees it.
            if attempt == APPEND_ATTEMPTS:
                raise
            time.sleep(min(2.0, 0.05 * 2**attempt) * random.uniform(0.5, 1.0))
    raise AssertionError("unreachable")


def _append_once(
    con: duckdb.DuckDBPyConnection,
    config: LakeConfig,
    batch_id: str,
    prepared: Mapping[str, pa.Table],
) -> bool:
    lake = config.alias
    with _transaction(con):
        if has_batch(con, config, batch_id):
            return False  # nothing written: the commit is a no-op
        con.execute(f"UPDATE {lake}.{WRITER_LOCK} SET appends = appends + 1")
        now = datetime.now(UTC)
        ledger = []
        for name, rows in prepared.items():
            view = f"_vannah_lake_{name}"
            con.register(view, rows)
            try:
                con.execute(
                    f"INSERT INTO {lake}.{name} BY NAME "
                    f"SELECT * FROM {view} ORDER BY {_SORT_KEYS[name]}"
                )
            finally:
                con.unregister(view)
            ledger.append((batch_id, name, rows.num_rows, now))
        if not ledger:
            ledger.append((batch_id, "", 0, now))  # an empty batch is recorded all the same
        con.executemany(f"INSERT INTO {lake}.{BATCHES} VALUES (?, ?, ?, ?)", ledger)
        if QUARANTINE in prepared and prepared[QUARANTINE].num_rows:
            _insert(con, f"{lake}.compacted_quarantine", prepared[QUARANTINE], "quarantined_at")
        rows = prepared.get(INSTANCE_VERSIONS)
        if rows is not None and rows.num_rows:
            update_serving(
                con,
                lake,
                sorted(set(rows.column("sop_instance_uid").to_pylist())),
                sorted(set(rows.column("study_instance_uid").to_pylist())),
            )
    return True


def _insert(con: duckdb.DuckDBPyConnection, table: str, rows: pa.Table, order: str) -> None:
    view = "_vannah_lake_rows"
    con.register(view, rows)
    try:
        con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM {view} ORDER BY {order}")
    finally:
        con.unregister(view)


def _in(column: str, values: list[str | None]) -> str:
    """``column IN ('a', 'b')`` with the values as quoted literals (DuckDB prunes row groups
    by their statistics on a literal list; a NULL among them matches NULL)."""
    present = [v for v in values if v is not None]
    clauses = []
    if present:
        clauses.append(f"{column} IN ({', '.join(_literal(v) for v in present)})")
    if len(present) < len(values):
        clauses.append(f"{column} IS NULL")
    return "(" + (" OR ".join(clauses) or "false") + ")"


def update_serving(
    con: duckdb.DuckDBPyConnection, lake: str, sops: list[str], studies: list[str]
) -> None:
    """Derive again, inside the caller's transaction, the lake's served rows that the SOP
    Instance UIDs `sops` (of the studies `studies`) change: their current rows in
    ``compacted_instances`` and the rows of every series, study and patient they belong to,
    before and after. The same SQL as the serving database (schema.py's ``current_select``,
    ``series_select``, ``study_select``, ``patient_select`` and changes.py's location rule),
    read through the studies' UIDs only, so the cost follows the batch, not the lake.
    """
    if not sops:
        return
    # The studies as a literal list (row-group pruning), the SOP UIDs as a semi join on a
    # registered table (a literal list of thousands of UIDs costs seconds to plan).
    con.register(_TOUCHED, pa.table({"sop_instance_uid": pa.array(sops, pa.string())}))
    try:
        _update_serving(con, lake, studies)
    finally:
        con.unregister(_TOUCHED)


_TOUCHED = "_vannah_lake_touched"
_IN_TOUCHED = f"sop_instance_uid IN (SELECT sop_instance_uid FROM {_TOUCHED})"


def _update_serving(con: duckdb.DuckDBPyConnection, lake: str, studies: list[str]) -> None:
    in_studies = _in("study_instance_uid", list(studies))
    touched = f"{in_studies} AND {_IN_TOUCHED}"
    keys = "SELECT DISTINCT series_instance_uid, study_instance_uid, patient_id FROM "
    before = con.execute(f"{keys} {lake}.compacted_instances WHERE {touched}").fetchall()
    before_patients = con.execute(
        f"SELECT DISTINCT patient_id FROM {lake}.compacted_studies WHERE {in_studies}"
    ).fetchall()
    con.execute(f"DELETE FROM {lake}.compacted_instances WHERE {touched}")
    candidates = (
        f"(SELECT * EXCLUDE (header_json), {_literal(LAKE_SOURCE)} || batch_id AS source_file "
        f"FROM {lake}.{INSTANCE_VERSIONS} WHERE {touched})"
    )
    locations = f"(SELECT * FROM {lake}.compacted_{INSTANCE_LOCATIONS.name} WHERE {_IN_TOUCHED})"
    located = instances_with_locations_sql(candidates, locations)
    con.execute(
        f"INSERT INTO {lake}.compacted_instances BY NAME "
        f"SELECT * FROM ({current_select(f'({located})')}) "
        "ORDER BY study_instance_uid, series_instance_uid, instance_number, sop_instance_uid"
    )
    after = con.execute(f"{keys} {lake}.compacted_instances WHERE {touched}").fetchall()
    series = sorted({r[0] for r in before + after if r[0] is not None})
    all_studies = _in("study_instance_uid", sorted({r[1] for r in before + after} | set(studies)))
    in_series = _in("series_instance_uid", list(series))
    con.execute(f"DELETE FROM {lake}.compacted_series WHERE {in_series}")
    con.execute(
        f"INSERT INTO {lake}.compacted_series BY NAME "
        + series_select(f"{lake}.compacted_instances", f"WHERE {all_studies} AND {in_series}")
    )
    con.execute(f"DELETE FROM {lake}.compacted_studies WHERE {all_studies}")
    con.execute(
        f"INSERT INTO {lake}.compacted_studies BY NAME "
        + study_select(f"{lake}.compacted_instances", f"WHERE {all_studies}")
    )
    patients = {r[2] for r in before + after} | {r[0] for r in before_patients}
    in_patients = _in("patient_id", sorted(patients, key=lambda p: (p is None, p or "")))
    con.execute(f"DELETE FROM {lake}.compacted_patients WHERE {in_patients}")
    con.execute(
        f"INSERT INTO {lake}.compacted_patients BY NAME "
        + patient_select(f"{lake}.compacted_studies", f"WHERE {in_patients}")
    )


def append_lake_change(
    con: duckdb.DuckDBPyConnection,
    config: LakeConfig,
    table: ChangeTable | str,
    rows: pa.Table,
) -> bool:
    """Append state-change rows (made by :func:`changes.change_rows`: one ``change_id``)
    to the lake's ``table`` in one transaction, with its latest-per-key table
    ``compacted_<table>`` and, for ``instance_locations``, the instances, series, studies
    and patients it moves derived again (:func:`update_serving`).

    Idempotent by ``change_id`` (kept in the batch ledger): False when the lake holds it.
    """
    t = change_table(table)
    if not rows.num_rows:
        raise CatalogError(f"{t.name}: an append needs at least one row")
    rows = rows.select(t.schema.names).cast(t.schema)
    ids = set(rows.column("change_id").to_pylist())
    if len(ids) != 1:
        raise CatalogError(f"{t.name}: the rows of one append share one change_id")
    change_id = str(ids.pop())
    for attempt in range(1, APPEND_ATTEMPTS + 1):
        try:
            return _append_change_once(con, config, t, change_id, rows)
        except duckdb.TransactionException:
            if attempt == APPEND_ATTEMPTS:
                raise
            time.sleep(min(2.0, 0.05 * 2**attempt) * random.uniform(0.5, 1.0))
    raise AssertionError("unreachable")


def append_change_file(config: LakeConfig, change: ChangeAppend) -> bool:
    """Append to the lake a state change already appended locally
    (:func:`changes.append_change`: its file holds the rows), with the same ``change_id``:
    the lake path next to the local one. Idempotent (False when the lake holds it)."""
    con = attach_lake(config)
    try:
        ensure_tables(con, config)
        return append_lake_change(con, config, change.table, pq.read_table(change.path))
    finally:
        con.close()


def record_change(
    settings: Settings,
    table: ChangeTable | str,
    rows: Sequence[Mapping[str, Any]],
    *,
    changed_by: str,
) -> ChangeAppend:
    """Append `rows` to the state-change table `table` of the catalog the settings name:
    its files (one atomic append), and the same change in the DuckLake when one is
    configured, so services reading the lake see it too."""
    from vannah_pipelines.catalog.writer import CatalogWriter

    change = append_change(CatalogWriter(settings.catalog_dir), table, rows, changed_by=changed_by)
    lake = LakeConfig.from_settings(settings)
    if lake is not None:
        append_change_file(lake, change)
    return change


def _append_change_once(
    con: duckdb.DuckDBPyConnection,
    config: LakeConfig,
    t: ChangeTable,
    change_id: str,
    rows: pa.Table,
) -> bool:
    lake = config.alias
    with _transaction(con):
        if has_batch(con, config, change_id):
            return False
        con.execute(f"UPDATE {lake}.{WRITER_LOCK} SET appends = appends + 1")
        _insert(con, f"{lake}.{t.name}", rows, _SORT_KEYS[t.name])
        con.execute(
            f"INSERT INTO {lake}.{BATCHES} VALUES (?, ?, ?, ?)",
            [change_id, t.name, rows.num_rows, datetime.now(UTC)],
        )
        first = t.key_columns[0]
        keyed = _in(first, sorted(set(rows.column(first).to_pylist())))
        con.execute(f"DELETE FROM {lake}.compacted_{t.name} WHERE {keyed}")
        con.execute(
            f"INSERT INTO {lake}.compacted_{t.name} BY NAME "
            + latest_sql(t, f"(SELECT * FROM {lake}.{t.name} WHERE {keyed})")
        )
        if t is INSTANCE_LOCATIONS:
            sops = sorted(set(rows.column("sop_instance_uid").to_pylist()))
            # A location row names no study: its instances' studies are looked up once.
            studies = con.execute(
                f"SELECT DISTINCT study_instance_uid FROM {lake}.{INSTANCE_VERSIONS} "
                f"WHERE {_in('sop_instance_uid', list(sops))}"
            ).fetchall()
            update_serving(con, lake, sops, sorted(r[0] for r in studies))
    return True


def serving_view_sql(lake: str) -> list[str]:
    """The catalog's views over the lake's tables: ``instances``, ``series``, ``studies``,
    ``patients`` and ``quarantine`` over the served tables the writer maintains (the names
    and columns of docs/catalog.md), ``instance_versions`` and the state-change tables'
    history over the raw ones."""
    locations, status = INSTANCE_LOCATIONS.name, QUARANTINE_STATUS.name
    return [
        "CREATE OR REPLACE VIEW instances AS SELECT * EXCLUDE (source_file) "
        f"FROM {lake}.compacted_instances",
        f"CREATE OR REPLACE VIEW series AS SELECT * FROM {lake}.compacted_series",
        f"CREATE OR REPLACE VIEW studies AS SELECT * FROM {lake}.compacted_studies",
        f"CREATE OR REPLACE VIEW patients AS SELECT * FROM {lake}.compacted_patients",
        "CREATE OR REPLACE VIEW quarantine AS "
        + quarantine_with_status_sql(f"{lake}.compacted_quarantine", f"{lake}.compacted_{status}"),
        "CREATE OR REPLACE VIEW instance_versions AS "
        + instances_with_locations_sql(
            f"{lake}.{INSTANCE_VERSIONS}", f"{lake}.compacted_{locations}"
        ),
        *(
            f"CREATE OR REPLACE VIEW {c.name} AS SELECT * FROM {lake}.{c.name}"
            for c in CHANGE_TABLES.values()
        ),
        # The served table holds the latest row of each delivery (kept so at every append).
        "CREATE OR REPLACE VIEW delivery_status AS "
        + delivery_status_sql(f"{lake}.compacted_{DELIVERIES.name}"),
        "CREATE OR REPLACE VIEW open_deliveries AS "
        + open_deliveries_sql(f"{lake}.compacted_{DELIVERIES.name}", None, None),
    ]


def open_reader(config: LakeConfig) -> duckdb.DuckDBPyConnection:
    """A read-only connection on the lake with the catalog's views (``instances``,
    ``series``, ``studies``, ``patients``, ``instance_versions``, ``quarantine``, the
    state-change tables) over it: :func:`serving_view_sql`.

    Each query runs on the newest snapshot committed when it starts.
    """
    con = attach_lake(config, read_only=True)
    for statement in serving_view_sql(config.alias):
        con.execute(statement)
    return con
