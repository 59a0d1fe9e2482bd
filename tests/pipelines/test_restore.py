"""Dagster glue of restores: the spool sensor requests one run per study, the restore job
brings it back hot, an archive outage leaves the request for a later run; the priors
prefetch follows the worklist. Cold tier: moto's S3 server (DEEP_ARCHIVE) behind a proxy
the tests take down; warm: SeaweedFS."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from tests.servers import S3Server
from tests.storage.restore_support import (
    TcpProxy,
    hot_bytes,
    ingest_study,
    move_to_cold,
    study_instances,
    tiers_of,
)
from vannah_pipelines.defs.resources import ArchiveResource
from vannah_pipelines.defs.storage import restore as restore_defs
from vannah_pipelines.defs.storage.prefetch import scheduled_step_sensor
from vannah_pipelines.defs.storage.restore import restore_request_sensor
from vannah_pipelines.settings import Settings, load_settings
from vannah_pipelines.storage.holds import get_hold
from vannah_pipelines.storage.restore import pending_requests, request_restore
from vannah_pipelines.storage.restoring import recheck_seconds
from vannah_pipelines.storage.tiers import RestoreRequiredError, StorageTiers
from vannah_pipelines.worklist.model import item_from_fields
from vannah_pipelines.worklist.store import WorklistStore


@pytest.fixture
def archive_proxy(moto_s3: S3Server) -> Iterator[TcpProxy]:
    proxy = TcpProxy((moto_s3.host, moto_s3.port))
    proxy.start()
    yield proxy
    proxy.stop()


@pytest.fixture(autouse=True)
def settings(
    tmp_path: Path,
    object_tiers: dict[str, Any],
    archive_proxy: TcpProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> Settings:
    """The resource reads the process's settings: a tmp data folder, warm on SeaweedFS,
    cold on moto through the proxy."""
    monkeypatch.delenv("VANNAH_CONFIG", raising=False)
    values = {
        **object_tiers,
        "cold_s3_endpoint_url": archive_proxy.url,
        "data_dir": tmp_path / "data",
        "storage_timeout_seconds": 2,
    }
    for name, value in values.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        monkeypatch.setenv(f"VANNAH_{name.upper()}", text)
    return load_settings()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The sensor's clock: set ``clock[0]`` to move it."""
    now = [time.time()]
    monkeypatch.setattr(restore_defs, "_now", lambda: now[0])
    return now


def _defs() -> dg.Definitions:
    from vannah_pipelines.definitions import defs

    return defs()


def _tick(instance: dg.DagsterInstance, cursor: str | None) -> dg.SensorResult:
    context = dg.build_sensor_context(
        instance=instance, cursor=cursor, resources={"archive": ArchiveResource()}
    )
    result = restore_request_sensor(context)
    assert isinstance(result, dg.SensorResult)
    return result


def _skip(result: dg.SensorResult) -> str:
    return result.skip_reason.skip_message or "" if result.skip_reason else ""


def _run(instance: dg.DagsterInstance, request: dg.RunRequest) -> dg.ExecuteInProcessResult:
    job = _defs().resolve_job_def("restore_study_job")
    return job.execute_in_process(
        run_config=request.run_config, instance=instance, tags=request.tags, raise_on_error=False
    )


def test_definitions_load_with_restore_and_prefetch() -> None:
    loaded = _defs()
    dg.Definitions.validate_loadable(loaded)
    for job in ("restore_study_job", "prefetch_priors_job"):
        assert loaded.resolve_job_def(job) is not None
    for sensor in ("restore_request_sensor", "scheduled_step_sensor"):
        assert loaded.resolve_sensor_def(sensor) is not None


def test_a_read_of_a_cold_study_is_restored_by_the_sensor_and_job(
    settings: Settings, clock: list[float]
) -> None:
    study, sent = ingest_study(settings)
    cold = move_to_cold(settings, study)
    with pytest.raises(RestoreRequiredError):
        StorageTiers(settings).open_instance(cold[0])
    with dg.instance_for_test() as instance:
        first = _tick(instance, None)
        [request] = first.run_requests or []
        assert request.run_key and request.run_key.startswith(f"restore-{study}-")
        assert request.tags["vannah/study_uid"] == study
        [observed] = first.asset_events
        assert isinstance(observed, dg.AssetObservation)
        assert observed.metadata["pending_requests"].value == 1

        # Not run yet: the next tick does not request the study again.
        waiting = _tick(instance, first.cursor)
        assert not waiting.run_requests
        assert "1 restore requests pending" in _skip(waiting)
        # Nor while a run of it is under way, even once a re-check is due.
        clock[0] += recheck_seconds(settings) + 1
        job = _defs().resolve_job_def("restore_study_job")
        queued = instance.create_run_for_job(
            job,
            run_config=request.run_config,
            tags=request.tags,
            status=dg.DagsterRunStatus.NOT_STARTED,
        )
        busy = _tick(instance, first.cursor)
        assert not busy.run_requests and "1 running" in _skip(busy)
        instance.report_run_canceled(queued)

        result = _run(instance, request)
        assert result.success
        [mat] = result.asset_materializations_for_node("restored_studies")
        meta = {k: v.value for k, v in mat.metadata.items()}
        assert meta["state"] == "online"
        assert (meta["instances"], meta["instances_restored"], meta["instances_pending"]) == (
            3,
            3,
            0,
        )
        assert meta["bytes_restored"] == sum(len(b) for b in sent.values())
        assert isinstance(meta["restore_latency_s"], float) and meta["restore_latency_s"] >= 0
        assert meta["pending_requests"] == 0
        [check] = result.get_asset_check_evaluations()
        assert check.check_name == "restored_copies_match_catalog" and check.passed
        assert request.tags["dagster/max_runtime_seconds"]

        after = _tick(instance, first.cursor)
        assert not after.run_requests
        assert "no restore request pending" in _skip(after)
    assert tiers_of(settings, study) == ["hot"]
    for i in study_instances(settings, study):
        assert hot_bytes(settings, i.storage_key) == sent[i.sop_instance_uid]
    assert get_hold(settings, study) is not None
    assert pending_requests(settings) == []


def test_an_archive_outage_keeps_the_request_and_a_later_run_completes(
    settings: Settings, archive_proxy: TcpProxy, clock: list[float]
) -> None:
    study, sent = ingest_study(settings, instances=2)
    move_to_cold(settings, study)
    request_restore(settings, study, reason="read")
    archive_proxy.stop()  # the archive is down
    with dg.instance_for_test() as instance:
        first = _tick(instance, None)
        [request] = first.run_requests or []
        failed = _run(instance, request)
        assert not failed.success
        [failure] = [e for e in failed.all_events if e.is_step_failure]
        data = failure.step_failure_data
        assert data.user_failure_data is not None
        assert "archive unreachable" in (data.user_failure_data.description or "")
        assert [r.study_uid for r in pending_requests(settings)] == [study]
        assert tiers_of(settings, study) == ["cold"]

        assert not _tick(instance, first.cursor).run_requests  # re-checked later, not at once
        clock[0] += recheck_seconds(settings) + 1
        later = _tick(instance, first.cursor)
        [retry] = later.run_requests or []
        assert retry.run_key != request.run_key and retry.tags["vannah/attempt"] == "2"

        archive_proxy.start()  # back up
        assert _run(instance, retry).success
    assert tiers_of(settings, study) == ["hot"]
    for i in study_instances(settings, study):
        assert hot_bytes(settings, i.storage_key) == sent[i.sop_instance_uid]
    assert pending_requests(settings) == []


def _schedule(store: WorklistStore, step_id: str, patient_id: str, source: str) -> None:
    """Schedule a step as the REST route does (create) or as HL7 orders and .wl imports do
    (upsert): every path ends in the worklist's event files the prefetch follows."""
    item = item_from_fields(
        {
            "step_id": step_id,
            "patient_id": patient_id,
            "patient_name": "Test^Prefetch",
            "modality": "CT",
            "scheduled_procedure_step_start_date": "20261201",
            "scheduled_procedure_step_start_time": "235959",
        }
    )
    if source == "rest":
        store.create(item, source)
    else:
        store.upsert([item], source)


def test_a_scheduled_step_files_prior_restores_for_its_patient_only(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VANNAH_WORKLIST_PAST_DUE_HOURS", "0")  # the steps' date is fixed
    patient, other = "VHC-PRIORS-1", "VHC-PRIORS-2"
    recent, _ = ingest_study(settings, patient_id=patient, study_date="20260601", instances=1)
    older, _ = ingest_study(settings, patient_id=patient, study_date="20230115", instances=1)
    ancient, _ = ingest_study(settings, patient_id=patient, study_date="20100115", instances=1)
    ingest_study(settings, patient_id=patient, study_date="20260101", instances=1)  # hot
    others, _ = ingest_study(settings, patient_id=other, study_date="20250101", instances=1)
    for study in (recent, older, ancient):
        move_to_cold(settings, study)
    store = WorklistStore(settings.catalog_dir / "worklist")
    _schedule(store, "SPS-P1", patient, "rest")
    _schedule(store, "SPS-P2", other, "hl7")  # only hot studies
    _schedule(store, "SPS-P3", "VHC-PRIORS-NONE", "import")  # no study at all
    resources = {"archive": ArchiveResource()}
    with dg.instance_for_test() as instance:
        tick = scheduled_step_sensor(
            dg.build_sensor_context(instance=instance, resources=resources)
        )
        assert isinstance(tick, dg.SensorResult)
        [request] = tick.run_requests or []
        assert request.run_key == "prefetch-1-3"
        job = _defs().resolve_job_def("prefetch_priors_job")
        result = job.execute_in_process(run_config=request.run_config, instance=instance)
        assert result.success
        [mat] = result.asset_materializations_for_node("prefetched_priors")
        meta = {k: v.value for k, v in mat.metadata.items()}
        assert meta["scheduled_steps"] == 3 and meta["patients_with_cold_priors"] == 1
        assert meta["requests_filed"] == 2 and meta["pending_prior_requests"] == 2
        # Within the look-back (1825 days), most recent first; the ancient one is not.
        filed = {r.study_uid: r.reason for r in pending_requests(settings)}
        assert filed == {recent: "prior", older: "prior"}
        assert others not in filed

        again = scheduled_step_sensor(
            dg.build_sensor_context(instance=instance, cursor=tick.cursor, resources=resources)
        )
        assert isinstance(again, dg.SensorResult) and not again.run_requests

        # The restore sensor takes them from there, reads before priors.
        request_restore(settings, ancient, reason="read")
        restores = _tick(instance, None).run_requests or []
        order = [r.tags["vannah/study_uid"] for r in restores]
        assert order[0] == ancient and set(order) == {ancient, recent, older}

        monkeypatch.setenv("VANNAH_PREFETCH_PRIORS", "false")
        _schedule(store, "SPS-P4", patient, "rest")
        off = scheduled_step_sensor(
            dg.build_sensor_context(instance=instance, cursor=tick.cursor, resources=resources)
        )
        assert isinstance(off, dg.SensorResult) and not off.run_requests
        assert "prefetch_priors is off" in _skip(off) and off.cursor == "4"


def test_a_mismatching_restored_copy_fails_the_check_and_keeps_the_request(
    settings: Settings, moto_s3: S3Server, clock: list[float]
) -> None:
    from tests.conftest import COLD_TEST_BUCKET

    study, _ = ingest_study(settings, instances=2)
    cold = move_to_cold(settings, study)
    client: Any = moto_s3.client()
    client.put_object(
        Bucket=COLD_TEST_BUCKET,
        Key=f"{settings.cold_s3_prefix}/{cold[0].storage_key}",
        Body=b"other bytes than were archived",
        StorageClass="DEEP_ARCHIVE",
    )
    request_restore(settings, study, reason="read")
    with dg.instance_for_test() as instance:
        [request] = _tick(instance, None).run_requests or []
        result = _run(instance, request)
        assert result.success
        [check] = result.get_asset_check_evaluations()
        assert check.check_name == "restored_copies_match_catalog" and not check.passed
        assert check.metadata["examples"].value == [cold[0].sop_instance_uid]
        [mat] = result.asset_materializations_for_node("restored_studies")
        assert mat.metadata["state"].value == "failed"
        assert mat.metadata["instances_failed"].value == 1
    assert [r.study_uid for r in pending_requests(settings)] == [study]
    assert sorted(i.tier for i in study_instances(settings, study)) == ["cold", "hot"]
