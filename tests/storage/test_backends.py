"""Every storage backend through the same protocol, against real servers on loopback:
a local folder, SeaweedFS through the minio SDK (warm), moto's S3 server through boto3 with
DEEP_ARCHIVE (cold: unreadable until restored)."""

from __future__ import annotations

import hashlib
import io
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pytest

from tests.conftest import COLD_TEST_BUCKET, S3_TEST_BUCKET
from tests.servers import S3Server, seaweedfs_server
from vannah_pipelines.errors import (
    ArchivedError,
    ChecksumMismatchError,
    NotFoundError,
    StorageError,
    StorageUnavailableError,
)
from vannah_pipelines.settings import Settings
from vannah_pipelines.storage.archive import ArchiveStorage
from vannah_pipelines.storage.base import RestoreState, Storage, Tier, instance_key, sha256_of
from vannah_pipelines.storage.local import LocalStorage
from vannah_pipelines.storage.restore import pending_requests
from vannah_pipelines.storage.s3 import MinioStorage
from vannah_pipelines.storage.tiers import RestoreRequiredError, StorageTiers


def _minio(server: S3Server, prefix: str) -> MinioStorage:
    return MinioStorage(
        endpoint=server.endpoint,
        bucket=S3_TEST_BUCKET,
        access_key=server.access_key,
        secret_key=server.secret_key,
        secure=False,
        prefix=prefix,
        timeout_seconds=5,
    )


def _archive(server: S3Server, prefix: str, storage_class: str = "DEEP_ARCHIVE") -> ArchiveStorage:
    return ArchiveStorage(
        bucket=COLD_TEST_BUCKET,
        storage_class=storage_class,
        endpoint_url=server.url,
        access_key=server.access_key,
        secret_key=server.secret_key,
        prefix=prefix,
        timeout_seconds=5,
    )


@pytest.fixture(params=["local", "minio", "archive"])
def backend(
    request: pytest.FixtureRequest, tmp_path: Path, seaweedfs: S3Server, moto_s3: S3Server
) -> Storage:
    prefix = f"b{uuid.uuid4().hex[:10]}"
    if request.param == "local":
        return LocalStorage(tmp_path / "tier", Tier.WARM)
    if request.param == "minio":
        return _minio(seaweedfs, prefix)
    return _archive(moto_s3, prefix)


def _key(n: int = 0) -> tuple[str, bytes, str]:
    body = (f"DICM-ish body {n} " * 500).encode()
    sha = hashlib.sha256(body).hexdigest()
    return instance_key("1.2.3", "1.2.3.4", f"1.2.3.4.{n + 5}", sha), body, sha


def _readable(store: Storage, key: str) -> None:
    if store.needs_restore:
        with pytest.raises(ArchivedError) as caught:
            store.open(key)
        assert not caught.value.restoring
        assert store.restore_state(key) is RestoreState.ARCHIVED
        assert store.restore(key, 1) is RestoreState.ONLINE  # moto restores at once
    assert store.restore_state(key) is RestoreState.ONLINE


def test_write_open_stat_keys_delete(backend: Storage) -> None:
    key, body, sha = _key()
    other, other_body, other_sha = _key(1)
    backend.write(key, io.BytesIO(body), len(body), sha)
    backend.write(other, io.BytesIO(other_body), len(other_body), other_sha)
    assert backend.exists(key) and backend.stat(key) == len(body)
    assert sorted(backend.keys()) == sorted([key, other])
    assert sorted(backend.keys("1.2.3/")) == sorted([key, other])
    assert list(backend.keys("9.9/")) == []
    _readable(backend, key)
    with backend.open(key) as stream:
        assert stream.seekable()
        stream.seek(len(body) - 10)
        assert stream.read() == body[-10:]
        stream.seek(0)
        assert stream.read() == body
    backend.delete(key)
    backend.delete(key)  # deleting what is gone is not an error
    assert not backend.exists(key)
    with pytest.raises(NotFoundError):
        backend.open(key)
    with pytest.raises(NotFoundError):
        backend.stat(key)
    assert list(backend.keys()) == [other]


def test_a_source_that_does_not_match_its_checksum_leaves_nothing(backend: Storage) -> None:
    key, body, sha = _key()
    corrupted = body[:-1] + b"!"
    with pytest.raises(ChecksumMismatchError):
        backend.write(key, io.BytesIO(corrupted), len(corrupted), sha)
    with pytest.raises(ChecksumMismatchError):
        backend.write(key, io.BytesIO(body[:-5]), len(body), sha)  # truncated source
    assert not backend.exists(key)
    assert list(backend.keys()) == []


@pytest.mark.parametrize("key", ["../x.dcm", "/abs.dcm", "a//b.dcm", "a/./b.dcm", ""])
def test_unsafe_keys_are_refused(backend: Storage, key: str) -> None:
    with pytest.raises(StorageError):
        backend.open(key)


def test_large_objects_spool_to_disk_and_multipart_is_verified(
    seaweedfs: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    import vannah_pipelines.storage.s3 as s3

    monkeypatch.setattr(s3, "PART_BYTES", 5 << 20)  # S3's smallest part: multipart from 5 MiB
    store = _minio(seaweedfs, f"big{uuid.uuid4().hex[:8]}")
    store.spool_memory = 1 << 20
    body = hashlib.sha256(b"seed").digest() * (12 << 20 >> 5)  # 12 MiB
    sha = hashlib.sha256(body).hexdigest()
    key = instance_key("1.2", "1.2.3", "1.2.3.4", sha)
    store.write(key, io.BytesIO(body), len(body), sha)
    with store.open(key) as stream:
        assert getattr(stream, "_rolled", True)  # past 1 MiB: a temporary file, not memory
        assert hashlib.sha256(stream.read()).hexdigest() == sha


def test_a_stopped_server_is_a_storage_error_not_a_hang() -> None:
    with seaweedfs_server(buckets=(S3_TEST_BUCKET,)) as server:
        store = _minio(server, "gone")
        key, body, sha = _key()
        store.write(key, io.BytesIO(body), len(body), sha)
    with pytest.raises(StorageUnavailableError) as caught:
        store.open(key)
    assert "unreachable" in str(caught.value)


def test_refused_credentials_are_an_error_but_not_an_outage(seaweedfs: S3Server) -> None:
    wrong = S3Server(seaweedfs.host, seaweedfs.port, seaweedfs.access_key, "not-the-secret")
    key, body, sha = _key()
    with pytest.raises(StorageError) as caught:
        _minio(wrong, "refused").write(key, io.BytesIO(body), len(body), sha)
    assert not isinstance(caught.value, StorageUnavailableError)  # DICOMweb: 500, not 503
    assert "SignatureDoesNotMatch" in str(caught.value) or "AccessDenied" in str(caught.value)


# ------------------------------------------------------------------ tiers and fallback


@dataclass(frozen=True)
class Row:
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    tier: str
    storage_key: str
    checksum: str


@pytest.fixture
def tiers(tmp_path: Path, object_tiers: dict[str, object]) -> Iterator[StorageTiers]:
    settings = Settings(data_dir=tmp_path / "data", **object_tiers)  # type: ignore[arg-type]
    for tier in (Tier.WARM, Tier.COLD):
        backend = StorageTiers(settings)[tier]
        assert not isinstance(backend, LocalStorage)
    yield StorageTiers(settings)


def _row(tier: Tier, n: int = 0) -> tuple[Row, bytes, str]:
    key, body, sha = _key(n)
    return Row("1.2.3", "1.2.3.4", f"1.2.3.4.{n + 5}", tier.value, key, sha), body, sha


def test_a_read_falls_back_to_the_tier_that_holds_the_object(tiers: StorageTiers) -> None:
    row, body, sha = _row(Tier.HOT)  # the catalog says hot; a move has finished since
    tiers[Tier.WARM].write(row.storage_key, io.BytesIO(body), len(body), sha)
    stream, where = tiers.locate_and_open(row)
    with stream:
        assert stream.read() == body
    assert (where.tier, where.fallback) == ("warm", True)
    tiers[Tier.HOT].write(row.storage_key, io.BytesIO(body), len(body), sha)
    stream, where = tiers.locate_and_open(row)
    stream.close()
    assert (where.tier, where.fallback) == ("hot", False)


def test_an_instance_only_in_the_archive_files_one_restore_request(tiers: StorageTiers) -> None:
    row, body, sha = _row(Tier.COLD)
    tiers[Tier.COLD].write(row.storage_key, io.BytesIO(body), len(body), sha)
    assert tiers.availability("cold") == "NEARLINE"
    assert tiers.availability("warm") == "ONLINE"
    for _ in range(2):
        with pytest.raises(RestoreRequiredError) as caught:
            tiers.open_instance(row)
        assert caught.value.study_uid == "1.2.3"
        assert caught.value.retry_after_seconds == 12 * 3600
    requests = pending_requests(tiers.settings)
    assert [(r.study_uid, r.reason) for r in requests] == [("1.2.3", "read")]


def test_an_instance_in_no_tier_is_not_found(tiers: StorageTiers) -> None:
    row, _, _ = _row(Tier.WARM, 3)
    with pytest.raises(NotFoundError):
        tiers.open_instance(row)
    assert pending_requests(tiers.settings) == []


# ------------------------------------------------------------------ read-ahead


class _Tracked(io.BytesIO):
    closed_count = 0

    def close(self) -> None:
        if not self.closed:
            type(self).closed_count += 1
        super().close()


def test_read_ahead_opens_the_next_objects_and_keeps_order_and_errors() -> None:
    import threading

    from vannah_pipelines.storage.tiers import ReadAhead

    opened: list[int] = []
    lock = threading.Lock()

    def opener(n: int) -> Callable[[], BinaryIO]:
        def open_n() -> BinaryIO:
            with lock:
                opened.append(n)
            if n == 3:
                raise NotFoundError(f"object {n}")
            return _Tracked(str(n).encode())

        return open_n

    ahead = ReadAhead([opener(n) for n in range(10)], ahead=2)
    with ahead.opener(0)() as first:
        assert first.read() == b"0"
    with ahead.opener(1)() as second:
        assert second.read() == b"1"
    assert set(opened) >= {0, 1, 2}  # 2 was asked for ahead of its turn
    with pytest.raises(NotFoundError, match="object 3"):
        ahead.opener(3)()  # the opener's error, when its object is asked for
    with ahead.opener(4)() as fourth:
        assert fourth.read() == b"4"
    # Abandoned half way: what was opened ahead and never asked for is closed.
    import time

    deadline = time.monotonic() + 5
    while not {5, 6} <= set(opened) and time.monotonic() < deadline:
        time.sleep(0.01)  # started (a read not started yet is cancelled: nothing to close)
    _Tracked.closed_count = 0
    ahead.close()
    while _Tracked.closed_count < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    assert _Tracked.closed_count == 3  # 2 (skipped), 5 and 6 (opened ahead of 4)
    assert ahead.opener(9)().read() == b"9"  # closed: later objects open on demand
    assert opened.count(9) == 1


def _rss_peak_reset() -> int:
    """Reset this process's peak RSS (VmHWM) to its current RSS; returns it in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmHWM")


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(key)


def test_a_large_object_costs_one_part_to_upload_and_a_chunk_to_read(
    seaweedfs: S3Server, tmp_path: Path
) -> None:
    """The process's peak RSS while a 64 MiB object is uploaded (multipart, read back) and
    read: the SDK's copies of one upload part (16 MiB) more, never the object's size."""
    from vannah_pipelines.storage import s3

    size = 64 << 20
    source = tmp_path / "big.bin"
    digest = hashlib.sha256()
    with source.open("wb") as out:
        for n in range(size >> 20):
            chunk = hashlib.sha256(str(n).encode()).digest() * (1 << 15)  # 1 MiB
            out.write(chunk)
            digest.update(chunk)
    sha = digest.hexdigest()
    key = instance_key("1.2", "1.2.3", "1.2.3.9", sha)
    store = _minio(seaweedfs, f"rss{uuid.uuid4().hex[:8]}")
    base = _rss_peak_reset()
    with source.open("rb") as stream:
        store.write(key, stream, size, sha)
    upload_growth = _status("VmHWM") - base
    base = _rss_peak_reset()
    with store.open(key) as stream:
        assert sha256_of(stream, size) == sha
    read_growth = _status("VmHWM") - base
    print(f"peak RSS growth: upload {upload_growth >> 20} MiB, read {read_growth >> 20} MiB")
    # The SDK reads a part and joins it (two copies); the default three parts in flight, or
    # 32 MiB parts, cost 64 MiB and more.
    assert upload_growth < 2 * s3.PART_BYTES + (12 << 20)
    assert read_growth < store.spool_memory + (12 << 20)
