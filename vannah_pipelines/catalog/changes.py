"""State-change tables: appended, never rewritten; the latest row per key wins.

A tier move, a delivery, a quarantine release is one small append: a Parquet file of its
own under ``<catalog>/changes/<table>/day=YYYY-MM-DD/<change_id>.parquet``, written
atomically (temp file, fsync, rename) by :meth:`CatalogWriter.write_batch`, so a reader
sees an append whole or not at all. The catalog views join the latest row of each key
(:func:`latest_sql`) into the rows it changes, so one append switches, say, where an
instance lives, without rewriting anything. See docs/catalog.md, "State-change tables".

Every row carries, besides its table's key and value columns:

- ``changed_at`` (``timestamp[us, UTC]``): when the change took effect;
- ``change_id``: unique and time-ordered (the append's file name): breaks ties of
  ``changed_at``, so the order of two appends is total and never depends on file order;
- ``changed_by``: who made it (``cli:<user>``, ``dagster:<run_id>``, ...).
"""

from __future__ import annotations

import itertools
import os
import re
import secrets
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from vannah_pipelines.errors import CatalogError
from vannah_pipelines.storage.base import Tier

if TYPE_CHECKING:
    from vannah_pipelines.catalog.writer import CatalogWriter

CHANGES_DIR = "changes"
META_FIELDS: list[pa.Field] = [
    pa.field("changed_at", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("change_id", pa.string(), nullable=False),
    pa.field("changed_by", pa.string(), nullable=False),
]
META_COLUMNS = [f.name for f in META_FIELDS]
LATEST_CHANGE_FIRST = "changed_at DESC, change_id DESC"


@dataclass(frozen=True)
class ChangeTable:
    """A declared state-change table.

    `keys` name the columns that identify what changes (the rows of one key form its
    history); `values` is the schema of what is set (a non-nullable field is required);
    `allowed` restricts a value column to a closed set (checked at append).
    """

    name: str
    keys: pa.Schema
    values: pa.Schema
    allowed: Mapping[str, frozenset[str]] = field(default_factory=dict)
    doc: str = ""

    @property
    def directory(self) -> str:
        """The table's folder under the catalog root (``changes/<name>``)."""
        return f"{CHANGES_DIR}/{self.name}"

    @property
    def key_columns(self) -> list[str]:
        return list(self.keys.names)

    @property
    def value_columns(self) -> list[str]:
        return list(self.values.names)

    @property
    def schema(self) -> pa.Schema:
        """Every column of a row: keys, values, then ``changed_at, change_id, changed_by``."""
        return pa.schema([*self.keys, *self.values, *META_FIELDS])


QUARANTINED = "quarantined"
RELEASED = "released"

QUARANTINE_STATUS = ChangeTable(
    name="quarantine_status",
    keys=pa.schema([pa.field("quarantine_key", pa.string(), nullable=False)]),
    values=pa.schema(
        [
            pa.field("status", pa.string(), nullable=False),
            pa.field("reason", pa.string()),
            pa.field("released_batch_id", pa.string()),
        ]
    ),
    allowed={"status": frozenset({QUARANTINED, RELEASED})},
    doc="the status of a quarantined file; released: copied back to landing as a new batch",
)

INSTANCE_LOCATIONS = ChangeTable(
    name="instance_locations",
    keys=pa.schema(
        [
            pa.field("sop_instance_uid", pa.string(), nullable=False),
            pa.field("checksum", pa.string(), nullable=False),
        ]
    ),
    values=pa.schema(
        [
            pa.field("tier", pa.string(), nullable=False),
            pa.field("storage_key", pa.string(), nullable=False),
        ]
    ),
    allowed={"tier": frozenset(t.value for t in Tier)},
    doc="where one version (SOP Instance UID + checksum) of an instance lives now",
)

# Delivery states (routing): queued (due now or at next_attempt_at), waiting (a study-mode
# rule: sent once the study is stable), sent (the destination acknowledged it), committed
# (Storage Commitment confirmed it), failed (will be retried), dead (given up; retried by
# hand), cancelled (a newer version of the instance superseded it before it went).
QUEUED, WAITING, SENT, COMMITTED, FAILED, DEAD, CANCELLED = (
    "queued",
    "waiting",
    "sent",
    "committed",
    "failed",
    "dead",
    "cancelled",
)
DELIVERY_STATES = frozenset({QUEUED, WAITING, SENT, COMMITTED, FAILED, DEAD, CANCELLED})
# Not settled: what routing still has to send, or a person to retry (dead). A few among
# millions of sent/committed ones: compaction keeps them in a table of their own too
# (``compacted_open_deliveries``), read by the ``open_deliveries`` view.
OPEN_DELIVERY_STATES = (QUEUED, WAITING, FAILED, DEAD)
OPEN_DELIVERIES_TABLE = "compacted_open_deliveries"

DELIVERIES = ChangeTable(
    name="deliveries",
    keys=pa.schema(
        [
            pa.field("sop_instance_uid", pa.string(), nullable=False),
            pa.field("checksum", pa.string(), nullable=False),
            pa.field("rule", pa.string(), nullable=False),
            pa.field("destination", pa.string(), nullable=False),
        ]
    ),
    values=pa.schema(
        [
            pa.field("study_instance_uid", pa.string(), nullable=False),
            pa.field("status", pa.string(), nullable=False),
            pa.field("attempts", pa.int32(), nullable=False),
            pa.field("priority", pa.string()),
            pa.field("queued_at", pa.timestamp("us", tz="UTC")),
            pa.field("next_attempt_at", pa.timestamp("us", tz="UTC")),
            pa.field("bytes_sent", pa.int64()),
            pa.field("last_error", pa.string()),
            pa.field("detail", pa.string()),
        ]
    ),
    allowed={"status": DELIVERY_STATES},
    doc="routing: where one version of an instance is to go under one rule, and how it went",
)

CHANGE_TABLES: dict[str, ChangeTable] = {
    t.name: t for t in (QUARANTINE_STATUS, INSTANCE_LOCATIONS, DELIVERIES)
}


def change_table(table: ChangeTable | str) -> ChangeTable:
    """The declared table `table` (a name or the table itself)."""
    if isinstance(table, ChangeTable):
        return table
    try:
        return CHANGE_TABLES[table]
    except KeyError:
        raise CatalogError(f"no state-change table {table[:80]!r}") from None


# ---------------------------------------------------------------------------- ids

_CHANGE_ID = re.compile(r"[0-9]{8}T[0-9]{12}-[0-9]+-[0-9]{6}-[0-9a-f]{8}")
_id_lock = threading.Lock()
_last_us = 0
_sequence = itertools.count()


def new_change_id(now: datetime | None = None) -> str:
    """A unique, time-ordered change id: ``<UTC µs stamp>-<pid>-<seq>-<random>``.

    Strictly increasing within a process (the stamp never repeats or goes back), so of two
    appends made one after the other the second sorts last; across processes the stamp
    orders them and the rest makes the id unique.
    """
    global _last_us
    wall = now or datetime.now(UTC)
    us = int(wall.timestamp() * 1_000_000)
    with _id_lock:
        us = max(us, _last_us + 1)
        _last_us = us
        seq = next(_sequence) % 1_000_000
    stamp = datetime.fromtimestamp(0, UTC) + timedelta(microseconds=us)
    return f"{stamp:%Y%m%dT%H%M%S%f}-{os.getpid()}-{seq:06d}-{secrets.token_hex(4)}"


def require_change_id(value: object) -> str:
    """Return `value` if it is a change id we make (safe as a file name)."""
    if not isinstance(value, str) or not _CHANGE_ID.fullmatch(value):
        raise CatalogError(f"not a change id: {str(value)[:80]!r}")
    return value


# ---------------------------------------------------------------------------- append


@dataclass(frozen=True)
class ChangeAppend:
    """One append: its id, when it took effect, and its file."""

    table: str
    change_id: str
    changed_at: datetime
    path: Path
    rows: int


def change_rows(
    table: ChangeTable | str,
    rows: Sequence[Mapping[str, Any]],
    *,
    changed_by: str,
    changed_at: datetime | None = None,
    change_id: str | None = None,
) -> pa.Table:
    """Validate `rows` (key and value columns) and return them in the table's schema,
    stamped with ``changed_at``, ``change_id`` and ``changed_by``.

    Raises
    ------
    CatalogError
        An unknown table or column, a missing key or required value, a value outside its
        allowed set, two rows for one key, no rows, a naive `changed_at` or no `changed_by`.
    """
    t = change_table(table)
    if not rows:
        raise CatalogError(f"{t.name}: an append needs at least one row")
    if not changed_by:
        raise CatalogError(f"{t.name}: changed_by is required")
    when = changed_at or datetime.now(UTC)
    if when.tzinfo is None:
        raise CatalogError(f"{t.name}: changed_at must be timezone-aware")
    cid = require_change_id(change_id or new_change_id())
    columns = set(t.key_columns) | set(t.value_columns)
    seen: set[tuple[Any, ...]] = set()
    stamped = []
    for row in rows:
        unknown = sorted(set(row) - columns)
        if unknown:
            raise CatalogError(f"{t.name}: unknown column(s) {unknown}")
        for f in [*t.keys, *t.values]:
            if not f.nullable and row.get(f.name) is None:
                raise CatalogError(f"{t.name}: {f.name} is required")
        for name, allowed in t.allowed.items():
            if row.get(name) is not None and row[name] not in allowed:
                raise CatalogError(
                    f"{t.name}: {name} must be one of {sorted(allowed)}, not {row[name]!r}"
                )
        key = tuple(row[k] for k in t.key_columns)
        if key in seen:
            raise CatalogError(f"{t.name}: two rows for one key in one append: {key}")
        seen.add(key)
        stamped.append({**row, "changed_at": when, "change_id": cid, "changed_by": changed_by})
    try:
        return pa.Table.from_pylist(stamped, t.schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise CatalogError(f"{t.name}: {exc}") from exc


def append_change(
    writer: CatalogWriter,
    table: ChangeTable | str,
    rows: Sequence[Mapping[str, Any]],
    *,
    changed_by: str,
    changed_at: datetime | None = None,
) -> ChangeAppend:
    """Append `rows` to the state-change table `table` as one atomic Parquet file.

    All rows of one append share ``changed_at`` (default: now), ``change_id`` and
    ``changed_by``; a reader sees all of them or none. The file is
    ``<catalog>/changes/<table>/day=<changed_at's UTC day>/<change_id>.parquet``.

    Raises
    ------
    CatalogError
        The rows do not fit the table (see :func:`change_rows`).
    OSError
        The catalog cannot be written (nothing is left behind).
    """
    t = change_table(table)
    now = datetime.now(UTC)
    change_id = new_change_id(now)
    data = change_rows(
        t, rows, changed_by=changed_by, changed_at=changed_at or now, change_id=change_id
    )
    when = data.column("changed_at")[0].as_py()
    path = writer.write_batch(t.directory, when.astimezone(UTC).date(), change_id, data)
    return ChangeAppend(t.name, change_id, when, path, data.num_rows)


# ---------------------------------------------------------------------------- SQL


def latest_sql(table: ChangeTable | str, source: str) -> str:
    """SELECT the latest row per key of `table` from `source` (``read_parquet(...)``, a
    table or view name, or a parenthesised subquery holding its rows).

    Latest is the greatest ``changed_at``, ties broken by the greatest ``change_id``: the
    result never depends on the order of files or rows. Idempotent: applied to its own
    output it returns the same rows.
    """
    t = change_table(table)
    keys = ", ".join(t.key_columns)
    return (
        f"SELECT * FROM {source} QUALIFY row_number() OVER "
        f"(PARTITION BY {keys} ORDER BY {LATEST_CHANGE_FIRST}) = 1"
    )


def instances_with_locations_sql(instances_source: str, locations_source: str) -> str:
    """SELECT the rows of `instances_source` (catalog instance rows: every column kept,
    in order) with ``tier`` and ``storage_key`` taken from their version's latest
    ``instance_locations`` row in `locations_source`, when there is one.

    `locations_source` holds the appended rows (all of them, or only the latest per key:
    the result is the same). Joined on (``sop_instance_uid``, ``checksum``): each version
    of an instance has its own location.
    """
    latest = latest_sql(INSTANCE_LOCATIONS, locations_source)
    return f"""SELECT _i.* REPLACE (
    coalesce(_loc.tier, _i.tier) AS tier,
    coalesce(_loc.storage_key, _i.storage_key) AS storage_key)
FROM {instances_source} AS _i
LEFT JOIN ({latest}) AS _loc
  ON _loc.sop_instance_uid = _i.sop_instance_uid AND _loc.checksum = _i.checksum"""


# Columns the quarantine gains from quarantine_status, after its own.
QUARANTINE_STATUS_COLUMNS = ["status", "status_changed_at", "status_reason", "released_batch_id"]


def quarantine_with_status_sql(quarantine_source: str, status_source: str) -> str:
    """SELECT the rows of `quarantine_source` (catalog quarantine rows) with the columns
    of :data:`QUARANTINE_STATUS_COLUMNS` from their latest ``quarantine_status`` row in
    `status_source`: ``status`` is ``'quarantined'`` until a change says otherwise."""
    latest = latest_sql(QUARANTINE_STATUS, status_source)
    return f"""SELECT _q.*,
  coalesce(_st.status, '{QUARANTINED}') AS status,
  _st.changed_at AS status_changed_at,
  _st.reason AS status_reason,
  _st.released_batch_id
FROM {quarantine_source} AS _q
LEFT JOIN ({latest}) AS _st ON _st.quarantine_key = _q.quarantine_key"""


def overlaid_latest_sql(
    table: ChangeTable | str,
    compacted: str,
    pending: str,
    kept: str | None = None,
    touched_rows: str | None = None,
) -> str:
    """SELECT the latest row per key of `table` from `compacted` (a source already holding
    only the latest row of each key, as compaction writes it) and `pending` (the rows
    appended since, few): the same rows as :func:`latest_sql` over both, but the window
    runs over the keys that have pending rows only.

    The compacted rows of a key whose first key column (``sop_instance_uid``, ...) has no
    pending row are kept as they are (an anti-join against the small pending set); the
    others are ranked with the pending rows: a pending row older than the compacted one
    (another host's clock, a late file) does not win over it. Filters on the result push
    down into the compacted table's scan.

    `kept`, when given, is where the kept compacted rows are read from instead (a subset
    of `compacted`, such as its open deliveries): the result is then the rows of that
    subset's keys and of the pending keys only. `touched_rows`, when given, holds the
    compacted rows of the pending keys already (looked up once, when the pending rows were
    loaded: finding them in `compacted` scans its first key column whole).
    """
    t = change_table(table)
    first = t.key_columns[0]
    touched = f"(SELECT {first} FROM {pending})"
    earlier = touched_rows or f"(SELECT * FROM {compacted} WHERE {first} IN {touched})"
    ranked = latest_sql(t, f"(SELECT * FROM {earlier} UNION ALL BY NAME SELECT * FROM {pending})")
    return (
        f"SELECT * FROM {kept or compacted} WHERE {first} NOT IN {touched} "
        f"UNION ALL BY NAME ({ranked})"
    )


def delivery_status_sql(
    compacted: str, pending: str | None = None, touched_rows: str | None = None
) -> str:
    """SELECT the latest ``deliveries`` row of each (instance version, rule, destination):
    the delivery log as it stands (the ``delivery_status`` view), from `compacted` (the
    latest row per key, as compaction writes it) and the `pending` rows appended since
    (:func:`overlaid_latest_sql`); with no `pending`, `compacted` as it is."""
    if pending is None:
        return f"SELECT * FROM {compacted}"
    return overlaid_latest_sql(DELIVERIES, compacted, pending, touched_rows=touched_rows)


def open_deliveries_sql(
    compacted: str,
    compacted_open: str | None,
    pending: str | None,
    touched_rows: str | None = None,
) -> str:
    """SELECT the rows of ``delivery_status`` in an open state (:data:`OPEN_DELIVERY_STATES`):
    the ``open_deliveries`` view, what routing works on. `compacted_open` holds the open
    rows of `compacted` (read instead of it, a few thousand rows instead of millions; None:
    `compacted` is filtered); a key with pending rows is ranked over all its rows."""
    states = ", ".join(f"'{s}'" for s in OPEN_DELIVERY_STATES)
    kept = compacted_open or f"(SELECT * FROM {compacted} WHERE status IN ({states}))"
    rows = (
        f"SELECT * FROM {kept}"
        if pending is None
        else overlaid_latest_sql(
            DELIVERIES, compacted, pending, kept=kept, touched_rows=touched_rows
        )
    )
    return f"SELECT * FROM ({rows}) WHERE status IN ({states})"


_DUCKDB_TYPES = {
    pa.string(): "VARCHAR",
    pa.int32(): "INTEGER",
    pa.int64(): "BIGINT",
    pa.timestamp("us", tz="UTC"): "TIMESTAMPTZ",
}


def empty_sql(table: ChangeTable | str) -> str:
    """A parenthesised subquery with the table's columns and types and no row: a source
    for the helpers above when there is nothing to read (yet)."""
    t = change_table(table)
    columns = ", ".join(f"CAST(NULL AS {_DUCKDB_TYPES[f.type]}) AS {f.name}" for f in t.schema)
    return f"(SELECT {columns} LIMIT 0)"
