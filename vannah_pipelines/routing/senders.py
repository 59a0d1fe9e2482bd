"""Destination senders: deliver stored instances to a local folder, an S3 bucket, a STOW-RS
endpoint or (through an injected factory) a DICOM AE, with one result per instance.

Pure layer: no pynetdicom here. The DICOM AE sender is
:class:`vannah_pipelines.dimse.route_sender.DicomSender`, which the caller passes to
:func:`build_sender` as ``dicom=``. See docs/routing.md, "Sending".
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import struct
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol, TypeVar
from urllib.parse import urlsplit

import pydicom
from pydicom.errors import InvalidDicomError as PydicomInvalidError

from vannah_pipelines.dicom.uids import require_uid
from vannah_pipelines.errors import (
    ChecksumMismatchError,
    ConfigError,
    InvalidDicomError,
    NotFoundError,
    StorageError,
    StorageUnavailableError,
    VannahError,
)
from vannah_pipelines.landing.layout import make_dirs, write_atomic
from vannah_pipelines.routing.coerce import apply_coercion
from vannah_pipelines.routing.rules import (
    Coercion,
    DicomDestination,
    FolderDestination,
    S3Destination,
    StowDestination,
)
from vannah_pipelines.storage.base import sha256_of

if TYPE_CHECKING:
    import requests

    from vannah_pipelines.storage.s3 import MinioStorage

log = logging.getLogger(__name__)
_T = TypeVar("_T")

ALREADY_THERE = "already there (same checksum)"
_CHUNK = 1024 * 1024
# With a coercion, a batch is coerced and sent in groups of at most this many bytes of
# coerced copies (they are in memory until sent; an instance larger than that alone).
COERCED_GROUP_BYTES = 64 << 20
# STOW-RS requests: at most this many instances, and this many bytes of parts (an instance
# larger than that goes alone).
STOW_MAX_INSTANCES = 50
STOW_MAX_BYTES = 64 << 20
# A STOW-RS answer (a Store Instances Response: a few KiB for 50 instances) is read up to
# this many bytes, and must be complete this many seconds after its headers came; past
# either the request fails, transiently, and its connection is closed.
STOW_RESPONSE_MAX_BYTES = 16 << 20
STOW_RESPONSE_SECONDS = 60.0
_READ_CHUNK = 64 << 10
API_KEY_HEADER = "X-API-Key"  # as our own DICOMweb accepts it (docs/security.md)
_DICOM_JSON = "application/dicom+json"
# Store Instances Response Module (PS3.18 10.5.3), DICOM JSON tags.
_FAILED_SOP = "00081198"  # FailedSOPSequence
_REFERENCED_SOP = "00081199"  # ReferencedSOPSequence
_SOP_INSTANCE = "00081155"  # ReferencedSOPInstanceUID
_FAILURE_REASON = "00081197"
_WARNING_REASON = "00081196"
_TRANSIENT_HTTP = frozenset({408, 429})
# What pydicom raises for bytes it cannot read or write back.
_UNREADABLE_DICOM = (PydicomInvalidError, ValueError, EOFError, KeyError, TypeError, struct.error)


class DestinationError(ConfigError):
    """A destination that cannot be sent to as configured: a secret missing or malformed,
    a DICOM AE with no DICOM sender given."""


@dataclass(frozen=True)
class Outgoing:
    """One instance to deliver: its identity, stored transfer syntax, the sha256 (hex) and
    size of its stored Part-10 bytes (the catalog's), and a function opening those bytes
    as a seekable stream (a storage tier; it may raise OSError or a StorageError)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    checksum: str
    size: int
    open: Callable[[], BinaryIO]


@dataclass(frozen=True)
class Delivered:
    """One instance's outcome at one destination: delivered (`ok`) or not, a short
    `detail`, whether a retry may succeed (`transient`: peer down, timeout, busy) or not
    (a permanent refusal), and the bytes sent (0 when nothing was sent)."""

    sop_instance_uid: str
    ok: bool
    detail: str
    transient: bool = False
    bytes_sent: int = 0


class Sender(Protocol):
    """Delivers batches to one destination."""

    def send(self, batch: Sequence[Outgoing]) -> list[Delivered]:
        """One result per instance of `batch`, in its order; never raises for a failure of
        an instance or of the peer."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


# ---------------------------------------------------------------- shared by every sender


def coerced(outgoing: Outgoing, coercion: Coercion | None) -> Outgoing:
    """`outgoing` with `coercion` applied to a copy of its bytes (re-encoded in the same
    transfer syntax, with its own checksum and size); unchanged without a coercion. The
    stored object is only read.

    Raises
    ------
    InvalidDicomError
        If the stored bytes cannot be read or written back as DICOM.
    OSError, StorageError
        If the stored bytes cannot be read.
    """
    if coercion is None:
        return outgoing
    with outgoing.open() as fp:
        try:
            ds = pydicom.dcmread(fp)
            changed = apply_coercion(ds, coercion)
            out = BytesIO()
            changed.save_as(out, enforce_file_format=True)
        except _UNREADABLE_DICOM as exc:
            raise InvalidDicomError(f"cannot coerce: {type(exc).__name__}: {exc}") from exc
    syntax = str(changed.file_meta.get("TransferSyntaxUID", ""))
    if syntax != outgoing.transfer_syntax_uid:
        raise InvalidDicomError(
            f"cannot coerce: written in {syntax}, stored in {outgoing.transfer_syntax_uid}"
        )
    data = out.getvalue()
    return replace(
        outgoing,
        checksum=sha256_of(BytesIO(data)),
        size=len(data),
        open=lambda: BytesIO(data),
    )


def unreadable(outgoing: Outgoing, exc: BaseException) -> Delivered:
    """The result of an instance whose stored bytes cannot be read now (a tier move or a
    restore in progress, a storage server down): transient."""
    log.warning("%s not sent: cannot read it: %s", outgoing.sop_instance_uid, exc)
    return Delivered(
        outgoing.sop_instance_uid, False, f"cannot read the stored instance: {exc}", True
    )


def send_each(
    batch: Sequence[Outgoing],
    coercion: Coercion | None,
    deliver: Callable[[list[Outgoing]], list[Delivered]],
    *,
    group_bytes: int = COERCED_GROUP_BYTES,
) -> list[Delivered]:
    """What every sender's ``send`` does: coerce each instance (:func:`coerced`), hand the
    ones that could be to `deliver` (one result each, in order), and merge the results in
    the order of `batch`.

    Without a coercion, `deliver` gets the whole batch (it opens each instance when it
    sends it). With one, the coerced copies are in memory until sent, so the batch is
    coerced and delivered in groups of at most `group_bytes` coerced bytes (an instance
    larger than that alone); once a group's deliveries all fail transiently (the
    destination down or failing), the rest of the batch is not coerced nor tried: each
    fails transiently with that group's error.
    """
    if coercion is None:
        return merged(batch, deliver)
    out: list[Delivered] = []
    group: list[Outgoing | Delivered] = []
    held = 0
    for index, outgoing in enumerate(batch):
        if held and held + outgoing.size > group_bytes:
            delivered, failing = _deliver_group(group, deliver)
            out += delivered
            group, held = [], 0
            if failing is not None:
                detail = f"not tried: {failing}"
                return out + [
                    Delivered(o.sop_instance_uid, False, detail, True) for o in batch[index:]
                ]
        try:
            copy = coerced(outgoing, coercion)
            group.append(copy)
            held += copy.size
        except InvalidDicomError as exc:
            group.append(Delivered(outgoing.sop_instance_uid, False, str(exc)))
        except (OSError, StorageError) as exc:
            group.append(unreadable(outgoing, exc))
    return out + _deliver_group(group, deliver)[0]


def _deliver_group(
    group: Sequence[Outgoing | Delivered], deliver: Callable[[list[Outgoing]], list[Delivered]]
) -> tuple[list[Delivered], str | None]:
    """The results of one group (:func:`merged`), and the error of its deliveries when
    every one of them failed transiently (None otherwise, or when none was delivered)."""
    results = merged(group, deliver)
    tried = [r for r, g in zip(results, group, strict=True) if not isinstance(g, Delivered)]
    if tried and all(not r.ok and r.transient for r in tried):
        return results, tried[0].detail
    return results, None


def merged(
    prepared: Sequence[_T | Delivered], deliver: Callable[[list[_T]], list[Delivered]]
) -> list[Delivered]:
    """The results of `prepared` in order: each item already a result kept, the others
    handed to `deliver` together (one result each, in order)."""
    ready = [p for p in prepared if not isinstance(p, Delivered)]
    results = iter(deliver(ready) if ready else [])
    return [p if isinstance(p, Delivered) else next(results) for p in prepared]


class PeerDownError(VannahError):
    """The destination cannot be reached: the instances not yet tried in this batch are not
    tried (each a transient failure), rather than each waiting for its own timeout."""


def until_down(
    groups: Iterable[list[Outgoing]], deliver: Callable[[list[Outgoing]], list[Delivered]]
) -> list[Delivered]:
    """`deliver` each group of instances in turn (one result each); once it raises
    :class:`PeerDownError`, that group and every later one fail transiently untried."""
    out: list[Delivered] = []
    down: PeerDownError | None = None
    for group in groups:
        if down is None:
            try:
                out += deliver(group)
                continue
            except PeerDownError as exc:
                log.warning("%s", exc)
                down = exc
        out += [Delivered(o.sop_instance_uid, False, str(down), True) for o in group]
    return out


def instance_parts(outgoing: Outgoing) -> tuple[str, str, str]:
    """Study, Series and SOP Instance UIDs of `outgoing`, each checked safe as a path
    component or key part (raises UnsafeUidError)."""
    return (
        require_uid(outgoing.study_instance_uid, "StudyInstanceUID"),
        require_uid(outgoing.series_instance_uid, "SeriesInstanceUID"),
        require_uid(outgoing.sop_instance_uid, "SOPInstanceUID"),
    )


def _secret(secrets: Mapping[str, str], name: str, what: str) -> str:
    value = secrets.get(name)
    if not value:
        raise DestinationError(f"{what}: no secret {name!r} in routing_secrets")
    return value


# ---------------------------------------------------------------- folder


class FolderSender:
    """Files at ``<path>/<Study>/<Series>/<SOP>.dcm``, written atomically and synced. A file
    already there with the same sha256 is left (``already there``); a different one is
    replaced by the new bytes (a new version of the instance)."""

    def __init__(self, destination: FolderDestination, *, coercion: Coercion | None = None):
        self.root = Path(destination.path)
        self.coercion = coercion

    def send(self, batch: Sequence[Outgoing]) -> list[Delivered]:
        return send_each(batch, self.coercion, lambda ready: [self._one(o) for o in ready])

    def close(self) -> None:
        pass

    def path_of(self, outgoing: Outgoing) -> Path:
        """Where `outgoing` goes (raises UnsafeUidError for a UID unsafe in a path)."""
        study, series, sop = instance_parts(outgoing)
        return self.root / study / series / f"{sop}.dcm"

    def _one(self, outgoing: Outgoing) -> Delivered:
        uid = outgoing.sop_instance_uid
        try:
            path = self.path_of(outgoing)
        except InvalidDicomError as exc:
            return Delivered(uid, False, str(exc))
        try:
            if path.is_file() and _file_sha256(path) == outgoing.checksum.lower():
                return Delivered(uid, True, ALREADY_THERE)
            replacing = path.exists()
        except OSError as exc:
            return Delivered(uid, False, f"cannot read {path}: {exc}", True)
        try:
            make_dirs(path.parent)
            with outgoing.open() as fp:  # streamed: an instance is never whole in memory
                write_atomic(path, _checked_chunks(fp, outgoing.checksum, outgoing.size))
        except _UnreadableError as exc:
            return unreadable(outgoing, exc.cause)
        except _MismatchError:
            return Delivered(uid, False, "the stored bytes do not match the catalog's checksum")
        except StorageError as exc:  # the tier could not even open it
            return unreadable(outgoing, exc)
        except OSError as exc:
            log.warning("%s not written to %s: %s", uid, path, exc)
            return Delivered(uid, False, f"cannot write {path}: {exc}", True)
        detail = "stored (replaced a different version)" if replacing else "stored"
        return Delivered(uid, True, detail, bytes_sent=outgoing.size)


class _UnreadableError(Exception):
    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class _MismatchError(Exception):
    pass


def _checked_chunks(fp: BinaryIO, checksum: str, size: int) -> Iterator[bytes]:
    """`fp`'s bytes a MiB at a time; raises :class:`_MismatchError` after the last unless they
    are `size` bytes of sha256 `checksum` (write_atomic then removes its temp file), and
    :class:`_UnreadableError` for a read that fails (a write that fails is an OSError)."""
    digest = hashlib.sha256()
    count = 0
    while True:
        try:
            chunk = fp.read(_CHUNK)
        except (OSError, StorageError) as exc:
            raise _UnreadableError(exc) from exc
        if not chunk:
            break
        digest.update(chunk)
        count += len(chunk)
        yield chunk
    if count != size or digest.hexdigest() != checksum.lower():
        raise _MismatchError


def _file_sha256(path: Path) -> str:
    with path.open("rb") as fp:
        return sha256_of(fp)


# ---------------------------------------------------------------- S3


def s3_endpoint(destination: S3Destination) -> tuple[str, bool]:
    """``host[:port]`` and whether to use TLS: the destination's endpoint, else AWS's for
    its region.

    >>> s3_endpoint(S3Destination(type="s3", bucket="vhc-archive", region="af-south-1"))
    ('s3.af-south-1.amazonaws.com', True)
    >>> s3_endpoint(S3Destination(type="s3", bucket="b-1", endpoint="http://127.0.0.1:8333"))
    ('127.0.0.1:8333', False)
    """
    if destination.endpoint is None:
        region = destination.region
        return (f"s3.{region}.amazonaws.com" if region else "s3.amazonaws.com"), True
    parts = urlsplit(destination.endpoint)
    return parts.netloc, parts.scheme == "https"


class S3Sender:
    """Objects at :meth:`S3Destination.object_key` through :class:`MinioStorage`'s
    verified write, each carrying its sha256 as ``x-amz-meta-sha256``. An object already
    there with the same size and sha256 (that metadata, else its bytes hashed) is not
    uploaded again (``already there``); a different one is overwritten."""

    def __init__(
        self,
        destination: S3Destination,
        *,
        secrets: Mapping[str, str],
        coercion: Coercion | None = None,
        timeout: float = 30.0,
    ) -> None:
        from vannah_pipelines.storage.s3 import MinioStorage, aws_default_credentials

        self.destination = destination
        self.coercion = coercion
        endpoint, secure = s3_endpoint(destination)
        access = secret = ""
        credentials = None
        if destination.credentials is None:
            credentials = aws_default_credentials()
        else:
            value = _secret(secrets, destination.credentials, destination.describe())
            access, sep, secret = value.partition(":")
            if not (sep and access and secret):
                raise DestinationError(
                    f"{destination.describe()}: secret {destination.credentials!r} is not "
                    '"ACCESS_KEY_ID:SECRET_ACCESS_KEY"'
                )
        self.storage: MinioStorage = MinioStorage(
            endpoint=endpoint,
            bucket=destination.bucket,
            access_key=access,
            secret_key=secret,
            secure=secure,
            region=destination.region,
            timeout_seconds=timeout,
            credentials=credentials,
            label=f"s3://{destination.bucket}",
        )

    def send(self, batch: Sequence[Outgoing]) -> list[Delivered]:
        return send_each(batch, self.coercion, self._deliver)

    def close(self) -> None:
        pass

    def _deliver(self, ready: list[Outgoing]) -> list[Delivered]:
        return until_down(([o] for o in ready), lambda one: [self._one(one[0])])

    def _one(self, outgoing: Outgoing) -> Delivered:
        uid = outgoing.sop_instance_uid
        try:
            key = self.destination.object_key(*instance_parts(outgoing))
        except InvalidDicomError as exc:
            return Delivered(uid, False, str(exc))
        try:
            if self._holds(key, outgoing):
                return Delivered(uid, True, ALREADY_THERE)
        except StorageUnavailableError as exc:
            raise PeerDownError(f"{self.destination.describe()}: {exc}") from exc
        except StorageError as exc:
            return _s3_failure(uid, exc)
        try:
            stream = outgoing.open()
        except (OSError, StorageError) as exc:
            return unreadable(outgoing, exc)
        try:
            with stream:
                self.storage.write(key, stream, outgoing.size, outgoing.checksum)
        except StorageError as exc:
            return _s3_failure(uid, exc)
        except OSError as exc:  # the source stream broke while it was uploaded
            return unreadable(outgoing, exc)
        return Delivered(uid, True, "stored", bytes_sent=outgoing.size)

    def _holds(self, key: str, outgoing: Outgoing) -> bool:
        """Whether `key` holds the bytes of `outgoing` already."""
        try:
            size, sha = self.storage.stat_sha256(key)
        except NotFoundError:
            return False
        if size != outgoing.size:
            return False
        if sha is None:  # written by someone else: hash what is there
            with self.storage.open(key) as fp:
                sha = sha256_of(fp)
        return sha == outgoing.checksum.lower()


def _s3_failure(uid: str, exc: StorageError) -> Delivered:
    # Unreachable, busy, or a corrupted upload (deleted again): may work later. Refused
    # (access denied, no such bucket, bad request): will not.
    transient = isinstance(exc, StorageUnavailableError | ChecksumMismatchError)
    log.warning("%s not stored in S3: %s", uid, exc)
    return Delivered(uid, False, str(exc), transient)


# ---------------------------------------------------------------- STOW-RS


def auth_headers(destination: StowDestination, secrets: Mapping[str, str]) -> dict[str, str]:
    """The credential header of a STOW-RS destination: ``Authorization: Bearer <token>``
    or ``X-API-Key: <key>`` (none without either).

    >>> d = StowDestination(type="stow", url="http://h/dicom-web", apiKey="k")
    >>> auth_headers(d, {"k": "s3cr3t"})
    {'X-API-Key': 's3cr3t'}
    """
    if destination.token is not None:
        token = _secret(secrets, destination.token, destination.describe())
        return {"Authorization": f"Bearer {token}"}
    if destination.api_key is not None:
        return {API_KEY_HEADER: _secret(secrets, destination.api_key, destination.describe())}
    return {}


def stow_requests(
    batch: Sequence[Outgoing], max_instances: int, max_bytes: int
) -> Iterator[list[Outgoing]]:
    """`batch` in order, cut into requests of at most `max_instances` instances and
    `max_bytes` bytes (an instance larger than `max_bytes` alone)."""
    current: list[Outgoing] = []
    size = 0
    for outgoing in batch:
        if current and (len(current) >= max_instances or size + outgoing.size > max_bytes):
            yield current
            current, size = [], 0
        current.append(outgoing)
        size += outgoing.size
    if current:
        yield current


def multipart_body(parts: Sequence[bytes], boundary: str) -> bytes:
    """`parts` as a ``multipart/related; type="application/dicom"`` body (RFC 2387)."""
    out = []
    for part in parts:
        out.append(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
        out.append(part)
        out.append(b"\r\n")
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out)


def _first(item: Any, tag: str) -> Any:
    element = item.get(tag) if isinstance(item, Mapping) else None
    values = element.get("Value") if isinstance(element, Mapping) else None
    return values[0] if isinstance(values, list) and values else None


def _listed(body: Any, tag: str) -> dict[str, Any]:
    """SOP Instance UID -> item of the sequence `tag` of a Store Instances Response."""
    sequence = body.get(tag) if isinstance(body, Mapping) else None
    items = sequence.get("Value") if isinstance(sequence, Mapping) else None
    found: dict[str, Any] = {}
    for item in items if isinstance(items, list) else []:
        uid = _first(item, _SOP_INSTANCE)
        if isinstance(uid, str):
            found[uid] = item
    return found


def stow_results(
    status: int, body: Any, sent: Sequence[Outgoing], reason: str = ""
) -> list[Delivered]:
    """Per-instance results of a STOW-RS answer (PS3.18 10.5.3): `status` and its DICOM
    JSON `body` (None if it had none or was not JSON), for the instances `sent`.

    200: every instance stored. 202 and 409: each instance by the response's
    ReferencedSOPSequence (stored) and FailedSOPSequence (its Failure Reason: 0xA7xx out
    of resources is transient, others permanent); an instance listed in neither is not
    delivered, transient. Other statuses fail every instance: 408, 429 and 5xx
    transiently, other 4xx permanently.

    >>> o = Outgoing("1.2", "1.2.3", "1.2.3.4", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1",
    ...              "00", 10, lambda: BytesIO())
    >>> failed = {"00081198": {"vr": "SQ", "Value": [
    ...     {"00081155": {"vr": "UI", "Value": ["1.2.3.4"]},
    ...      "00081197": {"vr": "US", "Value": [0xA700]}}]}}
    >>> stow_results(409, failed, [o])
    [Delivered(sop_instance_uid='1.2.3.4', ok=False, detail='STOW-RS 409: failure reason 0xA700', transient=True, bytes_sent=0)]
    """  # noqa: E501
    if status not in (200, 202, 409):
        transient = status in _TRANSIENT_HTTP or status >= 500
        text = f"STOW-RS {status}" + (f": {reason}" if reason else "")
        return [Delivered(o.sop_instance_uid, False, text, transient) for o in sent]
    failed = _listed(body, _FAILED_SOP)
    stored = _listed(body, _REFERENCED_SOP)
    out = []
    for o in sent:
        uid = o.sop_instance_uid
        if uid in failed:
            code = _first(failed[uid], _FAILURE_REASON)
            if isinstance(code, int):
                detail = f"STOW-RS {status}: failure reason 0x{code:04X}"
                transient = code & 0xFF00 == 0xA700
            else:
                detail, transient = f"STOW-RS {status}: failed (no failure reason)", False
            out.append(Delivered(uid, False, detail, transient))
        elif uid in stored or status == 200:
            warning = _first(stored.get(uid), _WARNING_REASON)
            detail = f"stored (STOW-RS {status})"
            if isinstance(warning, int):
                detail += f", warning 0x{warning:04X}"
            out.append(Delivered(uid, True, detail, bytes_sent=o.size))
        else:
            out.append(Delivered(uid, False, f"STOW-RS {status}: not in the response", True))
    return out


class StowSender:
    """STOW-RS ``POST <url>/studies`` (multipart/related; type="application/dicom", the
    Part-10 bytes), in requests of at most `max_instances` instances and `max_bytes`
    bytes, with the destination's bearer token or API key. An answer is read up to
    `max_response_bytes`, and within `response_seconds` of its headers; past either, the
    request's instances fail transiently (sent again later)."""

    def __init__(
        self,
        destination: StowDestination,
        *,
        secrets: Mapping[str, str],
        coercion: Coercion | None = None,
        timeout: float = 30.0,
        max_instances: int = STOW_MAX_INSTANCES,
        max_bytes: int = STOW_MAX_BYTES,
        max_response_bytes: int = STOW_RESPONSE_MAX_BYTES,
        response_seconds: float = STOW_RESPONSE_SECONDS,
    ) -> None:
        import requests  # the HTTP client: only for STOW destinations

        self.url = f"{destination.url}/studies"
        self.coercion = coercion
        self.timeout = timeout
        self.max_instances = max_instances
        self.max_bytes = max_bytes
        self.max_response_bytes = max_response_bytes
        self.response_seconds = response_seconds
        self.headers = {"Accept": _DICOM_JSON, **auth_headers(destination, secrets)}
        self._session: requests.Session = requests.Session()

    def send(self, batch: Sequence[Outgoing]) -> list[Delivered]:
        return send_each(batch, self.coercion, self._deliver)

    def close(self) -> None:
        self._session.close()

    def _deliver(self, ready: list[Outgoing]) -> list[Delivered]:
        chunks = stow_requests(ready, self.max_instances, self.max_bytes)
        return until_down(chunks, self._request)

    def _request(self, chunk: list[Outgoing]) -> list[Delivered]:
        read: list[tuple[Outgoing, bytes] | Delivered] = []
        for outgoing in chunk:  # one request's bytes in memory at a time
            try:
                with outgoing.open() as fp:
                    read.append((outgoing, fp.read()))
            except (OSError, StorageError) as exc:
                read.append(unreadable(outgoing, exc))
        return merged(read, self._post)

    def _post(self, parts: list[tuple[Outgoing, bytes]]) -> list[Delivered]:
        import requests

        chunk = [o for o, _ in parts]

        boundary = f"vannah-stow-{uuid.uuid4().hex}"
        headers = {
            **self.headers,
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        }
        try:
            response = self._session.post(
                self.url,
                data=multipart_body([d for _, d in parts], boundary),
                headers=headers,
                timeout=(min(5.0, self.timeout), self.timeout),
                allow_redirects=False,
                stream=True,  # the body is read by _read_answer, bounded
            )
        except requests.ConnectionError as exc:  # refused, unreachable, connect timeout
            raise PeerDownError(f"STOW-RS to {self.url}: cannot connect: {str(exc)[:200]}") from exc
        except requests.RequestException as exc:
            log.warning("STOW-RS to %s failed: %s", self.url, exc)
            detail = f"STOW-RS to {self.url}: {type(exc).__name__}: {str(exc)[:200]}"
            return [Delivered(o.sop_instance_uid, False, detail, True) for o in chunk]
        try:
            content = self._read_answer(response)
        except _AnswerRefusedError as exc:
            log.warning("STOW-RS to %s: %s", self.url, exc)
            detail = f"STOW-RS to {self.url}: {exc}"
            return [Delivered(o.sop_instance_uid, False, detail, True) for o in chunk]
        try:
            body = json.loads(content) if content else None
        except (ValueError, RecursionError):
            body = None
        reason = response.reason or ""
        if response.status_code in (401, 403):
            challenge = response.headers.get("WWW-Authenticate", "")
            reason = f"{reason} {challenge}".strip()
        results = stow_results(response.status_code, body, chunk, reason[:200])
        failed = sum(not r.ok for r in results)
        if failed:
            log.warning("STOW-RS to %s: %d of %d not stored", self.url, failed, len(chunk))
        return results

    def _read_answer(self, response: requests.Response) -> bytes:
        """The body of `response`, read up to `max_response_bytes` and within
        `response_seconds`; the response is closed (its connection too, when cut short).

        Raises
        ------
        _AnswerRefusedError
            The body is larger, or not complete in time, or broke off.
        """
        import requests

        expired = threading.Event()

        def cut() -> None:  # unblocks a read waiting on a server that trickles
            expired.set()
            # Already complete and its connection released: nothing to cut.
            with contextlib.suppress(ValueError, RuntimeError, OSError):
                response.raw.shutdown()

        watchdog = threading.Timer(self.response_seconds, cut)
        watchdog.daemon = True
        watchdog.start()
        body = bytearray()
        try:
            for block in response.iter_content(_READ_CHUNK):
                body += block
                if len(body) > self.max_response_bytes:
                    raise _AnswerRefusedError(
                        f"answer larger than {self.max_response_bytes} bytes (the limit); "
                        "not read further, connection closed"
                    )
        except requests.RequestException as exc:
            if not expired.is_set():
                raise _AnswerRefusedError(
                    f"answer broke off: {type(exc).__name__}: {str(exc)[:200]}"
                ) from exc
        finally:
            watchdog.cancel()
            response.close()
        if expired.is_set():  # an answer cut at the deadline may look complete: never use it
            raise _AnswerRefusedError(
                f"answer not complete within {self.response_seconds:g} s of its headers "
                "(the limit); connection closed"
            )
        return bytes(body)


class _AnswerRefusedError(VannahError):
    """A STOW-RS answer not read: too large, too slow, or broken off."""


# ---------------------------------------------------------------- the factory


def build_sender(
    destination: DicomDestination | S3Destination | StowDestination | FolderDestination,
    *,
    secrets: Mapping[str, str],
    calling_aet: str,
    coercion: Coercion | None = None,
    timeout: float = 30.0,
    dicom: Callable[..., Sender] | None = None,
) -> Sender:
    """The sender of `destination`.

    Parameters
    ----------
    destination
        A rule's destination.
    secrets
        Secret name -> value (``Settings.routing_secrets``, unwrapped); an S3 secret is
        ``ACCESS_KEY_ID:SECRET_ACCESS_KEY``.
    calling_aet
        Our AE title (DICOM destinations).
    coercion
        The rule's ``coerce``, applied to a copy of each instance sent.
    timeout
        Seconds for connecting and for each answer awaited.
    dicom
        The DICOM AE sender factory, called as ``dicom(destination, calling_aet=...,
        coercion=..., timeout=...)``: ``vannah_pipelines.dimse.route_sender.DicomSender``
        (or ``dicom_senders(settings)`` for TLS peers).

    Raises
    ------
    DestinationError
        A secret the destination names is missing or malformed, or a DICOM destination
        without `dicom`.
    """
    if isinstance(destination, FolderDestination):
        return FolderSender(destination, coercion=coercion)
    if isinstance(destination, S3Destination):
        return S3Sender(destination, secrets=secrets, coercion=coercion, timeout=timeout)
    if isinstance(destination, StowDestination):
        return StowSender(destination, secrets=secrets, coercion=coercion, timeout=timeout)
    if isinstance(destination, DicomDestination):
        if dicom is None:
            raise DestinationError(
                f"{destination.describe()}: no DICOM sender given; pass "
                "dicom=vannah_pipelines.dimse.route_sender.DicomSender"
            )
        return dicom(destination, calling_aet=calling_aet, coercion=coercion, timeout=timeout)
    raise DestinationError(f"unknown destination {destination!r}")
