"""S3-compatible object storage through the `minio` SDK: the warm tier (MinIO in production,
SeaweedFS in the tests).

Imported only by what reads or moves warm objects (``StorageTiers`` opens it on first use),
never by the receiver's store-only workers.
"""

from __future__ import annotations

import base64
import hashlib
import io
from collections.abc import Iterator
from typing import BinaryIO

import urllib3
from minio import Minio
from minio.credentials.providers import (
    AWSConfigProvider,
    ChainedProvider,
    EnvAWSProvider,
    IamAwsProvider,
    Provider,
)
from minio.error import S3Error

from vannah_pipelines.errors import (
    ChecksumMismatchError,
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
    sha256_of,
    spool,
)

# Objects up to this size are one PUT, whose ETag is the MD5 of the bytes (checked); larger
# ones are multipart uploads, read back. The minio SDK holds a part in memory while it sends
# it, and one part at a time here: an upload costs at most this much memory.
PART_BYTES = 16 << 20
_MISSING = frozenset({"NoSuchKey", "NoSuchObject", "NotFound", "NoSuchBucket"})
_BUSY = frozenset({"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout"})
# User metadata every upload carries: the hex SHA-256 of the object's bytes, so a later
# writer can tell "same bytes already there" from a HEAD (routing's idempotent S3 sends).
SHA256_METADATA = "x-amz-meta-sha256"


def aws_default_credentials() -> Provider:
    """The AWS SDKs' own credential chain: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
    ``~/.aws/credentials``, then the instance or task role."""
    return ChainedProvider([EnvAWSProvider(), AWSConfigProvider(), IamAwsProvider()])


class MinioStorage(BucketObjects):
    """One bucket (and optional prefix) of an S3-compatible server, through the minio SDK.

    Reads are spooled (memory up to `spool_memory`, then a temporary file) so pydicom and
    the C-STORE sender can seek. Every call is bounded: connect and read timeouts, a few
    retries on connection errors; a server that is down is a StorageError, never a hang.
    """

    needs_restore = False

    def __init__(
        self,
        *,
        endpoint: str,
        bucket: str,
        access_key: str,
        secret_key: str,
        secure: bool = True,
        region: str | None = None,
        prefix: str = "",
        tier: Tier = Tier.WARM,
        timeout_seconds: float = 30.0,
        spool_memory: int = SPOOL_MEMORY_BYTES,
        pool_size: int = 16,
        credentials: Provider | None = None,
        label: str | None = None,
    ) -> None:
        self.tier = tier
        self.label = label or str(tier)  # what messages call it: the tier, or a destination
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint = endpoint
        self.spool_memory = spool_memory
        http = urllib3.PoolManager(
            maxsize=pool_size,
            timeout=urllib3.Timeout(connect=min(5.0, timeout_seconds), read=timeout_seconds),
            retries=urllib3.Retry(total=2, backoff_factor=0.2, status_forcelist=(500, 502, 503)),
        )
        self._client = Minio(
            endpoint,
            access_key=access_key,
            secret_key=secret_key,
            secure=secure,
            region=region or None,
            http_client=http,
            credentials=credentials,
        )

    def __repr__(self) -> str:
        return f"MinioStorage({self.endpoint!r}, {self.bucket!r}, {self.tier.value})"

    def _fail(self, key: str, exc: Exception) -> StorageError:
        if isinstance(exc, S3Error) and exc.code in _MISSING:
            return NotFoundError(f"{self.label}: no object {key!r}")
        message = f"{self.label} ({self.endpoint}): {key!r}: {_reason(exc)}"
        if isinstance(exc, S3Error) and exc.code not in _BUSY:
            return StorageError(message)  # refused (access denied, bad request): not transient
        return StorageUnavailableError(message)

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (``vannah storage init`` and the tests)."""
        try:
            if not self._client.bucket_exists(self.bucket):
                self._client.make_bucket(self.bucket)
        except (S3Error, urllib3.exceptions.HTTPError, OSError) as exc:
            raise StorageError(
                f"{self.label} ({self.endpoint}): bucket {self.bucket!r}: {_reason(exc)}"
            ) from exc

    def write(self, key: str, stream: BinaryIO, size: int, sha256: str) -> None:
        """Upload verified: the bytes are hashed first (SHA-256 against `sha256`, MD5 for
        the ETag), sent with ``x-amz-checksum-sha256`` (a server that checks it refuses a
        corrupted body), and the single-PUT ETag must equal their MD5; a multipart upload
        is read back and hashed. On a mismatch the object is deleted. The object carries its
        SHA-256 as user metadata (:data:`SHA256_METADATA`, see :meth:`stat_sha256`)."""
        name = self._name(key)
        sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
        stream.seek(0)
        read = 0
        while chunk := stream.read(CHUNK_BYTES):
            sha.update(chunk)
            md5.update(chunk)
            read += len(chunk)
        stream.seek(0)
        if read != size or sha.hexdigest() != sha256.lower():
            raise ChecksumMismatchError(
                f"{self.label}: {key!r}: the source holds {read} bytes hashing to "
                f"{sha.hexdigest()[:16]}..., the catalog says {size} hashing to {sha256[:16]}..."
            )
        single = size <= PART_BYTES  # one PUT; a whole-object checksum header only fits it
        headers: dict[str, str | list[str] | tuple[str]] = {SHA256_METADATA: sha.hexdigest()}
        if single:
            headers["x-amz-checksum-sha256"] = base64.b64encode(sha.digest()).decode()
        try:
            result = self._client.put_object(
                self.bucket,
                name,
                stream,
                size,
                metadata=headers,
                part_size=PART_BYTES,
                num_parallel_uploads=1,  # the SDK's default 3 holds three parts in memory
            )
        except (S3Error, urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            raise self._fail(key, exc) from exc
        etag = (result.etag or "").strip('"')
        if single and "-" not in etag:
            ok = etag == md5.hexdigest()
        else:
            with self.open(key) as back:
                ok = sha256_of(back) == sha256.lower()
        if not ok:
            self.delete(key)
            raise ChecksumMismatchError(
                f"{self.label}: {key!r} stored bytes differ from the source"
            )

    def open(self, key: str) -> BinaryIO:
        name = self._name(key)
        try:
            response = self._client.get_object(self.bucket, name)
        except (S3Error, urllib3.exceptions.HTTPError, OSError) as exc:
            raise self._fail(key, exc) from exc
        try:
            length = int(response.headers.get("Content-Length") or -1)
            if 0 <= length <= self.spool_memory:
                # One read into one buffer the stream shares (no copy into a spool).
                data = response.read()
                if len(data) != length:
                    raise StorageUnavailableError(
                        f"{self.label} ({self.endpoint}): {key!r}: {len(data)} of {length} bytes"
                    )
                return io.BytesIO(data)
            return spool(response.stream(CHUNK_BYTES), self.spool_memory)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise self._fail(key, exc) from exc
        finally:
            response.close()
            response.release_conn()

    def stat(self, key: str) -> int:
        try:
            return int(self._client.stat_object(self.bucket, self._name(key)).size or 0)
        except (S3Error, urllib3.exceptions.HTTPError, OSError) as exc:
            raise self._fail(key, exc) from exc

    def stat_sha256(self, key: str) -> tuple[int, str | None]:
        """The object's size and the SHA-256 it was written with (None when it carries no
        :data:`SHA256_METADATA`, as an object another program wrote). Raises NotFoundError."""
        try:
            found = self._client.stat_object(self.bucket, self._name(key))
        except (S3Error, urllib3.exceptions.HTTPError, OSError) as exc:
            raise self._fail(key, exc) from exc
        sha = (found.metadata or {}).get(SHA256_METADATA)
        return int(found.size or 0), (str(sha).lower() if sha else None)

    def delete(self, key: str) -> None:
        try:
            self._client.remove_object(self.bucket, self._name(key))
        except S3Error as exc:
            if exc.code not in _MISSING:
                raise self._fail(key, exc) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise self._fail(key, exc) from exc

    def keys(self, prefix: str = "") -> Iterator[str]:
        start, strip = self._listing(prefix)
        try:
            for obj in self._client.list_objects(self.bucket, prefix=start or None, recursive=True):
                if obj.object_name and not obj.is_dir:
                    yield obj.object_name[strip:]
        except (S3Error, urllib3.exceptions.HTTPError, OSError) as exc:
            raise self._fail(prefix or "*", exc) from exc

    def restore(self, key: str, days: int) -> RestoreState:
        return self.restore_state(key)

    def restore_state(self, key: str) -> RestoreState:
        self.stat(key)
        return RestoreState.ONLINE


def _reason(exc: BaseException) -> str:
    if isinstance(exc, S3Error):
        return f"{exc.code}: {exc.message}"
    if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None:
        return f"unreachable ({type(exc.reason).__name__})"
    return f"{type(exc).__name__}: {str(exc)[:200]}"
