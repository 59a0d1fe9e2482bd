"""The ingest planner (pure): grouping, retries with backoff, splits, quarantine, disk full."""

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest

from vannah_pipelines.landing.layout import Batch
from vannah_pipelines.landing.plan import (
    LOST_AFTER_SECONDS,
    BatchState,
    RetryPolicy,
    RunOutcome,
    RunStatus,
    dump_cursor,
    landing_backlog,
    load_cursor,
    plan_ingest_runs,
)

A = "20260101T000000000000-dimse-1-0"
B = "20260101T000000000001-dimse-1-1"
C = "20260102T000000000000-dimse-1-2"
NOW = 10_000.0
POLICY = RetryPolicy(max_attempts=3, base_seconds=10)


def _batches(*ids: str) -> list[Batch]:
    return [Batch(i, Path("/nonexistent") / i) for i in ids]


@dataclass
class Case:
    name: str
    sealed: list[str]
    state: dict[str, BatchState]
    outcomes: dict[str, RunStatus] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)
    space_ok: bool = True
    # expected
    runs: list[tuple[list[str], str, str | None]] = field(default_factory=list)
    splits: list[str] = field(default_factory=list)
    next_state: dict[str, BatchState] = field(default_factory=dict)
    held: list[str] = field(default_factory=list)


CASES = [
    Case(
        "new batches of one day share a run; another day gets its own",
        [A, B, C],
        {},
        runs=[([A, B], f"ingest-{A}", None), ([C], f"ingest-{C}", None)],
        next_state={
            A: BatchState(f"ingest-{A}", requests=1, requested_at=NOW),
            B: BatchState(f"ingest-{A}", requests=1, requested_at=NOW),
            C: BatchState(f"ingest-{C}", requests=1, requested_at=NOW),
        },
    ),
    Case(
        "a run in progress is left alone",
        [A],
        {A: BatchState(f"ingest-{A}", requests=1, requested_at=NOW - 5)},
        {f"ingest-{A}": RunStatus.IN_PROGRESS},
        next_state={A: BatchState(f"ingest-{A}", requests=1, requested_at=NOW - 5)},
    ),
    Case(
        "a run not seen yet is waited for",
        [A],
        {A: BatchState(f"ingest-{A}", requests=1, requested_at=NOW - 5)},
        next_state={A: BatchState(f"ingest-{A}", requests=1, requested_at=NOW - 5)},
    ),
    Case(
        "a run never seen for long is requested again, uncounted",
        [A],
        {A: BatchState(f"ingest-{A}", requests=1, requested_at=NOW - LOST_AFTER_SECONDS - 1)},
        runs=[([A], f"ingest-{A}-r1", None)],
        next_state={A: BatchState(f"ingest-{A}-r1", requests=2, requested_at=NOW, next_try=NOW)},
    ),
    Case(
        "new batches are held while a run waits to start (queued, or its process starting)",
        [A, B],
        {A: BatchState(f"ingest-{A}", requests=1, requested_at=NOW - 5)},
        {f"ingest-{A}": RunStatus.WAITING},
        next_state={A: BatchState(f"ingest-{A}", requests=1, requested_at=NOW - 5)},
        held=[B],
    ),
    Case(
        "new batches are held while a run just requested is not in the run storage yet",
        [A, B],
        {A: BatchState(f"ingest-{A}", requests=1, requested_at=NOW - 1)},
        next_state={A: BatchState(f"ingest-{A}", requests=1, requested_at=NOW - 1)},
        held=[B],
    ),
    Case(
        "a run not seen for a while holds its own batches only",
        [A, B],
        {A: BatchState(f"ingest-{A}", requests=1, requested_at=NOW - 60)},
        runs=[([B], f"ingest-{B}", None)],
        next_state={
            A: BatchState(f"ingest-{A}", requests=1, requested_at=NOW - 60),
            B: BatchState(f"ingest-{B}", requests=1, requested_at=NOW),
        },
    ),
    Case(
        "once it has started, the held batches go together in the next run",
        [A, B, C],
        {A: BatchState(f"ingest-{A}", requests=1, requested_at=NOW - 5)},
        {f"ingest-{A}": RunStatus.IN_PROGRESS},
        files={A: 1, B: 1, C: 1},
        runs=[([B], f"ingest-{B}", None), ([C], f"ingest-{C}", None)],
        next_state={
            A: BatchState(f"ingest-{A}", requests=1, requested_at=NOW - 5),
            B: BatchState(f"ingest-{B}", requests=1, requested_at=NOW),
            C: BatchState(f"ingest-{C}", requests=1, requested_at=NOW),
        },
    ),
    Case(
        "an ingested batch leaves the cursor",
        [B],
        {A: BatchState(f"ingest-{A}", requests=1), B: BatchState(f"ingest-{A}", requests=1)},
        {f"ingest-{A}": RunStatus.IN_PROGRESS},
        next_state={B: BatchState(f"ingest-{A}", requests=1)},
    ),
    Case(
        "a failed run: its batches wait the base backoff",
        [A, B],
        {A: BatchState(f"ingest-{A}", requests=1), B: BatchState(f"ingest-{A}", requests=1)},
        {f"ingest-{A}": RunStatus.FAILED},
        next_state={
            A: BatchState(None, attempts=1, requests=1, next_try=NOW + 10, error="boom"),
            B: BatchState(None, attempts=1, requests=1, next_try=NOW + 10, error="boom"),
        },
    ),
    Case(
        "after the backoff each failed batch is retried alone, with a new run key",
        [A, B],
        {
            A: BatchState(None, attempts=1, requests=1, next_try=NOW),
            B: BatchState(None, attempts=1, requests=1, next_try=NOW),
        },
        runs=[([A], f"ingest-{A}-r1", None), ([B], f"ingest-{B}-r1", None)],
        next_state={
            A: BatchState(f"ingest-{A}-r1", attempts=1, requests=2, requested_at=NOW, next_try=NOW),
            B: BatchState(f"ingest-{B}-r1", attempts=1, requests=2, requested_at=NOW, next_try=NOW),
        },
    ),
    Case(
        "the second failure doubles the backoff",
        [A],
        {A: BatchState(f"ingest-{A}-r1", attempts=1, requests=2)},
        {f"ingest-{A}-r1": RunStatus.FAILED},
        next_state={A: BatchState(None, attempts=2, requests=2, next_try=NOW + 20, error="boom")},
    ),
    Case(
        "the last allowed failure of a batch of several files splits it",
        [A],
        {A: BatchState(f"ingest-{A}-r2", attempts=2, requests=3)},
        {f"ingest-{A}-r2": RunStatus.FAILED},
        files={A: 4},
        splits=[A],
    ),
    Case(
        "a single-file batch out of attempts is quarantined by its run",
        [A],
        {A: BatchState(f"ingest-{A}-r2", attempts=2, requests=3)},
        {f"ingest-{A}-r2": RunStatus.FAILED},
        files={A: 1},
        next_state={A: BatchState(None, attempts=3, requests=3, next_try=NOW + 40, error="boom")},
    ),
    Case(
        "... and once its backoff is over, the quarantine run is requested",
        [A],
        {A: BatchState(None, attempts=3, requests=3, next_try=NOW, error="boom")},
        files={A: 1},
        runs=[([A], f"ingest-{A}-r3", "IngestFailed: ingest failed 3 times; last: boom")],
        next_state={
            A: BatchState(
                f"ingest-{A}-r3",
                attempts=3,
                requests=4,
                requested_at=NOW,
                next_try=NOW,
                error="boom",
            )
        },
    ),
    Case(
        "a disk-full failure counts for nothing and waits for space",
        [A],
        {A: BatchState(f"ingest-{A}", requests=1)},
        {f"ingest-{A}": RunStatus.DISK_FULL},
        next_state={
            A: BatchState(None, requests=1, next_try=NOW + 10, wait_space=True, error="boom")
        },
    ),
    Case(
        "no space yet: still waiting",
        [A],
        {A: BatchState(None, requests=1, next_try=NOW - 1, wait_space=True)},
        space_ok=False,
        next_state={A: BatchState(None, requests=1, next_try=NOW - 1, wait_space=True)},
    ),
    Case(
        "space is back: requested again, attempts unchanged",
        [A],
        {A: BatchState(None, requests=1, next_try=NOW - 1, wait_space=True)},
        runs=[([A], f"ingest-{A}-r1", None)],
        next_state={
            A: BatchState(f"ingest-{A}-r1", requests=2, requested_at=NOW, next_try=NOW - 1)
        },
    ),
    Case(
        "a run that succeeded while its batch is still here: requested again, uncounted",
        [A],
        {A: BatchState(f"ingest-{A}", requests=1)},
        {f"ingest-{A}": RunStatus.SUCCESS},
        runs=[([A], f"ingest-{A}-r1", None)],
        next_state={A: BatchState(f"ingest-{A}-r1", requests=2, requested_at=NOW, next_try=NOW)},
    ),
    Case(
        "more files than a run takes: one run per batch",
        [A, B],
        {},
        files={A: 3, B: 3},
        runs=[([A], f"ingest-{A}", None), ([B], f"ingest-{B}", None)],
        next_state={
            A: BatchState(f"ingest-{A}", requests=1, requested_at=NOW),
            B: BatchState(f"ingest-{B}", requests=1, requested_at=NOW),
        },
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_plan_ingest_runs_table(case: Case) -> None:
    files = {b: case.files.get(b, 1) for b in case.sealed}
    outcomes = {k: RunOutcome(s, "boom") for k, s in case.outcomes.items()}
    plan = plan_ingest_runs(
        _batches(*case.sealed),
        case.state,
        outcomes,
        now=NOW,
        max_files=5,
        policy=POLICY,
        space_ok=case.space_ok,
        files=files,
    )
    assert [(r.batch_ids, r.run_key, r.quarantine_reason) for r in plan.runs] == case.runs
    assert plan.splits == case.splits
    assert plan.state == case.next_state
    assert plan.held == case.held


def test_plan_backoff_is_capped() -> None:
    policy = RetryPolicy(max_attempts=100, base_seconds=10, cap_seconds=60)
    assert [policy.backoff(n) for n in range(1, 6)] == [10, 20, 40, 60, 60]


def test_plan_run_keys_never_repeat_across_retries() -> None:
    state: dict[str, BatchState] = {}
    keys = []
    now = NOW
    for _ in range(5):
        plan = plan_ingest_runs(
            _batches(A), state, {}, now=now, max_files=5, policy=POLICY, files={A: 1}
        )
        keys += [r.run_key for r in plan.runs]
        state = plan.state
        run_key = state[A].run_key
        assert run_key is not None
        plan = plan_ingest_runs(
            _batches(A),
            state,
            {run_key: RunOutcome(RunStatus.FAILED, "x")},
            now=now,
            max_files=5,
            policy=POLICY,
            files={A: 1},
        )
        state = plan.state
        now = state[A].next_try
    assert len(keys) == len(set(keys)) == 5


def test_cursor_round_trips_and_reads_the_first_format() -> None:
    state = {A: BatchState("k", attempts=2, requests=3, next_try=5.5, error="e: x")}
    assert load_cursor(dump_cursor(state), NOW) == state
    legacy = load_cursor(f'["{A}"]', NOW)
    assert legacy == {A: BatchState("", requests=1, requested_at=NOW)}
    # A batch of the old cursor gets its old run's time, then is requested again.
    waiting = plan_ingest_runs(
        _batches(A), legacy, {}, now=NOW + 1, max_files=5, policy=POLICY, files={A: 1}
    )
    assert waiting.runs == []
    later = plan_ingest_runs(
        _batches(A),
        legacy,
        {},
        now=NOW + LOST_AFTER_SECONDS + 1,
        max_files=5,
        policy=POLICY,
        files={A: 1},
    )
    assert [r.run_key for r in later.runs] == [f"ingest-{A}-r1"]


def test_landing_backlog_counts_and_ages_the_oldest() -> None:
    now = datetime(2026, 1, 2, 0, 0, 0, tzinfo=UTC)
    backlog = landing_backlog(_batches(A, C), now)
    assert (backlog.batches, backlog.oldest_age_s) == (2, 86400.0)
    assert "2 sealed batches, oldest 86400 s" in backlog.describe()
    assert landing_backlog([], now).describe() == "landing backlog empty"


def test_plan_halves_of_a_split_batch_run_alone() -> None:
    halves = ["20260101T000000000000-split-7-0", "20260101T000000000000-split-7-1"]
    plan = plan_ingest_runs(
        _batches(*halves, B), {}, {}, now=NOW, max_files=50, policy=POLICY, files={}
    )
    assert [r.batch_ids for r in plan.runs] == [[halves[0]], [halves[1]], [B]]
