"""The storage protocol every backend (local folder, S3/MinIO, S3 archive) implements."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import BinaryIO, Protocol

from vannah_pipelines.dicom.uids import require_uid


class Tier(StrEnum):
    """Storage tiers, in the order instances age through them."""

    HOT = "hot"
    WARM = "warm"
    COLD = "cold"


def instance_key(study_uid: str, series_uid: str, sop_uid: str) -> str:
    """The object key of an instance; every part is a validated UID, so it is path-safe.

    >>> instance_key("1.2", "1.2.3", "1.2.3.4")
    '1.2/1.2.3/1.2.3.4.dcm'
    """
    parts = (
        require_uid(study_uid, "StudyInstanceUID"),
        require_uid(series_uid, "SeriesInstanceUID"),
        require_uid(sop_uid, "SOPInstanceUID"),
    )
    return f"{parts[0]}/{parts[1]}/{parts[2]}.dcm"


class Storage(Protocol):
    """A tier's object store. Keys are relative, '/'-separated, made by instance_key()."""

    tier: Tier

    def put(self, key: str, source: Path) -> int:
        """Store the file `source` under `key` durably; return its size in bytes."""
        ...

    def open(self, key: str) -> BinaryIO:
        """A readable binary stream of the object (raises NotFoundError)."""
        ...

    def stat(self, key: str) -> int:
        """The object's size in bytes (raises NotFoundError)."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object; removing a missing object is not an error."""
        ...

    def exists(self, key: str) -> bool:
        """Whether the object is there."""
        ...
