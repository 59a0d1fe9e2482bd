"""The restore spool: a folder of requests to bring a study back from the cold tier.

Any process may file a request (a DICOMweb or C-MOVE read that found a study archived, the
priors prefetch, ``vannah restore``): one small JSON file per study,
``<data>/restore-requests/<study uid>.json``, written atomically. Filing twice is one
request. A Dagster sensor reads the spool and runs the restore job, which removes a
request once its study is hot again.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from vannah_pipelines.dicom.uids import require_uid

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


def request_restore(settings: Settings, study_uid: str, *, reason: str) -> bool:
    """File a restore request for `study_uid`; False if one was already filed."""
    uid = require_uid(study_uid, "StudyInstanceUID")
    folder = settings.restore_requests_dir
    target = folder / f"{uid}{SUFFIX}"
    if target.exists():
        return False
    folder.mkdir(parents=True, exist_ok=True)
    body = json.dumps(
        {"study_uid": uid, "requested_at": datetime.now(UTC).isoformat(), "reason": reason[:200]}
    )
    tmp = folder / f".tmp-{uid}.{os.getpid()}"
    tmp.write_text(body)
    try:
        os.link(tmp, target)  # atomic, and never replaces a request already there
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    return True


def pending_requests(settings: Settings) -> list[RestoreRequest]:
    """Every filed request, oldest first (unreadable files are skipped, not fatal)."""
    folder = settings.restore_requests_dir
    found: list[RestoreRequest] = []
    try:
        entries = sorted(folder.iterdir())
    except FileNotFoundError:
        return []
    for path in entries:
        if not path.name.endswith(SUFFIX) or path.name.startswith("."):
            continue
        try:
            data = json.loads(path.read_text())
            found.append(
                RestoreRequest(
                    study_uid=require_uid(str(data["study_uid"]), "StudyInstanceUID"),
                    requested_at=datetime.fromisoformat(str(data["requested_at"])),
                    reason=str(data.get("reason", "")),
                    path=path,
                )
            )
        except (OSError, ValueError, KeyError, TypeError):
            continue
    found.sort(key=lambda r: r.requested_at)
    return found


def complete_request(settings: Settings, study_uid: str) -> None:
    """Remove the request of `study_uid` (its study is hot again)."""
    uid = require_uid(study_uid, "StudyInstanceUID")
    with contextlib.suppress(FileNotFoundError):
        (settings.restore_requests_dir / f"{uid}{SUFFIX}").unlink()
