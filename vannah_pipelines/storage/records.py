"""One small JSON record per study in a folder: restore requests, holds, moves under way.

A record's file is ``<folder>/<study uid>.json`` (the UID is validated, so it is safe as a
name), written whole by a rename, so a reader sees an old record or a new one, never half.
Unreadable files are skipped by readers, not fatal: one bad file stops nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vannah_pipelines.dicom.uids import require_uid
from vannah_pipelines.errors import UnsafeUidError

SUFFIX = ".json"


class StudyRecords:
    """The records under `folder`, one per Study Instance UID."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def path(self, study_uid: str) -> Path:
        return self.folder / f"{require_uid(study_uid, 'StudyInstanceUID')}{SUFFIX}"

    def write(self, study_uid: str, record: dict[str, Any], *, replace: bool = True) -> bool:
        """Write `record` for `study_uid` (its ``study_uid`` key is set). With
        ``replace=False`` a record already there is kept and False is returned."""
        target = self.path(study_uid)
        if not replace and target.exists():
            return False
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".tmp-{target.name}.{os.getpid()}"
        tmp.write_text(json.dumps({**record, "study_uid": study_uid}, default=str))
        try:
            if replace:
                tmp.replace(target)
            else:
                os.link(tmp, target)  # atomic, and never replaces a record already there
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def read(self, study_uid: str) -> dict[str, Any] | None:
        return _load(self.path(study_uid))

    def items(self) -> Iterator[tuple[str, dict[str, Any], Path]]:
        """(study UID, record, file) of every readable record, in file name order."""
        try:
            paths = sorted(self.folder.glob(f"*{SUFFIX}"))
        except FileNotFoundError:
            return
        for path in paths:
            record = _load(path)
            if record is not None:
                yield record["study_uid"], record, path

    def remove(self, study_uid: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(study_uid).unlink()


def _load(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
        record["study_uid"] = require_uid(str(record["study_uid"]), "StudyInstanceUID")
    except (OSError, ValueError, KeyError, TypeError, UnsafeUidError):
        return None
    return record if isinstance(record, dict) else None
