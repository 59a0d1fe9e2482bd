"""List quarantined files and release one: back into the landing zone as a new sealed
batch, so the normal ingest indexes it (or quarantines it again, under a new key).

The release is recorded as a ``quarantine_status`` change (``released``, the operator's
reason, the new batch id): the quarantine row itself is never rewritten, and a file
quarantined again gets a quarantine row of its own, so its whole history stays.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb

from vannah_pipelines.catalog.changes import (
    QUARANTINE_STATUS,
    RELEASED,
    ChangeAppend,
    append_change,
    quarantine_with_status_sql,
)
from vannah_pipelines.catalog.ingest import IngestPaths
from vannah_pipelines.catalog.lake import append_change_file
from vannah_pipelines.catalog.writer import CatalogWriter
from vannah_pipelines.errors import CatalogError
from vannah_pipelines.landing.layout import (
    InvalidBatchIdError,
    LandingZone,
    ReceiveFacts,
    require_batch_id,
)

# <batch_id>/<name>, as ingest.quarantine_row makes them: the landed file name
# (<uid>.dcm, <uid>~<n>.dcm) or unnamed-<sha256[:16]>.dcm.
_KEY_NAME = re.compile(r"[0-9.]{1,64}(~[0-9]{1,9})?\.dcm|unnamed-([0-9a-f]{16}|none)\.dcm")
_LOCK = ".release.lock"


class QuarantineError(CatalogError):
    """A quarantine key is malformed or unknown, or its file cannot be released."""


def require_quarantine_key(value: object) -> str:
    """Return `value` if it is a quarantine key of the form ingest makes (so safe as a
    relative path under the quarantine folder).

    >>> require_quarantine_key("20260101T000000000000-dimse-12-0/1.2.3.dcm")
    '20260101T000000000000-dimse-12-0/1.2.3.dcm'
    """
    if not isinstance(value, str) or value.count("/") != 1:
        raise QuarantineError(f"not a quarantine key: {str(value)[:120]!r}")
    batch_id, name = value.split("/")
    try:
        require_batch_id(batch_id)
    except InvalidBatchIdError:
        raise QuarantineError(f"not a quarantine key: {value[:120]!r}") from None
    if not _KEY_NAME.fullmatch(name):
        raise QuarantineError(f"not a quarantine key: {value[:120]!r}")
    return value


@dataclass(frozen=True)
class QuarantinedFile:
    """One quarantine row with its current status."""

    quarantine_key: str
    batch_id: str
    reason: str
    quarantined_at: datetime | None
    status: str
    status_changed_at: datetime | None
    status_reason: str | None
    released_batch_id: str | None
    sop_instance_uid: str | None
    checksum: str | None
    size_bytes: int | None
    source: str | None
    calling_ae: str | None
    peer: str | None
    received_at: datetime | None


def _rows(catalog_dir: Path, where: str = "", params: list[Any] | None = None) -> list[Any]:
    writer = CatalogWriter(catalog_dir)
    writer.ensure()
    sql = quarantine_with_status_sql(
        writer.source_sql("quarantine"), writer.source_sql(QUARANTINE_STATUS.directory)
    )
    fields = ", ".join(QuarantinedFile.__dataclass_fields__)
    con = duckdb.connect(":memory:")
    try:
        return con.execute(
            f"SELECT {fields} FROM ({sql}) {where} "
            "QUALIFY row_number() OVER (PARTITION BY quarantine_key "
            "ORDER BY quarantined_at DESC) = 1 ORDER BY quarantined_at, quarantine_key",
            params or [],
        ).fetchall()
    finally:
        con.close()


def list_quarantine(catalog_dir: Path, status: str | None = None) -> list[QuarantinedFile]:
    """Every quarantined file (oldest first), or those whose current status is `status`."""
    where, params = ("WHERE status = ?", [status]) if status else ("", [])
    return [QuarantinedFile(*row) for row in _rows(catalog_dir, where, params)]


def quarantined_file(catalog_dir: Path, key: str) -> QuarantinedFile:
    """The quarantine row of `key` (validated) with its status.

    Raises
    ------
    QuarantineError
        The key is malformed or has no quarantine row.
    """
    key = require_quarantine_key(key)
    found = _rows(catalog_dir, "WHERE quarantine_key = ?", [key])
    if not found:
        raise QuarantineError(f"no quarantined file {key} in the catalog")
    return QuarantinedFile(*found[0])


@dataclass(frozen=True)
class Release:
    """What a release did."""

    quarantine_key: str
    batch_id: str  # the new sealed landing batch holding the file
    change: ChangeAppend


@contextlib.contextmanager
def _release_lock(quarantine_dir: Path) -> Iterator[None]:
    """One release at a time, so a key is never released twice by two operators."""
    quarantine_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(quarantine_dir / _LOCK, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def release_quarantined(
    paths: IngestPaths, key: str, *, reason: str | None, changed_by: str
) -> Release:
    """Copy the quarantined file `key` back into the landing zone as a new sealed batch
    (with the receive facts it arrived with), then record it ``released``.

    Ingest then indexes it, or quarantines it again under a new key (its new batch).
    The file stays in the quarantine folder. If the process dies between the landing and
    the record, the file is ingested but still shows ``quarantined``: releasing it again
    lands the same bytes once more (a re-send of identical bytes: the same stored object).

    Raises
    ------
    QuarantineError
        `key` is malformed, unknown or already released; its row has no valid SOP
        Instance UID to land it under; its file is missing or differs from its checksum.
    OSError
        The quarantine, landing zone or catalog cannot be read or written.
    """
    key = require_quarantine_key(key)
    with _release_lock(paths.quarantine_dir):
        row = quarantined_file(paths.catalog_dir, key)
        if row.status == RELEASED:
            when = f"{row.status_changed_at:%Y-%m-%d %H:%M:%S} UTC" if row.status_changed_at else ""
            raise QuarantineError(
                f"{key} was already released {when} "
                f"as batch {row.released_batch_id}; if it was quarantined again, release "
                "its new key (vannah quarantine list)"
            )
        if row.sop_instance_uid is None:
            raise QuarantineError(
                f"{key} has no valid SOP Instance UID to land it under: it cannot be released"
            )
        # The key is validated, so this is a file under the quarantine folder.
        path = paths.quarantine_dir / key
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise QuarantineError(f"{key}: its file is missing from the quarantine") from None
        if row.checksum is not None and hashlib.sha256(data).hexdigest() != row.checksum:
            raise QuarantineError(f"{key}: its file has changed since it was quarantined")
        received = row.received_at or datetime.now(UTC)
        facts = ReceiveFacts(
            sop_instance_uid=row.sop_instance_uid,
            sop_class_uid="",
            transfer_syntax_uid="",
            source=row.source or "import",
            calling_ae=row.calling_ae or "",
            peer=row.peer or "",
            received_at=received.astimezone(UTC).isoformat(),
        )
        batch = LandingZone(paths.landing_dir).open_batch("release")
        try:
            batch.write_instance(data, facts)
        finally:
            sealed = batch.seal()
        if sealed is None:  # pragma: no cover - write_instance raised, and that propagates
            raise QuarantineError(f"{key}: nothing was landed")
        change = append_change(
            CatalogWriter(paths.catalog_dir),
            QUARANTINE_STATUS,
            [
                {
                    "quarantine_key": key,
                    "status": RELEASED,
                    "reason": reason,
                    "released_batch_id": sealed.batch_id,
                }
            ],
            changed_by=changed_by,
        )
        if paths.lake is not None:  # the services on the lake see the status too
            append_change_file(paths.lake, change)
        return Release(key, sealed.batch_id, change)
