"""Helpers for the lifecycle tests: real synthetic DICOM landed and ingested into a catalog."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pydicom.uid import generate_uid

from vannah_pipelines.catalog.ingest import IngestPaths, ingest_batches
from vannah_pipelines.catalog.lookup import StoredInstance, find_instances
from vannah_pipelines.catalog.reader import CatalogReader
from vannah_pipelines.dicom.synthetic import make_instance, to_part10
from vannah_pipelines.landing.layout import LandingZone, ReceiveFacts
from vannah_pipelines.settings import Settings
from vannah_pipelines.storage.tiers import StorageTiers


def make_settings(data_dir: Path, tiers: dict[str, object] | None = None, **extra: Any) -> Settings:
    """Settings on `data_dir` with no grace period (the tests wait for nothing)."""
    return Settings(data_dir=data_dir, tier_grace_seconds=0, **(tiers or {}), **extra)


@dataclass(frozen=True)
class Study:
    uid: str
    blobs: dict[str, bytes]  # SOP Instance UID -> bytes as sent


def land_and_ingest(settings: Settings, blobs: list[tuple[str, bytes]]) -> None:
    batch = LandingZone(settings.landing_dir).open_batch("dimse")
    for uid, data in blobs:
        batch.write_instance(
            data, ReceiveFacts(uid, "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1", "dimse")
        )
    sealed = batch.seal()
    assert sealed is not None
    result = ingest_batches(IngestPaths.for_settings(settings), [sealed.batch_id])
    assert result.instances == len(blobs) and not result.quarantined


def ingest_study(
    settings: Settings, modality: str = "CT", n: int = 3, study_date: str = "20240115"
) -> Study:
    """Ingest a study of `n` small instances (one series), received now."""
    study_uid, series_uid = generate_uid(), generate_uid()
    blobs = []
    for i in range(n):
        ds = make_instance(
            modality,
            study_uid=study_uid,
            series_uid=series_uid,
            study_date=study_date,
            instance_number=i + 1,
            rows=16,
            columns=16,
            seed=i,
        )
        blobs.append((str(ds.SOPInstanceUID), to_part10(ds)))
    land_and_ingest(settings, blobs)
    return Study(study_uid, dict(blobs))


def days_later(days: int) -> datetime:
    return datetime.now(UTC) + timedelta(days=days)


def instances(settings: Settings, study_uid: str) -> list[StoredInstance]:
    reader = CatalogReader(settings.catalog_dir)
    try:
        return find_instances(reader, study_uid)
    finally:
        reader.close()


def study_tier(settings: Settings, study_uid: str) -> str:
    reader = CatalogReader(settings.catalog_dir)
    try:
        [(tier,)] = reader.query(
            "SELECT tier FROM studies WHERE study_instance_uid = ?", [study_uid]
        )
    finally:
        reader.close()
    return str(tier)


def study_bytes(settings: Settings, study_uid: str) -> dict[str, int]:
    """The catalog's bytes of a study per tier (``studies.hot_bytes`` ...)."""
    reader = CatalogReader(settings.catalog_dir)
    try:
        [row] = reader.query(
            "SELECT hot_bytes, warm_bytes, cold_bytes, size_bytes FROM studies "
            "WHERE study_instance_uid = ?",
            [study_uid],
        )
    finally:
        reader.close()
    return dict(zip(("hot", "warm", "cold", "all"), map(int, row), strict=True))


def read_all(settings: Settings, study_uid: str) -> dict[str, bytes]:
    """Every current instance's bytes, read as the services do (any tier, with fallback)."""
    tiers = StorageTiers(settings)
    found = {}
    for inst in instances(settings, study_uid):
        with tiers.open_instance(inst) as stream:
            found[inst.sop_instance_uid] = stream.read()
    return found
