"""The sensor follows its runs: a failed ingest run is retried with backoff, a batch that
keeps failing is split, a lone file that keeps failing is quarantined, a disk-full failure
waits for space and counts for nothing. Runs really execute (execute_in_process) against a
temporary DagsterInstance, which the sensor reads through its context."""

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from vannah_pipelines.catalog.reader import CatalogReader
from vannah_pipelines.defs.landing import sensors
from vannah_pipelines.defs.landing.sensors import RUN_KEY_TAG, landed_batch_sensor
from vannah_pipelines.defs.resources import ArchiveResource
from vannah_pipelines.dicom.synthetic import make_instance, to_part10
from vannah_pipelines.landing.layout import Batch, LandingZone, ReceiveFacts


@pytest.fixture(autouse=True)
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("VANNAH_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("VANNAH_CONFIG", raising=False)
    monkeypatch.setenv("VANNAH_INGEST_RETRY_BASE_SECONDS", "100")
    monkeypatch.setenv("VANNAH_INGEST_MAX_ATTEMPTS", "3")
    monkeypatch.setenv("VANNAH_FREE_SPACE_RESERVE_MB", "0")
    yield tmp_path


class Clock:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = 1_800_000_000.0
        monkeypatch.setattr(sensors, "_now", lambda: self.now)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    return Clock(monkeypatch)


def _land(data_dir: Path, n: int) -> tuple[str, list[str]]:
    batch = LandingZone(data_dir / "landing").open_batch("dimse")
    uids = []
    for i in range(n):
        ds = make_instance("CT", rows=8, columns=8, instance_number=i)
        batch.write_instance(
            to_part10(ds),
            ReceiveFacts(
                ds.SOPInstanceUID, ds.SOPClassUID, "1.2.840.10008.1.2.1", "dimse", calling_ae="CT1"
            ),
        )
        uids.append(ds.SOPInstanceUID)
    sealed = batch.seal()
    assert sealed is not None
    return sealed.batch_id, uids


class Harness:
    """Evaluates the sensor tick by tick and executes what it requests."""

    def __init__(self, instance: dg.DagsterInstance) -> None:
        from vannah_pipelines.definitions import defs

        self.instance = instance
        self.job = defs().resolve_job_def("ingest_batch_job")
        self.cursor: str | None = None

    def tick(self) -> dg.SensorResult:
        context = dg.build_sensor_context(
            instance=self.instance, cursor=self.cursor, resources={"archive": ArchiveResource()}
        )
        result = landed_batch_sensor(context)
        assert isinstance(result, dg.SensorResult)
        self.cursor = result.cursor
        return result

    def execute(self, request: dg.RunRequest) -> bool:
        result = self.job.execute_in_process(
            run_config=request.run_config,
            instance=self.instance,
            partition_key=request.partition_key,
            tags=request.tags,
            raise_on_error=False,
        )
        return result.success

    def state(self) -> dict[str, Any]:
        batches: dict[str, Any] = json.loads(self.cursor or "{}")["batches"]
        return batches


def _break_catalog(data_dir: Path) -> Path:
    """Make catalog writes fail with an OSError that is not a full disk."""
    catalog = data_dir / "catalog"
    catalog.write_text("not a folder")
    return catalog


def test_a_failed_ingest_run_is_requested_again_after_backoff(data_dir: Path, clock: Clock) -> None:
    batch_id, uids = _land(data_dir, 2)
    catalog = _break_catalog(data_dir)
    with dg.instance_for_test() as instance:
        harness = Harness(instance)
        [first] = harness.tick().run_requests or []
        assert first.run_key == f"ingest-{batch_id}" and first.tags[RUN_KEY_TAG] == first.run_key
        assert not harness.execute(first)  # the run fails: catalog unwritable

        waiting = harness.tick()  # the sensor sees the failure and backs off
        assert not waiting.run_requests
        assert waiting.skip_reason is not None
        assert "1 waiting to retry (next in 100 s)" in (waiting.skip_reason.skip_message or "")
        state = harness.state()[batch_id]
        assert (state["attempts"], state["run_key"]) == (1, None)
        assert state["error"].startswith(("NotADirectoryError", "FileExistsError"))

        clock.now += 99
        assert not harness.tick().run_requests  # still backing off
        catalog.unlink()  # the fault is gone
        clock.now += 1
        [retry] = harness.tick().run_requests or []
        assert retry.run_key == f"ingest-{batch_id}-r1"
        assert retry.tags["vannah/attempt"] == "2"
        assert harness.execute(retry)
        assert not harness.tick().run_requests
        assert harness.state() == {}  # ingested: the cursor forgets it
    reader = CatalogReader(data_dir / "catalog")
    assert sorted(r[0] for r in reader.query("SELECT sop_instance_uid FROM instances")) == sorted(
        uids
    )


def test_the_backoff_doubles_then_a_failing_batch_is_split(data_dir: Path, clock: Clock) -> None:
    batch_id, uids = _land(data_dir, 5)
    catalog = _break_catalog(data_dir)
    with dg.instance_for_test() as instance:
        harness = Harness(instance)
        waits = []
        for _ in range(3):
            [request] = harness.tick().run_requests or []
            assert not harness.execute(request)
            result = harness.tick()
            if harness.state():
                waits.append(harness.state()[batch_id]["next_try"] - clock.now)
                clock.now += waits[-1]
        assert waits == [100, 200]  # the third failure splits instead of waiting
        assert result.skip_reason is not None and "1 split" in result.skip_reason.skip_message
        zone = LandingZone(data_dir / "landing")
        halves = zone.sealed_batches()
        assert [len(h.instances()) for h in halves] == [3, 2]
        assert all(h.batch_id.split("-")[1] == "split" for h in halves)
        assert all(i.facts and i.facts.calling_ae == "CT1" for h in halves for i in h.instances())
        catalog.unlink()
        requests = harness.tick().run_requests or []
        assert [r.run_config["ops"]["instance_index"]["config"]["batch_ids"] for r in requests] == [
            [h.batch_id] for h in halves
        ]  # each half alone
        assert all(harness.execute(r) for r in requests)
    reader = CatalogReader(data_dir / "catalog")
    assert sorted(r[0] for r in reader.query("SELECT sop_instance_uid FROM instances")) == sorted(
        uids
    )


def test_a_lone_file_that_keeps_failing_ends_in_quarantine_with_a_reason(
    data_dir: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VANNAH_INGEST_MAX_ATTEMPTS", "1")
    _, [uid] = _land(data_dir, 1)
    catalog = _break_catalog(data_dir)
    with dg.instance_for_test() as instance:
        harness = Harness(instance)
        [request] = harness.tick().run_requests or []
        assert not harness.execute(request)
        assert not harness.tick().run_requests
        clock.now += 100
        catalog.unlink()  # (so that the quarantine itself can be recorded)
        [quarantine] = harness.tick().run_requests or []
        config = quarantine.run_config["ops"]["instance_index"]["config"]
        assert config["quarantine_reason"].startswith("IngestFailed: ingest failed 1 times")
        assert harness.execute(quarantine)
        assert not harness.tick().run_requests and harness.state() == {}
    [(quarantined, reason)] = CatalogReader(data_dir / "catalog").query(
        "SELECT sop_instance_uid, reason FROM quarantine"
    )
    assert quarantined == uid
    assert "NotADirectoryError" in reason or "FileExistsError" in reason


def test_a_disk_full_run_waits_for_space_and_counts_for_nothing(
    data_dir: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch_id, uids = _land(data_dir, 2)
    assert len(uids) == 2
    monkeypatch.setenv("VANNAH_FREE_SPACE_RESERVE_MB", str(2**40))  # more than any disk
    with dg.instance_for_test() as instance:
        harness = Harness(instance)
        [request] = harness.tick().run_requests or []
        assert not harness.execute(request)
        [run] = instance.get_runs()
        assert run.tags["vannah/failure"] == "disk_full"
        for _ in range(5):  # however long: no space, no run, no attempt counted
            clock.now += 1000
            result = harness.tick()
            assert not result.run_requests
            assert result.skip_reason is not None
            assert "1 waiting for disk space" in (result.skip_reason.skip_message or "")
        assert harness.state()[batch_id]["attempts"] == 0
        assert not list((data_dir / "quarantine").rglob("*.dcm"))
        monkeypatch.setenv("VANNAH_FREE_SPACE_RESERVE_MB", "0")  # space is back
        [retry] = harness.tick().run_requests or []
        assert retry.tags["vannah/attempt"] == "1"
        assert harness.execute(retry)
    assert len(CatalogReader(data_dir / "catalog").query("SELECT 1 FROM instances")) == 2


def test_sensor_skip_reason_reports_the_landing_backlog(data_dir: Path, clock: Clock) -> None:
    _land(data_dir, 1)
    with dg.instance_for_test() as instance:
        harness = Harness(instance)
        assert harness.tick().run_requests
        result = harness.tick()
        assert result.skip_reason is not None
        message = result.skip_reason.skip_message or ""
        assert "landing backlog 1 sealed batches, oldest" in message
        assert "1 batches in runs" in message


def test_sensor_reports_a_stale_backlog_as_a_failed_check_when_it_changes(
    data_dir: Path, clock: Clock
) -> None:
    """landing_backlog_fresh fails from the sensor even when no run drains the backlog."""
    zone = LandingZone(data_dir / "landing")
    batch = zone.open_batch("dimse")
    ds = make_instance("CT", rows=8, columns=8)
    batch.write_instance(
        to_part10(ds),
        ReceiveFacts(ds.SOPInstanceUID, ds.SOPClassUID, "1.2.840.10008.1.2.1", "dimse"),
    )
    # Sealed long ago (an old batch id), e.g. held by runs that keep failing.
    zone.move_to_sealed(batch.path, "20200101T000000000000-dimse-1-0")
    with dg.instance_for_test() as instance:
        harness = Harness(instance)
        first = harness.tick()
        [check] = first.asset_events
        assert isinstance(check, dg.AssetCheckEvaluation)
        assert (check.check_name, check.passed) == ("landing_backlog_fresh", False)
        assert check.metadata["pending_batches"].value == 1
        assert not harness.tick().asset_events  # reported on change only
        for path in zone.sealed_dir.iterdir():  # drained
            zone.remove(Batch(path.name, path))
        [fresh] = harness.tick().asset_events
        assert isinstance(fresh, dg.AssetCheckEvaluation) and fresh.passed
