"""Rule evaluation: PS3.4 matching of catalog columns and header attributes, negation,
lists, time windows (midnight, time zones, DST) on the received time, priority."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from tests.routing.test_rules import DOCUMENTED
from vannah_pipelines.routing.evaluate import InstanceFacts, evaluate, in_window
from vannah_pipelines.routing.rules import RoutingRules, TimeWindow, parse_rules

# A fixed clock: every test names the received time it evaluates.
MONDAY_NOON = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)


def _facts(
    received_at: datetime = MONDAY_NOON,
    header: dict[str, Any] | None = None,
    worklist_priority: str | None = None,
    **columns: Any,
) -> InstanceFacts:
    return InstanceFacts(columns, received_at, header, worklist_priority)


def _one(condition: dict[str, Any], **rule: Any) -> RoutingRules:
    return parse_rules(
        [
            {
                "name": "r",
                "condition": condition,
                "destination": {"type": "folder", "path": "/srv/out"},
                **rule,
            }
        ]
    )


def _hits(condition: dict[str, Any], facts: InstanceFacts) -> bool:
    return bool(evaluate(_one(condition), facts))


def test_documented_rules_route_chest_ct_to_ai_and_everything_to_the_archive() -> None:
    rules = parse_rules(DOCUMENTED)
    chest_ct = _facts(modality="CT", body_part_examined="CHEST")
    assert [(r.rule.name, r.destination.type) for r in evaluate(rules, chest_ct)] == [
        ("Route CT to AI Pipeline", "dicom"),
        ("Archive All Studies", "s3"),
    ]
    for other in (
        _facts(modality="CT", body_part_examined="HEAD"),
        _facts(modality="MR", body_part_examined="CHEST"),
        _facts(modality=None, body_part_examined=None),  # "*" matches even no modality
    ):
        assert [r.rule.name for r in evaluate(rules, other)] == ["Archive All Studies"]


def test_condition_fields_map_onto_catalog_columns() -> None:
    facts = _facts(
        modality="MR",
        referring_physician_name="Smith^John",
        calling_ae="MR_SCANNER_2",
        institution_name="Vannah General",
        station_name="MR2",
        study_description="MRI BRAIN W/O CONTRAST",
    )
    assert _hits({"referringPhysician": "smith*"}, facts)  # PN: case-insensitive, wildcard
    assert not _hits({"referringPhysician": "Jones*"}, facts)
    assert _hits({"callingAe": "MR_SCANNER_?"}, facts)
    assert not _hits({"callingAe": "CT_*"}, facts)
    assert _hits({"institution": "Vannah General"}, facts)
    assert not _hits({"institution": "vannah general"}, facts)  # LO: exact, as PS3.4
    assert _hits({"station": ["CT1", "MR2"]}, facts)  # a list is any-of
    assert not _hits({"station": ["CT1", "CT2"]}, facts)
    assert _hits({"studyDescription": "*BRAIN*"}, facts)
    assert _hits({"modality": "MR", "studyDescription": "*BRAIN*"}, facts)
    assert not _hits({"modality": "MR", "studyDescription": "*CHEST*"}, facts)  # AND


def test_attributes_by_keyword_read_catalog_then_header() -> None:
    header = {
        "00180015": {"vr": "CS", "Value": ["CHEST"]},
        "00081030": {"vr": "LO", "Value": ["ignored: the catalog column wins"]},
        "00321032": {"vr": "PN", "Value": [{"Alphabetic": "Ndlovu^Thandi"}]},
        "00080008": {"vr": "CS", "Value": ["ORIGINAL", "PRIMARY", "AXIAL"]},
    }
    facts = _facts(header=header, patient_sex="F", study_description="CT CHEST")
    assert _hits({"attributes": {"PatientSex": "F"}}, facts)
    assert not _hits({"attributes": {"PatientSex": "M"}}, facts)
    assert _hits({"attributes": {"RequestingPhysician": "ndlovu*"}}, facts)  # header only
    assert _hits({"attributes": {"ImageType": "AXIAL"}}, facts)  # multi-valued: any value
    assert _hits({"attributes": {"StudyDescription": "CT CHEST"}}, facts)
    assert not _hits({"attributes": {"StudyDescription": "ignored*"}}, facts)
    assert not _hits({"attributes": {"ContrastBolusAgent": "*IODINE*"}}, facts)  # absent
    assert _hits({"attributes": {"ContrastBolusAgent": "*"}}, facts)  # universal
    assert _hits({"attributes": {"StudyDate": "20240101-20240131"}}, _facts(study_date="20240115"))
    assert not _hits({"attributes": {"StudyDate": "20240201-"}}, _facts(study_date="20240115"))
    no_header = _facts()
    assert not _hits({"attributes": {"RequestingPhysician": "*a*"}}, no_header)


def test_not_excludes_what_its_condition_matches() -> None:
    cond = {"modality": "*", "not": {"modality": ["SR", "PR"]}}
    assert _hits(cond, _facts(modality="CT"))
    assert not _hits(cond, _facts(modality="SR"))
    assert not _hits(cond, _facts(modality="PR"))
    nested = {"modality": "CT", "not": {"bodyPart": "HEAD", "not": {"station": "CT9"}}}
    assert _hits(nested, _facts(modality="CT", body_part_examined="CHEST"))
    assert not _hits(nested, _facts(modality="CT", body_part_examined="HEAD", station_name="CT1"))
    assert _hits(nested, _facts(modality="CT", body_part_examined="HEAD", station_name="CT9"))


AFTER_HOURS = {
    "timezone": "Africa/Johannesburg",
    "days": ["Mon", "Tue", "Wed", "Thu", "Fri"],
    "start": "18:00",
    "end": "07:00",
}


@pytest.mark.parametrize(
    ("utc", "inside"),
    [
        # Johannesburg is UTC+2 all year.
        ("2026-03-02T15:59", False),  # Mon 17:59
        ("2026-03-02T16:00", True),  # Mon 18:00
        ("2026-03-02T21:59", True),  # Mon 23:59
        ("2026-03-02T22:00", True),  # Tue 00:00: Monday's window, across midnight
        ("2026-03-03T04:59", True),  # Tue 06:59
        ("2026-03-03T05:00", False),  # Tue 07:00
        ("2026-03-03T10:00", False),  # Tue 12:00
        ("2026-03-06T20:00", True),  # Fri 22:00
        ("2026-03-07T03:00", True),  # Sat 05:00: Friday's window
        ("2026-03-07T16:00", False),  # Sat 18:00: no window starts on Saturday
        ("2026-03-08T23:00", False),  # Mon 01:00 after Sunday: Sunday starts none
    ],
)
def test_overnight_window_across_midnight_in_a_time_zone(utc: str, inside: bool) -> None:
    window = TimeWindow.model_validate(AFTER_HOURS)
    at = datetime.fromisoformat(utc).replace(tzinfo=UTC)
    assert in_window(window, at) is inside
    assert _hits({"time": AFTER_HOURS}, _facts(received_at=at)) is inside


def test_window_follows_daylight_saving_time() -> None:
    # New York: EST (UTC-5) until 2026-03-08 02:00, then EDT (UTC-4).
    window = TimeWindow(timezone="America/New_York", start="18:00", end="07:00")
    assert in_window(window, datetime(2026, 3, 7, 11, 30, tzinfo=UTC))  # 06:30 EST
    assert not in_window(window, datetime(2026, 3, 9, 11, 30, tzinfo=UTC))  # 07:30 EDT
    assert in_window(window, datetime(2026, 3, 9, 10, 30, tzinfo=UTC))  # 06:30 EDT
    # The night the clocks go forward: 01:59 EST, then 03:00 EDT, both in the window.
    assert in_window(window, datetime(2026, 3, 8, 6, 59, tzinfo=UTC))
    assert in_window(window, datetime(2026, 3, 8, 7, 0, tzinfo=UTC))
    # In UTC the same instants fall the other way round.
    utc = TimeWindow(start="18:00", end="07:00")
    assert not in_window(utc, datetime(2026, 3, 7, 11, 30, tzinfo=UTC))


def test_same_day_window_whole_days_and_any_of_windows() -> None:
    office = {
        "timezone": "Europe/London",
        "days": ["mon", "tuesday"],
        "start": "08:00",
        "end": "17:30",
    }
    assert _hits({"time": office}, _facts(received_at=datetime(2026, 3, 2, 8, 0, tzinfo=UTC)))
    assert not _hits({"time": office}, _facts(received_at=datetime(2026, 3, 2, 17, 30, tzinfo=UTC)))
    assert not _hits({"time": office}, _facts(received_at=datetime(2026, 3, 4, 9, 0, tzinfo=UTC)))
    # British Summer Time: 07:30 UTC is 08:30 local.
    assert _hits({"time": office}, _facts(received_at=datetime(2026, 6, 1, 7, 30, tzinfo=UTC)))
    weekend = {"timezone": "Africa/Johannesburg", "days": ["Sat", "Sun"]}
    assert _hits({"time": weekend}, _facts(received_at=datetime(2026, 3, 6, 22, 30, tzinfo=UTC)))
    assert not _hits(
        {"time": weekend}, _facts(received_at=datetime(2026, 3, 6, 21, 30, tzinfo=UTC))
    )
    either = {"time": [office, weekend]}
    assert _hits(either, _facts(received_at=datetime(2026, 3, 7, 12, 0, tzinfo=UTC)))
    assert not _hits(either, _facts(received_at=datetime(2026, 3, 4, 12, 0, tzinfo=UTC)))


def test_priority_from_rule_header_worklist_or_routine() -> None:
    rules = parse_rules(
        [
            {
                "name": "stat rule",
                "condition": {"modality": "CT"},
                "priority": "STAT",
                "destination": {"type": "folder", "path": "/a"},
            },
            {
                "name": "derived",
                "condition": {"modality": "*"},
                "destination": {"type": "folder", "path": "/b"},
            },
        ]
    )

    def priorities(facts: InstanceFacts) -> list[tuple[str, str]]:
        return [(r.priority, r.priority_source) for r in evaluate(rules, facts)]

    top = {"00401003": {"vr": "SH", "Value": ["HIGH"]}}
    nested = {"00400275": {"vr": "SQ", "Value": [{"00401003": {"vr": "SH", "Value": ["STAT"]}}]}}
    assert priorities(_facts(modality="CT")) == [("STAT", "rule"), ("ROUTINE", "default")]
    assert priorities(_facts(modality="MR", header=top)) == [("HIGH", "header")]
    assert priorities(_facts(modality="MR", header=nested)) == [("STAT", "header")]
    assert priorities(_facts(modality="MR", worklist_priority="STAT")) == [("STAT", "worklist")]
    assert priorities(_facts(modality="MR", header=top, worklist_priority="STAT")) == [
        ("HIGH", "header")
    ]
    assert priorities(_facts(modality="MR", worklist_priority="MEDIUM")) == [
        ("ROUTINE", "worklist")
    ]
    assert priorities(_facts(modality="MR", worklist_priority="whenever")) == [
        ("ROUTINE", "default")
    ]
