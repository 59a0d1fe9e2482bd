"""``vannah tier``: the dry run's per-tier preview, and a real run's summary."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.storage.lifecycle_support import ingest_study, make_settings, study_tier
from vannah_pipelines.cli import main


def test_vannah_tier_previews_then_moves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("VANNAH_CONFIG", raising=False)
    monkeypatch.setenv("VANNAH_TIER_GRACE_SECONDS", "0")
    settings = make_settings(tmp_path)
    study = ingest_study(settings, n=2)
    size = sum(map(len, study.blobs.values()))
    as_of = (datetime.now(UTC) + timedelta(days=400)).date().isoformat()
    args = ["--data-dir", str(tmp_path), "tier", "--as-of", as_of]

    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"tier policy as of {as_of}" in out
    assert f" hot -> cold 1 studies, 2 instances, {size / 1e6:,.1f} MB (freed in hot)" in out
    assert study_tier(settings, study.uid) == "hot"

    assert main([*args, "--study", study.uid, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "moved 2 instances of 1 studies" in out and "0 studies failed" in out
    assert study_tier(settings, study.uid) == "cold"
    assert main([*args, "--dry-run"]) == 0
    assert "nothing to move" in capsys.readouterr().out
