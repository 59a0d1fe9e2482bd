"""Landing-zone layout, atomic writes and batches.

::

    landing/
      open/<batch_id>/       being written; its writer holds an flock on .lock
        <sop_uid>.dcm        Part-10 bytes exactly as received (the rename is the commit)
        receipts.jsonl       one line of receive facts per instance
      sealed/<batch_id>/     immutable; ingest deletes it after indexing

A writer that dies leaves its open batch unlocked; :meth:`LandingZone.seal_stranded` seals
such batches so they are ingested, never stranded.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime
from functools import partial
from pathlib import Path

from vannah_pipelines.dicom.uids import require_uid
from vannah_pipelines.errors import LandingError, VannahError

log = logging.getLogger(__name__)

_BATCH_ID = re.compile(r"[0-9]{8}T[0-9]{12}-[a-z]+-[0-9]+-[0-9]+")
_LOCK = ".lock"
RECEIPTS = "receipts.jsonl"  # one line of receive facts per instance
_TMP_PREFIX = ".tmp-"
_VERSION_SEP = "~"  # <sop_uid>~<n>.dcm: the n-th re-send of a UID within one batch
_counter = itertools.count()


class InvalidBatchIdError(VannahError):
    """A batch id from outside (run config, a folder name) is not one we make."""


def require_batch_id(value: object) -> str:
    """Return `value` if it is a well-formed batch id, safe as a path component.

    >>> require_batch_id("20260101T000000000000-dimse-12-0")
    '20260101T000000000000-dimse-12-0'
    """
    if not isinstance(value, str) or not _BATCH_ID.fullmatch(value):
        raise InvalidBatchIdError(f"not a landing batch id: {str(value)[:80]!r}")
    return value


def new_batch_id(source: str, now: datetime | None = None) -> str:
    """Return a new, time-ordered, unique batch id for `source` (dimse, stow, import)."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%S%f")
    return f"{stamp}-{source}-{os.getpid()}-{next(_counter)}"


def batch_day(batch_id: str) -> date:
    """The UTC arrival day of a batch (its Dagster partition)."""
    return datetime.strptime(batch_id[:8], "%Y%m%d").date()


def batch_time(batch_id: str) -> datetime:
    """When a batch was sealed (UTC), from its id.

    >>> batch_time("20260101T120000000001-dimse-12-0").isoformat()
    '2026-01-01T12:00:00.000001+00:00'
    """
    return datetime.strptime(batch_id[:21], "%Y%m%dT%H%M%S%f").replace(tzinfo=UTC)


def batch_source(batch_id: str) -> str:
    """The source part of a batch id (dimse, stow, import, split).

    >>> batch_source("20260101T120000000001-stow-12-0")
    'stow'
    """
    return batch_id.split("-")[1]


def fsync_dir(path: Path) -> None:
    """Make renames and creations inside `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: Path) -> None:
    """Create `path` and its missing parents durably: the parent folder of every new
    folder is fsynced, so a new entry survives a power cut once this returns."""
    missing: list[Path] = []
    current = path
    while not current.is_dir():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):  # made meanwhile: sync it all the same
            folder.mkdir()
        fsync_dir(folder.parent)


Buffer = bytes | bytearray | memoryview


def write_atomic(path: Path, data: Buffer | Iterable[Buffer], *, sync_dir: bool = True) -> None:
    """Write `data` to `path` so that a reader sees all of it or nothing.

    Temp file in the same folder, ``fsync``, ``os.replace``, then ``fsync`` of the folder.
    `data` may be one buffer or buffers written back to back (a header and a body need not
    be concatenated first; a generator streams a file of any size). On failure, an error
    raised by the generator included, the temp file is removed and the error propagates.
    """
    parts = (data,) if isinstance(data, (bytes, bytearray, memoryview)) else data
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}.{os.getpid()}.{threading.get_ident()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for part in parts:
                view = memoryview(part).cast("B")
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if sync_dir:
        fsync_dir(path.parent)


class DirectorySync:
    """Group commit of a folder's ``fsync``: one sync covers every rename made before it
    started, so concurrent writers into one folder share syncs instead of queueing.

    :meth:`sync` returns only once an ``fsync`` of the folder that began after the call
    has completed, exactly as if the caller had synced the folder itself.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._cond = threading.Condition()
        self._requested = 0  # tickets handed out
        self._synced = 0  # every ticket up to this one is durable
        self._running = False

    def sync(self) -> None:
        with self._cond:
            self._requested += 1
            ticket = self._requested
            while self._synced < ticket:
                if self._running:
                    self._cond.wait()
                    continue
                self._running = True
                covered = self._requested  # their renames happened before this sync starts
                self._cond.release()
                try:
                    fsync_dir(self.path)
                finally:
                    self._cond.acquire()
                    self._running = False
                    self._cond.notify_all()
                # Reached only if the fsync succeeded (an error propagates to this caller;
                # the waiters it would have covered retry with a sync of their own).
                self._synced = max(self._synced, covered)


@dataclass(frozen=True)
class ReceiveFacts:
    """What the archive knows about how an instance arrived (no patient data)."""

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    source: str  # dimse | stow | import
    calling_ae: str = ""
    called_ae: str = ""
    peer: str = ""
    received_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())


@dataclass(frozen=True)
class LandedInstance:
    """One committed file of a sealed batch, with its receive facts when they were recorded."""

    path: Path
    sop_instance_uid: str
    facts: ReceiveFacts | None


@dataclass(frozen=True)
class Batch:
    """A sealed batch: immutable, ready to ingest."""

    batch_id: str
    path: Path

    @property
    def day(self) -> date:
        return batch_day(self.batch_id)

    def instances(self) -> list[LandedInstance]:
        """The committed instances, sorted by file name; temp files are ignored."""
        facts, _ = read_receipts(self.path / RECEIPTS)
        found = []
        for entry in sorted(self.path.iterdir()):
            if is_landed_file(entry.name):
                found.append(LandedInstance(entry, landed_uid(entry.name), facts.get(entry.name)))
        return found


def is_landed_file(name: str) -> bool:
    """Whether `name` is a committed instance file of a batch folder (not a temp file).

    >>> is_landed_file("1.2.3.dcm"), is_landed_file("1.2.3~1.dcm"), is_landed_file(".tmp-1.dcm.9")
    (True, True, False)
    """
    return name.endswith(".dcm") and not name.startswith(_TMP_PREFIX)


def landed_uid(name: str) -> str:
    """The SOP Instance UID a landed file was sent as, from its name (not validated).

    >>> landed_uid("1.2.3.dcm"), landed_uid("1.2.3~2.dcm")
    ('1.2.3', '1.2.3')
    """
    return name.removesuffix(".dcm").split(_VERSION_SEP)[0]


def read_receipts(
    path: Path, start: int = 0, *, whole_lines_only: bool = False
) -> tuple[dict[str, ReceiveFacts], int]:
    """The receive facts in a batch's ``receipts.jsonl`` from byte `start`, by file name.

    A torn line (a crash mid-write) is skipped: its file still counts, without facts.
    Returns the facts and the offset up to which the file was read. With
    `whole_lines_only` a last line without its newline is left unread, for a reader that
    follows a batch still being written and comes back from that offset.
    """
    try:
        with path.open("rb") as handle:
            handle.seek(start)
            data = handle.read()
    except FileNotFoundError:
        return {}, start
    if whole_lines_only:
        data = data[: data.rfind(b"\n") + 1]
    facts: dict[str, ReceiveFacts] = {}
    for line in data.splitlines():
        try:
            fields = json.loads(line.decode("utf-8"))
            name = fields.pop("file", None)
            record = ReceiveFacts(**fields)
        except (ValueError, TypeError, AttributeError):
            continue  # a torn last line after a crash; the file itself still counts
        facts[name or f"{record.sop_instance_uid}.dcm"] = record
    return facts, start + len(data)


class OpenBatch:
    """A batch being written by one process; thread-safe."""

    def __init__(self, zone: LandingZone, batch_id: str, path: Path, lock_fd: int) -> None:
        self.zone = zone
        self.batch_id = batch_id
        self.path = path
        self._lock_fd = lock_fd
        self._mutex = threading.Lock()
        self._idle = threading.Condition(self._mutex)  # no write in flight
        self._writing = 0
        self._dir_sync = DirectorySync(path)
        self._receipts = (path / RECEIPTS).open("a", encoding="utf-8")
        self.count = 0
        self._versions: dict[str, int] = {}
        self.created = time.monotonic()
        self.sealed = False

    def write_instance(self, data: Buffer | Sequence[Buffer], facts: ReceiveFacts) -> Path:
        """Commit one instance; returns only once it is durable.

        `data` is the Part-10 file, as one buffer or as parts written back to back.
        Concurrent calls write in parallel (the file ``fsync`` is per file, the folder
        ``fsync`` is shared by writers that overlap); :meth:`seal` waits for them.

        Raises
        ------
        UnsafeUidError
            If the SOP Instance UID cannot be a file name (nothing is written).
        LandingError
            If the batch was sealed meanwhile (the caller retries on a new batch).
        OSError
            If the disk refuses the write (nothing is left behind).
        """
        sop_uid = require_uid(facts.sop_instance_uid, "SOPInstanceUID")
        with self._mutex:
            if self.sealed:
                raise LandingError(f"batch {self.batch_id} is sealed")
            # A re-send within one batch gets its own file: every acknowledged version
            # reaches ingest, which keeps the latest valid one current.
            seen = self._versions.get(sop_uid, 0)
            self._versions[sop_uid] = seen + 1
            name = f"{sop_uid}.dcm" if seen == 0 else f"{sop_uid}{_VERSION_SEP}{seen}.dcm"
            target = self.path / name
            self._receipts.write(json.dumps({**asdict(facts), "file": name}) + "\n")
            self._receipts.flush()
            self._writing += 1
        committed = False
        try:
            write_atomic(target, data, sync_dir=False)
            self._dir_sync.sync()
            committed = True
        finally:
            with self._mutex:
                self._writing -= 1
                if committed:
                    self.count += 1
                self._idle.notify_all()
        return target

    def age(self) -> float:
        return time.monotonic() - self.created

    def seal(self) -> Batch | None:
        """Move the batch to ``sealed/`` (or remove it if empty); idempotent."""
        with self._mutex:
            if self.sealed:
                return None
            self.sealed = True
            while self._writing:
                self._idle.wait()  # writes already admitted finish in this folder
            self._receipts.close()
            try:
                if self.count == 0:
                    shutil.rmtree(self.path, ignore_errors=True)
                    return None
                (self.path / _LOCK).unlink(missing_ok=True)
                return self.zone.move_to_sealed(self.path)
            finally:
                os.close(self._lock_fd)


class LandingZone:
    """The landing-zone folder: opens batches for writers, lists sealed ones for ingest."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.open_dir = self.root / "open"
        self.sealed_dir = self.root / "sealed"

    def ensure(self) -> LandingZone:
        make_dirs(self.open_dir)
        make_dirs(self.sealed_dir)
        return self

    def open_batch(self, source: str) -> OpenBatch:
        """Create a new open batch, locked by this process until sealed or dead."""
        self.ensure()
        batch_id = new_batch_id(source)
        tmp, lock_fd = self._locked_tmp_folder(batch_id)
        try:
            final = self.open_dir / batch_id
            tmp.rename(final)  # visible only once locked, so never mistaken for stranded
            fsync_dir(self.open_dir)
        except BaseException:
            os.close(lock_fd)
            raise
        return OpenBatch(self, batch_id, final, lock_fd)

    def _locked_tmp_folder(self, batch_id: str) -> tuple[Path, int]:
        """Make ``open/.tmp-<batch_id>/`` durably and lock it; returns it and the lock's fd
        (the caller closes it). A ``.tmp-`` folder is never taken for a stranded batch
        while its lock is held."""
        tmp = self.open_dir / f"{_TMP_PREFIX}{batch_id}"
        tmp.mkdir()
        fsync_dir(self.open_dir)
        lock_fd = os.open(tmp / _LOCK, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            os.close(lock_fd)
            raise
        return tmp, lock_fd

    def move_to_sealed(self, path: Path, batch_id: str | None = None) -> Batch:
        """Rename a batch folder into ``sealed/`` under `batch_id` (default: a fresh id of
        the same source), durably."""
        if batch_id is None:
            name = path.name.removeprefix(_TMP_PREFIX)
            source = batch_source(name) if _BATCH_ID.fullmatch(name) else "import"
            batch_id = new_batch_id(source)
        target = self.sealed_dir / require_batch_id(batch_id)
        path.rename(target)
        fsync_dir(self.sealed_dir)
        fsync_dir(path.parent)
        return Batch(batch_id, target)

    def sealed_batches(self) -> list[Batch]:
        """Sealed batches not yet ingested, oldest first."""
        if not self.sealed_dir.exists():
            return []
        return [
            Batch(p.name, p)
            for p in sorted(self.sealed_dir.iterdir())
            if p.is_dir() and _BATCH_ID.fullmatch(p.name)
        ]

    def batch(self, batch_id: str) -> Batch:
        """The sealed batch `batch_id` (validated: it comes from run config)."""
        return Batch(require_batch_id(batch_id), self.sealed_dir / batch_id)

    def seal_stranded(self) -> list[Batch]:
        """Seal open batches whose writer died (their lock is free); returns them.

        A ``.tmp-<batch>`` folder (its writer died between ``mkdir`` and the rename, or a
        split died half-way) is sealed too when it holds committed files: they were
        acknowledged. Only uncommitted ``.tmp-`` files inside a batch are dropped.
        """
        sealed: list[Batch] = []
        if not self.open_dir.exists():
            return sealed
        for path in sorted(self.open_dir.iterdir()):
            if not path.is_dir():
                continue
            # A live writer puts no file in a .tmp- folder before its rename: only one with
            # committed files can be stranded (checked before the lock, so a writer between
            # mkdir and flock is never disturbed).
            if path.name.startswith(_TMP_PREFIX) and not _committed_files(path):
                if _age_seconds(path) > _EMPTY_TMP_MAX_AGE:
                    shutil.rmtree(path, ignore_errors=True)
                continue
            if _is_locked(path / _LOCK):
                continue
            for leftover in path.glob(f"{_TMP_PREFIX}*"):
                leftover.unlink(missing_ok=True)  # a write the dead writer never committed
            if not _committed_files(path):
                shutil.rmtree(path, ignore_errors=True)
                continue
            (path / _LOCK).unlink(missing_ok=True)
            batch = self.move_to_sealed(path)
            log.warning("sealed stranded batch %s as %s", path.name, batch.batch_id)
            sealed.append(batch)
        return sealed

    def split(self, batch: Batch, parts: int = 2) -> list[Batch]:
        """Split a sealed batch into `parts` new sealed batches (files moved, receipts
        carried over), so that one bad file cannot hold the others back.

        The new batches keep the original's seal time (so its arrival day and its age in
        the backlog) under the source ``split``. Crash-safe: every file is renamed, so it
        is in exactly one batch at any moment; a half left in ``open/`` by a crash is
        sealed by :meth:`seal_stranded`.

        Raises
        ------
        LandingError
            If the batch holds fewer than two files.
        """
        items = batch.instances()
        if len(items) < 2:
            raise LandingError(f"batch {batch.batch_id} has {len(items)} file(s): cannot split")
        receipts = _receipt_lines(batch.path / RECEIPTS)
        size = -(-len(items) // max(2, parts))
        stamp = batch_time(batch.batch_id)
        self.ensure()
        made: list[Batch] = []
        for start in range(0, len(items), size):
            chunk = items[start : start + size]
            batch_id = new_batch_id("split", stamp)
            tmp, lock_fd = self._locked_tmp_folder(batch_id)
            try:
                lines = [receipts[i.path.name] for i in chunk if i.path.name in receipts]
                write_atomic(tmp / RECEIPTS, "".join(lines).encode("utf-8"))
                for item in chunk:
                    item.path.rename(tmp / item.path.name)
                fsync_dir(tmp)
                fsync_dir(batch.path)
                (tmp / _LOCK).unlink()
                made.append(self.move_to_sealed(tmp, batch_id))
            finally:
                os.close(lock_fd)
        self.remove(batch)
        fsync_dir(self.sealed_dir)
        log.warning("split batch %s into %s", batch.batch_id, ", ".join(b.batch_id for b in made))
        return made

    def remove(self, batch: Batch) -> None:
        """Delete an ingested batch (the last step of ingest)."""
        shutil.rmtree(batch.path, ignore_errors=True)


_EMPTY_TMP_MAX_AGE = 3600.0  # an empty .tmp- batch folder this old has no live writer


def _committed_files(path: Path) -> list[Path]:
    return [p for p in path.iterdir() if is_landed_file(p.name)]


def _age_seconds(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _receipt_lines(path: Path) -> dict[str, str]:
    """Receipt lines (newline-terminated) by the file name they describe; torn lines skipped."""
    lines: dict[str, str] = {}
    if not path.exists():
        return lines
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            fields = json.loads(line)
            name = fields.get("file") or f"{fields['sop_instance_uid']}.dcm"
        except (ValueError, TypeError, KeyError, AttributeError):
            continue
        lines[str(name)] = line + "\n"
    return lines


def _is(expected: OpenBatch, candidate: OpenBatch) -> bool:
    return candidate is expected


def _is_locked(lock_path: Path) -> bool:
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


class RollingBatch:
    """One process's current batch, sealed by size or age so ingest never waits for an
    association to end. Thread-safe; a timer thread seals idle batches."""

    def __init__(self, zone: LandingZone, source: str, max_files: int, max_age: float) -> None:
        self.zone = zone.ensure()
        self.source = source
        self.max_files = max_files
        self.max_age = max_age
        self._mutex = threading.Lock()
        self._current: OpenBatch | None = None
        self._stop = threading.Event()
        self._timer = threading.Thread(target=self._tick, name="landing-seal", daemon=True)
        self._timer.start()

    def write_instance(self, data: Buffer | Sequence[Buffer], facts: ReceiveFacts) -> Path:
        """Commit one instance into the current batch (opening one if needed)."""
        while True:
            batch = self._batch()
            try:
                path = batch.write_instance(data, facts)
            except LandingError:
                continue  # sealed under us by the timer; take the next batch
            if batch.count >= self.max_files:
                self._seal_if(partial(_is, batch))
            return path

    def _batch(self) -> OpenBatch:
        with self._mutex:
            if self._current is None or self._current.sealed:
                self._current = self.zone.open_batch(self.source)
            return self._current

    def _seal_if(self, predicate: Callable[[OpenBatch], bool]) -> None:
        with self._mutex:
            batch = self._current
            if batch is None or not predicate(batch):
                return
            self._current = None
        batch.seal()

    def _tick(self) -> None:
        while not self._stop.wait(min(0.25, self.max_age / 2)):
            try:
                self._seal_if(lambda b: b.count > 0 and b.age() >= self.max_age)
            except OSError:
                log.exception("sealing a landing batch failed; will retry")

    def close(self) -> None:
        """Seal what is open and stop the timer."""
        self._stop.set()
        self._timer.join(timeout=5)
        self._seal_if(lambda b: True)


def iter_files(root: Path) -> Iterator[Path]:
    """Every regular file under `root`, sorted, symlinks not followed."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            yield Path(dirpath) / name
