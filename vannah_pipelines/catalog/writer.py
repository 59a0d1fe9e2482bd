"""Write catalog batch files (Parquet, atomic): one per ingested batch or state change."""

from __future__ import annotations

import io
import json
import os
import re
from datetime import date
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from vannah_pipelines.catalog.changes import CHANGE_TABLES, CHANGES_DIR
from vannah_pipelines.catalog.schema import TABLES
from vannah_pipelines.landing.layout import make_dirs, write_atomic

# What each storage tier is and how long a restore from it takes, as the settings of the
# last lifecycle run said (storage/tiers.py tier_facts): the catalog's restore estimate.
STORAGE_TIERS_FILE = "storage_tiers.json"
STORAGE_TIERS_COLUMNS = {
    "tier": "VARCHAR",
    "backend": "VARCHAR",
    "storage_class": "VARCHAR",
    "restore_hours": "DOUBLE",
}

CATALOG_DB = "catalog.duckdb"
# A zero-row file per table keeps globs valid on an empty catalog; its partition sorts first.
_SCHEMA_DAY = date(1970, 1, 1)
# Every folder of Parquet files: the batch tables and the state-change tables
# (``changes/<name>``, one file per append; see vannah_pipelines.catalog.changes).
SCHEMAS: dict[str, pa.Schema] = TABLES | {t.directory: t.schema for t in CHANGE_TABLES.values()}


class CatalogWriter:
    """Adds immutable Parquet files under ``<root>/<table>/day=YYYY-MM-DD/<batch_id>.parquet``.

    Each file appears by atomic rename, so readers see a batch whole or not at all, and adding
    a batch costs the same whatever the catalog's size.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def batch_path(self, table: str, day: date, batch_id: str) -> Path:
        return self.root / table / f"day={day.isoformat()}" / f"{batch_id}.parquet"

    def has_batch(self, table: str, day: date, batch_id: str) -> bool:
        return self.batch_path(table, day, batch_id).exists()

    def write_batch(self, table: str, day: date, batch_id: str, rows: pa.Table) -> Path:
        """Write `rows` (already in the table's schema) as one batch file, atomically.

        `table` is a key of :data:`SCHEMAS`: a batch table, or a state-change table's
        folder (``changes/<name>``, see :func:`vannah_pipelines.catalog.changes.append_change`).
        """
        target = self.batch_path(table, day, batch_id)
        if not target.parent.is_dir():
            make_dirs(target.parent)  # a new day folder: its entry is made durable too
        for stale in target.parent.glob(f".tmp-{target.name}.*"):
            stale.unlink(missing_ok=True)  # left by a writer killed mid-write
        buffer = io.BytesIO()
        pq.write_table(rows.cast(SCHEMAS[table]), buffer, compression="zstd")
        write_atomic(target, buffer.getbuffer())
        return target

    def ensure(self) -> None:
        """The zero-row schema file of every table (globs stay valid on an empty catalog);
        temp files of killed writers removed. (``catalog.duckdb``: compaction.publish.)"""
        make_dirs(self.root)
        self.remove_stale_temp_files()
        self._remove_stale_change_temps()
        for table, schema in SCHEMAS.items():
            path = self.batch_path(table, _SCHEMA_DAY, "schema")
            if not path.exists():
                self.write_batch(table, _SCHEMA_DAY, "schema", schema.empty_table())
        if not (self.root / STORAGE_TIERS_FILE).exists():
            self.write_storage_tiers([])  # no restore estimate until a lifecycle run says
        schema_audit = self.root / "audit" / f"day={_SCHEMA_DAY.isoformat()}" / "schema.jsonl"
        if not schema_audit.exists():
            make_dirs(schema_audit.parent)
            write_atomic(schema_audit, b"")  # so the audit_events view always has a file

    def write_storage_tiers(self, rows: list[dict[str, object]]) -> None:
        """Replace ``storage_tiers.json``: one row per tier (``tier``, ``backend``,
        ``storage_class``, ``restore_hours``), what the ``storage_tiers`` and ``study_tiers``
        views of ``catalog.duckdb`` read (the settings are not in the catalog otherwise)."""
        unknown = {k for row in rows for k in row} - set(STORAGE_TIERS_COLUMNS)
        if unknown:
            raise ValueError(f"storage_tiers: unknown column(s) {sorted(unknown)}")
        write_atomic(self.root / STORAGE_TIERS_FILE, json.dumps(rows, indent=1).encode())

    def glob(self, table: str) -> str:
        return str(self.root.resolve() / table / "*" / "*.parquet").replace("'", "''")

    def source_sql(self, table: str) -> str:
        """``read_parquet(...)`` of every file of `table` (a key of :data:`SCHEMAS`), as the
        views of ``catalog.duckdb`` read them (hive ``day`` column, columns by name)."""
        return f"read_parquet('{self.glob(table)}', hive_partitioning = true, union_by_name = true)"

    def remove_stale_temp_files(self) -> list[Path]:
        """Remove ``.catalog.duckdb.<pid>.tmp`` files (and their WAL) left by writers that
        died; a live writer's file is left alone. Returns what was removed."""
        removed = []
        for path in self.root.glob(f".{CATALOG_DB}.*.tmp*"):
            match = _TMP_DB.fullmatch(path.name)
            if match is None or _pid_alive(int(match.group(1))):
                continue
            path.unlink(missing_ok=True)
            removed.append(path)
        return removed

    def _remove_stale_change_temps(self) -> None:
        """Remove the temp files of appends whose process died (each append has a file
        name of its own, so :meth:`write_batch` never meets them again)."""
        for path in self.root.glob(f"{CHANGES_DIR}/*/day=*/.tmp-*"):
            match = _TMP_APPEND.fullmatch(path.name)
            if match is not None and not _pid_alive(int(match.group(1))):
                path.unlink(missing_ok=True)


_TMP_APPEND = re.compile(r"\.tmp-.+\.parquet\.([0-9]+)\.[0-9]+")
_TMP_DB = re.compile(re.escape(f".{CATALOG_DB}.") + r"([0-9]+)\.tmp(\.wal)?")


def _pid_alive(pid: int) -> bool:
    """Whether a process `pid` exists on this host (our own pid counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True
