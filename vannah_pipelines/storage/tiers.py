"""The storage tiers of a deployment, and the one way every service reads an instance.

:class:`StorageTiers` builds each tier's backend from the settings on first use (a local
folder by default; the ``minio`` SDK or boto3 only when a tier is configured for them, so
a process that never reads the warm or cold tier never imports them).
:meth:`StorageTiers.open_instance` takes the catalog's location of an instance (tier,
storage key, checksum, UIDs) and returns a seekable stream, whatever the tier: a landed
instance wherever its file is now, then the catalog's tier, then every other tier that
holds the object (a move may have finished since the catalog was read). An instance found
only in an archived tier files a restore request (see :mod:`vannah_pipelines.storage.restore`)
and raises :class:`RestoreRequiredError`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, Protocol

from vannah_pipelines.errors import ArchivedError, NotFoundError, StorageError
from vannah_pipelines.storage.base import RestoreState, Storage, Tier
from vannah_pipelines.storage.local import LocalStorage

if TYPE_CHECKING:
    from vannah_pipelines.settings import Settings

log = logging.getLogger(__name__)

LANDING_TIER = "landing"  # vannah_pipelines.catalog.landed.LANDING_TIER (not imported: heavy)
TIER_ORDER: tuple[Tier, ...] = (Tier.HOT, Tier.WARM, Tier.COLD)


class Located(Protocol):
    """What the catalog says of one instance (``catalog.lookup.StoredInstance`` has it)."""

    @property
    def study_instance_uid(self) -> str: ...
    @property
    def series_instance_uid(self) -> str: ...
    @property
    def sop_instance_uid(self) -> str: ...
    @property
    def tier(self) -> str: ...
    @property
    def storage_key(self) -> str: ...
    @property
    def checksum(self) -> str: ...


class RestoreRequiredError(ArchivedError):
    """The instance is only in an archived tier; a restore of its study was requested."""

    def __init__(self, message: str, *, study_uid: str, retry_after_seconds: int) -> None:
        super().__init__(message, restoring=True)
        self.study_uid = study_uid
        self.retry_after_seconds = retry_after_seconds


@dataclass(frozen=True)
class OpenedFrom:
    """Where a read found an instance (for logs and tests)."""

    tier: str
    fallback: bool


class StorageTiers:
    """Each tier's backend, built from `settings` on first use, shared by threads."""

    def __init__(self, settings: Settings, backends: dict[Tier, Storage] | None = None) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._backends: dict[Tier, Storage] = dict(backends or {})

    def __getitem__(self, tier: Tier | str) -> Storage:
        wanted = Tier(tier)
        with self._lock:
            backend = self._backends.get(wanted)
            if backend is None:
                backend = self._backends[wanted] = build_backend(self.settings, wanted)
            return backend

    @property
    def hot(self) -> Storage:
        return self[Tier.HOT]

    def open(self, tier: Tier | str, key: str) -> BinaryIO:
        """The object `key` of `tier` (no fallback)."""
        return self[tier].open(key)

    def open_instance(self, instance: Located) -> BinaryIO:
        """A seekable stream of `instance`'s bytes, whatever tier holds them now.

        Raises NotFoundError when no tier has them, RestoreRequiredError (a restore is
        filed) when only an archived tier does, StorageError when a tier that might hold
        them could not be read (a server down) and no other had them.
        """
        return self.locate_and_open(instance)[0]

    def locate_and_open(self, instance: Located) -> tuple[BinaryIO, OpenedFrom]:
        """:meth:`open_instance`, also saying which tier answered."""
        tier = instance.tier
        if tier == LANDING_TIER:
            from vannah_pipelines.catalog.landed import open_landed  # only readers need it

            stream = open_landed(
                self.settings.landing_dir,
                self.hot,
                instance.storage_key,
                instance.checksum,
                instance.study_instance_uid,
                instance.series_instance_uid,
                instance.sop_instance_uid,
            )
            return stream, OpenedFrom(LANDING_TIER, False)
        try:
            first = Tier(tier)
        except ValueError:
            raise StorageError(f"unknown tier {tier[:40]!r} in the catalog") from None
        order = [first, *(t for t in TIER_ORDER if t != first)]
        archived: ArchivedError | None = None
        failed: StorageError | None = None
        for candidate in order:
            try:
                stream = self[candidate].open(instance.storage_key)
            except NotFoundError:
                continue
            except ArchivedError as exc:
                archived = exc
                continue
            except StorageError as exc:
                log.warning("%s tier unreadable for %s: %s", candidate, instance.storage_key, exc)
                failed = exc
                continue
            if candidate != first:
                log.info(
                    "%s found in the %s tier (catalog: %s)", instance.storage_key, candidate, first
                )
            return stream, OpenedFrom(candidate.value, candidate != first)
        if archived is not None:
            from vannah_pipelines.storage.restore import request_restore

            request_restore(self.settings, instance.study_instance_uid, reason="read")
            hours = self.settings.cold_restore_expected_hours
            raise RestoreRequiredError(
                f"study {instance.study_instance_uid} is in the cold tier: a restore was "
                f"requested (expected within {hours:g} h)",
                study_uid=instance.study_instance_uid,
                retry_after_seconds=max(1, int(hours * 3600)),
            ) from archived
        if failed is not None:
            raise failed
        raise NotFoundError(f"{instance.storage_key!r} is in no storage tier")

    def availability(self, tier: str) -> str:
        """PS3.18 InstanceAvailability of an instance whose catalog tier is `tier`:
        ONLINE, or NEARLINE in a tier that needs a restore before it is read."""
        if tier in (Tier.COLD.value,) and self[Tier.COLD].needs_restore:
            return "NEARLINE"
        return "ONLINE"

    def is_remote(self, tier: str) -> bool:
        """Whether reads of `tier` go over the network (worth reading ahead)."""
        try:
            return not isinstance(self[tier], LocalStorage)
        except ValueError:
            return False  # the landing zone: local files

    def states(self, tier: Tier | str, keys: list[str]) -> Iterator[tuple[str, RestoreState]]:
        """The restore state of each of `keys` in `tier`."""
        backend = self[tier]
        for key in keys:
            yield key, backend.restore_state(key)


# Reads of object storage run ahead of the consumer on this pool (shared by every request
# of the process): a study streamed from the warm tier waits for one round trip at a time
# per READ_AHEAD instances rather than for each.
READ_AHEAD = 4
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _read_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="vannah-read-ahead")
        return _pool


class ReadAhead:
    """Openers of a sequence of objects, each one opening the next `ahead` in the
    background: call them in order (as a multipart answer or a C-MOVE does); one called
    out of order simply opens its object. :meth:`close` (always: an answer may stop half
    way) cancels what was not started and closes what was opened but never asked for.
    Errors are those of the opener, raised when that object is asked for."""

    def __init__(self, openers: Sequence[Callable[[], BinaryIO]], ahead: int = READ_AHEAD) -> None:
        self._openers = list(openers)
        self._ahead = ahead
        self._futures: dict[int, Future[BinaryIO]] = {}
        self._lock = threading.Lock()
        self._closed = False

    def __len__(self) -> int:
        return len(self._openers)

    def opener(self, index: int) -> Callable[[], BinaryIO]:
        return lambda: self._open(index)

    def _open(self, index: int) -> BinaryIO:
        with self._lock:
            if not self._closed:
                pool = _read_pool()
                for later in range(index + 1, min(index + 1 + self._ahead, len(self._openers))):
                    if later not in self._futures:
                        self._futures[later] = pool.submit(self._openers[later])
            future = self._futures.pop(index, None)
        return future.result() if future is not None else self._openers[index]()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            futures, self._futures = list(self._futures.values()), {}
        for future in futures:
            if not future.cancel():
                future.add_done_callback(_close_result)


def _close_result(future: Future[BinaryIO]) -> None:
    if future.exception() is None:
        with contextlib.suppress(OSError):
            future.result().close()


def tier_facts(settings: Settings) -> list[dict[str, object]]:
    """What each tier is and how long a restore from it is expected to take, as the
    catalog's ``storage_tiers`` view shows them (written by each lifecycle run)."""
    cold_archive = settings.cold_storage != "local"
    return [
        {"tier": "hot", "backend": "local", "storage_class": None, "restore_hours": 0.0},
        {
            "tier": "warm",
            "backend": settings.warm_storage,
            "storage_class": None,
            "restore_hours": 0.0,
        },
        {
            "tier": "cold",
            "backend": settings.cold_storage,
            "storage_class": settings.cold_storage_class if cold_archive else None,
            "restore_hours": settings.cold_restore_expected_hours if cold_archive else 0.0,
        },
    ]


def build_backend(settings: Settings, tier: Tier) -> Storage:
    """The backend of `tier` as `settings` configure it."""
    spool = settings.storage_spool_memory_mb << 20
    if tier is Tier.HOT:
        return LocalStorage(settings.hot_dir, Tier.HOT)
    if tier is Tier.WARM:
        if settings.warm_storage == "local":
            return LocalStorage(settings.warm_dir, Tier.WARM)
        if not settings.warm_s3_endpoint:
            raise StorageError("warm_storage is s3 but warm_s3_endpoint is not set")
        from vannah_pipelines.storage.s3 import MinioStorage  # only tiers that use it

        return MinioStorage(
            endpoint=settings.warm_s3_endpoint,
            bucket=settings.warm_s3_bucket,
            access_key=settings.warm_s3_access_key,
            secret_key=settings.warm_s3_secret_key.get_secret_value(),
            secure=settings.warm_s3_secure,
            region=settings.warm_s3_region or None,
            prefix=settings.warm_s3_prefix,
            timeout_seconds=settings.storage_timeout_seconds,
            spool_memory=spool,
        )
    if settings.cold_storage == "local":
        return LocalStorage(settings.cold_dir, Tier.COLD)
    from vannah_pipelines.storage.archive import ArchiveStorage  # only tiers that use it

    return ArchiveStorage(
        bucket=settings.cold_s3_bucket,
        storage_class=settings.cold_storage_class,
        endpoint_url=settings.cold_s3_endpoint_url or None,
        access_key=settings.cold_s3_access_key,
        secret_key=settings.cold_s3_secret_key.get_secret_value(),
        region=settings.cold_s3_region,
        prefix=settings.cold_s3_prefix,
        restore_tier=settings.cold_restore_tier,
        timeout_seconds=settings.storage_timeout_seconds,
        spool_memory=spool,
    )
