"""The one query engine: QIDO-RS and C-FIND (and worklist C-FIND) requests become
parameterised DuckDB SQL over the catalog tables, whose answers DuckDB writes as DICOM JSON.

Request values are only ever bound as parameters; SQL text is built from the attribute
registry (``dicom.keys``), never from request input.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
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
    # An access scope (a study-scoped token): when `within_studies` is not None, only the
    # rows of those studies, or of the patient `within_patient`, are answered. It is part
    # of the SQL, so limit/offset count the allowed rows only.
    within_studies: tuple[str, ...] | None = None
    within_patient: str | None = None


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
    source: str  # FROM ... WHERE ... ORDER BY ... [LIMIT ?] [OFFSET ?]: the SELECT list is added
    params: list[Any]
    returned: list[Attribute]
    ignored: list[str]  # includefield keys this level does not hold
    unmatched: list[str]  # keys returned but matched universally (not indexed)


def compile_query(spec: QuerySpec) -> CompiledQuery:
    """The rows to answer `spec` (SQL after the SELECT list), its parameters, and the
    attributes to return.

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
    if spec.within_studies is not None:
        allowed: list[str] = []
        if spec.within_studies:
            allowed.append("list_contains(?, study_instance_uid)")
            params.append(list(spec.within_studies))
        if spec.within_patient is not None:
            allowed.append("patient_id = ?")
            params.append(spec.within_patient)
        where.append("(" + " OR ".join(allowed) + ")" if allowed else "FALSE")
    ignored: list[str] = []
    returned = _return_keys(spec, matched, ignored)
    order = _DEFAULT_ORDER[spec.level]
    if spec.order_by:
        terms = []
        for key, descending in spec.order_by:
            attr = _resolve(key, spec.level)
            if attr.column is None:
                raise InvalidQueryError(f"cannot order by {attr.keyword}")
            terms.append(f"{attr.column} {'DESC' if descending else 'ASC'} NULLS LAST")
        order = ", ".join([*terms, order])
    sql = f"FROM {table}"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += f" ORDER BY {order}"
    if spec.limit is not None or spec.offset:
        if spec.limit is not None:
            sql += " LIMIT ?"
            params.append(spec.limit + 1)  # one more tells whether the answer was cut short
        if spec.offset:
            sql += " OFFSET ?"
            params.append(spec.offset)
        # The page is chosen first and only its rows are encoded: DuckDB would otherwise
        # build every match's answer before its top-N keeps `limit` of them (ModalitiesInStudy
        # limit=101 at 10M instances: p50 52 ms -> 20 ms, docs/benchmarks.md "Catalog at scale").
        sql = f"FROM (SELECT * {sql}) AS {table} ORDER BY {order}"
    return CompiledQuery(sql, params, returned, ignored, unmatched)


_PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")
_RETRIEVE_URL = "00081190"
# DuckDB column types whose values Python hands to the encoder as int.
_INT_TYPES = frozenset(
    {"TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT"}
    | {"UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT", "UHUGEINT"}
)
_HEADER_COLUMNS = ("source_file", "sop_instance_uid", "checksum", "study_instance_uid")
# PS3.18 10.6.3.3: the RetrieveURL path of an answer at each level, from its UIDs.
_RETRIEVE_PATH = {
    Level.STUDY: (("studies", "StudyInstanceUID"),),
    Level.SERIES: (("studies", "StudyInstanceUID"), ("series", "SeriesInstanceUID")),
    Level.IMAGE: (
        ("studies", "StudyInstanceUID"),
        ("series", "SeriesInstanceUID"),
        ("instances", "SOPInstanceUID"),
    ),
}


def _person_names(value: Any) -> list[Any]:
    names: list[Any] = []
    for part in str(value).split("\\"):
        groups = part.split("=")
        names.append({k: g for k, g in zip(_PN_GROUPS, groups, strict=False) if g})
    return names


def _numbers(kind: type) -> Callable[[Any], list[Any]]:
    def convert(value: Any) -> list[Any]:
        if isinstance(value, int | float):
            numbers = [value]
        else:
            numbers = [kind(p) for p in str(value).split("\\")]
        # NaN and infinities have no JSON number: null, as orjson writes them.
        return [None if isinstance(n, float) and not math.isfinite(n) else n for n in numbers]

    return convert


def _strings(value: Any) -> list[Any]:
    return str(value).split("\\")


def _converter(vr: str) -> Callable[[Any], list[Any]]:
    """Catalog value -> DICOM JSON "Value" list for `vr` (PS3.18 F.2.3)."""
    if vr == "PN":
        return _person_names
    if vr in _INT_VRS:
        return _numbers(int)
    if vr in _FLOAT_VRS:
        return _numbers(float)
    return _strings


def _json_sql(value: str) -> str:
    """SQL for the JSON text of the string (or list of strings) `value`."""
    return f"to_json({value})::VARCHAR"


def _value_sql(attr: Attribute, column_type: str | None) -> str | None:
    """SQL for the DICOM JSON text of `attr` from its column (PS3.18 F.2), or None when
    DuckDB cannot write it exactly as the Python converters would (Python writes it)."""
    col, vr = attr.column, attr.vr
    if col is None:
        return None
    empty = f"""'{{"vr":"{vr}"}}'"""
    head = f"""'{{"vr":"{vr}","Value":'"""
    if column_type in _INT_TYPES and vr in _INT_VRS:
        number = f"{col}::VARCHAR"
        return f"CASE WHEN {col} IS NULL THEN {empty} ELSE concat({head}, '[', {number}, ']}}') END"
    if column_type != "VARCHAR" or vr in _INT_VRS or vr in _FLOAT_VRS:
        return None
    if vr == "PN":
        # PS3.18 F.2.2: each value an object of its non-empty component groups. Most
        # names are one value of one group; the general case (a map keeps key order) is
        # slower to run, so it runs only for the values that need it.
        keys = ", ".join(f"'{k}'" for k in _PN_GROUPS)
        groups = (
            f"list_transform(string_split({col}, '\\'), lambda _pn: map_from_entries("
            f"list_filter(list_zip([{keys}], string_split(_pn, '=')[1:3]), "
            "lambda _g: _g[2] <> '')))"
        )
        values = (
            f"CASE WHEN contains({col}, '=') OR contains({col}, '\\') "
            f"THEN {_json_sql(groups)} "
            f"""ELSE concat('[{{"{_PN_GROUPS[0]}":', {_json_sql(col)}, '}}]') END"""
        )
    else:
        values = _json_sql(f"string_split({col}, '\\')")
    filled = f"concat({head}, {values}, '}}')"
    return f"CASE WHEN {col} IS NULL OR {col} = '' THEN {empty} ELSE {filled} END"


def _retrieve_url_sql(level: Level) -> str:
    """SQL for the RetrieveURL text of an answer: the base URL (bound) and its UIDs."""
    path = _RETRIEVE_PATH.get(level)
    if path is None:
        raise InvalidQueryError(f"{level} level answers have no RetrieveURL")
    url = "?::VARCHAR"
    for segment, keyword in path:
        column = attribute_at(keyword, level).column
        # The UID's first value, as a client reads it from the answer ("" when empty).
        url += f" || '/{segment}/' || coalesce(split_part({column}, '\\', 1), '')"
    return f"""'{{"vr":"UR","Value":[' || {_json_sql(url)} || ']}}'"""


@dataclass(frozen=True)
class _PythonMember:
    """An answer attribute Python writes: from a raw column, or from the header JSON."""

    tag: str
    vr: str
    convert: Callable[[Any], list[Any]]
    index: int | None  # position of its column in the SELECT list; None: header JSON


class AnswerEncoder:
    """Catalog rows -> DICOM JSON text of each answer (PS3.18 F.2), mostly written by DuckDB.

    ``select`` is the SELECT list (built from the attribute registry only) and
    ``params`` its bound values; :meth:`texts` turns the fetched rows into one JSON object
    text per answer, members in tag order. Column-backed attributes are written in SQL;
    the others (header-only attributes, column types SQL does not write exactly) in
    Python, merged in place. With `retrieve_base`, every answer also carries its
    RetrieveURL (0008,1190): in place if it was asked for, else last.

    With `in_sql` off, Python writes every member from the raw columns (:meth:`dicts`):
    the same answers (the SQL is written to match the Python converters), for a caller
    that wants the answers as objects and few of them. DuckDB binds and plans the SQL
    text expressions on every query, about 2.5 ms on a study-level SELECT; a C-FIND's
    handful of answers take microseconds in Python.
    """

    def __init__(
        self,
        returned: Sequence[Attribute],
        column_types: Mapping[str, str],
        level: Level,
        retrieve_base: str | None = None,
        *,
        in_sql: bool = True,
    ) -> None:
        if not in_sql and retrieve_base is not None:
            raise ValueError("a RetrieveURL is written in SQL only")
        self.select: list[str] = []
        self.params: list[Any] = []
        self._parts: list[int | _PythonMember] = []  # SELECT position of SQL text, or Python
        self.header_at: int | None = None  # SELECT position of the header columns
        segments: list[list[str]] = []  # SQL pieces of each run of members SQL writes
        run: list[str] = []

        def flush() -> None:
            if run:
                self._parts.append(len(self.select))
                self.select.append("")  # concat(...) of the pieces, below
                segments.append(run[:])
                run.clear()

        def add(tag: str, value_sql: str) -> None:
            run.extend([f"'{',' if run else ''}\"{tag}\":'", value_sql])

        pending_url = retrieve_base is not None
        for attr in sorted(returned, key=lambda a: a.tag):
            if attr.tag == _RETRIEVE_URL and pending_url:
                self.params.append(retrieve_base)
                add(attr.tag, _retrieve_url_sql(level))
                pending_url = False
                continue
            sql = _value_sql(attr, column_types.get(attr.column or "")) if in_sql else None
            if sql is not None:
                add(attr.tag, sql)
                continue
            flush()
            index = None
            if attr.column is not None:
                index = len(self.select)
                self.select.append(attr.column)
            self._parts.append(_PythonMember(attr.tag, attr.vr, _converter(attr.vr), index))
        if pending_url:
            self.params.append(retrieve_base)
            add(_RETRIEVE_URL, _retrieve_url_sql(level))
        flush()
        self._whole = self._parts == [0]  # SQL writes the whole object
        if self._whole:
            segments[0] = ["'{'", *segments[0], "'}'"]
        at = [p for p in self._parts if isinstance(p, int)]
        for i, segment in zip(at, segments, strict=True):
            # One concat() of every piece: chained || copies the growing text each time.
            self.select[i] = f"concat({', '.join(segment)})"
        if any(isinstance(p, _PythonMember) and p.index is None for p in self._parts):
            self.header_at = len(self.select)
            self.select += _HEADER_COLUMNS
        if not self.select:
            self.select.append("'{}'")
            self._whole = True
        self.select = [f"{s} AS _a{i}" for i, s in enumerate(self.select)]

    def header_keys(self, rows: Sequence[tuple[Any, ...]]) -> list[tuple[str, str, str, str]]:
        """(source_file, sop_instance_uid, checksum, study_instance_uid) of each row, to
        fetch their headers."""
        at = self.header_at
        assert at is not None
        return [(r[at], r[at + 1], r[at + 2], r[at + 3]) for r in rows]

    def texts(
        self,
        rows: Sequence[tuple[Any, ...]],
        headers: Mapping[tuple[str, str], str] | None = None,
    ) -> list[str]:
        """The DICOM JSON object text of each row (`headers` as from CatalogReader.headers)."""
        if self._whole:
            return [r[0] for r in rows]
        out: list[str] = []
        for row in rows:
            header: dict[str, Any] | None = None
            members: list[str] = []
            for part in self._parts:
                if isinstance(part, int):
                    members.append(row[part])
                    continue
                if part.index is None:
                    if header is None:
                        header = self._header(row, headers or {})
                    member = header.get(part.tag, {"vr": part.vr})
                else:
                    member = _python_member(part, row[part.index])
                members.append(f'"{part.tag}":{_dumps(member)}')
            out.append("{" + ",".join(members) + "}")
        return out

    def dicts(
        self,
        rows: Sequence[tuple[Any, ...]],
        headers: Mapping[tuple[str, str], str] | None = None,
    ) -> list[dict[str, Any]]:
        """Each row's answer as a DICOM JSON dict (what ``json.loads`` of :meth:`texts`
        gives), for an encoder built with `in_sql` off."""
        if any(isinstance(part, int) for part in self._parts):
            return [json.loads(text) for text in self.texts(rows, headers)]
        out: list[dict[str, Any]] = []
        for row in rows:
            header: dict[str, Any] | None = None
            answer: dict[str, Any] = {}
            for part in self._parts:
                assert isinstance(part, _PythonMember)
                if part.index is None:
                    if header is None:
                        header = self._header(row, headers or {})
                    answer[part.tag] = header.get(part.tag, {"vr": part.vr})
                else:
                    answer[part.tag] = _python_member(part, row[part.index])
            out.append(answer)
        return out

    def _header(
        self, row: tuple[Any, ...], headers: Mapping[tuple[str, str], str]
    ) -> dict[str, Any]:
        assert self.header_at is not None
        text = headers.get((row[self.header_at + 1], row[self.header_at + 2]))
        # NaN and infinities (FL/FD) have no JSON number: null, as orjson writes them.
        found: dict[str, Any] = json.loads(text or "{}", parse_constant=lambda _: None)
        return found


def _python_member(part: _PythonMember, value: Any) -> dict[str, Any]:
    if value is None or value == "":
        return {"vr": part.vr}
    try:
        return {"vr": part.vr, "Value": part.convert(value)}
    except ValueError:
        return {"vr": part.vr}  # an invalid stored number: say nothing


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True)
class JsonAnswers:
    """A query's answers as one DICOM JSON array (PS3.18 F.2), UTF-8."""

    body: bytes
    count: int
    more: bool  # the limit cut the answer short
    warnings: list[str]


@dataclass
class _Fetched:
    encoder: AnswerEncoder
    rows: list[tuple[Any, ...]]
    headers: Mapping[tuple[str, str], str] | None
    more: bool
    warnings: list[str]


def _fetch(
    reader: CatalogReader, spec: QuerySpec, retrieve_base: str | None, *, in_sql: bool = True
) -> _Fetched:
    compiled = compile_query(spec)
    encoder = AnswerEncoder(
        compiled.returned,
        reader.column_types(_TABLES[spec.level]),
        spec.level,
        retrieve_base,
        in_sql=in_sql,
    )
    sql = f"SELECT {', '.join(encoder.select)} {compiled.source}"
    rows = reader.query(sql, [*encoder.params, *compiled.params])
    more = spec.limit is not None and len(rows) > spec.limit
    if more:
        rows = rows[: spec.limit]
    headers = reader.headers(encoder.header_keys(rows)) if encoder.header_at is not None else None
    warnings = [f"{k} not returned" for k in compiled.ignored] + [
        f"{k} is not indexed: matched universally" for k in compiled.unmatched
    ]
    return _Fetched(encoder, rows, headers, more, warnings)


def _answer_texts(
    reader: CatalogReader, spec: QuerySpec, retrieve_base: str | None
) -> tuple[list[str], bool, list[str]]:
    fetched = _fetch(reader, spec, retrieve_base)
    return fetched.encoder.texts(fetched.rows, fetched.headers), fetched.more, fetched.warnings


def run_query(reader: CatalogReader, spec: QuerySpec) -> QueryResult:
    """Answer `spec` from the catalog alone (never opens a DICOM file), as DICOM JSON dicts.

    The answers are written in Python from the raw columns (``AnswerEncoder(in_sql=False)``):
    the same dicts as ``json.loads`` of :func:`run_query_json`'s answers, without DuckDB
    binding a text expression per attribute (C-FIND asks for a few answers at a time).
    """
    fetched = _fetch(reader, spec, None, in_sql=False)
    rows = fetched.encoder.dicts(fetched.rows, fetched.headers)
    return QueryResult(rows, fetched.more, fetched.warnings)


def run_query_json(
    reader: CatalogReader, spec: QuerySpec, retrieve_base: str | None = None
) -> JsonAnswers:
    """Answer `spec` as one DICOM JSON array, with no per-answer Python objects.

    Parameters
    ----------
    reader
        The catalog.
    spec
        The query.
    retrieve_base
        The DICOMweb base URL (bound as a parameter): each answer then carries its
        RetrieveURL (0008,1190), ``<base>/studies/<uid>[/series/<uid>[/instances/<uid>]]``.

    Raises
    ------
    InvalidQueryError
        As :func:`compile_query`.
    """
    texts, more, warnings = _answer_texts(reader, spec, retrieve_base)
    body = ("[" + ",".join(texts) + "]").encode()
    return JsonAnswers(body, len(texts), more, warnings)
