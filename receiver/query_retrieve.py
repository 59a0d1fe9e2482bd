"""Query/Retrieve identifiers -> the shared query engine -> answers (PS3.4 C.4, C.6).

C-FIND, C-MOVE and C-GET identifiers become a :class:`QuerySpec` answered by
:func:`run_query`, the same engine (and matcher) as QIDO-RS. Only the hierarchical model is
offered (no relational-queries extended negotiation), so the PS3.4 C.4.1.2.2 rules hold:
the unique key of every level above the query level is present with a single value.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag

from receiver.contexts import PATIENT_ROOT
from receiver.responses import without_values
from receiver.status import FindStatus
from vannah_pipelines.catalog.holder import CatalogHolder
from vannah_pipelines.catalog.lookup import (
    StoredInstance,
    find_instances,
    representative_headers,
)
from vannah_pipelines.catalog.query import InvalidQueryError, QuerySpec, run_query
from vannah_pipelines.catalog.reader import CatalogReader
from vannah_pipelines.dicom.identifier import IdentifierQuery, compile_identifier
from vannah_pipelines.dicom.keys import Level, UnknownAttributeError, attribute_at
from vannah_pipelines.dicom.matching import (
    InvalidMatchError,
    Single,
    Universal,
    Wildcard,
    parse_match,
)

log = logging.getLogger(__name__)

UNIQUE_KEYS: dict[Level, str] = {
    Level.PATIENT: "PatientID",
    Level.STUDY: "StudyInstanceUID",
    Level.SERIES: "SeriesInstanceUID",
    Level.IMAGE: "SOPInstanceUID",
}
_PATIENT_ROOT_LEVELS = (Level.PATIENT, Level.STUDY, Level.SERIES, Level.IMAGE)
_STUDY_ROOT_LEVELS = (Level.STUDY, Level.SERIES, Level.IMAGE)

QUERY_RETRIEVE_LEVEL = Tag(0x0008, 0x0052)
SPECIFIC_CHARACTER_SET = Tag(0x0008, 0x0005)
RETRIEVE_AE_TITLE = Tag(0x0008, 0x0054)
UTF8 = "ISO_IR 192"

_TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "UC", "PN"})
_FREE_TEXT_VRS = frozenset({"ST", "LT", "UT"})  # leading spaces are significant
# VRs whose value in an identifier is not text: not matched by the engine.
_UNMATCHABLE_VRS = frozenset(
    {"SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN", "AT", "US", "SS", "UL", "SL", "FL", "FD"}
)
# Binary VRs: never matched, returned empty if asked (PS3.4 C.2.2.2: no matching defined).
_BINARY_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN", "AT"})


class QueryRefusedError(Exception):
    """An identifier that cannot be answered: a DIMSE failure status and a comment."""

    def __init__(self, status: int, comment: str) -> None:
        comment = without_values(comment)  # keywords only: never a query value (PHI)
        super().__init__(comment)
        self.status = status
        self.comment = comment


def _refuse(comment: str) -> QueryRefusedError:
    return QueryRefusedError(FindStatus.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, comment)


def _unprocessable(comment: str) -> QueryRefusedError:
    return QueryRefusedError(FindStatus.UNABLE_TO_PROCESS, comment)


@dataclass(frozen=True)
class Key:
    """One identifier element: keyword, tag, VR and its raw value as text."""

    keyword: str
    tag: BaseTag
    vr: str
    value: str


@dataclass(frozen=True)
class ParsedIdentifier:
    """A Q/R identifier, checked against the hierarchical model of its SOP class."""

    level: Level
    patient_root: bool
    keys: tuple[Key, ...]
    charset: tuple[str, ...] | None  # the request's SpecificCharacterSet values, if present
    dataset: Dataset | None = field(default=None, compare=False)  # the identifier itself

    def key(self, keyword: str) -> Key | None:
        return next((k for k in self.keys if k.keyword == keyword), None)


def _levels(patient_root: bool) -> tuple[Level, ...]:
    return _PATIENT_ROOT_LEVELS if patient_root else _STUDY_ROOT_LEVELS


def _element_text(ds: Dataset, tag: BaseTag, encodings: list[str]) -> tuple[str, str]:
    """(VR, value as text) of an identifier element, read from its raw bytes when raw."""
    item = ds.get_item(tag)
    if item is None:  # pragma: no cover - the tag was just listed
        return "UN", ""
    vr = str(item.VR) if item.VR else dictionary_VR(tag)
    value: Any = item.value
    if isinstance(item, RawDataElement) and isinstance(value, bytes):
        if vr in _UNMATCHABLE_VRS:
            return vr, ""
        if vr in _TEXT_VRS:
            text = decode_bytes(value, encodings, {0x5C, 0x3D, 0x5E})
        else:
            text = value.decode("ascii", errors="replace")
    elif isinstance(item, DataElement):
        if value is None or vr in _UNMATCHABLE_VRS:
            return vr, ""
        if isinstance(value, MultiValue | list | tuple):
            text = "\\".join(str(v) for v in value)
        else:
            text = str(value)
    else:  # pragma: no cover - pydicom only stores these two
        text = ""
    text = text.rstrip(" \x00")
    if vr not in _FREE_TEXT_VRS:
        text = text.lstrip(" ")
    return vr, text


def _request_charset(identifier: Dataset) -> tuple[str, ...] | None:
    if SPECIFIC_CHARACTER_SET not in identifier:
        return None
    _vr, text = _element_text(identifier, SPECIFIC_CHARACTER_SET, ["iso8859"])
    return tuple(text.split("\\")) if text else ()


def parse_identifier(
    identifier: Dataset, sop_class_uid: str, *, retrieve: bool
) -> ParsedIdentifier:
    """Check `identifier` against the hierarchical model of `sop_class_uid` (PS3.4 C.4.1.2.2
    and C.4.2.2.1) and return its keys.

    Raises
    ------
    QueryRefusedError
        0xA900 for a missing or invalid QueryRetrieveLevel, a level the model does not
        have, or a unique key of a higher level (for retrieval: of the query level too)
        missing or not a single value; 0xC000 for a value that cannot be parsed.
    """
    patient_root = sop_class_uid in PATIENT_ROOT
    charset = _request_charset(identifier)
    try:
        encodings = convert_encodings(list(charset) if charset else ["ISO_IR 6"])
    except LookupError as exc:
        raise _unprocessable("unknown SpecificCharacterSet") from exc
    if QUERY_RETRIEVE_LEVEL not in identifier:
        raise _refuse("QueryRetrieveLevel missing")
    _vr, level_text = _element_text(identifier, QUERY_RETRIEVE_LEVEL, encodings)
    try:
        level = Level(level_text.strip())
    except ValueError as exc:
        raise _refuse("QueryRetrieveLevel invalid") from exc
    levels = _levels(patient_root)
    if level not in levels:
        raise _refuse(f"{level} level not in the Study Root model")
    keys: list[Key] = []
    for tag in sorted(identifier.keys()):
        if tag in (QUERY_RETRIEVE_LEVEL, SPECIFIC_CHARACTER_SET) or tag.group == 0x0002:
            continue
        if tag.is_private or tag.element == 0:
            continue  # private attributes and group lengths: never matched or returned
        keyword = keyword_for_tag(tag)
        if not keyword:
            continue
        try:
            vr, text = _element_text(identifier, tag, encodings)
        except (ValueError, UnicodeError) as exc:
            raise _unprocessable(f"{keyword} cannot be decoded") from exc
        keys.append(Key(keyword, tag, vr, text))
    parsed = ParsedIdentifier(level, patient_root, tuple(keys), charset, identifier)
    _check_unique_keys(parsed, levels, retrieve=retrieve)
    return parsed


def _check_unique_keys(
    parsed: ParsedIdentifier, levels: tuple[Level, ...], *, retrieve: bool
) -> None:
    position = levels.index(parsed.level)
    for index, level in enumerate(levels):
        keyword = UNIQUE_KEYS[level]
        key = parsed.key(keyword)
        value = key.value if key is not None else ""
        vr = "UI" if level != Level.PATIENT else "LO"
        try:
            match = parse_match(vr, value)
        except InvalidMatchError as exc:
            raise _unprocessable(f"{keyword}: {exc}") from exc
        if index < position:
            # PS3.4 C.4.1.2.2.1: each higher level's unique key, single value matching.
            if not isinstance(match, Single):
                raise _refuse(f"{keyword} needs one value at {parsed.level} level")
        elif index == position and retrieve:
            # PS3.4 C.4.2.2.1: the query level's unique key, one value or a list of UIDs.
            if isinstance(match, Universal | Wildcard) or (
                level == Level.PATIENT and not isinstance(match, Single)
            ):
                raise _refuse(f"{keyword} needs a value to retrieve at {parsed.level} level")
        elif index > position and key is not None and retrieve and value:
            raise _refuse(f"{keyword} is below the {parsed.level} level")


@dataclass
class FindPlan:
    """What a C-FIND asks: the engine query, the keys matched against stored headers, and
    the elements each answer carries."""

    spec: QuerySpec
    returned: list[tuple[BaseTag, str, str]]  # (tag, keyword, VR), in tag order
    unsupported: list[str] = field(default_factory=list)  # keys with a value not matched
    header_query: IdentifierQuery | None = None  # keys matched on a representative header
    header_tags: frozenset[str] = frozenset()  # their tags, as 8 hex digits


def _engine_matches(key: Key, level: Level) -> bool:
    """Whether the engine matches `key` at `level` from a catalog column."""
    if key.vr in _UNMATCHABLE_VRS:
        return False
    try:
        return attribute_at(key.keyword, level).column is not None
    except UnknownAttributeError:
        return False


def _header_query(identifier: Dataset | None, tags: list[BaseTag]) -> IdentifierQuery | None:
    if identifier is None or not tags:
        return None
    keys = Dataset()
    for tag in tags:
        keys.add(identifier[tag])
    return compile_identifier(keys)


def plan_find(parsed: ParsedIdentifier) -> FindPlan:
    """Turn a parsed C-FIND identifier into engine filters and the keys to return.

    Keys the catalog holds as columns at this level are matched by the engine (empty:
    returned only). Sequence keys (PS3.4 C.2.2.2.6) and other attributes are matched and
    returned from the stored header of each candidate (for a patient, study or series: of
    its first instance). Binary keys are returned empty and, with a value, reported as
    unsupported.

    Raises
    ------
    QueryRefusedError
        0xC000 when a header key cannot be matched (a malformed value, a sequence key with
        several items).
    """
    filters: list[tuple[str, str]] = []
    returned: dict[BaseTag, tuple[BaseTag, str, str]] = {}
    unsupported: list[str] = []
    from_header: list[BaseTag] = []
    for key in parsed.keys:
        returned[key.tag] = (key.tag, key.keyword, key.vr)
        if key.tag == RETRIEVE_AE_TITLE:
            continue
        if _engine_matches(key, parsed.level):
            filters.append((key.keyword, key.value))
        elif key.vr not in _BINARY_VRS:
            from_header.append(key.tag)
        elif key.value:
            unsupported.append(key.keyword)
    try:
        header_query = _header_query(parsed.dataset, from_header)
    except (InvalidMatchError, ValueError) as exc:
        raise _unprocessable(str(exc)) from exc
    levels = _levels(parsed.patient_root)
    for level in levels[: levels.index(parsed.level) + 1]:
        keyword = UNIQUE_KEYS[level]
        tag = Tag(keyword)
        if tag not in returned:
            returned[tag] = (tag, keyword, dictionary_VR(tag))
            filters.append((keyword, ""))
    spec = QuerySpec(parsed.level, filters=tuple(filters))
    return FindPlan(
        spec,
        [returned[t] for t in sorted(returned)],
        unsupported,
        header_query,
        frozenset(f"{int(t):08X}" for t in from_header),
    )


def _python_codecs(charset: tuple[str, ...]) -> list[str]:
    try:
        return convert_encodings(list(charset) if charset else ["ISO_IR 6"])
    except LookupError:
        return []


def _encodable(texts: list[str], charset: tuple[str, ...]) -> bool:
    codecs = _python_codecs(charset)
    if len(codecs) != 1:  # ISO 2022 code extensions: answer in UTF-8 instead
        return False
    try:
        for text in texts:
            text.encode(codecs[0])
    except (UnicodeError, LookupError):
        return False
    return True


def _texts(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _texts(item)
    elif isinstance(value, list):
        for item in value:
            yield from _texts(item)


def answer_json(
    row: dict[str, Any],
    plan: FindPlan,
    parsed: ParsedIdentifier,
    aet: str,
    from_header: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One C-FIND answer as DICOM JSON: exactly the requested keys (and the required unique
    keys), QueryRetrieveLevel and SpecificCharacterSet; `from_header` holds the
    header-matched keys' answer."""
    selected: dict[str, Any] = {}
    for tag, _keyword, vr in plan.returned:
        hex_tag = f"{int(tag):08X}"
        if tag == RETRIEVE_AE_TITLE:
            selected[hex_tag] = {"vr": "AE", "Value": [aet]}
        elif from_header is not None and hex_tag in from_header:
            selected[hex_tag] = from_header[hex_tag]
        elif hex_tag in row and vr not in _UNMATCHABLE_VRS:
            selected[hex_tag] = row[hex_tag]
        else:
            selected[hex_tag] = {"vr": vr}
    texts = [t for t in _texts(selected) if not t.isascii()]
    charset_key = f"{int(SPECIFIC_CHARACTER_SET):08X}"
    if texts:
        charset = parsed.charset
        values = list(charset) if charset and _encodable(texts, charset) else [UTF8]
        selected[charset_key] = {"vr": "CS", "Value": values}
    elif parsed.charset:
        selected[charset_key] = {"vr": "CS", "Value": list(parsed.charset)}
    elif parsed.charset is not None:
        selected[charset_key] = {"vr": "CS"}
    selected[f"{int(QUERY_RETRIEVE_LEVEL):08X}"] = {"vr": "CS", "Value": [str(parsed.level)]}
    return selected


@dataclass(frozen=True)
class Answers:
    """C-FIND answers (DICOM JSON) and whether some keys with values could not be matched."""

    identifiers: Iterator[dict[str, Any]]
    count: int
    unsupported: tuple[str, ...]


def find(view: CatalogHolder, parsed: ParsedIdentifier, aet: str) -> Answers:
    """Answer a C-FIND through the shared query engine.

    Raises
    ------
    QueryRefusedError
        0xC000 when a value cannot be matched (a malformed UID, date or number).
    """
    plan = plan_find(parsed)
    reader = view.get()
    try:
        result = run_query(reader, plan.spec)
    except (InvalidQueryError, InvalidMatchError) as exc:
        raise _unprocessable(str(exc)) from exc
    if plan.header_query is None:
        rows = result.rows
        identifiers = (answer_json(row, plan, parsed, aet) for row in rows)
        return Answers(identifiers, len(rows), tuple(plan.unsupported))
    matched = _match_headers(reader, plan, parsed.level, result.rows)
    answers = (answer_json(row, plan, parsed, aet, extra) for row, extra in matched)
    return Answers(answers, len(matched), tuple(plan.unsupported))


def _match_headers(
    reader: CatalogReader, plan: FindPlan, level: Level, rows: list[dict[str, Any]]
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """The engine's rows whose representative header matches the header keys, each with
    those keys' answer (DICOM JSON)."""
    assert plan.header_query is not None
    unique = f"{int(Tag(UNIQUE_KEYS[level])):08X}"
    headers = representative_headers(
        reader, level, [v for v in (_first(r, unique) for r in rows) if v]
    )
    matched = []
    for row in rows:
        header = headers.get(_first(row, unique) or "", {})
        try:
            stored = Dataset.from_json({t: v for t, v in header.items() if t in plan.header_tags})
        except (ValueError, TypeError, KeyError):
            stored = Dataset()  # a stored value pydicom cannot read: as if absent
        answer = plan.header_query.apply(stored)
        if answer is not None:
            matched.append((row, answer.to_json_dict()))
    return matched


def retrieve_filters(parsed: ParsedIdentifier) -> tuple[tuple[str, str], ...]:
    """The unique keys of a C-MOVE / C-GET identifier (other keys are ignored, C.4.2.2.1)."""
    levels = _levels(parsed.patient_root)
    filters = []
    for level in levels[: levels.index(parsed.level) + 1]:
        key = parsed.key(UNIQUE_KEYS[level])
        if key is not None and key.value:
            filters.append((key.keyword, key.value))
    return tuple(filters)


def match_instances(view: CatalogHolder, parsed: ParsedIdentifier) -> list[StoredInstance]:
    """The stored instances a C-MOVE / C-GET identifier names, in series/instance order.

    Raises
    ------
    QueryRefusedError
        0xC000 when a unique key cannot be matched.
    """
    reader = view.get()
    spec = QuerySpec(Level.IMAGE, filters=retrieve_filters(parsed))
    try:
        rows = run_query(reader, spec).rows
    except (InvalidQueryError, InvalidMatchError) as exc:
        raise _unprocessable(str(exc)) from exc
    wanted: dict[tuple[str, str], set[str]] = {}
    for row in rows:
        study = _first(row, "0020000D")
        series = _first(row, "0020000E")
        sop = _first(row, "00080018")
        if study and series and sop:
            wanted.setdefault((study, series), set()).add(sop)
    found: list[StoredInstance] = []
    for (study, series), sops in wanted.items():
        found.extend(i for i in find_instances(reader, study, series) if i.sop_instance_uid in sops)
    return found


def _first(row: dict[str, Any], tag: str) -> str | None:
    values = row.get(tag, {}).get("Value")
    return str(values[0]) if values else None
