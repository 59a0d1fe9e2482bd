"""Storage tiering: the lifecycle as one asset, a daily schedule, and its two checks."""

from collections.abc import Iterator

import dagster as dg

from vannah_pipelines.defs.resources import ArchiveResource
from vannah_pipelines.landing.layout import LandingZone
from vannah_pipelines.settings import load_settings
from vannah_pipelines.storage.lifecycle import (
    as_of_date,
    open_catalog,
    run_lifecycle,
    tier_usage,
)
from vannah_pipelines.storage.lifecycle_checks import (
    LOCATION_SAMPLE,
    SCAN_LIMIT,
    check_locations,
    check_objects,
)
from vannah_pipelines.storage.tiers import TIER_ORDER, StorageTiers

_LISTED = 20  # keys and studies named in metadata, at most


class TieringConfig(dg.Config):
    """One tiering run: the date the policy is applied at, and whether to only plan."""

    as_of: str | None = None  # YYYY-MM-DD; default: today (UTC)
    dry_run: bool = False


@dg.asset(
    group_name="storage",
    kinds={"s3"},
    check_specs=[
        dg.AssetCheckSpec(
            "catalog_locations_exist",
            asset="storage_tiering",
            description=f"A random sample of at most {LOCATION_SAMPLE} current instances per "
            "tier is in that tier, with the catalog's size (one stat each).",
        ),
        dg.AssetCheckSpec(
            "tier_objects_known_to_the_catalog",
            asset="storage_tiering",
            description=f"The first {SCAN_LIMIT} objects listed in each tier are all versions "
            "the catalog holds (a hot object still in a landing batch is being ingested).",
        ),
    ],
    tags={"vannah/domain": "storage"},
    # An unexpected error (the catalog unreadable) is retried: a run is idempotent. Studies
    # that failed are not (dg.Failure below): a corrupt source fails the same way at once.
    retry_policy=dg.RetryPolicy(max_retries=3, delay=60),
)
def storage_tiering(
    context: dg.AssetExecutionContext, config: TieringConfig, archive: ArchiveResource
) -> Iterator[dg.MaterializeResult[None] | dg.AssetCheckResult]:
    """Where the archive's instances live: studies moved hot -> warm -> cold by the tier
    policy (copied and verified, recorded in the catalog, sources deleted after a grace
    period). Metadata: instances and bytes per tier, and what this run moved."""
    settings = archive.settings()
    result = run_lifecycle(
        settings,
        as_of=as_of_date(config.as_of) if config.as_of else None,
        dry_run=config.dry_run,
        changed_by=f"dagster:{context.run.run_id}",
    )
    for study in result.failed:
        context.log.warning(
            "study %s not fully moved to %s: %s",
            study.study_uid,
            study.target.value,
            "; ".join(study.failures[:5]),
        )
    catalog = open_catalog(settings)
    tiers = StorageTiers(settings)
    try:
        usage = tier_usage(catalog)
        locations = check_locations(catalog, tiers)
        landing = (
            i.sop_instance_uid
            for b in LandingZone(settings.landing_dir).sealed_batches()
            for i in b.instances()
        )
        objects = check_objects(catalog, tiers, landing)
    finally:
        catalog.close()
    planned = result.planned()
    metadata: dict[str, dg.MetadataValue] = {
        "as_of": dg.MetadataValue.text(f"{result.as_of:%Y-%m-%d}"),
        "dry_run": dg.MetadataValue.bool(result.dry_run),
        "studies_planned": dg.MetadataValue.int(len(result.moves)),
        "bytes_planned": dg.MetadataValue.int(sum(load.bytes for load in planned.values())),
        "studies_moved": dg.MetadataValue.int(result.studies_moved),
        "instances_moved": dg.MetadataValue.int(result.instances_moved),
        "bytes_moved": dg.MetadataValue.int(result.bytes_moved),
        "bytes_freed": dg.MetadataValue.int(result.bytes_freed),
        "failures": dg.MetadataValue.int(len(result.failed)),
        "duration_s": dg.MetadataValue.float(round(result.seconds, 3)),
    }
    for tier in TIER_ORDER:
        load = usage.get(tier.value)
        metadata[f"instances_{tier.value}"] = dg.MetadataValue.int(load.instances if load else 0)
        metadata[f"bytes_{tier.value}"] = dg.MetadataValue.int(load.bytes if load else 0)
    for (source, target), load in sorted(planned.items()):
        metadata[f"planned_{source.value}_to_{target.value}_bytes"] = dg.MetadataValue.int(
            load.bytes
        )
    if result.failed:
        metadata["failed_studies"] = dg.MetadataValue.json(
            [s.study_uid for s in result.failed[:_LISTED]]
        )
    yield dg.MaterializeResult(metadata=metadata)
    yield dg.AssetCheckResult(
        check_name="catalog_locations_exist",
        passed=locations.passed,
        metadata={
            **{f"checked_{t}": dg.MetadataValue.int(n) for t, n in locations.checked.items()},
            "missing": dg.MetadataValue.int(len(locations.missing)),
            "missing_sample": dg.MetadataValue.json(locations.missing[:_LISTED]),
            "unreadable": dg.MetadataValue.json(locations.unreadable[:_LISTED]),
        },
    )
    yield dg.AssetCheckResult(
        check_name="tier_objects_known_to_the_catalog",
        passed=objects.passed,
        metadata={
            **{f"scanned_{t}": dg.MetadataValue.int(n) for t, n in objects.scanned.items()},
            **{f"complete_{t}": dg.MetadataValue.bool(c) for t, c in objects.complete.items()},
            "unknown": dg.MetadataValue.int(len(objects.unknown)),
            "unknown_sample": dg.MetadataValue.json(objects.unknown[:_LISTED]),
            "unreadable": dg.MetadataValue.json(objects.unreadable[:_LISTED]),
        },
    )
    if result.failed:
        # After the metadata and checks are recorded: the run shows red, the studies that
        # did move stay moved, and the failed ones are tried again by the next run.
        raise dg.Failure(
            description=f"{len(result.failed)} of {len(result.studies)} studies were not "
            "fully moved (a source differing from its checksum, a tier unreachable): see "
            "the warnings in the log and failed_studies",
            metadata={"failed_studies": [s.study_uid for s in result.failed[:_LISTED]]},
            allow_retries=False,
        )


tier_studies_job = dg.define_asset_job(
    "tier_studies_job",
    selection=[storage_tiering],
    executor_def=dg.in_process_executor,
    tags={"vannah/domain": "storage"},
)

daily_storage_tiering_schedule = dg.ScheduleDefinition(
    name="daily_storage_tiering_schedule",
    job=tier_studies_job,
    cron_schedule=load_settings().tier_cron,
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
)
