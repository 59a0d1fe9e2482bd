"""Priors prefetch: a sensor following the worklist's changes, and an asset that files restore
requests for the cold prior studies of newly scheduled patients."""

from datetime import UTC, datetime

import dagster as dg

from vannah_pipelines.defs.resources import ArchiveResource
from vannah_pipelines.storage.lifecycle import open_catalog
from vannah_pipelines.storage.prefetch import prefetch_priors, scheduled_steps, worklist_store
from vannah_pipelines.storage.restore import pending_requests
from vannah_pipelines.storage.restoring import PRIOR_REASON, restore_backlog


class PrefetchConfig(dg.Config):
    """The worklist event files this run reads: sequence numbers after_seq+1..through_seq
    (set by scheduled_step_sensor; no patient identifier travels in run config)."""

    after_seq: int
    through_seq: int


@dg.asset(
    group_name="storage",
    kinds={"dicom"},
    tags={"vannah/domain": "storage"},
    retry_policy=dg.RetryPolicy(max_retries=3, delay=10),
)
def prefetched_priors(
    context: dg.AssetExecutionContext, config: PrefetchConfig, archive: ArchiveResource
) -> dg.MaterializeResult[None]:
    """Restore requests for the prior studies in the cold tier of each patient the worklist
    has just scheduled (prefetch_lookback_days, at most prefetch_max_studies per step), so
    the priors are hot when the exam's images arrive; the restore job does the restoring.
    Its metadata shows the backlog of prior restores still pending."""
    settings = archive.settings()
    changes = worklist_store(settings).changes_after(config.after_seq, config.through_seq)
    steps = scheduled_steps(changes, datetime.now(UTC), settings.worklist_past_due_hours)
    catalog = open_catalog(settings)
    try:
        result = prefetch_priors(settings, catalog, steps)
    finally:
        catalog.close()
    requests = [r for r in pending_requests(settings) if r.reason == PRIOR_REASON]
    backlog = restore_backlog(requests, datetime.now(UTC))
    context.log.info("%s; %s", result.describe(), backlog.describe())
    return dg.MaterializeResult(
        metadata={
            "enabled": dg.MetadataValue.bool(settings.prefetch_priors),
            "worklist_changes": dg.MetadataValue.int(len(changes)),
            "scheduled_steps": dg.MetadataValue.int(result.steps),
            "patients": dg.MetadataValue.int(result.patients),
            "patients_with_cold_priors": dg.MetadataValue.int(result.patients_with_priors),
            "cold_priors": dg.MetadataValue.int(len(result.priors)),
            "requests_filed": dg.MetadataValue.int(len(result.filed)),
            "already_requested": dg.MetadataValue.int(result.already_requested),
            "pending_prior_requests": dg.MetadataValue.int(backlog.requests),
            "oldest_prior_request_age_s": dg.MetadataValue.float(round(backlog.oldest_age_s, 3)),
        }
    )


prefetch_priors_job = dg.define_asset_job(
    "prefetch_priors_job",
    selection=[prefetched_priors],
    executor_def=dg.in_process_executor,
    tags={"vannah/domain": "storage"},
)


@dg.sensor(
    job=prefetch_priors_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Follows the worklist's event files (REST, .wl import and HL7 orders alike) "
    "and requests a prefetch run for the steps scheduled since its cursor; off while "
    "prefetch_priors is false (steps scheduled meanwhile are not prefetched later).",
)
def scheduled_step_sensor(
    context: dg.SensorEvaluationContext, archive: ArchiveResource
) -> dg.SensorResult:
    """Request one prefetch run for the worklist changes since the cursor."""
    settings = archive.settings()
    latest = worklist_store(settings).last_seq()
    cursor = context.cursor or ""
    after = int(cursor) if cursor.isdigit() else 0
    if latest <= after:
        return dg.SensorResult(skip_reason=f"no worklist change since event {after}")
    if not settings.prefetch_priors:
        return dg.SensorResult(
            skip_reason=f"prefetch_priors is off: worklist events {after + 1}-{latest} passed",
            cursor=str(latest),
        )
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(
                run_key=f"prefetch-{after + 1}-{latest}",
                run_config=dg.RunConfig(
                    ops={"prefetched_priors": PrefetchConfig(after_seq=after, through_seq=latest)}
                ),
                tags={"vannah/worklist_events": f"{after + 1}-{latest}"},
            )
        ],
        cursor=str(latest),
    )
