"""STOW-RS (PS3.18 10.5) without the framework: request checks, a streaming multipart/related
decoder, per-part spooling and validation into a landing batch, and the response body.

A request is stored as one landing batch. Each part is spooled to a temp file in the
batch folder as it arrives (memory stays bounded whatever the body size), checked when it
ends (Part-10 prefix, file meta, the four UIDs, by walking element headers: nothing is
decoded), and committed through the landing module only once the whole body has arrived
intact. A broken, oversized or interrupted body therefore stores nothing; a well-formed
body stores every valid part even when others fail.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

from dicomweb.errors import (
    BadRequestError,
    NotAcceptableError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)
from vannah_pipelines.dicom.inspection import (
    MAX_INFLATED_BYTES,
    InflatedTooLargeError,
    InstanceIds,
    read_file_meta,
    read_instance_ids,
)
from vannah_pipelines.errors import InsufficientSpaceError, InvalidDicomError, UnsafeUidError
from vannah_pipelines.landing.layout import LandingZone, OpenBatch, ReceiveFacts
from vannah_pipelines.landing.space import require_free_space

log = logging.getLogger(__name__)

SOURCE = "stow"
DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"

# Spooled parts live in the batch folder under the landing module's temp prefix, which
# Batch.instances() ignores and LandingZone.seal_stranded() deletes after a crash.
_SPOOL_PREFIX = ".tmp-stow-"
_MAX_PREAMBLE = 64 * 1024
_MAX_PART_HEADERS = 16 * 1024
_MAX_PADDING = 1024
# A part is held in memory up to this size (checked there, written only if valid); a larger
# one is spooled to a file as it arrives.
_IN_MEMORY_PART_BYTES = 64 * 1024
# A body is checked against the free-space reserve again after this many bytes.
_SPACE_CHECK_BYTES = 16 * 1024**2
# Failed parts without a SOP Instance UID listed one by one in the response.
MAX_LISTED_UNIDENTIFIED = 100

# RFC 7230 3.2.6 token and quoted-string; an unquoted value is read leniently.
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_MEDIA_TYPE = re.compile(rf"\s*({_TOKEN}/{_TOKEN})\s*")
_PARAMETER = re.compile(rf';\s*({_TOKEN})\s*=\s*("(?:[^"\\]|\\.)*"|[^\s;"]+)\s*')
_EMPTY_PARAMETER = re.compile(r";\s*")
# RFC 2046 5.1.1: 1 to 70 bchars, not ending in a space.
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")


class FailureReason(IntEnum):
    """Failure Reason (0008,1197) values of a FailedSOPSequence item (PS3.18 10.5.3)."""

    OUT_OF_RESOURCES = 0xA700
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000


# --- request checks -------------------------------------------------------------------


def parse_media_type(value: str) -> tuple[str, dict[str, str]]:
    """Split a Content-Type or media range into its lower-cased type and its parameters.

    Parameter names are lower-cased; quoted values are unquoted.

    >>> parse_media_type('multipart/related; type="application/dicom"; boundary=abc')
    ('multipart/related', {'type': 'application/dicom', 'boundary': 'abc'})

    Raises
    ------
    BadRequestError
        If `value` is not ``type/subtype`` followed by ``; name=value`` parameters.
    """
    match = _MEDIA_TYPE.match(value)
    if match is None:
        raise BadRequestError(f"malformed media type: {value[:200]!r}")
    media_type = match.group(1).lower()
    parameters: dict[str, str] = {}
    pos = match.end()
    while pos < len(value):
        param = _PARAMETER.match(value, pos)
        if param is None:
            empty = _EMPTY_PARAMETER.match(value, pos)
            if empty is None or empty.end() == pos:
                raise BadRequestError(f"malformed media type parameters: {value[:200]!r}")
            pos = empty.end()
            continue
        raw = param.group(2)
        if raw.startswith('"'):
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        parameters[param.group(1).lower()] = raw
        pos = param.end()
    return media_type, parameters


def stow_boundary(content_type: str | None) -> str:
    """Return the multipart boundary of a STOW-RS request's Content-Type.

    PS3.18 10.5.1: ``multipart/related; type="application/dicom"; boundary=...``. A
    missing `type` parameter is read as application/dicom, the only one supported.

    Raises
    ------
    UnsupportedMediaTypeError
        If the body is not multipart/related of application/dicom parts (415).
    BadRequestError
        If the boundary is missing or not a valid RFC 2046 boundary (400).
    """
    if not content_type:
        raise UnsupportedMediaTypeError(
            f'STOW-RS needs Content-Type: multipart/related; type="{DICOM}"'
        )
    try:
        media_type, parameters = parse_media_type(content_type)
    except BadRequestError as exc:
        raise UnsupportedMediaTypeError(exc.message) from exc
    if media_type != "multipart/related":
        raise UnsupportedMediaTypeError(
            f'STOW-RS takes multipart/related; type="{DICOM}", not {media_type}'
        )
    part_type = parameters.get("type", DICOM).strip().lower()
    if part_type != DICOM:
        raise UnsupportedMediaTypeError(
            f'only multipart/related; type="{DICOM}" is supported, not type="{part_type[:80]}"'
        )
    boundary = parameters.get("boundary")
    if not boundary:
        raise BadRequestError("multipart/related without a boundary parameter")
    if not _BOUNDARY.fullmatch(boundary):
        raise BadRequestError(f"invalid multipart boundary: {boundary[:80]!r}")
    return boundary


def check_content_length(value: str | None, max_bytes: int) -> int | None:
    """Refuse a declared body size over `max_bytes` before reading any of it; return the
    declared size (None for a chunked body).

    Raises
    ------
    PayloadTooLargeError
        If the declared length is over the limit (413).
    BadRequestError
        If Content-Length is not a number (400).
    """
    if value is None:
        return None  # chunked: counted while streaming
    if not value.strip().isascii() or not value.strip().isdigit():
        raise BadRequestError(f"invalid Content-Length: {value[:40]!r}")
    length = int(value)
    if length > max_bytes:
        raise PayloadTooLargeError(f"request body of {length} bytes exceeds {max_bytes} bytes")
    return length


def check_accept(accept: str | None) -> None:
    """PS3.18 10.5.3: the response is application/dicom+json; refuse an Accept without it.

    >>> check_accept("application/dicom+json"), check_accept("*/*"), check_accept(None)
    (None, None, None)

    Raises
    ------
    NotAcceptableError
        If the client accepts none of the media types we can answer with (406).
    """
    if accept is None or not accept.strip():
        return
    for media_range in accept.split(","):
        if not media_range.strip():
            continue
        try:
            media_type, parameters = parse_media_type(media_range)
        except BadRequestError:
            continue
        try:
            quality = float(parameters.get("q", "1"))
        except ValueError:
            quality = 1.0
        if quality > 0 and media_type in (DICOM_JSON, "application/json", "application/*", "*/*"):
            return
    raise NotAcceptableError(f"STOW-RS answers {DICOM_JSON} only; Accept was {accept[:200]!r}")


# --- multipart/related decoder ----------------------------------------------------------


@dataclass(frozen=True)
class PartStart:
    """A body part begins; `headers` have lower-cased names."""

    headers: dict[str, str]


@dataclass(frozen=True)
class PartData:
    """The next bytes of the current part's body."""

    data: bytes


@dataclass(frozen=True)
class PartEnd:
    """The current part is complete."""


Event = PartStart | PartData | PartEnd

_PREAMBLE, _HEADERS, _BODY, _EPILOGUE = range(4)


class MultipartDecoder:
    """An incremental RFC 2046 multipart decoder: bytes in any chunking, events out.

    Memory is bounded by the largest chunk fed plus the boundary and part headers: part
    bodies are handed on as they arrive, never accumulated.

    >>> decoder = MultipartDecoder("b")
    >>> events = decoder.feed(b"--b\\r\\nContent-Type: application/dicom\\r\\n\\r\\nxy\\r\\n--b--")
    >>> decoder.close()
    >>> events
    [PartStart(headers={'content-type': 'application/dicom'}), PartData(data=b'xy'), PartEnd()]
    """

    def __init__(self, boundary: str) -> None:
        # RFC 2046 5.1.1: a delimiter is CRLF "--" boundary; the first one may open the body.
        self._delimiter = b"\r\n--" + boundary.encode("ascii")
        self._buf = bytearray(b"\r\n")
        self._state = _PREAMBLE
        self._preamble = 0
        self.parts = 0

    def feed(self, data: bytes) -> list[Event]:
        """Decode `data`; return the events it completes.

        Raises
        ------
        BadRequestError
            If the body is not a multipart body with this boundary.
        """
        return list(self.events(data))

    def events(self, data: bytes) -> Iterator[Event]:
        """Decode `data`, yielding the events it completes as they are found (a chunk of
        many tiny parts never becomes a list of all their events). Consume it fully.

        Raises
        ------
        BadRequestError
            If the body is not a multipart body with this boundary.
        """
        self._buf += data
        events: list[Event] = []
        while self._step(events):
            yield from events
            events.clear()
        yield from events

    def close(self) -> None:
        """Check that the body ended with the close delimiter.

        Raises
        ------
        BadRequestError
            If no delimiter was found, or the last part has no close delimiter.
        """
        if self._state == _EPILOGUE:
            return
        if self._state == _PREAMBLE and self.parts == 0:
            raise BadRequestError("no multipart boundary delimiter in the body")
        raise BadRequestError("multipart body ends without its close delimiter")

    def _step(self, events: list[Event]) -> bool:
        """Make progress on the buffer; False when more bytes are needed."""
        buf = self._buf
        if self._state == _EPILOGUE:
            buf.clear()  # RFC 2046: the epilogue is ignored
            return False
        if self._state == _HEADERS:
            return self._read_headers(events)
        at = buf.find(self._delimiter)
        if at < 0:
            keep = len(self._delimiter) - 1  # a delimiter may straddle the next chunk
            self._pass_on(events, max(0, len(buf) - keep))
            return False
        self._pass_on(events, at)
        kind = self._delimiter_kind()
        if kind is None:
            return False
        if kind == "data":  # boundary-like bytes that are not a delimiter
            self._pass_on(events, 1)
            return True
        if self._state == _BODY:
            events.append(PartEnd())
        self._state = _EPILOGUE if kind == "close" else _HEADERS
        return True

    def _pass_on(self, events: list[Event], count: int) -> None:
        """Hand on (body) or drop (preamble) the first `count` bytes of the buffer."""
        if count <= 0:
            return
        if self._state == _BODY:
            events.append(PartData(bytes(self._buf[:count])))
        else:
            self._preamble += count
            if self._preamble > _MAX_PREAMBLE:
                raise BadRequestError("no multipart boundary delimiter at the start of the body")
        del self._buf[:count]

    def _delimiter_kind(self) -> str | None:
        """Classify the delimiter at the buffer start; consume it unless it is data."""
        buf, after = self._buf, len(self._delimiter)
        if len(buf) < after + 2:
            return None
        if buf[after : after + 2] == b"--":
            del buf[: after + 2]
            return "close"
        end = after
        while end < len(buf) and buf[end] in b" \t":  # RFC 2046 transport padding
            end += 1
            if end - after > _MAX_PADDING:
                raise BadRequestError("multipart delimiter line is too long")
        if len(buf) < end + 2:
            return None
        if buf[end : end + 2] != b"\r\n":
            return "data"
        del buf[: end + 2]
        self.parts += 1
        return "part"

    def _read_headers(self, events: list[Event]) -> bool:
        buf = self._buf
        if len(buf) < 2:
            return False
        if buf[:2] == b"\r\n":
            header_block, consumed = b"", 2  # a part without headers
        else:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > _MAX_PART_HEADERS:
                    raise BadRequestError("multipart part headers are too long")
                return False
            header_block, consumed = bytes(buf[:end]), end + 4
        if consumed > _MAX_PART_HEADERS:
            raise BadRequestError("multipart part headers are too long")
        del buf[:consumed]
        events.append(PartStart(_parse_headers(header_block)))
        self._state = _BODY
        return True


def _parse_headers(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    name = ""
    for line in block.decode("latin-1").split("\r\n") if block else []:
        if line[:1] in (" ", "\t") and name:  # obsolete line folding
            headers[name] += " " + line.strip()
            continue
        key, sep, value = line.partition(":")
        if not sep or not key or key != key.strip():
            raise BadRequestError(f"malformed multipart part header: {line[:80]!r}")
        name = key.lower()
        headers[name] = value.strip()
    return headers


# --- parts and the request --------------------------------------------------------------


@dataclass
class PartOutcome:
    """What became of one part: stored (no failure) or failed with a reason."""

    index: int
    sop_class_uid: str | None = None  # valid UIDs only: they are echoed back
    sop_instance_uid: str | None = None
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    failure: FailureReason | None = None
    comment: str = ""

    @property
    def stored(self) -> bool:
        return self.failure is None


@dataclass
class _Spooled:
    outcome: PartOutcome
    path: Path
    transfer_syntax_uid: str


@dataclass
class _Part:
    outcome: PartOutcome
    memory: bytearray | None = field(default_factory=bytearray)  # None: spooled or failed
    path: Path | None = None
    fd: int | None = None


class StowRequest:
    """One STOW-RS request landing into one batch. Not thread-safe: call its methods one
    at a time (from worker threads: they do blocking file I/O).

    Parameters
    ----------
    zone
        The landing zone (``settings.landing_dir``).
    boundary
        The request's multipart boundary (:func:`stow_boundary`).
    max_bytes
        Body size limit (``settings.stow_max_bytes``).
    max_parts
        Parts limit (``settings.stow_max_parts``): one more is a 413.
    max_instance_bytes
        Largest inflated size of a deflated data set (``settings.max_instance_bytes``): a
        part that inflates beyond it fails with 0xA700, inflation stopped there.
    reserve_bytes
        Free disk space kept (``settings.free_space_reserve_bytes``): spooling stops with
        InsufficientSpaceError before it would eat into it, and a part is not committed
        if its copy would.
    study_uid
        The target study of ``/studies/{study}`` (a validated UID), or None.
    peer
        The client's ``ip:port``, recorded in the receive facts.
    """

    def __init__(
        self,
        zone: LandingZone,
        boundary: str,
        max_bytes: int,
        *,
        max_parts: int = 10_000,
        reserve_bytes: int = 0,
        max_instance_bytes: int = MAX_INFLATED_BYTES,
        study_uid: str | None = None,
        peer: str = "",
    ) -> None:
        self.zone = zone
        self.max_bytes = max_bytes
        self.max_parts = max_parts
        self.reserve_bytes = reserve_bytes
        self.max_instance_bytes = max_instance_bytes
        self.study_uid = study_uid
        self.peer = peer
        self._next_space_check = 0
        self.received = 0
        self.outcomes: list[PartOutcome] = []
        self.batch_id: str | None = None  # the sealed batch, once there is one
        self._decoder = MultipartDecoder(boundary)
        self._batch: OpenBatch | None = None
        self._part: _Part | None = None
        self._spooled: list[_Spooled] = []

    def open(self) -> StowRequest:
        """Open the landing batch the parts are spooled into and committed to.

        Raises
        ------
        OSError
            If the landing zone refuses (disk full, permissions).
        """
        self._batch = self.zone.open_batch(SOURCE)
        return self

    def feed(self, data: bytes) -> None:
        """Decode and spool the next bytes of the body.

        Raises
        ------
        PayloadTooLargeError
            Once the body exceeds `max_bytes`, or holds more than `max_parts` parts.
        BadRequestError
            If the body is not a well-formed multipart body.
        InsufficientSpaceError
            If spooling on would eat into the free-space reserve.
        """
        self.received += len(data)
        if self.received > self.max_bytes:
            raise PayloadTooLargeError(f"request body exceeds {self.max_bytes} bytes")
        if self.received >= self._next_space_check and self._batch is not None:
            # A chunked body has no length to check up front: look again every few MiB.
            require_free_space(self._batch.path, 0, self.reserve_bytes)
            self._next_space_check = self.received + _SPACE_CHECK_BYTES
        for event in self._decoder.events(data):
            if isinstance(event, PartStart):
                self._start_part(event.headers)
            elif isinstance(event, PartData):
                self._write(event.data)
            else:
                self._end_part()

    def finish(self) -> list[PartOutcome]:
        """Check the body ended properly, commit every valid part and seal the batch.

        Returns
        -------
        list[PartOutcome]
            One per part, in body order.

        Raises
        ------
        BadRequestError
            If the body was cut short or held no part (nothing is stored).
        """
        assert self._batch is not None, "open() first"
        self._decoder.close()
        if not self.outcomes:
            raise BadRequestError("the multipart body holds no part")
        for spooled in self._spooled:
            self._commit(self._batch, spooled)
        self._spooled.clear()
        self.close()
        return self.outcomes

    def close(self) -> None:
        """Delete spooled parts not committed and seal the batch (removed if empty).

        Idempotent; called after :meth:`finish` or instead of it when the request fails.
        """
        part, self._part = self._part, None
        if part is not None:
            _discard(part.fd, part.path)
        for spooled in self._spooled:
            _discard(None, spooled.path)
        self._spooled.clear()
        batch, self._batch = self._batch, None
        if batch is not None:
            sealed = batch.seal()
            self.batch_id = sealed.batch_id if sealed is not None else None

    def _start_part(self, headers: dict[str, str]) -> None:
        assert self._batch is not None
        if len(self.outcomes) >= self.max_parts:
            raise PayloadTooLargeError(f"the body holds more than {self.max_parts} parts")
        outcome = PartOutcome(index=len(self.outcomes))
        self.outcomes.append(outcome)
        part = self._part = _Part(outcome)
        content_type = headers.get("content-type", DICOM)
        try:
            media_type = parse_media_type(content_type)[0]
        except BadRequestError:
            media_type = content_type
        if media_type != DICOM:
            _fail(outcome, FailureReason.CANNOT_UNDERSTAND, f"part is {media_type[:80]}")
            part.memory = None
            return

    def _spool(self, part: _Part, data: bytes | bytearray) -> bool:
        """Write `data` to the part's spool file (created on first use); False on failure
        (the part is then failed and its file removed)."""
        assert self._batch is not None
        index = part.outcome.index
        try:
            if part.fd is None:
                part.path = self._batch.path / f"{_SPOOL_PREFIX}{index}-{uuid.uuid4().hex}"
                part.fd = os.open(part.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            view = memoryview(data)
            while view:
                view = view[os.write(part.fd, view) :]
        except OSError as exc:
            log.warning("STOW-RS spool of part %d failed: %s", index, exc.strerror)
            _discard(part.fd, part.path)
            part.fd = part.path = None
            part.memory = None
            _fail(part.outcome, FailureReason.OUT_OF_RESOURCES, "cannot spool the part")
            return False
        return True

    def _write(self, data: bytes) -> None:
        part = self._part
        if part is None or part.outcome.failure is not None:
            return  # a part already failed: its bytes are dropped
        if part.memory is not None:
            # Small parts stay in memory until they end: an empty or tiny part costs no
            # file. A part that outgrows the buffer goes to its spool file.
            part.memory += data
            if len(part.memory) > _IN_MEMORY_PART_BYTES:
                pending, part.memory = part.memory, None
                self._spool(part, pending)
            return
        self._spool(part, data)

    def _end_part(self) -> None:
        part, self._part = self._part, None
        if part is None or part.outcome.failure is not None:
            return
        outcome = part.outcome
        if part.memory is not None:
            self._end_small_part(part, part.memory)
            return
        if not self._close_spool(part):
            return
        assert part.path is not None
        try:
            with _mapped(part.path) as data:
                syntax = _inspect(data, outcome, self.study_uid, self.max_instance_bytes)
        except InvalidDicomError:
            _discard(None, part.path)
            log.debug("STOW-RS part %d refused: %s", outcome.index, outcome.comment)
            return
        except OSError as exc:
            log.warning("STOW-RS spooled part %d unreadable: %s", outcome.index, exc.strerror)
            _discard(None, part.path)
            _fail(outcome, FailureReason.OUT_OF_RESOURCES, "cannot read the spooled part")
            return
        self._spooled.append(_Spooled(outcome, part.path, syntax))

    def _end_small_part(self, part: _Part, data: bytearray) -> None:
        """A part that ended in memory: checked there; only a valid one gets a file."""
        outcome = part.outcome
        part.memory = None
        if not data:
            _fail(outcome, FailureReason.CANNOT_UNDERSTAND, "empty part")
            return
        try:
            syntax = _inspect(memoryview(data), outcome, self.study_uid, self.max_instance_bytes)
        except InvalidDicomError:
            log.debug("STOW-RS part %d refused: %s", outcome.index, outcome.comment)
            return
        if not self._spool(part, data) or not self._close_spool(part):
            return
        assert part.path is not None
        self._spooled.append(_Spooled(outcome, part.path, syntax))

    @staticmethod
    def _close_spool(part: _Part) -> bool:
        """Close the part's spool file; on failure drop it and fail the part 0xA700."""
        assert part.fd is not None and part.path is not None
        try:
            os.close(part.fd)
        except OSError as exc:
            log.warning("STOW-RS spool of part %d failed: %s", part.outcome.index, exc.strerror)
            _discard(None, part.path)
            _fail(part.outcome, FailureReason.OUT_OF_RESOURCES, "cannot spool the part")
            return False
        return True

    def _commit(self, batch: OpenBatch, spooled: _Spooled) -> None:
        outcome = spooled.outcome
        assert outcome.sop_instance_uid is not None and outcome.sop_class_uid is not None
        facts = ReceiveFacts(
            sop_instance_uid=outcome.sop_instance_uid,
            sop_class_uid=outcome.sop_class_uid,
            transfer_syntax_uid=spooled.transfer_syntax_uid,
            source=SOURCE,
            peer=self.peer,
        )
        try:
            with _mapped(spooled.path) as data:
                # The copy must leave the reserve free: else 0xA700, nothing written.
                require_free_space(batch.path, len(data), self.reserve_bytes)
                batch.write_instance(data, facts)  # temp + fsync + rename: the commit
        except InsufficientSpaceError:
            log.warning("STOW-RS landing of %s refused: free-space reserve", facts.sop_instance_uid)
            _fail(outcome, FailureReason.OUT_OF_RESOURCES, "not enough free disk space")
        except OSError as exc:
            # write_instance removes its temp file: a failed write leaves nothing behind.
            log.error("STOW-RS landing write of %s failed: %s", facts.sop_instance_uid, exc)
            _fail(outcome, FailureReason.OUT_OF_RESOURCES, "cannot store the instance")
        finally:
            _discard(None, spooled.path)


def _fail(outcome: PartOutcome, reason: FailureReason, comment: str) -> None:
    outcome.failure = reason
    outcome.comment = comment


def _discard(fd: int | None, path: Path | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)
    if path is not None:
        with contextlib.suppress(OSError):
            path.unlink()


@contextlib.contextmanager
def _mapped(path: Path) -> Iterator[memoryview]:
    """The file's bytes, mapped read-only (the page cache holds them, not the heap)."""
    with path.open("rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            yield memoryview(b"")
            return
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        view = memoryview(mapped)
        try:
            yield view
        finally:
            view.release()
            # A slice may outlive the view (held by a traceback): the map is then closed
            # when the last slice goes, by the mmap object's finaliser.
            with contextlib.suppress(BufferError):
                mapped.close()


def _inspect(
    data: memoryview, outcome: PartOutcome, study_uid: str | None, max_inflated: int
) -> str:
    """Validate a part's bytes; fill `outcome` and return its transfer syntax.

    Raises InvalidDicomError (with `outcome` marked failed) if the part must be refused.
    """
    try:
        meta = read_file_meta(data)
    except InvalidDicomError as exc:
        _fail(outcome, FailureReason.CANNOT_UNDERSTAND, str(exc))
        raise
    outcome.sop_class_uid = meta.media_storage_sop_class_uid
    outcome.sop_instance_uid = meta.media_storage_sop_instance_uid
    try:
        ids = read_instance_ids(
            data[meta.dataset_offset :], meta.transfer_syntax_uid, max_inflated_bytes=max_inflated
        )
    except InflatedTooLargeError as exc:
        _fail(outcome, FailureReason.OUT_OF_RESOURCES, str(exc))
        raise
    except UnsafeUidError as exc:  # PS3.4 B.2.3: missing or invalid UIDs
        # The attribute only: the value may be anything, and is logged.
        _fail(outcome, FailureReason.DATA_SET_DOES_NOT_MATCH_SOP_CLASS, f"invalid {exc.attribute}")
        raise
    except InvalidDicomError as exc:
        _fail(outcome, FailureReason.CANNOT_UNDERSTAND, str(exc))
        raise
    _identify(outcome, ids)
    # The data set's UIDs are authoritative; a file meta that names others (PS3.10 7.1
    # forbids it, but such files exist) is stored as received, like the DIMSE path does.
    if study_uid is not None and ids.study_instance_uid != study_uid:
        mismatch = "study UID mismatch: the data set is not of the study in the URL"
        _fail(outcome, FailureReason.DATA_SET_DOES_NOT_MATCH_SOP_CLASS, mismatch)
        raise InvalidDicomError(mismatch)
    return meta.transfer_syntax_uid


def _identify(outcome: PartOutcome, ids: InstanceIds) -> None:
    outcome.sop_class_uid = ids.sop_class_uid
    outcome.sop_instance_uid = ids.sop_instance_uid
    outcome.study_instance_uid = ids.study_instance_uid
    outcome.series_instance_uid = ids.series_instance_uid


# --- response ---------------------------------------------------------------------------


def response_status(outcomes: list[PartOutcome]) -> int:
    """PS3.18 10.5.3: 200 if every part was stored, 409 if none was, else 202.

    >>> ok, bad = PartOutcome(0), PartOutcome(1, failure=FailureReason.CANNOT_UNDERSTAND)
    >>> response_status([ok]), response_status([ok, bad]), response_status([bad])
    (200, 202, 409)
    """
    stored = sum(o.stored for o in outcomes)
    if stored == len(outcomes):
        return 200
    return 409 if stored == 0 else 202


def _uid_element(value: str | None) -> dict[str, Any]:
    return {"vr": "UI", "Value": [value]} if value else {"vr": "UI"}


def _url_element(value: str) -> dict[str, Any]:
    return {"vr": "UR", "Value": [value]}


def unlisted_failures(outcomes: list[PartOutcome]) -> int:
    """Failed parts left out of the FailedSOPSequence: those with no SOP Instance UID past
    the first MAX_LISTED_UNIDENTIFIED (each would cost more response than body)."""
    unidentified = sum(1 for o in outcomes if not o.stored and not o.sop_instance_uid)
    return max(0, unidentified - MAX_LISTED_UNIDENTIFIED)


def response_body(
    outcomes: list[PartOutcome], base_url: str, study_uid: str | None
) -> dict[str, Any]:
    """The Store Instances Response Module (PS3.18 10.5.3) as DICOM JSON.

    Every stored instance and every failed one with a SOP Instance UID is listed; failed
    parts with no UID (empty, not DICOM) are listed up to MAX_LISTED_UNIDENTIFIED, the
    rest only counted (:func:`unlisted_failures`, sent in a Warning header), so the answer
    stays proportional to the body.

    Parameters
    ----------
    outcomes
        One per part.
    base_url
        The service root, e.g. ``http://host:8042/dicom-web``.
    study_uid
        The study of the URL, if any; else the one study of the stored instances, if one.
    """
    stored = [o for o in outcomes if o.stored]
    failed: list[PartOutcome] = []
    unidentified = 0
    for o in outcomes:
        if o.stored:
            continue
        if not o.sop_instance_uid:
            unidentified += 1
            if unidentified > MAX_LISTED_UNIDENTIFIED:
                continue
        failed.append(o)
    body: dict[str, Any] = {}
    studies = {o.study_instance_uid for o in stored}
    study = study_uid or (studies.pop() if len(studies) == 1 else None)
    if study:
        body["00081190"] = _url_element(f"{base_url}/studies/{study}")  # RetrieveURL
    if failed:
        body["00081198"] = {  # FailedSOPSequence
            "vr": "SQ",
            "Value": [
                {
                    "00081150": _uid_element(o.sop_class_uid),
                    "00081155": _uid_element(o.sop_instance_uid),
                    "00081197": {"vr": "US", "Value": [int(o.failure or 0)]},  # FailureReason
                }
                for o in failed
            ],
        }
    if stored:
        body["00081199"] = {  # ReferencedSOPSequence
            "vr": "SQ",
            "Value": [
                {
                    "00081150": _uid_element(o.sop_class_uid),
                    "00081155": _uid_element(o.sop_instance_uid),
                    "00081190": _url_element(
                        f"{base_url}/studies/{o.study_instance_uid}"
                        f"/series/{o.series_instance_uid}/instances/{o.sop_instance_uid}"
                    ),
                }
                for o in stored
            ],
        }
    return body
