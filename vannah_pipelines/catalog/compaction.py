"""Compaction: per-batch Parquet files merged into sorted per-day files and a serving database.

Ingest adds one immutable Parquet file per landing batch (cheap at any archive size).
Compaction, run daily by Dagster, merges every day that has new batch files into a few large
files sorted by study, and writes the *serving database*: a DuckDB file with the current
``instances`` (without their headers, which stay in the Parquet files), ``series``,
``studies``, ``patients`` and ``quarantine``, sorted by their search keys so readers open it
read-only and query it on disk with a bounded buffer pool (docs/benchmarks.md, "Catalog at
scale").

Everything a generation is made of is listed in ``manifest.json``, replaced atomically as the
last step: readers see the previous generation or the new one, never a half state. Files a
generation replaces are deleted by the next compaction once the replacing generation is older
than a grace period, so a reader still holding the previous generation can finish.

::

    catalog/
      manifest.json                                  the current generation
      serving/g000007.duckdb                         serving database of generation 7
      compacted/instances/day=YYYY-MM-DD/g000007-0.parquet   sorted, at most N rows each
      instances/day=YYYY-MM-DD/<batch_id>.parquet    batch files not compacted yet
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from vannah_pipelines.catalog.changes import (
    CHANGE_TABLES,
    DELIVERIES,
    INSTANCE_LOCATIONS,
    OPEN_DELIVERIES_TABLE,
    OPEN_DELIVERY_STATES,
    QUARANTINE_STATUS,
    ChangeTable,
    delivery_status_sql,
    instances_with_locations_sql,
    latest_sql,
    open_deliveries_sql,
    quarantine_with_status_sql,
)
from vannah_pipelines.catalog.schema import (
    INSTANCE_AVAILABILITY,
    TABLES,
    current_select,
    patient_select,
    series_select,
    study_select,
)
from vannah_pipelines.catalog.writer import (
    CATALOG_DB,
    SCHEMAS,
    STORAGE_TIERS_COLUMNS,
    STORAGE_TIERS_FILE,
    CatalogWriter,
)
from vannah_pipelines.errors import VannahError
from vannah_pipelines.landing.layout import fsync_dir, make_dirs, write_atomic

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
# The serving database's layout: a compaction rebuilds one written with an older layout
# even when no batch is new (2: studies have a tier column, 'mixed' when split; 3: and
# hot_bytes, warm_bytes, cold_bytes).
SERVING_SCHEMA = 4
COMPACTED = "compacted"
SERVING = "serving"
# The zero-row file per table that keeps globs valid: never compacted, never deleted.
SCHEMA_FILE = "day=1970-01-01/schema.parquet"
# How each table's compacted files are sorted: a study's rows sit together, so row-group
# statistics find them without reading the rest of the file.
_FILE_ORDER = {
    "instances": "study_instance_uid, series_instance_uid, instance_number, sop_instance_uid, "
    "received_at",
    "quarantine": "quarantined_at, quarantine_key",
    # A state-change table's rows: by key, then in the order they were appended.
    **{
        c.directory: ", ".join([*c.key_columns, "changed_at", "change_id"])
        for c in CHANGE_TABLES.values()
    },
}
LOCATIONS = INSTANCE_LOCATIONS.directory
STATUS = QUARANTINE_STATUS.directory
INSTANCE_ORDER = "study_instance_uid, series_instance_uid, instance_number, sop_instance_uid"
# Instances per bucket of studies when series and studies are derived (bounded memory).
_ROWS_PER_BUCKET = 1_000_000
# Columns the serving database keeps per instance: all but the header, plus where it is.
SERVING_INSTANCE_COLUMNS = [n for n in TABLES["instances"].names if n != "header_json"]


SERVING_TABLES = (
    "compacted_instances",
    "compacted_series",
    "compacted_studies",
    "compacted_patients",
    "compacted_quarantine",
    *(f"compacted_{c.name}" for c in CHANGE_TABLES.values()),
)


def create_empty_serving_tables(
    con: duckdb.DuckDBPyConnection, catalog: str, *, if_not_exists: bool = False
) -> None:
    """Create the serving database's tables, empty, in the attached `catalog` (``base``
    of a reader with nothing compacted; the DuckLake's copies the writer maintains): the
    same names, columns and types, derived by the same SQL as the serving database's."""
    create = "CREATE TABLE IF NOT EXISTS" if if_not_exists else "CREATE TABLE"
    cols = ", ".join(SERVING_INSTANCE_COLUMNS)
    con.register("_empty_i", TABLES["instances"].empty_table())
    con.register("_empty_q", TABLES["quarantine"].empty_table())
    try:
        con.execute(
            f"{create} {catalog}.compacted_instances AS "
            + current_select(f"(SELECT {cols}, '' AS source_file FROM _empty_i)")
        )
        instances = f"(SELECT * FROM {catalog}.compacted_instances LIMIT 0)"
        con.execute(f"{create} {catalog}.compacted_series AS {series_select(instances)}")
        con.execute(f"{create} {catalog}.compacted_studies AS {study_select(instances)}")
        studies = f"(SELECT * FROM {catalog}.compacted_studies LIMIT 0)"
        con.execute(f"{create} {catalog}.compacted_patients AS {patient_select(studies)}")
        con.execute(f"{create} {catalog}.compacted_quarantine AS SELECT * FROM _empty_q")
    finally:
        con.unregister("_empty_i")
        con.unregister("_empty_q")
    for change in CHANGE_TABLES.values():
        con.register("_empty_c", change.schema.empty_table())
        try:
            con.execute(f"{create} {catalog}.compacted_{change.name} AS SELECT * FROM _empty_c")
        finally:
            con.unregister("_empty_c")


class CompactionError(VannahError):
    """Compaction refused to publish: the merged files do not hold the rows they replace."""


class CompactionBusyError(VannahError):
    """Another compaction holds the catalog's compaction lock."""


LOCK = ".compaction.lock"


@contextlib.contextmanager
def _exclusive(root: Path) -> Iterator[None]:
    """Hold the catalog's compaction lock (one compaction at a time, on this host or any
    sharing the folder over a file system with working flock)."""
    make_dirs(root)
    fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CompactionBusyError(f"another compaction of {root} is running") from None
        yield
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Manifest:
    """One generation of the compacted catalog. Paths are relative to the catalog folder."""

    generation: int = 0
    serving: str | None = None
    files: dict[str, list[str]] = field(default_factory=dict)  # table -> compacted files
    covered: dict[str, list[str]] = field(default_factory=dict)  # batch files now compacted
    retired: list[str] = field(default_factory=list)  # replaced, deleted by the next run
    created_at: str = ""
    schema: int = SERVING_SCHEMA  # the serving database's layout (SERVING_SCHEMA)

    @classmethod
    def load(cls, root: Path) -> Manifest:
        """The current generation (generation 0, nothing compacted, if none was written)."""
        try:
            raw = json.loads((Path(root) / MANIFEST).read_text())
        except FileNotFoundError:
            return cls()
        return cls(
            generation=int(raw["generation"]),
            serving=raw.get("serving"),
            files={t: list(v) for t, v in raw.get("files", {}).items()},
            covered={t: list(v) for t, v in raw.get("covered", {}).items()},
            retired=list(raw.get("retired", [])),
            created_at=str(raw.get("created_at", "")),
            schema=int(raw.get("schema", 1)),
        )

    def save(self, root: Path) -> None:
        write_atomic(Path(root) / MANIFEST, json.dumps(asdict(self), indent=1).encode())

    def covered_set(self, table: str) -> set[str]:
        return set(self.covered.get(table, []))

    def age_seconds(self, now: datetime) -> float:
        if not self.created_at:
            return float("inf")
        return (now - datetime.fromisoformat(self.created_at)).total_seconds()


def batch_files(root: Path, table: str) -> list[str]:
    """Batch files of `table` on disk (relative paths), oldest day first, schema file left out."""
    base = Path(root) / table
    if not base.is_dir():
        return []
    found = sorted(f"{table}/{p.parent.name}/{p.name}" for p in base.glob("day=*/*.parquet"))
    return [f for f in found if f != f"{table}/{SCHEMA_FILE}"]


def pending_batch_files(root: Path, manifest: Manifest, table: str) -> list[str]:
    """Batch files of `table` that `manifest`'s generation does not hold yet: the overlay."""
    covered = manifest.covered_set(table)
    return [f for f in batch_files(root, table) if f not in covered]


@dataclass
class CompactionResult:
    """What one compaction did (the Dagster materialization's metadata)."""

    generation: int
    days: list[str] = field(default_factory=list)
    batch_files: int = 0
    files_before: int = 0  # files replaced: batch files plus the days' earlier compacted files
    bytes_before: int = 0
    files_after: int = 0
    bytes_after: int = 0
    rows: dict[str, int] = field(default_factory=dict)  # rows rewritten per table
    serving_bytes: int = 0
    instances: int = 0  # current instances in the serving database
    deleted_files: int = 0
    seconds: float = 0.0
    replaced: dict[str, list[str]] = field(default_factory=dict)  # for verify()
    written: dict[str, list[str]] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return bool(self.days)


def _sql_list(paths: Iterable[Path]) -> str:
    return "[" + ", ".join("'" + str(p).replace("'", "''") + "'" for p in paths) + "]"


def _day_of(relative: str) -> str:
    """``instances/day=2026-01-02/x.parquet`` -> ``2026-01-02``."""
    return Path(relative).parent.name.removeprefix("day=")


def fingerprint(con: duckdb.DuckDBPyConnection, table: str, files: list[Path]) -> tuple[int, int]:
    """(rows, order-independent hash of every row) of `table`'s columns in `files`."""
    if not files:
        return (0, 0)
    cols = ", ".join(SCHEMAS[table].names)
    row = con.execute(
        f"SELECT count(*), coalesce(sum(hash(t)), 0)::HUGEINT "
        f"FROM (SELECT {cols} FROM read_parquet({_sql_list(files)}, hive_partitioning = false, "
        "union_by_name = true)) t"
    ).fetchone()
    assert row is not None
    return (int(row[0]), int(row[1]))


def _connect(
    root: Path, memory_limit_mb: int, database: str = ":memory:"
) -> duckdb.DuckDBPyConnection:
    tmp = Path(root) / ".compaction-tmp"
    make_dirs(tmp)
    con = duckdb.connect(database)
    con.execute(f"SET memory_limit = '{int(memory_limit_mb)}MB'")
    con.execute(f"SET temp_directory = '{str(tmp).replace(chr(39), chr(39) * 2)}'")
    con.execute("SET preserve_insertion_order = true")
    return con


def _write_sorted(
    con: duckdb.DuckDBPyConnection,
    table: str,
    inputs: list[Path],
    out_dir: Path,
    stem: str,
    rows_per_file: int,
    row_group_rows: int,
) -> list[Path]:
    """Merge `inputs` into files ``<stem>-<n>.parquet`` sorted by the table's order."""
    cols = ", ".join(SCHEMAS[table].names)
    relation = con.execute(
        f"SELECT {cols} FROM read_parquet({_sql_list(inputs)}, hive_partitioning = false, "
        f"union_by_name = true) ORDER BY {_FILE_ORDER[table]}"
    )
    reader = relation.to_arrow_reader(row_group_rows)
    make_dirs(out_dir)
    written: list[Path] = []
    writer: pq.ParquetWriter | None = None
    rows_in_file = 0
    tmp: Path | None = None
    try:
        for batch in reader:
            if writer is None or rows_in_file >= rows_per_file:
                if writer is not None and tmp is not None:
                    writer.close()
                    written.append(_commit_tmp(tmp))
                target = out_dir / f"{stem}-{len(written)}.parquet"
                tmp = target.with_name(f".tmp-{target.name}.{os.getpid()}")
                writer = pq.ParquetWriter(tmp, SCHEMAS[table], compression="zstd")
                rows_in_file = 0
            writer.write_table(
                pa.Table.from_batches([batch]).cast(SCHEMAS[table]), row_group_size=row_group_rows
            )
            rows_in_file += batch.num_rows
        if writer is not None and tmp is not None:
            writer.close()
            written.append(_commit_tmp(tmp))
    except BaseException:
        if writer is not None:
            writer.close()
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise
    fsync_dir(out_dir)
    return written


def _commit_tmp(tmp: Path) -> Path:
    """fsync `tmp` and rename it to its final name (``.tmp-<name>.<pid>`` -> ``<name>``)."""
    target = tmp.with_name(tmp.name.removeprefix(".tmp-").rsplit(".", 1)[0])
    _fsync_replace(tmp, target)
    return target


def _fsync_replace(tmp: Path, target: Path) -> None:
    """Make `tmp`'s bytes durable, then rename it to `target` (atomic)."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(target)


@dataclass(frozen=True)
class _Merge:
    """What this compaction merged, per table: the generation's files, those written now,
    those they replace, and the batch files now compacted."""

    files: dict[str, list[str]]
    written: dict[str, list[str]]
    replaced: dict[str, list[str]]
    covered: dict[str, list[str]]


def _build_serving(
    root: Path, target: Path, previous: Manifest, merge: _Merge, memory_limit_mb: int
) -> int:
    """Write the serving database for the compacted `files` to `target`; returns instances.

    The previous serving database already holds the current version of every instance
    outside the days rewritten now: only the SOP UIDs of those days are decided again.
    """
    tmp = target.with_name(f".tmp-{target.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    Path(f"{tmp}.wal").unlink(missing_ok=True)
    try:
        row = _write_serving(root, tmp, previous, merge, memory_limit_mb)
    except BaseException:
        tmp.unlink(missing_ok=True)
        Path(f"{tmp}.wal").unlink(missing_ok=True)
        raise
    Path(f"{tmp}.wal").unlink(missing_ok=True)
    _fsync_replace(tmp, target)
    fsync_dir(target.parent)
    return row


def _write_serving(
    root: Path, tmp: Path, previous: Manifest, merge: _Merge, memory_limit_mb: int
) -> int:
    files, written, replaced, covered = merge.files, merge.written, merge.replaced, merge.covered
    prefix = str(root.resolve()) + os.sep
    cols = ", ".join(SERVING_INSTANCE_COLUMNS)
    con = _connect(root, memory_limit_mb, str(tmp))
    try:
        con.register("_empty_i", TABLES["instances"].empty_table())
        new_rows = [root.resolve() / f for f in written.get("instances", [])]
        fresh = (
            f"SELECT {cols}, substr(filename, {len(prefix) + 1}) AS source_file FROM "
            f"read_parquet({_sql_list(new_rows)}, filename = true, hive_partitioning = false)"
            if new_rows
            else f"SELECT {cols}, '' AS source_file FROM _empty_i"
        )
        # A view, not a table: at 10M rows a copy would not fit the memory limit.
        con.execute(f"CREATE TEMP VIEW _fresh AS {fresh}")
        has_previous = previous.serving is not None and (root / previous.serving).exists()
        if has_previous:
            con.execute(
                "CREATE TEMP TABLE _touched AS SELECT DISTINCT sop_instance_uid FROM _fresh"
            )
            con.execute(f"ATTACH '{_quote(root / str(previous.serving))}' AS prev (READ_ONLY)")
            con.execute("CREATE TEMP TABLE _gone (f VARCHAR)")
            gone = replaced.get("instances", [])
            if gone:
                con.executemany("INSERT INTO _gone VALUES (?)", [[g] for g in gone])
            kept = (
                "SELECT * FROM prev.compacted_instances p WHERE NOT EXISTS (SELECT 1 FROM "
                "_touched t WHERE t.sop_instance_uid = p.sop_instance_uid)"
            )
            candidates = (
                "SELECT * EXCLUDE (instance_availability) FROM prev.compacted_instances p "
                "WHERE p.sop_instance_uid IN (SELECT sop_instance_uid FROM _touched) "
                "AND p.source_file NOT IN (SELECT f FROM _gone) "
                "UNION ALL BY NAME SELECT * FROM _fresh"
            )
            con.execute(f"CREATE TEMP VIEW _candidates AS {candidates}")
            source = f"{kept} UNION ALL BY NAME {_current(con, '_candidates')}"
        else:
            source = _current(con, "_fresh")
        for change in CHANGE_TABLES.values():
            _latest_changes(con, root, change, written.get(change.directory, []), has_previous)
        located = instances_with_locations_sql(
            f"({source})", f"compacted_{INSTANCE_LOCATIONS.name}"
        )
        con.execute(
            "CREATE TABLE compacted_instances AS SELECT * REPLACE "
            f"({INSTANCE_AVAILABILITY} AS instance_availability) FROM ({located}) "
            f"ORDER BY {INSTANCE_ORDER}"
        )
        if has_previous:
            con.execute("DETACH prev")
        # Series and studies by buckets of studies: the aggregates' states of every series
        # at once do not fit the memory limit at 10M instances (they do not spill).
        row = con.execute("SELECT count(*) FROM compacted_instances").fetchone()
        assert row is not None
        buckets = max(1, -(-int(row[0]) // _ROWS_PER_BUCKET))
        for level, select, order in (
            ("series", series_select, "study_instance_uid"),
            ("studies", study_select, "study_date"),
        ):
            con.execute(f"CREATE TEMP TABLE _{level} AS {select('compacted_instances')} LIMIT 0")
            for bucket in range(buckets):
                where = f"WHERE hash(study_instance_uid) % {buckets} = {bucket}"
                con.execute(f"INSERT INTO _{level} {select('compacted_instances', where)}")
            con.execute(
                f"CREATE TABLE compacted_{level} AS SELECT * FROM _{level} ORDER BY {order}"
            )
            con.execute(f"DROP TABLE _{level}")
        con.execute(
            "CREATE TABLE compacted_patients AS "
            f"{patient_select('compacted_studies')} ORDER BY patient_id"
        )
        quarantine = [root.resolve() / f for f in files.get("quarantine", [])]
        qcols = ", ".join(TABLES["quarantine"].names)
        con.register("_empty_q", TABLES["quarantine"].empty_table())
        qsource = (
            f"read_parquet({_sql_list(quarantine)}, hive_partitioning = false)"
            if quarantine
            else "_empty_q"
        )
        con.execute(
            f"CREATE TABLE compacted_quarantine AS SELECT {qcols} FROM {qsource} "
            "ORDER BY quarantined_at"
        )
        for statement in researcher_views(root, files, covered):
            con.execute(statement)
        row = con.execute("SELECT count(*) FROM compacted_instances").fetchone()
        con.execute("CHECKPOINT")
    finally:
        con.close()
    assert row is not None
    return int(row[0])


def _current(con: duckdb.DuckDBPyConnection, versions: str) -> str:
    """SELECT the current version of each SOP UID in `versions` (a table or view), as
    ``current_select`` does, ranking only the UIDs that have several versions: the window
    over every row does not fit the memory limit at 10M rows, the aggregate spills."""
    con.execute(
        f"CREATE TEMP TABLE _resent AS SELECT sop_instance_uid FROM {versions} "
        "GROUP BY sop_instance_uid HAVING count(*) > 1"
    )
    once = (
        f"SELECT *, {INSTANCE_AVAILABILITY} AS instance_availability FROM {versions} "
        "WHERE sop_instance_uid NOT IN (SELECT sop_instance_uid FROM _resent)"
    )
    several = current_select(
        f"(SELECT * FROM {versions} WHERE sop_instance_uid IN "
        "(SELECT sop_instance_uid FROM _resent))"
    )
    return f"{once} UNION ALL BY NAME {several}"


def _latest_changes(
    con: duckdb.DuckDBPyConnection,
    root: Path,
    change: ChangeTable,
    written: list[str],
    has_previous: bool,
) -> None:
    """``compacted_<change>``: the latest row per key of every change compacted so far (the
    previous generation's table plus the rows of the days rewritten now)."""
    cols = ", ".join(change.schema.names)
    con.register(f"_empty_{change.name}", change.schema.empty_table())
    parts = [f"SELECT {cols} FROM _empty_{change.name}"]
    if has_previous:
        parts.append(f"SELECT {cols} FROM prev.compacted_{change.name}")
    if written:
        files = _sql_list(root.resolve() / f for f in written)
        parts.append(f"SELECT {cols} FROM read_parquet({files}, hive_partitioning = false)")
    source = "(" + " UNION ALL BY NAME ".join(parts) + ")"
    create_compacted_changes(con, change, source)


def create_compacted_changes(
    con: duckdb.DuckDBPyConnection, change: ChangeTable, source: str
) -> None:
    """``compacted_<change>``: the latest row per key of the rows of `source` (a table,
    view or parenthesised subquery); for ``deliveries``, also ``compacted_open_deliveries``,
    its rows in an open state (what routing reads every few seconds, without scanning
    millions of delivered ones)."""
    order = ", ".join(change.key_columns)
    con.execute(
        f"CREATE TABLE compacted_{change.name} AS {latest_sql(change, source)} ORDER BY {order}"
    )
    if change is DELIVERIES:
        create_open_deliveries(con)


def create_open_deliveries(con: duckdb.DuckDBPyConnection) -> None:
    """``compacted_open_deliveries``: the rows of ``compacted_deliveries`` in an open
    state (:data:`OPEN_DELIVERY_STATES`), in the same order."""
    states = ", ".join(f"'{s}'" for s in OPEN_DELIVERY_STATES)
    con.execute(
        f"CREATE TABLE {OPEN_DELIVERIES_TABLE} AS SELECT * FROM compacted_{DELIVERIES.name} "
        f"WHERE status IN ({states}) ORDER BY {', '.join(DELIVERIES.key_columns)}"
    )


def _quote(path: Path | str) -> str:
    return str(path).replace("'", "''")


def researcher_views(
    root: Path, files: dict[str, list[str]], covered: dict[str, list[str]]
) -> list[str]:
    """The views of a serving database: the compacted tables plus the batch and change
    files written since (found by glob, so a reader who keeps the file open sees them),
    the latest version of each instance and the latest change of each key winning across
    both. What ``catalog.duckdb`` shows."""
    from vannah_pipelines.security.audit import audit_view_sql  # the audit trail's own view

    base = root.resolve()
    statements = []
    for table in SCHEMAS:
        glob = _quote(base / table / "*" / "*.parquet")
        # A constant list: DuckDB then skips the compacted batch files without opening them
        # (measured at 10M: 51 ms against 510 ms with a subquery).
        done = ", ".join(f"'{_quote(base / f)}'" for f in covered.get(table, []))
        statements.append(
            f"CREATE VIEW pending_{Path(table).name} AS SELECT * EXCLUDE (filename) FROM "
            f"read_parquet('{glob}', filename = true, hive_partitioning = true, "
            f"union_by_name = true) WHERE NOT list_contains([{done}]::VARCHAR[], filename)"
        )

    def history(table: str) -> str:
        compacted = [base / f for f in files.get(table, [])]
        pending = f"SELECT * FROM pending_{Path(table).name}"
        if not compacted:
            return pending
        return (
            f"SELECT * FROM read_parquet({_sql_list(compacted)}, hive_partitioning = true) "
            f"UNION ALL BY NAME {pending}"
        )

    locations, status = INSTANCE_LOCATIONS.name, QUARANTINE_STATUS.name
    touched = (
        "(SELECT sop_instance_uid FROM pending_instances UNION ALL "
        f"SELECT sop_instance_uid FROM pending_{locations})"
    )
    candidates = (
        "(SELECT * EXCLUDE (instance_availability, source_file) FROM compacted_instances "
        f"WHERE sop_instance_uid IN {touched} "
        "UNION ALL BY NAME SELECT * EXCLUDE (header_json, day) FROM pending_instances)"
    )
    moved = instances_with_locations_sql(
        candidates,
        f"(SELECT * FROM compacted_{locations} WHERE sop_instance_uid IN {touched} "
        f"UNION ALL BY NAME SELECT * EXCLUDE (day) FROM pending_{locations})",
    )
    statements += [
        "CREATE VIEW instance_versions AS "
        + instances_with_locations_sql(
            f"({history('instances')})",
            f"(SELECT * FROM compacted_{locations} UNION ALL BY NAME "
            f"SELECT * EXCLUDE (day) FROM pending_{locations})",
        ),
        *(f"CREATE VIEW {c.name} AS {history(c.directory)}" for c in CHANGE_TABLES.values()),
        # The compacted rows are the latest per key: the window ranks the pending ones only.
        "CREATE VIEW delivery_status AS "
        + delivery_status_sql(
            f"compacted_{DELIVERIES.name}",
            f"(SELECT * EXCLUDE (day) FROM pending_{DELIVERIES.name})",
        ),
        "CREATE VIEW open_deliveries AS "
        + open_deliveries_sql(
            f"compacted_{DELIVERIES.name}",
            OPEN_DELIVERIES_TABLE,
            f"(SELECT * EXCLUDE (day) FROM pending_{DELIVERIES.name})",
        ),
        "CREATE VIEW instances AS SELECT * EXCLUDE (source_file) FROM compacted_instances "
        f"WHERE sop_instance_uid NOT IN {touched} "
        f"UNION ALL BY NAME ({current_select(f'({moved})')})",
        _overlaid("series", "series_instance_uid", series_select),
        _overlaid("studies", "study_instance_uid", study_select),
        "CREATE VIEW patients AS " + patient_select("studies"),
        "CREATE VIEW quarantine AS "
        + quarantine_with_status_sql(
            "(SELECT * FROM compacted_quarantine UNION ALL BY NAME "
            "SELECT * EXCLUDE (day) FROM pending_quarantine)",
            f"(SELECT * FROM compacted_{status} UNION ALL BY NAME "
            f"SELECT * EXCLUDE (day) FROM pending_{status})",
        ),
        audit_view_sql(str(base / "audit" / "*" / "*.jsonl")),
        *storage_tier_views(base),
    ]
    return statements


def storage_tier_views(base: Path) -> list[str]:
    """``storage_tiers`` (what each tier is, from ``storage_tiers.json``, read at query time)
    and ``study_tiers``: each study's tier, bytes per tier and the hours a restore of its
    cold part is expected to take (0 with nothing cold; NULL until a lifecycle run has
    recorded the settings)."""
    columns = ", ".join(f"'{k}': '{v}'" for k, v in STORAGE_TIERS_COLUMNS.items())
    facts = _quote(base / STORAGE_TIERS_FILE)
    return [
        f"CREATE VIEW storage_tiers AS SELECT * FROM read_json('{facts}', "
        f"format = 'array', columns = {{{columns}}})",
        "CREATE VIEW study_tiers AS SELECT s.study_instance_uid, s.patient_id, s.study_date, "
        "s.tier, s.hot_bytes, s.warm_bytes, s.cold_bytes, "
        "CASE WHEN s.cold_bytes = 0 THEN 0.0 ELSE c.restore_hours END "
        "AS expected_restore_hours, s.last_received_at "
        "FROM studies s LEFT JOIN (SELECT any_value(restore_hours) AS restore_hours "
        "FROM storage_tiers WHERE tier = 'cold') c ON true",
    ]


def _overlaid(view: str, key: str, select: Callable[[str, str], str]) -> str:
    """``view``: the compacted rows, except those of the studies that have pending versions
    or location changes, which are derived again from the ``instances`` view. The studies
    are found from the pending rows and the compacted instances they move, never by reading
    the ``instances`` view whole."""
    locations = INSTANCE_LOCATIONS.name
    studies = (
        "(SELECT study_instance_uid FROM pending_instances UNION ALL "
        "SELECT study_instance_uid FROM compacted_instances WHERE sop_instance_uid IN "
        f"(SELECT sop_instance_uid FROM pending_{locations}))"
    )
    return (
        f"CREATE VIEW {view} AS SELECT * FROM compacted_{view} "
        f"WHERE study_instance_uid NOT IN {studies} "
        f"UNION ALL BY NAME ({select('instances', f'WHERE study_instance_uid IN {studies}')})"
    )


def compact(
    root: Path,
    *,
    memory_limit_mb: int = 1024,
    rows_per_file: int = 1_000_000,
    row_group_rows: int = 2_000,
    grace_seconds: float = 600.0,
    now: datetime | None = None,
) -> CompactionResult:
    """Merge the batch files of every day that has some into sorted files, write a new
    serving database and publish both as the next generation (see the module doc).

    Idempotent: with no new batch file it only deletes what an earlier generation retired
    (once older than `grace_seconds`) and changes nothing else. A crash at any step leaves
    the current generation intact (new files are not listed anywhere until the manifest is
    replaced; the next run overwrites or ignores them).
    """
    with _exclusive(Path(root)):
        return _compact(
            Path(root),
            memory_limit_mb,
            rows_per_file,
            row_group_rows,
            grace_seconds,
            now or datetime.now(UTC),
        )


def _compact(
    root: Path,
    memory_limit_mb: int,
    rows_per_file: int,
    row_group_rows: int,
    grace_seconds: float,
    now: datetime,
) -> CompactionResult:
    started = time.monotonic()
    CatalogWriter(root).ensure()  # the views' globs need a file in every folder
    previous = Manifest.load(root)
    generation = previous.generation + 1
    result = CompactionResult(generation=previous.generation)
    # What the previous generation replaced can go once readers had time to leave it.
    deletable: list[str] = []
    carried_covered = {t: list(v) for t, v in previous.covered.items()}
    carried_retired = list(previous.retired)
    if previous.age_seconds(now) >= grace_seconds:
        deletable = carried_retired + [f for v in carried_covered.values() for f in v]
        carried_covered, carried_retired = {}, []

    pending = {t: pending_batch_files(root, previous, t) for t in SCHEMAS}
    days = sorted({_day_of(f) for files in pending.values() for f in files})
    if days or previous.serving is None or previous.schema < SERVING_SCHEMA:
        con = _connect(root, memory_limit_mb)
        try:
            files: dict[str, list[str]] = {t: list(previous.files.get(t, [])) for t in SCHEMAS}
            replaced: dict[str, list[str]] = {t: [] for t in SCHEMAS}
            written: dict[str, list[str]] = {t: [] for t in SCHEMAS}
            for table in SCHEMAS:
                for day in sorted({_day_of(f) for f in pending[table]}):
                    earlier = [f for f in files[table] if _day_of(f) == day]
                    batches = [f for f in pending[table] if _day_of(f) == day]
                    inputs = [root / f for f in earlier + batches]
                    out_dir = root / COMPACTED / table / f"day={day}"
                    new = _write_sorted(
                        con,
                        table,
                        inputs,
                        out_dir,
                        f"g{generation:06d}",
                        rows_per_file,
                        row_group_rows,
                    )
                    if fingerprint(con, table, inputs) != fingerprint(con, table, new):
                        for path in new:
                            path.unlink(missing_ok=True)
                        raise CompactionError(
                            f"merged {table} files of {day} do not hold the rows they replace"
                        )
                    relative = [str(p.relative_to(root)) for p in new]
                    files[table] = [f for f in files[table] if f not in earlier] + relative
                    replaced[table] += earlier + batches
                    written[table] += relative
                    result.files_before += len(inputs)
                    result.bytes_before += sum(p.stat().st_size for p in inputs)
                    result.files_after += len(new)
                    result.bytes_after += sum(p.stat().st_size for p in new)
                    row = (
                        con.execute(
                            f"SELECT count(*) FROM read_parquet({_sql_list(new)})"
                        ).fetchone()
                        if new
                        else (0,)
                    )
                    assert row is not None
                    result.rows[table] = result.rows.get(table, 0) + int(row[0])
        finally:
            con.close()
        serving = f"{SERVING}/g{generation:06d}.duckdb"
        make_dirs(root / SERVING)
        covered = {t: carried_covered.get(t, []) + pending[t] for t in SCHEMAS}
        merge = _Merge(files, written, replaced, covered)
        result.instances = _build_serving(root, root / serving, previous, merge, memory_limit_mb)
        result.serving_bytes = (root / serving).stat().st_size
        retired = carried_retired + [f for t in SCHEMAS for f in replaced[t] if f not in pending[t]]
        if previous.serving:
            retired.append(previous.serving)
        Manifest(
            generation=generation,
            serving=serving,
            files=files,
            covered=covered,
            retired=retired,
            created_at=now.isoformat(),
        ).save(root)
        result.generation = generation
        result.days = days
        result.batch_files = sum(len(v) for v in pending.values())
        result.replaced = replaced
        result.written = written
    elif deletable:
        # Nothing new: the same generation, minus what could be deleted.
        Manifest(
            generation=previous.generation,
            serving=previous.serving,
            files=previous.files,
            covered=carried_covered,
            retired=carried_retired,
            created_at=previous.created_at,
            schema=previous.schema,
        ).save(root)
    for name in deletable:
        path = root / name
        if path.exists():
            path.unlink()
            result.deleted_files += 1
    if deletable:
        _remove_empty_days(root, now)
    _remove_stale_tmp(root)
    result.seconds = time.monotonic() - started
    return result


def _remove_empty_days(root: Path, now: datetime) -> None:
    """Remove the batch tables' day folders emptied by compaction, but the last two days
    (ingest may still write there) and the schema files' day: every query's glob lists
    them, so a year of empty folders would cost each researcher's query."""
    recent = {(now - timedelta(days=d)).date().isoformat() for d in (0, 1)}
    for table in SCHEMAS:
        for folder in (root / table).glob("day=*"):
            day = folder.name.removeprefix("day=")
            if day in recent or f"{table}/{folder.name}/schema.parquet".endswith(SCHEMA_FILE):
                continue
            with contextlib.suppress(OSError):  # not empty (a late batch), or gone
                folder.rmdir()


def _remove_stale_tmp(root: Path) -> None:
    """Temp files of a compaction that crashed (only one compaction runs at a time)."""
    for folder in [root / SERVING, *(root / COMPACTED).glob("*/day=*")]:
        if folder.is_dir():
            for path in folder.glob(".tmp-*"):
                if not path.name.endswith(f".{os.getpid()}"):
                    path.unlink(missing_ok=True)


def verify(
    root: Path, result: CompactionResult
) -> dict[str, tuple[tuple[int, int], tuple[int, int]]]:
    """Per table, (rows, hash) of the files a compaction replaced and of those it wrote.

    The replaced files are still on disk until the next compaction, so this re-reads both
    sides: equal pairs mean the compacted data holds exactly the rows it replaced.
    """
    root = Path(root)
    con = duckdb.connect(":memory:")
    try:
        return {
            table: (
                fingerprint(con, table, [root / f for f in result.replaced.get(table, [])]),
                fingerprint(con, table, [root / f for f in result.written.get(table, [])]),
            )
            for table in SCHEMAS
        }
    finally:
        con.close()


_DISK_FULL = os.strerror(errno.ENOSPC)  # "No space left on device"


def publish(root: Path) -> Path:
    """Point ``catalog.duckdb`` at the current generation's serving database (a hard link,
    swapped in atomically), compacting first if no generation exists yet.

    The serving database holds the compacted tables and views that add the batch and change
    files written since, found by glob: a researcher who has it open read-only sees new
    batches on their next query, and publishing costs the same at any size.
    """
    root = Path(root)
    target = root / CATALOG_DB
    manifest = Manifest.load(root)
    if manifest.serving is None or not (root / manifest.serving).exists():
        try:
            compact(root)
        except duckdb.IOException as exc:
            if _DISK_FULL in str(exc):
                # DuckDB's own error type: say it the way the rest of the archive does.
                raise OSError(errno.ENOSPC, f"cannot publish {target}: {exc}") from exc
            raise
        manifest = Manifest.load(root)
    assert manifest.serving is not None
    source = root / manifest.serving
    if target.exists() and target.samefile(source):
        return target
    writer = CatalogWriter(root)
    writer.remove_stale_temp_files()
    tmp = root / f".{CATALOG_DB}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    os.link(source, tmp)
    tmp.replace(target)
    fsync_dir(root)
    return target


def ensure_catalog(root: Path) -> Path:
    """The schema files (:meth:`CatalogWriter.ensure`) and ``catalog.duckdb`` if missing."""
    CatalogWriter(root).ensure()
    target = Path(root) / CATALOG_DB
    return target if target.exists() else publish(root)
