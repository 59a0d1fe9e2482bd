"""The storage_tiering asset in-process: run config (as_of, dry_run), metadata, its checks,
and a failing study that fails the run only after the others moved."""

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import pytest

from tests.storage.lifecycle_support import ingest_study, instances, make_settings, study_tier
from vannah_pipelines.defs.resources import ArchiveResource
from vannah_pipelines.defs.storage.tiering import storage_tiering
from vannah_pipelines.settings import Settings


@pytest.fixture(autouse=True)
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """The resource reads the process's settings: a tmp data folder, no grace period."""
    monkeypatch.setenv("VANNAH_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("VANNAH_TIER_GRACE_SECONDS", "0")
    monkeypatch.delenv("VANNAH_CONFIG", raising=False)
    yield make_settings(tmp_path)


def _materialize(days: int, dry_run: bool = False) -> dg.ExecuteInProcessResult:
    as_of = (datetime.now(UTC) + timedelta(days=days)).date().isoformat()
    return dg.materialize(
        [storage_tiering],
        resources={"archive": ArchiveResource()},
        run_config=dg.RunConfig(
            ops={"storage_tiering": {"config": {"as_of": as_of, "dry_run": dry_run}}}
        ),
        raise_on_error=False,
    )


def _checks(result: dg.ExecuteInProcessResult) -> dict[str, bool]:
    return {c.check_name: c.passed for c in result.get_asset_check_evaluations()}


def test_definitions_have_the_tiering_job_and_schedule() -> None:
    from vannah_pipelines.definitions import defs

    loaded = defs()
    dg.Definitions.validate_loadable(loaded)
    assert loaded.resolve_job_def("tier_studies_job") is not None
    assert loaded.resolve_schedule_def("daily_storage_tiering_schedule") is not None


def test_storage_tiering_moves_and_reports_trends_and_checks(settings: Settings) -> None:
    study = ingest_study(settings, n=3)
    size = sum(map(len, study.blobs.values()))

    preview = _materialize(40, dry_run=True)
    assert preview.success
    [mat] = preview.asset_materializations_for_node("storage_tiering")
    assert mat.metadata["dry_run"].value is True
    assert mat.metadata["studies_planned"].value == 1
    assert mat.metadata["planned_hot_to_warm_bytes"].value == size
    assert mat.metadata["studies_moved"].value == 0 and study_tier(settings, study.uid) == "hot"

    result = _materialize(40)
    assert result.success
    [mat] = result.asset_materializations_for_node("storage_tiering")
    meta = {k: v.value for k, v in mat.metadata.items()}
    assert meta["studies_moved"] == 1 and meta["instances_moved"] == 3
    assert meta["bytes_moved"] == meta["bytes_freed"] == size
    assert (meta["instances_hot"], meta["instances_warm"], meta["instances_cold"]) == (0, 3, 0)
    assert meta["bytes_warm"] == size and meta["failures"] == 0
    assert meta["duration_s"] >= 0
    assert _checks(result) == {
        "catalog_locations_exist": True,
        "tier_objects_known_to_the_catalog": True,
    }

    # A warm object gone, and an object the catalog never had: both checks fail.
    lost = instances(settings, study.uid)[0].storage_key
    (settings.warm_dir / lost).unlink()
    stray = settings.cold_dir / "1.2.3" / "1.2.3.4" / f"1.2.3.4.5.{'ab' * 8}.dcm"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"not the catalog's")
    after = _materialize(40, dry_run=True)
    assert _checks(after) == {
        "catalog_locations_exist": False,
        "tier_objects_known_to_the_catalog": False,
    }
    evaluations = {c.check_name: c for c in after.get_asset_check_evaluations()}
    assert evaluations["catalog_locations_exist"].metadata["missing_sample"].value == [
        f"warm:{lost}"
    ]
    assert evaluations["tier_objects_known_to_the_catalog"].metadata["unknown_sample"].value == [
        f"cold:{stray.relative_to(settings.cold_dir)}"
    ]


def test_a_failing_study_fails_the_run_after_the_others_moved(settings: Settings) -> None:
    good = ingest_study(settings, n=2)
    bad = ingest_study(settings, n=1)
    [inst] = instances(settings, bad.uid)
    (settings.hot_dir / inst.storage_key).write_bytes(b"corrupted")

    result = _materialize(40)
    assert not result.success
    [mat] = result.asset_materializations_for_node("storage_tiering")
    assert mat.metadata["failures"].value == 1
    assert mat.metadata["failed_studies"].value == [bad.uid]
    assert mat.metadata["studies_moved"].value == 1
    assert study_tier(settings, good.uid) == "warm" and study_tier(settings, bad.uid) == "hot"
    assert set(_checks(result)) == {"catalog_locations_exist", "tier_objects_known_to_the_catalog"}
