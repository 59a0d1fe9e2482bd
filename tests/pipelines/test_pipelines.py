"""Dagster glue: definitions load, the sensor plans runs once, the asset reports metadata."""

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from vannah_pipelines.catalog.reader import CatalogReader
from vannah_pipelines.defs.catalog.assets import instance_index
from vannah_pipelines.defs.catalog.compaction import catalog_compaction
from vannah_pipelines.defs.landing.sensors import landed_batch_sensor
from vannah_pipelines.defs.resources import ArchiveResource
from vannah_pipelines.dicom.synthetic import make_instance, to_part10
from vannah_pipelines.landing.layout import LandingZone, ReceiveFacts


def _land(data_dir: Path, n: int, modality: str = "CT") -> str:
    batch = LandingZone(data_dir / "landing").open_batch("dimse")
    for i in range(n):
        ds = make_instance(modality, rows=16, columns=16, instance_number=i)
        batch.write_instance(
            to_part10(ds),
            ReceiveFacts(ds.SOPInstanceUID, ds.SOPClassUID, "1.2.840.10008.1.2.1", "dimse"),
        )
    sealed = batch.seal()
    assert sealed is not None
    return sealed.batch_id


@pytest.fixture(autouse=True)
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The resource reads the process's settings: point them at a tmp data folder."""
    monkeypatch.setenv("VANNAH_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("VANNAH_CONFIG", raising=False)
    yield tmp_path


def test_definitions_load() -> None:
    from vannah_pipelines.definitions import defs

    loaded = defs()
    dg.Definitions.validate_loadable(loaded)
    assert loaded.resolve_job_def("ingest_batch_job") is not None
    assert loaded.resolve_sensor_def("landed_batch_sensor") is not None


def test_landed_batch_sensor_requests_each_batch_once(tmp_path: Path) -> None:
    archive = ArchiveResource()
    first, second = _land(tmp_path, 2), _land(tmp_path, 3)
    with dg.instance_for_test() as instance:
        context = dg.build_sensor_context(instance=instance, resources={"archive": archive})
        result = landed_batch_sensor(context)
        assert isinstance(result, dg.SensorResult)
        [request] = result.run_requests or []
        assert request.run_key == f"ingest-{first}"
        config = request.run_config["ops"]["instance_index"]["config"]
        assert config["batch_ids"] == [first, second]
        assert set(json.loads(result.cursor or "{}")["batches"]) == {first, second}
        again = landed_batch_sensor(
            dg.build_sensor_context(
                instance=instance, cursor=result.cursor, resources={"archive": archive}
            )
        )
        assert not again.run_requests and again.skip_reason is not None
        assert "2 sealed batches" in (again.skip_reason.skip_message or "")
        third = _land(tmp_path, 1)

        def tick() -> dg.SensorResult:
            out = landed_batch_sensor(
                dg.build_sensor_context(
                    instance=instance, cursor=result.cursor, resources={"archive": archive}
                )
            )
            assert isinstance(out, dg.SensorResult)
            return out

        def the_run(status: dg.DagsterRunStatus) -> str:
            from vannah_pipelines.definitions import defs

            job = defs().resolve_job_def("ingest_batch_job")
            run = instance.create_run_for_job(
                job, run_config=request.run_config, tags=request.tags, status=status
            )
            return run.run_id

        # While the first run waits to start (not created yet, then queued), the new batch
        # is held for the run after it.
        for status in (None, dg.DagsterRunStatus.NOT_STARTED):
            run_id = the_run(status) if status else None
            held = tick()
            assert not held.run_requests and held.skip_reason is not None
            assert "1 new held for the next run" in (held.skip_reason.skip_message or "")
        assert run_id is not None
        instance.delete_run(run_id)
        the_run(dg.DagsterRunStatus.STARTED)
        later = tick()
        assert [r.run_key for r in later.run_requests or []] == [f"ingest-{third}"]


def test_landed_batch_sensor_splits_by_max_files(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("VANNAH_INGEST_RUN_MAX_FILES", "4")
    ids = [_land(tmp_path, 3) for _ in range(3)]
    with dg.instance_for_test() as instance:
        result = landed_batch_sensor(
            dg.build_sensor_context(instance=instance, resources={"archive": ArchiveResource()})
        )
    assert isinstance(result, dg.SensorResult)
    assert [
        r.run_config["ops"]["instance_index"]["config"]["batch_ids"]
        for r in result.run_requests or []
    ] == [[i] for i in ids]


def test_instance_index_materializes_with_metadata_and_checks(tmp_path: Path) -> None:
    batch_id = _land(tmp_path, 5, "MR")
    day = batch_id[:4] + "-" + batch_id[4:6] + "-" + batch_id[6:8]
    result = dg.materialize(
        [instance_index],
        partition_key=day,
        resources={"archive": ArchiveResource()},
        run_config=dg.RunConfig(ops={"instance_index": {"config": {"batch_ids": [batch_id]}}}),
    )
    assert result.success
    [mat] = result.asset_materializations_for_node("instance_index")
    assert mat.metadata["instances"].value == 5
    assert mat.metadata["modalities"].value == {"MR": 5}
    assert mat.metadata["bytes"].value > 0
    assert "receive_to_index_p95_s" in mat.metadata
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    assert checks == {
        "sop_instance_uids_unique": True,
        "instance_files_present": True,
        "landing_backlog_fresh": True,
    }
    assert mat.metadata["pending_batches"].value == 0
    assert mat.metadata["oldest_pending_batch_age_s"].value == 0.0
    assert CatalogReader(tmp_path / "catalog").query("SELECT count(*) FROM instances") == [(5,)]


def test_instance_files_present_fails_when_a_file_is_missing(tmp_path: Path) -> None:
    from vannah_pipelines.catalog.checks import missing_files

    batch_id = _land(tmp_path, 2)
    day = f"{batch_id[:4]}-{batch_id[4:6]}-{batch_id[6:8]}"
    dg.materialize(
        [instance_index],
        partition_key=day,
        resources={"archive": ArchiveResource()},
        run_config=dg.RunConfig(ops={"instance_index": {"config": {"batch_ids": [batch_id]}}}),
    )
    files = [str(p) for p in (tmp_path / "catalog" / "instances").rglob(f"{batch_id}.parquet")]
    victim = next((tmp_path / "hot").rglob("*.dcm"))
    victim.unlink()
    missing = missing_files(tmp_path / "catalog", tmp_path / "hot", files)
    assert len(missing) == 1 and victim.name in missing[0]


@pytest.mark.parametrize("compacted", [False, True], ids=["batch-files", "compacted"])
def test_sop_instance_uids_unique_check_fails_on_a_uid_clash(
    tmp_path: Path, compacted: bool
) -> None:
    """Two senders reuse one SOP Instance UID for instances of different series: found
    whether the first one is still in its batch file or already compacted."""
    clash = make_instance("CT", rows=16, columns=16)
    other = make_instance("MR", rows=16, columns=16, SOPInstanceUID=clash.SOPInstanceUID)
    if compacted:
        first = _land_datasets(tmp_path, [clash])
        day = f"{first[:4]}-{first[4:6]}-{first[6:8]}"
        result = dg.materialize(
            [instance_index],
            partition_key=day,
            resources={"archive": ArchiveResource()},
            run_config=dg.RunConfig(ops={"instance_index": {"config": {"batch_ids": [first]}}}),
        )
        assert result.success
        compaction = dg.materialize([catalog_compaction], resources={"archive": ArchiveResource()})
        assert compaction.success
        clashes = [other]
    else:
        clashes = [clash, other]
    ids = []
    for ds in clashes:
        batch = LandingZone(tmp_path / "landing").open_batch("dimse")
        batch.write_instance(
            to_part10(ds),
            ReceiveFacts(ds.SOPInstanceUID, ds.SOPClassUID, "1.2.840.10008.1.2.1", "dimse"),
        )
        sealed = batch.seal()
        assert sealed is not None
        ids.append(sealed.batch_id)
    day = f"{ids[0][:4]}-{ids[0][4:6]}-{ids[0][6:8]}"
    result = dg.materialize(
        [instance_index],
        partition_key=day,
        resources={"archive": ArchiveResource()},
        run_config=dg.RunConfig(ops={"instance_index": {"config": {"batch_ids": ids}}}),
    )
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert not checks["sop_instance_uids_unique"].passed
    assert checks["sop_instance_uids_unique"].metadata["duplicates"].value == 1
    assert checks["instance_files_present"].passed


def _land_datasets(root: Path, datasets: list[Any]) -> str:
    batch = LandingZone(root / "landing").open_batch("dimse")
    for ds in datasets:
        batch.write_instance(
            to_part10(ds),
            ReceiveFacts(ds.SOPInstanceUID, ds.SOPClassUID, "1.2.840.10008.1.2.1", "dimse"),
        )
    sealed = batch.seal()
    assert sealed is not None
    return sealed.batch_id


def test_catalog_compaction_materializes_with_metadata_and_its_check(tmp_path: Path) -> None:
    """The asset merges the batch files, reports before/after, and its check re-reads both."""
    for n in range(3):
        batch_id = _land_datasets(tmp_path, [make_instance("CT", rows=16, columns=16, seed=n)])
        day = f"{batch_id[:4]}-{batch_id[4:6]}-{batch_id[6:8]}"
        assert dg.materialize(
            [instance_index],
            partition_key=day,
            resources={"archive": ArchiveResource()},
            run_config=dg.RunConfig(ops={"instance_index": {"config": {"batch_ids": [batch_id]}}}),
        ).success
    result = dg.materialize([catalog_compaction], resources={"archive": ArchiveResource()})
    assert result.success
    [materialization] = result.asset_materializations_for_node("catalog_compaction")
    meta = {k: v.value for k, v in materialization.metadata.items()}
    assert meta["batch_files_merged"] >= 3 and meta["instances"] == 3
    assert meta["files_after"] < meta["files_before"]
    assert meta["bytes_before"] > 0 and meta["bytes_after"] > 0 and meta["duration_s"] > 0
    [check] = result.get_asset_check_evaluations()
    assert check.check_name == "compacted_rows_match" and check.passed
    assert check.metadata["instances_rows_replaced"].value == 3
    assert check.metadata["instances_rows_written"].value == 3
    again = dg.materialize([catalog_compaction], resources={"archive": ArchiveResource()})
    [materialization] = again.asset_materializations_for_node("catalog_compaction")
    assert materialization.metadata["batch_files_merged"].value == 0


def test_run_config_cannot_point_ingest_at_another_folder(tmp_path: Path) -> None:
    """The resource has no configurable path: the launchpad cannot move the data folder."""
    batch_id = _land(tmp_path, 1)
    day = f"{batch_id[:4]}-{batch_id[4:6]}-{batch_id[6:8]}"
    with pytest.raises(dg.DagsterInvalidConfigError):
        dg.materialize(
            [instance_index],
            partition_key=day,
            resources={"archive": ArchiveResource()},
            run_config={
                "ops": {"instance_index": {"config": {"batch_ids": [batch_id]}}},
                "resources": {"archive": {"config": {"data_dir": str(tmp_path / "elsewhere")}}},
            },
        )
    assert not (tmp_path / "elsewhere").exists()
    assert ArchiveResource().settings().data_dir == tmp_path  # from VANNAH_DATA_DIR only
