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


_HEX = frozenset("0123456789abcdef")


def instance_key(study_uid: str, series_uid: str, sop_uid: str, checksum: str) -> str:
    """The object key of one version of an instance: ``<study>/<series>/<sop>.<sha>.dcm``.

    Every part is validated (UIDs, hex checksum), so the key is path-safe. The checksum
    prefix makes each received version its own immutable object, so a re-sent instance
    never overwrites the bytes another catalog row points at, whatever order runs finish.

    >>> instance_key("1.2", "1.2.3", "1.2.3.4", "ab" * 32)
    '1.2/1.2.3/1.2.3.4.abababababababab.dcm'
    """
    parts = (
        require_uid(study_uid, "StudyInstanceUID"),
        require_uid(series_uid, "SeriesInstanceUID"),
        require_uid(sop_uid, "SOPInstanceUID"),
    )
    short = checksum[:16].lower()
    if len(short) != 16 or not set(short) <= _HEX:
        raise ValueError(f"not a hex checksum: {checksum[:80]!r}")
    return f"{parts[0]}/{parts[1]}/{parts[2]}.{short}.dcm"


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
