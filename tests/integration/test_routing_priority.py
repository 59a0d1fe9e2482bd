"""STAT ahead of routine under load, with the real Dagster daemon and real DCMTK peers.

A routine backlog is being routed to a slow PACS when a STAT study arrives. The STAT study
overtakes the routine work queued before it: at the PACS (the lingering run picks the most
urgent due deliveries batch by batch, not its whole backlog at once) and at a second
destination that only takes STAT work (its run, queued with a higher ``dagster/priority``,
starts once the PACS run gives its place up). Nothing is lost: every routine instance
arrives in the end. Ingest keeps running while routing runs (a run slot is kept for it).

The PACS's pace is the test's: each C-STORE waits in storescp's ``--exec-on-reception``
command, slowly until the STAT study is queued (the gate file), then briskly. So there
is always routine work still queued when the STAT study is, however loaded the machine is,
and the test asserts the order things arrived in, never how long they took.
"""

import json
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import dagster as dg
import pytest

from tests.integration.conftest import Daemon, start_daemon
from tests.processes import stop_process_group
from tests.servers import StoreSCP, storescp_server
from vannah_pipelines.catalog.reader import CatalogReader
from vannah_pipelines.dicom.synthetic import make_instance, to_part10
from vannah_pipelines.landing.layout import LandingZone, ReceiveFacts
from vannah_pipelines.routing.deliveries import BATCH

# Five Dagster runs start in turn (ingest, routing, ingest, routing x2): minutes when loaded.
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

ROUTINE = 200  # instances in the backlog
STAT = 4  # instances in the STAT study
TIMEOUT = 240.0  # generous: a loaded CI machine; nothing below asserts a duration


def _slow_peer(out: Path, aet: str, arrivals: Path, gate: Path) -> tuple[str, ...]:
    """storescp options: log each arrival (`aet` and file name, in order) to `arrivals`,
    then hold the C-STORE response 1.5 s while `gate` does not exist, 0.02 s after."""
    command = (
        f"echo {aet} #f $(date +%s.%N) >> {arrivals}; "
        f"if [ -e {gate} ]; then sleep 0.02; else sleep 1.5; fi"
    )
    return ("+xa", "--exec-on-reception", command, "--exec-sync")


def _land(data_dir: Path, count: int, **overrides: object) -> list[str]:
    """One sealed landing batch of `count` small CT instances of one study."""
    batch = LandingZone(data_dir / "landing").open_batch("dimse")
    study = None
    uids = []
    for i in range(count):
        ds = make_instance("CT", study_uid=study, rows=8, columns=8, instance_number=i, **overrides)
        study = str(ds.StudyInstanceUID)
        batch.write_instance(
            to_part10(ds),
            ReceiveFacts(ds.SOPInstanceUID, ds.SOPClassUID, "1.2.840.10008.1.2.1", "dimse"),
        )
        uids.append(str(ds.SOPInstanceUID))
    assert batch.seal() is not None
    return uids


def _arrivals(log: Path) -> list[tuple[str, str]]:
    """(AE title, SOP Instance UID) of each instance the peers took, in order."""
    if not log.exists():
        return []
    rows = []
    for line in log.read_text().splitlines():
        fields = line.split()
        if len(fields) == 3:  # a line being written is complete once it has its time
            rows.append((fields[0], fields[1].split(".", 1)[1]))  # file: <modality>.<uid>
    return rows


def _wait(what: str, done: Callable[[], bool], daemon: Daemon) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not done():
        assert daemon.process.poll() is None, "dagster-daemon died"
        if time.monotonic() > deadline:
            log = (daemon.data_dir / "daemon.log").read_text(errors="replace")[-4000:]
            pytest.fail(f"{what} not within {TIMEOUT} s; daemon log:\n{log}")
        time.sleep(0.2)


def _query(daemon: Daemon, sql: str) -> list[tuple[object, ...]]:
    reader = CatalogReader(daemon.data_dir / "catalog")
    try:
        return [tuple(r) for r in reader.query(sql)]
    finally:
        reader.close()


@pytest.fixture
def routing(tmp_path: Path) -> Iterator[tuple[Daemon, StoreSCP, StoreSCP, Path, Path]]:
    """The daemon routing every study to a slow PACS and STAT studies to a reading room."""
    arrivals, gate = tmp_path / "arrivals.log", tmp_path / "gate"
    with ExitStack() as stack:
        pacs = stack.enter_context(
            storescp_server(
                tmp_path / "pacs", "PACS", _slow_peer(tmp_path / "pacs", "PACS", arrivals, gate)
            )
        )
        room = stack.enter_context(
            storescp_server(
                tmp_path / "room",
                "READING",
                _slow_peer(tmp_path / "room", "READING", arrivals, gate),
            )
        )
        rules = tmp_path / "rules.json"
        rules.write_text(
            json.dumps(
                {
                    "rules": [
                        {
                            "name": "Everything to the PACS",
                            "condition": {"modality": "*"},
                            "destination": {"aet": "PACS", "host": "127.0.0.1", "port": pacs.port},
                        },
                        {
                            "name": "STAT to the reading room",
                            "condition": {"attributes": {"RequestedProcedurePriority": "STAT"}},
                            "destination": {
                                "aet": "READING",
                                "host": "127.0.0.1",
                                "port": room.port,
                            },
                        },
                    ]
                }
            )
        )
        daemon = start_daemon(
            tmp_path / "data",
            extra_env={
                "VANNAH_ROUTING_RULES_FILE": str(rules),
                "VANNAH_ROUTING_RUN_LINGER_SECONDS": "2",
            },
        )
        stack.callback(stop_process_group, daemon.process)
        yield daemon, pacs, room, arrivals, gate


def test_stat_overtakes_a_routine_backlog_at_a_slow_destination_and_nothing_is_lost(
    routing: tuple[Daemon, StoreSCP, StoreSCP, Path, Path],
) -> None:
    daemon, _, _, arrivals, gate = routing
    routine = _land(daemon.data_dir, ROUTINE)
    # The backlog is being routed (the PACS has taken some of it) when the STAT study lands.
    _wait("routine routing under way", lambda: len(_arrivals(arrivals)) >= 1, daemon)
    stat_landed = time.time()
    stat = _land(daemon.data_dir, STAT, RequestedProcedurePriority="STAT")

    def stat_queued() -> bool:
        rows = _query(daemon, "SELECT count(*) FROM delivery_status WHERE priority = 'STAT'")
        return rows[0][0] == 2 * STAT  # to the PACS and to the reading room

    _wait("the STAT deliveries queued", stat_queued, daemon)
    ahead = len(_arrivals(arrivals))  # routine instances the PACS took before STAT was due
    gate.touch()
    _wait(
        "every instance delivered",
        lambda: len(_arrivals(arrivals)) >= ROUTINE + 2 * STAT,
        daemon,
    )

    order = _arrivals(arrivals)
    pacs = [uid for aet, uid in order if aet == "PACS"]
    assert sorted(pacs) == sorted(routine + stat)  # nothing lost, nothing twice
    assert sorted(uid for aet, uid in order if aet == "READING") == sorted(stat)
    # At the PACS, the STAT study went ahead of the routine work queued before it: at
    # most the batch in flight when it was queued went first.
    positions = [pacs.index(uid) for uid in stat]
    assert ahead < ROUTINE - 2 * BATCH  # the test's premise: a backlog still queued
    assert max(positions) < ahead + BATCH + STAT, (ahead, positions)
    # The reading room's run (dagster/priority 30) went ahead of the PACS's backlog too.
    last_routine = max(i for i, (aet, uid) in enumerate(order) if uid in set(routine))
    assert all(i < last_routine for i, (aet, _) in enumerate(order) if aet == "READING")

    rows = _query(
        daemon,
        "SELECT priority, status, count(*) FROM delivery_status GROUP BY ALL ORDER BY ALL",
    )
    assert rows == [("ROUTINE", "sent", ROUTINE), ("STAT", "sent", 2 * STAT)]

    with dg.DagsterInstance.from_config(str(daemon.dagster_home)) as instance:
        routing_runs = instance.get_run_records(
            filters=dg.RunsFilter(tags={"vannah/kind": "routing"})
        )
        ingest_runs = instance.get_run_records(filters=dg.RunsFilter(job_name="ingest_batch_job"))
        stat_runs = [r for r in routing_runs if r.dagster_run.tags.get("vannah/priority") == "STAT"]
        assert stat_runs and {r.dagster_run.tags["dagster/priority"] for r in stat_runs} == {"30"}
        # The STAT study was ingested while a routing run was sending the backlog.
        stat_ingest = [r for r in ingest_runs if r.start_time and r.start_time >= stat_landed]
        assert stat_ingest
        assert all(r.dagster_run.status == dg.DagsterRunStatus.SUCCESS for r in stat_ingest)
        assert any(
            route.start_time is not None
            and route.start_time < ingest.start_time
            and (route.end_time is None or route.end_time > ingest.end_time)
            for ingest in stat_ingest
            if ingest.start_time is not None and ingest.end_time is not None
            for route in routing_runs
        )
