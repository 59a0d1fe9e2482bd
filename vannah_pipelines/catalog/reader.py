"""Read the catalog: an in-memory DuckDB copy that loads at start and tails new batch files.

Each reading service (DICOMweb, the receiver's Q/R, tests) keeps its own copy, so readers
never hold a lock on anything a writer touches and queries run from memory. ``instances``,
``series`` and ``studies`` are tables here (views in the researchers' ``catalog.duckdb``),
maintained incrementally: a refresh costs what the new batch files touch, not the archive.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from vannah_pipelines.catalog.schema import (
    TABLES,
    current_select,
    patient_select,
    series_select,
    study_select,
)

_NEW = "_new_rows"
# Columns held in memory: everything but the header JSON (read from the Parquet file on
# demand, see headers()), plus the file each row came from.
_LOADED = ", ".join(
    [n for n in TABLES["instances"].names if n != "header_json"] + ["'' AS source_file"]
)


class CatalogReader:
    """A consistent, refreshable in-memory view of the catalog under `root`.

    Tables: ``instances`` (current version of each SOP Instance UID, without the header
    JSON: see :meth:`headers`), ``series``, ``studies``, ``patients``, ``quarantine``; and
    ``instance_versions`` (every ingested file), a view over the Parquet files. The same
    names and columns as the views documented in docs/catalog.md.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._con = duckdb.connect(":memory:")
        self._lock = threading.Lock()
        self._loaded: dict[str, set[str]] = {t: set() for t in TABLES}
        con = self._con
        con.register("_empty_q", TABLES["quarantine"].empty_table())
        con.execute("CREATE TABLE quarantine AS SELECT * FROM _empty_q")
        con.unregister("_empty_q")
        con.register("_empty_i", TABLES["instances"].empty_table())
        con.execute(f"CREATE TEMP VIEW _empty_rows AS SELECT {_LOADED} FROM _empty_i")
        con.execute(f"CREATE TABLE instances AS {current_select('_empty_rows')} LIMIT 0")
        con.execute("DROP VIEW _empty_rows")
        con.unregister("_empty_i")
        con.execute(f"CREATE TABLE series AS {series_select('instances')} LIMIT 0")
        con.execute(f"CREATE TABLE studies AS {study_select('instances')} LIMIT 0")
        con.execute(f"CREATE TABLE patients AS {patient_select('studies')} LIMIT 0")
        # Every version of every instance, with its header: read from the Parquet files
        # when asked (rarely), never held in memory.
        self._versions_view = False
        con.register("_empty_v", TABLES["instances"].empty_table())
        con.execute("CREATE TABLE instance_versions AS SELECT * FROM _empty_v")
        con.unregister("_empty_v")
        # Refreshes add rows, never columns: the types are known from here on.
        self._types: dict[str, dict[str, str]] = {}
        for table, column, type_ in con.execute(
            "SELECT table_name, column_name, data_type FROM duckdb_columns()"
        ).fetchall():
            self._types.setdefault(table, {})[column] = type_
        self.refresh()

    def _new_files(self, table: str) -> list[str]:
        base = self.root / table
        if not base.exists():
            return []
        found = sorted(str(p) for p in base.glob("day=*/*.parquet"))
        return [f for f in found if f not in self._loaded[table]]

    def refresh(self) -> int:
        """Load batch files added since the last refresh; returns how many.

        All changes of one refresh commit together, so a query sees a batch whole or not
        at all.
        """
        with self._lock:
            quarantine = self._new_files("quarantine")
            instances = self._new_files("instances")
            if not quarantine and not instances:
                return 0
            cur = self._con.cursor()
            try:
                cur.execute("BEGIN TRANSACTION")
                if quarantine:
                    cols = ", ".join(TABLES["quarantine"].names)
                    cur.execute(
                        f"INSERT INTO quarantine SELECT {cols} FROM read_parquet(?)", [quarantine]
                    )
                if instances and not self._loaded["instances"]:
                    self._load_all(cur, instances)
                elif instances:
                    self._add_instances(cur, instances)
                if instances and not self._versions_view:
                    glob = str(self.root.resolve() / "instances" / "*" / "*.parquet")
                    cur.execute("DROP TABLE instance_versions")
                    cur.execute(
                        "CREATE VIEW instance_versions AS SELECT * FROM "
                        f"read_parquet('{glob.replace(chr(39), chr(39) * 2)}')"
                    )
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            finally:
                cur.close()
            self._loaded["quarantine"].update(quarantine)
            self._loaded["instances"].update(instances)
            self._versions_view = self._versions_view or bool(instances)
            return len(quarantine) + len(instances)

    @staticmethod
    def _load_all(cur: duckdb.DuckDBPyConnection, files: list[str]) -> None:
        """First load: derive every table straight from the files (no per-batch bookkeeping)."""
        loaded = _LOADED.replace("'' AS source_file", "filename AS source_file")
        source = f"(SELECT {loaded} FROM read_parquet(?, filename = true))"
        cur.execute(f"INSERT INTO instances {current_select(source)}", [files])
        cur.execute(f"INSERT INTO series {series_select('instances')}")
        cur.execute(f"INSERT INTO studies {study_select('instances')}")
        cur.execute(f"INSERT INTO patients {patient_select('studies')}")

    @staticmethod
    def _add_instances(cur: duckdb.DuckDBPyConnection, files: list[str]) -> None:
        loaded = _LOADED.replace("'' AS source_file", "filename AS source_file")
        cur.execute(
            f"CREATE TEMP TABLE {_NEW} AS SELECT {loaded} FROM read_parquet(?, filename = true)",
            [files],
        )
        # The current row of a touched SOP UID is the latest of its current row and the
        # new versions; every series, study and patient either belongs to is re-derived.
        touched = f"sop_instance_uid IN (SELECT sop_instance_uid FROM {_NEW})"
        cur.execute(f"""CREATE TEMP TABLE _cand AS
                        SELECT * EXCLUDE (instance_availability) FROM instances WHERE {touched}
                        UNION ALL BY NAME SELECT * FROM {_NEW}""")
        cur.execute("""CREATE TEMP TABLE _touched AS SELECT DISTINCT sop_instance_uid,
                       series_instance_uid, study_instance_uid, patient_id FROM _cand""")
        cur.execute(f"DELETE FROM instances WHERE {touched}")
        cur.execute(f"INSERT INTO instances {current_select('_cand')}")
        in_series = "series_instance_uid IN (SELECT series_instance_uid FROM _touched)"
        in_studies = "study_instance_uid IN (SELECT study_instance_uid FROM _touched)"
        cur.execute(f"DELETE FROM series WHERE {in_series}")
        cur.execute(f"INSERT INTO series {series_select('instances', 'WHERE ' + in_series)}")
        cur.execute(f"DELETE FROM studies WHERE {in_studies}")
        cur.execute(f"INSERT INTO studies {study_select('instances', 'WHERE ' + in_studies)}")
        in_patients = "WHERE patient_id IN (SELECT patient_id FROM _touched) OR patient_id IS NULL"
        cur.execute(f"DELETE FROM patients {in_patients}")
        cur.execute(f"INSERT INTO patients {patient_select('studies', in_patients)}")
        for table in (_NEW, "_cand", "_touched"):
            cur.execute(f"DROP TABLE {table}")

    def headers(self, rows: Sequence[tuple[str, str, str]]) -> dict[tuple[str, str], str]:
        """Header JSON of instances given as (source_file, sop_instance_uid, checksum).

        Read from their Parquet batch files (only the files named), so the in-memory copy
        never holds the headers; keyed by (sop_instance_uid, checksum).
        """
        if not rows:
            return {}
        files = sorted({r[0] for r in rows})
        wanted = {(r[1], r[2]) for r in rows}
        cursor = self._con.cursor()
        try:
            found = cursor.execute(
                "SELECT sop_instance_uid, checksum, header_json FROM read_parquet(?) "
                "WHERE sop_instance_uid IN (SELECT unnest(?))",
                [files, sorted({w[0] for w in wanted})],
            ).fetchall()
        finally:
            cursor.close()
        return {(sop, sha): header for sop, sha, header in found if (sop, sha) in wanted}

    def column_types(self, table: str) -> dict[str, str]:
        """DuckDB type of each column of `table` (``{"series_number": "INTEGER", ...}``)."""
        return self._types[table]

    def query(self, sql: str, params: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
        """Run `sql` with bound `params` on a cursor of its own (thread-safe)."""
        cursor = self._con.cursor()
        try:
            return cursor.execute(sql, list(params or [])).fetchall()
        finally:
            cursor.close()

    def query_dicts(self, sql: str, params: Sequence[Any] | None = None) -> list[dict[str, Any]]:
        """Like :meth:`query`, each row as a dict keyed by column name."""
        cursor = self._con.cursor()
        try:
            result = cursor.execute(sql, list(params or []))
            names = [d[0] for d in result.description or []]
            return [dict(zip(names, row, strict=True)) for row in result.fetchall()]
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
