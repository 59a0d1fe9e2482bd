"""Storage Commitment results the archive owes its requestors, delivered late: when the
receiver could not report one (the requestor was down, or the receiver stopped first), a
sensor sees it due and a run judges it afresh against the catalog and sends it on a new
association, with backoff (``vannah_pipelines.dimse.commitment_results``)."""

import time
from collections.abc import Iterator

import dagster as dg

from vannah_pipelines.catalog.holder import CatalogHolder
from vannah_pipelines.defs.resources import ArchiveResource
from vannah_pipelines.dimse.commitment_results import (
    IN_FLIGHT_SECONDS,
    RETRY_MAX_SECONDS,
    any_due,
    report_owed_results,
)

OVERDUE_SECONDS = RETRY_MAX_SECONDS  # commitment_results_delivered warns past this age


@dg.asset(
    group_name="routing",
    kinds={"dicom"},
    tags={"vannah/domain": "routing"},
    check_specs=[
        dg.AssetCheckSpec(
            "commitment_results_delivered",
            asset="commitment_results",
            description="No Storage Commitment result is owed to a requestor for longer "
            "than an hour, and none was given up (set aside after 7 days).",
        )
    ],
)
def commitment_results(
    archive: ArchiveResource,
) -> Iterator[dg.MaterializeResult[None] | dg.AssetCheckResult]:
    """The Storage Commitment results (N-EVENT-REPORT) the archive owes requestors that
    could not be reached when it first reported: each due one judged again against the
    catalog (indexed and landed instances) and sent on a new association to the
    requestor's AE title in ``dicom_modalities``."""
    settings = archive.settings()
    holder = CatalogHolder.for_settings(settings, refresh_seconds=0.0)
    try:
        started = time.monotonic()
        result = report_owed_results(settings, holder.get())
    finally:
        holder.close()
    yield dg.MaterializeResult(
        metadata={
            "delivered": dg.MetadataValue.int(result.delivered),
            "still_owed": dg.MetadataValue.int(result.still_owed),
            "failed_attempts": dg.MetadataValue.int(result.failed_attempts),
            "unknown_requestor": dg.MetadataValue.int(result.unknown_requestor),
            "expired": dg.MetadataValue.int(result.expired),
            "oldest_owed_seconds": dg.MetadataValue.float(round(result.oldest_seconds, 1)),
            "duration_seconds": dg.MetadataValue.float(round(time.monotonic() - started, 3)),
        }
    )
    yield dg.AssetCheckResult(
        check_name="commitment_results_delivered",
        passed=result.expired == 0 and result.oldest_seconds <= OVERDUE_SECONDS,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "still_owed": dg.MetadataValue.int(result.still_owed),
            "oldest_owed_seconds": dg.MetadataValue.float(round(result.oldest_seconds, 1)),
            "expired": dg.MetadataValue.int(result.expired),
        },
    )


report_commitment_results_job = dg.define_asset_job(
    "report_commitment_results_job",
    selection=dg.AssetSelection.assets(commitment_results),
    executor_def=dg.in_process_executor,
    tags={"vannah/domain": "routing"},
)


@dg.sensor(
    job=report_commitment_results_job,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Requests a run when a Storage Commitment result the archive owes is due "
    f"again (not on a receiver's report thread any more: {IN_FLIGHT_SECONDS:.0f} s after "
    "its request, then with backoff).",
)
def owed_commitment_results_sensor(
    context: dg.SensorEvaluationContext, archive: ArchiveResource
) -> dg.RunRequest | dg.SkipReason:
    if not any_due(archive.settings()):
        return dg.SkipReason("no Storage Commitment result is due")
    under_way = context.instance.get_runs(
        dg.RunsFilter(
            job_name=report_commitment_results_job.name,
            statuses=[
                dg.DagsterRunStatus.QUEUED,
                dg.DagsterRunStatus.NOT_STARTED,
                dg.DagsterRunStatus.STARTING,
                dg.DagsterRunStatus.STARTED,
            ],
        ),
        limit=1,
    )
    if under_way:
        return dg.SkipReason("a run is already delivering the owed results")
    return dg.RunRequest()
