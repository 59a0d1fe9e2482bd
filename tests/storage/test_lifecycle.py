"""The storage lifecycle against real servers: hot (a folder) -> warm (SeaweedFS through the
minio SDK) -> cold (moto's S3 with DEEP_ARCHIVE), studies aged with ``as_of``, never the clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pytest

from tests.conftest import lake_settings
from tests.storage.lifecycle_support import (
    days_later,
    ingest_study,
    instances,
    make_settings,
    read_all,
    study_tier,
)
from vannah_pipelines.catalog.compaction import compact, publish
from vannah_pipelines.catalog.lake import LakeConfig
from vannah_pipelines.catalog.reader import CatalogReader
from vannah_pipelines.settings import TierDays
from vannah_pipelines.storage.base import RestoreState, Tier
from vannah_pipelines.storage.holds import hold_study
from vannah_pipelines.storage.lifecycle import (
    Policy,
    TieringBusyError,
    pending_moves,
    run_lifecycle,
)
from vannah_pipelines.storage.tiers import StorageTiers


def _keys(settings, tier: Tier, study_uid: str) -> list[str]:  # type: ignore[no-untyped-def]
    return sorted(StorageTiers(settings)[tier].keys(f"{study_uid}/"))


def test_policy_counts_age_from_study_date_and_falls_back_on_a_bad_one() -> None:
    policy = Policy(30, 365, "study_date")
    at = datetime(2026, 6, 1, tzinfo=UTC)
    received = at - timedelta(days=1)
    assert policy.target(["CT"], "20250101", received, at) is Tier.COLD
    assert policy.target(["CT"], "20260415", received, at) is Tier.WARM
    for bad in ("", None, "2025", "20251399", "yesterday", "2025010"):
        assert policy.target(["CT"], bad, received, at) is Tier.HOT  # last received: 1 day
    assert Policy(30, 365).target(["CT"], "20000101", received, at) is Tier.HOT


def test_policy_takes_the_longest_ages_of_a_studys_modalities() -> None:
    policy = Policy(30, 365, modality_days={"MG": (90, 3650), "CR": (7, 60)})
    assert policy.days(["CT"]) == (30, 365)
    assert policy.days(["CR"]) == (7, 60)
    assert policy.days(["CR", "CT"]) == (30, 365)
    assert policy.days(["CT", "MG", "CR"]) == (90, 3650)
    assert policy.days([]) == (30, 365)


def test_studies_move_hot_warm_cold_with_bytes_identical(
    tmp_path: Path, object_tiers: dict[str, object]
) -> None:
    settings = make_settings(tmp_path, object_tiers)
    study = ingest_study(settings, n=3)
    young = ingest_study(settings, n=1)
    assert study_tier(settings, study.uid) == "hot"

    # A dry run says what would move and frees, and changes nothing.
    preview = run_lifecycle(settings, as_of=days_later(40), dry_run=True, changed_by="test")
    assert {m.study_uid for m in preview.moves} == {study.uid, young.uid}
    [((source, target), load)] = preview.planned().items()
    assert (source, target) == (Tier.HOT, Tier.WARM)
    assert load.instances == 4 and load.bytes == sum(map(len, study.blobs.values())) + sum(
        map(len, young.blobs.values())
    )
    assert preview.studies == [] and study_tier(settings, study.uid) == "hot"
    assert _keys(settings, Tier.WARM, study.uid) == []
    # Not old enough yet: nothing.
    assert run_lifecycle(settings, as_of=days_later(29), changed_by="test").moves == []

    warm = run_lifecycle(settings, as_of=days_later(40), study=study.uid, changed_by="test")
    assert not warm.failed and warm.studies_moved == 1 and warm.instances_moved == 3
    assert warm.bytes_moved == warm.bytes_freed == sum(map(len, study.blobs.values()))
    assert study_tier(settings, study.uid) == "warm"
    assert study_tier(settings, young.uid) == "hot"  # --study: only that one
    assert _keys(settings, Tier.HOT, study.uid) == []
    assert len(_keys(settings, Tier.WARM, study.uid)) == 3
    assert read_all(settings, study.uid) == study.blobs  # from SeaweedFS
    assert pending_moves(settings) == []
    # Idempotent: the same date again moves nothing.
    again = run_lifecycle(settings, as_of=days_later(40), study=study.uid, changed_by="t")
    assert again.moves == []

    cold = run_lifecycle(settings, as_of=days_later(400), changed_by="test")
    assert not cold.failed and cold.studies_moved == 2  # the young one goes hot -> cold
    assert {(s, t) for s, t in cold.planned()} == {(Tier.WARM, Tier.COLD), (Tier.HOT, Tier.COLD)}
    assert study_tier(settings, study.uid) == study_tier(settings, young.uid) == "cold"
    assert _keys(settings, Tier.WARM, study.uid) == [] == _keys(settings, Tier.HOT, young.uid)
    assert all(i.tier == "cold" for i in instances(settings, study.uid))
    # Cold objects are read only after a restore (moto enforces DEEP_ARCHIVE).
    store = StorageTiers(settings)[Tier.COLD]
    for inst in instances(settings, study.uid):
        assert store.restore_state(inst.storage_key) is RestoreState.ARCHIVED
        assert store.restore(inst.storage_key, 1) is RestoreState.ONLINE
    assert read_all(settings, study.uid) == study.blobs
    reader = CatalogReader(settings.catalog_dir)
    try:
        history = reader.query(
            "SELECT tier, count(*) FROM instance_locations GROUP BY 1 ORDER BY 1"
        )
    finally:
        reader.close()
    assert history == [("cold", 4), ("warm", 3)]  # one row per move, never twice

    # catalog.duckdb shows each study's bytes per tier and how long a restore would take.
    compact(settings.catalog_dir)
    with duckdb.connect(str(publish(settings.catalog_dir)), read_only=True) as con:
        rows = con.execute(
            "SELECT study_instance_uid, tier, hot_bytes, warm_bytes, cold_bytes, "
            "expected_restore_hours FROM study_tiers"
        ).fetchall()
        facts = con.execute("SELECT tier, backend, storage_class FROM storage_tiers").fetchall()
    sizes = {s.uid: sum(map(len, s.blobs.values())) for s in (study, young)}
    hours = settings.cold_restore_expected_hours
    assert sorted(rows) == sorted((uid, "cold", 0, 0, size, hours) for uid, size in sizes.items())
    assert ("cold", "s3-archive", "DEEP_ARCHIVE") in facts


def test_modality_overrides_and_holds_keep_studies_hot(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path, tier_modality_days={"MG": TierDays(hot_days=90, warm_days=3650)}
    )
    ct = ingest_study(settings, "CT", n=1)
    mg = ingest_study(settings, "MG", n=1)
    held = ingest_study(settings, "CT", n=1)
    hold_study(settings, held.uid, days_later(60), reason="restored")
    result = run_lifecycle(settings, as_of=days_later(40), changed_by="test")
    assert [s.study_uid for s in result.studies] == [ct.uid]
    assert study_tier(settings, ct.uid) == "warm"
    assert study_tier(settings, mg.uid) == study_tier(settings, held.uid) == "hot"
    # Once the hold is over the study moves; the mammogram after its own 90 days.
    later = run_lifecycle(settings, as_of=days_later(70), changed_by="test")
    assert [s.study_uid for s in later.studies] == [held.uid]
    assert {
        s.study_uid
        for s in run_lifecycle(settings, as_of=days_later(100), changed_by="test").studies
    } == {mg.uid}
    assert read_all(settings, mg.uid) == mg.blobs


def test_study_date_ages_a_study_received_today(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, tier_age_from="study_date")
    old = ingest_study(settings, n=1, study_date="20200101")
    bad = ingest_study(settings, n=1, study_date="")  # empty: its last received instance
    result = run_lifecycle(settings, changed_by="test")  # today
    assert [s.study_uid for s in result.studies] == [old.uid]
    assert study_tier(settings, old.uid) == "cold"
    assert study_tier(settings, bad.uid) == "hot"


def test_a_move_is_recorded_in_the_lake_too(tmp_path: Path, lake_config: LakeConfig) -> None:
    settings = make_settings(tmp_path, lake_settings(lake_config))
    study = ingest_study(settings, n=2)
    result = run_lifecycle(settings, as_of=days_later(40), changed_by="test")
    assert not result.failed and result.instances_moved == 2
    reader = CatalogReader(settings.catalog_dir, lake=lake_config)  # what other hosts read
    try:
        assert reader.query(
            "SELECT tier, number_of_study_related_instances FROM studies "
            "WHERE study_instance_uid = ?",
            [study.uid],
        ) == [("warm", 2)]
        assert reader.query("SELECT count(*) FROM instance_locations") == [(2,)]
    finally:
        reader.close()
    assert _keys(settings, Tier.HOT, study.uid) == []
    assert read_all(settings, study.uid) == study.blobs


def test_a_run_moves_at_most_tier_max_studies_per_run_oldest_first(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, tier_age_from="study_date", tier_max_studies_per_run=1)
    newer = ingest_study(settings, n=1, study_date="20240101")
    older = ingest_study(settings, n=1, study_date="20230101")
    assert [s.study_uid for s in run_lifecycle(settings, changed_by="t").studies] == [older.uid]
    assert study_tier(settings, newer.uid) == "hot"
    assert [s.study_uid for s in run_lifecycle(settings, changed_by="t").studies] == [newer.uid]
    assert run_lifecycle(settings, changed_by="t").moves == []


def test_one_moving_run_at_a_time(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    study = ingest_study(settings, n=1)
    seen: list[str] = []

    def meanwhile(step: str, study_uid: str) -> None:
        if step == "copied":
            with pytest.raises(TieringBusyError):
                run_lifecycle(settings, as_of=days_later(40), changed_by="other")
            dry = run_lifecycle(settings, as_of=days_later(40), dry_run=True, changed_by="d")
            seen.extend(m.study_uid for m in dry.moves)  # a preview is never refused

    run_lifecycle(settings, as_of=days_later(40), changed_by="test", hook=meanwhile)
    assert seen == [study.uid] and study_tier(settings, study.uid) == "warm"
