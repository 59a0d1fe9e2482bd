"""Ingest sealed landing batches: read headers, validate, place in the hot tier, append to
the catalog, and remove the batch from the landing zone last.

Idempotent per batch: a batch whose catalog file exists is only removed from the landing
zone, so a run killed at any point and re-run leaves no duplicate and loses nothing.

A file that fails for any reason of its own (unparseable, invalid, a pydicom error, an
unsafe key) is quarantined with its reason and its batch-mates are indexed. A failure of
the machine (an ``OSError`` reading the landing zone or writing the hot tier, the
quarantine or the catalog, a full disk) is not the file's fault: it fails the run, which
the sensor retries, and quarantines nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import warnings
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq
from pydicom.datadict import tag_for_keyword

from vannah_pipelines.catalog.compaction import ensure_catalog
from vannah_pipelines.catalog.lake import (
    INSTANCE_VERSIONS,
    QUARANTINE,
    LakeConfig,
    append_batch,
    attach_lake,
    ensure_tables,
)
from vannah_pipelines.catalog.schema import DICOM_COLUMNS, INSTANCE_SCHEMA, QUARANTINE_SCHEMA
from vannah_pipelines.catalog.writer import CatalogWriter
from vannah_pipelines.dicom.headers import json_int, json_text, read_header
from vannah_pipelines.dicom.uids import require_uid
from vannah_pipelines.errors import InvalidDicomError, UnsafeUidError
from vannah_pipelines.landing.layout import Batch, LandedInstance, LandingZone
from vannah_pipelines.landing.space import require_free_space
from vannah_pipelines.storage.base import Tier, instance_key
from vannah_pipelines.storage.local import LocalStorage

if TYPE_CHECKING:
    import duckdb

    from vannah_pipelines.settings import Settings

log = logging.getLogger(__name__)

# (column, DICOM JSON tag, integer?) for every DICOM column of the catalog.
_COLUMN_TAGS = [
    (c.name, f"{tag_for_keyword(c.keyword):08X}", c.type == pa.int32())
    for c in DICOM_COLUMNS
    if c.keyword is not None
]

_LANDED_NAME = re.compile(r"[0-9.]+(~[0-9]+)?\.dcm")

# Below this many files a batch is parsed in-process: a pool costs more than it saves.
_POOL_THRESHOLD = 64


@dataclass(frozen=True)
class IngestPaths:
    """Where ingest reads and writes (all from Settings). With `lake`, every batch is also
    appended to that DuckLake after its local batch file is written (the local Parquet
    record stays): what services on other hosts read."""

    landing_dir: Path
    hot_dir: Path
    catalog_dir: Path
    quarantine_dir: Path
    lake: LakeConfig | None = None

    @classmethod
    def for_settings(cls, settings: Settings) -> IngestPaths:
        """The folders of `settings`, and its DuckLake when ``catalog_lake_*`` is set."""
        return cls(
            settings.landing_dir,
            settings.hot_dir,
            settings.catalog_dir,
            settings.quarantine_dir,
            LakeConfig.from_settings(settings),
        )


@dataclass
class IngestResult:
    """What one ingest did: the figures a Dagster materialization shows."""

    batches: list[str] = field(default_factory=list)
    already_indexed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    instances: int = 0
    bytes: int = 0
    quarantined: int = 0
    modalities: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)  # receive -> index, seconds
    quarantine_reasons: Counter[str] = field(default_factory=Counter)
    catalog_files: list[str] = field(default_factory=list)

    def latency_percentile(self, q: float) -> float | None:
        """The `q` quantile (0..1) of receive-to-index latency, nearest rank."""
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


_MAX_REASON = 1000


def quarantine_reason(exc: BaseException) -> str:
    """The reason recorded for a quarantined file: the archive's own message for invalid
    DICOM, else the exception type and message.

    >>> quarantine_reason(ValueError("bad"))
    'ValueError: bad'
    >>> quarantine_reason(InvalidDicomError("missing StudyInstanceUID"))
    'missing StudyInstanceUID'
    """
    text = str(exc) if isinstance(exc, InvalidDicomError) else f"{type(exc).__name__}: {exc}"
    return text[:_MAX_REASON]


def reason_kind(reason: str) -> str:
    """The part of a reason before its first colon: safe for logs and metadata (no values).

    >>> reason_kind("BytesLengthException: Expected total bytes ...")
    'BytesLengthException'
    """
    return reason.split(":", 1)[0][:80]


def instance_row(item: LandedInstance, data: bytes, batch_id: str, now: datetime) -> dict[str, Any]:
    """The catalog row of one landed file, exactly as ingest indexes it.

    One piece of code for ingest and for the readers' overlay of landed instances
    (:mod:`vannah_pipelines.catalog.landed`), so both see the same columns, checksum and
    hot-tier key. Nothing is written: the row names the hot-tier key the file is placed
    under (``storage_key``, tier ``hot``) and is indexed at `now`.

    Parameters
    ----------
    item
        The landed file and its receive facts.
    data
        Its bytes (the whole file: the checksum and the truncation check need them).
    batch_id
        The landing batch it is in.
    now
        The time of indexing (and of receipt, when the facts do not say).

    Raises
    ------
    InvalidDicomError
        The file is not valid DICOM, or was sent under another SOP Instance UID, or an
        ``OSError`` was raised parsing it from memory (the file's doing).
    Exception
        Whatever else the parser raises for this file: the caller decides (ingest
        quarantines it).
    """
    facts = item.facts
    received_at = _parse_time(facts.received_at if facts else None)
    try:
        # Parsed from memory: whatever this raises, even an OSError, is the file's doing.
        with _quiet_pydicom():
            header = read_header(item.path, data)
    except OSError as exc:
        raise InvalidDicomError(f"{type(exc).__name__}: {exc}") from exc
    if header.sop_instance_uid != item.sop_instance_uid:
        raise InvalidDicomError(
            "SOPInstanceUID in the data set differs from the one it was sent as"
        )
    key = instance_key(
        header.study_instance_uid,
        header.series_instance_uid,
        header.sop_instance_uid,
        header.checksum,
    )
    attributes = header.attributes
    row: dict[str, Any] = {
        name: (json_int if is_int else json_text)(attributes, tag)
        for name, tag, is_int in _COLUMN_TAGS
    }
    row.update(
        transfer_syntax_uid=header.transfer_syntax_uid
        or (facts.transfer_syntax_uid if facts else None),
        size_bytes=header.size_bytes,
        checksum=header.checksum,
        tier=Tier.HOT.value,
        storage_key=key,
        received_at=received_at or now,
        indexed_at=now,
        calling_ae=facts.calling_ae if facts else None,
        called_ae=facts.called_ae if facts else None,
        peer=facts.peer if facts else None,
        source=facts.source if facts else None,
        batch_id=batch_id,
        header_json=header.header_json,
    )
    return row


def _placed_row(
    item: LandedInstance, data: bytes, batch_id: str, hot_dir: Path, now: datetime
) -> dict[str, Any]:
    """Parse, validate and place one file; raise whatever it raises."""
    row = instance_row(item, data, batch_id, now)
    # An OSError here (hot tier full, unwritable) is the machine's: it fails the run.
    # Not synced here: _index_chunk syncs the chunk's keys together.
    LocalStorage(hot_dir, Tier.HOT).put(row["storage_key"], item.path, sync=False)
    return row


@contextlib.contextmanager
def _quiet_pydicom() -> Iterator[None]:
    """Silence pydicom while it parses a landed file: its validation messages may quote
    values (names, IDs), which never go to logs; a failure is quarantined with its reason."""
    pydicom_log = logging.getLogger("pydicom")
    was_disabled = pydicom_log.disabled
    pydicom_log.disabled = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        pydicom_log.disabled = was_disabled


def quarantine_row(
    item: LandedInstance,
    batch_id: str,
    quarantine_dir: Path,
    reason: str,
    data: bytes | None = None,
) -> dict[str, Any]:
    """Move a copy of the landed file to the quarantine and return its catalog row.

    Raises only ``OSError`` (the quarantine cannot be written): never for the file's sake.
    """
    facts = item.facts
    name = item.path.name  # <uid>.dcm or <uid>~<n>.dcm, made by the landing zone
    if data is None and item.path.is_file():
        data = item.path.read_bytes()
    checksum = hashlib.sha256(data).hexdigest() if data is not None else None
    if not _LANDED_NAME.fullmatch(name):
        name = f"unnamed-{(checksum or 'none')[:16]}.dcm"  # never a path from outside
    try:
        sop_uid: str | None = require_uid(item.sop_instance_uid, "SOPInstanceUID")
    except UnsafeUidError:
        sop_uid = None
    qkey = f"{batch_id}/{name}"
    LocalStorage(quarantine_dir).put(qkey, item.path)
    return {
        "batch_id": batch_id,
        "file_name": name,
        "quarantine_key": qkey,
        "reason": reason,
        "size_bytes": len(data) if data is not None else item.path.lstat().st_size,
        "checksum": checksum,
        "sop_instance_uid": sop_uid,
        "calling_ae": facts.calling_ae if facts else None,
        "peer": facts.peer if facts else None,
        "source": facts.source if facts else None,
        "received_at": _parse_time(facts.received_at if facts else None),
        "quarantined_at": datetime.now(UTC),
    }


def _index_one(
    item: LandedInstance, batch_id: str, hot_dir: Path, quarantine_dir: Path
) -> tuple[str, dict[str, Any]]:
    """Index one landed file: ("instance", row) or ("quarantine", row).

    Any failure of the file's own (bad DICOM, a parser error of any type, an unsafe key)
    becomes a quarantine row with its reason. An ``OSError`` reading the landing zone or
    writing the hot tier propagates: the run fails and is retried, nothing is quarantined.
    """
    now = datetime.now(UTC)
    data = item.path.read_bytes()
    try:
        return "instance", _placed_row(item, data, batch_id, hot_dir, now)
    except OSError:
        raise
    # Deliberately broad: ingest must survive ANY per-file failure (a pydicom exception
    # outside its documented ones, a check gap), or one file would hold its batch forever.
    except Exception as exc:
        reason = quarantine_reason(exc)
    return "quarantine", quarantine_row(item, batch_id, quarantine_dir, reason, data)


def _index_chunk(
    items: list[LandedInstance], batch_id: str, hot_dir: Path, quarantine_dir: Path
) -> list[tuple[str, dict[str, Any]]]:
    outcomes = [_index_one(i, batch_id, hot_dir, quarantine_dir) for i in items]
    LocalStorage(hot_dir, Tier.HOT).sync(
        [row["storage_key"] for kind, row in outcomes if kind == "instance"]
    )
    return outcomes


def _chunks(items: list[LandedInstance], n: int) -> Iterable[list[LandedInstance]]:
    size = max(1, -(-len(items) // n))
    for start in range(0, len(items), size):
        yield items[start : start + size]


Outcomes = list[tuple[str, dict[str, Any]]]
_WINDOW = 2  # batches parsed ahead while the parent writes the previous one


def _quarantine_batch(
    items: list[LandedInstance], batch_id: str, quarantine_dir: Path, reason: str
) -> Outcomes:
    """Quarantine every file of a batch unparsed (the sensor gave up on it)."""
    return [("quarantine", quarantine_row(i, batch_id, quarantine_dir, reason)) for i in items]


class LakeAppender:
    """Appends ingested batches to the DuckLake (one connection per ingest run)."""

    def __init__(self, config: LakeConfig) -> None:
        self.config = config
        self.con: duckdb.DuckDBPyConnection = attach_lake(config)
        ensure_tables(self.con, config)

    def append(self, batch_id: str, instances: pa.Table, quarantined: pa.Table | None) -> bool:
        """Append one batch's rows: idempotent (False when the lake holds the batch)."""
        tables = {INSTANCE_VERSIONS: instances}
        if quarantined is not None and quarantined.num_rows:
            tables[QUARANTINE] = quarantined
        return append_batch(self.con, self.config, batch_id, tables)

    def append_files(self, writer: CatalogWriter, batch: Batch) -> bool:
        """Append a batch from its local batch files (indexed by a run that died before
        the lake took it)."""
        day, batch_id = batch.day, batch.batch_id
        quarantined = None
        if writer.has_batch("quarantine", day, batch_id):
            quarantined = pq.read_table(writer.batch_path("quarantine", day, batch_id))
        instances = pq.read_table(writer.batch_path("instances", day, batch_id))
        return self.append(batch_id, instances, quarantined)

    def close(self) -> None:
        self.con.close()


def _pending_items(
    batch: Batch,
    zone: LandingZone,
    writer: CatalogWriter,
    result: IngestResult,
    lake: LakeAppender | None = None,
) -> list[LandedInstance] | None:
    """The batch's files, or None if it needs no parsing (gone, or already indexed)."""
    if not batch.path.exists():
        result.missing.append(batch.batch_id)
        return None
    if writer.has_batch("instances", batch.day, batch.batch_id):
        if lake is not None:
            lake.append_files(writer, batch)  # a no-op when the lake has it already
        zone.remove(batch)  # indexed by a run that died before its last step
        result.already_indexed.append(batch.batch_id)
        return None
    return batch.instances()


def _commit(
    batch: Batch,
    outcomes: Outcomes,
    zone: LandingZone,
    writer: CatalogWriter,
    result: IngestResult,
    lake: LakeAppender | None = None,
) -> None:
    """Append the batch to the catalog (and the lake), then remove it from the landing zone."""
    rows = [row for kind, row in outcomes if kind == "instance"]
    quarantined = [row for kind, row in outcomes if kind == "quarantine"]
    quarantine_table = None
    if quarantined:
        quarantine_table = pa.Table.from_pylist(quarantined, QUARANTINE_SCHEMA)
        writer.write_batch("quarantine", batch.day, batch.batch_id, quarantine_table)
    # The instances file is the commit point of the batch: written last but for the lake
    # and the removal (a run dying between them appends the files on its retry).
    instances = pa.Table.from_pylist(rows, INSTANCE_SCHEMA)
    path = writer.write_batch("instances", batch.day, batch.batch_id, instances)
    if lake is not None:
        lake.append(batch.batch_id, instances, quarantine_table)
    zone.remove(batch)
    result.batches.append(batch.batch_id)
    result.catalog_files.append(str(path))
    result.instances += len(rows)
    result.bytes += sum(r["size_bytes"] for r in rows)
    result.quarantined += len(quarantined)
    result.modalities.update(r["modality"] or "" for r in rows)
    result.quarantine_reasons.update(reason_kind(q["reason"]) for q in quarantined)
    for q in quarantined:  # identifiers and the kind of reason only: never values
        log.warning(
            "quarantined %s (SOP %s) of batch %s: %s",
            q["file_name"],
            q["sop_instance_uid"],
            batch.batch_id,
            reason_kind(q["reason"]),
        )
    for r in rows:
        result.latencies.append((r["indexed_at"] - r["received_at"]).total_seconds())


def ingest_batches(
    paths: IngestPaths,
    batch_ids: list[str],
    workers: int = 1,
    *,
    quarantine: Mapping[str, str] | None = None,
    free_space_reserve: int = 0,
) -> IngestResult:
    """Ingest the sealed batches `batch_ids` (validated) in order.

    Parameters
    ----------
    paths
        The data folders.
    batch_ids
        Ids of sealed batches (from run config: validated before use as paths).
    workers
        Processes that parse headers in parallel (1: in this process only).
    quarantine
        Batch id -> reason: those batches are quarantined whole, unparsed (a batch whose
        ingest kept failing, so the sensor gave up on it).
    free_space_reserve
        Bytes to keep free on the hot tier and the catalog: below it, stop before writing.

    Raises
    ------
    OSError
        The landing zone, hot tier, quarantine or catalog failed (ENOSPC included):
        nothing of the current batch is removed from the landing zone; rerun.
    InsufficientSpaceError
        The hot tier or the catalog is under the free-space reserve.
    """
    quarantine = dict(quarantine or {})
    zone = LandingZone(paths.landing_dir)
    writer = CatalogWriter(paths.catalog_dir)
    ensure_catalog(paths.catalog_dir)
    for folder in (paths.hot_dir, paths.quarantine_dir):
        folder.mkdir(parents=True, exist_ok=True)

    def require_space() -> None:
        if free_space_reserve:
            for folder in (paths.hot_dir, paths.catalog_dir):
                require_free_space(folder, 0, free_space_reserve)

    batches = [zone.batch(b) for b in batch_ids]
    result = IngestResult()
    lake = LakeAppender(paths.lake) if paths.lake is not None else None
    total = sum(1 for b in batches if b.path.exists() for _ in b.instances())
    pool = None
    if workers > 1 and total >= _POOL_THRESHOLD:
        # forkserver, not fork: the caller (a Dagster run) has threads, and forking a
        # threaded process can deadlock the child.
        context = get_context("forkserver")
        context.set_forkserver_preload([__name__])
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=context)
    pending: deque[tuple[Batch, list[Future[Outcomes]]]] = deque()

    def commit_oldest() -> None:
        batch, futures = pending.popleft()
        _commit(batch, [o for f in futures for o in f.result()], zone, writer, result, lake)

    try:
        for batch in batches:
            items = _pending_items(batch, zone, writer, result, lake)
            if items is None:
                continue
            require_space()
            args = (batch.batch_id, paths.hot_dir, paths.quarantine_dir)
            if batch.batch_id in quarantine:
                done_q: Future[Outcomes] = Future()
                done_q.set_result(
                    _quarantine_batch(
                        items, batch.batch_id, paths.quarantine_dir, quarantine[batch.batch_id]
                    )
                )
                pending.append((batch, [done_q]))
            elif pool is not None and len(items) >= _POOL_THRESHOLD:
                chunks = _chunks(items, workers * 2)
                pending.append((batch, [pool.submit(_index_chunk, c, *args) for c in chunks]))
            else:
                done: Future[Outcomes] = Future()
                done.set_result(_index_chunk(items, *args))
                pending.append((batch, [done]))
            while len(pending) > _WINDOW:
                commit_oldest()
        while pending:
            commit_oldest()
    finally:
        if pool is not None:
            pool.shutdown()
        if lake is not None:
            lake.close()
    log.info(
        "ingested %d instances (%d quarantined) from %d batches",
        result.instances,
        result.quarantined,
        len(result.batches),
    )
    return result


def pending_count(landing_dir: Path) -> int:
    """How many sealed batches wait for ingest (for sensors and health)."""
    return len(LandingZone(landing_dir).sealed_batches())
