"""Study holds: a study kept in the hot tier until a date (restored from the cold tier, or a
prior prefetched for a scheduled exam); the lifecycle does not move a held study.

One small JSON file per study, ``<catalog>/holds/<study uid>.json``, replaced atomically;
a later hold replaces an earlier one only if it lasts longer.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vannah_pipelines.dicom.uids import require_uid
from vannah_pipelines.storage.records import StudyRecords

if TYPE_CHECKING:
    from vannah_pipelines.settings import Settings


@dataclass(frozen=True)
class Hold:
    study_uid: str
    hot_until: datetime
    reason: str


def holds_dir(settings: Settings) -> Path:
    return settings.catalog_dir / "holds"


def _holds(settings: Settings) -> StudyRecords:
    return StudyRecords(holds_dir(settings))


def hold_study(settings: Settings, study_uid: str, hot_until: datetime, reason: str) -> Hold:
    """Keep `study_uid` hot until `hot_until` (aware); an existing longer hold stays."""
    uid = require_uid(study_uid, "StudyInstanceUID")
    if hot_until.tzinfo is None:
        raise ValueError("hot_until must be timezone-aware")
    current = get_hold(settings, uid)
    if current is not None and current.hot_until >= hot_until:
        return current
    _holds(settings).write(uid, {"hot_until": hot_until.isoformat(), "reason": reason[:200]})
    return Hold(uid, hot_until, reason[:200])


def get_hold(settings: Settings, study_uid: str) -> Hold | None:
    return _hold(_holds(settings).read(study_uid))


def active_holds(settings: Settings, at: datetime) -> dict[str, Hold]:
    """Every hold still in force at `at`, by study UID."""
    found: dict[str, Hold] = {}
    for _, record, _ in _holds(settings).items():
        hold = _hold(record)
        if hold is not None and hold.hot_until > at:
            found[hold.study_uid] = hold
    return found


def release_hold(settings: Settings, study_uid: str) -> None:
    _holds(settings).remove(study_uid)


def _hold(record: dict[str, Any] | None) -> Hold | None:
    if record is None:
        return None
    try:
        until = datetime.fromisoformat(str(record["hot_until"]))
    except (KeyError, ValueError):
        return None
    return Hold(record["study_uid"], until, str(record.get("reason", "")))
