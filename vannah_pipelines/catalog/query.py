"""The one query engine: QIDO-RS and C-FIND (and worklist C-FIND) requests become
parameterised DuckDB SQL over the catalog tables, and rows become DICOM JSON.

Request values are only ever bound as parameters; SQL text is built from the attribute
registry (``dicom.keys``), never from request input.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from vannah_pipelines.catalog.reader import CatalogReader
from vannah_pipelines.dicom.keys import Attribute, Level, attribute_at
from vannah_pipelines.dicom.matching import (
    InvalidMatchError,
    Match,
    Range,
    Single,
    UidList,
    Universal,
    Wildcard,
    fold,
    parse_match,
    wildcard_to_like,
)

_TABLES = {
    Level.PATIENT: "patients",
    Level.STUDY: "studies",
    Level.SERIES: "series",
    Level.IMAGE: "instances",
}
_DEFAULT_ORDER = {
    Level.PATIENT: "patient_id NULLS LAST",
    Level.STUDY: "study_date DESC NULLS LAST, study_time DESC NULLS LAST, study_instance_uid",
    Level.SERIES: "series_number NULLS LAST, series_instance_uid",
    Level.IMAGE: "instance_number NULLS LAST, sop_instance_uid",
}

# PS3.18 tables 10.6.3-3/4/5 (and PS3.4 C.6.1.1.2 for patients): default return keys.
PATIENT_DEFAULT = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "NumberOfPatientRelatedStudies",
    "NumberOfPatientRelatedSeries",
    "NumberOfPatientRelatedInstances",
)
STUDY_DEFAULT = (
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "InstanceAvailability",
    "ModalitiesInStudy",
    "ReferringPhysicianName",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyID",
    "StudyDescription",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)
SERIES_DEFAULT = (
    "Modality",
    "SeriesDescription",
    "SeriesInstanceUID",
    "SeriesNumber",
    "NumberOfSeriesRelatedInstances",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
    "BodyPartExamined",
    "InstanceAvailability",
    "StudyInstanceUID",
)
IMAGE_DEFAULT = (
    "SOPClassUID",
    "SOPInstanceUID",
    "InstanceAvailability",
    "InstanceNumber",
    "Rows",
    "Columns",
    "BitsAllocated",
    "NumberOfFrames",
    "SeriesInstanceUID",
    "StudyInstanceUID",
)
# Study attributes a series or instance answer carries when not scoped to one study.
_STUDY_CONTEXT = tuple(
    k
    for k in STUDY_DEFAULT
    if k
    not in (
        "ModalitiesInStudy",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
        "InstanceAvailability",
    )
)
_SERIES_CONTEXT = ("Modality", "SeriesNumber", "SeriesDescription", "SeriesInstanceUID")

_INT_VRS = frozenset({"IS", "US", "UL", "SS", "SL", "UV", "SV"})
_FLOAT_VRS = frozenset({"DS", "FL", "FD"})


class InvalidQueryError(ValueError):
    """A query that cannot be answered as asked (unknown attribute, malformed value)."""


@dataclass(frozen=True)
class QuerySpec:
    """A level, matching keys with their raw DICOM values, and what to return."""

    level: Level
    filters: tuple[tuple[str, str], ...] = ()  # (keyword or tag, raw value)
    include: tuple[str, ...] = ()  # extra keywords/tags to return
    include_all: bool = False
    fuzzy: bool = False
    limit: int | None = None
    offset: int = 0
    order_by: tuple[tuple[str, bool], ...] = ()  # (keyword, descending)
    scoped_to_study: bool = False
    scoped_to_series: bool = False


@dataclass
class QueryResult:
    rows: list[dict[str, Any]] = field(default_factory=list)
    more: bool = False  # the limit cut the answer short
    warnings: list[str] = field(default_factory=list)


def _resolve(key: str, level: Level) -> Attribute:
    try:
        return attribute_at(key, level)
    except ValueError as exc:
        raise InvalidQueryError(str(exc)) from exc


def _condition(attr: Attribute, match: Match, fuzzy: bool) -> tuple[str, list[Any]]:
    assert attr.column is not None
    col = attr.column
    pn_fuzzy = fuzzy and attr.vr == "PN"
    if isinstance(match, Single):
        if attr.vr in _INT_VRS:
            try:
                return f"{col} = ?", [int(match.value)]
            except ValueError as exc:
                raise InvalidQueryError(f"{attr.keyword}: not a number") from exc
        if pn_fuzzy:
            # Case- and accent-insensitive; matches the start of any name component.
            pattern = r"(^|[\^ =])" + re.escape(fold(match.value))
            return f"regexp_matches(lower(strip_accents({col})), ?)", [pattern]
        if attr.multi_valued:
            return f"list_contains(string_split({col}, '\\'), ?)", [match.value]
        return f"{col} = ?", [match.value]
    if isinstance(match, UidList):
        values: list[Any] = list(match.values)
        if attr.vr in _INT_VRS:
            try:
                values = [int(v) for v in values]
            except ValueError as exc:
                raise InvalidQueryError(f"{attr.keyword}: not a number") from exc
        if attr.multi_valued:
            return f"list_has_any(string_split({col}, '\\'), ?)", [values]
        return f"list_contains(?, {col})", [values]
    if isinstance(match, Wildcard):
        if attr.multi_valued:
            regex = "".join(
                ".*" if c == "*" else "." if c == "?" else re.escape(c) for c in match.pattern
            )
            return f"regexp_matches({col}, ?)", [r"(^|\\)" + regex + r"(\\|$)"]
        if pn_fuzzy:
            return (
                f"lower(strip_accents({col})) LIKE ? ESCAPE '\\'",
                [wildcard_to_like(fold(match.pattern))],
            )
        return f"{col} LIKE ? ESCAPE '\\'", [wildcard_to_like(match.pattern)]
    if isinstance(match, Range):
        parts: list[str] = []
        params: list[Any] = []
        if match.low is not None:
            parts.append(f"{col} >= ?")
            params.append(match.low)
        if match.high is not None:
            # A lower-precision end covers its whole unit (-1100 includes 11:00:59).
            parts.append(f"left({col}, ?) <= ?")
            params.extend([len(match.high), match.high])
        return " AND ".join(parts), params
    raise AssertionError(match)


def _return_keys(spec: QuerySpec, matched: list[Attribute], ignored: list[str]) -> list[Attribute]:
    level = spec.level
    keys: list[str] = []
    if level == Level.PATIENT:
        keys += PATIENT_DEFAULT
    elif level == Level.STUDY:
        keys += STUDY_DEFAULT
    elif level == Level.SERIES:
        keys += SERIES_DEFAULT
        if not spec.scoped_to_study:
            keys += _STUDY_CONTEXT
    elif level == Level.IMAGE:
        keys += IMAGE_DEFAULT
        if not spec.scoped_to_series:
            keys += _SERIES_CONTEXT
        if not spec.scoped_to_study:
            keys += _STUDY_CONTEXT
    if spec.include_all:
        from vannah_pipelines.dicom.keys import ATTRIBUTES

        keys += [k for k, a in ATTRIBUTES.items() if _visible(a, level)]
    seen: dict[str, Attribute] = {}
    for key in keys:
        attr = _resolve(key, level)
        seen.setdefault(attr.keyword, attr)
    for key in spec.include:
        # An includefield this level does not hold (OHIF asks Modality of studies) is
        # left out with a warning, not refused (PS3.18 8.3.4.3).
        try:
            attr = attribute_at(key, level)
        except ValueError as exc:
            ignored.append(str(exc))
            continue
        seen.setdefault(attr.keyword, attr)
    for attr in matched:
        seen.setdefault(attr.keyword, attr)
    return list(seen.values())


def _visible(attr: Attribute, level: Level) -> bool:
    try:
        attribute_at(attr.keyword, level)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class CompiledQuery:
    sql: str
    params: list[Any]
    returned: list[Attribute]
    ignored: list[str]  # includefield keys this level does not hold
    unmatched: list[str]  # keys returned but matched universally (not indexed)


def compile_query(spec: QuerySpec) -> CompiledQuery:
    """SQL, its parameters, and the attributes to return, for `spec`.

    Raises
    ------
    InvalidQueryError
        For an unknown attribute, a value that cannot match its VR, or a bad order key.
    """
    table = _TABLES.get(spec.level)
    if table is None:
        raise InvalidQueryError(f"{spec.level} level is not queryable here")
    where: list[str] = []
    params: list[Any] = []
    matched: list[Attribute] = []
    unmatched: list[str] = []
    for key, value in spec.filters:
        attr = _resolve(key, spec.level)
        matched.append(attr)
        try:
            match = parse_match(attr.vr, value)
        except InvalidMatchError as exc:
            raise InvalidQueryError(f"{attr.keyword}: {exc}") from exc
        if isinstance(match, Universal):
            continue
        if attr.column is None:
            # PS3.4 C.2.2.1.3 / PS3.18 8.3.4: an optional key the catalog does not index
            # is returned but matched universally, and the answer says so.
            unmatched.append(attr.keyword)
            continue
        sql, values = _condition(attr, match, spec.fuzzy)
        where.append(f"({sql})")
        params.extend(values)
    ignored: list[str] = []
    returned = _return_keys(spec, matched, ignored)
    columns = sorted({a.column for a in returned if a.column is not None})
    if any(a.column is None for a in returned):
        columns += ["source_file", "sop_instance_uid", "checksum"]
    order = _DEFAULT_ORDER[spec.level]
    if spec.order_by:
        terms = []
        for key, descending in spec.order_by:
            attr = _resolve(key, spec.level)
            if attr.column is None:
                raise InvalidQueryError(f"cannot order by {attr.keyword}")
            terms.append(f"{attr.column} {'DESC' if descending else 'ASC'} NULLS LAST")
        order = ", ".join([*terms, order])
    sql = f"SELECT {', '.join(columns)} FROM {table}"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += f" ORDER BY {order}"
    if spec.limit is not None:
        sql += " LIMIT ?"
        params.append(spec.limit + 1)  # one more tells whether the answer was cut short
    if spec.offset:
        sql += " OFFSET ?"
        params.append(spec.offset)
    return CompiledQuery(sql, params, returned, ignored, unmatched)


_PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")


def _person_names(value: Any) -> list[Any]:
    names: list[Any] = []
    for part in str(value).split("\\"):
        if "=" not in part:
            names.append({"Alphabetic": part} if part else {})
        else:
            groups = part.split("=")
            names.append({k: g for k, g in zip(_PN_GROUPS, groups, strict=False) if g})
    return names


def _numbers(kind: type) -> Callable[[Any], list[Any]]:
    def convert(value: Any) -> list[Any]:
        if isinstance(value, int | float):
            return [value]
        return [kind(p) for p in str(value).split("\\")]

    return convert


def _strings(value: Any) -> list[Any]:
    text = str(value)
    return text.split("\\") if "\\" in text else [text]


def _converter(vr: str) -> Callable[[Any], list[Any]]:
    """Catalog value -> DICOM JSON "Value" list for `vr` (PS3.18 F.2.3)."""
    if vr == "PN":
        return _person_names
    if vr in _INT_VRS:
        return _numbers(int)
    if vr in _FLOAT_VRS:
        return _numbers(float)
    return _strings


def to_dicom_json(row: dict[str, Any], returned: Sequence[Attribute]) -> dict[str, Any]:
    """One answer in the DICOM JSON model (PS3.18 F.2), every returned key present."""
    return _Encoder(returned)(row)


class _Encoder:
    """Rows -> DICOM JSON for one set of returned attributes (converters chosen once)."""

    def __init__(self, returned: Sequence[Attribute]) -> None:
        ordered = sorted(returned, key=lambda a: a.tag)
        self.fields = [(a.tag, a.vr, a.column, _converter(a.vr)) for a in ordered]

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        header: dict[str, Any] | None = None
        out: dict[str, Any] = {}
        for tag, vr, column, convert in self.fields:
            if column is None:
                if header is None:
                    header = json.loads(row.get("_header") or "{}")
                out[tag] = header.get(tag, {"vr": vr})
                continue
            value = row.get(column)
            if value is None or value == "":
                out[tag] = {"vr": vr}
            elif convert is _strings and "\\" not in value:
                out[tag] = {"vr": vr, "Value": [value]}  # the common case, inlined
            else:
                try:
                    out[tag] = {"vr": vr, "Value": convert(value)}
                except ValueError:
                    out[tag] = {"vr": vr}  # an invalid stored number: say nothing
        return out


def run_query(reader: CatalogReader, spec: QuerySpec) -> QueryResult:
    """Answer `spec` from the catalog alone (never opens a DICOM file)."""
    compiled = compile_query(spec)
    rows = reader.query_dicts(compiled.sql, compiled.params)
    more = spec.limit is not None and len(rows) > spec.limit
    if more:
        rows = rows[: spec.limit]
    if "source_file" in compiled.sql:
        headers = reader.headers(
            [(r["source_file"], r["sop_instance_uid"], r["checksum"]) for r in rows]
        )
        for r in rows:
            r["_header"] = headers.get((r["sop_instance_uid"], r["checksum"]))
    encode = _Encoder(compiled.returned)
    answers = [encode(r) for r in rows]
    warnings = [f"{k} not returned" for k in compiled.ignored] + [
        f"{k} is not indexed: matched universally" for k in compiled.unmatched
    ]
    return QueryResult(answers, more, warnings)
