"""Bring a study back from the cold tier: archive restore, verified copy into the hot tier,
one location append, a hold; and the plan of restore runs the Dagster sensor follows.

:func:`restore_study` is what the restore job and ``vannah restore`` run. For each instance
of the study the catalog places in the cold tier it asks the archive for a readable copy
(``restore(key, restore_cache_days)``); an instance the archive has made available is copied
into the hot tier under the same key, verified against the catalog's SHA-256. The study is
then held hot for ``restore_cache_days``, the copied instances are recorded hot with one
``instance_locations`` append, and the restore request is removed once no instance is left
in the cold tier. The cold objects stay where they are: when the hold ends, the lifecycle
deletes the hot copy instead of uploading it again. Instances the archive is still
restoring are left for a later run (production archives take hours).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING

from vannah_pipelines.catalog.changes import INSTANCE_LOCATIONS, ChangeAppend
from vannah_pipelines.catalog.lookup import StoredInstance, find_instances
from vannah_pipelines.errors import (
    ArchivedError,
    CatalogError,
    ChecksumMismatchError,
    NotFoundError,
    StorageError,
)
from vannah_pipelines.storage.base import RestoreState, Tier, sha256_of
from vannah_pipelines.storage.holds import hold_study
from vannah_pipelines.storage.restore import RestoreRequest, complete_request, pending_requests
from vannah_pipelines.storage.tiers import StorageTiers

if TYPE_CHECKING:
    from vannah_pipelines.catalog.reader import CatalogReader
    from vannah_pipelines.settings import Settings

log = logging.getLogger(__name__)

PRIOR_REASON = "prior"  # restore requests filed by the priors prefetch


class UnknownStudyError(CatalogError):
    """The catalog has no instance of the study asked for."""


class InstanceState(StrEnum):
    """What a restore run found or did for one instance."""

    ONLINE = "online"  # not in the cold tier (hot, or warm): readable, nothing to do
    RESTORED = "restored"  # copied from the archive into the hot tier by this run
    RESTORING = "restoring"  # the archive is making a readable copy (hours in production)
    FAILED = "failed"  # not copied: see the detail (checksum mismatch, object missing)
    SKIPPED = "skipped"  # not tried: the archive failed on an earlier instance


class StudyState(StrEnum):
    """Where a study stands after a restore run."""

    ONLINE = "online"  # no instance left in the cold tier: the request is complete
    RESTORING = "restoring"  # waiting for the archive
    FAILED = "failed"  # an instance could not be copied, or the archive could not be reached


@dataclass(frozen=True)
class InstanceRestore:
    """One instance's outcome (identifiers only)."""

    sop_instance_uid: str
    storage_key: str
    state: InstanceState
    size_bytes: int = 0
    detail: str = ""
    mismatch: bool = False  # the archive's copy did not hash to the catalog's SHA-256


@dataclass
class StudyRestore:
    """What one restore run did for a study: the figures the CLI and Dagster show."""

    study_uid: str
    instances: list[InstanceRestore] = field(default_factory=list)
    error: str | None = None  # the archive could not be reached: the run stopped early
    hot_until: datetime | None = None
    change: ChangeAppend | None = None
    requested_at: datetime | None = None  # of the request this run completed, if any

    def count(self, state: InstanceState) -> int:
        return sum(1 for i in self.instances if i.state is state)

    @property
    def restored(self) -> int:
        return self.count(InstanceState.RESTORED)

    @property
    def pending(self) -> int:
        """Instances still in the cold tier and not failed: restoring, or not tried."""
        return self.count(InstanceState.RESTORING) + self.count(InstanceState.SKIPPED)

    @property
    def failed(self) -> int:
        return self.count(InstanceState.FAILED)

    @property
    def bytes_restored(self) -> int:
        return sum(i.size_bytes for i in self.instances if i.state is InstanceState.RESTORED)

    @property
    def state(self) -> StudyState:
        if self.error is not None or self.failed:
            return StudyState.FAILED
        return StudyState.RESTORING if self.pending else StudyState.ONLINE

    def describe(self) -> str:
        text = (
            f"study {self.study_uid}: {self.state}; {len(self.instances)} instances, "
            f"{self.restored} restored ({self.bytes_restored} bytes), {self.pending} pending, "
            f"{self.failed} failed"
        )
        return f"{text}; archive: {self.error}" if self.error else text


def restore_study(
    settings: Settings,
    catalog: CatalogReader,
    study_uid: str,
    *,
    progress: Callable[[InstanceRestore], None] | None = None,
    tiers: StorageTiers | None = None,
    now: datetime | None = None,
    changed_by: str = "restore",
) -> StudyRestore:
    """Restore the cold instances of `study_uid` into the hot tier, as far as the archive
    allows now.

    Parameters
    ----------
    settings
        The deployment's settings (tiers, ``restore_cache_days``, the spool, the lake).
    catalog
        Where the study's instances are (their tier, key, size and SHA-256).
    study_uid
        The study to restore.
    progress
        Called with each instance's outcome as it is known.
    tiers
        The storage tiers (default: built from `settings`).
    now
        The current time (the hold lasts ``restore_cache_days`` from it).
    changed_by
        Recorded with the location change (``cli:<user>``, ``dagster:<run id>``).

    Returns
    -------
    StudyRestore
        Each instance's outcome; ``state`` is ``online`` once no instance is left in the cold
        tier (the request is then removed), ``restoring`` while the archive is working,
        ``failed`` when a copy did not verify or the archive could not be reached (the
        request stays; what was copied is recorded).

    Raises
    ------
    UnknownStudyError
        The catalog has no instance of `study_uid`.
    UnsafeUidError
        `study_uid` is not a UID.
    """
    tiers = tiers or StorageTiers(settings)
    now = now or datetime.now(UTC)
    found = find_instances(catalog, study_uid)
    if not found:
        raise UnknownStudyError(f"no study {study_uid} in the catalog")
    result = StudyRestore(study_uid)
    copied: list[StoredInstance] = []
    for instance in found:
        if instance.tier != Tier.COLD.value:
            outcome = InstanceRestore(
                instance.sop_instance_uid,
                instance.storage_key,
                InstanceState.ONLINE,
                detail=f"{instance.tier} tier",
            )
        elif result.error is not None:
            outcome = InstanceRestore(
                instance.sop_instance_uid, instance.storage_key, InstanceState.SKIPPED
            )
        else:
            try:
                outcome = _restore_instance(settings, tiers, instance)
            except StorageError as exc:  # the archive (or the hot tier) is not answering
                result.error = str(exc)
                log.warning("restore of study %s stopped: %s", study_uid, exc)
                outcome = InstanceRestore(
                    instance.sop_instance_uid,
                    instance.storage_key,
                    InstanceState.SKIPPED,
                    detail=str(exc),
                )
            if outcome.state is InstanceState.RESTORED:
                copied.append(instance)
        result.instances.append(outcome)
        if progress is not None:
            progress(outcome)
    if copied:
        # Held before the location says hot: the lifecycle never sees it hot and unheld.
        hot_until = now + timedelta(days=settings.restore_cache_days)
        result.hot_until = hold_study(
            settings, study_uid, hot_until, reason="restored from the cold tier"
        ).hot_until
        result.change = record_hot(settings, copied, changed_by=changed_by)
    if result.state is StudyState.ONLINE:
        request = _request_of(settings, study_uid)
        result.requested_at = request.requested_at if request is not None else None
        complete_request(settings, study_uid)
    log.info("%s", result.describe())
    return result


def _restore_instance(
    settings: Settings, tiers: StorageTiers, instance: StoredInstance
) -> InstanceRestore:
    """Ask the archive for one instance and copy it hot if it is readable. A per-object
    problem (missing, mismatching bytes) is a FAILED outcome; StorageError means the
    archive or the hot tier itself failed."""
    sop, key = instance.sop_instance_uid, instance.storage_key
    hot, cold = tiers[Tier.HOT], tiers[Tier.COLD]
    if _hot_copy_verified(tiers, instance):  # a run that stopped before its append
        return InstanceRestore(
            sop, key, InstanceState.RESTORED, instance.size_bytes, detail="hot copy found"
        )
    try:
        state = cold.restore(key, settings.restore_cache_days)
    except NotFoundError:
        return InstanceRestore(sop, key, InstanceState.FAILED, detail="not in the cold tier")
    if state is not RestoreState.ONLINE:
        return InstanceRestore(sop, key, InstanceState.RESTORING, detail=state.value)
    try:
        stream = cold.open(key)
    except ArchivedError:  # the restored copy expired between the two calls
        return InstanceRestore(sop, key, InstanceState.RESTORING, detail="archived")
    except NotFoundError:
        return InstanceRestore(sop, key, InstanceState.FAILED, detail="not in the cold tier")
    try:
        with stream:
            hot.write(key, stream, instance.size_bytes, instance.checksum)
    except ChecksumMismatchError as exc:
        log.warning("restored copy of %s does not match the catalog: %s", sop, exc)
        return InstanceRestore(
            sop, key, InstanceState.FAILED, detail=f"checksum: {exc}", mismatch=True
        )
    return InstanceRestore(sop, key, InstanceState.RESTORED, instance.size_bytes)


def _hot_copy_verified(tiers: StorageTiers, instance: StoredInstance) -> bool:
    hot = tiers[Tier.HOT]
    if not hot.exists(instance.storage_key):
        return False
    with hot.open(instance.storage_key) as stream:
        try:
            return sha256_of(stream, instance.size_bytes) == instance.checksum.lower()
        except ChecksumMismatchError:
            return False


def record_hot(
    settings: Settings, instances: Iterable[StoredInstance], *, changed_by: str
) -> ChangeAppend:
    """Record `instances` in the hot tier: one ``instance_locations`` append (and the same
    change in the DuckLake when one is configured)."""
    from vannah_pipelines.catalog.lake import record_change

    rows = [
        {
            "sop_instance_uid": i.sop_instance_uid,
            "checksum": i.checksum,
            "tier": Tier.HOT.value,
            "storage_key": i.storage_key,
        }
        for i in instances
    ]
    return record_change(settings, INSTANCE_LOCATIONS, rows, changed_by=changed_by)


def _request_of(settings: Settings, study_uid: str) -> RestoreRequest | None:
    return next((r for r in pending_requests(settings) if r.study_uid == study_uid), None)


# ------------------------------------------------------------------- the spool, planned


@dataclass(frozen=True)
class RestoreBacklog:
    """The restore spool at a glance (counts and ages only)."""

    requests: int
    priors: int  # of which filed by the priors prefetch
    oldest_age_s: float

    def describe(self) -> str:
        if not self.requests:
            return "no restore request pending"
        return (
            f"{self.requests} restore requests pending ({self.priors} priors), oldest "
            f"{self.oldest_age_s / 3600:.1f} h"
        )


def restore_backlog(requests: list[RestoreRequest], now: datetime) -> RestoreBacklog:
    """Summarise `requests` (:func:`pending_requests`) at `now`."""
    oldest = min((r.requested_at for r in requests), default=now)
    return RestoreBacklog(
        requests=len(requests),
        priors=sum(1 for r in requests if r.reason == PRIOR_REASON),
        oldest_age_s=max(0.0, (now - oldest).total_seconds()),
    )


@dataclass(frozen=True)
class Attempt:
    """The sensor's memory of one request: how many runs it asked for, the last when."""

    number: int
    at: float  # epoch seconds


@dataclass(frozen=True)
class RestoreRun:
    """A run the sensor requests: one study, its run key (unique per request and attempt)."""

    study_uid: str
    run_key: str
    attempt: int
    reason: str


@dataclass
class RestorePlan:
    runs: list[RestoreRun]
    state: dict[str, Attempt]
    running: int = 0  # requests whose run is under way
    waiting: int = 0  # requests run before, run again later (the archive may be restoring)
    deferred: int = 0  # due, but over this tick's limit

    def describe(self) -> str:
        return (
            f"{len(self.runs)} runs requested, {self.running} running, {self.waiting} run "
            f"before (re-checked later), {self.deferred} deferred"
        )


def recheck_seconds(settings: Settings) -> float:
    """How long the sensor waits before running a request again: a twelfth of the expected
    restore time, between one minute and one hour."""
    return min(3600.0, max(60.0, settings.cold_restore_expected_hours * 3600 / 12))


def plan_restore_runs(
    requests: list[RestoreRequest],
    state: Mapping[str, Attempt],
    running: set[str],
    *,
    now: float,
    recheck_after: float,
    max_runs: int,
) -> RestorePlan:
    """Which pending requests get a restore run now.

    A request never run gets one at once; a request whose last run ended (the archive still
    restoring, or unreachable) gets another once `recheck_after` seconds have passed since
    it was requested; a study whose run is under way (in `running`) gets none. Reads come
    before prefetched priors, older before newer, at most `max_runs` per call. The state
    kept is that of the pending requests only.

    >>> from pathlib import Path
    >>> r = RestoreRequest("1.2.3", datetime(2026, 1, 1, tzinfo=UTC), "read", Path("x"))
    >>> plan = plan_restore_runs([r], {}, set(), now=0.0, recheck_after=60, max_runs=5)
    >>> [run.run_key for run in plan.runs]
    ['restore-1.2.3-20260101T000000000000-1']
    >>> again = plan_restore_runs([r], plan.state, set(), now=30.0, recheck_after=60, max_runs=5)
    >>> again.runs, again.waiting
    ([], 1)
    """
    ordered = sorted(requests, key=lambda r: (r.reason == PRIOR_REASON, r.requested_at))
    plan = RestorePlan(runs=[], state={})
    for request in ordered:
        uid = request.study_uid
        last = state.get(uid)
        if last is not None:
            plan.state[uid] = last
        if uid in running:
            plan.running += 1
            continue
        if last is not None and now - last.at < recheck_after:
            plan.waiting += 1
            continue
        if len(plan.runs) >= max_runs:
            plan.deferred += 1
            continue
        attempt = (last.number if last is not None else 0) + 1
        stamp = request.requested_at.astimezone(UTC).strftime("%Y%m%dT%H%M%S%f")
        plan.runs.append(
            RestoreRun(uid, f"restore-{uid}-{stamp}-{attempt}", attempt, request.reason)
        )
        plan.state[uid] = Attempt(attempt, now)
    return plan


def load_attempts(cursor: str | None) -> dict[str, Attempt]:
    """The sensor's state from its cursor (an unreadable cursor starts afresh)."""
    if not cursor:
        return {}
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        raw = json.loads(cursor).get("attempts", {})
        return {str(k): Attempt(int(v[0]), float(v[1])) for k, v in raw.items()}
    return {}


def load_pending(cursor: str | None) -> int | None:
    """The spool size the cursor last saw (None: unknown)."""
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        return int(json.loads(cursor or "").get("pending"))
    return None


def dump_attempts(state: Mapping[str, Attempt], pending: int) -> str:
    """The sensor's cursor: each pending request's attempts, and the spool size."""
    return json.dumps(
        {"attempts": {k: [a.number, a.at] for k, a in sorted(state.items())}, "pending": pending},
        separators=(",", ":"),
    )
