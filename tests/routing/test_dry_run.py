"""`vannah route --dry-run` and `--check` over a real catalog built from synthetic studies."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid

from tests.routing.test_rules import DOCUMENTED
from tests.worklist.conftest import step_fields
from vannah_pipelines.catalog.ingest import IngestPaths, ingest_batches
from vannah_pipelines.cli import main
from vannah_pipelines.dicom.synthetic import make_instance, to_part10
from vannah_pipelines.landing.layout import LandingZone, ReceiveFacts
from vannah_pipelines.routing.dry_run import dry_run
from vannah_pipelines.routing.rules import parse_rules
from vannah_pipelines.settings import Settings
from vannah_pipelines.storage.lifecycle import open_catalog
from vannah_pipelines.worklist.model import item_from_fields
from vannah_pipelines.worklist.store import WorklistStore

EXTRA_RULES: list[dict[str, Any]] = [
    {
        "name": "After hours to tele-radiology",
        "condition": {
            "modality": ["CT", "MR"],
            "time": {
                "timezone": "Africa/Johannesburg",
                "days": ["Mon", "Tue", "Wed", "Thu", "Fri"],
                "start": "18:00",
                "end": "07:00",
            },
        },
        "destination": {"type": "folder", "path": "/srv/telerad"},
        "mode": "study",
        "stableAge": 120,
    },
    {
        "name": "Dr Smith's referrals",
        "condition": {"referringPhysician": "smith^*", "not": {"modality": "CT"}},
        "destination": {"type": "stow", "url": "https://neuro.example/dicomweb"},
        "priority": "HIGH",
    },
]


@dataclass(frozen=True)
class Study:
    uid: str
    size: int  # bytes of all its instances


def _ingest(
    settings: Settings, modality: str, n: int, received_at: str, **attributes: Any
) -> Study:
    study_uid, series_uid = generate_uid(), generate_uid()
    batch = LandingZone(settings.landing_dir).open_batch("dimse")
    size = 0
    for i in range(n):
        ds = make_instance(
            modality,
            study_uid=study_uid,
            series_uid=series_uid,
            instance_number=i + 1,
            rows=16,
            columns=16,
            seed=i,
            **attributes,
        )
        data = to_part10(ds)
        size += len(data)
        facts = ReceiveFacts(
            str(ds.SOPInstanceUID),
            str(ds.SOPClassUID),
            "1.2.840.10008.1.2.1",
            "dimse",
            calling_ae=f"{modality}_SCANNER",
            received_at=received_at,
        )
        batch.write_instance(data, facts)
    sealed = batch.seal()
    assert sealed is not None
    result = ingest_batches(IngestPaths.for_settings(settings), [sealed.batch_id])
    assert result.instances == n and not result.quarantined
    return Study(study_uid, size)


@pytest.fixture
def archive(tmp_path: Path) -> tuple[Settings, dict[str, Study]]:
    settings = Settings(data_dir=tmp_path / "data")
    studies = {
        # Monday 12:00 in Johannesburg; STAT in the header.
        "chest_ct": _ingest(
            settings,
            "CT",
            3,
            "2026-03-02T10:00:00+00:00",
            BodyPartExamined="CHEST",
            RequestedProcedurePriority="STAT",
        ),
        # Monday 22:00 in Johannesburg: after hours.
        "head_ct": _ingest(settings, "CT", 2, "2026-03-02T20:00:00+00:00", BodyPartExamined="HEAD"),
        # Thursday 11:00 in Johannesburg, referred by Dr Smith.
        "brain_mr": _ingest(
            settings,
            "MR",
            2,
            "2026-03-05T09:00:00+00:00",
            BodyPartExamined="BRAIN",
            ReferringPhysicianName="Smith^Anne",
        ),
        # Before the window the tests use.
        "old_chest_ct": _ingest(
            settings, "CT", 1, "2026-02-20T10:00:00+00:00", BodyPartExamined="CHEST"
        ),
    }
    return settings, studies


def _routes(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["rule"]: r for r in document["routes"]}


def test_dry_run_counts_per_rule_and_destination(
    archive: tuple[Settings, dict[str, Study]],
) -> None:
    settings, s = archive
    rules = parse_rules({"rules": DOCUMENTED["rules"] + EXTRA_RULES})
    catalog = open_catalog(settings)
    try:
        since = datetime(2026, 3, 1, tzinfo=UTC)
        result = dry_run(catalog, rules, since=since, page=2)  # several pages
        everything = dry_run(catalog, rules)
        monday = dry_run(catalog, rules, since=since, until=datetime(2026, 3, 3, tzinfo=UTC))
    finally:
        catalog.close()
    routes = _routes(result.to_json())
    ai = routes["Route CT to AI Pipeline"]
    assert ai["destination"] == {
        "type": "dicom",
        "aet": "AI_ENGINE",
        "host": "ai.internal",
        "port": 4243,
        "useDicomTls": False,
        "storageCommitment": False,
    }
    assert (ai["studies"], ai["instances"], ai["bytes"]) == (1, 3, s["chest_ct"].size)
    assert ai["example_studies"] == [s["chest_ct"].uid]
    assert ai["priorities"] == {"STAT": 3}  # from the header's RequestedProcedurePriority
    archived = routes["Archive All Studies"]
    assert archived["destination"]["type"] == "s3"
    assert (archived["studies"], archived["instances"]) == (3, 7)
    assert archived["bytes"] == s["chest_ct"].size + s["head_ct"].size + s["brain_mr"].size
    assert archived["priorities"] == {"ROUTINE": 4, "STAT": 3}
    telerad = routes["After hours to tele-radiology"]
    assert (telerad["studies"], telerad["instances"], telerad["bytes"]) == (
        1,
        2,
        s["head_ct"].size,
    )
    assert telerad["mode"] == "study"
    smith = routes["Dr Smith's referrals"]
    assert (smith["studies"], smith["instances"], smith["priorities"]) == (1, 2, {"HIGH": 2})
    assert smith["example_studies"] == [s["brain_mr"].uid]
    assert result.instances == 7 and result.unrouted_instances == 0

    all_routes = _routes(everything.to_json())
    assert all_routes["Route CT to AI Pipeline"]["studies"] == 2
    assert all_routes["Route CT to AI Pipeline"]["instances"] == 4
    assert all_routes["Archive All Studies"]["instances"] == 8
    mon = _routes(monday.to_json())
    assert mon["Archive All Studies"]["instances"] == 5
    assert mon["Dr Smith's referrals"]["instances"] == 0


def test_vannah_route_dry_run_and_check(
    archive: tuple[Settings, dict[str, Study]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings, s = archive
    monkeypatch.delenv("VANNAH_CONFIG", raising=False)
    rules_file = tmp_path / "rules.json"
    rules_file.write_text(json.dumps(DOCUMENTED))
    base = ["--data-dir", str(settings.data_dir), "route"]

    assert main([*base, "--dry-run", "--rules", str(rules_file), "--since", "2026-03-01"]) == 0
    out = capsys.readouterr().out
    assert 'rule 1 "Route CT to AI Pipeline" -> dicom AI_ENGINE@ai.internal:4243' in out
    size = s["chest_ct"].size
    assert f"  1 studies, 3 instances, {size / 1e6:,.1f} MB ({size} bytes); priority STAT 3" in out
    assert f"    e.g. {s['chest_ct'].uid}" in out
    assert 'rule 2 "Archive All Studies" -> s3://vhc-archive/ (af-south-1)' in out
    assert "  3 studies, 7 instances," in out

    args = [*base, "--dry-run", "--rules", str(rules_file), "--until", "2026-02-28", "--json"]
    assert main(args) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["instances_evaluated"] == 1
    assert _routes(document)["Route CT to AI Pipeline"]["example_studies"] == [
        s["old_chest_ct"].uid
    ]

    # The worklist's requested procedure priority, for a study whose header has none.
    fields = step_fields(
        study_instance_uid=s["brain_mr"].uid, requested_procedure_priority="STAT", modality="MR"
    )
    WorklistStore(settings.catalog_dir / "worklist").create(item_from_fields(fields), "test")
    args = [*base, "--dry-run", "--rules", str(rules_file), "--since", "2026-03-01", "--json"]
    assert main(args) == 0
    archived = _routes(json.loads(capsys.readouterr().out))["Archive All Studies"]
    assert archived["priorities"] == {"ROUTINE": 2, "STAT": 5}

    # No rules configured: said so, exit 1.
    assert main([*base, "--dry-run"]) == 1
    assert "no routing rules" in capsys.readouterr().err

    assert main([*base, "--check", str(rules_file)]) == 0
    out = capsys.readouterr().out
    assert f"{rules_file}: 2 rules, valid" in out
    assert '1. "Route CT to AI Pipeline" -> dicom AI_ENGINE@ai.internal:4243' in out
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            {"rules": [{**DOCUMENTED["rules"][0], "destination": {"aet": "AI", "host": "h"}}]}
        )
    )
    assert main([*base, "--check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f'{bad}: rule 1 "Route CT to AI Pipeline": destination.port: Field required' in err
    assert main([*base, "--dry-run", "--rules", str(bad)]) == 1
    assert "destination.port" in capsys.readouterr().err
