"""The audit trail: events appended by several processes' logs, read back through the
catalog's audit_events view with DuckDB, as a security officer would."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pytest

from vannah_pipelines.catalog.compaction import ensure_catalog
from vannah_pipelines.security.audit import AuditEvent, AuditLog
from vannah_pipelines.security.principal import Principal, Role


def _catalog(root: Path) -> duckdb.DuckDBPyConnection:
    return duckdb.connect(str(ensure_catalog(root)), read_only=True)


def test_events_of_several_services_are_one_queryable_table(tmp_path: Path) -> None:
    root = tmp_path / "catalog"
    con = _catalog(root)
    assert con.sql("SELECT count(*) FROM audit_events").fetchone() == (0,)
    web, dimse = AuditLog(root / "audit", "dicomweb"), AuditLog(root / "audit", "receiver")
    reader = Principal("rita", frozenset({Role.READ}), "jwt")
    web.record(
        AuditEvent("dicomweb", "retrieve", "success", study_uids=["1.2.3"], status="200").by(reader)
    )
    web.record(AuditEvent("dicomweb", "access-denied", "refused", study_uids=["1.2.4"]).by(reader))
    dimse.record(
        AuditEvent(
            "receiver",
            "store",
            "success",
            subject="CT01",
            calling_ae="CT01",
            called_ae="VANNAHCLOUD",
            address="10.0.0.5",
            study_uids=["1.2.3"],
            instances=120,
            bytes=63_000_000,
        )
    )
    rows = con.sql(
        "SELECT service, action, outcome, subject, roles, study_uids, instances "
        "FROM audit_events ORDER BY occurred_at"
    ).fetchall()
    assert rows == [
        ("dicomweb", "retrieve", "success", "rita", ["read"], ["1.2.3"], None),
        ("dicomweb", "access-denied", "refused", "rita", ["read"], ["1.2.4"], None),
        ("receiver", "store", "success", "CT01", [], ["1.2.3"], 120),
    ]
    who_saw = con.sql(
        "SELECT DISTINCT subject FROM audit_events WHERE list_contains(study_uids, '1.2.3') "
        "AND outcome = 'success' ORDER BY 1"
    ).fetchall()
    assert who_saw == [("CT01",), ("rita",)]
    files = sorted(p.name.split("-")[0] for p in (root / "audit").glob("day=2*/*.jsonl"))
    assert files == ["dicomweb", "receiver"]  # one file per process, never shared


def test_a_cut_last_line_is_skipped_not_fatal(tmp_path: Path) -> None:
    root = tmp_path / "catalog"
    con = _catalog(root)
    log = AuditLog(root / "audit", "dicomweb")
    log.record(AuditEvent("dicomweb", "query", "success"))
    [path] = (root / "audit").glob("day=2*/*.jsonl")
    with path.open("ab") as f:
        f.write(b'{"occurred_at": "2026-12-01T10:00:00+00:00", "serv')  # killed mid-write
    assert con.sql("SELECT action FROM audit_events").fetchall() == [("query",)]


def test_events_go_to_the_day_they_happened(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit", "cli")
    log.record(
        AuditEvent("cli", "token-minted", "success", occurred_at=datetime(2026, 1, 2, tzinfo=UTC))
    )
    log.record(
        AuditEvent("cli", "token-minted", "success", occurred_at=datetime(2026, 1, 3, tzinfo=UTC))
    )
    days = sorted(p.parent.name for p in (tmp_path / "audit").glob("*/*.jsonl"))
    assert days == ["day=2026-01-02", "day=2026-01-03"]


def test_a_failed_write_is_counted_and_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocked = tmp_path / "audit"
    blocked.write_text("a file where the folder should be")
    log = AuditLog(blocked, "dicomweb")
    log.record(AuditEvent("dicomweb", "query", "success"))
    assert log.failures == 1
    assert "audit event not written (query success)" in caplog.text


def test_unknown_actions_and_outcomes_are_programming_errors() -> None:
    with pytest.raises(ValueError, match="unknown audit action"):
        AuditEvent("dicomweb", "peek", "success")
    with pytest.raises(ValueError, match="unknown audit outcome"):
        AuditEvent("dicomweb", "query", "fine")


def test_log_files_are_not_world_readable(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit", "dicomweb")
    log.record(AuditEvent("dicomweb", "query", "success"))
    [path] = (tmp_path / "audit").glob("*/*.jsonl")
    assert path.stat().st_mode & 0o007 == 0
