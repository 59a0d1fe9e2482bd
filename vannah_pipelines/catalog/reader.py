"""Read the catalog: the serving database on disk, plus a small in-memory overlay.

Each reading service (DICOMweb, the receiver's Q/R, the CLI) opens the current generation's
serving database (vannah_pipelines/catalog/compaction.py) read-only, with DuckDB's buffer
pool held to `memory_limit_mb`: memory is bounded by that setting, not by the archive. What
compaction has not merged yet, the batch files written since and (optionally) the instances
landed but not indexed yet, is held in memory as an *overlay*: the versions themselves and
the current rows, series, studies and patients they change. ``instances``, ``series``,
``studies``, ``patients`` and ``quarantine`` are views that take a key's overlay row where it
has one and the serving database's otherwise; a refresh costs what the new files touch.

When compaction publishes a new generation, the next refresh builds a fresh state on it and
swaps it in whole; the previous one is closed once queries that began on it had time to end.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import pyarrow as pa

from vannah_pipelines.catalog.changes import (
    CHANGE_TABLES,
    DELIVERIES,
    INSTANCE_LOCATIONS,
    OPEN_DELIVERIES_TABLE,
    OPEN_DELIVERY_STATES,
    QUARANTINE_STATUS,
    delivery_status_sql,
    instances_with_locations_sql,
    open_deliveries_sql,
    quarantine_with_status_sql,
)
from vannah_pipelines.catalog.compaction import (
    SERVING_INSTANCE_COLUMNS,
    Manifest,
    batch_files,
    create_empty_serving_tables,
    pending_batch_files,
)
from vannah_pipelines.catalog.lake import LAKE_SOURCE
from vannah_pipelines.catalog.schema import (
    TABLES,
    current_select,
    patient_select,
    series_select,
    study_select,
)
from vannah_pipelines.catalog.writer import SCHEMAS

if TYPE_CHECKING:
    from vannah_pipelines.catalog.lake import LakeConfig
    from vannah_pipelines.catalog.landed import LandedIndex

log = logging.getLogger(__name__)

_COLS = ", ".join(SERVING_INSTANCE_COLUMNS)
# Landed-but-not-indexed rows have no batch file; their headers are held by the overlay.
LANDED = "landed:"
# The attached lake's name: its served tables are the base the overlay views read.
_LAKE_ALIAS = "base"
# A replaced state is closed this long after the swap (queries begun on it end first).
_RETIRE_SECONDS = 60.0
_VIEWS = (
    "instances",
    "series",
    "studies",
    "patients",
    "quarantine",
    "instance_versions",
    *CHANGE_TABLES,
    "delivery_status",
    "open_deliveries",
)
# Routing's views of the delivery log: not in a reader opened with deliveries=False.
_DELIVERY_VIEWS = ("delivery_status", "open_deliveries")
_LOCATIONS = INSTANCE_LOCATIONS.name
# The views of every row ever written (read from the files when asked, never held).
_HISTORY = {"instances": "instance_versions"} | {
    t.directory: t.name for t in CHANGE_TABLES.values()
}


def _quote(value: str) -> str:
    return value.replace("'", "''")


class _State:
    """One generation's connection: the serving database attached as ``base`` (or empty
    tables when nothing was compacted yet) and the overlay tables and views."""

    def __init__(
        self,
        root: Path,
        manifest: Manifest,
        memory_limit_mb: int,
        lake: LakeConfig | None = None,
        deliveries: bool = True,
    ) -> None:
        self.root = root
        self.manifest = manifest
        self.lake = lake
        self.deliveries = deliveries
        self.loaded: dict[str, set[str]] = {t: set() for t in SCHEMAS}
        self.landed_version: int | None = None
        self.landed_headers: dict[tuple[str, str], str] = {}
        # (sop, checksum) -> (storage_key, batch_id) of each landed version held.
        self.landed_rows: dict[tuple[str, str], tuple[str, str]] = {}
        if lake is not None:
            from vannah_pipelines.catalog.lake import attach_lake, connect

            self.con = connect()
        else:
            self.con = duckdb.connect(":memory:")
        con = self.con
        con.execute(f"SET memory_limit = '{int(memory_limit_mb)}MB'")
        con.execute("SET parquet_metadata_cache = true")
        if lake is not None:
            # The DuckLake's served tables, maintained by every append, are the base; each
            # query reads the newest snapshot committed when it starts.
            attach_lake(dataclasses.replace(lake, alias=_LAKE_ALIAS), con, read_only=True)
        elif manifest.serving is not None:
            con.execute(f"ATTACH '{_quote(str(root / manifest.serving))}' AS base (READ_ONLY)")
        else:
            self._empty_base()
        # The compacted state-change tables, as b_<name>: a serving database (or lake) made
        # before a table was declared has none, which reads as no change yet.
        for change in CHANGE_TABLES.values():
            try:
                con.execute(
                    f"CREATE VIEW b_{change.name} AS SELECT * FROM base.compacted_{change.name}"
                )
            except duckdb.CatalogException:
                con.register("_empty_c", change.schema.empty_table())
                con.execute(f"CREATE TABLE b_{change.name} AS SELECT * FROM _empty_c")
                con.unregister("_empty_c")
        # Its open deliveries: a table of their own since compaction writes one, else
        # filtered out of all of them.
        try:
            con.execute(
                f"CREATE VIEW b_open_deliveries AS SELECT * FROM base.{OPEN_DELIVERIES_TABLE}"
            )
        except duckdb.CatalogException:
            con.execute(
                f"CREATE VIEW b_open_deliveries AS SELECT * FROM b_{DELIVERIES.name} "
                f"WHERE status IN ({', '.join(repr(s) for s in OPEN_DELIVERY_STATES)})"
            )
        # Overlay: versions not compacted yet (without headers), and the rows they change.
        con.execute(
            "CREATE TABLE o_versions AS SELECT * EXCLUDE (instance_availability) "
            "FROM base.compacted_instances LIMIT 0"
        )
        con.execute("CREATE TABLE o_instances AS SELECT * FROM base.compacted_instances LIMIT 0")
        con.execute("CREATE TABLE o_sops (sop_instance_uid VARCHAR)")
        # The overlay's series and studies have this code's columns, whatever the serving
        # database was built by (a column a newer version adds reads NULL for its rows until
        # the next compaction rebuilds it: SERVING_SCHEMA).
        empty = "(SELECT * FROM base.compacted_instances LIMIT 0)"
        con.execute(f"CREATE TABLE o_series AS {series_select(empty)}")
        con.execute(f"CREATE TABLE o_studies AS {study_select(empty)}")
        con.execute("CREATE TABLE o_patients AS SELECT * FROM base.compacted_patients LIMIT 0")
        for level, key in (
            ("series", "series_instance_uid"),
            ("studies", "study_instance_uid"),
            ("patients", "patient_id"),
        ):
            con.execute(f"CREATE TABLE o_{level}_keys ({key} VARCHAR)")
        con.execute("CREATE TABLE o_quarantine AS SELECT * FROM base.compacted_quarantine LIMIT 0")
        for change in CHANGE_TABLES.values():
            con.execute(f"CREATE TABLE o_{change.name} AS SELECT * FROM b_{change.name} LIMIT 0")
        con.execute(
            "CREATE VIEW instances AS SELECT * FROM base.compacted_instances b "
            "ANTI JOIN o_sops USING (sop_instance_uid) UNION ALL BY NAME SELECT * FROM o_instances"
        )
        con.execute(
            "CREATE VIEW series AS SELECT * FROM base.compacted_series "
            "ANTI JOIN o_series_keys USING (series_instance_uid) "
            "UNION ALL BY NAME SELECT * FROM o_series"
        )
        con.execute(
            "CREATE VIEW studies AS SELECT * FROM base.compacted_studies "
            "ANTI JOIN o_studies_keys USING (study_instance_uid) "
            "UNION ALL BY NAME SELECT * FROM o_studies"
        )
        con.execute(
            "CREATE VIEW patients AS SELECT * FROM base.compacted_patients b WHERE NOT EXISTS "
            "(SELECT 1 FROM o_patients_keys k "
            "WHERE k.patient_id IS NOT DISTINCT FROM b.patient_id) "
            "UNION ALL BY NAME SELECT * FROM o_patients"
        )
        status = QUARANTINE_STATUS.name
        con.execute(
            "CREATE VIEW quarantine AS "
            + quarantine_with_status_sql(
                "(SELECT * FROM base.compacted_quarantine UNION ALL BY NAME "
                "SELECT * FROM o_quarantine)",
                f"(SELECT * FROM b_{status} UNION ALL BY NAME SELECT * FROM o_{status})",
            )
        )
        if deliveries:
            self._delivery_views()
        for table in _HISTORY:
            self._history_view(table)
        self.types: dict[str, dict[str, str]] = {
            view: {r[0]: r[1] for r in con.execute(f"DESCRIBE {view}").fetchall()}
            for view in _VIEWS
            if deliveries or view not in _DELIVERY_VIEWS
        }

    def _delivery_views(self) -> None:
        con = self.con
        deliveries = DELIVERIES.name
        # b_deliveries holds the latest row per key: the window ranks the overlay's only.
        # The compacted rows of the overlay's deliveries, looked up once as they are loaded
        # (add_files): finding them scans every compacted delivery's SOP Instance UID.
        con.execute(f"CREATE TABLE o_{deliveries}_base AS SELECT * FROM b_{deliveries} LIMIT 0")
        status_sql = delivery_status_sql(
            f"b_{deliveries}", f"o_{deliveries}", f"o_{deliveries}_base"
        )
        con.execute(f"CREATE VIEW delivery_status AS {status_sql}")
        open_sql = open_deliveries_sql(
            f"b_{deliveries}", "b_open_deliveries", f"o_{deliveries}", f"o_{deliveries}_base"
        )
        con.execute(f"CREATE VIEW open_deliveries AS {open_sql}")

    def _empty_base(self) -> None:
        """Nothing compacted yet: an empty ``base`` with the serving database's tables."""
        self.con.execute("ATTACH ':memory:' AS base")
        create_empty_serving_tables(self.con, "base")

    def _no_history(self, table: str) -> None:
        view = _HISTORY[table]
        self.con.register("_empty_h", SCHEMAS[table].empty_table())
        self.con.execute(
            f"CREATE OR REPLACE TABLE _no_{view} AS SELECT *, NULL::DATE AS day FROM _empty_h"
        )
        self.con.unregister("_empty_h")
        self.con.execute(f"CREATE OR REPLACE VIEW {view} AS SELECT * FROM _no_{view}")

    def _history_view(self, table: str) -> None:
        """``instance_versions`` (every version with its header) or a change table's whole
        history: the compacted files and the overlay's batch files, read when asked."""
        view = _HISTORY[table]
        if self.lake is not None:
            # Every version and change is in the lake (another host has no files).
            rows = f"SELECT * FROM {_LAKE_ALIAS}.{view}"
            if table == "instances":
                rows = instances_with_locations_sql(
                    f"({rows})",
                    f"(SELECT * FROM b_{_LOCATIONS} UNION ALL BY NAME "
                    f"SELECT * FROM o_{_LOCATIONS})",
                )
            try:
                self.con.execute(f"CREATE OR REPLACE VIEW {view} AS {rows}")
            except duckdb.CatalogException:  # a lake no writer has given this table yet
                self._no_history(table)
            return
        compacted = [str(self.root / f) for f in self.manifest.files.get(table, [])]
        batches = sorted(str(self.root / f) for f in self.loaded[table])
        if not compacted and not batches:
            self._no_history(table)
            return
        # Compaction writes every file of a table with one schema: no union_by_name, which
        # would read every file's footer when the view is made (+430 MiB at 10M, measured).
        # The batch files written since (few) may predate a column added later.
        parts = []
        if compacted:
            listed = ", ".join(f"'{_quote(f)}'" for f in compacted)
            parts.append(f"SELECT * FROM read_parquet([{listed}], hive_partitioning = true)")
        if batches:
            listed = ", ".join(f"'{_quote(f)}'" for f in batches)
            parts.append(
                f"SELECT * FROM read_parquet([{listed}], hive_partitioning = true, "
                "union_by_name = true)"
            )
        rows = " UNION ALL BY NAME ".join(parts)
        if table == "instances":  # each version where it lives now
            rows = instances_with_locations_sql(
                f"({rows})",
                f"(SELECT * FROM b_{_LOCATIONS} UNION ALL BY NAME SELECT * FROM o_{_LOCATIONS})",
            )
        self.con.execute(f"CREATE OR REPLACE VIEW {view} AS {rows}")

    # ------------------------------------------------------------------ overlay upkeep

    def add_files(self, new: dict[str, list[str]]) -> None:
        """Add batch and change files (relative paths, per table) to the overlay, in one
        transaction."""
        quarantine, instances = new.get("quarantine", []), new.get("instances", [])
        cur = self.con.cursor()
        try:
            cur.execute("BEGIN TRANSACTION")
            cur.execute(
                "CREATE TEMP TABLE _t (sop_instance_uid VARCHAR, study_instance_uid VARCHAR)"
            )
            if quarantine:
                cols = ", ".join(TABLES["quarantine"].names)
                cur.execute(
                    f"INSERT INTO o_quarantine SELECT {cols} FROM read_parquet(?, "
                    "hive_partitioning = false)",
                    [[str(self.root / f) for f in quarantine]],
                )
            for change in CHANGE_TABLES.values():
                files = new.get(change.directory, [])
                if not files:
                    continue
                cols = ", ".join(change.schema.names)
                cur.execute(
                    f"CREATE TEMP TABLE _c AS SELECT {cols} FROM read_parquet(?, "
                    "hive_partitioning = false)",
                    [[str(self.root / f) for f in files]],
                )
                if change is DELIVERIES:
                    # Their compacted rows, for the keys the overlay had none of yet.
                    cur.execute(
                        f"INSERT INTO o_{change.name}_base BY NAME SELECT * FROM "
                        f"b_{change.name} WHERE sop_instance_uid IN (SELECT sop_instance_uid "
                        f"FROM _c) AND sop_instance_uid NOT IN (SELECT sop_instance_uid "
                        f"FROM o_{change.name})"
                    )
                cur.execute(f"INSERT INTO o_{change.name} SELECT * FROM _c")
                if change is INSTANCE_LOCATIONS:
                    # Where those versions are: the overlay's or the serving database's.
                    cur.execute(
                        "INSERT INTO _t SELECT DISTINCT sop_instance_uid, study_instance_uid "
                        "FROM (SELECT sop_instance_uid, study_instance_uid FROM o_versions "
                        "UNION ALL SELECT sop_instance_uid, study_instance_uid "
                        "FROM base.compacted_instances) WHERE sop_instance_uid IN "
                        "(SELECT sop_instance_uid FROM _c)"
                    )
                cur.execute("DROP TABLE _c")
            if instances:
                cur.execute(
                    f"CREATE TEMP TABLE _new AS SELECT {_COLS}, filename AS source_file "
                    "FROM read_parquet(?, filename = true, hive_partitioning = false)",
                    [[str(self.root / f) for f in instances]],
                )
                # An indexed version replaces the landed row of the same bytes.
                cur.execute(
                    f"DELETE FROM o_versions v WHERE starts_with(v.source_file, '{LANDED}') AND "
                    "EXISTS (SELECT 1 FROM _new n WHERE n.sop_instance_uid = v.sop_instance_uid "
                    "AND n.checksum = v.checksum)"
                )
                cur.execute("INSERT INTO o_versions SELECT * FROM _new")
                cur.execute(
                    "INSERT INTO _t SELECT DISTINCT sop_instance_uid, study_instance_uid FROM _new"
                )
                cur.execute("DROP TABLE _new")
            self._recompute(cur)
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        finally:
            cur.close()
        for table, files in new.items():
            self.loaded[table].update(files)
            if files and table in _HISTORY:
                self._history_view(table)

    def set_landed(self, version: int, rows: pa.Table) -> bool:
        """Bring the overlay's landed rows to `rows` (the landed index's snapshot), touching
        only what changed: new versions are added and derived, versions that left the
        landing zone removed (their catalog rows are loaded first, see
        :meth:`CatalogReader.refresh_landed`), and a version that merely moved (its batch
        was sealed) gets its new place without deriving anything. Returns whether versions
        left, i.e. whether the caller should look for new catalog files first."""
        sops = rows.column("sop_instance_uid").to_pylist()
        sums = rows.column("checksum").to_pylist()
        keys = rows.column("storage_key").to_pylist()
        batches = rows.column("batch_id").to_pylist()
        now = {(s, c): (k, b) for s, c, k, b in zip(sops, sums, keys, batches, strict=True)}
        before = self.landed_rows
        added = [i for i, key in enumerate(zip(sops, sums, strict=True)) if key not in before]
        removed = [key for key in before if key not in now]
        moved = [
            (key, place) for key, place in now.items() if key in before and before[key] != place
        ]
        if added or removed or moved:
            cur = self.con.cursor()
            try:
                cur.execute("BEGIN TRANSACTION")
                cur.execute(
                    "CREATE TEMP TABLE _t (sop_instance_uid VARCHAR, study_instance_uid VARCHAR)"
                )
                if removed:
                    cur.execute(
                        "CREATE TEMP TABLE _gone (sop_instance_uid VARCHAR, checksum VARCHAR)"
                    )
                    cur.executemany("INSERT INTO _gone VALUES (?, ?)", [list(k) for k in removed])
                    cur.execute(
                        "INSERT INTO _t SELECT DISTINCT sop_instance_uid, study_instance_uid "
                        f"FROM o_versions v WHERE starts_with(source_file, '{LANDED}') AND EXISTS "
                        "(SELECT 1 FROM _gone g WHERE g.sop_instance_uid = v.sop_instance_uid "
                        "AND g.checksum = v.checksum)"
                    )
                    cur.execute(
                        f"DELETE FROM o_versions v WHERE starts_with(source_file, '{LANDED}') AND "
                        "EXISTS (SELECT 1 FROM _gone g WHERE g.sop_instance_uid = "
                        "v.sop_instance_uid AND g.checksum = v.checksum)"
                    )
                    cur.execute("DROP TABLE _gone")
                for (sop, checksum), (key, batch) in moved:
                    for table in ("o_versions", "o_instances"):
                        cur.execute(
                            f"UPDATE {table} SET storage_key = ?, batch_id = ?, source_file = ? "
                            "WHERE sop_instance_uid = ? AND checksum = ? AND "
                            f"starts_with(source_file, '{LANDED}')",
                            [key, batch, LANDED + batch, sop, checksum],
                        )
                if added:
                    cur.register("_landed", rows.take(added))
                    # Versions already indexed (here or in the serving database) are not
                    # repeated.
                    cur.execute(
                        f"CREATE TEMP TABLE _new AS SELECT {_COLS}, '{LANDED}' || batch_id "
                        "AS source_file FROM _landed l WHERE NOT EXISTS (SELECT 1 FROM "
                        "o_versions v WHERE v.sop_instance_uid = l.sop_instance_uid AND "
                        "v.checksum = l.checksum) AND NOT EXISTS (SELECT 1 FROM "
                        "base.compacted_instances b WHERE b.study_instance_uid = "
                        "l.study_instance_uid AND b.sop_instance_uid = l.sop_instance_uid "
                        "AND b.checksum = l.checksum)"
                    )
                    cur.unregister("_landed")
                    cur.execute("INSERT INTO o_versions SELECT * FROM _new")
                    cur.execute(
                        "INSERT INTO _t SELECT DISTINCT sop_instance_uid, study_instance_uid "
                        "FROM _new"
                    )
                    cur.execute("DROP TABLE _new")
                if added or removed:
                    self._recompute(cur)
                else:
                    cur.execute("DROP TABLE _t")
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            finally:
                cur.close()
        texts = rows.column("header_json").to_pylist()
        self.landed_headers = {(s, c): h for s, c, h in zip(sops, sums, texts, strict=True) if h}
        self.landed_rows = now
        self.landed_version = version
        return bool(removed)

    def _recompute(self, cur: duckdb.DuckDBPyConnection) -> None:
        """Derive again the current rows of the SOP UIDs in ``_t`` (sop, study) and every
        series, study and patient they belong to (before and after); drops ``_t``."""
        touched = "sop_instance_uid IN (SELECT sop_instance_uid FROM _t)"
        cur.execute(f"""CREATE TEMP TABLE _k AS
            SELECT series_instance_uid, study_instance_uid, patient_id FROM o_instances
            WHERE {touched}""")
        cur.execute(f"DELETE FROM o_instances WHERE {touched}")
        cur.execute(f"DELETE FROM o_sops WHERE {touched}")
        cur.execute(
            f"INSERT INTO o_sops SELECT DISTINCT sop_instance_uid FROM o_versions WHERE {touched}"
        )
        in_studies = "study_instance_uid IN (SELECT study_instance_uid FROM _t)"
        candidates = (
            "(SELECT * EXCLUDE (instance_availability) FROM base.compacted_instances "
            f"WHERE {in_studies} AND {touched} "
            f"UNION ALL BY NAME SELECT * FROM o_versions WHERE {touched})"
        )
        located = instances_with_locations_sql(
            candidates,
            f"(SELECT * FROM b_{_LOCATIONS} WHERE {touched} "
            f"UNION ALL BY NAME SELECT * FROM o_{_LOCATIONS} WHERE {touched})",
        )
        # A version moved by a location change is in the overlay even if it was not re-sent.
        cur.execute(
            f"INSERT INTO o_sops SELECT DISTINCT sop_instance_uid FROM o_{_LOCATIONS} "
            f"WHERE {touched} AND sop_instance_uid NOT IN "
            "(SELECT sop_instance_uid FROM o_sops)"
        )
        cur.execute(
            f"INSERT INTO o_instances SELECT * FROM ({current_select(f'({located})')}) c "
            "WHERE sop_instance_uid IN (SELECT sop_instance_uid FROM o_sops)"
        )
        cur.execute(f"""INSERT INTO _k
            SELECT series_instance_uid, study_instance_uid, patient_id FROM o_instances
            WHERE {touched}
            UNION ALL SELECT series_instance_uid, study_instance_uid, patient_id
            FROM base.compacted_instances WHERE {in_studies} AND {touched}""")
        k_studies = "study_instance_uid IN (SELECT study_instance_uid FROM _k)"
        for level, key, select in (
            ("series", "series_instance_uid", series_select),
            ("studies", "study_instance_uid", study_select),
        ):
            in_keys = f"{key} IN (SELECT {key} FROM _k)"
            cur.execute(
                f"INSERT INTO o_{level}_keys SELECT DISTINCT {key} FROM _k "
                f"WHERE {key} NOT IN (SELECT {key} FROM o_{level}_keys)"
            )
            cur.execute(f"DELETE FROM o_{level} WHERE {in_keys}")
            cur.execute(
                f"INSERT INTO o_{level} {select('instances', f'WHERE {k_studies} AND {in_keys}')}"
            )
        patient = (
            "EXISTS (SELECT 1 FROM _k WHERE _k.patient_id IS NOT DISTINCT FROM {t}.patient_id)"
        )
        cur.execute(
            "INSERT INTO o_patients_keys SELECT DISTINCT patient_id FROM _k k WHERE "
            "NOT EXISTS (SELECT 1 FROM o_patients_keys p WHERE p.patient_id IS NOT "
            "DISTINCT FROM k.patient_id)"
        )
        cur.execute(f"DELETE FROM o_patients WHERE {patient.format(t='o_patients')}")
        cur.execute(
            "INSERT INTO o_patients "
            + patient_select("studies s", "WHERE " + patient.format(t="s"))
        )
        cur.execute("DROP TABLE _k")
        cur.execute("DROP TABLE _t")

    def close(self) -> None:
        self.con.close()


class CatalogReader:
    """A consistent, refreshable view of the catalog under `root`, with bounded memory.

    Views: ``instances`` (current version of each SOP Instance UID, without the header
    JSON: see :meth:`headers`), ``series``, ``studies``, ``patients``, ``quarantine`` and
    ``instance_versions`` (every ingested version, with its header, read from the Parquet
    files when asked): the names and columns of docs/catalog.md. With `landed`, instances
    landed but not indexed yet are answered too (tier ``landing``).

    With `lake`, the base is the DuckLake's served tables (attached read-only; the writer
    keeps them current at every append) instead of the local serving database, and the
    overlay of local batch files is off: another host has none, and the lake shows every
    append on the next query. Headers come from the lake's ``instance_versions``.

    Routing's views of the delivery log, ``delivery_status`` and ``open_deliveries``, are
    there unless `deliveries` is False: then the delivery log's batch files are not loaded
    and those two views do not exist. The services (DICOMweb, the receiver's Q/R) open it
    so: keeping the overlay's deliveries matched to the compacted ones scans every
    compacted delivery's SOP Instance UID whenever routing adds a file (about 1 s at 20
    million deliveries), which a QIDO-RS request must never wait for.
    """

    def __init__(
        self,
        root: Path,
        *,
        memory_limit_mb: int = 256,
        landed: LandedIndex | None = None,
        lake: LakeConfig | None = None,
        deliveries: bool = True,
    ) -> None:
        self.root = Path(root)
        self.memory_limit_mb = memory_limit_mb
        self.landed = landed
        self.lake = lake
        self.deliveries = deliveries
        self._lock = threading.Lock()
        self._retired: list[tuple[float, _State]] = []
        self._manifest_stamp: tuple[int, int] | None = None
        self._state = self._new_state(Manifest.load(self.root))
        self.refresh()

    def _new_state(self, manifest: Manifest) -> _State:
        self._manifest_stamp = self._stamp()
        return _State(self.root, manifest, self.memory_limit_mb, self.lake, self.deliveries)

    def _stamp(self) -> tuple[int, int] | None:
        if self.lake is not None:
            return None  # no generations: the lake is current at every query
        try:
            st = (self.root / "manifest.json").stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_ino)

    @property
    def generation(self) -> int:
        return self._state.manifest.generation

    def refresh(self) -> int:
        """Bring the view up to date: a new generation if compaction published one, then
        batch and change files added since, then landed instances. Returns how many files
        were added (a new generation counts its overlay's). Each step commits whole."""
        with self._lock:
            now = time.monotonic()
            for retired_at, old in list(self._retired):
                if now - retired_at >= _RETIRE_SECONDS:
                    old.close()
                    self._retired.remove((retired_at, old))
            # Landed first: a batch that left the landing zone was indexed before it left,
            # so the file listing that follows finds its catalog file.
            if self.landed is not None:
                self.landed.refresh()
            state = self._state
            if self._stamp() != self._manifest_stamp:
                manifest = Manifest.load(self.root)
                if manifest.generation != state.manifest.generation:
                    fresh = self._new_state(manifest)
                    self._load_files(fresh)
                    self._load_landed(fresh)
                    self._retired.append((now, state))
                    self._state = fresh
                    return sum(len(v) for v in fresh.loaded.values())
            added = self._load_files(state)
            self._load_landed(state)
            return added

    def refresh_landed(self) -> bool:
        """Only the landed instances (cheap when the landing zone did not change: a few
        stat calls). When versions left the landing zone (indexed), the catalog's new files
        are loaded in the same step, so such an instance is answered from its catalog row
        without a gap."""
        if self.landed is None:
            return False
        with self._lock:
            if not self.landed.refresh() and self.landed.version == self._state.landed_version:
                return False
            state = self._state
            version, rows = self.landed.snapshot()
            gone = set(state.landed_rows) - set(
                zip(
                    rows.column("sop_instance_uid").to_pylist(),
                    rows.column("checksum").to_pylist(),
                    strict=True,
                )
            )
            if gone:
                self._load_files(state)
            state.set_landed(version, rows)
            return True

    def _load_files(self, state: _State) -> int:
        if self.lake is not None:
            return 0  # no local files: the lake holds every append
        new = {
            table: [
                f
                for f in pending_batch_files(self.root, state.manifest, table)
                if f not in state.loaded[table]
            ]
            for table in SCHEMAS
            if self.deliveries or table != DELIVERIES.directory
        }
        if any(new.values()):
            state.add_files(new)
        return sum(len(v) for v in new.values())

    def _load_landed(self, state: _State) -> None:
        if self.landed is None:
            return
        version, rows = self.landed.snapshot()
        if version != state.landed_version:
            state.set_landed(version, rows)

    def pending_files(self) -> int:
        """Batch files in the overlay (not compacted yet)."""
        return sum(len(v) for v in self._state.loaded.values())

    def headers(
        self, rows: Sequence[tuple[str, str, str] | tuple[str, str, str, str]]
    ) -> dict[tuple[str, str], str]:
        """Header JSON of instances given as (source_file, sop_instance_uid, checksum[,
        study_instance_uid]).

        Read from the Parquet file each row names (relative to the catalog, or absolute),
        only the files named, and with the study UIDs only the row groups of those studies
        (compacted files are sorted by study), so memory never holds the headers; landed
        instances' headers come from the overlay. Keyed by (sop_instance_uid, checksum).
        """
        if not rows:
            return {}
        state = self._state
        found: dict[tuple[str, str], str] = {}
        on_disk = []
        in_lake = []
        for row in rows:
            source, sop, checksum = row[0], row[1], row[2]
            if source.startswith(LANDED):
                header = state.landed_headers.get((sop, checksum))
                if header is not None:
                    found[(sop, checksum)] = header
            elif source.startswith(LAKE_SOURCE):
                in_lake.append(row)
            else:
                on_disk.append(row)
        if in_lake:
            found.update(self._lake_headers(state, in_lake))
        if not on_disk:
            return found
        files = sorted({str(self.root / r[0]) for r in on_disk})
        wanted = {(r[1], r[2]) for r in on_disk}
        sql = (
            "SELECT sop_instance_uid, checksum, header_json FROM read_parquet(?, "
            "hive_partitioning = false) WHERE "
        )
        params: list[Any] = [files]
        studies = sorted({r[3] for r in on_disk if len(r) > 3})
        if studies and all(len(r) > 3 for r in on_disk):
            # One placeholder per study: DuckDB prunes row groups on a literal IN list
            # (measured 3 ms for a 500-instance study, against 30 ms matching 500 UIDs).
            sql += f"study_instance_uid IN ({', '.join('?' * len(studies))})"
            params += studies
        else:
            sql += "sop_instance_uid IN (SELECT unnest(?))"
            params.append(sorted({w[0] for w in wanted}))
        cursor = state.con.cursor()
        try:
            result = cursor.execute(sql, params).fetchall()
        finally:
            cursor.close()
        found.update({(s, c): h for s, c, h in result if (s, c) in wanted})
        return found

    def _lake_headers(
        self, state: _State, rows: Sequence[tuple[str, ...]]
    ) -> dict[tuple[str, str], str]:
        """Headers from the lake's ``instance_versions``: by study UID (the files are sorted
        by it, so row-group statistics skip the rest) and SOP Instance UID."""
        wanted = {(r[1], r[2]) for r in rows}
        studies = sorted({r[3] for r in rows if len(r) > 3})
        sql = (
            f"SELECT sop_instance_uid, checksum, header_json FROM {_LAKE_ALIAS}.instance_versions "
            "WHERE sop_instance_uid IN (SELECT unnest(?))"
        )
        params: list[Any] = [sorted({w[0] for w in wanted})]
        if studies and all(len(r) > 3 for r in rows):
            sql += f" AND study_instance_uid IN ({', '.join('?' * len(studies))})"
            params += studies
        cursor = state.con.cursor()
        try:
            result = cursor.execute(sql, params).fetchall()
        finally:
            cursor.close()
        return {(s, c): h for s, c, h in result if (s, c) in wanted}

    def column_types(self, table: str) -> dict[str, str]:
        """DuckDB type of each column of `table` (``{"series_number": "INTEGER", ...}``)."""
        return self._state.types[table]

    def query(self, sql: str, params: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
        """Run `sql` with bound `params` on a cursor of its own (thread-safe)."""
        cursor = self._state.con.cursor()
        try:
            return cursor.execute(sql, list(params or [])).fetchall()
        finally:
            cursor.close()

    def query_dicts(self, sql: str, params: Sequence[Any] | None = None) -> list[dict[str, Any]]:
        """Like :meth:`query`, each row as a dict keyed by column name."""
        cursor = self._state.con.cursor()
        try:
            result = cursor.execute(sql, list(params or []))
            names = [d[0] for d in result.description or []]
            return [dict(zip(names, row, strict=True)) for row in result.fetchall()]
        finally:
            cursor.close()

    def arrow(self, sql: str, params: Sequence[Any] | None = None) -> pa.Table:
        """Like :meth:`query`, as an Arrow table."""
        cursor = self._state.con.cursor()
        try:
            return cursor.execute(sql, list(params or [])).fetch_arrow_table()
        finally:
            cursor.close()

    def close(self) -> None:
        with self._lock:
            for _, old in self._retired:
                old.close()
            self._retired.clear()
            self._state.close()


__all__ = ["LANDED", "CatalogReader", "batch_files"]
