"""The Storage Commitment records and data sets (vannah_pipelines.routing.commitments): pure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from vannah_pipelines.routing.commitments import (
    PENDING,
    REPORTED,
    CommitmentError,
    CommitmentReport,
    CommitmentRequest,
    CommitmentSpool,
    FailedInstance,
    UnknownTransactionError,
    apply_report,
    parse_report,
    parse_request,
    report_dataset,
    request_dataset,
)

CT = "1.2.840.10008.5.1.4.1.1.2"


def _spool_with_pending(tmp_path: Path) -> tuple[CommitmentSpool, CommitmentRequest]:
    spool = CommitmentSpool(tmp_path / "commitments")
    request = CommitmentRequest("1.2.3.4", ((CT, "1.2.3.5"), (CT, "1.2.3.6")))
    spool.record_pending(
        request, peer_aet="PACS", peer_host="10.0.0.1", peer_port=104, calling_aet="ROUTER"
    )
    return spool, request


def test_record_pending_writes_one_json_file_per_transaction(tmp_path: Path) -> None:
    spool, _request = _spool_with_pending(tmp_path)
    files = sorted(p.name for p in spool.folder.iterdir())
    assert files == ["1.2.3.4.json"]  # no temp file left behind
    record = json.loads((spool.folder / "1.2.3.4.json").read_text())
    assert record["state"] == PENDING
    assert record["peer"] == {"aet": "PACS", "host": "10.0.0.1", "port": 104}
    assert record["references"] == [[CT, "1.2.3.5"], [CT, "1.2.3.6"]]
    assert [r["transaction_uid"] for r in spool.pending()] == ["1.2.3.4"]


def test_apply_report_records_committed_and_failed(tmp_path: Path) -> None:
    spool, request = _spool_with_pending(tmp_path)
    report = CommitmentReport(
        request.transaction_uid, ((CT, "1.2.3.5"),), (FailedInstance(CT, "1.2.3.6", 0x0112),)
    )
    record = apply_report(spool, report, reported_by="PACS", same_association=False)
    assert record == spool.read("1.2.3.4")
    assert record["state"] == REPORTED
    assert record["reported_on"] == "new-association"
    assert record["committed"] == [[CT, "1.2.3.5"]]
    assert record["failed"] == [
        {"sop_class_uid": CT, "sop_instance_uid": "1.2.3.6", "failure_reason": 0x0112}
    ]
    assert spool.pending() == []


def test_apply_report_refuses_unknown_transaction_and_other_peer(tmp_path: Path) -> None:
    spool, request = _spool_with_pending(tmp_path)
    with pytest.raises(UnknownTransactionError):
        apply_report(spool, CommitmentReport("9.9.9"), reported_by="PACS", same_association=False)
    with pytest.raises(UnknownTransactionError):
        apply_report(
            spool,
            CommitmentReport(request.transaction_uid),
            reported_by="OTHER",
            same_association=False,
        )
    assert spool.read(request.transaction_uid)["state"] == PENDING  # type: ignore[index]


def test_spool_skips_unreadable_records(tmp_path: Path) -> None:
    spool, _request = _spool_with_pending(tmp_path)
    (spool.folder / "1.2.9.json").write_text("{not json")
    (spool.folder / "1.2.8.json").write_text(json.dumps({"transaction_uid": "../x"}))
    assert [r["transaction_uid"] for r in spool.items()] == ["1.2.3.4"]


def test_request_round_trips_and_parse_request_bounds_references() -> None:
    request = CommitmentRequest("1.2.3", ((CT, "1.2.4"), (CT, "1.2.5")))
    ds = request_dataset(request)
    assert parse_request(ds, max_references=2) == request
    with pytest.raises(CommitmentError, match="more than 1"):
        parse_request(ds, max_references=1)
    with pytest.raises(CommitmentError, match="TransactionUID"):
        parse_request(Dataset(), max_references=10)
    with pytest.warns(UserWarning, match="VR UI"):
        ds.ReferencedSOPSequence[0].ReferencedSOPInstanceUID = "../etc"
    with pytest.raises(CommitmentError, match="ReferencedSOPInstanceUID"):
        parse_request(ds, max_references=10)


def test_report_round_trips_with_event_type() -> None:
    report = CommitmentReport("1.2.3", ((CT, "1.2.4"),), (FailedInstance(CT, "1.2.5", 0x0122),))
    assert int(report.event_type) == 2
    ds = report_dataset(report, "VANNAHCLOUD")
    assert ds.RetrieveAETitle == "VANNAHCLOUD"
    assert parse_report(2, ds) == report
    all_ok = CommitmentReport("1.2.3", ((CT, "1.2.4"),))
    assert int(all_ok.event_type) == 1
    assert "FailedSOPSequence" not in report_dataset(all_ok)
    with pytest.raises(CommitmentError, match="event type 3"):
        parse_report(3, ds)
