"""The audit trail: one row per request or association, appended by every service.

Each process appends JSON lines to its own file under
``<data>/catalog/audit/day=YYYY-MM-DD/<service>-<host>-<pid>.jsonl`` (one ``write`` per
event, on an ``O_APPEND`` descriptor, so a crash can at worst cut the last line, which the
``audit_events`` view skips). The catalog's ``audit_events`` view reads them all with
DuckDB; see docs/catalog.md. Rows are never rewritten.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from vannah_pipelines.security.principal import Principal

log = logging.getLogger(__name__)

# Column name -> DuckDB type of the audit_events view (docs/catalog.md).
AUDIT_COLUMNS: dict[str, str] = {
    "occurred_at": "TIMESTAMPTZ",
    "service": "VARCHAR",
    "action": "VARCHAR",
    "outcome": "VARCHAR",
    "subject": "VARCHAR",
    "auth_method": "VARCHAR",
    "roles": "VARCHAR[]",
    "address": "VARCHAR",
    "calling_ae": "VARCHAR",
    "called_ae": "VARCHAR",
    "study_uids": "VARCHAR[]",
    "instances": "BIGINT",
    "bytes": "BIGINT",
    "status": "VARCHAR",
    "detail": "VARCHAR",
    "duration_ms": "DOUBLE",
}

ACTIONS = frozenset(
    {
        "store",  # C-STORE association, STOW-RS request
        "query",  # C-FIND, QIDO-RS
        "retrieve",  # WADO-RS, WADO-URI, C-GET
        "move",  # C-MOVE
        "echo",
        "commitment",  # Storage Commitment: an N-ACTION request or an N-EVENT-REPORT result
        "worklist-query",
        "worklist-change",
        "launch",  # /viewer/launch
        "token-minted",  # vannah token
        "association",  # an association refused before any service was asked
        "login-refused",  # a credential refused (401)
        "access-denied",  # a valid credential not allowed (403)
    }
)
OUTCOMES = frozenset({"success", "partial", "failure", "refused"})


@dataclass
class AuditEvent:
    """One audited request or association. `study_uids` lists the studies touched (as many
    as were named, not one row per instance)."""

    service: str
    action: str
    outcome: str
    subject: str = ""
    auth_method: str = ""
    roles: list[str] = field(default_factory=list)
    address: str = ""
    calling_ae: str = ""
    called_ae: str = ""
    study_uids: list[str] = field(default_factory=list)
    instances: int | None = None
    bytes: int | None = None
    status: str = ""
    detail: str = ""
    duration_ms: float | None = None
    occurred_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"unknown audit action {self.action!r}")
        if self.outcome not in OUTCOMES:
            raise ValueError(f"unknown audit outcome {self.outcome!r}")

    def by(self, principal: Principal) -> AuditEvent:
        """Fill in who from an authenticated principal."""
        self.subject = principal.subject
        self.auth_method = principal.method
        self.roles = sorted(r.value for r in principal.roles)
        return self


class AuditLog:
    """Appends audit events of one process; thread-safe. A write that fails is logged at
    ERROR and counted in `failures`, never raised into the service's request."""

    def __init__(self, audit_dir: Path, service: str) -> None:
        self.audit_dir = Path(audit_dir)
        self.service = service
        self.failures = 0
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._day = ""
        self._pid = 0

    def _open(self, day: str) -> int:
        folder = self.audit_dir / f"day={day}"
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{self.service}-{socket.gethostname()}-{os.getpid()}.jsonl"
        return os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)

    def record(self, event: AuditEvent) -> None:
        row = asdict(event)
        row["service"] = event.service or self.service
        row["occurred_at"] = event.occurred_at.astimezone(UTC).isoformat()
        line = (json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        day = event.occurred_at.astimezone(UTC).strftime("%Y-%m-%d")
        with self._lock:
            try:
                if self._fd is None or day != self._day or os.getpid() != self._pid:
                    if self._fd is not None and os.getpid() == self._pid:
                        os.close(self._fd)
                    self._fd, self._day, self._pid = self._open(day), day, os.getpid()
                os.write(self._fd, line)
            except OSError as exc:
                self.failures += 1
                log.error("audit event not written (%s %s): %s", event.action, event.outcome, exc)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None and os.getpid() == self._pid:
                os.close(self._fd)
            self._fd = None


def audit_view_sql(audit_glob: str) -> str:
    """CREATE VIEW ``audit_events`` over the JSON-lines files matched by `audit_glob`
    (a cut last line is skipped)."""
    columns = ", ".join(f"'{name}': '{type_}'" for name, type_ in AUDIT_COLUMNS.items())
    glob = audit_glob.replace("'", "''")
    return (
        "CREATE OR REPLACE VIEW audit_events AS SELECT * EXCLUDE (day) FROM read_json("
        f"'{glob}', format = 'newline_delimited', columns = {{{columns}}}, "
        "hive_partitioning = true, ignore_errors = true) WHERE occurred_at IS NOT NULL"
    )
