"""S3 with an archive storage class (GLACIER, DEEP_ARCHIVE) through boto3: the cold tier.

Archived objects cannot be read back: an upload is verified on the way in (the source
hashed against the catalog's SHA-256 first, then sent with ``x-amz-checksum-sha256``,
which S3 checks before it stores anything). Reading needs a restore (``restore_object``);
until the archive has made a copy available, :meth:`ArchiveStorage.open` raises
ArchivedError. Tests run it against moto's server mode, which enforces exactly that.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from typing import Any, BinaryIO

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from vannah_pipelines.errors import (
    ArchivedError,
    NotFoundError,
    StorageError,
    StorageUnavailableError,
)
from vannah_pipelines.storage.base import (
    CHUNK_BYTES,
    SPOOL_MEMORY_BYTES,
    BucketObjects,
    RestoreState,
    Tier,
    spool,
    verify_sha256,
)

ARCHIVE_CLASSES = frozenset({"GLACIER", "DEEP_ARCHIVE"})
_MISSING = frozenset({"NoSuchKey", "404", "NotFound", "NoSuchBucket"})
_ONGOING = re.compile(r'ongoing-request\s*=\s*"(true|false)"')


class ArchiveStorage(BucketObjects):
    """One bucket (and optional prefix) of S3, objects written in `storage_class`."""

    def __init__(
        self,
        *,
        bucket: str,
        storage_class: str = "DEEP_ARCHIVE",
        endpoint_url: str | None = None,
        access_key: str = "",
        secret_key: str = "",
        region: str = "us-east-1",
        prefix: str = "",
        restore_tier: str = "Standard",
        tier: Tier = Tier.COLD,
        timeout_seconds: float = 30.0,
        spool_memory: int = SPOOL_MEMORY_BYTES,
    ) -> None:
        self.tier = tier
        self.bucket = bucket
        self.prefix = prefix
        self.storage_class = storage_class
        self.restore_tier = restore_tier
        self.endpoint = endpoint_url or "AWS S3"
        self.spool_memory = spool_memory
        self.needs_restore = storage_class in ARCHIVE_CLASSES
        config = Config(
            connect_timeout=min(5.0, timeout_seconds),
            read_timeout=timeout_seconds,
            retries={"max_attempts": 3, "mode": "standard"},
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self._client: Any = boto3.client(
            "s3",
            endpoint_url=endpoint_url or None,
            aws_access_key_id=access_key or None,
            aws_secret_access_key=secret_key or None,
            region_name=region,
            config=config,
        )

    def __repr__(self) -> str:
        return f"ArchiveStorage({self.endpoint!r}, {self.bucket!r}, {self.storage_class})"

    def _fail(self, key: str, exc: Exception) -> StorageError:
        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _MISSING:
                return NotFoundError(f"{self.tier}: no object {key!r}")
            if code == "InvalidObjectState":
                return ArchivedError(f"{self.tier}: {key!r} is archived ({self.storage_class})")
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
            if status >= 500 or code in ("SlowDown", "RequestTimeout"):
                return StorageUnavailableError(f"{self.tier} ({self.endpoint}): {key!r}: {code}")
            return StorageError(f"{self.tier} ({self.endpoint}): {key!r}: {code}")
        return StorageUnavailableError(
            f"{self.tier} ({self.endpoint}): {key!r}: unreachable ({type(exc).__name__})"
        )

    def ensure_bucket(self) -> None:
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except ClientError:
            try:
                self._client.create_bucket(Bucket=self.bucket)
            except (ClientError, BotoCoreError) as exc:
                raise self._fail(f"bucket {self.bucket}", exc) from exc
        except BotoCoreError as exc:
            raise self._fail(f"bucket {self.bucket}", exc) from exc

    def write(self, key: str, stream: BinaryIO, size: int, sha256: str) -> None:
        """Verify the source bytes, then upload them in the archive class with their
        SHA-256 (S3 refuses a body that does not match); the stored size is checked."""
        name = self._name(key)
        verify_sha256(stream, size, sha256, f"{self.tier}: {key!r} source")
        digest = base64.b64encode(bytes.fromhex(sha256)).decode()
        try:
            self._client.put_object(
                Bucket=self.bucket,
                Key=name,
                Body=stream,
                ContentLength=size,
                StorageClass=self.storage_class,
                ChecksumSHA256=digest,
            )
            head = self._client.head_object(Bucket=self.bucket, Key=name, ChecksumMode="ENABLED")
        except (ClientError, BotoCoreError) as exc:
            raise self._fail(key, exc) from exc
        stored = head.get("ChecksumSHA256")
        if int(head.get("ContentLength", -1)) != size or (stored and stored != digest):
            self.delete(key)
            raise StorageError(f"{self.tier}: {key!r} stored object differs from the source")

    def open(self, key: str) -> BinaryIO:
        name = self._name(key)
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=name)
        except ClientError as exc:
            failure = self._fail(key, exc)
            if isinstance(failure, ArchivedError):
                restoring = self._state(name) is RestoreState.RESTORING
                raise ArchivedError(str(failure), restoring=restoring) from exc
            raise failure from exc
        except BotoCoreError as exc:
            raise self._fail(key, exc) from exc
        body = response["Body"]
        try:
            return spool(body.iter_chunks(CHUNK_BYTES), self.spool_memory)
        except (BotoCoreError, OSError) as exc:
            raise self._fail(key, exc) from exc
        finally:
            body.close()

    def stat(self, key: str) -> int:
        try:
            head = self._client.head_object(Bucket=self.bucket, Key=self._name(key))
        except (ClientError, BotoCoreError) as exc:
            raise self._fail(key, exc) from exc
        return int(head.get("ContentLength", 0))

    def delete(self, key: str) -> None:
        try:
            self._client.delete_object(Bucket=self.bucket, Key=self._name(key))
        except ClientError as exc:
            failure = self._fail(key, exc)
            if not isinstance(failure, NotFoundError):
                raise failure from exc
        except BotoCoreError as exc:
            raise self._fail(key, exc) from exc

    def keys(self, prefix: str = "") -> Iterator[str]:
        start, strip = self._listing(prefix)
        paginator = self._client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=start):
                for obj in page.get("Contents", []):
                    yield str(obj["Key"])[strip:]
        except (ClientError, BotoCoreError) as exc:
            raise self._fail(prefix or "*", exc) from exc

    def restore(self, key: str, days: int) -> RestoreState:
        """Ask for a readable copy for `days` days (``restore_object``); an object already
        restored or being restored is left as it is."""
        name = self._name(key)
        state = self._state(name)
        if state is not RestoreState.ARCHIVED:
            return state
        try:
            self._client.restore_object(
                Bucket=self.bucket,
                Key=name,
                RestoreRequest={"Days": days, "GlacierJobParameters": {"Tier": self.restore_tier}},
            )
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code != "RestoreAlreadyInProgress":
                raise self._fail(key, exc) from exc
        except BotoCoreError as exc:
            raise self._fail(key, exc) from exc
        return self._state(name)

    def restore_state(self, key: str) -> RestoreState:
        return self._state(self._name(key))

    def _state(self, name: str) -> RestoreState:
        try:
            head = self._client.head_object(Bucket=self.bucket, Key=name)
        except (ClientError, BotoCoreError) as exc:
            raise self._fail(name, exc) from exc
        if head.get("StorageClass") not in ARCHIVE_CLASSES:
            return RestoreState.ONLINE
        match = _ONGOING.search(str(head.get("Restore") or ""))
        if match is None:
            return RestoreState.ARCHIVED
        return RestoreState.RESTORING if match.group(1) == "true" else RestoreState.ONLINE
