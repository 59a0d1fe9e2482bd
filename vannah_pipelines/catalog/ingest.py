"""Ingest sealed landing batches: read headers, validate, place in the hot tier, append to
the catalog, and remove the batch from the landing zone last.

Idempotent per batch: a batch whose catalog file exists is only removed from the landing
zone, so a run killed at any point and re-run leaves no duplicate and loses nothing.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import Counter, deque
from collections.abc import Iterable
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import pyarrow as pa
from pydicom.datadict import tag_for_keyword

from vannah_pipelines.catalog.schema import DICOM_COLUMNS, INSTANCE_SCHEMA, QUARANTINE_SCHEMA
from vannah_pipelines.catalog.writer import CatalogWriter
from vannah_pipelines.dicom.headers import json_int, json_text, read_header
from vannah_pipelines.dicom.uids import require_uid
from vannah_pipelines.errors import InvalidDicomError
from vannah_pipelines.landing.layout import Batch, LandedInstance, LandingZone
from vannah_pipelines.storage.base import Tier, instance_key
from vannah_pipelines.storage.local import LocalStorage

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
    """Where ingest reads and writes (all from Settings)."""

    landing_dir: Path
    hot_dir: Path
    catalog_dir: Path
    quarantine_dir: Path


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


def _index_one(
    item: LandedInstance, batch_id: str, hot_dir: Path, quarantine_dir: Path
) -> tuple[str, dict[str, Any]]:
    """Index one landed file: ("instance", row) or ("quarantine", row). Never raises on
    bad DICOM: bad input becomes a quarantine row with its reason."""
    facts = item.facts
    received_at = _parse_time(facts.received_at if facts else None)
    now = datetime.now(UTC)
    data = item.path.read_bytes()
    try:
        header = read_header(item.path, data)
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
        LocalStorage(hot_dir, Tier.HOT).put(key, item.path, sync=False)  # synced per chunk
    except InvalidDicomError as exc:
        require_uid(item.sop_instance_uid, "SOPInstanceUID")
        name = item.path.name  # <uid>.dcm or <uid>~<n>.dcm, made by the landing zone
        if not _LANDED_NAME.fullmatch(name):
            raise InvalidDicomError(f"unexpected landed file name {name[:80]!r}") from exc
        qkey = f"{batch_id}/{name}"
        LocalStorage(quarantine_dir).put(qkey, item.path)
        return "quarantine", {
            "batch_id": batch_id,
            "file_name": name,
            "quarantine_key": qkey,
            "reason": str(exc),
            "size_bytes": len(data),
            "checksum": hashlib.sha256(data).hexdigest(),
            "sop_instance_uid": item.sop_instance_uid,
            "calling_ae": facts.calling_ae if facts else None,
            "peer": facts.peer if facts else None,
            "source": facts.source if facts else None,
            "received_at": received_at,
            "quarantined_at": now,
        }
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
    return "instance", row


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


def _pending_items(
    batch: Batch, zone: LandingZone, writer: CatalogWriter, result: IngestResult
) -> list[LandedInstance] | None:
    """The batch's files, or None if it needs no parsing (gone, or already indexed)."""
    if not batch.path.exists():
        result.missing.append(batch.batch_id)
        return None
    if writer.has_batch("instances", batch.day, batch.batch_id):
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
) -> None:
    """Append the batch to the catalog, then remove it from the landing zone."""
    rows = [row for kind, row in outcomes if kind == "instance"]
    quarantined = [row for kind, row in outcomes if kind == "quarantine"]
    if quarantined:
        writer.write_batch(
            "quarantine",
            batch.day,
            batch.batch_id,
            pa.Table.from_pylist(quarantined, QUARANTINE_SCHEMA),
        )
    # The instances file is the commit point of the batch: written last but for the removal.
    path = writer.write_batch(
        "instances", batch.day, batch.batch_id, pa.Table.from_pylist(rows, INSTANCE_SCHEMA)
    )
    zone.remove(batch)
    result.batches.append(batch.batch_id)
    result.catalog_files.append(str(path))
    result.instances += len(rows)
    result.bytes += sum(r["size_bytes"] for r in rows)
    result.quarantined += len(quarantined)
    result.modalities.update(r["modality"] or "" for r in rows)
    result.quarantine_reasons.update(q["reason"].split(":")[0] for q in quarantined)
    for r in rows:
        result.latencies.append((r["indexed_at"] - r["received_at"]).total_seconds())


def ingest_batches(paths: IngestPaths, batch_ids: list[str], workers: int = 1) -> IngestResult:
    """Ingest the sealed batches `batch_ids` (validated) in order.

    Parameters
    ----------
    paths
        The data folders.
    batch_ids
        Ids of sealed batches (from run config: validated before use as paths).
    workers
        Processes that parse headers in parallel (1: in this process only).
    """
    zone = LandingZone(paths.landing_dir)
    writer = CatalogWriter(paths.catalog_dir)
    writer.ensure()
    batches = [zone.batch(b) for b in batch_ids]
    result = IngestResult()
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
        _commit(batch, [o for f in futures for o in f.result()], zone, writer, result)

    try:
        for batch in batches:
            items = _pending_items(batch, zone, writer, result)
            if items is None:
                continue
            args = (batch.batch_id, paths.hot_dir, paths.quarantine_dir)
            if pool is not None and len(items) >= _POOL_THRESHOLD:
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
