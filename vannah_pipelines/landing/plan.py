"""Group sealed landing batches into ingest runs (pure; the sensor only translates)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date

from vannah_pipelines.landing.layout import Batch


@dataclass(frozen=True)
class PlannedRun:
    """One ingest run: batches of one arrival day, at most `max_files` files unless a
    single batch is bigger."""

    day: date
    batch_ids: list[str]
    files: int


@dataclass
class IngestPlan:
    runs: list[PlannedRun] = field(default_factory=list)
    still_pending: set[str] = field(default_factory=set)  # requested, not yet ingested


def plan_ingest_runs(sealed: list[Batch], requested: set[str], max_files: int) -> IngestPlan:
    """Plan runs for `sealed` batches not in `requested`.

    `requested` is the previous cursor; batches that are gone (ingested) drop out of it, so
    the cursor never grows beyond the batches waiting in the landing zone.

    >>> from pathlib import Path
    >>> b = [Batch(f"20260101T00000000000{i}-dimse-1-{i}", Path("/nonexistent")) for i in range(3)]
    >>> plan = plan_ingest_runs(b, {b[0].batch_id}, max_files=10)
    >>> [r.batch_ids for r in plan.runs], sorted(plan.still_pending) == [x.batch_id for x in b]
    ([['20260101T000000000001-dimse-1-1', '20260101T000000000002-dimse-1-2']], True)
    """
    present = {b.batch_id for b in sealed}
    plan = IngestPlan(still_pending=requested & present)
    current: list[Batch] = []
    count = 0

    def flush() -> None:
        nonlocal current, count
        if current:
            plan.runs.append(PlannedRun(current[0].day, [b.batch_id for b in current], count))
            plan.still_pending.update(b.batch_id for b in current)
        current, count = [], 0

    for batch in sealed:
        if batch.batch_id in requested:
            continue
        files = _count_files(batch)
        if current and (batch.day != current[0].day or count + files > max_files):
            flush()
        current.append(batch)
        count += files
    flush()
    return plan


def _count_files(batch: Batch) -> int:
    try:
        return sum(1 for p in batch.path.iterdir() if p.suffix == ".dcm")
    except FileNotFoundError:
        return 0
