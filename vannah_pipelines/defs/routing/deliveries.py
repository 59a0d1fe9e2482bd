"""Routing in Dagster: a sensor queues a delivery per route of each newly indexed instance
and requests one run per destination with due deliveries; the run sends them
(``routed_instances``) with metadata per destination; checks watch the backlog, the dead
letters, the failure rate and whether each destination answers."""

import json
import threading
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import dagster as dg

from vannah_pipelines.catalog.changes import DEAD, DELIVERIES, FAILED, QUEUED
from vannah_pipelines.catalog.lake import record_change
from vannah_pipelines.catalog.reader import CatalogReader
from vannah_pipelines.defs.resources import ArchiveResource
from vannah_pipelines.dimse.commitment import request_commitment
from vannah_pipelines.dimse.outbound import echo
from vannah_pipelines.dimse.peers import DicomPeer
from vannah_pipelines.dimse.route_sender import dicom_senders
from vannah_pipelines.routing.commitments import CommitmentSpool, commitments_dir
from vannah_pipelines.routing.deliveries import (
    PRIORITY_RANK,
    Confirm,
    Confirmation,
    DeliveryResult,
    Record,
    RetryPolicy,
    apply_spooled_reports,
    backlog,
    deliver_while_busy,
    destination_id,
    due_deliveries,
    queue_deliveries,
    reconcile,
    retry_dead,
    tier_opener,
)
from vannah_pipelines.routing.reach import check_destination
from vannah_pipelines.routing.rules import DicomDestination, RoutingRules, Rule
from vannah_pipelines.routing.senders import Sender, build_sender
from vannah_pipelines.routing.source import RulesSource
from vannah_pipelines.settings import Settings
from vannah_pipelines.storage.lifecycle import open_catalog
from vannah_pipelines.storage.tiers import StorageTiers

DESTINATION_TAG = "vannah/destination"
KIND_TAG = "vannah/kind"  # "routing": dagster.yaml keeps a run slot for ingest
# dagster/priority of a run by its most urgent delivery: the run queue starts STAT first.
RUN_PRIORITY = {"STAT": 30, "HIGH": 20, "ROUTINE": 10, "LOW": 0}
FAILURE_RATE_ALERT = 0.1  # routing_failure_rate_low fails above this share, last 24 h
_NOT_STARTED = (dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.QUEUED)
_UNDER_WAY = [
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]

_sources: dict[tuple[str, str], RulesSource] = {}
_sources_lock = threading.Lock()
# The sensor's catalog, kept between ticks (refreshed each tick: a few stat calls and the
# files added since, not the whole catalog opened again every few seconds).
_catalogs: dict[str, CatalogReader] = {}
_catalogs_lock = threading.Lock()


def sensor_catalog(settings: Settings) -> CatalogReader:
    """This process's catalog reader for the sensor, brought up to date."""
    key = str(settings.catalog_dir)
    with _catalogs_lock:
        reader = _catalogs.get(key)
        if reader is None:
            reader = _catalogs[key] = open_catalog(settings)
            return reader
    try:
        reader.refresh()
    except Exception:
        with _catalogs_lock:  # a reader that cannot refresh is replaced, never reused
            _catalogs.pop(key, None)
        reader.close()
        raise
    return reader


def rules_in_force(settings: Settings) -> tuple[RoutingRules, RulesSource]:
    """The rules in force (one source per rules file and data folder in this process, so
    a file's last good rules and its error are kept between ticks)."""
    key = (str(settings.routing_rules_file), str(settings.routing_dir))
    with _sources_lock:
        source = _sources.get(key)
        if source is None:
            source = _sources[key] = RulesSource.from_settings(settings)
    return source.current(), source


def recorder(settings: Settings, changed_by: str) -> Record:
    """Append delivery rows to the catalog (and the lake when configured)."""

    def record(rows: list[dict[str, Any]]) -> None:
        record_change(settings, DELIVERIES, rows, changed_by=changed_by)

    return record


def sender_factory(settings: Settings) -> Any:
    """Build the sender of a rule's destination, DICOM through the dimse package."""
    secrets = {k: v.get_secret_value() for k, v in settings.routing_secrets.items()}
    dicom = dicom_senders(settings)

    def sender_for(rule: Rule) -> Sender:
        return build_sender(
            rule.destination,
            secrets=secrets,
            calling_aet=settings.dicom_aet,
            coercion=rule.coerce,
            dicom=dicom,
        )

    return sender_for


def commitment_spool(settings: Settings) -> CommitmentSpool:
    return CommitmentSpool(commitments_dir(settings.data_dir))


def commitment_confirm(settings: Settings) -> Confirm:
    """Ask a DICOM destination to commit what it stored (Storage Commitment, waiting a
    few seconds for the report on the same association; else our receiver takes it)."""
    spool = commitment_spool(settings)

    def confirm(rule: Rule, refs: list[tuple[str, str]]) -> Confirmation:
        dest = rule.destination
        assert isinstance(dest, DicomDestination)
        tls = None
        if dest.use_dicom_tls:
            from vannah_pipelines.dimse.tls import client_tls_context

            tls = client_tls_context(settings)
        result = request_commitment(
            DicomPeer(dest.aet, dest.host, dest.port, tls),
            refs,
            calling_aet=settings.dicom_aet,
            spool=spool,
        )
        if result.outcome in ("committed", "failures"):
            spool.remove(result.transaction_uid)  # applied by the run, not the sensor
        return Confirmation(
            result.transaction_uid,
            result.outcome,
            tuple(result.committed),
            {f.sop_instance_uid: f"failure reason 0x{f.failure_reason:04X}" for f in result.failed},
            result.reason,
        )

    return confirm


def retry_policy(settings: Settings) -> RetryPolicy:
    return RetryPolicy(
        settings.routing_max_attempts,
        settings.routing_retry_seconds,
        settings.routing_retry_max_seconds,
    )


class RouteConfig(dg.Config):
    """The destination this run sends to (set by indexed_instance_sensor; empty: all), and
    how long it lingers for more work (negative: routing_run_linger_seconds)."""

    destination: str = ""
    linger_seconds: float = -1.0


def _metadata(result: DeliveryResult, now: datetime) -> dict[str, dg.MetadataValue]:
    metadata: dict[str, dg.MetadataValue] = {
        "instances_sent": dg.MetadataValue.int(result.sent),
        "instances_failed": dg.MetadataValue.int(result.failed),
        "bytes_sent": dg.MetadataValue.int(sum(s.bytes_sent for s in result.destinations.values())),
    }
    table = []
    for dest, s in sorted(result.destinations.items()):
        age = (now - s.oldest_queued_at).total_seconds() if s.oldest_queued_at else 0.0
        table.append(
            {
                "destination": dest,
                "sent": s.sent,
                "failed": s.failed,
                "dead": s.dead,
                "cancelled": s.cancelled,
                "committed": s.committed,
                "not_committed": s.not_committed,
                "bytes_sent": s.bytes_sent,
                "seconds": round(s.seconds, 3),
                "queue_age_s": round(age, 3),
                "errors": dict(s.errors.most_common(3)),
            }
        )
    metadata["destinations"] = dg.MetadataValue.json(table)
    if len(result.destinations) == 1:
        (stats,) = result.destinations.values()
        if stats.oldest_queued_at is not None:
            age = (now - stats.oldest_queued_at).total_seconds()
            metadata["queue_age_s"] = dg.MetadataValue.float(round(age, 3))
        if stats.seconds > 0:
            mb_s = stats.bytes_sent / 1e6 / stats.seconds
            metadata["mb_per_s"] = dg.MetadataValue.float(round(mb_s, 3))
    return metadata


@dg.asset(
    group_name="routing",
    kinds={"dicom", "s3"},
    tags={"vannah/domain": "routing"},
)
def routed_instances(
    context: dg.AssetExecutionContext, config: RouteConfig, archive: ArchiveResource
) -> dg.MaterializeResult[None]:
    """Instances delivered to the routing destinations: every due delivery of one
    destination (or all) sent, most urgent first, each batch's outcome appended to the
    catalog's delivery log (``delivery_status``) before the next goes; the run goes on
    queueing and sending what is indexed next until nothing was due for
    routing_run_linger_seconds. Metadata per destination: instances and bytes sent,
    failures, dead letters, queue age."""
    settings = archive.settings()
    _, source = rules_in_force(settings)
    if source.error:
        context.log.warning("routing rules: %s (the last good rules stay in force)", source.error)
    catalog = open_catalog(settings)
    linger = config.linger_seconds
    try:
        result = deliver_while_busy(
            catalog,
            lambda: rules_in_force(settings)[0],
            recorder(settings, f"dagster:{context.run.run_id}"),
            tier_opener(StorageTiers(settings)),
            sender_factory(settings),
            destination=config.destination or None,
            retry=retry_policy(settings),
            confirm=commitment_confirm(settings),
            queue_window=timedelta(seconds=settings.routing_rescan_seconds),
            linger_seconds=settings.routing_run_linger_seconds if linger < 0 else linger,
            max_seconds=settings.routing_run_max_seconds,
            others_waiting=lambda: _others_waiting(context.instance, config.destination),
        )
    finally:
        catalog.close()
    for dest, stats in result.destinations.items():
        context.log.info(
            "%s: %d sent (%d bytes), %d failed, %d dead, %d cancelled in %.1f s",
            dest, stats.sent, stats.bytes_sent, stats.failed, stats.dead, stats.cancelled,
            stats.seconds,
        )  # fmt: skip
        for error, count in stats.errors.most_common(3):
            context.log.warning("%s: %d x %s", dest, count, error)
    return dg.MaterializeResult(metadata=_metadata(result, datetime.now(UTC)))


route_instances_job = dg.define_asset_job(
    "route_instances_job",
    selection=dg.AssetSelection.assets(routed_instances),
    executor_def=dg.in_process_executor,
    tags={KIND_TAG: "routing", "vannah/domain": "routing"},
)


def _others_waiting(instance: dg.DagsterInstance, destination: str) -> bool:
    """Whether routing runs of other destinations wait in the run queue (this run then
    gives its place up instead of lingering)."""
    runs = instance.get_runs(
        filters=dg.RunsFilter(
            job_name=route_instances_job.name, statuses=[dg.DagsterRunStatus.QUEUED]
        ),
        limit=20,
    )
    return any(run.tags.get(DESTINATION_TAG) != destination for run in runs)


def destinations_under_way(
    instance: dg.DagsterInstance, urgent: Mapping[str, str] | None = None
) -> set[str]:
    """Destinations with a routing run queued or running (one query).

    A run still queued for a destination whose most urgent due delivery (`urgent`:
    destination -> priority) now outranks it has its ``dagster/priority`` raised: a STAT
    study arriving while a routine run waits in the queue moves that run ahead of other
    destinations' routine runs (once started, a run sends STAT first anyway)."""
    runs = instance.get_runs(
        filters=dg.RunsFilter(job_name=route_instances_job.name, statuses=_UNDER_WAY)
    )
    for run in runs:
        wanted = (urgent or {}).get(run.tags.get(DESTINATION_TAG, ""))
        if run.status not in _NOT_STARTED or wanted is None:
            continue
        priority = RUN_PRIORITY.get(wanted, 10)
        if priority > int(run.tags.get("dagster/priority", "0")):
            instance.add_run_tags(
                run.run_id, {"dagster/priority": str(priority), "vannah/priority": wanted}
            )
    return {run.tags[DESTINATION_TAG] for run in runs if DESTINATION_TAG in run.tags}


def _cursor(text: str | None) -> datetime | None:
    if not text:
        return None
    value = json.loads(text).get("indexed_at")
    return datetime.fromisoformat(value) if value else None


@dg.sensor(
    job=route_instances_job,
    minimum_interval_seconds=5,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Queues a delivery per route of each instance indexed since its cursor "
    "(looking routing_rescan_seconds back again, so a late batch is not missed; the delivery "
    "log never queues one twice), then requests a run per destination with due deliveries "
    "and none under way, prioritised by its most urgent delivery (STAT first).",
)
def indexed_instance_sensor(
    context: dg.SensorEvaluationContext, archive: ArchiveResource
) -> dg.SensorResult:
    """Queue deliveries for newly indexed instances; request runs for due ones."""
    settings = archive.settings()
    rules, source = rules_in_force(settings)
    now = datetime.now(UTC)
    cursor = _cursor(context.cursor)
    catalog = sensor_catalog(settings)
    since = None if cursor is None else cursor - timedelta(seconds=settings.routing_rescan_seconds)
    queued = queue_deliveries(
        catalog, rules, recorder(settings, "dagster:indexed_instance_sensor"),
        since=since, now=now,
    )  # fmt: skip
    applied = apply_spooled_reports(  # at most REPORTS_PER_TICK records per tick
        catalog, commitment_spool(settings), recorder(settings, "dagster:indexed_instance_sensor"),
        now=now, retry=retry_policy(settings),
    )  # fmt: skip
    if queued.queued or queued.waiting or applied:
        catalog.refresh()  # see the rows just appended
    # Due now, or within a run's linger (a study about to be stable): a run started now is
    # there when they are due, instead of starting only then.
    soon = timedelta(seconds=settings.routing_run_linger_seconds)
    due = due_deliveries(catalog, rules, now=now + soon)
    latest = queued.last_indexed_at or cursor
    new_cursor = json.dumps({"indexed_at": latest.isoformat() if latest else None})
    urgent: dict[str, str] = {}
    for row in due:  # most urgent first
        urgent.setdefault(row["destination"], row["priority"] or "ROUTINE")
    busy = destinations_under_way(context.instance, urgent) if urgent else set()
    requests = [
        dg.RunRequest(
            run_key=f"{dest}@{now.isoformat()}",
            run_config=dg.RunConfig(ops={"routed_instances": RouteConfig(destination=dest)}),
            tags={
                DESTINATION_TAG: dest,
                KIND_TAG: "routing",
                "dagster/priority": str(RUN_PRIORITY.get(priority, 10)),
                "vannah/priority": priority,
            },
        )
        for dest, priority in sorted(urgent.items(), key=lambda i: PRIORITY_RANK.get(i[1], 2))
        if dest not in busy
    ]
    summary = (
        f"{queued.instances} instances indexed since the cursor, {queued.queued} queued, "
        f"{queued.waiting} waiting for their study; {len(due)} due at "
        f"{len(urgent)} destinations ({len(busy)} under way)"
        + (f"; rules: {source.error}" if source.error else "")
    )
    if not requests:
        return dg.SensorResult(skip_reason=summary, cursor=new_cursor)
    context.log.info(summary)
    return dg.SensorResult(run_requests=requests, cursor=new_cursor)


@dg.asset(
    group_name="routing",
    kinds={"duckdb"},
    tags={"vannah/domain": "routing"},
    check_specs=[
        dg.AssetCheckSpec(
            "deliveries_confirmed",
            asset="delivery_reconciliation",
            description="Every study settled at a destination (nothing still on the way "
            "for routing_backlog_alert_seconds) is confirmed there whole: committed when "
            "the destination takes Storage Commitment, else stored.",
        )
    ],
)
def delivery_reconciliation(
    archive: ArchiveResource,
) -> Iterator[dg.MaterializeResult[None] | dg.AssetCheckResult]:
    """Per study and destination, what the catalog holds (current versions of the routed
    instances) against what the destination took and confirmed (the delivery log)."""
    settings = archive.settings()
    rules, _ = rules_in_force(settings)
    committing = {
        destination_id(r)
        for r in rules.rules
        if isinstance(r.destination, DicomDestination) and r.destination.storage_commitment
    }
    catalog = open_catalog(settings)
    try:
        studies = reconcile(catalog)
    finally:
        catalog.close()
    settled_before = datetime.now(UTC) - timedelta(seconds=settings.routing_backlog_alert_seconds)
    per_destination: dict[str, dict[str, int]] = {}
    gaps = []
    for s in studies:
        tally = per_destination.setdefault(
            s.destination, {"studies": 0, "confirmed": 0, "unconfirmed": 0, "on_the_way": 0}
        )
        tally["studies"] += 1
        missing = s.unconfirmed(s.destination in committing)
        if s.pending:
            tally["on_the_way"] += 1
        elif missing:
            tally["unconfirmed"] += 1
            if s.last_change is None or s.last_change < settled_before:
                gaps.append(
                    {
                        "destination": s.destination,
                        "study_uid": s.study_instance_uid,
                        "routed": s.routed,
                        "delivered": s.delivered,
                        "committed": s.committed,
                        "dead": s.dead,
                    }
                )
        else:
            tally["confirmed"] += 1
    yield dg.MaterializeResult(
        metadata={
            "studies": dg.MetadataValue.int(len({s.study_instance_uid for s in studies})),
            "destinations": dg.MetadataValue.json(per_destination),
            "unconfirmed_examples": dg.MetadataValue.json(gaps[:20]),
        }
    )
    yield dg.AssetCheckResult(
        check_name="deliveries_confirmed",
        passed=not gaps,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"unconfirmed_studies": dg.MetadataValue.int(len(gaps))},
    )


reconcile_deliveries_job = dg.define_asset_job(
    "reconcile_deliveries_job",
    selection=dg.AssetSelection.assets(delivery_reconciliation),
    executor_def=dg.in_process_executor,
    tags={"vannah/domain": "routing"},
)


@dg.schedule(
    job=reconcile_deliveries_job,
    cron_schedule="7 * * * *",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Compares, per study and destination, what was confirmed with what the "
    "catalog holds (skipped while no routing rules are in force).",
)
def hourly_delivery_reconciliation_schedule(
    context: dg.ScheduleEvaluationContext, archive: ArchiveResource
) -> dg.RunRequest | dg.SkipReason:
    return _when_routing(archive, "delivery reconciliation")


# ---------------------------------------------------------------------------- checks


@dg.asset_check(
    asset=routed_instances,
    description="No due delivery has waited longer than routing_backlog_alert_seconds.",
)
def routing_backlog_fresh(archive: ArchiveResource) -> dg.AssetCheckResult:
    settings = archive.settings()
    catalog = open_catalog(settings)
    try:
        rows = backlog(catalog)
    finally:
        catalog.close()
    now = datetime.now(UTC)
    ages = {b.destination: round(b.age_seconds(now), 1) for b in rows}
    late = {d: a for d, a in ages.items() if a > settings.routing_backlog_alert_seconds}
    return dg.AssetCheckResult(
        passed=not late,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "oldest_due_age_s": dg.MetadataValue.json(ages),
            "queued": dg.MetadataValue.json({b.destination: b.queued for b in rows}),
            "waiting_for_stable_study": dg.MetadataValue.json(
                {b.destination: b.waiting for b in rows}
            ),
            "late_destinations": dg.MetadataValue.json(sorted(late)),
        },
    )


@dg.asset_check(
    asset=routed_instances,
    description="No delivery is dead-lettered (retry: `vannah route --retry` or "
    "retry_deliveries_job).",
)
def no_dead_deliveries(archive: ArchiveResource) -> dg.AssetCheckResult:
    settings = archive.settings()
    catalog = open_catalog(settings)
    try:
        rows = backlog(catalog)
        examples = catalog.query_dicts(
            "SELECT destination, rule, sop_instance_uid, last_error FROM open_deliveries "
            f"WHERE status = '{DEAD}' ORDER BY changed_at DESC LIMIT 5"
        )
    finally:
        catalog.close()
    dead = {b.destination: b.dead for b in rows if b.dead}
    return dg.AssetCheckResult(
        passed=not dead,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "dead": dg.MetadataValue.json(dead),
            "examples": dg.MetadataValue.json(examples),
        },
    )


@dg.asset_check(
    asset=routed_instances,
    description=f"At most {FAILURE_RATE_ALERT:.0%} of the deliveries settled in the last 24 h "
    "ended failed or dead, per destination.",
)
def routing_failure_rate_low(archive: ArchiveResource) -> dg.AssetCheckResult:
    settings = archive.settings()
    catalog = open_catalog(settings)
    try:
        rows = catalog.query(
            f"SELECT destination, count(*) FILTER (WHERE status IN ('{FAILED}', '{DEAD}')), "
            f"count(*) FILTER (WHERE status <> '{QUEUED}') FROM delivery_status "
            "WHERE changed_at > ? GROUP BY destination",
            [datetime.now(UTC) - timedelta(days=1)],
        )
    finally:
        catalog.close()
    rates = {d: round(f / n, 4) for d, f, n in rows if n}
    high = {d: r for d, r in rates.items() if r > FAILURE_RATE_ALERT}
    return dg.AssetCheckResult(
        passed=not high,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"failure_rate_24h": dg.MetadataValue.json(rates)},
    )


@dg.asset_check(
    asset=routed_instances,
    description="Every destination of the rules in force answers: C-ECHO for DICOM AEs, "
    "the bucket for S3, the endpoint for STOW-RS, a writable folder.",
)
def routing_destinations_reachable(archive: ArchiveResource) -> dg.AssetCheckResult:
    settings = archive.settings()
    rules, _ = rules_in_force(settings)
    secrets = {k: v.get_secret_value() for k, v in settings.routing_secrets.items()}
    results = {}
    for rule in rules.rules:
        dest = destination_id(rule)
        if dest not in results:
            ok, detail = check_destination(
                rule.destination, secrets=secrets, calling_aet=settings.dicom_aet, echo=_echo
            )
            results[dest] = {"ok": ok, "detail": detail}
    down = sorted(d for d, r in results.items() if not r["ok"])
    return dg.AssetCheckResult(
        passed=not down,
        metadata={
            "destinations": dg.MetadataValue.json(results),
            "unreachable": dg.MetadataValue.json(down),
        },
    )


def _echo(destination: DicomDestination, calling_aet: str, timeout: float) -> tuple[bool, str]:
    result = echo(
        DicomPeer(destination.aet, destination.host, destination.port), calling_aet, timeout
    )
    return (
        result.ok,
        result.reason or f"C-ECHO 0x{result.status or 0:04X} in {result.latency_ms:.0f} ms",
    )


check_routing_job = dg.define_asset_job(
    "check_routing_job",
    selection=dg.AssetSelection.checks_for_assets(routed_instances),
    executor_def=dg.in_process_executor,
    tags={"vannah/domain": "routing"},
)


@dg.schedule(
    job=check_routing_job,
    cron_schedule="*/15 * * * *",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="The routing checks (backlog, dead letters, failure rate, reachability), "
    "also when nothing is being sent (skipped while no routing rules are in force).",
)
def every_15_minutes_routing_checks_schedule(
    context: dg.ScheduleEvaluationContext, archive: ArchiveResource
) -> dg.RunRequest | dg.SkipReason:
    return _when_routing(archive, "routing checks")


def _when_routing(archive: ArchiveResource, what: str) -> dg.RunRequest | dg.SkipReason:
    """A run when routing rules are in force, else a skip (a platform that routes nothing
    runs no routing jobs)."""
    rules, _ = rules_in_force(archive.settings())
    if not rules.rules:
        return dg.SkipReason(f"no routing rules: no {what}")
    return dg.RunRequest()


# ---------------------------------------------------------------------------- by hand


class RetryConfig(dg.Config):
    """Which dead deliveries to queue again (empty: all)."""

    destination: str = ""
    rule: str = ""
    study_uid: str = ""
    include_failed: bool = False


@dg.op(tags={"vannah/domain": "routing"})
def retried_deliveries(
    context: dg.OpExecutionContext, config: RetryConfig, archive: ArchiveResource
) -> int:
    """Queue dead deliveries again, attempts from 0 (the next sensor tick sends them)."""
    settings = archive.settings()
    catalog = open_catalog(settings)
    try:
        count = retry_dead(
            catalog,
            recorder(settings, f"dagster:{context.run.run_id}"),
            destination=config.destination or None,
            rule=config.rule or None,
            study=config.study_uid or None,
            include_failed=config.include_failed,
        )
    finally:
        catalog.close()
    context.log.info("%d deliveries queued again", count)
    context.add_output_metadata({"queued_again": count})
    return count


@dg.job(tags={"vannah/domain": "routing"}, executor_def=dg.in_process_executor)
def retry_deliveries_job() -> None:
    """Queue dead-lettered deliveries again (launch from the UI with a RetryConfig)."""
    retried_deliveries()
