"""Which rules an instance matches: PS3.4 C.2.2.2 matching of catalog columns and header
attributes, time windows on the received time, and the priority of each route."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any, Literal

from pydicom.datadict import keyword_dict

from vannah_pipelines.catalog.schema import INSTANCE_SCHEMA, snake
from vannah_pipelines.dicom.matching import Match, matches
from vannah_pipelines.routing.rules import (
    Condition,
    DicomDestination,
    FolderDestination,
    Priority,
    RoutingRules,
    Rule,
    S3Destination,
    StowDestination,
    TimeWindow,
    keyword_vr,
)

CATALOG_COLUMNS = frozenset(INSTANCE_SCHEMA.names)
_column = lru_cache(maxsize=1024)(snake)
PrioritySource = Literal["rule", "header", "worklist", "default"]
# RequestedProcedurePriority (0040,1003) defined terms -> route priority; MEDIUM is routine.
_PRIORITY_TERMS: dict[str, Priority] = {
    "STAT": "STAT",
    "HIGH": "HIGH",
    "ROUTINE": "ROUTINE",
    "MEDIUM": "ROUTINE",
    "LOW": "LOW",
}
_REQUESTED_PROCEDURE_PRIORITY = "00401003"
_REQUEST_ATTRIBUTES_SEQUENCE = "00400275"
_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


@dataclass(frozen=True)
class InstanceFacts:
    """What routing knows of one instance.

    `attributes` are catalog columns (snake_case keywords, ``calling_ae``...); `header`
    is the instance's DICOM JSON model (catalog ``header_json``), read for attributes
    `attributes` does not hold (the catalog has no column for them); `received_at` is
    when the archive received it (time windows are evaluated against it, so a backtest
    over past data is right).
    """

    attributes: Mapping[str, Any]
    received_at: datetime
    header: Mapping[str, Any] | None = None
    worklist_priority: str | None = None

    def value(self, keyword: str) -> str | None:
        """The value of `keyword` (or ``calling_ae``), multiple values joined by ``\\``."""
        column = keyword if keyword == "calling_ae" else _column(keyword)
        if column in self.attributes or (column in CATALOG_COLUMNS and self.header is None):
            raw = self.attributes.get(column)
            return None if raw is None else str(raw)
        if self.header is None:
            return None
        tag = keyword_dict.get(keyword)
        if tag is None:
            return None
        return json_text(self.header.get(f"{tag:08X}"))


def json_text(element: Any) -> str | None:
    """A DICOM JSON element's value as DICOM text (``\\`` between values); None if absent
    or a sequence.

    >>> json_text({"vr": "PN", "Value": [{"Alphabetic": "Doe^Jane"}]})
    'Doe^Jane'
    >>> json_text({"vr": "CS", "Value": ["ORIGINAL", "PRIMARY"]})
    'ORIGINAL\\\\PRIMARY'
    """
    if not isinstance(element, Mapping) or element.get("vr") == "SQ":
        return None
    values = element.get("Value")
    if not isinstance(values, list) or not values:
        return None
    out = []
    for v in values:
        if isinstance(v, Mapping):
            v = v.get("Alphabetic", "")
        out.append("" if v is None else str(v))
    return "\\".join(out)


def header_from_json(text: str | None) -> dict[str, Any] | None:
    """The catalog's ``header_json`` parsed (None for none or unreadable)."""
    if not text:
        return None
    try:
        parsed = json.loads(text)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


def priority_term(value: str | None) -> Priority | None:
    """A RequestedProcedurePriority value (header or worklist) as a route priority.

    >>> priority_term("stat "), priority_term("MEDIUM"), priority_term("soon")
    ('STAT', 'ROUTINE', None)
    """
    if value is None:
        return None
    return _PRIORITY_TERMS.get(value.strip().upper())


def header_priority(header: Mapping[str, Any] | None) -> Priority | None:
    """RequestedProcedurePriority of a header: top level, else the first Request
    Attributes Sequence item that has one."""
    if header is None:
        return None
    found = priority_term(json_text(header.get(_REQUESTED_PROCEDURE_PRIORITY)))
    if found is not None:
        return found
    seq = header.get(_REQUEST_ATTRIBUTES_SEQUENCE)
    items = seq.get("Value") if isinstance(seq, Mapping) else None
    for item in items if isinstance(items, list) else []:
        if isinstance(item, Mapping):
            found = priority_term(json_text(item.get(_REQUESTED_PROCEDURE_PRIORITY)))
            if found is not None:
                return found
    return None


def in_window(window: TimeWindow, at: datetime) -> bool:
    """Whether `at` (naive: UTC) falls in `window`, in the window's time zone.

    An overnight window (start after end) belongs to the day it starts on.
    """
    aware = at if at.tzinfo is not None else at.replace(tzinfo=UTC)
    local = aware.astimezone(window.zone)
    day, now = _DAYS[local.weekday()], local.time().replace(tzinfo=None)
    bounds = window.bounds()
    if bounds is None:
        return day in window.days
    start, end = bounds
    if start < end:
        return day in window.days and start <= now < end
    yesterday = _DAYS[(local - timedelta(days=1)).weekday()]
    return (day in window.days and now >= start) or (yesterday in window.days and now < end)


@dataclass(frozen=True)
class Route:
    """One matched rule: where the instance goes and how urgently."""

    index: int  # the rule's 1-based position
    rule: Rule
    priority: Priority
    priority_source: PrioritySource

    @property
    def destination(self) -> DicomDestination | S3Destination | StowDestination | FolderDestination:
        return self.rule.destination


@dataclass(frozen=True)
class _Compiled:
    terms: tuple[tuple[str, tuple[Match, ...], bool], ...]
    windows: tuple[TimeWindow, ...]
    negated: _Compiled | None

    @classmethod
    def of(cls, condition: Condition) -> _Compiled:
        terms = tuple(
            (keyword, found, keyword != "calling_ae" and keyword_vr(keyword) == "PN")
            for keyword, found in condition.terms()
        )
        negated = cls.of(condition.not_) if condition.not_ is not None else None
        return cls(terms, tuple(condition.windows()), negated)

    def test(self, facts: InstanceFacts) -> bool:
        for keyword, alternatives, fuzzy in self.terms:
            value = facts.value(keyword)
            # PS3.4 C.2.2.2: person names match case- and accent-insensitively here.
            if not any(matches(m, value, fuzzy=fuzzy) for m in alternatives):
                return False
        if self.windows and not any(in_window(w, facts.received_at) for w in self.windows):
            return False
        return not (self.negated is not None and self.negated.test(facts))


@dataclass
class Router:
    """Rules compiled once, then evaluated for any number of instances."""

    rules: RoutingRules
    _compiled: list[_Compiled] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._compiled = [_Compiled.of(rule.condition) for rule in self.rules.rules]

    def routes(self, facts: InstanceFacts) -> list[Route]:
        """Every rule `facts` matches, in rule order."""
        out = []
        derived: tuple[Priority, PrioritySource] | None = None
        for index, (rule, compiled) in enumerate(
            zip(self.rules.rules, self._compiled, strict=True), start=1
        ):
            if not compiled.test(facts):
                continue
            if rule.priority is not None:
                out.append(Route(index, rule, rule.priority, "rule"))
                continue
            if derived is None:
                derived = derive_priority(facts)
            out.append(Route(index, rule, *derived))
        return out


def derive_priority(facts: InstanceFacts) -> tuple[Priority, PrioritySource]:
    """The header's RequestedProcedurePriority, else the worklist's, else ROUTINE."""
    found = header_priority(facts.header)
    if found is not None:
        return found, "header"
    found = priority_term(facts.worklist_priority)
    if found is not None:
        return found, "worklist"
    return "ROUTINE", "default"


def evaluate(rules: RoutingRules, facts: InstanceFacts) -> list[Route]:
    """The routes of one instance: each rule it matches, with its destination and priority.

    A condition's fields must all match (a list value: any of its values); ``not``
    excludes what its condition matches; ``time`` windows test `facts.received_at`.
    The priority is the rule's, else derived (:func:`derive_priority`). For many
    instances build a :class:`Router` once.
    """
    return Router(rules).routes(facts)
