"""Rules validation: the documentation's format verbatim, extensions, and messages that
name the rule and the field."""

from __future__ import annotations

from typing import Any

import pytest

from vannah_pipelines.routing.rules import (
    DicomDestination,
    FolderDestination,
    RulesError,
    S3Destination,
    StowDestination,
    parse_rules,
)

DOCUMENTED: dict[str, Any] = {
    "rules": [
        {
            "name": "Route CT to AI Pipeline",
            "condition": {"modality": "CT", "bodyPart": "CHEST"},
            "destination": {"aet": "AI_ENGINE", "host": "ai.internal", "port": 4243},
        },
        {
            "name": "Archive All Studies",
            "condition": {"modality": "*"},
            "destination": {"type": "s3", "bucket": "vhc-archive", "region": "af-south-1"},
        },
    ]
}


def _rule(**fields: Any) -> dict[str, Any]:
    rule: dict[str, Any] = {
        "name": "Route CT to AI Pipeline",
        "condition": {"modality": "CT"},
        "destination": {"aet": "AI_ENGINE", "host": "ai.internal", "port": 4243},
    }
    rule.update(fields)
    return rule


def _problems(document: Any, **kwargs: Any) -> list[str]:
    with pytest.raises(RulesError) as info:
        parse_rules(document, **kwargs)
    return info.value.problems


def test_parse_rules_accepts_the_documented_rules_verbatim() -> None:
    rules = parse_rules(DOCUMENTED)
    ct, archive = rules.rules
    assert ct.name == "Route CT to AI Pipeline"
    assert ct.condition.modality == ["CT"] and ct.condition.body_part == ["CHEST"]
    assert ct.destination == DicomDestination(aet="AI_ENGINE", host="ai.internal", port=4243)
    assert ct.mode == "instance" and ct.priority is None
    assert isinstance(archive.destination, S3Destination)
    assert archive.destination.bucket == "vhc-archive"
    assert archive.destination.region == "af-south-1"
    # The inline settings form: the bare list.
    assert parse_rules(DOCUMENTED["rules"]) == rules


def test_parse_rules_names_rule_and_field_of_a_bad_port() -> None:
    doc = {
        "rules": [
            DOCUMENTED["rules"][1],
            _rule(destination={"aet": "A", "host": "h", "port": 70000}),
        ]
    }
    assert _problems(doc, source="rules.json") == [
        'rules.json: rule 2 "Route CT to AI Pipeline": destination.port: must be 1-65535'
    ]


@pytest.mark.parametrize(
    ("rule", "field"),
    [
        (_rule(condition={"modality": "CT", "colour": "red"}), "condition.colour: unknown key"),
        (_rule(extra=1), "extra: unknown key"),
        (
            _rule(destination={"type": "s3", "bucket": "vhc-archive", "key": "x"}),
            "destination.key: unknown key",
        ),
        (_rule(destination={"type": "ftp", "path": "/x"}), 'destination: needs "type"'),
        (
            _rule(destination={"type": "s3", "bucket": "Bad_Bucket"}),
            "destination.bucket: must be an S3",
        ),
        (_rule(destination={"type": "stow", "url": "ftp://x"}), "destination.url:"),
        (
            _rule(destination={"type": "stow", "url": "https://u:p@x/dicomweb"}),
            "credentials do not go in the URL",
        ),
        (
            _rule(destination={"type": "folder", "path": "relative/dir"}),
            "destination.path: must be an absolute path",
        ),
        (
            _rule(destination={"type": "folder", "path": "/srv/../etc"}),
            "destination.path: must not contain '..'",
        ),
        (_rule(destination={"aet": "X" * 17, "host": "h", "port": 104}), "destination.aet:"),
        (_rule(priority="URGENT"), "priority:"),
        (_rule(stableAge=60), 'stableAge applies to "mode": "study" only'),
        (_rule(mode="study", stableAge=0), "stableAge: must be 1-604800"),
        (
            _rule(condition={"attributes": {"PatientSexx": "F"}}),
            "'PatientSexx' is not a DICOM keyword",
        ),
        (
            _rule(condition={"attributes": {"StudyDate": "2024-01"}}),
            "attributes.StudyDate: not a valid DA",
        ),
        (_rule(condition={"time": {"start": "25:00", "end": "07:00"}}), "condition.time.0.start:"),
        (
            _rule(condition={"time": {"timezone": "Mars/Olympus", "days": "Mon"}}),
            "not an IANA time zone",
        ),
        (_rule(condition={"time": {"days": ["Funday"]}}), "not a day of the week"),
        (_rule(condition={"time": {"days": ["Monkey"]}}), "not a day of the week"),
        (_rule(condition={"time": {"start": "18:00"}}), "give both start and end"),
        (_rule(condition={"modality": []}), "an empty list matches nothing"),
        (
            _rule(condition={"attributes": {"RequestAttributesSequence": "*"}}),
            "RequestAttributesSequence (SQ) cannot be matched",
        ),
        (
            _rule(coerce={"set": {"SOPInstanceUID": "1.2"}}),
            "the identity of an instance is never coerced",
        ),
        (_rule(coerce={"set": {"Rows": "12"}}), "only text attributes"),
        (_rule(coerce={"remove": ["NotAKeyword"]}), "is not a DICOM keyword"),
        (_rule(coerce={"rename": {}}), "coerce.rename: unknown key"),
    ],
)
def test_parse_rules_refuses_with_rule_and_field(rule: dict[str, Any], field: str) -> None:
    [problem] = _problems({"rules": [rule]})
    assert problem.startswith('rules: rule 1 "Route CT to AI Pipeline": '), problem
    assert field in problem, problem


def test_parse_rules_refuses_duplicate_names_and_unknown_top_level_keys() -> None:
    assert _problems({"rules": [_rule(), _rule()]}) == [
        'rules: rule 2 "Route CT to AI Pipeline": name: the same name as rule 1; '
        "rule names must be unique"
    ]
    assert _problems({"rules": [], "Rules": []}) == [
        "rules: Rules: unknown key (docs/routing.md lists the format)"
    ]
    [problem] = _problems(
        {"rules": [{"condition": {}, "destination": {"type": "folder", "path": "/x"}}]}
    )
    assert problem.startswith("rules: rule 1: name: ")


def test_parse_rules_checks_secret_names_when_told_them() -> None:
    stow = {"type": "stow", "url": "https://pacs.example/dicomweb", "token": "pacs_token"}
    parse_rules({"rules": [_rule(destination=stow)]})  # names alone: not checked
    parse_rules({"rules": [_rule(destination=stow)]}, secret_names={"pacs_token"})
    [problem] = _problems({"rules": [_rule(destination=stow)]}, secret_names={"other"})
    assert 'rule 1 "Route CT to AI Pipeline": destination.token: no secret' in problem
    both = {**stow, "apiKey": "pacs_token"}
    assert "give token or apiKey, not both" in _problems({"rules": [_rule(destination=both)]})[0]
    secret = {**stow, "token": "eyJhbGciOi.secret/value="}
    assert "is not a secret name" in _problems({"rules": [_rule(destination=secret)]})[0]


def test_parse_rules_destinations_and_extensions() -> None:
    rules = parse_rules(
        [
            _rule(
                name="stow",
                destination={
                    "type": "stow",
                    "url": "https://pacs.example/dicomweb/",
                    "apiKey": "k",
                },
                priority="stat",
            ),
            _rule(
                name="folder",
                destination={"type": "folder", "path": "/srv/export/"},
                mode="study",
                stableAge=120,
            ),
            _rule(name="study default", mode="study"),
            _rule(
                name="s3",
                destination={
                    "type": "s3",
                    "bucket": "b.example",
                    "prefix": "/site1/ct/",
                    "endpoint": "http://minio:9000",
                    "credentials": "minio",
                },
            ),
            _rule(
                name="dicom typed",
                destination={"type": "dicom", "aet": "X", "host": "h", "port": 104},
            ),
        ]
    )
    stow, folder, study, s3, dicom = rules.rules
    assert isinstance(stow.destination, StowDestination)
    assert (
        stow.destination.url == "https://pacs.example/dicomweb" and stow.destination.api_key == "k"
    )
    assert stow.priority == "STAT"
    assert (
        isinstance(folder.destination, FolderDestination)
        and folder.destination.path == "/srv/export"
    )
    assert folder.stable_age_seconds == 120 and study.stable_age_seconds == 60
    assert isinstance(s3.destination, S3Destination) and s3.destination.prefix == "site1/ct"
    assert s3.destination.object_key("1.2", "1.2.3", "1.2.3.4") == "site1/ct/1.2/1.2.3/1.2.3.4.dcm"
    assert isinstance(dicom.destination, DicomDestination)
