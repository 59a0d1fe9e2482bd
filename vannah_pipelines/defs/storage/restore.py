"""Restores from the cold tier: a sensor over the restore spool, one run per pending study,
re-checked while the archive is still restoring; the restored studies as an asset."""

import time
from collections.abc import Iterator
from datetime import UTC, datetime

import dagster as dg

from vannah_pipelines.defs.resources import ArchiveResource
from vannah_pipelines.storage.lifecycle import open_catalog
from vannah_pipelines.storage.restore import complete_request, pending_requests
from vannah_pipelines.storage.restoring import (
    InstanceState,
    RestoreBacklog,
    UnknownStudyError,
    dump_attempts,
    load_attempts,
    load_pending,
    plan_restore_runs,
    recheck_seconds,
    restore_backlog,
    restore_study,
)

STUDY_TAG = "vannah/study_uid"
RUN_KEY_TAG = "vannah/run_key"
MAX_RUNS_PER_TICK = 25  # the rest wait for the next tick (the run queue limits the rest)
# Run monitoring (dagster.yaml) fails a run that exceeds this; the sensor then runs the
# study again like any failed run.
MAX_RUNTIME_SECONDS = 6 * 3600
_UNDER_WAY = [
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


def _now() -> float:
    """Epoch seconds (a seam for tests of the re-check delay)."""
    return time.time()


class RestoreConfig(dg.Config):
    """The study this run restores (set by restore_request_sensor)."""

    study_uid: str


def backlog_metadata(backlog: RestoreBacklog) -> dict[str, dg.MetadataValue]:
    """The restore spool at a glance (counts and ages only)."""
    return {
        "pending_requests": dg.MetadataValue.int(backlog.requests),
        "pending_prior_requests": dg.MetadataValue.int(backlog.priors),
        "oldest_request_age_s": dg.MetadataValue.float(round(backlog.oldest_age_s, 3)),
    }


@dg.asset(
    group_name="storage",
    kinds={"dicom", "s3"},
    check_specs=[
        dg.AssetCheckSpec(
            "restored_copies_match_catalog",
            asset="restored_studies",
            description="Every copy the archive handed back hashed to the catalog's SHA-256 "
            "(a copy that did not is neither kept nor recorded hot; its request stays).",
        )
    ],
    tags={"vannah/domain": "storage"},
    retry_policy=dg.RetryPolicy(max_retries=3, delay=10),
)
def restored_studies(
    context: dg.AssetExecutionContext, config: RestoreConfig, archive: ArchiveResource
) -> Iterator[dg.MaterializeResult[None] | dg.AssetCheckResult]:
    """Studies brought back from the cold tier into the hot tier: copied from the archive
    once it has made them readable, verified against the catalog's SHA-256, recorded hot
    and held there for restore_cache_days (then the lifecycle drops the hot copy; the cold
    object stays). Each materialization is one study; its metadata also shows the spool."""
    settings = archive.settings()
    catalog = open_catalog(settings)
    try:
        result = restore_study(
            settings, catalog, config.study_uid, changed_by=f"dagster:{context.run_id}"
        )
    except UnknownStudyError as exc:
        complete_request(settings, config.study_uid)  # nothing to restore, ever
        context.log.warning("%s: its restore request is removed", exc)
        yield dg.MaterializeResult(
            metadata={"study_uid": config.study_uid, "state": "unknown study"}
        )
        yield dg.AssetCheckResult(check_name="restored_copies_match_catalog", passed=True)
        return
    finally:
        catalog.close()
    now = datetime.now(UTC)
    backlog = restore_backlog(pending_requests(settings), now)
    context.log.info("%s; %s", result.describe(), backlog.describe())
    metadata: dict[str, dg.MetadataValue] = {
        "study_uid": dg.MetadataValue.text(result.study_uid),
        "state": dg.MetadataValue.text(result.state.value),
        "instances": dg.MetadataValue.int(len(result.instances)),
        "instances_restored": dg.MetadataValue.int(result.restored),
        "instances_pending": dg.MetadataValue.int(result.pending),
        "instances_failed": dg.MetadataValue.int(result.failed),
        "bytes_restored": dg.MetadataValue.int(result.bytes_restored),
        **backlog_metadata(backlog),
    }
    if result.requested_at is not None:
        latency = (now - result.requested_at).total_seconds()
        metadata["restore_latency_s"] = dg.MetadataValue.float(round(latency, 3))
    if result.hot_until is not None:
        metadata["hot_until"] = dg.MetadataValue.text(result.hot_until.isoformat())
    if result.error is not None:
        # The archive did not answer: the request stays; the sensor runs it again later
        # (not this run's retries: an archive outage outlasts them).
        raise dg.Failure(
            description=f"archive unreachable, restore will be retried: {result.error}",
            metadata=metadata,
            allow_retries=False,
        )
    failed = [i for i in result.instances if i.state is InstanceState.FAILED]
    for i in failed:
        context.log.warning("instance %s not restored: %s", i.sop_instance_uid, i.detail)
    yield dg.MaterializeResult(metadata=metadata)
    mismatched = [i.sop_instance_uid for i in failed if i.mismatch]
    yield dg.AssetCheckResult(
        check_name="restored_copies_match_catalog",
        passed=not mismatched,
        metadata={
            "mismatched": dg.MetadataValue.int(len(mismatched)),
            "examples": dg.MetadataValue.json(mismatched[:10]),
            "failed": dg.MetadataValue.int(len(failed)),
        },
    )


restore_study_job = dg.define_asset_job(
    "restore_study_job",
    selection=[restored_studies],
    executor_def=dg.in_process_executor,
    tags={"vannah/domain": "storage"},
)


def studies_under_way(instance: dg.DagsterInstance) -> set[str]:
    """Studies whose restore run is queued or running (one query, whatever the backlog)."""
    runs = instance.get_runs(
        filters=dg.RunsFilter(job_name=restore_study_job.name, statuses=_UNDER_WAY)
    )
    return {run.tags[STUDY_TAG] for run in runs if STUDY_TAG in run.tags}


@dg.sensor(
    job=restore_study_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Requests a restore run per study in the restore spool (filed by reads of "
    "cold studies, the priors prefetch and `vannah restore`); a study is never run twice at "
    "once, and is run again later while the archive is still restoring it. The skip reason "
    "shows the spool; restored_studies gets an observation whenever its size changes.",
)
def restore_request_sensor(
    context: dg.SensorEvaluationContext, archive: ArchiveResource
) -> dg.SensorResult:
    """Request restore runs for the pending restore requests."""
    settings = archive.settings()
    requests = pending_requests(settings)
    now = _now()
    plan = plan_restore_runs(
        requests,
        load_attempts(context.cursor),
        studies_under_way(context.instance) if requests else set(),
        now=now,
        recheck_after=recheck_seconds(settings),
        max_runs=MAX_RUNS_PER_TICK,
    )
    backlog = restore_backlog(requests, datetime.fromtimestamp(now, UTC))
    cursor = dump_attempts(plan.state, len(requests))
    events = []
    if len(requests) != load_pending(context.cursor):
        events.append(
            dg.AssetObservation(asset_key=restored_studies.key, metadata=backlog_metadata(backlog))
        )
    if not plan.runs:
        return dg.SensorResult(
            skip_reason=f"{backlog.describe()}; {plan.describe()}",
            cursor=cursor,
            asset_events=events,
        )
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(
                run_key=run.run_key,
                run_config=dg.RunConfig(
                    ops={"restored_studies": RestoreConfig(study_uid=run.study_uid)}
                ),
                tags={
                    STUDY_TAG: run.study_uid,
                    RUN_KEY_TAG: run.run_key,
                    "vannah/attempt": str(run.attempt),
                    "vannah/reason": run.reason[:40],
                    "dagster/max_runtime_seconds": str(MAX_RUNTIME_SECONDS),
                },
            )
            for run in plan.runs
        ],
        cursor=cursor,
        asset_events=events,
    )
