"""Catalog compaction: a daily schedule, a sensor for a large overlay, one asset with its check."""

from collections.abc import Iterator

import dagster as dg

from vannah_pipelines.catalog.compaction import (
    CompactionBusyError,
    Manifest,
    compact,
    pending_batch_files,
    publish,
    verify,
)
from vannah_pipelines.catalog.schema import TABLES
from vannah_pipelines.defs.resources import ArchiveResource
from vannah_pipelines.settings import load_settings


@dg.asset(
    group_name="catalog",
    kinds={"parquet", "duckdb"},
    check_specs=[
        dg.AssetCheckSpec(
            "compacted_rows_match",
            asset="catalog_compaction",
            blocking=True,
            description="The compacted files hold exactly the rows of the files they replaced "
            "(row count and an order-independent hash of every row, re-read from disk).",
        )
    ],
    tags={"vannah/domain": "catalog"},
    retry_policy=dg.RetryPolicy(max_retries=3, delay=60),
)
def catalog_compaction(
    context: dg.AssetExecutionContext, archive: ArchiveResource
) -> Iterator[dg.MaterializeResult[None] | dg.AssetCheckResult]:
    """The catalog's batch files merged into sorted per-day Parquet files and a serving
    DuckDB database the services query on disk; published as one new generation."""
    settings = archive.settings()
    try:
        result = compact(
            settings.catalog_dir,
            memory_limit_mb=settings.catalog_compaction_memory_limit_mb,
            grace_seconds=settings.catalog_compaction_grace_seconds,
        )
    except CompactionBusyError as exc:
        raise dg.Failure(description=str(exc), allow_retries=True) from exc
    publish(settings.catalog_dir)
    context.log.info(
        "generation %d: %d batch files over %d days merged, %d -> %d files, %.1f s",
        result.generation,
        result.batch_files,
        len(result.days),
        result.files_before,
        result.files_after,
        result.seconds,
    )
    yield dg.MaterializeResult(
        metadata={
            "generation": dg.MetadataValue.int(result.generation),
            "days_rewritten": dg.MetadataValue.int(len(result.days)),
            "batch_files_merged": dg.MetadataValue.int(result.batch_files),
            "files_before": dg.MetadataValue.int(result.files_before),
            "files_after": dg.MetadataValue.int(result.files_after),
            "bytes_before": dg.MetadataValue.int(result.bytes_before),
            "bytes_after": dg.MetadataValue.int(result.bytes_after),
            "rows_rewritten": dg.MetadataValue.int(sum(result.rows.values())),
            "instances": dg.MetadataValue.int(result.instances),
            "serving_db_bytes": dg.MetadataValue.int(result.serving_bytes),
            "files_deleted": dg.MetadataValue.int(result.deleted_files),
            "duration_s": dg.MetadataValue.float(round(result.seconds, 3)),
        }
    )
    checked = verify(settings.catalog_dir, result)
    yield dg.AssetCheckResult(
        check_name="compacted_rows_match",
        passed=all(before == after for before, after in checked.values()),
        metadata={
            f"{table}_rows_replaced": dg.MetadataValue.int(before[0])
            for table, (before, _) in checked.items()
        }
        | {
            f"{table}_rows_written": dg.MetadataValue.int(after[0])
            for table, (_, after) in checked.items()
        },
    )


catalog_compaction_job = dg.define_asset_job(
    "catalog_compaction_job",
    selection=[catalog_compaction],
    executor_def=dg.in_process_executor,
    tags={"vannah/domain": "catalog"},
)

daily_compaction = dg.ScheduleDefinition(
    name="daily_catalog_compaction",
    job=catalog_compaction_job,
    cron_schedule=load_settings().catalog_compaction_cron,
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
)


@dg.sensor(
    job=catalog_compaction_job,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def overlay_size_sensor(
    context: dg.SensorEvaluationContext, archive: ArchiveResource
) -> dg.SensorResult:
    """Compacts before the daily run when the batch files not compacted yet (what every
    reading service holds in memory) exceed ``catalog_compaction_max_pending_files``."""
    settings = archive.settings()
    manifest = Manifest.load(settings.catalog_dir)
    pending = sum(len(pending_batch_files(settings.catalog_dir, manifest, t)) for t in TABLES)
    if pending < settings.catalog_compaction_max_pending_files:
        return dg.SensorResult(skip_reason=f"{pending} batch files not compacted")
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=f"compaction-after-g{manifest.generation}")]
    )
