"""The delivery log — the catalog's ``deliveries`` state-change table — and the work on it:
queue what the rules route, send what is due, record every outcome.

One row per (instance version, rule, destination) and state change; the latest row of a key
is its state (the ``delivery_status`` view). Delivery is at least once: a delivery is
queued (appended) before anything is sent and its outcome appended after each batch, so a
crash at any instant forgets nothing and at worst sends a batch again (S3 and folder
destinations compare checksums and do not store it twice).

States (:data:`vannah_pipelines.catalog.changes.DELIVERY_STATES`): ``queued`` (due at
``next_attempt_at``), ``waiting`` (a study-mode rule: due once the study is stable),
``sent``, ``committed`` (confirmed by Storage Commitment), ``failed`` (retried after a
backoff), ``dead`` (given up after ``max_attempts``, or refused for good; retried by hand),
``cancelled`` (its rule was removed or changed, or a newer version superseded it).

Framework-free: the Dagster glue and ``vannah route`` call these functions with the catalog,
the rules in force, a way to open an instance's bytes and a way to build a sender.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, BinaryIO

from vannah_pipelines.catalog.changes import (
    CANCELLED,
    COMMITTED,
    DEAD,
    FAILED,
    QUEUED,
    SENT,
    WAITING,
)
from vannah_pipelines.errors import VannahError
from vannah_pipelines.routing.commitments import REPORTS_PER_TICK, CommitmentSpool
from vannah_pipelines.routing.dry_run import PAGE, route_pages
from vannah_pipelines.routing.rules import (
    DEFAULT_STABLE_AGE_SECONDS,
    DicomDestination,
    RoutingRules,
    Rule,
)
from vannah_pipelines.routing.senders import Delivered, Outgoing, Sender

if TYPE_CHECKING:
    from vannah_pipelines.catalog.reader import CatalogReader
    from vannah_pipelines.storage.tiers import StorageTiers

log = logging.getLogger(__name__)

PRIORITY_RANK = {"STAT": 0, "HIGH": 1, "ROUTINE": 2, "LOW": 3}
DELIVERED_STATES = (SENT, COMMITTED)
# Instances per association / request / upload round, and the outcome appended after each.
BATCH = 50
# The due deliveries a lingering run's pass reads (it re-reads every reread_seconds): more
# than any peer takes in one pass, without turning a large backlog into rows every pass.
PASS_LIMIT = 1000
_ERROR_CHARS = 500

# A function appending delivery rows (one append, atomic) to the catalog: the embedded
# files, and the DuckLake too when one is configured (catalog.lake.record_change).
Record = Callable[[list[dict[str, Any]]], object]
# A function opening the stored bytes of a catalog instance row (storage tiers).
Opener = Callable[[Mapping[str, Any]], BinaryIO]
# A function building the sender of a rule's destination (routing.senders.build_sender).
SenderFor = Callable[[Rule], Sender]


@dataclass(frozen=True)
class Confirmation:
    """What a DICOM destination said, through Storage Commitment, of instances sent to it:
    `outcome` ``committed``/``failures`` (the report came at once: `committed` SOP Instance
    UIDs, `failed` UID -> reason), ``pending`` (it reports later to our receiver), or
    ``not-supported``/``refused``/``unreachable`` (C-STORE success stands)."""

    transaction_uid: str
    outcome: str
    committed: tuple[str, ...] = ()
    failed: Mapping[str, str] = field(default_factory=dict)
    reason: str = ""


# Ask a rule's destination to commit (SOP Class UID, SOP Instance UID) pairs (the glue
# passes dimse.commitment.request_commitment; the pure layer does not speak DIMSE).
Confirm = Callable[[Rule, list[tuple[str, str]]], Confirmation]


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how late a failed delivery is tried again.

    >>> p = RetryPolicy(max_attempts=5, first_seconds=30, max_seconds=300)
    >>> [p.delay(n).total_seconds() for n in (1, 2, 3, 4, 5)]
    [30.0, 60.0, 120.0, 240.0, 300.0]
    """

    max_attempts: int = 8
    first_seconds: float = 30.0
    max_seconds: float = 3600.0

    def delay(self, attempts: int) -> timedelta:
        """The wait after the `attempts`-th failed attempt (doubling, capped)."""
        return timedelta(
            seconds=min(self.max_seconds, self.first_seconds * 2 ** max(0, attempts - 1))
        )


def destination_id(rule: Rule) -> str:
    """The ``destination`` column of a rule's deliveries: its destination, as described
    (``dicom AI_ENGINE@ai.internal:4243``, ``s3://vhc-archive/ (af-south-1)``, ...)."""
    return rule.destination.describe()


def _rank(priority: str | None) -> int:
    return PRIORITY_RANK.get(priority or "ROUTINE", PRIORITY_RANK["ROUTINE"])


# ------------------------------------------------------------------------------- queueing


@dataclass
class QueueResult:
    """What :func:`queue_deliveries` found and queued."""

    instances: int = 0
    queued: int = 0
    waiting: int = 0
    already: int = 0  # routes already in the log (a window scanned twice)
    by_destination: Counter[str] = field(default_factory=Counter)
    last_indexed_at: datetime | None = None


def queue_deliveries(
    catalog: CatalogReader,
    rules: RoutingRules,
    record: Record,
    *,
    since: datetime | None,
    until: datetime | None = None,
    now: datetime | None = None,
    worklist_priorities: Mapping[str, str] | None = None,
    page: int = PAGE,
) -> QueueResult:
    """Queue one delivery per route of each instance *indexed* in [`since`, `until`)
    (imports and CLI ingests too: whatever reached the catalog), unless the log already
    holds that (version, rule, destination), whatever its state: scanning a window twice
    queues nothing twice, so a caller may overlap windows to never miss a late batch.

    Only instance versions with no delivery yet are evaluated (a rescanned window costs
    what is new in it; an instance no rule matches is evaluated again while it is in the
    window). Instance-mode routes are ``queued`` (due now); study-mode routes are ``waiting``
    (due once the study is stable, see :func:`due_deliveries`). One append per page.
    """
    when = now or datetime.now(UTC)
    result = QueueResult()
    for routed in route_pages(
        catalog,
        rules,
        since=since,
        until=until,
        order="indexed_at",
        worklist_priorities=worklist_priorities,
        page=page,
        unrouted=True,  # a window scanned again costs only what is new in it
    ):
        result.instances += len(routed)
        indexed = [row["indexed_at"] for row, _ in routed if row["indexed_at"] is not None]
        if indexed:
            latest = max(indexed)
            if result.last_indexed_at is None or latest > result.last_indexed_at:
                result.last_indexed_at = latest
        sops = sorted({row["sop_instance_uid"] for row, routes in routed if routes})
        if not sops:
            continue
        known = {
            tuple(r)
            for r in catalog.query(
                "SELECT sop_instance_uid, checksum, rule, destination FROM delivery_status "
                "WHERE sop_instance_uid IN (SELECT unnest(?))",
                [sops],
            )
        }
        rows: list[dict[str, Any]] = []
        for row, routes in routed:
            for route in routes:
                key = (
                    row["sop_instance_uid"],
                    row["checksum"],
                    route.rule.name,
                    destination_id(route.rule),
                )
                if key in known:
                    result.already += 1
                    continue
                known.add(key)
                waiting = route.rule.mode == "study"
                rows.append(
                    {
                        "sop_instance_uid": key[0],
                        "checksum": key[1],
                        "rule": key[2],
                        "destination": key[3],
                        "study_instance_uid": row["study_instance_uid"],
                        "status": WAITING if waiting else QUEUED,
                        "attempts": 0,
                        "priority": route.priority,
                        "queued_at": when,
                        "next_attempt_at": None if waiting else when,
                    }
                )
                result.by_destination[key[3]] += 1
                if waiting:
                    result.waiting += 1
                else:
                    result.queued += 1
        if rows:
            record(rows)
    return result


# ------------------------------------------------------------------------------- sending

_DUE_COLUMNS = (
    "d.sop_instance_uid, d.checksum, d.rule, d.destination, d.study_instance_uid, d.status, "
    "d.attempts, d.priority, d.queued_at, d.next_attempt_at, "
    "i.checksum AS current_checksum, i.series_instance_uid, i.sop_class_uid, "
    "i.transfer_syntax_uid, i.size_bytes, i.tier, i.storage_key, i.source_file"
)


def due_deliveries(
    catalog: CatalogReader,
    rules: RoutingRules,
    *,
    now: datetime,
    destination: str | None = None,
    limit: int = 10_000,
) -> list[dict[str, Any]]:
    """The deliveries to attempt now, most urgent first (priority, then oldest queued):
    ``queued`` and ``failed`` ones whose ``next_attempt_at`` has come, and ``waiting`` ones
    whose study has received nothing for its rule's ``stableAge`` (Orthanc's StableAge).

    Each row has the delivery's columns and the instance's current version (``current_*``,
    ``tier``, ``storage_key``, ...) from the ``instances`` view (NULL when it is gone)."""
    where = "AND d.destination = ?" if destination is not None else ""
    params: list[Any] = [now] + ([destination] if destination is not None else [])
    order = (
        "CASE d.priority WHEN 'STAT' THEN 0 WHEN 'HIGH' THEN 1 WHEN 'LOW' THEN 3 ELSE 2 END, "
        "d.queued_at, d.sop_instance_uid"
    )
    rows = catalog.query_dicts(
        f"SELECT {_DUE_COLUMNS} FROM open_deliveries d "
        "LEFT JOIN instances i ON i.sop_instance_uid = d.sop_instance_uid "
        f"WHERE d.status IN ('{QUEUED}', '{FAILED}') AND d.next_attempt_at <= ? {where} "
        f"ORDER BY {order} LIMIT ?",
        [*params, limit],
    )
    stable_ages = {
        r.name: r.stable_age or DEFAULT_STABLE_AGE_SECONDS for r in rules.rules if r.mode == "study"
    }
    if stable_ages and len(rows) < limit:
        waiting = catalog.query_dicts(
            f"SELECT {_DUE_COLUMNS}, s.last_received_at FROM open_deliveries d "
            "LEFT JOIN instances i ON i.sop_instance_uid = d.sop_instance_uid "
            "LEFT JOIN studies s ON s.study_instance_uid = d.study_instance_uid "
            f"WHERE d.status = '{WAITING}' {where} "
            f"ORDER BY {order}",
            params[1:],
        )
        for row in waiting:
            age = stable_ages.get(row["rule"])
            last = row.pop("last_received_at")
            # A rule gone or no longer study-mode: due, to be cancelled (_settle_unsendable).
            stable = last is not None and age is not None and last + timedelta(seconds=age) <= now
            if age is None or stable:
                rows.append(row)
        rows.sort(key=lambda r: (_rank(r["priority"]), r["queued_at"], r["sop_instance_uid"]))
        rows = rows[:limit]
    return rows


@dataclass
class DestinationStats:
    """One destination's share of a delivery run (materialization metadata)."""

    attempted: int = 0
    sent: int = 0
    failed: int = 0
    dead: int = 0
    cancelled: int = 0
    committed: int = 0
    not_committed: int = 0
    bytes_sent: int = 0
    seconds: float = 0.0
    oldest_queued_at: datetime | None = None
    errors: Counter[str] = field(default_factory=Counter)


@dataclass
class DeliveryResult:
    """What :func:`send_due` did, per destination."""

    destinations: dict[str, DestinationStats] = field(default_factory=dict)

    def stats(self, destination: str) -> DestinationStats:
        return self.destinations.setdefault(destination, DestinationStats())

    def add(self, other: DeliveryResult) -> None:
        """Fold `other` (a later pass of the same run) into this result."""
        for dest, theirs in other.destinations.items():
            mine = self.stats(dest)
            for name in (
                "attempted", "sent", "failed", "dead", "cancelled", "committed",
                "not_committed", "bytes_sent", "seconds",
            ):  # fmt: skip
                setattr(mine, name, getattr(mine, name) + getattr(theirs, name))
            if theirs.oldest_queued_at is not None and (
                mine.oldest_queued_at is None or theirs.oldest_queued_at < mine.oldest_queued_at
            ):
                mine.oldest_queued_at = theirs.oldest_queued_at
            mine.errors.update(theirs.errors)

    @property
    def sent(self) -> int:
        return sum(s.sent for s in self.destinations.values())

    @property
    def failed(self) -> int:
        return sum(s.failed + s.dead for s in self.destinations.values())


def _outcome(
    row: Mapping[str, Any],
    status: str,
    now: datetime,
    *,
    attempts: int,
    next_attempt_at: datetime | None = None,
    bytes_sent: int | None = None,
    error: str | None = None,
    detail: str | None = None,
) -> dict[str, Any]:
    return {
        "sop_instance_uid": row["sop_instance_uid"],
        "checksum": row["checksum"],
        "rule": row["rule"],
        "destination": row["destination"],
        "study_instance_uid": row["study_instance_uid"],
        "status": status,
        "attempts": attempts,
        "priority": row["priority"],
        "queued_at": row["queued_at"],
        "next_attempt_at": next_attempt_at,
        "bytes_sent": bytes_sent,
        "last_error": error[:_ERROR_CHARS] if error else None,
        "detail": detail,
    }


def _settle_unsendable(
    rows: Iterable[dict[str, Any]], rules_by_name: Mapping[str, Rule], now: datetime
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split due rows into those to send and the cancellations of the rest: a rule removed
    or pointing elsewhere now, or a version no longer current (a newer one was routed)."""
    send, cancel = [], []
    for row in rows:
        rule = rules_by_name.get(row["rule"])
        reason = None
        if rule is None:
            reason = "its rule is no longer in the rules in force"
        elif destination_id(rule) != row["destination"]:
            reason = f"its rule now sends to {destination_id(rule)}"
        elif row["current_checksum"] is None:
            reason = "the instance is no longer in the catalog"
        elif row["current_checksum"] != row["checksum"]:
            reason = "superseded by a newer version of the instance"
        if reason is None:
            send.append(row)
        else:
            cancel.append(
                _outcome(row, CANCELLED, now, attempts=int(row["attempts"]), detail=reason)
            )
    return send, cancel


def send_due(
    catalog: CatalogReader,
    rules: RoutingRules,
    record: Record,
    open_instance: Opener,
    sender_for: SenderFor,
    *,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
    destination: str | None = None,
    retry: RetryPolicy = RetryPolicy(),
    limit: int = 10_000,
    batch: int = BATCH,
    confirm: Confirm | None = None,
    until: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> DeliveryResult:
    """Attempt every due delivery (:func:`due_deliveries`), most urgent first, a batch at
    a time per destination, appending each batch's outcomes before the next is sent.

    With `until` (a `clock` reading), no batch starts after it, except each destination's
    first: what is left stays due, for the caller's next read (most urgent first again).

    A destination that fails a whole batch for a transient reason (down, timing out) is
    not tried again in this run: its remaining deliveries keep their state and the backoff
    of the failed ones decides when it is next asked. A permanent refusal (the peer
    rejected the data set, a 4xx) is ``dead`` at once: trying again would not help.
    One destination's failure never stops another's deliveries.

    A DICOM destination with ``storageCommitment`` is asked, after each batch, to commit
    what it stored (`confirm`): what it commits is ``committed``, what it does not is
    ``failed`` and sent again after the backoff; a report that comes later is applied by
    :func:`apply_commitment_reports`.
    """
    result = DeliveryResult()
    started = now()
    rows = due_deliveries(catalog, rules, now=started, destination=destination, limit=limit)
    if not rows:
        return result
    rules_by_name = {r.name: r for r in rules.rules}
    send, cancelled = _settle_unsendable(rows, rules_by_name, started)
    if cancelled:
        record(cancelled)
        for row in cancelled:
            result.stats(row["destination"]).cancelled += 1
    by_destination: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in send:
        by_destination[row["destination"]].append(row)
    # The destination of the most urgent delivery goes first.
    for dest, pending in sorted(
        by_destination.items(),
        key=lambda item: (_rank(item[1][0]["priority"]), item[1][0]["queued_at"]),
    ):
        stats = result.stats(dest)
        stats.oldest_queued_at = min(r["queued_at"] for r in pending)
        rule = rules_by_name[pending[0]["rule"]]
        began = clock()
        try:
            sender = sender_for(rule)
        except VannahError as exc:  # a destination that cannot even be set up
            outcomes = [_failure(r, str(exc), True, now(), retry) for r in pending[:batch]]
            record(outcomes)
            _count(stats, outcomes)
            continue
        try:
            for start in range(0, len(pending), batch):
                if start and until is not None and clock() >= until:
                    break  # the rest stays due: the caller reads it again
                chunk = pending[start : start + batch]
                outcomes = _send_chunk(chunk, rules_by_name, sender, open_instance, now, retry)
                record(outcomes)
                _count(stats, outcomes)
                if confirm is not None and _wants_commitment(rule):
                    confirmed = _confirm(rule, chunk, outcomes, confirm, now(), retry)
                    if confirmed:
                        record(confirmed)
                        stats.committed += sum(o["status"] == COMMITTED for o in confirmed)
                        stats.not_committed += sum(o["status"] != COMMITTED for o in confirmed)
                if all(o["status"] != SENT for o in outcomes) and any(
                    o["status"] == FAILED for o in outcomes
                ):
                    rest = pending[start + batch :]
                    if len(rows) >= limit:  # the read stopped at `limit`: defer the rest too
                        rest = _due_after(catalog, rules, started, dest, chunk)
                    log.warning(
                        "routing: %s failed a whole batch; its %d other due deliveries wait "
                        "as long", dest, len(rest),
                    )  # fmt: skip
                    if rest:
                        record(_deferred(rest, outcomes))
                    break
        finally:
            sender.close()
            stats.seconds += clock() - began
    return result


def _due_after(
    catalog: CatalogReader,
    rules: RoutingRules,
    now: datetime,
    destination: str,
    tried: Sequence[Mapping[str, Any]],
) -> list[dict[str, Any]]:
    """A destination's due deliveries other than the `tried` ones (read again: a pass
    reads at most its `limit`, and a destination that failed defers all the rest)."""
    keys = {(r["sop_instance_uid"], r["checksum"], r["rule"]) for r in tried}
    due = due_deliveries(catalog, rules, now=now, destination=destination)
    return [r for r in due if (r["sop_instance_uid"], r["checksum"], r["rule"]) not in keys]


def deliver_while_busy(
    catalog: CatalogReader,
    rules: Callable[[], RoutingRules],
    record: Record,
    open_instance: Opener,
    sender_for: SenderFor,
    *,
    destination: str | None,
    retry: RetryPolicy,
    confirm: Confirm | None = None,
    queue_window: timedelta = timedelta(minutes=2),
    linger_seconds: float = 30.0,
    max_seconds: float = 900.0,
    poll_seconds: float = 1.0,
    slice_seconds: float = 10.0,
    reread_seconds: float = 2.0,
    batch: int = BATCH,
    others_waiting: Callable[[], bool] = lambda: False,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
    monotonic: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> DeliveryResult:
    """One routing run: queue what was indexed lately and send what is due, again and
    again while there is work, until nothing was due for `linger_seconds` (or
    `max_seconds` have passed). A run already started takes what arrives next within a
    `poll_seconds`, instead of each batch paying for a new run's start; it also stays
    for deliveries due within `linger_seconds` (a study about to be stable, a retry
    about to be due), so they go when due. After `slice_seconds` it gives its place up
    as soon as `others_waiting()` (routing runs of other destinations queued).

    Each pass sends batches (of `batch`, per destination, over one association) for
    `reread_seconds`, then queues what was indexed and reads the due work again, most
    urgent first: a STAT delivery queued while a routine backlog is being sent goes once
    the batch under way is done (at a slow peer) or within `reread_seconds` (at a fast
    one), not after the backlog. Reading again after every batch instead costs a fast
    peer's stream a queueing scan, a due read and a new association per batch."""
    total = DeliveryResult()
    started = idle_since = monotonic()
    while True:
        current = rules()
        when = now()
        queued = queue_deliveries(catalog, current, record, since=when - queue_window, now=when)
        if queued.queued or queued.waiting:
            catalog.refresh()
        result = send_due(
            catalog,
            current,
            record,
            open_instance,
            sender_for,
            now=now,
            destination=destination,
            retry=retry,
            limit=max(PASS_LIMIT, batch),
            batch=batch,
            confirm=confirm,
            until=monotonic() + reread_seconds,
            clock=monotonic,
        )
        total.add(result)
        if result.destinations:
            idle_since = monotonic()
            catalog.refresh()
        clock = monotonic()
        if clock - started >= max_seconds:
            return total
        if clock - started >= slice_seconds and others_waiting():
            return total
        if result.destinations:  # more may be due: the next batch, most urgent first
            continue
        if clock - idle_since >= linger_seconds:
            return total
        soon = linger_seconds > 0 and due_deliveries(
            catalog,
            current,
            now=now() + timedelta(seconds=linger_seconds),
            destination=destination,
            limit=1,
        )
        if soon:  # due before it would stop lingering: not idle
            idle_since = clock
        sleep(poll_seconds)
        catalog.refresh()


def _send_chunk(
    chunk: Sequence[dict[str, Any]],
    rules_by_name: Mapping[str, Rule],
    sender: Sender,
    open_instance: Opener,
    now: Callable[[], datetime],
    retry: RetryPolicy,
) -> list[dict[str, Any]]:
    """Send one batch to one destination; the outcome row of each delivery."""
    outgoing = [
        Outgoing(
            study_instance_uid=r["study_instance_uid"],
            series_instance_uid=r["series_instance_uid"],
            sop_instance_uid=r["sop_instance_uid"],
            sop_class_uid=r["sop_class_uid"],
            transfer_syntax_uid=r["transfer_syntax_uid"],
            checksum=r["checksum"],
            size=int(r["size_bytes"] or 0),
            open=_opener(open_instance, r),
        )
        for r in chunk
    ]
    try:
        delivered = sender.send(outgoing)
    except Exception as exc:  # a sender must not raise; if one does, the batch failed
        log.exception("routing: sender %r raised", sender)
        delivered = [
            Delivered(o.sop_instance_uid, False, f"{type(exc).__name__}: {exc}", True)
            for o in outgoing
        ]
    when = now()
    outcomes = []
    for row, done in zip(chunk, _aligned(outgoing, delivered), strict=True):
        if done.ok:
            outcomes.append(
                _outcome(
                    row,
                    SENT,
                    when,
                    attempts=int(row["attempts"]) + 1,
                    bytes_sent=done.bytes_sent,
                    detail=done.detail,
                )
            )
        else:
            outcomes.append(_failure(row, done.detail, done.transient, when, retry))
    return outcomes


def _deferred(
    rest: Sequence[Mapping[str, Any]], failed: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """The deliveries of a destination that just failed a whole batch, not tried: still
    queued (attempts unchanged), due when the failed batch is retried, with its error."""
    retry_at = min(o["next_attempt_at"] for o in failed if o["next_attempt_at"] is not None)
    error = next(o["last_error"] for o in failed if o["last_error"])
    return [
        _outcome(
            row,
            QUEUED,
            retry_at,
            attempts=int(row["attempts"]),
            next_attempt_at=retry_at,
            error=f"not tried: {error}",
            detail="deferred: its destination failed the batch before it",
        )
        for row in rest
    ]


def _aligned(outgoing: Sequence[Outgoing], delivered: Sequence[Delivered]) -> list[Delivered]:
    """The sender's results in the order of `outgoing` (a missing one is a failure)."""
    by_uid = {d.sop_instance_uid: d for d in delivered}
    return [
        by_uid.get(o.sop_instance_uid)
        or Delivered(o.sop_instance_uid, False, "the sender returned no result for it", True)
        for o in outgoing
    ]


@dataclass(frozen=True)
class _Located:
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    tier: str
    storage_key: str
    checksum: str


def tier_opener(tiers: StorageTiers) -> Opener:
    """Open a due delivery's instance through the storage tiers (whatever tier holds it;
    a cold one raises RestoreRequiredError after filing a restore: a transient failure)."""

    def open_row(row: Mapping[str, Any]) -> BinaryIO:
        return tiers.open_instance(
            _Located(
                row["study_instance_uid"],
                row["series_instance_uid"],
                row["sop_instance_uid"],
                row["tier"],
                row["storage_key"],
                row["checksum"],
            )
        )

    return open_row


def _opener(open_instance: Opener, row: Mapping[str, Any]) -> Callable[[], BinaryIO]:
    return lambda: open_instance(row)


def _failure(
    row: Mapping[str, Any],
    error: str,
    transient: bool,
    now: datetime,
    retry: RetryPolicy,
    *,
    count_attempt: bool = True,
) -> dict[str, Any]:
    attempts = int(row["attempts"]) + (1 if count_attempt else 0)
    if transient and attempts < retry.max_attempts:
        return _outcome(
            row, FAILED, now, attempts=attempts, next_attempt_at=now + retry.delay(attempts),
            error=error,
        )  # fmt: skip
    why = "refused for good" if not transient else f"{attempts} attempts failed"
    return _outcome(row, DEAD, now, attempts=attempts, error=error, detail=why)


def _count(stats: DestinationStats, outcomes: Iterable[Mapping[str, Any]]) -> None:
    for o in outcomes:
        stats.attempted += 1
        if o["status"] == SENT:
            stats.sent += 1
            stats.bytes_sent += int(o["bytes_sent"] or 0)
        elif o["status"] == FAILED:
            stats.failed += 1
        elif o["status"] == DEAD:
            stats.dead += 1
        if o["last_error"]:
            stats.errors[o["last_error"][:120]] += 1


# ------------------------------------------------------------------------- confirmation


def _wants_commitment(rule: Rule) -> bool:
    return isinstance(rule.destination, DicomDestination) and rule.destination.storage_commitment


def _confirm(
    rule: Rule,
    chunk: Sequence[Mapping[str, Any]],
    outcomes: Sequence[Mapping[str, Any]],
    confirm: Confirm,
    now: datetime,
    retry: RetryPolicy,
) -> list[dict[str, Any]]:
    """Ask the destination to commit what this batch stored; the rows its answer changes."""
    sent = {o["sop_instance_uid"]: o for o in outcomes if o["status"] == SENT}
    if not sent:
        return []
    classes = {r["sop_instance_uid"]: r["sop_class_uid"] for r in chunk}
    answer = confirm(rule, [(classes[uid], uid) for uid in sent])
    if answer.outcome not in ("committed", "failures"):
        log.info(
            "routing: %s: Storage Commitment %s (%s)",
            destination_id(rule), answer.outcome, answer.reason or answer.transaction_uid,
        )  # fmt: skip
        return []
    return confirmation_rows(sent.values(), answer, now, retry)


def confirmation_rows(
    sent: Iterable[Mapping[str, Any]],
    answer: Confirmation,
    now: datetime,
    retry: RetryPolicy,
) -> list[dict[str, Any]]:
    """The rows a Storage Commitment report makes of `sent` delivery rows: ``committed``
    for what it committed; what it failed (or did not name) is sent again (``failed``,
    due after the backoff; ``dead`` once out of attempts)."""
    committed = set(answer.committed)
    rows = []
    for row in sent:
        uid = row["sop_instance_uid"]
        if uid in committed:
            rows.append(
                _outcome(
                    row,
                    COMMITTED,
                    now,
                    attempts=int(row["attempts"]),
                    bytes_sent=row.get("bytes_sent"),
                    detail=f"committed (Storage Commitment {answer.transaction_uid})",
                )
            )
        else:
            why = answer.failed.get(uid, "not in the Storage Commitment report")
            rows.append(
                _failure(row, f"not committed: {why}", True, now, retry, count_attempt=False)
            )
    return rows


def apply_commitment_reports(
    catalog: CatalogReader,
    reports: Iterable[Mapping[str, Any]],
    record: Record,
    *,
    now: datetime,
    retry: RetryPolicy = RetryPolicy(),
) -> list[str]:
    """Apply Storage Commitment reports that came later (records of the commitment spool
    in state ``reported``, written by our receiver) to the deliveries they confirm: the
    ``sent`` rows of their destination and instances. Returns the transactions applied
    (the caller removes them from the spool).

    One catalog query per destination and one record of every change, whatever the
    number of reports (a sensor tick may take up 1,000). Where two reports name the same
    sent delivery, the first one (oldest) decides, as if they were applied one by one.
    """
    answers: list[tuple[str, Confirmation]] = []
    for report in reports:
        if report.get("state") != "reported":
            continue
        peer = report.get("peer") or {}
        destination = f"dicom {peer.get('aet', '')}@{peer.get('host', '')}:{peer.get('port', '')}"
        expired = report.get("expired")  # never reported: CommitmentSpool.reported
        failed = {
            f["sop_instance_uid"]: expired
            or f"failure reason 0x{int(f.get('failure_reason') or 0):04X}"
            for f in report.get("failed") or []
        }
        committed = tuple(
            str(ref[1]) if isinstance(ref, list | tuple) else str(ref)
            for ref in report.get("committed") or ()
        )  # the spool keeps [SOP Class UID, SOP Instance UID] pairs
        answer = Confirmation(
            str(report["transaction_uid"]),
            "failures" if failed else "committed",
            committed,
            failed,
        )
        answers.append((destination, answer))
    named: dict[str, set[str]] = {}
    for destination, answer in answers:
        named.setdefault(destination, set()).update(answer.committed, answer.failed)
    sent: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for destination, uids in named.items():
        for row in catalog.query_dicts(
            "SELECT * FROM delivery_status WHERE destination = ? AND status = ? "
            "AND sop_instance_uid IN (SELECT unnest(?))",
            [destination, SENT, sorted(uids)],
        ):
            sent.setdefault((destination, str(row["sop_instance_uid"])), []).append(row)
    changes: list[dict[str, Any]] = []
    for destination, answer in answers:
        rows = [
            row
            for uid in sorted({*answer.committed, *answer.failed})
            for row in sent.pop((destination, uid), [])  # taken: a later report finds none
        ]
        if rows:
            changes.extend(confirmation_rows(rows, answer, now, retry))
    if changes:
        record(changes)
    return [answer.transaction_uid for _destination, answer in answers]


def apply_spooled_reports(
    catalog: CatalogReader,
    spool: CommitmentSpool,
    record: Record,
    *,
    now: datetime,
    retry: RetryPolicy = RetryPolicy(),
    limit: int = REPORTS_PER_TICK,
) -> list[str]:
    """One sensor tick's share of the commitment spool: its reported records, oldest
    first, at most `limit` read (:meth:`CommitmentSpool.reported`, one in memory at a
    time), applied (:func:`apply_commitment_reports`) and removed. Returns the
    transactions applied; the rest wait for the next call."""
    applied = apply_commitment_reports(catalog, spool.reported(limit), record, now=now, retry=retry)
    for transaction in applied:
        spool.remove(transaction)
    return applied


# ------------------------------------------------------------------------------- by hand


def retry_dead(
    catalog: CatalogReader,
    record: Record,
    *,
    now: datetime | None = None,
    destination: str | None = None,
    rule: str | None = None,
    study: str | None = None,
    include_failed: bool = False,
) -> int:
    """Queue again (attempts from 0, due now) every dead delivery — and with
    `include_failed` every failed one too, without waiting for its backoff — optionally of
    one destination, rule or study. Returns how many were queued."""
    when = now or datetime.now(UTC)
    states = [DEAD, FAILED] if include_failed else [DEAD]
    where: list[str] = ["status IN (SELECT unnest(?))"]
    params: list[Any] = [states]
    for column, value in (
        ("destination", destination),
        ("rule", rule),
        ("study_instance_uid", study),
    ):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    rows = catalog.query_dicts(
        "SELECT sop_instance_uid, checksum, rule, destination, study_instance_uid, priority, "
        f"queued_at, last_error FROM open_deliveries WHERE {' AND '.join(where)}",
        params,
    )
    if rows:
        record(
            [
                _outcome(
                    {**r, "queued_at": r["queued_at"] or when},
                    QUEUED,
                    when,
                    attempts=0,
                    next_attempt_at=when,
                    error=r["last_error"],
                    detail="queued again by hand",
                )
                for r in rows
            ]
        )
    return len(rows)


# ------------------------------------------------------------------------------- the log


@dataclass(frozen=True)
class Backlog:
    """One destination's state in the log (asset checks and metadata)."""

    destination: str
    queued: int
    waiting: int
    failed: int
    dead: int
    delivered: int
    oldest_due_at: datetime | None

    def age_seconds(self, now: datetime) -> float:
        """How long the oldest undelivered, due delivery has waited."""
        return 0.0 if self.oldest_due_at is None else (now - self.oldest_due_at).total_seconds()


def backlog(catalog: CatalogReader) -> list[Backlog]:
    """Per destination: how many deliveries are in each state, and since when the oldest
    one not yet delivered (queued or failed) was queued."""
    rows = catalog.query(
        "SELECT destination, "
        f"count(*) FILTER (WHERE status = '{QUEUED}'), "
        f"count(*) FILTER (WHERE status = '{WAITING}'), "
        f"count(*) FILTER (WHERE status = '{FAILED}'), "
        f"count(*) FILTER (WHERE status = '{DEAD}'), "
        f"count(*) FILTER (WHERE status IN ('{SENT}', '{COMMITTED}')), "
        f"min(queued_at) FILTER (WHERE status IN ('{QUEUED}', '{FAILED}')) "
        "FROM delivery_status GROUP BY destination ORDER BY destination"
    )
    return [Backlog(*r) for r in rows]


@dataclass(frozen=True)
class StudyDeliveries:
    """One study at one destination: its current instances routed there, and how many the
    destination has taken (``sent``/``committed``) and confirmed (``committed``)."""

    destination: str
    study_instance_uid: str
    routed: int
    delivered: int
    committed: int
    pending: int  # queued, waiting or failed: still on the way
    dead: int
    last_change: datetime | None

    def unconfirmed(self, needs_commitment: bool) -> int:
        """Routed instances the destination has not confirmed (committed, when it takes
        Storage Commitment; else stored)."""
        return self.routed - (self.committed if needs_commitment else self.delivered)


def reconcile(catalog: CatalogReader) -> list[StudyDeliveries]:
    """Per study and destination, what the catalog holds now (the current version of each
    routed instance) against what the destination took and confirmed: superseded versions
    do not count, so a study re-sent with corrections reads unconfirmed until the new
    versions are delivered."""
    rows = catalog.query(
        "SELECT d.destination, d.study_instance_uid, count(*), "
        f"count(*) FILTER (WHERE d.status IN ('{SENT}', '{COMMITTED}')), "
        f"count(*) FILTER (WHERE d.status = '{COMMITTED}'), "
        f"count(*) FILTER (WHERE d.status IN ('{QUEUED}', '{WAITING}', '{FAILED}')), "
        f"count(*) FILTER (WHERE d.status = '{DEAD}'), max(d.changed_at) "
        "FROM delivery_status d JOIN instances i "
        "ON i.sop_instance_uid = d.sop_instance_uid AND i.checksum = d.checksum "
        f"WHERE d.status <> '{CANCELLED}' GROUP BY 1, 2 ORDER BY 1, 2"
    )
    return [StudyDeliveries(*r) for r in rows]
