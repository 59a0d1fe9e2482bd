"""The delivery log over a real catalog: deliveries queued from indexed instances, sent to
real peers (DCMTK storescp as the AI engine, a SeaweedFS bucket, a folder), every outcome
appended to the catalog's ``deliveries`` state-change table; retries with backoff, dead
letters and their retry, STAT first, study-mode rules once the study is stable. Clocks are
passed in: nothing waits for time to pass."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest

from tests.routing.test_dry_run import _ingest
from tests.servers import S3Server, free_port, storescp_server
from vannah_pipelines.catalog.changes import DELIVERIES
from vannah_pipelines.catalog.lake import record_change
from vannah_pipelines.catalog.reader import CatalogReader
from vannah_pipelines.cli import main
from vannah_pipelines.dimse.route_sender import DicomSender
from vannah_pipelines.dimse.store_scu import data_set_offset
from vannah_pipelines.routing import deliveries
from vannah_pipelines.routing.deliveries import (
    DeliveryResult,
    Record,
    RetryPolicy,
    backlog,
    deliver_while_busy,
    due_deliveries,
    queue_deliveries,
    send_due,
    tier_opener,
)
from vannah_pipelines.routing.rules import RoutingRules, Rule, parse_rules
from vannah_pipelines.routing.senders import Delivered, Outgoing, Sender, build_sender
from vannah_pipelines.settings import Settings
from vannah_pipelines.storage.lifecycle import open_catalog
from vannah_pipelines.storage.tiers import StorageTiers

T0 = datetime(2026, 3, 6, 12, 0, tzinfo=UTC)  # after every study below was received
FOLDER = {"type": "folder", "path": "/srv"}  # never written: a recording sender stands in


def _record(settings: Settings) -> Record:
    def record(rows: list[dict[str, Any]]) -> None:
        record_change(settings, DELIVERIES, rows, changed_by="test")

    return record


def _senders(settings: Settings) -> Callable[[Rule], Sender]:
    secrets = {k: v.get_secret_value() for k, v in settings.routing_secrets.items()}
    return lambda rule: build_sender(
        rule.destination,
        secrets=secrets,
        calling_aet="VANNAHCLOUD",
        coercion=rule.coerce,
        dicom=DicomSender,
    )


def _status(catalog: CatalogReader) -> dict[tuple[str, str], tuple[str, int]]:
    """(SOP Instance UID, rule) -> (status, attempts), as the delivery log stands."""
    catalog.refresh()
    return {
        (r[0], r[1]): (r[2], r[3])
        for r in catalog.query(
            "SELECT sop_instance_uid, rule, status, attempts FROM delivery_status"
        )
    }


def _stored(catalog: CatalogReader, settings: Settings, study: str) -> dict[str, bytes]:
    """The archive's bytes of each instance of `study`, by SOP Instance UID."""
    hot = StorageTiers(settings).hot
    out = {}
    for sop, key in catalog.query(
        "SELECT sop_instance_uid, storage_key FROM instances WHERE study_instance_uid = ?",
        [study],
    ):
        with hot.open(key) as stream:
            out[sop] = stream.read()
    return out


def _data_set(part10: bytes) -> bytes:
    return part10[data_set_offset(BytesIO(part10)) :]


def _archive(settings: Settings) -> dict[str, str]:
    chest = _ingest(settings, "CT", 3, "2026-03-02T10:00:00+00:00", BodyPartExamined="CHEST")
    head = _ingest(settings, "CT", 2, "2026-03-02T20:00:00+00:00", BodyPartExamined="HEAD")
    mr = _ingest(settings, "MR", 2, "2026-03-05T09:00:00+00:00", BodyPartExamined="BRAIN")
    return {"chest": chest.uid, "head": head.uid, "mr": mr.uid}


@pytest.mark.integration
def test_documented_rules_send_the_chest_ct_to_the_ae_and_every_study_to_the_bucket(
    tmp_path: Path, seaweedfs: S3Server
) -> None:
    settings = Settings(
        data_dir=tmp_path / "data",
        routing_secrets={"weed": f"{seaweedfs.access_key}:{seaweedfs.secret_key}"},
    )
    studies = _archive(settings)
    bucket = f"route-{uuid.uuid4().hex[:12]}"
    seaweedfs.client().create_bucket(Bucket=bucket)  # type: ignore[attr-defined]
    with storescp_server(tmp_path / "ai", "AI_ENGINE") as scp:
        # The product documentation's two rules, pointed at the peers running here.
        rules = parse_rules(
            {
                "rules": [
                    {
                        "name": "Route CT to AI Pipeline",
                        "condition": {"modality": "CT", "bodyPart": "CHEST"},
                        "destination": {"aet": "AI_ENGINE", "host": "127.0.0.1", "port": scp.port},
                    },
                    {
                        "name": "Archive All Studies",
                        "condition": {"modality": "*"},
                        "destination": {
                            "type": "s3",
                            "bucket": bucket,
                            "region": seaweedfs.region,
                            "endpoint": seaweedfs.url,
                            "credentials": "weed",
                        },
                    },
                ]
            }
        )
        catalog = open_catalog(settings)
        try:
            queued = queue_deliveries(catalog, rules, _record(settings), since=None, now=T0)
            assert (queued.instances, queued.queued, queued.waiting) == (7, 3 + 7, 0)
            catalog.refresh()
            again = queue_deliveries(catalog, rules, _record(settings), since=None, now=T0)
            # A window scanned twice: the routed versions are not even evaluated again.
            assert (again.instances, again.queued) == (0, 0)
            assert _status(catalog) and len(_status(catalog)) == 10
            result = send_due(
                catalog,
                rules,
                _record(settings),
                tier_opener(StorageTiers(settings)),
                _senders(settings),
                now=lambda: T0,
            )
            assert result.sent == 10 and result.failed == 0, result
            status = _status(catalog)
            assert set(status.values()) == {("sent", 1)} and len(status) == 10
            chest = _stored(catalog, settings, studies["chest"])
            every = {
                sop: data
                for uid in studies.values()
                for sop, data in _stored(catalog, settings, uid).items()
            }
            # Nothing is due any more.
            assert due_deliveries(catalog, rules, now=T0 + timedelta(days=1)) == []
        finally:
            catalog.close()
        received = scp.received()
    assert set(received) == set(chest)
    for sop, path in received.items():
        assert _data_set(path.read_bytes()) == _data_set(chest[sop])
    s3 = seaweedfs.client()
    for sop, data in every.items():
        ds = pydicom.dcmread(BytesIO(data), stop_before_pixels=True)
        key = f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{sop}.dcm"
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()  # type: ignore[attr-defined]
        assert body == data, key


@pytest.mark.integration
def test_a_destination_down_is_retried_with_backoff_dead_lettered_and_delivered_once_up(
    tmp_path: Path,
    settings: Settings,
    catalog: CatalogReader,
    capsys: pytest.CaptureFixture[str],
) -> None:
    studies = _archive(settings)
    port = free_port()  # nothing listens here yet
    rules = parse_rules(
        [
            {
                "name": "Chest CT to AI",
                "condition": {"modality": "CT", "bodyPart": "CHEST"},
                "destination": {"aet": "AI_ENGINE", "host": "127.0.0.1", "port": port},
            }
        ]
    )
    record, opener = _record(settings), tier_opener(StorageTiers(settings))
    retry = RetryPolicy(max_attempts=3, first_seconds=30, max_seconds=600)
    catalog.refresh()
    queue_deliveries(catalog, rules, record, since=None, now=T0)
    catalog.refresh()

    def attempt(at: datetime) -> Any:
        result = send_due(
            catalog, rules, record, opener, _senders(settings), now=lambda: at, retry=retry
        )
        catalog.refresh()
        return result

    first = attempt(T0)
    assert first.sent == 0 and first.destinations
    assert set(_status(catalog).values()) == {("failed", 1)}
    # Not due before its backoff (30 s) has passed; then due, and down again.
    assert attempt(T0 + timedelta(seconds=20)).destinations == {}
    assert set(_status(catalog).values()) == {("failed", 1)}
    attempt(T0 + timedelta(seconds=31))
    assert set(_status(catalog).values()) == {("failed", 2)}
    assert attempt(T0 + timedelta(seconds=31 + 59)).destinations == {}  # backoff doubled
    attempt(T0 + timedelta(seconds=31 + 61))
    assert set(_status(catalog).values()) == {("dead", 3)}  # max_attempts: dead letters
    assert [b.dead for b in backlog(catalog)] == [3]
    assert attempt(T0 + timedelta(days=1)).destinations == {}  # dead: never retried alone
    last_error = catalog.query("SELECT DISTINCT last_error FROM delivery_status")
    assert len(last_error) == 1 and "connect" in str(last_error[0][0]).lower()

    # `vannah route --status` shows them; `--retry` of another destination touches none.
    base = ["--data-dir", str(settings.data_dir), "route"]
    assert main([*base, "--status"]) == 0
    out = capsys.readouterr().out
    assert f"dicom AI_ENGINE@127.0.0.1:{port}: 0 delivered, 0 queued" in out and "3 dead" in out
    assert main([*base, "--retry", "--destination", "folder /elsewhere"]) == 0
    assert capsys.readouterr().out.startswith("0 deliveries queued again")

    # The destination comes up; the dead letters are queued again by hand and delivered.
    with storescp_server(tmp_path / "ai", "AI_ENGINE", port=port) as scp:
        assert main([*base, "--retry"]) == 0
        assert capsys.readouterr().out.startswith("3 deliveries queued again")
        catalog.refresh()
        assert set(_status(catalog).values()) == {("queued", 0)}
        done = attempt(datetime.now(UTC))  # the CLI queued them due now, by the wall clock
        assert done.sent == 3
        received = scp.received()
    assert set(_status(catalog).values()) == {("sent", 1)}
    assert set(received) == set(_stored(catalog, settings, studies["chest"]))


class _Recording:
    """A sender that delivers everything and remembers the order it was given."""

    def __init__(self, sent: list[str]) -> None:
        self.sent = sent

    def send(self, batch: Sequence[Outgoing]) -> list[Delivered]:
        out = []
        for item in batch:
            with item.open() as stream:
                data = stream.read()
            assert hashlib.sha256(data).hexdigest() == item.checksum
            self.sent.append(item.study_instance_uid)
            out.append(Delivered(item.sop_instance_uid, True, "stored", bytes_sent=len(data)))
        return out

    def close(self) -> None:
        pass


def test_stat_goes_before_routine_whatever_the_order_it_arrived_in(
    settings: Settings, catalog: CatalogReader
) -> None:
    routine = _ingest(settings, "CT", 3, "2026-03-02T10:00:00+00:00")
    stat = _ingest(
        settings, "CT", 2, "2026-03-02T11:00:00+00:00", RequestedProcedurePriority="STAT"
    )
    later = _ingest(settings, "CT", 1, "2026-03-02T12:00:00+00:00")
    rules = parse_rules(
        [
            {
                "name": "All",
                "condition": {"modality": "*"},
                "destination": {"type": "folder", "path": "/srv"},
            }
        ]
    )
    catalog.refresh()
    queue_deliveries(catalog, rules, _record(settings), since=None, now=T0)
    catalog.refresh()
    due = due_deliveries(catalog, rules, now=T0)
    assert [r["priority"] for r in due] == ["STAT"] * 2 + ["ROUTINE"] * 4
    order: list[str] = []
    send_due(
        catalog,
        rules,
        _record(settings),
        tier_opener(StorageTiers(settings)),
        lambda rule: _Recording(order),
        now=lambda: T0,
        batch=1,
    )
    assert order[:2] == [stat.uid] * 2
    assert set(order[2:]) == {routine.uid, later.uid} and len(order) == 6


def test_a_study_rule_waits_until_the_study_is_stable(
    settings: Settings, catalog: CatalogReader
) -> None:
    study = _ingest(settings, "MR", 2, "2026-03-02T10:00:00+00:00")
    rules = parse_rules(
        [
            {
                "name": "Whole MR studies",
                "condition": {"modality": "MR"},
                "destination": FOLDER,
                "mode": "study",
                "stableAge": 120,
            }
        ]
    )
    last = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)
    catalog.refresh()
    queued = queue_deliveries(catalog, rules, _record(settings), since=None, now=last)
    assert (queued.queued, queued.waiting) == (0, 2)
    catalog.refresh()
    assert due_deliveries(catalog, rules, now=last + timedelta(seconds=60)) == []
    due = due_deliveries(catalog, rules, now=last + timedelta(seconds=121))
    assert {r["study_instance_uid"] for r in due} == {study.uid} and len(due) == 2
    order: list[str] = []
    result = send_due(
        catalog,
        rules,
        _record(settings),
        tier_opener(StorageTiers(settings)),
        lambda rule: _Recording(order),
        now=lambda: last + timedelta(seconds=121),
    )
    assert result.sent == 2
    assert set(_status(catalog).values()) == {("sent", 1)}


def test_deliveries_of_a_removed_rule_are_cancelled_not_sent(
    settings: Settings, catalog: CatalogReader
) -> None:
    _ingest(settings, "CT", 2, "2026-03-02T10:00:00+00:00")
    rule = {
        "name": "CT",
        "condition": {"modality": "CT"},
        "destination": {"type": "folder", "path": "/srv"},
    }
    catalog.refresh()
    queue_deliveries(catalog, parse_rules([rule]), _record(settings), since=None, now=T0)
    catalog.refresh()
    order: list[str] = []
    changed = parse_rules([{**rule, "name": "CT renamed"}])
    result = send_due(
        catalog,
        changed,
        _record(settings),
        tier_opener(StorageTiers(settings)),
        lambda r: _Recording(order),
        now=lambda: T0,
    )
    assert order == [] and result.sent == 0
    assert set(_status(catalog).values()) == {("cancelled", 0)}
    detail = catalog.query("SELECT DISTINCT detail FROM delivery_status")
    assert detail == [("its rule is no longer in the rules in force",)]


def test_a_queued_delivery_survives_a_crash_and_a_raising_sender_is_a_failure(
    settings: Settings,
) -> None:
    _ingest(settings, "CT", 2, "2026-03-02T10:00:00+00:00")
    rules = parse_rules(
        [
            {
                "name": "CT",
                "condition": {"modality": "CT"},
                "destination": {"type": "folder", "path": "/srv"},
            }
        ]
    )
    first = open_catalog(settings)
    queue_deliveries(first, rules, _record(settings), since=None, now=T0)
    first.close()  # the process dies before sending anything

    class Raising:
        def send(self, batch: Sequence[Outgoing]) -> list[Delivered]:
            raise RuntimeError("sender bug")

        def close(self) -> None:
            pass

    catalog = open_catalog(settings)  # a new process: the log still holds them
    try:
        assert len(due_deliveries(catalog, rules, now=T0)) == 2
        result = send_due(
            catalog,
            rules,
            _record(settings),
            tier_opener(StorageTiers(settings)),
            lambda rule: Raising(),
            now=lambda: T0,
        )
        assert result.failed == 2
        assert set(_status(catalog).values()) == {("failed", 1)}
    finally:
        catalog.close()


def _deliver_while_busy(
    settings: Settings,
    catalog: CatalogReader,
    rules: RoutingRules,
    sender_for: Callable[[Rule], Sender],
    clock: list[float],
    **options: Any,
) -> DeliveryResult:
    """One lingering routing run over every destination, on the test's `clock`."""
    catalog.refresh()
    return deliver_while_busy(
        catalog,
        lambda: rules,
        _record(settings),
        tier_opener(StorageTiers(settings)),
        sender_for,
        destination=None,
        retry=RetryPolicy(),
        queue_window=timedelta(days=3650),
        monotonic=lambda: clock[0],
        **options,
    )


def test_a_run_lingers_and_takes_what_is_indexed_meanwhile(
    settings: Settings, catalog: CatalogReader
) -> None:
    first = _ingest(settings, "CT", 2, "2026-03-02T10:00:00+00:00")
    rules = parse_rules([{"name": "CT", "condition": {"modality": "CT"}, "destination": FOLDER}])
    clock = [0.0]
    later: list[str] = []

    def sleep(seconds: float) -> None:
        clock[0] += seconds
        if not later:  # a study indexed while the run is under way
            later.append(_ingest(settings, "CT", 3, "2026-03-02T10:05:00+00:00").uid)

    order: list[str] = []
    result = _deliver_while_busy(
        settings, catalog, rules, lambda rule: _Recording(order), clock,
        linger_seconds=3, poll_seconds=1, sleep=sleep,
    )  # fmt: skip
    assert result.sent == 5
    assert order == [first.uid] * 2 + later * 3
    assert clock[0] == 1 + 3  # the pass that found the new study, then 3 idle seconds


class _Arriving(_Recording):
    """A recording sender that calls `arrive` before each batch it sends."""

    def __init__(self, sent: list[str], arrive: Callable[[], object]) -> None:
        super().__init__(sent)
        self.arrive = arrive

    def send(self, batch: Sequence[Outgoing]) -> list[Delivered]:
        self.arrive()
        return super().send(batch)


def test_a_run_sends_a_stat_study_indexed_meanwhile_before_the_routine_backlog(
    settings: Settings, catalog: CatalogReader
) -> None:
    routine = _ingest(settings, "CT", 4, "2026-03-02T10:00:00+00:00")
    rules = parse_rules([{"name": "All", "condition": {"modality": "*"}, "destination": FOLDER}])
    stat: list[str] = []
    clock = [0.0]

    def arrive() -> None:  # indexed while the run sends the backlog's first batch
        clock[0] += 1  # a slow peer: each batch takes longer than a pass's reread_seconds
        if stat:
            return
        study = _ingest(
            settings, "CT", 2, "2026-03-02T10:05:00+00:00", RequestedProcedurePriority="STAT"
        )
        stat.append(study.uid)

    order: list[str] = []
    slept: list[float] = []

    result = _deliver_while_busy(
        settings, catalog, rules, lambda rule: _Arriving(order, arrive), clock,
        linger_seconds=0, reread_seconds=0.5, batch=1, sleep=slept.append,
    )  # fmt: skip
    assert result.sent == 6
    # The batch under way when it came, then the STAT study, then the rest of the backlog.
    assert order == [routine.uid] + stat * 2 + [routine.uid] * 3
    assert slept == []  # no pause between batches while there is work


@pytest.mark.parametrize(("seconds_per_batch", "associations"), [(0, 1), (1, 4)])
def test_a_run_reads_its_due_work_again_only_after_reread_seconds(
    settings: Settings, catalog: CatalogReader, seconds_per_batch: int, associations: int
) -> None:
    """A fast peer's backlog goes in one pass over one association; a slow peer's is read
    again (a new pass, a new association) once `reread_seconds` have passed."""
    _ingest(settings, "CT", 10, "2026-03-02T10:00:00+00:00")
    rules = parse_rules([{"name": "All", "condition": {"modality": "*"}, "destination": FOLDER}])
    clock = [0.0]
    order: list[str] = []
    senders: list[_Arriving] = []

    def tick() -> None:
        clock[0] += seconds_per_batch

    def sender_for(rule: Rule) -> _Arriving:
        senders.append(_Arriving(order, tick))
        return senders[-1]

    result = _deliver_while_busy(
        settings, catalog, rules, sender_for, clock,
        linger_seconds=0, reread_seconds=2.5, batch=1, sleep=lambda seconds: None,
    )  # fmt: skip
    assert result.sent == 10 and len(order) == 10
    assert len(senders) == associations  # 1 s a batch: 3 batches a pass (at 0, 1, 2 s)


def test_a_pass_reads_at_most_its_limit_of_a_large_backlog(
    settings: Settings, catalog: CatalogReader, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backlog larger than PASS_LIMIT is read a pass at a time (3 here), not whole."""
    monkeypatch.setattr(deliveries, "PASS_LIMIT", 3)
    _ingest(settings, "CT", 10, "2026-03-02T10:00:00+00:00")
    rules = parse_rules([{"name": "All", "condition": {"modality": "*"}, "destination": FOLDER}])
    order: list[str] = []
    senders: list[_Recording] = []

    def sender_for(rule: Rule) -> _Recording:
        senders.append(_Recording(order))
        return senders[-1]

    result = _deliver_while_busy(
        settings, catalog, rules, sender_for, [0.0],
        linger_seconds=0, batch=1, sleep=lambda seconds: None,
    )  # fmt: skip
    assert result.sent == 10 and len(order) == 10
    assert len(senders) == 4  # passes of 3, 3, 3 and 1: the clock never reached reread


@pytest.mark.parametrize("limit", [10_000, 1])  # 1: a run's pass reads one batch only
def test_a_destination_down_defers_the_rest_of_its_due_deliveries_untried(
    settings: Settings, catalog: CatalogReader, limit: int
) -> None:
    _ingest(settings, "CT", 3, "2026-03-02T10:00:00+00:00")
    port = free_port()  # nothing listens
    rules = parse_rules(
        [
            {
                "name": "CT",
                "condition": {"modality": "CT"},
                "destination": {"aet": "AI_ENGINE", "host": "127.0.0.1", "port": port},
            }
        ]
    )
    catalog.refresh()
    queue_deliveries(catalog, rules, _record(settings), since=None, now=T0)
    catalog.refresh()
    result = send_due(
        catalog,
        rules,
        _record(settings),
        tier_opener(StorageTiers(settings)),
        _senders(settings),
        now=lambda: T0,
        retry=RetryPolicy(first_seconds=30),
        limit=limit,
        batch=1,
    )
    assert result.destinations[f"dicom AI_ENGINE@127.0.0.1:{port}"].attempted == 1
    catalog.refresh()
    rows = catalog.query_dicts(
        "SELECT status, attempts, next_attempt_at, last_error FROM delivery_status ORDER BY status"
    )
    assert [(r["status"], r["attempts"]) for r in rows] == [
        ("failed", 1),
        ("queued", 0),
        ("queued", 0),
    ]
    assert {r["next_attempt_at"] for r in rows} == {T0 + timedelta(seconds=30)}
    assert all(r["last_error"].startswith("not tried: ") for r in rows[1:])
    # Nothing is due before the retry: the peer is not asked again meanwhile.
    assert due_deliveries(catalog, rules, now=T0 + timedelta(seconds=29)) == []
