"""The worklist table: append-only Parquet event files under ``<catalog>/worklist/events/``.

::

    catalog/worklist/
      .writer.lock               writers hold an flock while they read-check-append
      events/000000000001.parquet  one file per change, written atomically (temp, fsync, rename)

Every event row carries the step's whole new state (item as DICOM JSON + status), so the
current worklist is the last row per ``step_id`` in file-name order. Readers never lock:
they list the folder, read the files they have not seen and fold them. A file is either
absent or whole, so a reader never sees a half-written change.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from vannah_pipelines.landing.layout import write_atomic
from vannah_pipelines.worklist.errors import StepExistsError, StepNotFoundError
from vannah_pipelines.worklist.model import StepStatus, WorklistItem, item_from_json

EVENTS = "events"
_LOCK = ".writer.lock"
_EVENT_FILE = re.compile(r"([0-9]{12})\.parquet")

EVENT_SCHEMA = pa.schema(
    [
        pa.field("seq", pa.int64(), nullable=False),
        pa.field("step_id", pa.string(), nullable=False),
        pa.field("action", pa.string(), nullable=False),  # create|update|status
        pa.field("status", pa.string(), nullable=False),
        pa.field("recorded_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("source", pa.string(), nullable=False),  # rest|hl7|import|...
        pa.field("item_json", pa.string(), nullable=False),  # DICOM JSON (PS3.18 F.2)
    ]
)


@dataclass(frozen=True)
class StepChange:
    """One step as an event file recorded it (:meth:`WorklistStore.changes_after`)."""

    seq: int
    action: str  # create|update|status
    source: str
    item: WorklistItem


class WorklistStore:
    """Read the current worklist and append changes; safe across processes and threads."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.events_dir = self.root / EVENTS
        self._lock = threading.Lock()
        self._seen: dict[str, list[tuple[int, str, str, str]]] = {}
        self._state: dict[str, WorklistItem] = {}

    # -- reading -----------------------------------------------------------------------
    def _event_files(self) -> list[str]:
        try:
            names = [p.name for p in self.events_dir.iterdir()]
        except FileNotFoundError:
            return []
        return sorted(n for n in names if _EVENT_FILE.fullmatch(n))

    def refresh(self) -> None:
        """Read event files written since the last call and recompute the current state."""
        with self._lock:
            new = [n for n in self._event_files() if n not in self._seen]
            if not new:
                return
            for name in new:
                table = pq.read_table(
                    self.events_dir / name, columns=["seq", "step_id", "status", "item_json"]
                )
                self._seen[name] = list(
                    zip(
                        table.column("seq").to_pylist(),
                        table.column("step_id").to_pylist(),
                        table.column("status").to_pylist(),
                        table.column("item_json").to_pylist(),
                        strict=True,
                    )
                )
            latest: dict[str, tuple[int, str, str]] = {}
            for name in sorted(self._seen):
                for seq, step_id, status, text in self._seen[name]:
                    latest[step_id] = (seq, status, text)
            state = {}
            for step_id, (_seq, status, text) in latest.items():
                old = self._state.get(step_id)
                if old is not None and old.status == status and old.to_json() == text:
                    state[step_id] = old
                else:
                    state[step_id] = item_from_json(step_id, status, text)
            self._state = state

    def items(self) -> list[WorklistItem]:
        """Every stored step in its latest state, closed ones included, by step id."""
        self.refresh()
        return [self._state[k] for k in sorted(self._state)]

    def visible_items(self, now: datetime, past_due_hours: float) -> list[WorklistItem]:
        """The steps C-FIND may return (:meth:`WorklistItem.visible`)."""
        return [i for i in self.items() if i.visible(now, past_due_hours)]

    def get(self, step_id: str) -> WorklistItem:
        """The step `step_id`.

        Raises
        ------
        StepNotFoundError
            If no step has that id.
        """
        self.refresh()
        try:
            return self._state[step_id]
        except KeyError:
            raise StepNotFoundError(f"no scheduled procedure step {step_id!r}") from None

    def last_seq(self) -> int:
        """The sequence number of the newest event file (0: none yet)."""
        names = self._event_files()
        return int(names[-1][:12]) if names else 0

    def changes_after(self, seq: int, through: int | None = None) -> list[StepChange]:
        """Every step change recorded in event files after `seq` (up to `through`), in
        order: what a follower with `seq` as its cursor has not seen yet."""
        found: list[StepChange] = []
        for name in self._event_files():
            number = int(name[:12])
            if number <= seq or (through is not None and number > through):
                continue
            table = pq.read_table(self.events_dir / name).to_pylist()
            found.extend(
                StepChange(
                    number,
                    row["action"],
                    row["source"],
                    item_from_json(row["step_id"], row["status"], row["item_json"]),
                )
                for row in table
            )
        return found

    # -- writing -----------------------------------------------------------------------
    @contextlib.contextmanager
    def _writer(self) -> Iterator[None]:
        self.events_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / _LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self.refresh()
            yield
        finally:
            os.close(fd)

    def _append(self, items: list[tuple[WorklistItem, str]], source: str) -> None:
        names = self._event_files()
        seq = int(names[-1][:12]) + 1 if names else 1
        now = datetime.now(UTC)
        table = pa.Table.from_pylist(
            [
                {
                    "seq": seq,
                    "step_id": item.step_id,
                    "action": action,
                    "status": item.status.value,
                    "recorded_at": now,
                    "source": source,
                    "item_json": item.to_json(),
                }
                for item, action in items
            ],
            schema=EVENT_SCHEMA,
        )
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        write_atomic(self.events_dir / f"{seq:012d}.parquet", buf.getvalue())
        self.refresh()

    def create(self, item: WorklistItem, source: str) -> WorklistItem:
        """Store a new step.

        Raises
        ------
        StepExistsError
            If `item.step_id` is stored already (use :meth:`update`).
        """
        with self._writer():
            if item.step_id in self._state:
                raise StepExistsError(f"scheduled procedure step {item.step_id!r} exists")
            self._append([(item, "create")], source)
        return item

    def update(self, item: WorklistItem, source: str) -> WorklistItem:
        """Replace a stored step.

        Raises
        ------
        StepNotFoundError
            If no step has `item.step_id`.
        """
        with self._writer():
            if item.step_id not in self._state:
                raise StepNotFoundError(f"no scheduled procedure step {item.step_id!r}")
            self._append([(item, "update")], source)
        return item

    def upsert(self, items: list[WorklistItem], source: str) -> list[str]:
        """Create or replace `items` in one event file (all or none); returns the actions."""
        with self._writer():
            actions = ["update" if i.step_id in self._state else "create" for i in items]
            if items:
                self._append(list(zip(items, actions, strict=True)), source)
        return actions

    def set_status(self, step_id: str, status: StepStatus, source: str) -> WorklistItem:
        """Move a step to `status` (cancel, complete, start...).

        Raises
        ------
        StepNotFoundError
            If no step has `step_id`.
        """
        with self._writer():
            current = self._state.get(step_id)
            if current is None:
                raise StepNotFoundError(f"no scheduled procedure step {step_id!r}")
            item = current.with_status(status)
            self._append([(item, "status")], source)
        return item
