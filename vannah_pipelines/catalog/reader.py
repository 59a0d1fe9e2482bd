"""Read the catalog: an in-memory DuckDB copy that loads at start and tails new batch files.

Each reading service (DICOMweb, the receiver's Q/R, tests) keeps its own copy, so readers
never hold a lock on anything a writer touches and queries run from memory.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from vannah_pipelines.catalog.schema import TABLES, view_sql


class CatalogReader:
    """A consistent, refreshable in-memory view of the catalog under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._con = duckdb.connect(":memory:")
        self._lock = threading.Lock()
        self._loaded: dict[str, set[str]] = {t: set() for t in TABLES}
        for table, schema in TABLES.items():
            self._con.register(f"_{table}_empty", schema.empty_table())
            self._con.execute(f"CREATE TABLE {table}_rows AS SELECT * FROM _{table}_empty")
            self._con.unregister(f"_{table}_empty")
        for statement in view_sql("instances_rows", "quarantine_rows"):
            self._con.execute(statement)
        self.refresh()

    def _new_files(self, table: str) -> list[str]:
        base = self.root / table
        if not base.exists():
            return []
        found = sorted(str(p) for p in base.glob("day=*/*.parquet"))
        return [f for f in found if f not in self._loaded[table]]

    def refresh(self) -> int:
        """Load batch files added since the last refresh; returns how many."""
        added = 0
        with self._lock:
            for table in TABLES:
                files = self._new_files(table)
                if not files:
                    continue
                columns = ", ".join(TABLES[table].names)
                self._con.execute(
                    f"INSERT INTO {table}_rows SELECT {columns} FROM read_parquet(?)", [files]
                )
                self._loaded[table].update(files)
                added += len(files)
        return added

    def query(self, sql: str, params: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
        """Run `sql` with bound `params` on a cursor of its own (thread-safe)."""
        cursor = self._con.cursor()
        try:
            return cursor.execute(sql, list(params or [])).fetchall()
        finally:
            cursor.close()

    def arrow(self, sql: str, params: Sequence[Any] | None = None) -> pa.Table:
        """Like :meth:`query`, as an Arrow table."""
        cursor = self._con.cursor()
        try:
            return cursor.execute(sql, list(params or [])).fetch_arrow_table()
        finally:
            cursor.close()

    def close(self) -> None:
        self._con.close()
