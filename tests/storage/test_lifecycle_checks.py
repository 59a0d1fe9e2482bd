"""The tiering checks' pure halves: sampled catalog locations, bounded object listings."""

from __future__ import annotations

from pathlib import Path

from tests.storage.lifecycle_support import ingest_study, instances, make_settings
from vannah_pipelines.catalog.reader import CatalogReader
from vannah_pipelines.storage.lifecycle_checks import check_locations, check_objects
from vannah_pipelines.storage.tiers import StorageTiers


def test_checks_find_missing_and_resized_locations_and_unknown_objects(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    study = ingest_study(settings, n=3)
    first, second, _ = instances(settings, study.uid)
    tiers = StorageTiers(settings)
    reader = CatalogReader(settings.catalog_dir)
    try:
        ok = check_locations(reader, tiers)
        assert ok.passed and ok.checked == {"hot": 3, "warm": 0, "cold": 0}
        assert check_objects(reader, tiers).passed

        (settings.hot_dir / first.storage_key).unlink()
        (settings.hot_dir / second.storage_key).write_bytes(b"short")
        bad = check_locations(reader, tiers)
        assert not bad.passed
        assert sorted(bad.missing) == sorted(
            [f"hot:{first.storage_key}", f"hot:{second.storage_key} (size differs)"]
        )

        # An object no version of the catalog has; unless its instance is being ingested.
        stray = f"{study.uid}/1.2.3/1.2.3.4.{'cd' * 8}.dcm"
        (settings.hot_dir / stray).parent.mkdir(parents=True)
        (settings.hot_dir / stray).write_bytes(b"x")
        found = check_objects(reader, tiers)
        assert found.unknown == [f"hot:{stray}"] and found.complete["hot"]
        assert check_objects(reader, tiers, landing_sops=["1.2.3.4"]).passed
        bounded = check_objects(reader, tiers, limit=1)
        assert bounded.scanned["hot"] == 1 and not bounded.complete["hot"]
    finally:
        reader.close()
