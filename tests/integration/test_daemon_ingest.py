"""The daemon the way `make up` runs it: sensor -> ingest run -> catalog, SQLite and PostgreSQL."""

import time
from pathlib import Path

import dagster as dg
import pytest

from tests.integration.conftest import Daemon, start_daemon, stop_daemon
from vannah_pipelines.dicom.synthetic import make_instance, to_part10
from vannah_pipelines.landing.layout import LandingZone, ReceiveFacts
from vannah_pipelines.platform import PROJECT_DIR

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _land(data_dir: Path, n: int) -> list[str]:
    batch = LandingZone(data_dir / "landing").open_batch("dimse")
    uids = []
    for i in range(n):
        ds = make_instance(["CT", "MR", "US"][i % 3], rows=16, columns=16, instance_number=i)
        batch.write_instance(
            to_part10(ds),
            ReceiveFacts(ds.SOPInstanceUID, ds.SOPClassUID, "1.2.840.10008.1.2.1", "dimse"),
        )
        uids.append(ds.SOPInstanceUID)
    assert batch.seal() is not None
    return uids


def _assert_runs_succeeded(daemon: Daemon, timeout: float = 120.0) -> list[dg.DagsterRun]:
    with dg.DagsterInstance.from_config(str(daemon.dagster_home)) as instance:
        # Rows are visible once a batch's Parquet file lands; the run still reports its
        # checks after that, so wait for every run to end before judging them.
        deadline = time.monotonic() + timeout
        while any(not r.is_finished for r in instance.get_runs()):
            assert time.monotonic() < deadline, "runs did not finish"
            time.sleep(0.5)
        # Only ingest here (a schedule that fires meanwhile runs jobs of its own).
        runs = [r for r in instance.get_runs() if r.job_name == "ingest_batch_job"]
        assert runs, "no ingest runs recorded"
        assert {r.status for r in runs} == {dg.DagsterRunStatus.SUCCESS}
        events = instance.fetch_materializations(dg.AssetKey("instance_index"), limit=100)
        assert (
            sum(
                e.asset_materialization.metadata["instances"].value  # type: ignore[union-attr]
                for e in events.records
            )
            >= 1
        )
        return runs


def test_daemon_sensor_ingests_landed_batches_sqlite(daemon: Daemon) -> None:
    uids = _land(daemon.data_dir, 12) + _land(daemon.data_dir, 9)
    reader = daemon.wait_for_instances(len(uids))
    assert sorted(r[0] for r in reader.query("SELECT sop_instance_uid FROM instances")) == sorted(
        uids
    )
    _assert_runs_succeeded(daemon)
    assert (daemon.dagster_home / "history" / "runs.db").exists()  # SQLite in the data folder


def test_daemon_runs_on_postgres_storage(
    tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VANNAH_DAGSTER_PG_URL", postgres_url)  # for the instance read below
    daemon = start_daemon(
        tmp_path / "data",
        PROJECT_DIR / "docs" / "dagster.postgres.yaml",
        {"VANNAH_DAGSTER_PG_URL": postgres_url},
    )
    try:
        uids = _land(daemon.data_dir, 10)
        daemon.wait_for_instances(len(uids))
        runs = _assert_runs_succeeded(daemon)
        with dg.DagsterInstance.from_config(str(daemon.dagster_home)) as instance:
            assert type(instance.run_storage).__name__ == "PostgresRunStorage"
            assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
            assert instance.get_run_by_id(runs[0].run_id) is not None
        assert not list(daemon.dagster_home.rglob("*.db"))  # nothing went to SQLite
    finally:
        stop_daemon(daemon)
