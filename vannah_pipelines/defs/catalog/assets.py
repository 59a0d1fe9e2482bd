"""The catalog's instance index: sealed landing batches parsed, placed and appended as Parquet."""

import json
from collections.abc import Iterator
from datetime import UTC, datetime

import dagster as dg

from vannah_pipelines.catalog.checks import duplicate_sop_instance_uids, missing_files
from vannah_pipelines.catalog.compaction import ensure_catalog
from vannah_pipelines.catalog.ingest import ingest_batches
from vannah_pipelines.defs.partitions import landing_days
from vannah_pipelines.defs.resources import ArchiveResource
from vannah_pipelines.landing.layout import LandingZone, require_batch_id
from vannah_pipelines.landing.plan import BACKLOG_MAX_AGE_SECONDS, Backlog, landing_backlog
from vannah_pipelines.landing.space import is_disk_full
from vannah_pipelines.storage.tiers import StorageTiers

# A run that failed because a disk is full carries this tag: the sensor retries it once
# space returns, without counting it as an attempt of its batches.
FAILURE_TAG = "vannah/failure"
DISK_FULL = "disk_full"


def backlog_metadata(backlog: Backlog) -> dict[str, dg.MetadataValue]:
    """What landing_backlog_fresh reports (counts and ages only)."""
    return {
        "pending_batches": dg.MetadataValue.int(backlog.batches),
        "oldest_pending_batch_age_s": dg.MetadataValue.float(backlog.oldest_age_s),
        "max_age_s": dg.MetadataValue.int(BACKLOG_MAX_AGE_SECONDS),
    }


class IngestConfig(dg.Config):
    """Which sealed landing batches this run ingests (set by landed_batch_sensor)."""

    batch_ids: list[str]
    quarantine_reason: str | None = None  # set: quarantine these batches whole, unparsed


@dg.asset(
    partitions_def=landing_days,
    group_name="catalog",
    kinds={"dicom", "parquet", "duckdb"},
    check_specs=[
        dg.AssetCheckSpec(
            "sop_instance_uids_unique",
            asset="instance_index",
            description="No SOP Instance UID indexed twice from one batch, "
            "none filed under two different series.",
        ),
        dg.AssetCheckSpec(
            "instance_files_present",
            asset="instance_index",
            description="Every instance indexed by this run has its file in the hot tier.",
        ),
        dg.AssetCheckSpec(
            "landing_backlog_fresh",
            asset="instance_index",
            description="No sealed landing batch has waited for ingest longer than "
            f"{BACKLOG_MAX_AGE_SECONDS // 60} minutes.",
        ),
    ],
    tags={"vannah/domain": "ingest"},
)
def instance_index(
    context: dg.AssetExecutionContext, config: IngestConfig, archive: ArchiveResource
) -> Iterator[dg.MaterializeResult[None] | dg.AssetCheckResult]:
    """One row per received DICOM instance (Parquet, partitioned by arrival day): every
    attribute QIDO-RS and C-FIND match or return, the header as DICOM JSON, size, checksum,
    tier and storage key. Files that are not valid DICOM are quarantined with a reason."""
    batch_ids = [require_batch_id(b) for b in config.batch_ids]
    settings = archive.settings()
    quarantine = dict.fromkeys(batch_ids, config.quarantine_reason or "")
    try:
        result = ingest_batches(
            archive.ingest_paths(),
            batch_ids,
            workers=settings.ingest_workers,
            quarantine=quarantine if config.quarantine_reason else None,
            free_space_reserve=settings.free_space_reserve_bytes,
        )
        ensure_catalog(settings.catalog_dir)  # catalog.duckdb's views find the new files
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        # Not the files' fault: tell the sensor, which retries once space returns.
        context.instance.add_run_tags(context.run_id, {FAILURE_TAG: DISK_FULL})
        raise dg.Failure(
            description=f"disk full, ingest will be retried: {type(exc).__name__}: {exc}",
            metadata={"disk_full": True, "batches": len(batch_ids)},
            allow_retries=False,
        ) from exc
    backlog = landing_backlog(LandingZone(settings.landing_dir).sealed_batches(), datetime.now(UTC))
    p50, p95 = result.latency_percentile(0.5), result.latency_percentile(0.95)
    context.log.info(
        "indexed %d instances, quarantined %d, from %d batches (%d already indexed); %s",
        result.instances,
        result.quarantined,
        len(result.batches),
        len(result.already_indexed),
        backlog.describe(),
    )
    yield dg.MaterializeResult(
        metadata={
            "instances": dg.MetadataValue.int(result.instances),
            "bytes": dg.MetadataValue.int(result.bytes),
            "quarantined": dg.MetadataValue.int(result.quarantined),
            "batches": dg.MetadataValue.int(len(result.batches)),
            "already_indexed_batches": dg.MetadataValue.int(len(result.already_indexed)),
            "modalities": dg.MetadataValue.json(dict(sorted(result.modalities.items()))),
            "quarantine_reasons": dg.MetadataValue.json(dict(result.quarantine_reasons)),
            "receive_to_index_p50_s": dg.MetadataValue.float(p50 if p50 is not None else 0.0),
            "receive_to_index_p95_s": dg.MetadataValue.float(p95 if p95 is not None else 0.0),
            "pending_batches": dg.MetadataValue.int(backlog.batches),
            "oldest_pending_batch_age_s": dg.MetadataValue.float(backlog.oldest_age_s),
        }
    )
    yield dg.AssetCheckResult(
        check_name="landing_backlog_fresh", passed=backlog.fresh, metadata=backlog_metadata(backlog)
    )
    dupes = duplicate_sop_instance_uids(settings.catalog_dir, result.batches)
    yield dg.AssetCheckResult(
        check_name="sop_instance_uids_unique",
        passed=not dupes,
        metadata={
            "duplicates": dg.MetadataValue.int(len(dupes)),
            "examples": dg.MetadataValue.json(dupes[:10]),
        },
    )
    missing = missing_files(settings.catalog_dir, StorageTiers(settings).hot, result.catalog_files)
    yield dg.AssetCheckResult(
        check_name="instance_files_present",
        passed=not missing,
        metadata={
            "missing": dg.MetadataValue.int(len(missing)),
            "examples": dg.MetadataValue.json(missing[:10]),
            "checked_files": dg.MetadataValue.text(json.dumps(result.catalog_files)[:2000]),
        },
    )


ingest_batch_job = dg.define_asset_job(
    "ingest_batch_job",
    selection=[instance_index],
    partitions_def=landing_days,
    executor_def=dg.in_process_executor,
    tags={"vannah/domain": "ingest"},
)
