"""The storage lifecycle: the tier a study belongs in as of a date, and the move that takes
it there (copy verified, one catalog append, a grace period, a re-check, then delete).

Framework-free: ``vannah tier`` (:mod:`vannah_pipelines.storage.tier_cli`) and the
``storage_tiering`` Dagster asset both call :func:`run_lifecycle`.

A move never leaves an instance unreadable: the source object is deleted only once its
copy is verified in the target tier, the catalog records the target, the grace period has
passed and a fresh catalog read shows no current row using the source object. A study
being moved has a small *pending* file (``<catalog>/tiering/<study uid>.json``) until its
sources are gone, so a run killed at any step is completed by the next one: copies already
in the target tier are reused (same key, same size; cold objects cannot be read back),
versions already recorded there are skipped, and left-over sources are deleted.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from vannah_pipelines.catalog.changes import INSTANCE_LOCATIONS, append_change
from vannah_pipelines.catalog.writer import CatalogWriter
from vannah_pipelines.dicom.uids import require_uid
from vannah_pipelines.errors import (
    ChecksumMismatchError,
    NotFoundError,
    StorageError,
    VannahError,
)
from vannah_pipelines.storage.base import Storage, Tier
from vannah_pipelines.storage.holds import active_holds
from vannah_pipelines.storage.local import LocalStorage
from vannah_pipelines.storage.records import StudyRecords
from vannah_pipelines.storage.tiers import TIER_ORDER, StorageTiers, tier_facts

if TYPE_CHECKING:
    from vannah_pipelines.catalog.lake import LakeConfig
    from vannah_pipelines.catalog.reader import CatalogReader
    from vannah_pipelines.settings import Settings

log = logging.getLogger(__name__)

RANK: dict[str, int] = {t.value: i for i, t in enumerate(TIER_ORDER)}
PENDING_DIR = "tiering"
# Instances of a study copied at once: object storage round trips overlap (the backends'
# clients are thread-safe; each copy holds at most one spooled object).
COPY_WORKERS = 8
_DAY = timedelta(days=1)

# A step of a move, reported to the `hook` of run_lifecycle (tests stop a run there).
COPIED = "copied"  # every instance of the study is in the target tier, not recorded yet
RECORDED = "recorded"  # the catalog append is written
RELEASED = "released"  # the source objects are deleted


@dataclass(frozen=True)
class Policy:
    """Ages (days) after which a study leaves the hot tier (`hot_days`) and reaches the
    cold tier (`warm_days`), counted from its last received instance or its StudyDate,
    with per-modality overrides (a study with several modalities takes the longest).

    >>> p = Policy(30, 365, "last_received", {"MG": (90, 3650)})
    >>> at = datetime(2026, 6, 1, tzinfo=UTC)
    >>> [p.target(["CT"], None, at - timedelta(days=d), at).value for d in (29, 30, 400)]
    ['hot', 'warm', 'cold']
    >>> p.target(["CT", "MG"], None, at - timedelta(days=400), at).value
    'warm'
    """

    hot_days: int
    warm_days: int
    age_from: str = "last_received"
    modality_days: Mapping[str, tuple[int, int]] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        return cls(
            settings.tier_hot_days,
            settings.tier_warm_days,
            settings.tier_age_from,
            {
                m.strip().upper(): (d.hot_days, d.warm_days)
                for m, d in settings.tier_modality_days.items()
            },
        )

    def days(self, modalities: Sequence[str]) -> tuple[int, int]:
        """(hot days, days until cold) of a study with `modalities`: the longest of each."""
        default = (self.hot_days, self.warm_days)
        pairs = [self.modality_days.get(m.strip().upper(), default) for m in modalities if m]
        pairs = pairs or [default]
        return max(p[0] for p in pairs), max(p[1] for p in pairs)

    def origin(self, study_date: str | None, last_received: datetime) -> datetime:
        """When a study's age counts from: its StudyDate (``YYYYMMDD``, midnight UTC) when
        the policy says so and the date is valid, else its last received instance."""
        if self.age_from == "study_date" and study_date:
            with contextlib.suppress(ValueError):
                day = datetime.strptime(study_date.strip()[:8], "%Y%m%d").date()
                if len(study_date.strip()) == 8:
                    return datetime(day.year, day.month, day.day, tzinfo=UTC)
        return _aware(last_received)

    def age_days(self, study_date: str | None, last_received: datetime, as_of: datetime) -> int:
        """Whole days from the study's origin to `as_of` (negative: in the future)."""
        return (as_of - self.origin(study_date, last_received)) // _DAY

    def target(
        self,
        modalities: Sequence[str],
        study_date: str | None,
        last_received: datetime,
        as_of: datetime,
    ) -> Tier:
        """The tier a study belongs in as of `as_of`."""
        hot, warm = self.days(modalities)
        age = self.age_days(study_date, last_received, as_of)
        if age >= warm:
            return Tier.COLD
        if age >= hot:
            return Tier.WARM
        return Tier.HOT


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


# ---------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class TierLoad:
    """Instances and bytes (of one study, or summed) in one tier."""

    instances: int = 0
    bytes: int = 0

    def __add__(self, other: TierLoad) -> TierLoad:
        return TierLoad(self.instances + other.instances, self.bytes + other.bytes)


@dataclass(frozen=True)
class StudyMove:
    """What the policy does to one study: its current instances in `sources` (by tier)
    move to `target`. A study with no sources is only *resumed*: a previous run moved it
    and its source objects are still to be deleted."""

    study_uid: str
    target: Tier
    age_days: int
    sources: Mapping[Tier, TierLoad]
    resumed: bool = False

    @property
    def instances(self) -> int:
        return sum(s.instances for s in self.sources.values())

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.sources.values())


def plan(
    catalog: CatalogReader,
    settings: Settings,
    as_of: datetime,
    *,
    study: str | None = None,
    limit: int | None = None,
) -> list[StudyMove]:
    """Every study the policy of `settings` moves as of `as_of` (aware), oldest first, at
    most `limit`: its current instances in a warmer tier than its target. Held studies are
    left out. First come the studies with only source objects left to delete (*resumed*):
    left pending by a killed run, or with a hot copy though they left the hot tier.

    Parameters
    ----------
    catalog
        A catalog reader (its ``studies`` and ``instances`` views).
    settings
        The tier policy (``tier_*``) and the catalog folder (holds, pending moves).
    as_of
        The date the policy is applied at (``--as-of``; tests age studies with it).
    study
        Only this Study Instance UID (validated).
    limit
        At most this many studies (default ``tier_max_studies_per_run``).

    Raises
    ------
    UnsafeUidError
        `study` is not a UID.
    """
    as_of = _aware(as_of)
    policy = Policy.from_settings(settings)
    limit = settings.tier_max_studies_per_run if limit is None else limit
    where, params = "", []
    if study is not None:
        where, params = "WHERE study_instance_uid = ?", [require_uid(study, "StudyInstanceUID")]
    rows = catalog.query(
        "SELECT study_instance_uid, study_date, modalities_in_study, last_received_at, tier "
        f"FROM studies {where}",
        params,
    )
    held = active_holds(settings, as_of)
    hot = LocalStorage(settings.hot_dir, Tier.HOT)  # the hot tier is always a local folder
    strays: list[StudyMove] = []
    targets: dict[str, tuple[Tier, int]] = {}
    for uid, study_date, modalities, last_received, tier in rows:
        if uid in held or last_received is None:
            continue
        mods = (modalities or "").split("\\")
        target = policy.target(mods, study_date, last_received, as_of)
        if target is Tier.HOT:
            continue
        age = policy.age_days(study_date, last_received, as_of)
        if RANK.get(tier, -1) >= RANK[target.value]:
            # Nothing warmer than its target (a 'mixed' study is looked at). A hot copy of
            # a current version recorded elsewhere is a re-send of identical bytes after
            # the move: released (the hot folder is looked at first, one stat).
            if _has_stray(catalog, hot, uid):
                strays.append(StudyMove(uid, Tier(tier), age, {}, resumed=True))
            continue
        targets[uid] = (target, age)
    # The oldest first, at most `limit` of them: the rest wait for the next run.
    oldest = sorted(targets.items(), key=lambda item: (-item[1][1], item[0]))[: max(0, limit)]
    targets = dict(oldest)
    sources = _sources(catalog, targets)
    moves = [
        StudyMove(uid, target, age, sources[uid])
        for uid, (target, age) in targets.items()
        if uid in sources
    ]
    moves.sort(key=lambda m: (-m.age_days, m.study_uid))
    resumed = {m.study_uid: m for m in strays}
    for p in pending_moves(settings):
        if (study is None or p.study_uid == study) and p.study_uid not in sources:
            resumed.setdefault(p.study_uid, StudyMove(p.study_uid, p.target, 0, {}, resumed=True))
    return (list(resumed.values()) + moves)[: max(0, limit)]


def _has_stray(catalog: CatalogReader, hot: LocalStorage, study_uid: str) -> bool:
    """Whether the hot tier holds a current version of the study that the catalog places
    in another tier (a superseded version's object is not a stray: it stays)."""
    keys = list(hot.keys(f"{study_uid}/"))
    if not keys:
        return False
    [(count,)] = catalog.query(
        "SELECT count(*) FROM instances WHERE study_instance_uid = ? AND tier <> ? "
        "AND storage_key IN (SELECT unnest(?))",
        [study_uid, Tier.HOT.value, keys],
    )
    return bool(count)


def _sources(
    catalog: CatalogReader, targets: Mapping[str, tuple[Tier, int]]
) -> dict[str, dict[Tier, TierLoad]]:
    """Per study of `targets`, its current instances (count, bytes) by tier warmer than
    its target."""
    if not targets:
        return {}
    rank = " ".join(f"WHEN '{t}' THEN {r}" for t, r in RANK.items())
    rows = catalog.query(
        "WITH t AS (SELECT unnest(?) AS study_instance_uid, unnest(?) AS target_rank) "
        "SELECT i.study_instance_uid, i.tier, count(*), coalesce(sum(i.size_bytes), 0) "
        "FROM instances i JOIN t USING (study_instance_uid) "
        f"WHERE (CASE i.tier {rank} ELSE 99 END) < t.target_rank GROUP BY 1, 2",
        [list(targets), [RANK[t.value] for t, _ in targets.values()]],
    )
    found: dict[str, dict[Tier, TierLoad]] = {}
    for uid, tier, count, size in rows:
        found.setdefault(uid, {})[Tier(tier)] = TierLoad(int(count), int(size))
    return found


# ---------------------------------------------------------------------------- pending


@dataclass(frozen=True)
class PendingMove:
    """A study a run began to move: its source objects are not all deleted yet."""

    study_uid: str
    target: Tier
    started_at: datetime


def pending_dir(settings: Settings) -> Path:
    return settings.catalog_dir / PENDING_DIR


def pending_moves(settings: Settings) -> list[PendingMove]:
    """Every study a run began to move and did not finish (unreadable files skipped)."""
    found = []
    for uid, record, _ in StudyRecords(pending_dir(settings)).items():
        try:
            found.append(
                PendingMove(
                    uid, Tier(record["target"]), datetime.fromisoformat(str(record["started_at"]))
                )
            )
        except (KeyError, ValueError):
            continue
    return found


def _mark_pending(settings: Settings, study_uid: str, target: Tier) -> None:
    record = {"target": target.value, "started_at": datetime.now(UTC).isoformat()}
    StudyRecords(pending_dir(settings)).write(study_uid, record)


def _clear_pending(settings: Settings, study_uid: str) -> None:
    StudyRecords(pending_dir(settings)).remove(study_uid)


# ---------------------------------------------------------------------------- execute


@dataclass
class StudyResult:
    """What a run did to one study."""

    study_uid: str
    target: Tier
    copied: int = 0  # instances uploaded to the target tier
    reused: int = 0  # instances already there (a previous run's copy, a restored study)
    recorded: int = 0  # instances whose location this run recorded in the target tier
    bytes_moved: int = 0
    deleted: int = 0  # source objects deleted
    bytes_freed: int = 0
    failures: list[str] = field(default_factory=list)  # identifiers and reasons, no values

    @property
    def failed(self) -> bool:
        return bool(self.failures)


@dataclass(frozen=True)
class _Row:
    sop_instance_uid: str
    checksum: str
    storage_key: str
    tier: str
    size_bytes: int


def _study_rows(catalog: CatalogReader, study_uid: str) -> list[_Row]:
    rows = catalog.query(
        "SELECT sop_instance_uid, checksum, storage_key, tier, size_bytes FROM instances "
        "WHERE study_instance_uid = ? ORDER BY sop_instance_uid",
        [study_uid],
    )
    return [_Row(r[0], r[1], r[2], r[3], int(r[4] or 0)) for r in rows]


def copy_study(
    catalog: CatalogReader,
    tiers: StorageTiers,
    writer: CatalogWriter,
    move: StudyMove,
    *,
    settings: Settings,
    changed_by: str,
    lake: LakeConfig | None = None,
    hook: Callable[[str, str], None] | None = None,
) -> StudyResult:
    """Copy every current instance of `move`'s study that is warmer than its target to the
    target tier (verified; an object already there with the catalog's size is reused),
    then record them with ONE ``instance_locations`` append (and the lake's).

    An instance whose source bytes differ from the catalog's checksum, or whose source is
    missing, is not moved (a failure of the result); a tier that fails (a server down)
    stops the study's copies there: what was verified so far is recorded. Nothing is
    deleted here (see :func:`release_sources`).
    """
    result = StudyResult(move.study_uid, move.target)
    _mark_pending(settings, move.study_uid, move.target)
    target_rank = RANK[move.target.value]
    todo = [r for r in _study_rows(catalog, move.study_uid) if RANK.get(r.tier, 99) < target_rank]
    target = tiers[move.target]
    done: list[_Row] = []
    stopped = False
    with ThreadPoolExecutor(max_workers=max(1, min(COPY_WORKERS, len(todo)))) as pool:
        futures = {pool.submit(_copy_one, tiers, target, row): row for row in todo}
        for future in as_completed(futures):
            row = futures[future]
            if future.cancelled():
                continue
            try:
                reused = future.result()
            except (ChecksumMismatchError, NotFoundError) as exc:
                result.failures.append(f"{row.sop_instance_uid}: {type(exc).__name__}: {exc}")
                log.warning(
                    "not moved: %s of study %s: %s", row.sop_instance_uid, move.study_uid, exc
                )
                continue
            except StorageError as exc:
                result.failures.append(f"{row.sop_instance_uid}: {type(exc).__name__}: {exc}")
                if not stopped:
                    stopped = True
                    log.warning(
                        "study %s: %s; its other copies wait for the next run", move.study_uid, exc
                    )
                    for other in futures:
                        other.cancel()
                continue
            if reused:
                result.reused += 1
            else:
                result.copied += 1
            done.append(row)
            result.bytes_moved += row.size_bytes
    done.sort(key=lambda r: r.sop_instance_uid)
    if hook is not None:
        hook(COPIED, move.study_uid)
    if done:
        change = append_change(
            writer,
            INSTANCE_LOCATIONS,
            [
                {
                    "sop_instance_uid": r.sop_instance_uid,
                    "checksum": r.checksum,
                    "tier": move.target.value,
                    "storage_key": r.storage_key,
                }
                for r in done
            ],
            changed_by=changed_by,
        )
        if lake is not None:  # the services reading the lake see the move too
            from vannah_pipelines.catalog.lake import append_change_file

            append_change_file(lake, change)
        result.recorded = len(done)
    if hook is not None:
        hook(RECORDED, move.study_uid)
    log.info(
        "study %s: %d instances recorded in the %s tier (%d copied, %d reused, %d failed)",
        move.study_uid,
        result.recorded,
        move.target.value,
        result.copied,
        result.reused,
        len(result.failures),
    )
    return result


def _copy_one(tiers: StorageTiers, target: Storage, row: _Row) -> bool:
    """Copy one version to `target` (verified by the backend's write); True when a copy
    with the catalog's size was there already (reused: cold objects cannot be read back)."""
    if _holds(target, row.storage_key, row.size_bytes):
        return True
    with tiers[row.tier].open(row.storage_key) as stream:
        target.write(row.storage_key, stream, row.size_bytes, row.checksum)
    return False


def _holds(store: Storage, key: str, size: int) -> bool:
    """Whether `store` has `key` with `size` bytes (a verified copy made earlier)."""
    try:
        return int(store.stat(key)) == size
    except NotFoundError:
        return False


def release_sources(
    catalog: CatalogReader,
    tiers: StorageTiers,
    result: StudyResult,
) -> None:
    """Delete the study's objects in the tiers warmer than its target that no current
    catalog row uses, once the tier the catalog names for that version holds the object
    with the catalog's size. `catalog` must be a fresh read (after the grace period).

    An object no current row names (a superseded version, an instance being ingested) is
    left alone: only the copy of a version the catalog places elsewhere is deleted.
    """
    rows = {r.storage_key: r for r in _study_rows(catalog, result.study_uid)}
    for tier in TIER_ORDER[: RANK[result.target.value]]:
        store = tiers[tier]
        try:
            keys = sorted(store.keys(f"{result.study_uid}/"))
        except StorageError as exc:
            result.failures.append(f"listing the {tier} tier: {exc}")
            continue
        for key in keys:
            row = rows.get(key)
            if row is None or row.tier == tier.value or row.tier not in RANK:
                continue  # not a current version, or a current row uses this object
            try:
                if not _holds(tiers[row.tier], key, row.size_bytes):
                    result.failures.append(f"{row.sop_instance_uid}: not in the {row.tier} tier")
                    continue
                store.delete(key)
            except StorageError as exc:
                result.failures.append(f"{row.sop_instance_uid}: {type(exc).__name__}: {exc}")
                continue
            result.deleted += 1
            result.bytes_freed += row.size_bytes


# ---------------------------------------------------------------------------- run


class TieringBusyError(VannahError):
    """Another tiering run holds the lock (runs would race for the same sources)."""


@contextlib.contextmanager
def _one_run_at_a_time(settings: Settings) -> Iterator[None]:
    """One moving run at a time per catalog: a run deleting a source while another copies
    from it would make the second fail. Dry runs do not take it."""
    folder = pending_dir(settings)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".lock", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TieringBusyError("another tiering run is under way; try again later") from None
        yield
    finally:
        os.close(fd)


@dataclass
class LifecycleResult:
    """One lifecycle run: the plan, and what was done (nothing on a dry run)."""

    as_of: datetime
    dry_run: bool
    moves: list[StudyMove]
    studies: list[StudyResult] = field(default_factory=list)
    seconds: float = 0.0

    def planned(self) -> dict[tuple[Tier, Tier], TierLoad]:
        """(from, to) -> instances and bytes the plan moves."""
        found: dict[tuple[Tier, Tier], TierLoad] = {}
        for move in self.moves:
            for tier, load in move.sources.items():
                found[(tier, move.target)] = found.get((tier, move.target), TierLoad()) + load
        return found

    @property
    def failed(self) -> list[StudyResult]:
        return [s for s in self.studies if s.failed]

    @property
    def studies_moved(self) -> int:
        return sum(1 for s in self.studies if s.recorded and not s.failed)

    @property
    def instances_moved(self) -> int:
        return sum(s.recorded for s in self.studies)

    @property
    def bytes_moved(self) -> int:
        return sum(s.bytes_moved for s in self.studies)

    @property
    def bytes_freed(self) -> int:
        return sum(s.bytes_freed for s in self.studies)

    @property
    def objects_deleted(self) -> int:
        return sum(s.deleted for s in self.studies)


def open_catalog(settings: Settings) -> CatalogReader:
    """The catalog as the lifecycle reads it: the local files, or the DuckLake."""
    from vannah_pipelines.catalog.compaction import ensure_catalog
    from vannah_pipelines.catalog.lake import LakeConfig
    from vannah_pipelines.catalog.reader import CatalogReader

    ensure_catalog(settings.catalog_dir)
    return CatalogReader(
        settings.catalog_dir,
        memory_limit_mb=settings.catalog_memory_limit_mb,
        lake=LakeConfig.from_settings(settings),
    )


def run_lifecycle(
    settings: Settings,
    *,
    as_of: datetime | None = None,
    dry_run: bool = False,
    study: str | None = None,
    changed_by: str,
    tiers: StorageTiers | None = None,
    sleep: Callable[[float], None] = time.sleep,
    hook: Callable[[str, str], None] | None = None,
    progress: Callable[[StudyResult], None] | None = None,
    planned: Callable[[list[StudyMove]], None] | None = None,
) -> LifecycleResult:
    """Apply the tier policy as of `as_of` (default now): plan, then (unless `dry_run`)
    copy and record every planned study, wait ``tier_grace_seconds`` once (every study's
    append is then at least that old), read the catalog afresh and delete the sources.

    One study failing (a corrupt source, a server down) does not stop the others: it is in
    ``result.failed``, and stays pending so the next run retries it. `planned` is told the
    plan, `progress` each study once copied and recorded; `sleep` and `hook` (called with
    a step and a Study UID) are for tests.

    Raises
    ------
    TieringBusyError
        Another run (not a dry run) is under way on this catalog.
    CatalogError
        The catalog cannot be read or appended to (the run stops; nothing was deleted
        that was not recorded).
    """
    started = time.monotonic()
    when = _aware(as_of) if as_of is not None else datetime.now(UTC)
    catalog = open_catalog(settings)
    try:
        if dry_run:
            result = LifecycleResult(when, True, plan(catalog, settings, when, study=study))
            result.seconds = time.monotonic() - started
            return result
        with _one_run_at_a_time(settings):
            CatalogWriter(settings.catalog_dir).write_storage_tiers(tier_facts(settings))
            result = LifecycleResult(when, False, plan(catalog, settings, when, study=study))
            if planned is not None:
                planned(result.moves)
            if result.moves:
                _execute(catalog, settings, result, tiers, changed_by, sleep, hook, progress)
    finally:
        catalog.close()
    result.seconds = time.monotonic() - started
    log.info(
        "tiering as of %s: %d instances of %d studies moved (%d bytes), %d bytes freed, "
        "%d studies failed, %.1f s",
        f"{when:%Y-%m-%d}",
        result.instances_moved,
        result.studies_moved,
        result.bytes_moved,
        result.bytes_freed,
        len(result.failed),
        result.seconds,
    )
    return result


def _execute(
    catalog: CatalogReader,
    settings: Settings,
    result: LifecycleResult,
    tiers: StorageTiers | None,
    changed_by: str,
    sleep: Callable[[float], None],
    hook: Callable[[str, str], None] | None,
    progress: Callable[[StudyResult], None] | None,
) -> None:
    """Copy and record every planned study, wait the grace period once, then release."""
    tiers = tiers or StorageTiers(settings)
    writer = CatalogWriter(settings.catalog_dir)
    from vannah_pipelines.catalog.lake import LakeConfig

    lake = LakeConfig.from_settings(settings)
    for move in result.moves:
        done = StudyResult(move.study_uid, move.target)
        if not move.resumed:  # a resumed study has only its sources left to release
            try:
                done = copy_study(
                    catalog,
                    tiers,
                    writer,
                    move,
                    settings=settings,
                    changed_by=changed_by,
                    lake=lake,
                    hook=hook,
                )
            except (StorageError, OSError) as exc:  # the catalog or pending file unwritable
                done.failures.append(f"{type(exc).__name__}: {exc}")
        result.studies.append(done)
        if progress is not None:
            progress(done)
    if any(s.recorded for s in result.studies):
        log.info(
            "waiting %.0f s (tier_grace_seconds) before deleting the sources",
            settings.tier_grace_seconds,
        )
        sleep(settings.tier_grace_seconds)
    catalog.refresh()
    for done in result.studies:
        release_sources(catalog, tiers, done)
        if not done.failed:
            _clear_pending(settings, done.study_uid)
        if hook is not None:
            hook(RELEASED, done.study_uid)


def tier_usage(catalog: CatalogReader) -> dict[str, TierLoad]:
    """Current instances and bytes per tier (what the UI plots)."""
    rows = catalog.query(
        "SELECT tier, count(*), coalesce(sum(size_bytes), 0) FROM instances GROUP BY 1"
    )
    return {str(t): TierLoad(int(n), int(b)) for t, n, b in rows}


def as_of_date(value: str) -> datetime:
    """``YYYY-MM-DD`` -> midnight UTC of that day (``--as-of`` and the run config).

    >>> as_of_date("2027-01-31").isoformat()
    '2027-01-31T00:00:00+00:00'
    """
    day = date.fromisoformat(value.strip())
    return datetime(day.year, day.month, day.day, tzinfo=UTC)
