"""The restore spool: a folder of requests to bring a study back from the cold tier.

Any process may file a request (a DICOMweb or C-MOVE read that found a study archived, the
priors prefetch, ``vannah restore``): one small JSON file per study,
``<data>/restore-requests/<study uid>.json``, written atomically. Filing twice is one
request. A Dagster sensor reads the spool and runs the restore job, which removes a
request once its study is hot again.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from vannah_pipelines.storage.records import StudyRecords

if TYPE_CHECKING:
    from vannah_pipelines.settings import Settings

SUFFIX = ".json"


@dataclass(frozen=True)
class RestoreRequest:
    """One filed request."""

    study_uid: str
    requested_at: datetime
    reason: str
    path: Path


def _requests(settings: Settings) -> StudyRecords:
    return StudyRecords(settings.restore_requests_dir)


def request_restore(settings: Settings, study_uid: str, *, reason: str) -> bool:
    """File a restore request for `study_uid`; False if one was already filed."""
    record = {"requested_at": datetime.now(UTC).isoformat(), "reason": reason[:200]}
    return _requests(settings).write(study_uid, record, replace=False)


def pending_requests(settings: Settings) -> list[RestoreRequest]:
    """Every filed request, oldest first (unreadable files are skipped, not fatal)."""
    found: list[RestoreRequest] = []
    for uid, record, path in _requests(settings).items():
        try:
            when = datetime.fromisoformat(str(record["requested_at"]))
        except (KeyError, ValueError):
            continue
        found.append(RestoreRequest(uid, when, str(record.get("reason", "")), path))
    found.sort(key=lambda r: r.requested_at)
    return found


def complete_request(settings: Settings, study_uid: str) -> None:
    """Remove the request of `study_uid` (its study is hot again)."""
    _requests(settings).remove(study_uid)
