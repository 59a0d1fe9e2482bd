"""Delivered means confirmed: a DICOM destination with ``storageCommitment`` is asked to
commit what it stored. Our own receiver (``python -m receiver``) as the destination commits
on the same association; a report that names failures, or comes later through the
commitment spool, turns the deliveries committed or sends the rest again; the
reconciliation compares, per study, what was confirmed with what the catalog holds."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from tests.receiver.receiver_support import ReceiverProcess
from tests.routing.test_deliveries import (
    FOLDER,
    T0,
    _record,
    _Recording,
    _senders,
    _status,
)
from tests.routing.test_dry_run import _ingest
from vannah_pipelines.catalog.reader import CatalogReader
from vannah_pipelines.defs.routing.deliveries import commitment_confirm
from vannah_pipelines.routing.commitments import (
    REPORT_WAIT_SECONDS,
    CommitmentRequest,
    CommitmentSpool,
)
from vannah_pipelines.routing.deliveries import (
    RetryPolicy,
    apply_commitment_reports,
    apply_spooled_reports,
    queue_deliveries,
    reconcile,
    send_due,
    tier_opener,
)
from vannah_pipelines.routing.rules import parse_rules
from vannah_pipelines.settings import Settings
from vannah_pipelines.storage.lifecycle import open_catalog
from vannah_pipelines.storage.tiers import StorageTiers


@pytest.fixture
def destination(tmp_path: Path) -> Iterator[ReceiverProcess]:
    """A second archive of ours: it stores and commits."""
    rx = ReceiverProcess(data_dir=tmp_path / "destination", workers=1).start()
    yield rx
    if rx.proc is not None and rx.proc.poll() is None:
        rx.stop()


@pytest.mark.integration
def test_our_receiver_as_destination_commits_what_it_stored(
    tmp_path: Path, destination: ReceiverProcess
) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    study = _ingest(settings, "CT", 3, "2026-03-02T10:00:00+00:00", BodyPartExamined="CHEST")
    rules = parse_rules(
        [
            {
                "name": "Chest CT to the second archive",
                "condition": {"modality": "CT"},
                "destination": {
                    "aet": "VANNAHCLOUD",
                    "host": "127.0.0.1",
                    "port": destination.port,
                    "storageCommitment": True,
                },
            }
        ]
    )
    catalog = open_catalog(settings)
    try:
        queue_deliveries(catalog, rules, _record(settings), since=None, now=T0)
        catalog.refresh()
        result = send_due(
            catalog,
            rules,
            _record(settings),
            tier_opener(StorageTiers(settings)),
            _senders(settings),
            now=lambda: T0,
            confirm=commitment_confirm(settings),
        )
        [stats] = result.destinations.values()
        assert (stats.sent, stats.committed, stats.not_committed) == (3, 3, 0)
        assert set(_status(catalog).values()) == {("committed", 1)}
        [row] = reconcile(catalog)
        assert (row.study_instance_uid, row.routed, row.delivered, row.committed) == (
            study.uid,
            3,
            3,
            3,
        )
        assert row.unconfirmed(needs_commitment=True) == 0
    finally:
        catalog.close()


def _sent(settings: Settings, catalog: CatalogReader) -> list[str]:
    """Three CTs sent (by a recording sender) to a DICOM destination that commits."""
    _ingest(settings, "CT", 3, "2026-03-02T10:00:00+00:00")
    rules = parse_rules(
        [
            {
                "name": "CT",
                "condition": {"modality": "CT"},
                "destination": {
                    "aet": "PEER",
                    "host": "127.0.0.1",
                    "port": 11112,
                    "storageCommitment": True,
                },
            }
        ]
    )
    catalog.refresh()
    queue_deliveries(catalog, rules, _record(settings), since=None, now=T0)
    catalog.refresh()
    order: list[str] = []
    send_due(
        catalog,
        rules,
        _record(settings),
        tier_opener(StorageTiers(settings)),
        lambda rule: _Recording(order),
        now=lambda: T0,
    )  # no confirm: the report comes later
    catalog.refresh()
    return sorted(uid for uid, _ in _status(catalog))


def test_a_later_report_commits_some_and_sends_the_rest_again(
    settings: Settings, catalog: CatalogReader
) -> None:
    uids = _sent(settings, catalog)
    assert set(_status(catalog).values()) == {("sent", 1)}
    retry = RetryPolicy(max_attempts=5, first_seconds=30, max_seconds=600)
    report = {
        "transaction_uid": "1.2.826.0.1.3680043.10.54.999",
        "state": "reported",
        "peer": {"aet": "PEER", "host": "127.0.0.1", "port": 11112},
        "committed": [
            ["1.2.840.10008.5.1.4.1.1.2", uids[0]],
            ["1.2.840.10008.5.1.4.1.1.2", uids[1]],
        ],
        "failed": [
            {
                "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
                "sop_instance_uid": uids[2],
                "failure_reason": 0x0112,
            }
        ],
    }
    pending = {**report, "transaction_uid": "1.2.3.4", "state": "pending"}
    applied = apply_commitment_reports(
        catalog, [report, pending], _record(settings), now=T0, retry=retry
    )
    assert applied == [report["transaction_uid"]]
    status = _status(catalog)
    assert [status[(u, "CT")] for u in uids] == [("committed", 1), ("committed", 1), ("failed", 1)]
    [error] = catalog.query(
        "SELECT last_error FROM delivery_status WHERE sop_instance_uid = ?", [uids[2]]
    )
    assert error == ("not committed: failure reason 0x0112",)
    [row] = reconcile(catalog)
    assert (row.routed, row.delivered, row.committed, row.pending) == (3, 2, 2, 1)

    # The uncommitted one is sent again once its backoff has passed.
    order: list[str] = []
    rules = parse_rules(
        [
            {
                "name": "CT",
                "condition": {"modality": "CT"},
                "destination": {
                    "aet": "PEER",
                    "host": "127.0.0.1",
                    "port": 11112,
                    "storageCommitment": True,
                },
            }
        ]
    )
    again = send_due(
        catalog,
        rules,
        _record(settings),
        tier_opener(StorageTiers(settings)),
        lambda rule: _Recording(order),
        now=lambda: T0 + timedelta(seconds=31),
    )
    assert again.sent == 1 and len(order) == 1
    assert _status(catalog)[(uids[2], "CT")] == ("sent", 2)


@pytest.mark.integration
def test_a_report_that_never_comes_sends_the_instances_again_after_the_wait(
    settings: Settings, catalog: CatalogReader, tmp_path: Path
) -> None:
    uids = _sent(settings, catalog)
    spool = CommitmentSpool(tmp_path / "spool")
    peer = {"peer_aet": "PEER", "peer_host": "127.0.0.1", "peer_port": 11112}
    refs = tuple(("1.2.840.10008.5.1.4.1.1.2", uid) for uid in uids)
    old = spool.record_pending(
        CommitmentRequest("1.2.826.0.1.3680043.10.54.1", refs), calling_aet="VHC", **peer
    )
    recent = spool.record_pending(
        CommitmentRequest("1.2.826.0.1.3680043.10.54.2", refs[:1]), calling_aet="VHC", **peer
    )
    sent_at = time.time() - REPORT_WAIT_SECONDS - 60  # a day and a minute ago
    os.utime(spool.path(old["transaction_uid"]), (sent_at, sent_at))
    retry = RetryPolicy(max_attempts=5, first_seconds=30, max_seconds=600)

    applied = apply_spooled_reports(catalog, spool, _record(settings), now=T0, retry=retry)

    assert applied == [old["transaction_uid"]]
    assert not spool.path(old["transaction_uid"]).exists()
    assert spool.read(recent["transaction_uid"]) == recent  # still waiting for its report
    catalog.refresh()
    assert {_status(catalog)[(u, "CT")] for u in uids} == {("failed", 1)}  # sent again later
    errors = catalog.query("SELECT DISTINCT last_error FROM delivery_status")
    assert errors == [("not committed: no N-EVENT-REPORT from PEER within 24 h",)]


def test_folder_rules_need_no_commitment(settings: Settings, catalog: CatalogReader) -> None:
    _ingest(settings, "MR", 1, "2026-03-02T10:00:00+00:00")
    rules = parse_rules([{"name": "MR", "condition": {"modality": "MR"}, "destination": FOLDER}])
    catalog.refresh()
    queue_deliveries(catalog, rules, _record(settings), since=None, now=T0)
    catalog.refresh()
    calls: list[object] = []
    send_due(
        catalog,
        rules,
        _record(settings),
        tier_opener(StorageTiers(settings)),
        lambda rule: _Recording([]),
        now=lambda: T0,
        confirm=lambda rule, refs: calls.append(refs),  # type: ignore[arg-type,func-returns-value]
    )
    assert calls == [] and set(_status(catalog).values()) == {("sent", 1)}
    [row] = reconcile(catalog)
    assert row.unconfirmed(needs_commitment=False) == 0
