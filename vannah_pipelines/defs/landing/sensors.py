"""The landing-zone sensor: ingest runs for sealed batches, retried with backoff when they
fail, split or quarantined when they keep failing; its cursor follows every batch."""

import time
from datetime import UTC, datetime

import dagster as dg

from vannah_pipelines.catalog.ingest import reason_kind
from vannah_pipelines.defs.catalog.assets import (
    DISK_FULL,
    FAILURE_TAG,
    IngestConfig,
    backlog_metadata,
    ingest_batch_job,
)
from vannah_pipelines.defs.resources import ArchiveResource
from vannah_pipelines.landing.plan import (
    RetryPolicy,
    RunOutcome,
    RunStatus,
    dump_cursor,
    has_space,
    landing_backlog,
    load_backlog_fresh,
    load_cursor,
    plan_ingest_runs,
)

RUN_KEY_TAG = "vannah/run_key"
# Run monitoring (dagster.yaml) fails a run that exceeds this, e.g. hung with its code
# server gone; the sensor then retries it like any failed run.
MAX_RUNTIME_SECONDS = 3600
_FINISHED_BADLY = {dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}
_NOT_STARTED = {
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.STARTING,
}


def _now() -> float:
    """Epoch seconds (a seam for tests of the backoff)."""
    return time.time()


def _failure_text(instance: dg.DagsterInstance, run: dg.DagsterRun) -> str:
    """'<ExceptionType>: message' of the step that failed, or what failed the run."""
    for record in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_FAILURE):
        event = record.dagster_event
        data = event.step_failure_data if event is not None else None
        if data is not None and data.user_failure_data is not None:
            return f"Failure: {data.user_failure_data.description or ''}".strip()
        error = data.error if data is not None else None
        while error is not None and (error.cls_name or "").startswith("Dagster") and error.cause:
            error = error.cause  # the user code's exception, not Dagster's wrapper
        if error is not None:
            return f"{error.cls_name}: {error.message.strip()}"
    messages = [
        record.message
        for record in instance.all_logs(
            run.run_id, of_type={dg.DagsterEventType.ENGINE_EVENT, dg.DagsterEventType.RUN_FAILURE}
        )
        if record.message and ("terminated" in record.message or "fail" in record.message.lower())
    ]
    detail = messages[0] if messages else f"run {run.status.value}"
    return f"RunFailed: run {run.run_id}: {detail.strip()}"


def run_outcome(instance: dg.DagsterInstance, run_key: str) -> RunOutcome:
    """What became of the ingest run requested under `run_key` (public instance API)."""
    if not run_key:
        return RunOutcome(RunStatus.UNKNOWN)
    runs = instance.get_runs(filters=dg.RunsFilter(tags={RUN_KEY_TAG: run_key}), limit=1)
    if not runs:
        return RunOutcome(RunStatus.UNKNOWN)
    run = runs[0]
    if run.status == dg.DagsterRunStatus.SUCCESS:
        return RunOutcome(RunStatus.SUCCESS)
    if run.status in _NOT_STARTED:
        return RunOutcome(RunStatus.WAITING)
    if run.status not in _FINISHED_BADLY:
        return RunOutcome(RunStatus.IN_PROGRESS)
    status = RunStatus.DISK_FULL if run.tags.get(FAILURE_TAG) == DISK_FULL else RunStatus.FAILED
    return RunOutcome(status, _failure_text(instance, run))


@dg.sensor(
    job=ingest_batch_job,
    minimum_interval_seconds=1,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Seals batches stranded by a crashed receiver, then requests ingest runs "
    "for sealed landing batches; a failed run's batches are retried with backoff, split "
    "after ingest_max_attempts failures, and a lone file that keeps failing is quarantined.",
)
def landed_batch_sensor(
    context: dg.SensorEvaluationContext, archive: ArchiveResource
) -> dg.SensorResult:
    """Request ingest runs for the sealed landing batches, and follow them to the end."""
    settings = archive.settings()
    zone = archive.landing()
    stranded = zone.seal_stranded()
    now = _now()
    state = load_cursor(context.cursor, now)
    outcomes = {
        key: run_outcome(context.instance, key)
        for key in sorted({s.run_key for s in state.values() if s.run_key is not None})
    }
    # Listed after the look-ups: a run seen succeeded has already removed its batches.
    sealed = zone.sealed_batches()
    space_ok = not any(s.wait_space for s in state.values()) or has_space(
        [settings.hot_dir, settings.catalog_dir], settings.free_space_reserve_bytes
    )
    plan = plan_ingest_runs(
        sealed,
        state,
        outcomes,
        now=now,
        max_files=settings.ingest_run_max_files,
        policy=RetryPolicy(settings.ingest_max_attempts, settings.ingest_retry_base_seconds),
        space_ok=space_ok,
    )
    for batch_id, error in sorted(plan.failures.items()):
        # The kind of error only: the message is in the run's own log and the cursor.
        context.log.warning("ingest of batch %s failed: %s", batch_id, reason_kind(error))
    for batch_id in plan.splits:
        halves = zone.split(zone.batch(batch_id))
        context.log.warning(
            "batch %s kept failing: split into %s",
            batch_id,
            ", ".join(h.batch_id for h in halves),
        )
    backlog = landing_backlog(zone.sealed_batches() if plan.splits else sealed, datetime.now(UTC))
    cursor = dump_cursor(plan.state, backlog.fresh)
    # landing_backlog_fresh is evaluated by every ingest run, and here whenever it changes:
    # a backlog that no run drains (every run failing, none requested) still fails it.
    checks = []
    if backlog.fresh != load_backlog_fresh(context.cursor):
        checks.append(
            dg.AssetCheckEvaluation(
                asset_key=dg.AssetKey("instance_index"),
                check_name="landing_backlog_fresh",
                passed=backlog.fresh,
                metadata=backlog_metadata(backlog),
            )
        )
    if not plan.runs:
        return dg.SensorResult(
            skip_reason=f"no batch to request; {backlog.describe()}; {plan.describe()}",
            cursor=cursor,
            asset_events=checks,
        )
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(
                run_key=run.run_key,
                partition_key=run.day.isoformat(),
                run_config=dg.RunConfig(
                    ops={
                        "instance_index": IngestConfig(
                            batch_ids=run.batch_ids, quarantine_reason=run.quarantine_reason
                        )
                    }
                ),
                tags={
                    RUN_KEY_TAG: run.run_key,
                    "vannah/first_batch": run.batch_ids[0],
                    "vannah/instances": str(run.files),
                    "vannah/attempt": str(run.attempt),
                    "vannah/stranded_sealed": str(len(stranded)),
                    "dagster/max_runtime_seconds": str(MAX_RUNTIME_SECONDS),
                },
            )
            for run in plan.runs
        ],
        cursor=cursor,
        asset_events=checks,
    )
