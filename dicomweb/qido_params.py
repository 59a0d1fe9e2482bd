"""Pure parsing of a QIDO-RS query string into a QuerySpec (PS3.18 8.3.4, 10.6.1)."""

from __future__ import annotations

import re
from collections.abc import Iterable

from vannah_pipelines.catalog.query import QuerySpec
from vannah_pipelines.dicom.keys import Level, UnknownAttributeError, resolve

_BOOLEAN = {"true": True, "false": False}


class InvalidQidoParameterError(ValueError):
    """A QIDO-RS parameter that is unknown or malformed (answered with 400)."""


def _int(name: str, value: str, minimum: int, maximum: int | None = None) -> int:
    text = value.strip()
    # ASCII digits only, and few of them: int() would take "٣" or 4000 digits.
    if not re.fullmatch(r"[+-]?[0-9]{1,19}", text):
        raise InvalidQidoParameterError(f"{name} must be an integer, not {value[:32]!r}")
    number = int(text)
    if number < minimum:
        raise InvalidQidoParameterError(f"{name} must be at least {minimum}")
    if maximum is not None and number > maximum:
        raise InvalidQidoParameterError(f"{name} must be at most {maximum}")
    return number


def _keys(value: str) -> list[str]:
    return [k.strip() for k in value.split(",") if k.strip()]


def parse_qido(
    items: Iterable[tuple[str, str]],
    level: Level,
    *,
    max_limit: int,
    max_offset: int = 1_000_000_000,
    scope: dict[str, str] | None = None,
) -> tuple[QuerySpec, list[str]]:
    """Turn query parameters into a QuerySpec plus warnings for the Warning header.

    A `limit` over `max_limit` is cut to it (with a warning); an `offset` over `max_offset`
    is refused, as is any number that is not a plain decimal integer.

    >>> spec, warnings = parse_qido([("00100020", "X"), ("limit", "5"),
    ...     ("includefield", "00081030,00080060")], Level.STUDY, max_limit=100)
    >>> spec.filters, spec.include, spec.limit, warnings
    ((('PatientID', 'X'),), ('00081030', '00080060'), 5, [])

    Raises
    ------
    InvalidQidoParameterError
        For an unknown parameter or attribute, or a malformed value.
    """
    filters: dict[str, str] = dict(scope or {})
    include: list[str] = []
    include_all = False
    fuzzy = False
    limit: int | None = None
    offset = 0
    order: list[tuple[str, bool]] = []
    warnings: list[str] = []
    for name, value in items:
        lower = name.lower()
        if lower == "limit":
            limit = _int("limit", value, 0)
        elif lower == "offset":
            offset = _int("offset", value, 0, max_offset)
        elif lower == "fuzzymatching":
            if value.lower() not in _BOOLEAN:
                raise InvalidQidoParameterError("fuzzymatching must be true or false")
            fuzzy = _BOOLEAN[value.lower()]
        elif lower == "includefield":
            for key in _keys(value):
                if key.lower() == "all":
                    include_all = True
                else:
                    include.append(_checked(key))
        elif lower == "orderby":
            for key in _keys(value):
                descending = key.startswith("-")
                order.append((_checked(key.lstrip("-+")), descending))
        else:
            keyword = _keyword(name)
            if keyword in filters and scope and keyword in scope:
                if filters[keyword] != value:
                    raise InvalidQidoParameterError(
                        f"{keyword} in the query differs from the one in the path"
                    )
                continue
            _, _, vr = resolve(keyword)
            # PS3.18 8.3.4.1: a UID list may be comma-separated.
            filters[keyword] = value.replace(",", "\\") if vr == "UI" else value
    if limit is None or limit > max_limit:
        if limit is not None:
            warnings.append(f"limit {limit} exceeds the maximum; at most {max_limit} returned")
        limit = max_limit
    spec = QuerySpec(
        level=level,
        filters=tuple(filters.items()),
        include=tuple(include),
        include_all=include_all,
        fuzzy=fuzzy,
        limit=limit,
        offset=offset,
        order_by=tuple(order),
        scoped_to_study="StudyInstanceUID" in (scope or {}),
        scoped_to_series="SeriesInstanceUID" in (scope or {}),
    )
    return spec, warnings


def _checked(key: str) -> str:
    try:
        resolve(key)
    except UnknownAttributeError as exc:
        raise InvalidQidoParameterError(str(exc)) from exc
    return key


def _keyword(name: str) -> str:
    if "." in name:
        raise InvalidQidoParameterError(f"sequence matching ({name}) is not supported")
    try:
        return resolve(name)[0]
    except UnknownAttributeError as exc:
        raise InvalidQidoParameterError(f"unknown parameter or attribute {name!r}") from exc
