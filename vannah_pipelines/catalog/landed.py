"""The readers' overlay of landed, not yet indexed instances, and how to open their bytes.

An instance is acknowledged once its file is renamed into ``landing/open/<batch>/``;
Dagster indexes it seconds later. :class:`LandedIndex` lets a reading process (the
DICOMweb service, a receiver's Q/R worker) answer for it meanwhile: it parses each landed
file once, with ingest's own :func:`~vannah_pipelines.catalog.ingest.instance_row`, into a
catalog row of tier ``landing``, and forgets it once ingest has removed its batch.
:func:`open_landed` opens such a row's bytes wherever the file is by then: still in the
landing zone, or already in the hot tier.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import pyarrow as pa

from vannah_pipelines.catalog.ingest import instance_row
from vannah_pipelines.catalog.schema import INSTANCE_SCHEMA
from vannah_pipelines.errors import NotFoundError, StorageError
from vannah_pipelines.landing.layout import (
    RECEIPTS,
    InvalidBatchIdError,
    LandedInstance,
    ReceiveFacts,
    is_landed_file,
    landed_uid,
    read_receipts,
    require_batch_id,
)
from vannah_pipelines.storage.base import Storage, Tier, instance_key
from vannah_pipelines.storage.local import LocalStorage

log = logging.getLogger(__name__)

LANDING_TIER = "landing"  # the ``tier`` of an overlay row: in the landing zone, not indexed yet

# Batch folders, in the order their files are taken when the bound is reached: sealed
# batches (next to be ingested, oldest first), then open ones (oldest first).
_FOLDERS = ("sealed", "open")
# Listed in this order: sealing renames open/<a> to sealed/<b>, so a batch is always seen
# in one of them (a rename after open/ was listed shows in sealed/).
_LISTING = ("open", "sealed")
# A folder whose mtime is less than this old when listed is listed again at the next
# refresh: a file renamed into it within the same timestamp tick would leave the mtime
# unchanged (ext4 ticks are a jiffy; some file systems count whole seconds).
_SETTLE_NS = 2_000_000_000
_COLUMNS: list[str] = INSTANCE_SCHEMA.names
_STORAGE_KEY = _COLUMNS.index("storage_key")
_BATCH_ID = _COLUMNS.index("batch_id")
_LANDED_NAME = re.compile(r"[0-9]+(\.[0-9]+)*(~[0-9]+)?\.dcm")
_HASH_CHUNK = 1024 * 1024

# (st_dev, st_ino, st_size, st_mtime_ns): a landed file is never rewritten, and a rename
# (open -> sealed, a split) keeps all four, so a moved file is known without parsing it.
_Ident = tuple[int, int, int, int]


class LandedKeyError(StorageError):
    """A storage key given as a landed file's is not one the overlay makes."""


class LandedNotFoundError(NotFoundError):
    """A landed instance is in none of the places it can be: open or sealed batch, hot tier."""


@dataclass(eq=False)
class _Entry:
    """One landed file and its catalog row, or no row if it failed to parse (ingest
    quarantines it; the overlay leaves it out and never parses it again).

    The row is a tuple in schema order while its batch is open (it changes often); once
    the batch is sealed it is only a reference into the batch's table (``ref``), so a
    backlog of sealed batches costs one Arrow copy of each row, not two.
    """

    ident: _Ident
    row: tuple[Any, ...] | None
    ref: tuple[pa.Table, int] | None = None

    @property
    def held(self) -> bool:
        return self.row is not None or self.ref is not None

    def values(self) -> tuple[Any, ...] | None:
        """The row as a tuple in schema order (None: no row)."""
        if self.row is not None or self.ref is None:
            return self.row
        table, index = self.ref
        return tuple(table.slice(index, 1).to_pylist()[0].values())


@dataclass(eq=False)  # hashed by identity
class _Batch:
    """What the overlay knows of one batch folder."""

    folder: str  # open | sealed
    batch_id: str
    path: Path
    mtime_ns: int = -1  # when last listed; -1: never
    settled: bool = False  # listed long enough after its last change to trust the mtime
    files: dict[str, _Entry] = field(default_factory=dict)  # file name -> entry
    held: int = 0  # entries with a row
    left_out: int = 0  # committed files not held, for the bound
    facts: dict[str, ReceiveFacts] = field(default_factory=dict)  # read, not yet used
    receipts_at: int = 0  # bytes of receipts.jsonl read
    table: pa.Table | None = None  # the rows as a table; None: to build

    def add(self, name: str, entry: _Entry) -> None:
        if name in self.files:
            self.remove(name)
        self.files[name] = entry
        self.held += entry.held
        self.table = None

    def remove(self, name: str) -> _Entry:
        entry = self.files.pop(name)
        self.held -= entry.held
        self.table = None
        return entry


@dataclass(frozen=True)
class _Candidate:
    batch: _Batch
    name: str
    ident: _Ident

    @property
    def order(self) -> tuple[int, str, int, str]:
        return (_FOLDERS.index(self.batch.folder), self.batch.batch_id, self.ident[3], self.name)


class LandedIndex:
    """The landed-but-not-indexed instances of a landing zone, as catalog rows.

    Thread-safe. :meth:`refresh` brings the overlay up to date (cheap when nothing
    changed: one ``stat`` of ``open/``, ``sealed/`` and each batch folder); :meth:`rows`
    is the current overlay, an immutable snapshot, and :attr:`version` changes whenever
    the rows do.

    Each row has exactly the columns of the ``instances`` table, as ingest will index
    them (same function), except: ``tier`` is ``"landing"``, ``storage_key`` is the
    file's path relative to the landing zone (``open/<batch>/<file>`` or
    ``sealed/<batch>/<file>``), ``indexed_at`` is NULL and ``batch_id`` is the landing
    batch it is in. A file that fails to parse is left out (ingest quarantines it). At
    most `max_instances` rows are held: past it, files of sealed batches then open
    batches, oldest first, are taken, the rest wait (a warning is logged) until ingest
    makes room.

    Parameters
    ----------
    landing_dir
        The landing zone (``Settings.landing_dir``).
    max_instances
        The most rows held (``Settings.landed_overlay_max_instances``).
    """

    def __init__(
        self, landing_dir: Path, max_instances: int, max_file_bytes: int = 64 * 1024**2
    ) -> None:
        if max_instances < 0:
            raise ValueError(f"max_instances must be >= 0, not {max_instances}")
        self.landing_dir = Path(landing_dir)
        self.max_instances = max_instances
        # Every reading process parses a landed file whole (as ingest does): a larger one
        # waits for ingest rather than cost each process its size in memory.
        self.max_file_bytes = max_file_bytes
        self.parses = 0  # files parsed so far (each landed file once)
        self._dirs = {f: self.landing_dir / f for f in _FOLDERS}
        self._lock = threading.Lock()
        self._tops: dict[str, tuple[int | None, bool]] = {}  # folder -> (mtime_ns, settled)
        self._batches: dict[tuple[str, str], _Batch] = {}  # (folder, batch_id) -> batch
        self._by_ident: dict[_Ident, _Entry] = {}
        self._over = False
        self._missed = False  # a folder or file went away while listed: list again
        self._snapshot: tuple[int, pa.Table] = (0, INSTANCE_SCHEMA.empty_table())

    @property
    def version(self) -> int:
        """Changes (grows) whenever :meth:`rows` changes."""
        return self._snapshot[0]

    def rows(self) -> pa.Table:
        """The current overlay: an immutable table with the ``instances`` schema."""
        return self._snapshot[1]

    def snapshot(self) -> tuple[int, pa.Table]:
        """:attr:`version` and :meth:`rows` taken together (consistent with each other)."""
        return self._snapshot

    def refresh(self) -> bool:
        """Bring the overlay up to date with the landing zone; True if the rows changed.

        Never raises for one file (a file that fails to parse is left out); an
        ``OSError`` reading the landing zone's folders themselves propagates.
        """
        with self._lock:
            started = time.time_ns()
            if not self._update(started):
                return False
            tables = [self._table(b) for b in self._ordered() if b.files]
            table = pa.concat_tables(tables) if tables else INSTANCE_SCHEMA.empty_table()
            self._snapshot = (self._snapshot[0] + 1, table)
            return True

    def _ordered(self) -> list[_Batch]:
        return sorted(self._batches.values(), key=lambda b: (_FOLDERS.index(b.folder), b.batch_id))

    def _update(self, now_ns: int) -> bool:
        """List what changed and parse new files; True if the rows changed."""
        gone: dict[_Ident, _Entry] = {}
        changed = False
        # Again (at most twice) if a batch folder or a file went away while it was being
        # listed or parsed: renamed into sealed/ (or removed), it is found there at once.
        for _ in range(3):
            candidates: dict[tuple[int, str], _Candidate] = {}  # (id(batch), name) -> it
            self._missed = False
            for folder in _LISTING:
                changed |= self._list_folder(folder, now_ns, gone)
            room = any(b.left_out for b in self._batches.values()) and (
                self._held() < self.max_instances
            )
            for batch in list(self._batches.values()):
                try:
                    mtime = batch.path.stat().st_mtime_ns
                except FileNotFoundError:
                    mtime = -1
                if mtime == batch.mtime_ns and batch.settled and not (batch.left_out and room):
                    continue
                try:
                    if mtime == -1:
                        raise FileNotFoundError(batch.path)
                    changed |= self._list_batch(batch, mtime, now_ns, gone, candidates)
                except (FileNotFoundError, NotADirectoryError):
                    changed |= self._drop(batch, gone)  # removed or renamed since listed
                    self._missed = True
            if candidates:
                changed |= self._admit(list(candidates.values()), gone)
            if not self._missed:
                break
            self._tops.clear()  # list the folders again: where did it go?
        for ident, entry in gone.items():
            if self._by_ident.get(ident) is entry:
                del self._by_ident[ident]
        self._warn_if_full()
        return changed

    def _warn_if_full(self) -> None:
        left_out = sum(b.left_out for b in self._batches.values())
        if left_out and not self._over:
            log.warning(
                "landed overlay full: %d instances held (landed_overlay_max_instances), "
                "%d more become queryable once ingested",
                self._held(),
                left_out,
            )
        elif self._over and not left_out:
            log.info("landed overlay holds every landed instance again")
        self._over = bool(left_out)

    def _held(self) -> int:
        return sum(b.held for b in self._batches.values())

    def _list_folder(self, folder: str, now_ns: int, gone: dict[_Ident, _Entry]) -> bool:
        """Re-list ``open/`` or ``sealed/`` if it changed; True if a batch went away."""
        path = self._dirs[folder]
        try:
            mtime: int | None = path.stat().st_mtime_ns
        except FileNotFoundError:
            mtime = None
        known = self._tops.get(folder)
        if known is not None and known[0] == mtime and known[1]:
            return False
        names: set[str] = set()
        if mtime is not None:
            with os.scandir(path) as items:
                for item in items:
                    try:
                        names.add(require_batch_id(item.name))
                    except InvalidBatchIdError:
                        continue  # a .tmp- folder: a batch being made or split
        self._tops[folder] = (mtime, mtime is not None and now_ns - mtime > _SETTLE_NS)
        removed = False
        for key, batch in list(self._batches.items()):
            if key[0] == folder and key[1] not in names:
                removed |= self._drop(batch, gone)
        for name in names:
            if (folder, name) not in self._batches:
                self._batches[(folder, name)] = _Batch(folder, name, path / name)
        return removed

    def _drop(self, batch: _Batch, gone: dict[_Ident, _Entry]) -> bool:
        """Forget a batch that went away; True if it held rows."""
        for entry in batch.files.values():
            gone[entry.ident] = entry
        self._batches.pop((batch.folder, batch.batch_id), None)
        return batch.held > 0

    def _list_batch(
        self,
        batch: _Batch,
        mtime: int,
        now_ns: int,
        gone: dict[_Ident, _Entry],
        candidates: dict[tuple[int, str], _Candidate],
    ) -> bool:
        """Re-list one batch folder: forget the files gone (into `gone`) and add the new
        ones to `candidates`; True if a row went. Raises FileNotFoundError if the folder
        itself is gone."""
        with os.scandir(batch.path) as entries:
            names = {e.name for e in entries if is_landed_file(e.name)}
        batch.mtime_ns = mtime
        batch.settled = now_ns - mtime > _SETTLE_NS
        removed = False
        for name in set(batch.files) - names:
            entry = batch.remove(name)
            gone[entry.ident] = entry
            removed |= entry.held
        batch.left_out = 0
        for name in sorted(names - set(batch.files)):
            try:
                st = (batch.path / name).stat()
            except FileNotFoundError:
                self._missed = True  # moved meanwhile: found where it went
                continue
            ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            candidates[(id(batch), name)] = _Candidate(batch, name, ident)
        return removed

    def _admit(self, candidates: list[_Candidate], gone: dict[_Ident, _Entry]) -> bool:
        """Take the new files up to the bound, moved files first (they were held already,
        and are not parsed again); True if a row was added."""
        live = {id(b) for b in self._batches.values()}
        candidates = [c for c in candidates if id(c.batch) in live]
        held = self._held()
        added = False
        fresh: list[_Candidate] = []
        for cand in candidates:
            known = self._by_ident.get(cand.ident) or gone.get(cand.ident)
            if known is None:
                fresh.append(cand)
                continue
            entry = _Entry(cand.ident, _moved(known.values(), cand.batch, cand.name))
            cand.batch.add(cand.name, entry)
            self._by_ident[cand.ident] = entry
            gone.pop(cand.ident, None)
            held += entry.held
            added |= entry.held
        for cand in sorted(fresh, key=lambda c: c.order):
            if held >= self.max_instances:
                cand.batch.left_out += 1
                continue
            parsed = self._parse(cand)
            if parsed is None:
                continue
            cand.batch.add(cand.name, parsed)
            self._by_ident[cand.ident] = parsed
            held += parsed.held
            added |= parsed.held
        return added

    def _parse(self, cand: _Candidate) -> _Entry | None:
        """Parse one new file into its entry; None if it vanished meanwhile."""
        batch = cand.batch
        path = batch.path / cand.name
        facts = self._facts(batch, cand.name)
        item = LandedInstance(path, landed_uid(cand.name), facts)
        if cand.ident[2] > self.max_file_bytes:
            log.info(
                "landed file %s of batch %s (%d bytes) left to ingest: over the overlay's %d",
                cand.name, batch.batch_id, cand.ident[2], self.max_file_bytes,
            )  # fmt: skip
            return _Entry(cand.ident, None)
        try:
            with path.open("rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            self._missed = True  # sealed or ingested meanwhile: found where it went
            return None
        except OSError as exc:
            log.warning("landed file %s of batch %s unreadable: %s", cand.name, batch.batch_id, exc)
            return _Entry(cand.ident, None)
        self.parses += 1
        try:
            row = instance_row(item, data, batch.batch_id, datetime.now(UTC))
        # Deliberately broad, as ingest: whatever one file makes the parser raise leaves
        # that file out of the overlay (ingest quarantines it), never the others.
        except Exception as exc:
            log.info(
                "landed file %s of batch %s left out of the overlay: %s",
                cand.name,
                batch.batch_id,
                type(exc).__name__,
            )
            return _Entry(cand.ident, None)
        row.update(
            tier=LANDING_TIER,
            storage_key=f"{batch.folder}/{batch.batch_id}/{cand.name}",
            indexed_at=None,
            batch_id=batch.batch_id,
        )
        return _Entry(cand.ident, tuple(row[c] for c in _COLUMNS))

    @staticmethod
    def _facts(batch: _Batch, name: str) -> ReceiveFacts | None:
        """The receive facts of `name`, reading the batch's receipts on from where it
        stopped (an open batch's receipt line is written before its file is renamed in)."""
        if name not in batch.facts:
            more, batch.receipts_at = read_receipts(
                batch.path / RECEIPTS,
                batch.receipts_at,
                whole_lines_only=batch.folder == "open",
            )
            batch.facts.update(more)
        return batch.facts.pop(name, None)

    @staticmethod
    def _table(batch: _Batch) -> pa.Table:
        """The batch's rows as a table (built again only after a change)."""
        if batch.table is None:
            held = [e for e in batch.files.values() if e.held]
            # Rows already in a table are taken from it; only new ones are converted.
            by_table: dict[int, tuple[pa.Table, list[_Entry]]] = {}
            fresh: list[_Entry] = []
            for entry in held:
                if entry.ref is None:
                    fresh.append(entry)
                else:
                    by_table.setdefault(id(entry.ref[0]), (entry.ref[0], []))[1].append(entry)
            parts = [
                source.take([e.ref[1] for e in entries if e.ref is not None])
                for source, entries in by_table.values()
            ]
            if fresh or not parts:
                parts.append(_from_rows([e.row for e in fresh if e.row is not None]))
            table = pa.concat_tables(parts).combine_chunks() if len(parts) > 1 else parts[0]
            if batch.folder == "sealed":  # no more files: keep the Arrow copy only
                ordered = [e for _, entries in by_table.values() for e in entries] + fresh
                for i, entry in enumerate(ordered):
                    entry.row, entry.ref = None, (table, i)
            batch.table = table
        return batch.table


def _from_rows(rows: list[tuple[Any, ...]]) -> pa.Table:
    columns = list(zip(*rows, strict=True)) if rows else [()] * len(_COLUMNS)
    return pa.Table.from_arrays(
        [pa.array(c, type=f.type) for c, f in zip(columns, INSTANCE_SCHEMA, strict=True)],
        schema=INSTANCE_SCHEMA,
    )


def _moved(row: tuple[Any, ...] | None, batch: _Batch, name: str) -> tuple[Any, ...] | None:
    """`row` of a file that moved into `batch` (sealed, or split): new key and batch."""
    if row is None:
        return None
    moved = list(row)
    moved[_STORAGE_KEY] = f"{batch.folder}/{batch.batch_id}/{name}"
    moved[_BATCH_ID] = batch.batch_id
    return tuple(moved)


def parse_landed_key(storage_key: str) -> tuple[str, str, str]:
    """Split an overlay row's storage key into (folder, batch id, file name), validated.

    >>> parse_landed_key("open/20260101T000000000000-dimse-12-0/1.2.3~1.dcm")
    ('open', '20260101T000000000000-dimse-12-0', '1.2.3~1.dcm')

    Raises
    ------
    LandedKeyError
        If the key is not ``open|sealed/<batch id>/<uid>[~n].dcm`` (no ``..``, no absolute
        path, nothing but what the landing zone makes).
    """
    pure = PurePosixPath(storage_key) if isinstance(storage_key, str) else None
    parts = pure.parts if pure is not None and str(pure) == storage_key else ()
    if (
        len(parts) != 3
        or parts[0] not in _FOLDERS
        or not _LANDED_NAME.fullmatch(parts[2])
        or len(parts[2]) > 80
    ):
        raise LandedKeyError(f"not a landed storage key: {str(storage_key)[:120]!r}")
    try:
        require_batch_id(parts[1])
    except InvalidBatchIdError as exc:
        raise LandedKeyError(f"not a landed storage key: {storage_key[:120]!r}") from exc
    return parts[0], parts[1], parts[2]


def open_landed(
    landing_dir: Path,
    hot: Storage | Path,
    storage_key: str,
    checksum: str,
    study_uid: str,
    series_uid: str,
    sop_uid: str,
) -> BinaryIO:
    """Open the bytes of an overlay row, wherever its file is now.

    Tried in order: ``open/<batch>/<file>`` (where the row saw it), ``sealed/<batch>/<file>``,
    the hot-tier key ingest gives it (``<study>/<series>/<sop>.<sha256[:16]>.dcm``: it
    was ingested meanwhile), then the same file name in any other sealed batch whose
    SHA-256 is `checksum` (sealing gives a batch a new id, and a split moves files), and
    the hot tier once more. A landed file never changes once committed, so the stream is
    the instance as acknowledged.

    Parameters
    ----------
    landing_dir
        The landing zone.
    hot
        The hot tier: a :class:`~vannah_pipelines.storage.base.Storage`, or the root
        folder of a local one.
    storage_key, checksum, study_uid, series_uid, sop_uid
        The row's ``storage_key``, ``checksum`` and UIDs (from outside: validated).

    Raises
    ------
    LandedKeyError
        If `storage_key` is not a landed key of `sop_uid`, or `checksum` not a SHA-256.
    UnsafeUidError
        If a UID is not a UID.
    LandedNotFoundError
        If the instance is in none of those places (ingested and moved on, or gone).
    """
    folder, batch_id, name = parse_landed_key(storage_key)
    if landed_uid(name) != sop_uid:
        raise LandedKeyError(f"storage key {storage_key[:120]!r} is not of SOP {sop_uid[:80]!r}")
    if not re.fullmatch(r"[0-9a-f]{64}", checksum or ""):
        raise LandedKeyError(f"not a SHA-256 checksum: {str(checksum)[:80]!r}")
    hot_key = instance_key(study_uid, series_uid, sop_uid, checksum)
    store = LocalStorage(hot, Tier.HOT) if isinstance(hot, Path) else hot
    root = Path(landing_dir)
    for place in ("open", "sealed") if folder == "open" else ("sealed",):
        try:
            return (root / place / batch_id / name).open("rb")
        except FileNotFoundError:
            continue
    try:
        return store.open(hot_key)
    except NotFoundError:
        pass
    sealed = root / "sealed"
    try:
        with os.scandir(sealed) as entries:
            others = sorted(e.name for e in entries)
    except FileNotFoundError:
        others = []
    for other in others:
        if other == batch_id:
            continue
        candidate = sealed / other / name
        try:
            handle = candidate.open("rb")
        except (FileNotFoundError, NotADirectoryError):
            continue
        if _sha256(handle) == checksum:
            handle.seek(0)
            return handle
        handle.close()
    try:
        return store.open(hot_key)
    except NotFoundError as exc:
        raise LandedNotFoundError(
            f"landed instance {sop_uid} ({storage_key}) is neither landed nor in the hot tier"
        ) from exc


def _sha256(handle: BinaryIO) -> str:
    digest = hashlib.sha256()
    while chunk := handle.read(_HASH_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()
