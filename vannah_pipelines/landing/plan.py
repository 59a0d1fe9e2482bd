"""Decide the ingest runs for sealed landing batches (pure; the sensor only translates).

Every batch the sensor has requested is followed in its cursor until it leaves the landing
zone: the run that holds it, the failed attempts, and when to try again. A failed run's
batches are requested again with exponential backoff, alone; after ``max_attempts``
failures a batch is split into halves (new sealed batches) so that one bad file cannot
hold the others, and a single-file batch that keeps failing is quarantined with a reason.
A run that failed on a full disk is retried once space returns and counts for nothing.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from datetime import date, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from vannah_pipelines.errors import InsufficientSpaceError
from vannah_pipelines.landing.layout import Batch, batch_source, batch_time
from vannah_pipelines.landing.space import require_free_space

RETRY_CAP_SECONDS = 3600.0  # backoff never grows past an hour
LOST_AFTER_SECONDS = 600.0  # a requested run that never appears is requested again
# New batches are held for a run requested and not in the run storage yet for this long
# at most: a run the daemon never created holds its own batches, not every later one.
HOLD_FOR_UNSEEN_SECONDS = 30.0
SPACE_MARGIN_BYTES = 1024**2  # free space (above the reserve) that counts as "returned"
BACKLOG_MAX_AGE_SECONDS = 15 * 60  # landing_backlog_fresh fails past this
_MAX_ERROR = 300


class RunStatus(StrEnum):
    """What became of a requested run, as the sensor sees it."""

    UNKNOWN = "unknown"  # no run with that key (not launched yet, or lost)
    WAITING = "waiting"  # queued, or its worker process still starting
    IN_PROGRESS = "in_progress"  # started, canceling
    SUCCESS = "success"
    FAILED = "failed"  # failed or canceled (a killed worker included)
    DISK_FULL = "disk_full"  # failed because a disk was full or under its reserve


@dataclass(frozen=True)
class RunOutcome:
    status: RunStatus
    error: str = ""  # "<ExceptionType>: message" of a failure


@dataclass(frozen=True)
class RetryPolicy:
    """From Settings: ``ingest_max_attempts`` and ``ingest_retry_base_seconds``."""

    max_attempts: int
    base_seconds: float
    cap_seconds: float = RETRY_CAP_SECONDS

    def backoff(self, attempts: int) -> float:
        """Seconds to wait after the `attempts`-th failure: base, 2 x base, 4 x base ...

        >>> [RetryPolicy(3, 10).backoff(n) for n in (1, 2, 3)]
        [10.0, 20.0, 40.0]
        >>> RetryPolicy(3, 10).backoff(30)
        3600.0
        """
        exponent = min(max(attempts - 1, 0), 32)
        return float(min(self.cap_seconds, self.base_seconds * 2**exponent))


@dataclass(frozen=True)
class BatchState:
    """A requested batch, as the cursor keeps it until the batch leaves the landing zone."""

    run_key: str | None = None  # the run that holds it; None while it waits
    attempts: int = 0  # failed runs (disk-full failures not counted)
    requests: int = 0  # runs requested so far (makes each run key new)
    requested_at: float = 0.0  # epoch seconds
    next_try: float = 0.0  # epoch seconds: not requested again before
    wait_space: bool = False  # its last run failed on a full disk
    error: str = ""  # the last failure


@dataclass(frozen=True)
class PlannedRun:
    """One ingest run: batches of one arrival day, at most `max_files` files unless a
    single batch is bigger. A retried batch, or a half of a split one, runs alone."""

    day: date
    batch_ids: list[str]
    files: int
    run_key: str = ""
    attempt: int = 1
    quarantine_reason: str | None = None  # quarantine the batch whole, unparsed


@dataclass(frozen=True)
class Backlog:
    """Sealed batches not yet indexed: how many, and the age of the oldest."""

    batches: int
    oldest_age_s: float

    @property
    def fresh(self) -> bool:
        """No sealed batch has waited longer than BACKLOG_MAX_AGE_SECONDS."""
        return self.oldest_age_s <= BACKLOG_MAX_AGE_SECONDS

    def describe(self) -> str:
        if not self.batches:
            return "landing backlog empty"
        return f"landing backlog {self.batches} sealed batches, oldest {self.oldest_age_s:.0f} s"


@dataclass
class IngestPlan:
    runs: list[PlannedRun] = field(default_factory=list)
    splits: list[str] = field(default_factory=list)  # batches to split into halves now
    state: dict[str, BatchState] = field(default_factory=dict)  # the next cursor
    in_progress: list[str] = field(default_factory=list)  # batches whose run is going
    held: list[str] = field(default_factory=list)  # new batches kept for the next run
    waiting: dict[str, float] = field(default_factory=dict)  # batch -> seconds to retry
    waiting_for_space: list[str] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)  # batch -> error, this tick

    @property
    def still_pending(self) -> set[str]:
        """Batches requested and not yet ingested (the cursor's keys)."""
        return set(self.state)

    def describe(self) -> str:
        """One line for the sensor's SkipReason."""
        parts = [f"{len(self.in_progress)} batches in runs"]
        if self.held:
            parts.append(f"{len(self.held)} new held for the next run (one is waiting to start)")
        if self.waiting:
            parts.append(
                f"{len(self.waiting)} waiting to retry (next in {min(self.waiting.values()):.0f} s)"
            )
        if self.waiting_for_space:
            parts.append(f"{len(self.waiting_for_space)} waiting for disk space")
        if self.splits:
            parts.append(f"{len(self.splits)} split")
        return ", ".join(parts)


def run_key_for(first: str, requests: int) -> str:
    """The run key of a batch's `requests`-th request (0: the first, as ever).

    >>> run_key_for("20260101T000000000000-dimse-1-0", 0)
    'ingest-20260101T000000000000-dimse-1-0'
    >>> run_key_for("20260101T000000000000-dimse-1-0", 2)
    'ingest-20260101T000000000000-dimse-1-0-r2'
    """
    return f"ingest-{first}" if requests == 0 else f"ingest-{first}-r{requests}"


def plan_ingest_runs(
    sealed: list[Batch],
    state: dict[str, BatchState],
    outcomes: dict[str, RunOutcome],
    *,
    now: float,
    max_files: int,
    policy: RetryPolicy,
    space_ok: bool = True,
    files: dict[str, int] | None = None,
) -> IngestPlan:
    """Plan the runs of this tick.

    Parameters
    ----------
    sealed
        The sealed batches in the landing zone, oldest first.
    state
        The previous cursor (:func:`load_cursor`).
    outcomes
        Run key -> what became of it, for every run key in `state`.
    now
        Epoch seconds.
    max_files
        Files per run (``Settings.ingest_run_max_files``).
    policy
        Backoff and the attempts before a batch is split.
    space_ok
        Whether the hot tier and catalog have space again (for disk-full retries).
    files
        Batch -> number of files (counted from the landing zone when not given).

    Returns
    -------
    IngestPlan
        Runs to request, batches to split, and the next cursor.

    New batches are not requested while a run of this sensor waits to start (queued, or
    its worker process starting): they go, together, in the run requested once it has
    started. Each run pays a worker process's start (seconds on 2 cores), and ingest runs
    take one run slot at a time while routing runs: a run a tick would queue a run behind
    a run, each costing a start, and leave every batch later than one run of them all.
    """
    counts = dict(files or {})
    for b in sealed:
        if b.batch_id not in counts:
            counts[b.batch_id] = _count_files(b)
    plan = IngestPlan()
    fresh: list[Batch] = []  # may share a run
    alone: list[tuple[Batch, BatchState]] = []  # retried: a run each
    run_waiting = False  # a requested run not started yet

    for batch in sealed:
        bid = batch.batch_id
        st = state.get(bid)
        if st is None:
            if batch_source(bid) == "split":
                alone.append((batch, BatchState()))  # a half of a failing batch: on its own
            else:
                fresh.append(batch)
            continue
        if st.run_key is not None:
            outcome = outcomes.get(st.run_key, RunOutcome(RunStatus.UNKNOWN))
            unseen = outcome.status is RunStatus.UNKNOWN
            if unseen and now - st.requested_at < HOLD_FOR_UNSEEN_SECONDS:
                run_waiting = True  # requested just now, not in the run storage yet
            if outcome.status is RunStatus.WAITING:
                run_waiting = True
            if outcome.status in (RunStatus.IN_PROGRESS, RunStatus.WAITING) or (
                unseen and now - st.requested_at < LOST_AFTER_SECONDS
            ):
                plan.state[bid] = st
                plan.in_progress.append(bid)
                continue
            if outcome.status is RunStatus.DISK_FULL:
                st = replace(
                    st,
                    run_key=None,
                    wait_space=True,
                    next_try=now + policy.base_seconds,
                    error=outcome.error[:_MAX_ERROR],
                )
                plan.failures[bid] = st.error
            elif outcome.status is RunStatus.FAILED:
                st = replace(
                    st,
                    run_key=None,
                    attempts=st.attempts + 1,
                    wait_space=False,
                    error=outcome.error[:_MAX_ERROR],
                )
                plan.failures[bid] = st.error
                if st.attempts >= policy.max_attempts and counts[bid] > 1:
                    plan.splits.append(bid)  # its halves are new batches, with no state
                    continue
                st = replace(st, next_try=now + policy.backoff(st.attempts))
            else:  # succeeded yet still here, or lost: request again, uncounted
                st = replace(st, run_key=None, next_try=now)
        if now < st.next_try and not st.wait_space:
            plan.state[bid] = st
            plan.waiting[bid] = st.next_try - now
            continue
        if st.wait_space and (now < st.next_try or not space_ok):
            plan.state[bid] = st
            plan.waiting_for_space.append(bid)
            continue
        plan.state[bid] = st
        if st.attempts > 0 or batch_source(bid) == "split":
            alone.append((batch, st))
        else:
            fresh.append(batch)

    def request(batches: list[Batch], quarantine_reason: str | None = None) -> None:
        first = plan.state.get(batches[0].batch_id, BatchState())
        key = run_key_for(batches[0].batch_id, first.requests)
        for b in batches:
            previous = plan.state.get(b.batch_id, BatchState())
            plan.state[b.batch_id] = replace(
                previous,
                run_key=key,
                requests=previous.requests + 1,
                requested_at=now,
                wait_space=False,
            )
        plan.runs.append(
            PlannedRun(
                batches[0].day,
                [b.batch_id for b in batches],
                sum(counts[b.batch_id] for b in batches),
                key,
                first.attempts + 1,
                quarantine_reason,
            )
        )

    for batch, st in alone:
        reason = None
        if st.attempts >= policy.max_attempts:
            reason = f"IngestFailed: ingest failed {st.attempts} times; last: {st.error}"
        request([batch], reason)

    if run_waiting:
        plan.held = [b.batch_id for b in fresh]
        fresh = []
    current: list[Batch] = []
    count = 0
    for batch in fresh:
        n = counts[batch.batch_id]
        if current and (batch.day != current[0].day or count + n > max_files):
            request(current)
            current, count = [], 0
        current.append(batch)
        count += n
    if current:
        request(current)
    plan.runs.sort(key=lambda r: r.batch_ids[0])
    return plan


def landing_backlog(sealed: list[Batch], now: datetime) -> Backlog:
    """How many sealed batches wait, and how long the oldest has waited (seconds).

    >>> from datetime import UTC
    >>> b = [Batch("20260101T000000000000-dimse-1-0", Path("/x"))]
    >>> landing_backlog(b, datetime(2026, 1, 1, 0, 1, tzinfo=UTC))
    Backlog(batches=1, oldest_age_s=60.0)
    """
    if not sealed:
        return Backlog(0, 0.0)
    oldest = min(batch_time(b.batch_id) for b in sealed)
    return Backlog(len(sealed), max(0.0, (now - oldest).total_seconds()))


def has_space(folders: list[Path], reserve: int) -> bool:
    """Whether every existing folder of `folders` has the reserve free, and a margin."""
    try:
        for folder in folders:
            if folder.exists():
                require_free_space(folder, SPACE_MARGIN_BYTES, reserve)
    except InsufficientSpaceError:
        return False
    return True


def load_cursor(cursor: str | None, now: float) -> dict[str, BatchState]:
    """The batch states a sensor cursor holds.

    Accepts the first cursor format (a JSON list of requested batch ids): those batches
    are given their old run's time to finish, then requested again.

    >>> load_cursor(None, 0.0)
    {}
    >>> load_cursor('["20260101T000000000000-dimse-1-0"]', 5.0)["20260101T000000000000-dimse-1-0"]
    BatchState(run_key='', attempts=0, requests=1, requested_at=5.0, next_try=0.0, wait_space=False, error='')
    """  # noqa: E501
    if not cursor:
        return {}
    raw: Any = json.loads(cursor)
    if isinstance(raw, list):
        return {str(b): BatchState(run_key="", requests=1, requested_at=now) for b in raw}
    batches: dict[str, Any] = raw.get("batches", {})
    return {bid: BatchState(**fields) for bid, fields in batches.items()}


def dump_cursor(state: dict[str, BatchState], backlog_fresh: bool | None = None) -> str:
    """The sensor cursor for `state` (JSON, sorted, stable), with the last reported
    freshness of the landing backlog."""
    return json.dumps(
        {
            "version": 2,
            "batches": {bid: asdict(st) for bid, st in sorted(state.items())},
            "backlog_fresh": backlog_fresh,
        },
        sort_keys=True,
        separators=(",", ":"),
    )


def load_backlog_fresh(cursor: str | None) -> bool | None:
    """The freshness of the landing backlog the sensor last reported (None: never).

    >>> load_backlog_fresh(dump_cursor({}, False)), load_backlog_fresh('["x"]')
    (False, None)
    """
    raw: Any = json.loads(cursor) if cursor else None
    return raw.get("backlog_fresh") if isinstance(raw, dict) else None


def _count_files(batch: Batch) -> int:
    try:
        return sum(1 for p in batch.path.iterdir() if p.suffix == ".dcm")
    except FileNotFoundError:
        return 0


__all__ = [
    "Backlog",
    "BatchState",
    "IngestPlan",
    "PlannedRun",
    "RetryPolicy",
    "RunOutcome",
    "RunStatus",
    "dump_cursor",
    "has_space",
    "landing_backlog",
    "load_backlog_fresh",
    "load_cursor",
    "plan_ingest_runs",
    "run_key_for",
]
