"""Dagster glue of routing: the sensor queues deliveries for newly indexed instances and
requests one run per destination (STAT first, none while one is under way); the run sends
them to real peers (DCMTK storescp, a folder) with metadata per destination; the checks
pass, and the reachability check fails once a destination is down."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from tests.routing.test_dry_run import _ingest
from tests.servers import StoreSCP, storescp_server
from vannah_pipelines.defs.resources import ArchiveResource
from vannah_pipelines.defs.routing.deliveries import indexed_instance_sensor, rules_in_force
from vannah_pipelines.settings import Settings, load_settings
from vannah_pipelines.storage.lifecycle import open_catalog

pytestmark = pytest.mark.integration


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreSCP]:
    with storescp_server(tmp_path / "ai", "AI_ENGINE") as scp:
        yield scp


@pytest.fixture
def settings(tmp_path: Path, storescp: StoreSCP, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The process's settings (what the resource reads): a rules file sending chest CT to
    storescp and every study to a folder."""
    out = tmp_path / "folder"
    out.mkdir()
    rules = tmp_path / "rules.json"
    rules.write_text(
        json.dumps(
            {
                "rules": [
                    {
                        "name": "Route CT to AI Pipeline",
                        "condition": {"modality": "CT", "bodyPart": "CHEST"},
                        "destination": {
                            "aet": "AI_ENGINE",
                            "host": "127.0.0.1",
                            "port": storescp.port,
                        },
                    },
                    {
                        "name": "Everything to the folder",
                        "condition": {"modality": "*"},
                        "destination": {"type": "folder", "path": str(out)},
                    },
                ]
            }
        )
    )
    monkeypatch.delenv("VANNAH_CONFIG", raising=False)
    monkeypatch.setenv("VANNAH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("VANNAH_ROUTING_RULES_FILE", str(rules))
    monkeypatch.setenv("VANNAH_ROUTING_RUN_LINGER_SECONDS", "0")  # one pass per run here
    return load_settings()


def _defs() -> dg.Definitions:
    from vannah_pipelines.definitions import defs

    return defs()


def _tick(instance: dg.DagsterInstance, cursor: str | None) -> dg.SensorResult:
    context = dg.build_sensor_context(
        instance=instance, cursor=cursor, resources={"archive": ArchiveResource()}
    )
    result = indexed_instance_sensor(context)
    assert isinstance(result, dg.SensorResult)
    return result


def _status(settings: Settings) -> dict[str, int]:
    catalog = open_catalog(settings)
    try:
        rows = catalog.query("SELECT status, count(*) FROM delivery_status GROUP BY 1")
    finally:
        catalog.close()
    return {str(s): int(n) for s, n in rows}


def test_definitions_load_with_routing() -> None:
    loaded = _defs()
    dg.Definitions.validate_loadable(loaded)
    for job in (
        "route_instances_job",
        "check_routing_job",
        "retry_deliveries_job",
        "report_commitment_results_job",
    ):
        assert loaded.resolve_job_def(job) is not None
    for sensor in ("indexed_instance_sensor", "owed_commitment_results_sensor"):
        assert loaded.resolve_sensor_def(sensor) is not None


def test_a_stat_study_raises_the_priority_of_its_destinations_queued_run(
    settings: Settings, storescp: StoreSCP
) -> None:
    _ingest(settings, "CT", 1, "2026-03-02T10:00:00+00:00", BodyPartExamined="CHEST")
    with dg.instance_for_test() as instance:
        first = _tick(instance, None)
        ae = f"dicom AI_ENGINE@127.0.0.1:{storescp.port}"
        [request] = [r for r in first.run_requests or [] if r.tags["vannah/destination"] == ae]
        assert request.tags["dagster/priority"] == "10"
        queued = instance.create_run_for_job(  # not started yet: it waits in the run queue
            _defs().resolve_job_def("route_instances_job"),
            run_config=request.run_config,
            tags=request.tags,
            status=dg.DagsterRunStatus.NOT_STARTED,
        )
        _ingest(
            settings, "CT", 1, "2026-03-02T11:00:00+00:00",
            BodyPartExamined="CHEST", RequestedProcedurePriority="STAT",
        )  # fmt: skip
        again = _tick(instance, first.cursor)
        assert ae not in [r.tags["vannah/destination"] for r in again.run_requests or []]
        run = instance.get_run_by_id(queued.run_id)
        assert run is not None
        tags = run.tags
        assert (tags["dagster/priority"], tags["vannah/priority"]) == ("30", "STAT")
        instance.report_run_canceled(queued)


def test_sensor_queues_and_requests_a_run_per_destination_and_the_runs_deliver(
    settings: Settings, storescp: StoreSCP, tmp_path: Path
) -> None:
    routine = _ingest(settings, "CT", 2, "2026-03-02T10:00:00+00:00", BodyPartExamined="CHEST")
    stat = _ingest(
        settings,
        "MR",
        1,
        "2026-03-02T11:00:00+00:00",
        RequestedProcedurePriority="STAT",
    )
    with dg.instance_for_test() as instance:
        first = _tick(instance, None)
        requests = first.run_requests or []
        assert _status(settings) == {"queued": 2 + 3}
        by_dest = {r.tags["vannah/destination"]: r for r in requests}
        folder = f"folder {tmp_path / 'folder'}"
        ae = f"dicom AI_ENGINE@127.0.0.1:{storescp.port}"
        assert set(by_dest) == {folder, ae}
        # The folder's most urgent delivery is the STAT MR: its run goes first, ahead.
        assert by_dest[folder].tags["dagster/priority"] == "30"
        assert by_dest[ae].tags["dagster/priority"] == "10"
        assert requests[0].tags["vannah/destination"] == folder
        assert all(r.tags["vannah/kind"] == "routing" for r in requests)

        # While a destination's run is queued, no second one is requested for it.
        job = _defs().resolve_job_def("route_instances_job")
        queued = instance.create_run_for_job(
            job,
            run_config=by_dest[ae].run_config,
            tags=by_dest[ae].tags,
            status=dg.DagsterRunStatus.NOT_STARTED,
        )
        again = _tick(instance, first.cursor)
        assert [r.tags["vannah/destination"] for r in again.run_requests or []] == [folder]
        assert _status(settings) == {"queued": 5}  # nothing queued twice
        instance.report_run_canceled(queued)

        for request in requests:
            result = job.execute_in_process(
                run_config=request.run_config, instance=instance, tags=request.tags
            )
            assert result.success
            [mat] = result.asset_materializations_for_node("routed_instances")
            meta = {k: v.value for k, v in mat.metadata.items()}
            expected = 2 if request is by_dest[ae] else 3
            assert meta["instances_sent"] == expected and meta["instances_failed"] == 0
            assert meta["bytes_sent"] > 0 and meta["queue_age_s"] >= 0
        assert _status(settings) == {"sent": 5}
        assert len(storescp.received()) == 2
        written = sorted(p.parent.parent.name for p in (tmp_path / "folder").rglob("*.dcm"))
        assert written == sorted([routine.uid] * 2 + [stat.uid])
        idle = _tick(instance, first.cursor)
        assert not idle.run_requests and "0 due" in (idle.skip_reason.skip_message or "")

        checks = (
            _defs()
            .resolve_job_def("check_routing_job")
            .execute_in_process(instance=instance, raise_on_error=False)
        )
        passed = {e.check_name: e.passed for e in checks.get_asset_check_evaluations()}
        assert passed == {
            "routing_backlog_fresh": True,
            "no_dead_deliveries": True,
            "routing_failure_rate_low": True,
            "routing_destinations_reachable": True,
        }


def test_reachability_check_fails_for_a_destination_that_is_down(
    settings: Settings, storescp: StoreSCP
) -> None:
    storescp.process.terminate()
    storescp.process.wait(timeout=10)
    with dg.instance_for_test() as instance:
        checks = (
            _defs()
            .resolve_job_def("check_routing_job")
            .execute_in_process(instance=instance, raise_on_error=False)
        )
        [reach] = [
            e
            for e in checks.get_asset_check_evaluations()
            if e.check_name == "routing_destinations_reachable"
        ]
        assert not reach.passed
        found = reach.metadata["destinations"].value
        assert isinstance(found, dict)
        down = {d: r for d, r in found.items() if not r["ok"]}
        assert list(down) == [f"dicom AI_ENGINE@127.0.0.1:{storescp.port}"]


def test_a_bad_rules_file_is_refused_and_the_last_good_rules_keep_routing(
    settings: Settings, storescp: StoreSCP, tmp_path: Path
) -> None:
    _ingest(settings, "CT", 1, "2026-03-02T10:00:00+00:00", BodyPartExamined="CHEST")
    with dg.instance_for_test() as instance:
        first = _tick(instance, None)
        assert len(first.run_requests or []) == 2
        assert settings.routing_rules_file is not None
        settings.routing_rules_file.write_text('{"rules": [{"name": "broken", "condition": {}}]}')
        _ingest(settings, "CT", 2, "2026-03-02T11:00:00+00:00", BodyPartExamined="CHEST")
        second = _tick(instance, first.cursor)
        # The new instances are queued by the last good rules, to both destinations.
        assert _status(settings) == {"queued": 3 * 2}
        assert second.run_requests  # still routing
        _, source = rules_in_force(settings)
        assert source.origin == "file" or source.origin == "last-good"
        assert source.error is not None and 'rule 1 "broken"' in source.error


def test_routing_schedules_run_only_while_rules_are_in_force(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vannah_pipelines.defs.routing.deliveries import (
        every_15_minutes_routing_checks_schedule,
        hourly_delivery_reconciliation_schedule,
    )

    schedules = (every_15_minutes_routing_checks_schedule, hourly_delivery_reconciliation_schedule)

    def evaluate() -> list[object]:
        context = dg.build_schedule_context(resources={"archive": ArchiveResource()})
        return [s(context) for s in schedules]  # type: ignore[operator]

    assert all(isinstance(r, dg.RunRequest) for r in evaluate())
    empty = tmp_path / "empty-rules.json"
    empty.write_text('{"rules": []}')
    monkeypatch.setenv("VANNAH_ROUTING_RULES_FILE", str(empty))
    assert all(isinstance(r, dg.SkipReason) for r in evaluate())
