"""Catalog consistency checks (pure): what the Dagster asset checks report."""

from __future__ import annotations

from pathlib import Path

import duckdb

from vannah_pipelines.catalog.compaction import Manifest, pending_batch_files
from vannah_pipelines.storage.base import Storage, Tier
from vannah_pipelines.storage.local import LocalStorage


def duplicate_sop_instance_uids(catalog_dir: Path, batch_ids: list[str]) -> list[str]:
    """SOP Instance UIDs of `batch_ids` that the catalog holds twice from one batch, or
    under two different series (a UID clash: the second sender reused a UID).

    Reads the batches' own files, the other batch files not compacted yet, and the
    serving database's rows of the same SOP UIDs: the cost follows the batches, not the
    archive."""
    if not batch_ids:
        return []
    manifest = Manifest.load(catalog_dir)
    files = [catalog_dir / f for f in pending_batch_files(catalog_dir, manifest, "instances")]
    wanted = set(batch_ids)
    mine = [f for f in files if f.stem in wanted]
    if not mine:
        return []
    con = duckdb.connect(":memory:")
    try:
        con.execute(
            "CREATE TEMP TABLE mine AS SELECT sop_instance_uid, series_instance_uid, "
            "study_instance_uid, batch_id FROM read_parquet(?, hive_partitioning = false)",
            [[str(f) for f in mine]],
        )
        sources = ["SELECT sop_instance_uid, series_instance_uid, batch_id FROM mine"]
        others = [str(f) for f in files if f.stem not in wanted]
        if others:
            sources.append(
                "SELECT sop_instance_uid, series_instance_uid, batch_id FROM read_parquet("
                "?, hive_partitioning = false) WHERE sop_instance_uid IN "
                "(SELECT sop_instance_uid FROM mine)"
            )
        if manifest.serving and (catalog_dir / manifest.serving).exists():
            path = str(catalog_dir / manifest.serving).replace("'", "''")
            con.execute(f"ATTACH '{path}' AS serving (READ_ONLY)")
            # The serving database's row of each UID, in any study (a clash between senders
            # is a UID reused in another study): one scan of its SOP UID column.
            sources.append(
                "SELECT sop_instance_uid, series_instance_uid, batch_id FROM "
                "serving.compacted_instances WHERE sop_instance_uid IN (SELECT "
                "sop_instance_uid FROM mine) AND batch_id NOT IN (SELECT batch_id FROM mine)"
            )
        rows = con.execute(
            f"""
            SELECT sop_instance_uid FROM ({" UNION ALL ".join(sources)})
            GROUP BY sop_instance_uid
            HAVING count(DISTINCT series_instance_uid) > 1
                OR count(*) > count(DISTINCT batch_id)
            ORDER BY 1
            """,
            [others] if others else [],
        ).fetchall()
    finally:
        con.close()
    return [r[0] for r in rows]


def missing_files(catalog_dir: Path, hot: Storage | Path, catalog_files: list[str]) -> list[str]:
    """Storage keys, listed in `catalog_files` as hot-tier objects, that the hot tier does
    not hold. `hot` is the hot tier's backend (``StorageTiers(settings).hot``), or the
    root folder of a local one."""
    if not catalog_files:
        return []
    con = duckdb.connect(":memory:")
    try:
        keys = con.execute(
            "SELECT storage_key FROM read_parquet(?) WHERE tier = ?",
            [catalog_files, Tier.HOT.value],
        ).fetchall()
    finally:
        con.close()
    store = LocalStorage(hot, Tier.HOT) if isinstance(hot, Path) else hot
    return [k for (k,) in keys if not store.exists(k)]
