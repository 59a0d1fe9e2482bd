"""PS3.4 C.2.2.2 attribute matching: parse a query value into what it asks for.

One parser for QIDO-RS, C-FIND and Modality Worklist: universal, single value, UID list,
wildcard and range matching. ``catalog.sql`` compiles the result to SQL; :func:`matches`
applies it in Python (for values outside the catalog tables, such as worklist sequences).
"""

from __future__ import annotations

import fnmatch
import re
import unicodedata
from dataclasses import dataclass

from vannah_pipelines.dicom.uids import is_uid

_RANGE_VRS = frozenset({"DA", "TM", "DT"})
# PS3.4 C.2.2.2.4: wildcards are not allowed for these VRs (and would be meaningless).
_NO_WILDCARD_VRS = frozenset(
    {
        "DA",
        "TM",
        "DT",
        "UI",
        "SL",
        "SS",
        "UL",
        "US",
        "FL",
        "FD",
        "IS",
        "DS",
        "SQ",
        "OB",
        "OW",
        "UN",
        "AT",
    }
)


# One hyphen splitting two (possibly empty) date/time values. (A DT with a negative UTC
# offset inside a range is not supported.)
_RANGE = re.compile(r"[0-9.+]*-[0-9.+]*")


class InvalidMatchError(ValueError):
    """A query value that cannot mean anything for its VR (a malformed UID, a bad range)."""


@dataclass(frozen=True)
class Universal:
    """Empty value: matches everything, and asks for the attribute to be returned."""


@dataclass(frozen=True)
class Single:
    value: str


@dataclass(frozen=True)
class UidList:
    values: tuple[str, ...]


@dataclass(frozen=True)
class Wildcard:
    pattern: str  # DICOM pattern with * and ?


@dataclass(frozen=True)
class Range:
    low: str | None
    high: str | None


Match = Universal | Single | UidList | Wildcard | Range


def _check_date_like(vr: str, value: str) -> None:
    allowed = (
        set("0123456789")
        | ({".", "+", "-"} if vr == "DT" else set())
        | ({"."} if vr == "TM" else set())
    )
    if not value or not set(value) <= allowed:
        raise InvalidMatchError(f"not a valid {vr} value: {value[:64]!r}")
    if vr == "DA" and len(value) != 8:
        raise InvalidMatchError(f"not a valid DA (YYYYMMDD) value: {value[:64]!r}")


def parse_match(vr: str, value: str | None) -> Match:
    """What the query value `value` of an attribute with `vr` asks for.

    >>> parse_match("DA", "20240101-20240131")
    Range(low='20240101', high='20240131')
    >>> parse_match("UI", "1.2\\\\1.3")
    UidList(values=('1.2', '1.3'))
    >>> parse_match("PN", "Doe*"), parse_match("LO", "")
    (Wildcard(pattern='Doe*'), Universal())

    Raises
    ------
    InvalidMatchError
        For a malformed UID or date/time, or a range where ranges do not apply.
    """
    if value is None or value == "" or value == "*":
        return Universal()
    if vr == "UI":
        uids = tuple(v for v in value.split("\\"))
        for uid in uids:
            if not is_uid(uid):
                raise InvalidMatchError(f"not a valid UID: {uid[:64]!r}")
        return UidList(uids) if len(uids) > 1 else Single(uids[0])
    if vr in _RANGE_VRS and _RANGE.fullmatch(value):
        low, _, high = value.partition("-")
        if not low and not high:
            raise InvalidMatchError("a range needs at least one end")
        for part in (low, high):
            if part:
                _check_date_like(vr, part)
        if low and high and low > high:
            raise InvalidMatchError(f"range start after its end: {value[:64]!r}")
        return Range(low or None, high or None)
    if vr in _RANGE_VRS:
        _check_date_like(vr, value)
        return Single(value)
    if vr not in _NO_WILDCARD_VRS and ("*" in value or "?" in value):
        return Wildcard(value)
    if "\\" in value and vr not in ("LT", "ST", "UT"):
        # PS3.4 C.2.2.2.8 multiple-value matching (a list of alternatives).
        return UidList(tuple(value.split("\\")))
    return Single(value)


def fold(text: str) -> str:
    """Case- and accent-insensitive form for fuzzy person-name matching.

    >>> fold("Émile^ZOLA")
    'emile^zola'
    """
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).lower()


def wildcard_to_like(pattern: str) -> str:
    r"""Translate a DICOM wildcard pattern to a SQL LIKE pattern with ``\`` as escape.

    >>> wildcard_to_like("Do?_e%*")
    'Do_\\_e\\%%'
    """
    out = []
    for ch in pattern:
        if ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        elif ch in "%_\\":
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


def matches(match: Match, value: str | None, *, fuzzy: bool = False) -> bool:
    """Whether a stored `value` (multi-values joined by ``\\``) satisfies `match`.

    A range end of lower precision covers its whole unit (``-1100`` includes 11:00:59).
    """
    if isinstance(match, Universal):
        return True
    if value is None or value == "":
        return False
    candidates = value.split("\\")
    if isinstance(match, Range):
        return any(
            (match.low is None or c >= match.low)
            and (match.high is None or c[: len(match.high)] <= match.high)
            for c in candidates
        )
    if isinstance(match, UidList):
        return any(c in match.values for c in candidates)
    if isinstance(match, Wildcard):
        pattern = fold(match.pattern) if fuzzy else match.pattern
        translated = "".join("[?]" if ch == "[" else ch for ch in pattern)
        return any(fnmatch.fnmatchcase(fold(c) if fuzzy else c, translated) for c in candidates)
    target = fold(match.value) if fuzzy else match.value
    return any((fold(c) if fuzzy else c) == target for c in candidates)
