"""The landing-zone sensor: one ingest run per group of sealed batches, never twice."""

import json

import dagster as dg

from vannah_pipelines.defs.catalog.assets import IngestConfig, ingest_batch_job
from vannah_pipelines.defs.resources import ArchiveResource
from vannah_pipelines.landing.plan import plan_ingest_runs


@dg.sensor(
    job=ingest_batch_job,
    minimum_interval_seconds=1,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Seals batches stranded by a crashed receiver, then requests ingest runs "
    "for sealed landing batches (run_key = first batch id, so never twice).",
)
def landed_batch_sensor(
    context: dg.SensorEvaluationContext, archive: ArchiveResource
) -> dg.SensorResult | dg.SkipReason:
    """Request ingest runs for the sealed landing batches not yet requested."""
    settings = archive.settings()
    zone = archive.landing()
    stranded = zone.seal_stranded()
    requested = set(json.loads(context.cursor)) if context.cursor else set()
    plan = plan_ingest_runs(zone.sealed_batches(), requested, settings.ingest_run_max_files)
    if not plan.runs:
        return dg.SkipReason(
            f"no new sealed batches ({len(plan.still_pending)} requested and pending)"
        )
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(
                run_key=f"ingest-{run.batch_ids[0]}",
                partition_key=run.day.isoformat(),
                run_config=dg.RunConfig(
                    ops={"instance_index": IngestConfig(batch_ids=run.batch_ids)}
                ),
                tags={
                    "vannah/first_batch": run.batch_ids[0],
                    "vannah/instances": str(run.files),
                    "vannah/stranded_sealed": str(len(stranded)),
                },
            )
            for run in plan.runs
        ],
        cursor=json.dumps(sorted(plan.still_pending)),
    )
