"""The storage protocol every backend (local folder, S3/MinIO, S3 archive) implements."""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterable, Iterator
from enum import StrEnum
from pathlib import Path
from typing import IO, BinaryIO, Protocol

from vannah_pipelines.dicom.uids import require_uid
from vannah_pipelines.errors import ChecksumMismatchError, NotFoundError, StorageError


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


class RestoreState(StrEnum):
    """Whether an object can be read now (PS3.18 InstanceAvailability in brackets)."""

    ONLINE = "online"  # readable now (ONLINE)
    RESTORING = "restoring"  # an archive restore is under way (NEARLINE)
    ARCHIVED = "archived"  # in an archive storage class, no restore asked (OFFLINE)


class Storage(Protocol):
    """A tier's object store. Keys are relative, '/'-separated, made by instance_key()."""

    tier: Tier
    # True when objects sit in an archive storage class (S3 GLACIER, DEEP_ARCHIVE): they are
    # read only after restore(); open() raises ArchivedError until then.
    needs_restore: bool

    def put(self, key: str, source: Path) -> int:
        """Store the file `source` under `key` durably; return its size in bytes."""
        ...

    def write(self, key: str, stream: BinaryIO, size: int, sha256: str) -> None:
        """Store `size` bytes of the seekable `stream` (read from its start) under `key`,
        verified: the bytes stored hash to `sha256` (hex), or ChecksumMismatchError is
        raised and nothing is left under `key`."""
        ...

    def open(self, key: str) -> BinaryIO:
        """A readable, seekable binary stream of the object (raises NotFoundError, or
        ArchivedError for an archived object not restored)."""
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

    def keys(self, prefix: str = "") -> Iterator[str]:
        """Every object key under `prefix` (a study's ``<study uid>/``, or all)."""
        ...

    def restore(self, key: str, days: int) -> RestoreState:
        """Ask the archive to make `key` readable for `days` days; its state after."""
        ...

    def restore_state(self, key: str) -> RestoreState:
        """Whether `key` can be read now (raises NotFoundError)."""
        ...


class BucketObjects:
    """What the two S3 backends share: keys under a prefix of one bucket, ``put`` of a
    file through the verified ``write``, ``exists`` through ``stat``."""

    prefix: str

    def write(self, key: str, stream: BinaryIO, size: int, sha256: str) -> None:
        raise NotImplementedError

    def stat(self, key: str) -> int:
        raise NotImplementedError

    def _name(self, key: str) -> str:
        """The object name of `key` (refusing a key that could leave its folder)."""
        parts = key.split("/")
        if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise StorageError(f"unsafe storage key: {key[:120]!r}")
        return object_name(self.prefix, key)

    def _listing(self, prefix: str) -> tuple[str, int]:
        """The listing prefix of `prefix` keys, and how much of a listed name to cut off."""
        own = self.prefix.strip("/")
        start = object_name(self.prefix, prefix) if prefix else own
        return start, len(own) + 1 if own else 0

    def put(self, key: str, source: Path) -> int:
        with Path(source).open("rb") as stream:
            size = stream.seek(0, 2)
            self.write(key, stream, size, sha256_of(stream, size))
        return size

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
        except NotFoundError:
            return False
        return True


def object_name(prefix: str, key: str) -> str:
    """`key` under the bucket prefix `prefix` (``''`` or ``'a/b/'``).

    >>> object_name("a/b/", "1.2/x.dcm"), object_name("", "1.2/x.dcm")
    ('a/b/1.2/x.dcm', '1.2/x.dcm')
    """
    return f"{prefix.strip('/')}/{key}" if prefix.strip("/") else key


CHUNK_BYTES = 1 << 20
SPOOL_MEMORY_BYTES = 8 << 20  # a spooled object larger than this goes to a temporary file


def spool(chunks: Iterable[bytes], max_memory: int = SPOOL_MEMORY_BYTES) -> BinaryIO:
    """The bytes of `chunks` as a seekable stream at position 0: in memory up to
    `max_memory`, then in an anonymous temporary file (pydicom and the C-STORE sender seek)."""
    out: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=max_memory)  # noqa: SIM115
    try:
        for chunk in chunks:
            out.write(chunk)
        out.seek(0)
    except BaseException:
        out.close()
        raise
    return out  # type: ignore[return-value]


def sha256_of(stream: BinaryIO, size: int | None = None) -> str:
    """The hex SHA-256 of `stream` from its start; the stream is left at position 0.
    With `size`, a stream of another length is a ChecksumMismatchError."""
    digest = hashlib.sha256()
    stream.seek(0)
    read = 0
    while chunk := stream.read(CHUNK_BYTES):
        digest.update(chunk)
        read += len(chunk)
    stream.seek(0)
    if size is not None and read != size:
        raise ChecksumMismatchError(f"{read} bytes where {size} were expected")
    return digest.hexdigest()


def verify_sha256(stream: BinaryIO, size: int, sha256: str, what: str) -> None:
    """Raise ChecksumMismatchError unless `stream` holds `size` bytes hashing to `sha256`."""
    actual = sha256_of(stream, size)
    if actual != sha256.lower():
        raise ChecksumMismatchError(
            f"{what}: SHA-256 {actual[:16]}... where the catalog has {sha256[:16]}..."
        )
