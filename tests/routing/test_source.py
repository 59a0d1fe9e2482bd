"""RulesSource: reload on change, last good rules kept in memory and across a restart,
settings' inline rules and rules file."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from tests.routing.test_rules import DOCUMENTED
from vannah_pipelines.errors import ConfigError
from vannah_pipelines.routing.source import LAST_GOOD_FILE, RulesSource, read_rules_file
from vannah_pipelines.settings import Settings, load_settings


def _write(path: Path, document: Any, *, mtime_ns: int | None = None) -> None:
    path.write_text(json.dumps(document) if not isinstance(document, str) else document)
    if mtime_ns is not None:  # a distinct stamp whatever the file system's resolution
        os.utime(path, ns=(mtime_ns, mtime_ns))


def _names(source: RulesSource) -> list[str]:
    return [r.name for r in source.current().rules]


BAD_PORT: dict[str, Any] = {
    "rules": [
        {
            "name": "Route CT to AI Pipeline",
            "condition": {"modality": "CT"},
            "destination": {"aet": "AI_ENGINE", "host": "ai.internal", "port": 0},
        }
    ]
}


def test_rules_source_reloads_when_the_file_changes(tmp_path: Path) -> None:
    rules_file = tmp_path / "rules.json"
    _write(rules_file, DOCUMENTED, mtime_ns=1_000_000_000)
    source = RulesSource(rules_file, tmp_path / "state")
    assert _names(source) == ["Route CT to AI Pipeline", "Archive All Studies"]
    assert source.origin == "file" and source.error is None
    _write(rules_file, {"rules": DOCUMENTED["rules"][1:]}, mtime_ns=2_000_000_000)
    assert _names(source) == ["Archive All Studies"]
    # Same size and mtime as before but a new inode (an editor's rename): re-read too.
    replacement = tmp_path / "rules.json.new"
    _write(replacement, DOCUMENTED, mtime_ns=2_000_000_000)
    replacement.replace(rules_file)
    assert _names(source) == ["Route CT to AI Pipeline", "Archive All Studies"]


def test_bad_file_keeps_last_good_rules_and_reports(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rules_file, state = tmp_path / "rules.json", tmp_path / "state"
    _write(rules_file, DOCUMENTED, mtime_ns=1_000_000_000)
    source = RulesSource(rules_file, state)
    good = source.current()
    saved = (state / LAST_GOOD_FILE).read_bytes()
    assert json.loads(saved) == DOCUMENTED
    _write(rules_file, BAD_PORT, mtime_ns=2_000_000_000)
    with caplog.at_level(logging.ERROR, logger="vannah_pipelines.routing.source"):
        assert source.current() == good  # never raises; the last good rules stay
        assert source.current() == good
    assert source.error is not None
    assert 'rule 1 "Route CT to AI Pipeline": destination.port: must be 1-65535' in source.error
    assert str(rules_file) in source.error
    assert [r.getMessage() for r in caplog.records].count(
        f"routing rules refused, the last good rules stay in force: {source.error}"
    ) == 1  # logged once, not on every call
    assert (state / LAST_GOOD_FILE).read_bytes() == saved  # a bad file is never saved
    _write(rules_file, "{not json", mtime_ns=3_000_000_000)
    assert source.current() == good and "not JSON" in (source.error or "")
    rules_file.unlink()
    assert source.current() == good and "cannot read" in (source.error or "")
    _write(rules_file, {"rules": DOCUMENTED["rules"][:1]}, mtime_ns=4_000_000_000)
    assert _names(source) == ["Route CT to AI Pipeline"] and source.error is None
    assert json.loads((state / LAST_GOOD_FILE).read_text())["rules"] == DOCUMENTED["rules"][:1]


def test_restart_with_a_bad_file_routes_with_the_last_good_rules(tmp_path: Path) -> None:
    rules_file, state = tmp_path / "rules.json", tmp_path / "state"
    _write(rules_file, DOCUMENTED)
    first = RulesSource(rules_file, state)
    good = first.current()
    _write(rules_file, BAD_PORT)
    restarted = RulesSource(rules_file, state)  # a new process over the same data folder
    assert restarted.current() == good
    assert restarted.origin == "last-good"
    assert restarted.error is not None and "destination.port" in restarted.error
    # No last good rules at all: nothing routes, and the error says why.
    fresh = RulesSource(rules_file, tmp_path / "other-state")
    assert fresh.current().rules == [] and fresh.origin == "none"
    assert fresh.error is not None and "destination.port" in fresh.error


def test_settings_inline_rules_are_validated_by_the_same_models(tmp_path: Path) -> None:
    config = tmp_path / "vannah.json"
    config.write_text(json.dumps({"DicomAet": "VANNAH", **DOCUMENTED}))
    settings = load_settings(config, data_dir=tmp_path)
    source = RulesSource.from_settings(settings)
    assert _names(source) == ["Route CT to AI Pipeline", "Archive All Studies"]
    assert source.origin == "settings"
    config.write_text(json.dumps(BAD_PORT))
    with pytest.raises(ConfigError) as info:
        load_settings(config, data_dir=tmp_path)
    assert 'rules: rule 1 "Route CT to AI Pipeline": destination.port: must be 1-65535' in str(
        info.value
    )


def test_settings_rules_file_secrets_and_both_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rules_file = tmp_path / "rules.json"
    stow = {
        "name": "PACS",
        "condition": {"modality": "*"},
        "destination": {"type": "stow", "url": "https://pacs.example/dicomweb", "token": "pacs"},
    }
    _write(rules_file, {"rules": [stow]})
    monkeypatch.setenv("VANNAH_ROUTING_RULES_FILE", str(rules_file))
    monkeypatch.setenv("VANNAH_ROUTING_SECRETS", '{"pacs": "s3cr3t-token"}')
    settings = Settings(data_dir=tmp_path)
    assert settings.routing_rules_file == rules_file
    assert settings.routing_secret("pacs").get_secret_value() == "s3cr3t-token"
    with pytest.raises(ConfigError, match="'nope' is not set"):
        settings.routing_secret("nope")
    source = RulesSource.from_settings(settings)
    assert _names(source) == ["PACS"]
    assert (settings.routing_dir / LAST_GOOD_FILE).is_file()
    monkeypatch.setenv("VANNAH_ROUTING_SECRETS", '{"other": "x"}')
    source = RulesSource.from_settings(Settings(data_dir=tmp_path))
    assert "destination.token: no secret 'pacs'" in (source.error or "")
    config = tmp_path / "vannah.json"
    config.write_text(json.dumps({"routing_secrets": {"pacs": "in the file"}}))
    with pytest.raises(ConfigError, match="environment only"):
        load_settings(config)
    config.write_text(json.dumps(DOCUMENTED))
    with pytest.raises(ConfigError, match="not both"):
        load_settings(config)


def test_read_rules_file_reports_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "rules.json"
    _write(path, {"rules": [*BAD_PORT["rules"], {**DOCUMENTED["rules"][1], "name": ""}]})
    with pytest.raises(ConfigError) as info:
        read_rules_file(path)
    assert len(info.value.problems) == 2  # type: ignore[attr-defined]
    assert 'rule 1 "Route CT to AI Pipeline": destination.port' in str(info.value)
    assert 'rule 2 "": name:' in str(info.value)
    assert not (tmp_path / LAST_GOOD_FILE).exists()
