"""Accept headers and what we answer them with (PS3.18 8.7): parsing, and negotiation
against the transfer syntaxes we can produce from what is stored
(:mod:`vannah_pipelines.dicom.transcoding` says which, and transcodes).

Pure: no FastAPI here. Negotiation returns a choice or None (the route answers 406 with the
reason this module gives).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from vannah_pipelines.dicom.transcoding import (
    EXPLICIT_LE,
    IMPLICIT_LE,
    NATIVE,
    can_decode,
    transcode_reason,
)

DICOM = "application/dicom"
OCTET_STREAM = "application/octet-stream"
DICOM_JSON = "application/dicom+json"
MULTIPART = "multipart/related"

# PS3.18 table 8.7.3-5: single-frame bulk media types and their transfer syntaxes, default
# first.
FRAME_MEDIA_TYPES: dict[str, tuple[str, ...]] = {
    "image/jpeg": (
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.51",
        "1.2.840.10008.1.2.4.57",
        "1.2.840.10008.1.2.4.70",
    ),
    "image/jls": ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"),
    "image/jp2": ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"),
    "image/jpx": ("1.2.840.10008.1.2.4.92", "1.2.840.10008.1.2.4.93"),
    "image/jphc": ("1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"),
    "image/dicom-rle": ("1.2.840.10008.1.2.5",),
    "image/x-dicom-rle": ("1.2.840.10008.1.2.5",),
}
RENDERED_MEDIA_TYPES = ("image/jpeg", "image/png", "image/gif")


@dataclass(frozen=True)
class MediaRange:
    """One element of an Accept header: ``multipart/related; type="x"; transfer-syntax=y``."""

    media_type: str
    params: dict[str, str] = field(default_factory=dict)
    q: float = 1.0

    @property
    def multipart(self) -> bool:
        return self.media_type == MULTIPART

    @property
    def part_type(self) -> str | None:
        """The media type of the content (the ``type`` of a multipart range); None if a
        multipart range does not say."""
        if self.multipart:
            return self.params.get("type")
        return self.media_type

    @property
    def transfer_syntax(self) -> str | None:
        return self.params.get("transfer-syntax")

    def __str__(self) -> str:
        params = "".join(f"; {k}={v}" for k, v in self.params.items())
        return f"{self.media_type}{params}"


def _split(text: str, sep: str) -> list[str]:
    """Split on `sep` outside double quotes."""
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    escaped = False
    for ch in text:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
            current.append(ch)
        elif ch == sep and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    return value.strip()


def parse_media_range(text: str) -> MediaRange | None:
    """Parse one media range (quoted or unquoted parameter values); None if malformed.

    >>> str(parse_media_range('multipart/related; type="application/dicom"; transfer-syntax=*'))
    'multipart/related; type=application/dicom; transfer-syntax=*'
    """
    pieces = _split(text, ";")
    if not pieces or "/" not in pieces[0]:
        return None
    media_type = pieces[0].lower()
    params: dict[str, str] = {}
    q = 1.0
    for piece in pieces[1:]:
        name, eq, value = piece.partition("=")
        if not eq:
            continue
        name = name.strip().lower()
        value = _unquote(value)
        if name == "q":
            try:
                q = max(0.0, min(1.0, float(value)))
            except ValueError:
                q = 1.0
            continue
        if name == "type" and ";" in value:
            # type="application/dicom; transfer-syntax=..." (seen in the wild)
            inner = parse_media_range(value)
            if inner is None:
                return None
            value = inner.media_type
            for k, v in inner.params.items():
                params.setdefault(k, v)
        if name in ("type", "charset"):
            value = value.lower()
        params[name] = value
    return MediaRange(media_type, params, q)


def parse_accept(header: str | None) -> list[MediaRange]:
    """The media ranges of an Accept header, most preferred first (stable for equal q;
    q=0 ranges dropped). No header means ``*/*``."""
    if header is None or not header.strip():
        return [MediaRange("*/*")]
    ranges = [r for r in (parse_media_range(t) for t in _split(header, ",")) if r is not None]
    ranges = [r for r in ranges if r.q > 0]
    return sorted(ranges, key=lambda r: -r.q)


def _matches(pattern: str | None, media_type: str) -> bool:
    """Whether a (possibly wildcard, possibly absent) type accepts `media_type`."""
    if pattern is None or pattern in ("*", "*/*"):
        return True
    main, _, sub = pattern.partition("/")
    m_main, _, m_sub = media_type.partition("/")
    return main == m_main and sub in ("*", m_sub)


def _is_any(media_range: MediaRange) -> bool:
    return media_range.media_type in ("*/*", "multipart/*") or (
        media_range.multipart and media_range.part_type in (None, "*", "*/*")
    )


# ---------------------------------------------------------------- representations


@dataclass(frozen=True)
class InstanceChoice:
    """How to send a Part-10 instance: multipart or not, and in which transfer syntax."""

    multipart: bool
    transfer_syntax_uid: str

    def transcode(self, stored: str) -> bool:
        return self.transfer_syntax_uid != stored


def _instance_candidates(media_range: MediaRange, stored: str) -> list[tuple[bool, str]]:
    if _is_any(media_range) or media_range.media_type == "application/*":
        return [(True, EXPLICIT_LE), (True, stored)]
    if media_range.part_type != DICOM:
        return []
    ts = media_range.transfer_syntax
    target = stored if ts == "*" else (ts or EXPLICIT_LE)
    return [(media_range.multipart, target)]


def choose_instance(
    ranges: list[MediaRange], stored: str, *, single_part_ok: bool
) -> InstanceChoice | str:
    """The first acceptable representation of an instance stored in `stored`, or the reason
    there is none."""
    reasons: list[str] = []
    for media_range in ranges:
        for multipart, target in _instance_candidates(media_range, stored):
            if not multipart and not single_part_ok:
                reasons.append(f"{media_range}: use multipart/related for more than one object")
                continue
            reason = transcode_reason(stored, target)
            if reason is None:
                return InstanceChoice(multipart, target)
            reasons.append(f"{media_range}: {reason}")
    if not reasons:
        return 'none of the accepted media types is multipart/related; type="application/dicom"'
    return "; ".join(dict.fromkeys(reasons))


@dataclass(frozen=True)
class FrameChoice:
    """How to send frames: as stored (`decode` False) or decoded to native little endian."""

    media_type: str  # the part's media type
    transfer_syntax_uid: str  # the syntax of the bytes sent
    decode: bool
    multipart: bool = True

    @property
    def part_content_type(self) -> str:
        return f"{self.media_type}; transfer-syntax={self.transfer_syntax_uid}"


def _media_type_of(stored: str) -> str | None:
    for media_type, syntaxes in FRAME_MEDIA_TYPES.items():
        if stored in syntaxes:
            return media_type
    return None


def _frame_candidate(media_range: MediaRange, stored: str, count: int) -> FrameChoice | str:
    multipart = media_range.multipart or media_range.media_type in ("*/*",)
    if not multipart and count != 1:
        return f"{media_range}: use multipart/related for more than one frame"
    part = media_range.part_type
    ts = media_range.transfer_syntax
    compressed = stored not in NATIVE
    if _is_any(media_range):
        if can_decode(stored):
            return FrameChoice(OCTET_STREAM, EXPLICIT_LE, decode=stored != EXPLICIT_LE)
        return FrameChoice(_media_type_of(stored) or OCTET_STREAM, stored, decode=False)
    if part == OCTET_STREAM:
        if ts == "*" or ts == stored:
            return FrameChoice(OCTET_STREAM, stored, decode=False, multipart=multipart)
        if ts in (None, EXPLICIT_LE, IMPLICIT_LE):
            if not can_decode(stored):
                return f"{media_range}: no decoder here for the stored transfer syntax {stored}"
            return FrameChoice(
                OCTET_STREAM, EXPLICIT_LE, decode=stored != EXPLICIT_LE, multipart=multipart
            )
        return f"{media_range}: frames are stored as {stored} and not transcoded to {ts}"
    if part is not None and part in FRAME_MEDIA_TYPES:
        family = FRAME_MEDIA_TYPES[part]
        if compressed and stored in family and ts in (None, "*", stored):
            return FrameChoice(part, stored, decode=False, multipart=multipart)
        return f"{media_range}: frames are stored as {stored or 'unknown'}, not {part}"
    return f"{media_range}: not a media type for frames"


def choose_frames(ranges: list[MediaRange], stored: str, count: int) -> FrameChoice | str:
    """The first acceptable representation of `count` frames stored in `stored`, or why
    there is none."""
    reasons: list[str] = []
    for media_range in ranges:
        found = _frame_candidate(media_range, stored, count)
        if isinstance(found, FrameChoice):
            return found
        reasons.append(found)
    return "; ".join(dict.fromkeys(reasons)) or "no acceptable media type for frames"


def choose_bulk(ranges: list[MediaRange]) -> bool | str:
    """For bulk data other than pixels: True (multipart), False (single part) or the reason
    none of `ranges` fits."""
    for media_range in ranges:
        if _is_any(media_range):
            return True
        if media_range.part_type in (OCTET_STREAM, "application/*"):
            return media_range.multipart
    return 'bulk data is sent as multipart/related; type="application/octet-stream"'


def choose_metadata(ranges: list[MediaRange]) -> str | None:
    """The media type to answer metadata with (DICOM JSON), or None if not accepted."""
    for media_range in ranges:
        if media_range.multipart:
            continue  # multipart/related; type=application/dicom+xml: not supported
        for media_type in (DICOM_JSON, "application/json"):
            if _matches(media_range.media_type, media_type):
                return DICOM_JSON if media_type == DICOM_JSON else media_type
    return None


def choose_rendered(ranges: list[MediaRange]) -> str | None:
    """image/jpeg, image/png or image/gif, as `ranges` prefer; None if none is accepted."""
    for media_range in ranges:
        if media_range.multipart:
            continue
        for media_type in RENDERED_MEDIA_TYPES:
            if _matches(media_range.media_type, media_type):
                return media_type
    return None


# ---------------------------------------------------------------- metadata


_TOP_LEVEL_BULK = re.compile(
    r'"([0-9A-Fa-f]{8})":\s*\{\s*"vr":\s*"([A-Z]{2})",\s*"BulkDataURI":\s*""\s*\}'
)
_EMPTY_BULK = re.compile(r'"BulkDataURI":\s*""')


def header_with_bulk_data_uris(header: str, instance_url: str) -> str:
    """The stored DICOM JSON text `header` with its BulkDataURIs filled as
    :func:`fill_bulk_data_uris` fills them, without parsing it when it can: a header with no
    bulk data is returned as is, one whose bulk data are all top-level elements (no
    sequence) is completed by substitution; anything else is parsed and written again."""
    if '"BulkDataURI"' not in header:
        return header
    if '"SQ"' not in header:
        filled = _TOP_LEVEL_BULK.sub(
            lambda m: (
                f'"{m[1]}":{{"vr":"{m[2]}","BulkDataURI":'
                f"{json.dumps(f'{instance_url}/bulk/{m[1]}')}}}"
            ),
            header,
        )
        if not _EMPTY_BULK.search(filled):
            return filled
    attributes = fill_bulk_data_uris(json.loads(header), instance_url)
    return json.dumps(attributes, separators=(",", ":"))


def fill_bulk_data_uris(
    attributes: dict[str, Any], instance_url: str, path: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Point every empty BulkDataURI of a DICOM JSON header (PS3.18 F.2.6) at the bulk data
    route of its instance: ``<instance_url>/bulk/<tag>[/<item>/<tag>...]`` (in place)."""
    for tag, element in attributes.items():
        if not isinstance(element, dict):
            continue
        if element.get("BulkDataURI") == "":
            element["BulkDataURI"] = f"{instance_url}/bulk/{'/'.join((*path, tag))}"
        elif element.get("vr") == "SQ":
            for index, item in enumerate(element.get("Value") or []):
                if isinstance(item, dict):
                    fill_bulk_data_uris(item, instance_url, (*path, tag, str(index)))
    return attributes
