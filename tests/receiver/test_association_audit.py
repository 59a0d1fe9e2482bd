"""One audit event per association, from the counters the DIMSE paths keep (no network)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from receiver.handlers import AssociationLog
from vannah_pipelines.security.audit import AuditLog
from vannah_pipelines.security.principal import Principal, Role


def _rows(audit_dir: Path) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for path in sorted(audit_dir.rglob("*.jsonl"))
        for line in path.read_text().splitlines()
    ]


@pytest.mark.parametrize(
    ("operations", "stored", "failed", "outcome", "action", "result"),
    [
        (["echo"], 0, 0, "released", "echo", "success"),
        (["query", "query"], 0, 0, "released", "query", "success"),
        (["worklist-query"], 0, 0, "released", "worklist-query", "success"),
        (["retrieve"], 0, 0, "released", "retrieve", "success"),
        (["echo", "move"], 0, 0, "aborted", "move", "failure"),
        (["echo"], 3, 0, "released", "store", "success"),
        ([], 2, 1, "released", "store", "partial"),
        ([], 0, 2, "released", "store", "failure"),
        ([], 2, 0, "aborted", "store", "partial"),
        ([], 0, 0, "released", "association", "success"),
    ],
)
def test_association_log_audits_one_event_per_association(
    tmp_path: Path,
    operations: list[str],
    stored: int,
    failed: int,
    outcome: str,
    action: str,
    result: str,
) -> None:
    log = AssociationLog(AuditLog(tmp_path, "receiver"))
    log.opened(1, "CTSCAN", "VANNAHCLOUD", "10.0.0.5:4000", "VANNAHCLOUD")
    for operation in operations:
        log.note(1, operation)
    for i in range(stored):
        log.record(1, stored=True, size=100, study_uid=f"1.2.{i % 2}")
    for _ in range(failed):
        log.record(1, stored=False)
    log.ended(1, outcome)
    (row,) = _rows(tmp_path)
    assert (row["action"], row["outcome"], row["status"]) == (action, result, outcome)
    assert (row["subject"], row["calling_ae"], row["address"]) == (
        "CTSCAN",
        "CTSCAN",
        "10.0.0.5:4000",
    )
    if action == "store":
        assert row["instances"] == stored and row["bytes"] == 100 * stored
        assert row["study_uids"] == sorted({f"1.2.{i % 2}" for i in range(stored)})


def test_association_log_names_a_verified_user(tmp_path: Path) -> None:
    log = AssociationLog(AuditLog(tmp_path, "receiver"))
    alice = Principal("alice", frozenset({Role.WRITE}), "dimse-user")
    log.opened(1, "STORESCU", "VANNAHCLOUD", "10.0.0.5:4000", "VANNAHCLOUD", principal=alice)
    log.ended(1, "released")
    peer = Principal("CTSCAN", frozenset({Role.READ, Role.WRITE}), "dimse-peer")
    log.opened(2, "CTSCAN", "VANNAHCLOUD", "10.0.0.5:4001", "VANNAHCLOUD", principal=peer)
    log.ended(2, "released")
    first, second = _rows(tmp_path)
    assert (first["subject"], first["auth_method"], first["roles"]) == (
        "alice",
        "dimse-user",
        ["write"],
    )
    assert (second["subject"], second["auth_method"]) == ("CTSCAN", "dimse-peer")


def test_association_log_without_audit_writes_nothing(tmp_path: Path) -> None:
    log = AssociationLog()
    log.opened(1, "CTSCAN", "VANNAHCLOUD", "10.0.0.5:4000", "VANNAHCLOUD")
    log.record(1, stored=True, size=10, study_uid="1.2")
    log.ended(1, "released")
    assert not list(tmp_path.rglob("*.jsonl"))
