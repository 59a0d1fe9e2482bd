"""Restoring a study from the cold tier (moto's S3 server, DEEP_ARCHIVE) into the hot tier,
through the same code the restore job and ``vannah restore`` run; warm is SeaweedFS."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config

from tests.conftest import COLD_TEST_BUCKET, lake_settings
from tests.servers import S3Server
from tests.storage.restore_support import (
    hot_bytes,
    ingest_study,
    move_to_cold,
    study_instances,
    tiers_of,
)
from vannah_pipelines.catalog.lake import LakeConfig
from vannah_pipelines.catalog.lookup import find_instances
from vannah_pipelines.catalog.reader import CatalogReader
from vannah_pipelines.cli import main
from vannah_pipelines.errors import ArchivedError
from vannah_pipelines.settings import Settings
from vannah_pipelines.storage.base import RestoreState, Tier
from vannah_pipelines.storage.holds import get_hold
from vannah_pipelines.storage.lifecycle import open_catalog
from vannah_pipelines.storage.restore import RestoreRequest, pending_requests, request_restore
from vannah_pipelines.storage.restoring import (
    InstanceState,
    StudyState,
    UnknownStudyError,
    dump_attempts,
    load_attempts,
    plan_restore_runs,
    restore_study,
)
from vannah_pipelines.storage.tiers import RestoreRequiredError, StorageTiers


@pytest.fixture
def settings(tmp_path: Path, object_tiers: dict[str, Any]) -> Settings:
    return Settings(data_dir=tmp_path / "data", storage_timeout_seconds=5, **object_tiers)


def _restore(settings: Settings, study_uid: str, **kwargs: Any) -> Any:
    catalog = open_catalog(settings)
    try:
        return restore_study(settings, catalog, study_uid, **kwargs)
    finally:
        catalog.close()


def test_restore_study_brings_a_cold_study_back_hot_byte_identical(settings: Settings) -> None:
    study, sent = ingest_study(settings)
    other, _ = ingest_study(settings)  # another study: untouched
    cold = move_to_cold(settings, study)
    tiers = StorageTiers(settings)
    assert tiers_of(settings, study) == ["cold"]
    # The archived object cannot be read, and a read through the tiers files a request.
    with pytest.raises(ArchivedError):
        tiers[Tier.COLD].open(cold[0].storage_key)
    assert tiers[Tier.COLD].restore_state(cold[0].storage_key) is RestoreState.ARCHIVED
    with pytest.raises(RestoreRequiredError) as caught:
        tiers.open_instance(cold[0])
    assert caught.value.study_uid == study
    assert [(r.study_uid, r.reason) for r in pending_requests(settings)] == [(study, "read")]

    seen: list[InstanceState] = []
    before = datetime.now(UTC)
    result = _restore(settings, study, progress=lambda o: seen.append(o.state))

    assert result.state is StudyState.ONLINE
    assert seen == [InstanceState.RESTORED] * 3
    assert (result.restored, result.pending, result.failed) == (3, 0, 0)
    assert result.bytes_restored == sum(len(b) for b in sent.values())
    assert result.requested_at is not None and result.change is not None
    assert result.change.rows == 3  # one append for the study
    for i in study_instances(settings, study):
        assert i.tier == "hot"
        assert hot_bytes(settings, i.storage_key) == sent[i.sop_instance_uid]
        with tiers.open_instance(i) as stream:
            assert stream.read() == sent[i.sop_instance_uid]
        assert tiers[Tier.COLD].exists(i.storage_key)  # the cold object stays
    hold = get_hold(settings, study)
    assert hold is not None
    assert before + timedelta(days=7) <= hold.hot_until <= datetime.now(UTC) + timedelta(days=7)
    assert pending_requests(settings) == []
    assert tiers_of(settings, other) == ["hot"] and get_hold(settings, other) is None

    again = _restore(settings, study)  # nothing left in the cold tier: nothing to do
    assert again.state is StudyState.ONLINE and again.restored == 0 and again.change is None


def test_restore_study_of_an_unknown_study_raises(settings: Settings) -> None:
    ingest_study(settings)
    with pytest.raises(UnknownStudyError):
        _restore(settings, "1.2.3.999")


def _cold_client(server: S3Server) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=server.url,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        region_name=server.region,
        config=Config(s3={"addressing_style": "path"}),
    )


def test_a_restored_copy_that_does_not_match_the_catalog_is_not_recorded_hot(
    settings: Settings, moto_s3: S3Server
) -> None:
    study, sent = ingest_study(settings)
    cold = move_to_cold(settings, study)
    victim = cold[1]
    # The archive hands back other bytes than were sent (bit rot, a bad restore).
    _cold_client(moto_s3).put_object(
        Bucket=COLD_TEST_BUCKET,
        Key=f"{settings.cold_s3_prefix}/{victim.storage_key}",
        Body=b"not the archived instance",
        StorageClass="DEEP_ARCHIVE",
    )
    request_restore(settings, study, reason="read")

    result = _restore(settings, study)

    assert result.state is StudyState.FAILED
    assert (result.restored, result.failed) == (2, 1)
    [failed] = [i for i in result.instances if i.state is InstanceState.FAILED]
    assert failed.sop_instance_uid == victim.sop_instance_uid
    assert failed.mismatch and failed.detail.startswith("checksum")
    tiers = {i.sop_instance_uid: i.tier for i in study_instances(settings, study)}
    assert tiers[victim.sop_instance_uid] == "cold"  # never recorded hot
    assert sorted(tiers.values()) == ["cold", "hot", "hot"]
    assert not (settings.hot_dir / victim.storage_key).exists()  # nothing left half-written
    assert [r.study_uid for r in pending_requests(settings)] == [study]  # the request stays
    for i in study_instances(settings, study):
        if i.tier == "hot":
            assert hot_bytes(settings, i.storage_key) == sent[i.sop_instance_uid]


def test_vannah_restore_restores_by_hand_and_shows_each_instance(
    settings: Settings,
    object_tiers: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    study, sent = ingest_study(settings)
    move_to_cold(settings, study)
    monkeypatch.delenv("VANNAH_CONFIG", raising=False)
    for name, value in object_tiers.items():
        monkeypatch.setenv(
            f"VANNAH_{name.upper()}", str(value).lower() if value is False else str(value)
        )

    code = main(["--data-dir", str(settings.data_dir), "restore", study, "--wait", "-q"])

    out = capsys.readouterr().out
    assert code == 0, out
    for sop in sent:
        assert f"{sop} " in out and "restored" in out
    assert f"study {study}: online; 3 instances, 3 restored" in out
    assert "held hot until" in out
    catalog = open_catalog(settings)
    try:
        assert {i.tier for i in find_instances(catalog, study)} == {"hot"}
    finally:
        catalog.close()
    for i in study_instances(settings, study):
        assert hashlib.sha256(hot_bytes(settings, i.storage_key)).hexdigest() == i.checksum

    assert main(["--data-dir", str(settings.data_dir), "restore", "1.2.3.999", "-q"]) == 1
    assert "no study 1.2.3.999 in the catalog" in capsys.readouterr().err
    assert main(["--data-dir", str(settings.data_dir), "restore", "../etc", "-q"]) == 2


def _request(uid: str, minute: int, reason: str = "read") -> RestoreRequest:
    at = datetime(2026, 1, 1, 8, minute, tzinfo=UTC)
    return RestoreRequest(uid, at, reason, Path(f"{uid}.json"))


def test_plan_restore_runs_reads_first_once_per_study_then_rechecks() -> None:
    requests = [
        _request("1.1", 0, "prior"),
        _request("1.2", 1),
        _request("1.3", 2),
        _request("1.4", 3, "prior"),
    ]
    plan = plan_restore_runs(requests, {}, {"1.3"}, now=100.0, recheck_after=60, max_runs=2)
    assert [r.study_uid for r in plan.runs] == ["1.2", "1.1"]  # reads first, then oldest
    assert (plan.running, plan.deferred) == (1, 1)
    assert all(r.attempt == 1 for r in plan.runs)
    state = load_attempts(dump_attempts(plan.state, len(requests)))
    assert state == plan.state
    soon = plan_restore_runs(requests, state, set(), now=130.0, recheck_after=60, max_runs=5)
    assert [r.study_uid for r in soon.runs] == ["1.3", "1.4"] and soon.waiting == 2
    later = plan_restore_runs(
        requests[:2], soon.state, set(), now=161.0, recheck_after=60, max_runs=5
    )
    assert [(r.study_uid, r.attempt) for r in later.runs] == [("1.2", 2), ("1.1", 2)]
    assert len({r.run_key for r in [*plan.runs, *later.runs]}) == 4
    assert set(later.state) == {"1.1", "1.2"}  # completed requests are forgotten


def test_a_restore_is_recorded_on_the_lake(
    tmp_path: Path, object_tiers: dict[str, Any], lake_config: LakeConfig
) -> None:
    """With the DuckLake configured, the catalog is read from the lake and the hot location
    is appended to it as well as locally: services on other hosts see the study hot."""
    settings = Settings(
        data_dir=tmp_path / "data", storage_timeout_seconds=5, **object_tiers,
        **lake_settings(lake_config),
    )  # fmt: skip
    study, sent = ingest_study(settings, instances=2)
    move_to_cold(settings, study)
    elsewhere = CatalogReader(tmp_path / "elsewhere", lake=lake_config)
    try:
        assert elsewhere.query(
            "SELECT DISTINCT tier FROM instances WHERE study_instance_uid = ?", [study]
        ) == [("cold",)]
        result = _restore(settings, study)
        assert result.state is StudyState.ONLINE and result.restored == 2
        assert elsewhere.query(
            "SELECT DISTINCT tier FROM instances WHERE study_instance_uid = ?", [study]
        ) == [("hot",)]
    finally:
        elsewhere.close()
    local = CatalogReader(settings.catalog_dir)
    try:
        assert {i.tier for i in find_instances(local, study)} == {"hot"}
    finally:
        local.close()
    for i in study_instances(settings, study):
        assert hot_bytes(settings, i.storage_key) == sent[i.sop_instance_uid]


def test_a_hot_copy_left_by_a_run_that_stopped_is_recorded_without_asking_the_archive(
    settings: Settings,
) -> None:
    study, sent = ingest_study(settings, instances=2)
    cold = move_to_cold(settings, study)
    # A run copied the first instance, then died before its append.
    first = cold[0]
    (settings.hot_dir / first.storage_key).write_bytes(sent[first.sop_instance_uid])

    result = _restore(settings, study)

    assert result.state is StudyState.ONLINE and result.restored == 2
    assert [i.detail for i in result.instances] == ["hot copy found", ""]
    archive = StorageTiers(settings)[Tier.COLD]
    assert archive.restore_state(first.storage_key) is RestoreState.ARCHIVED  # never asked
    assert archive.restore_state(cold[1].storage_key) is RestoreState.ONLINE
    assert tiers_of(settings, study) == ["hot"]
