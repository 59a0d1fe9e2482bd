"""Catalog consistency checks (pure): what the Dagster asset checks report."""

from __future__ import annotations

from pathlib import Path

import duckdb

from vannah_pipelines.catalog.writer import CatalogWriter
from vannah_pipelines.storage.base import Tier
from vannah_pipelines.storage.local import LocalStorage


def duplicate_sop_instance_uids(catalog_dir: Path, batch_ids: list[str]) -> list[str]:
    """SOP Instance UIDs of `batch_ids` that the catalog holds twice from one batch, or
    under two different series (a UID clash: the second sender reused a UID)."""
    if not batch_ids:
        return []
    glob = CatalogWriter(catalog_dir).glob("instances")
    con = duckdb.connect(":memory:")
    try:
        rows = con.execute(
            f"""
            WITH all_rows AS (SELECT sop_instance_uid, series_instance_uid, batch_id
                              FROM read_parquet('{glob}'))
            SELECT sop_instance_uid FROM all_rows
            WHERE sop_instance_uid IN (SELECT sop_instance_uid FROM all_rows
                                       WHERE batch_id IN (SELECT unnest(?)))
            GROUP BY sop_instance_uid
            HAVING count(DISTINCT series_instance_uid) > 1
                OR count(*) > count(DISTINCT batch_id)
            ORDER BY 1
            """,
            [batch_ids],
        ).fetchall()
    finally:
        con.close()
    return [r[0] for r in rows]


def missing_files(catalog_dir: Path, hot_dir: Path, catalog_files: list[str]) -> list[str]:
    """Storage keys, listed in `catalog_files`, whose hot-tier file is not there."""
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
    hot = LocalStorage(hot_dir, Tier.HOT)
    return [k for (k,) in keys if not hot.exists(k)]
