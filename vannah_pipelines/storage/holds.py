"""Study holds: a study kept in the hot tier until a date (restored from the cold tier, or a
prior prefetched for a scheduled exam); the lifecycle does not move a held study.

One small JSON file per study, ``<catalog>/holds/<study uid>.json``, replaced atomically;
a later hold replaces an earlier one only if it lasts longer.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from vannah_pipelines.dicom.uids import require_uid

if TYPE_CHECKING:
    from vannah_pipelines.settings import Settings


@dataclass(frozen=True)
class Hold:
    study_uid: str
    hot_until: datetime
    reason: str


def holds_dir(settings: Settings) -> Path:
    return settings.catalog_dir / "holds"


def hold_study(settings: Settings, study_uid: str, hot_until: datetime, reason: str) -> Hold:
    """Keep `study_uid` hot until `hot_until` (aware); an existing longer hold stays."""
    uid = require_uid(study_uid, "StudyInstanceUID")
    if hot_until.tzinfo is None:
        raise ValueError("hot_until must be timezone-aware")
    current = get_hold(settings, uid)
    if current is not None and current.hot_until >= hot_until:
        return current
    folder = holds_dir(settings)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".tmp-{uid}.{os.getpid()}"
    tmp.write_text(
        json.dumps({"study_uid": uid, "hot_until": hot_until.isoformat(), "reason": reason[:200]})
    )
    tmp.replace(folder / f"{uid}.json")
    return Hold(uid, hot_until, reason[:200])


def get_hold(settings: Settings, study_uid: str) -> Hold | None:
    uid = require_uid(study_uid, "StudyInstanceUID")
    return _read(holds_dir(settings) / f"{uid}.json")


def active_holds(settings: Settings, at: datetime) -> dict[str, Hold]:
    """Every hold still in force at `at`, by study UID."""
    found: dict[str, Hold] = {}
    try:
        paths = sorted(holds_dir(settings).glob("*.json"))
    except FileNotFoundError:
        return found
    for path in paths:
        hold = _read(path)
        if hold is not None and hold.hot_until > at:
            found[hold.study_uid] = hold
    return found


def release_hold(settings: Settings, study_uid: str) -> None:
    uid = require_uid(study_uid, "StudyInstanceUID")
    with contextlib.suppress(FileNotFoundError):
        (holds_dir(settings) / f"{uid}.json").unlink()


def _read(path: Path) -> Hold | None:
    try:
        data = json.loads(path.read_text())
        return Hold(
            require_uid(str(data["study_uid"]), "StudyInstanceUID"),
            datetime.fromisoformat(str(data["hot_until"])),
            str(data.get("reason", "")),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
