"""Ingest under faults, end to end: a poisoned instance in one association with good ones
(receiver -> landing -> sensor -> ingest run -> catalog), and a run whose worker process is
killed under the Dagster daemon (marked failed, requested again, then ingested)."""

import os
import re
import signal
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from tests.catalog.conftest import poisoned_instance
from tests.integration.conftest import Daemon, start_daemon, stop_daemon
from tests.receiver.receiver_raw_scu import RawAssociation, associate_rq, pdata, store_command
from tests.receiver.receiver_support import ReceiverProcess, free_port, wait_sealed
from vannah_pipelines.catalog.reader import CatalogReader
from vannah_pipelines.defs.landing.sensors import landed_batch_sensor
from vannah_pipelines.defs.resources import ArchiveResource
from vannah_pipelines.dicom.synthetic import MODALITIES, make_instance, to_part10
from vannah_pipelines.landing.layout import LandingZone, ReceiveFacts

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CT = MODALITIES["CT"].sop_class_uid
SUCCESS = 0x0000
DEADLINE = 120.0  # "never happened", not a speed threshold


def _data_set(part10: bytes) -> bytes:
    """The data set of a Part-10 file: after the preamble, DICM and the file meta group."""
    assert part10[128:132] == b"DICM"
    (group_length,) = struct.unpack_from("<L", part10, 140)  # (0002,0000) UL, explicit VR
    return part10[144 + group_length :]


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[ReceiverProcess]:
    rx = ReceiverProcess(data_dir=tmp_path / "data", port=free_port(), workers=1).start()
    try:
        yield rx
    finally:
        if rx.proc is not None and rx.proc.poll() is None:
            rx.stop()


def test_poisoned_instance_in_an_association_does_not_stop_its_good_mates(
    receiver: ReceiverProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Good instances and one with a 3-byte US element, in one association. Whatever the
    receiver answers for the bad one (0x0000 today; a refusal such as 0xA900 once the
    receiver checks it), every good one is in the catalog after ingest, and the run
    succeeded."""
    good = [make_instance("CT", rows=16, columns=16, instance_number=i) for i in range(4)]
    poison_uid, poison = poisoned_instance()
    sends = [(g.SOPInstanceUID, _data_set(to_part10(g))) for g in good[:2]]
    sends += [(poison_uid, _data_set(poison))]
    sends += [(g.SOPInstanceUID, _data_set(to_part10(g))) for g in good[2:]]
    raw = RawAssociation("127.0.0.1", receiver.port)
    try:
        pdu_type, _ = raw.associate(associate_rq([(1, CT, [ExplicitVRLittleEndian])]))
        assert pdu_type == 0x02  # A-ASSOCIATE-AC
        statuses = {}
        for message_id, (uid, data) in enumerate(sends, start=1):
            raw.send(pdata([(1, 0x03, store_command(CT, uid, message_id))]))
            raw.send(pdata([(1, 0x02, data)]))
            statuses[uid] = raw.command_status()
        assert raw.release() == 0x06  # A-RELEASE-RP
    finally:
        raw.close()
    good_uids = {g.SOPInstanceUID for g in good}
    assert all(statuses[u] == SUCCESS for u in good_uids), statuses
    poison_acked = statuses[poison_uid] == SUCCESS
    wait_sealed(receiver.data_dir, good_uids | ({poison_uid} if poison_acked else set()))

    monkeypatch.setenv("VANNAH_DATA_DIR", str(receiver.data_dir))
    monkeypatch.delenv("VANNAH_CONFIG", raising=False)
    from vannah_pipelines.definitions import defs

    job = defs().resolve_job_def("ingest_batch_job")
    with dg.instance_for_test() as instance:
        context = dg.build_sensor_context(
            instance=instance, resources={"archive": ArchiveResource()}
        )
        result = landed_batch_sensor(context)
        assert result.run_requests
        for request in result.run_requests:
            run = job.execute_in_process(
                run_config=request.run_config,
                instance=instance,
                partition_key=request.partition_key,
                tags=request.tags,
            )
            assert run.success
    reader = CatalogReader(receiver.data_dir / "catalog")
    indexed = {r[0] for r in reader.query("SELECT sop_instance_uid FROM instances")}
    assert indexed == good_uids
    quarantined = reader.query("SELECT sop_instance_uid, reason FROM quarantine")
    if poison_acked:  # acknowledged: never dropped, quarantined with its reason
        assert [u for u, _ in quarantined] == [poison_uid]
        assert quarantined[0][1].startswith("BytesLengthException")
    assert not LandingZone(receiver.data_dir / "landing").sealed_batches()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = start_daemon(tmp_path / "data", extra_env={"VANNAH_INGEST_RETRY_BASE_SECONDS": "1"})
    try:
        yield d
    finally:
        stop_daemon(d)


def _wait(predicate: object, what: str, daemon: Daemon) -> None:
    deadline = time.monotonic() + DEADLINE
    while not predicate():  # type: ignore[operator]
        assert daemon.process.poll() is None, "dagster-daemon died"
        if time.monotonic() > deadline:
            log = (daemon.data_dir / "daemon.log").read_text(errors="replace")[-4000:]
            pytest.fail(f"{what} did not happen; daemon log:\n{log}")
        time.sleep(0.2)


def test_killed_ingest_run_is_marked_failed_and_its_batch_ingested_by_a_retry(
    daemon: Daemon,
) -> None:
    """The run hangs on a FIFO among the batch's files (reading it blocks forever), its
    worker is SIGKILLed; the run is marked failed, the sensor requests the batch again
    after the backoff, and the retry ingests it."""
    zone = LandingZone(daemon.data_dir / "landing")
    batch = zone.open_batch("dimse")
    good = make_instance("CT", rows=8, columns=8)
    batch.write_instance(
        to_part10(good),
        ReceiveFacts(good.SOPInstanceUID, CT, "1.2.840.10008.1.2.1", "dimse"),
    )
    stuck = make_instance("CT", rows=8, columns=8)
    fifo = batch.path / f"{stuck.SOPInstanceUID}.dcm"
    os.mkfifo(fifo)
    sealed = batch.seal()
    assert sealed is not None
    fifo = sealed.path / fifo.name

    with dg.DagsterInstance.from_config(str(daemon.dagster_home)) as instance:
        assert instance.run_monitoring_enabled  # dagster.yaml as `vannah up` installs it
        pids: list[int] = []

        def worker_started() -> bool:
            for run in instance.get_runs():
                for record in instance.all_logs(
                    run.run_id, of_type=dg.DagsterEventType.ENGINE_EVENT
                ):
                    match = re.search(r"Started process for run \(pid: ([0-9]+)\)", record.message)
                    if match:
                        pids.append(int(match.group(1)))
                        return True
            return False

        _wait(worker_started, "the ingest run's worker start", daemon)
        [first] = instance.get_runs()
        assert first.tags["vannah/run_key"] == f"ingest-{sealed.batch_id}"
        # Swap the FIFO for the real file first: the worker stays blocked on the FIFO it
        # opened, and the retry finds the real file (no race with the sensor).
        tmp = sealed.path / ".tmp-swap.dcm"
        tmp.write_bytes(to_part10(stuck))
        tmp.replace(fifo)
        [pid] = pids
        assert os.getsid(pid) == daemon.process.pid  # a process of our daemon, by its id
        os.kill(pid, signal.SIGKILL)

        def first_failed() -> bool:
            run = instance.get_run_by_id(first.run_id)
            return run is not None and run.status == dg.DagsterRunStatus.FAILURE

        _wait(first_failed, "the killed run marked failed", daemon)
        reader = daemon.wait_for_instances(2, timeout=DEADLINE)
        assert {r[0] for r in reader.query("SELECT sop_instance_uid FROM instances")} == {
            good.SOPInstanceUID,
            stuck.SOPInstanceUID,
        }

        def retry_succeeded() -> bool:
            runs = instance.get_runs(
                filters=dg.RunsFilter(tags={"vannah/run_key": f"ingest-{sealed.batch_id}-r1"})
            )
            return bool(runs) and runs[0].status == dg.DagsterRunStatus.SUCCESS

        _wait(retry_succeeded, "the retry run's success", daemon)
        # The run-monitoring daemon (dagster.yaml) is running beside the sensors.
        assert "MONITORING" in instance.get_daemon_heartbeats()
        checks = instance.event_log_storage.get_latest_asset_check_execution_by_key(
            [dg.AssetCheckKey(dg.AssetKey("instance_index"), "landing_backlog_fresh")]
        )
        assert checks  # evaluated by the sensor and by the runs
        [retry] = instance.get_runs(
            filters=dg.RunsFilter(tags={"vannah/run_key": f"ingest-{sealed.batch_id}-r1"})
        )
        assert retry.tags["vannah/attempt"] == "2"
