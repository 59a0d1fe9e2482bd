"""pynetdicom event handlers: unpack the event, call the pure layer, answer a DIMSE status.

No handler lets an exception escape (pynetdicom would answer 0xC211 with no context).
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.events import Event

from receiver.archive import Archive
from receiver.contexts import MODALITY_WORKLIST_FIND
from receiver.gate import identity_response
from receiver.part10 import file_header
from receiver.responses import failure
from receiver.retrieve import RetrievePlan
from receiver.status import FindStatus, RetrieveStatus, StoreStatus, VerificationStatus
from vannah_pipelines.dicom.inspection import (
    InflatedTooLargeError,
    InstanceIds,
    read_instance_ids,
)
from vannah_pipelines.errors import InsufficientSpaceError, InvalidDicomError, UnsafeUidError
from vannah_pipelines.landing.layout import Buffer, LandingZone, ReceiveFacts, RollingBatch
from vannah_pipelines.landing.space import is_disk_full, require_free_space
from vannah_pipelines.security.audit import AuditEvent, AuditLog
from vannah_pipelines.security.peers import Admission
from vannah_pipelines.security.principal import Principal, Role
from vannah_pipelines.settings import Settings

log = logging.getLogger(__name__)

SOURCE = "dimse"
AUDIT_SERVICE = "receiver"
MAX_AUDITED_STUDIES = 1000  # study UIDs listed in one association's audit event
# The audit action of an association that did several things: the first that happened.
_ACTION_ORDER = (
    "store",
    "move",
    "retrieve",
    "commitment",
    "query",
    "worklist-query",
    "echo",
)
_VERIFIED = frozenset({"dimse-user", "dimse-jwt"})  # principals named by a user identity
DEFAULT_MAX_INSTANCE_BYTES = 2 * 1024**3  # Settings.max_instance_bytes's default


class Landing:
    """The worker's landing batch, refusing writes once closed (so none strands a batch),
    larger than ``max_instance_bytes``, or eating into the free-space reserve."""

    def __init__(
        self,
        batch: RollingBatch,
        *,
        max_instance_bytes: int = DEFAULT_MAX_INSTANCE_BYTES,
        free_space_reserve: int = 0,
    ) -> None:
        self._batch = batch
        self._lock = threading.Lock()
        self._closed = False
        self.max_instance_bytes = max_instance_bytes
        self.free_space_reserve = free_space_reserve

    @classmethod
    def from_settings(cls, settings: Settings) -> Landing:
        """A worker's landing: a rolling ``dimse`` batch and the limits of `settings`."""
        batch = RollingBatch(
            LandingZone(settings.landing_dir),
            "dimse",
            settings.landing_batch_max_files,
            settings.landing_batch_max_age_seconds,
        )
        return cls(
            batch,
            max_instance_bytes=settings.max_instance_bytes,
            free_space_reserve=settings.free_space_reserve_bytes,
        )

    def write_instance(self, data: Buffer | Sequence[Buffer], facts: ReceiveFacts) -> None:
        """Commit one instance; returns only once it is durable (the rename is the commit).

        Raises
        ------
        InsufficientSpaceError
            If writing would leave less than ``free_space_reserve`` bytes free (nothing
            is written).
        OSError
            If the receiver is closing, or the write fails (nothing is left behind).
        """
        if self._closed:
            raise OSError(errno.ESHUTDOWN, "the receiver is shutting down")
        parts = (data,) if isinstance(data, bytes | bytearray | memoryview) else data
        size = sum(memoryview(part).nbytes for part in parts)
        require_free_space(self._batch.zone.root, size, self.free_space_reserve)
        self._batch.write_instance(parts, facts)

    def close(self) -> None:
        """Seal the open batch; later writes raise OSError."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._batch.close()


@dataclass
class _AssociationCounts:
    calling_ae: str
    peer: str
    called_ae: str = ""
    principal: Principal | None = None
    stored: int = 0
    failed: int = 0
    bytes: int = 0
    outcome: str = "closed"
    study_uids: set[str] = field(default_factory=set)
    operations: dict[str, int] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)


class AssociationLog:
    """Per-association counts, logged at INFO when the association ends (identifiers only),
    and, with an `audit` log, one audit event per association (never one per instance)."""

    def __init__(self, audit: AuditLog | None = None) -> None:
        self._lock = threading.Lock()
        self._counts: dict[int, _AssociationCounts] = {}
        self.audit = audit

    def opened(
        self,
        assoc_id: int,
        calling_ae: str,
        called_ae: str,
        peer: str,
        ours: str,
        principal: Principal | None = None,
    ) -> None:
        with self._lock:
            self._counts[assoc_id] = _AssociationCounts(
                calling_ae, peer, called_ae.strip(), principal
            )
        log.info("association from %s at %s (called AE %s)", calling_ae, peer, called_ae)
        if called_ae.strip() != ours.strip():
            log.info("called AE %s is not ours (%s); accepted anyway", called_ae, ours)

    def record(self, assoc_id: int, *, stored: bool, size: int = 0, study_uid: str = "") -> None:
        with self._lock:
            counts = self._counts.get(assoc_id)
            if counts is None:
                return
            if stored:
                counts.stored += 1
                counts.bytes += size
                if study_uid and len(counts.study_uids) < MAX_AUDITED_STUDIES:
                    counts.study_uids.add(study_uid)
            else:
                counts.failed += 1

    def note(self, assoc_id: int, operation: str) -> None:
        """Count a DIMSE operation other than C-STORE (an audit action: ``echo``,
        ``query``, ``worklist-query``, ``move``, ``retrieve``)."""
        with self._lock:
            counts = self._counts.get(assoc_id)
            if counts is not None:
                counts.operations[operation] = counts.operations.get(operation, 0) + 1

    def ended(self, assoc_id: int, outcome: str) -> None:
        with self._lock:
            counts = self._counts.pop(assoc_id, None)
        if counts is not None:
            log.info(
                "association from %s at %s %s: %d stored, %d failed",
                counts.calling_ae,
                counts.peer,
                outcome,
                counts.stored,
                counts.failed,
            )
            if self.audit is not None:
                self.audit.record(_audit_event(counts, outcome))

    def active(self) -> int:
        with self._lock:
            return len(self._counts)


def _audit_event(counts: _AssociationCounts, outcome: str) -> AuditEvent:
    """The audit event of one ended association."""
    operations = dict(counts.operations)
    if counts.stored or counts.failed:
        operations["store"] = counts.stored + counts.failed
    action = next((a for a in _ACTION_ORDER if a in operations), "association")
    if counts.failed:
        result = "partial" if counts.stored else "failure"
    elif outcome == "released":
        result = "success"
    else:
        result = "partial" if counts.stored else "failure"
    principal = counts.principal
    event = AuditEvent(
        service=AUDIT_SERVICE,
        action=action,
        outcome=result,
        address=counts.peer,
        calling_ae=counts.calling_ae,
        called_ae=counts.called_ae,
        study_uids=sorted(counts.study_uids),
        instances=counts.stored if "store" in operations else None,
        bytes=counts.bytes if "store" in operations else None,
        status=outcome,
        detail=" ".join(f"{name}={n}" for name, n in sorted(operations.items()))
        + (f" failed={counts.failed}" if counts.failed else ""),
        duration_ms=(time.monotonic() - counts.started) * 1000,
    )
    if principal is not None:
        event.by(principal)
    if principal is None or principal.method not in _VERIFIED:
        event.subject = counts.calling_ae
    return event


def association_admission(event: Event) -> Admission | None:
    """The gate's decision for a pynetdicom association (None: no rule applied)."""
    sock = getattr(event.assoc.dul.socket, "socket", None)
    admission = getattr(sock, "admission", None)
    return admission if isinstance(admission, Admission) else None


def _called_ae(event: Event) -> str:
    primitive = event.assoc.requestor.primitive
    return "" if primitive is None else str(primitive.called_ae_title)


def _peer(event: Event) -> str:
    requestor = event.assoc.requestor
    return f"{requestor.address}:{requestor.port}"


def handle_echo(event: Event, associations: AssociationLog | None = None) -> int:
    """EVT_C_ECHO: answer success (PS3.4 A.4)."""
    if associations is not None:
        associations.note(id(event.assoc), "echo")
    return int(VerificationStatus.SUCCESS)


def handle_requested(event: Event) -> None:
    """EVT_REQUESTED: add the User Identity Negotiation response the gate's admission calls
    for (pynetdicom itself only answers types 3-5, through EVT_USER_ID)."""
    try:
        response = identity_response(association_admission(event))
        if response is not None:
            event.assoc.acceptor.add_negotiation_item(response)
    except Exception:
        log.exception("adding the user identity response failed")


def handle_store(event: Event, landing: Landing, associations: AssociationLog) -> int | Dataset:
    """EVT_C_STORE: land the Part-10 bytes as received; success only after the commit.
    A principal without the write role is refused (0x0124)."""
    assoc_id = id(event.assoc)
    admission = association_admission(event)
    if admission is not None and not admission.may_store:
        associations.record(assoc_id, stored=False)
        return failure(StoreStatus.NOT_AUTHORIZED, "not authorized to store")
    try:
        request: Any = event.request
        store = StoreRequest(
            sop_class_uid=str(request.AffectedSOPClassUID),
            sop_instance_uid=str(request.AffectedSOPInstanceUID),
            transfer_syntax=str(event.context.transfer_syntax),
            calling_ae=event.assoc.requestor.ae_title,
            called_ae=_called_ae(event),
            peer=_peer(event),
        )
        received: memoryview = request.DataSet.getbuffer()  # the bytes as received, not copied
    except Exception:
        log.exception("C-STORE failed unexpectedly")
        associations.record(assoc_id, stored=False)
        return failure(StoreStatus.PROCESSING_FAILURE, "internal error")
    with received as dataset:
        status, comment = receive_instance(landing, associations, assoc_id, store, dataset)
    return failure(status, comment) if comment else status


@dataclass(frozen=True)
class StoreRequest:
    """What a C-STORE-RQ and its association say about one data set (no patient data)."""

    sop_class_uid: str  # the command's Affected SOP Class UID
    sop_instance_uid: str  # the command's Affected SOP Instance UID
    transfer_syntax: str  # the presentation context's
    calling_ae: str
    called_ae: str
    peer: str  # "host:port"


def receive_instance(
    landing: Landing,
    associations: AssociationLog,
    assoc_id: int,
    request: StoreRequest,
    dataset: Buffer,
) -> tuple[int, str]:
    """Land one received data set and count it; the C-STORE of both DIMSE paths.

    Returns ``(status, error comment)``; the comment is empty on success. Never raises:
    an unexpected fault is logged and answered 0x0110.
    """
    study_uid = ""
    try:
        status, comment, study_uid = _land_instance(landing, request, dataset)
    except Exception:
        log.exception("C-STORE failed unexpectedly")
        status, comment = int(StoreStatus.PROCESSING_FAILURE), "internal error"
    associations.record(
        assoc_id,
        stored=status == StoreStatus.SUCCESS,
        size=memoryview(dataset).nbytes,
        study_uid=study_uid,
    )
    return status, comment


def land_instance(landing: Landing, request: StoreRequest, dataset: Buffer) -> tuple[int, str]:
    """Validate `dataset` against `request` and commit it; success only after the write
    (see :func:`_land_instance` for the statuses)."""
    status, comment, _study = _land_instance(landing, request, dataset)
    return status, comment


def _land_instance(
    landing: Landing, request: StoreRequest, dataset: Buffer
) -> tuple[int, str, str]:
    """Validate `dataset` against `request` and commit it; success only after the write.

    Returns ``(status, error comment)``: 0xA900 for missing, malformed or mismatched UIDs,
    0xC000 for a data set that cannot be parsed (the comment says where), 0xA700 for a data
    set over ``landing.max_instance_bytes`` (inflated size for a deflated one), when the
    free-space reserve is reached or the write fails (nothing is left behind), else 0x0000
    with an empty comment.
    """
    size = memoryview(dataset).nbytes
    if size > landing.max_instance_bytes:
        log.warning("refused C-STORE from %s: %d bytes, over the limit", request.calling_ae, size)
        return int(StoreStatus.OUT_OF_RESOURCES), too_large_comment(landing.max_instance_bytes), ""
    try:
        ids = read_instance_ids(
            memoryview(dataset),
            request.transfer_syntax,
            max_inflated_bytes=landing.max_instance_bytes,
        )
        _check_request_matches(request, ids)
    except UnsafeUidError as exc:
        log.warning("refused C-STORE from %s: %s", request.calling_ae, exc.attribute)
        return int(StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS), f"invalid {exc.attribute}", ""
    except InflatedTooLargeError:
        log.warning("refused C-STORE from %s: inflates over the limit", request.calling_ae)
        return int(StoreStatus.OUT_OF_RESOURCES), too_large_comment(landing.max_instance_bytes), ""
    except InvalidDicomError as exc:
        log.warning("refused C-STORE from %s: %s", request.calling_ae, exc)
        return int(StoreStatus.CANNOT_UNDERSTAND), f"cannot parse: {exc}", ""

    facts = ReceiveFacts(
        sop_instance_uid=ids.sop_instance_uid,
        sop_class_uid=ids.sop_class_uid,
        transfer_syntax_uid=request.transfer_syntax,
        source=SOURCE,
        calling_ae=request.calling_ae,
        called_ae=request.called_ae,
        peer=request.peer,
    )
    try:
        # The same file as event.encoded_dataset(include_meta=True), without building it.
        header = file_header(ids.sop_class_uid, ids.sop_instance_uid, request.transfer_syntax)
        landing.write_instance((header, dataset), facts)
    except InsufficientSpaceError as exc:
        log.warning("refused %s from %s: %s", ids.sop_instance_uid, request.calling_ae, exc)
        return int(StoreStatus.OUT_OF_RESOURCES), "disk space reserve reached", ""
    except OSError as exc:
        if is_disk_full(exc):
            log.error("landing write of %s failed: disk full", ids.sop_instance_uid)
            return int(StoreStatus.OUT_OF_RESOURCES), "disk full", ""
        log.exception("landing write of %s failed", ids.sop_instance_uid)
        return int(StoreStatus.OUT_OF_RESOURCES), "cannot store the instance", ""
    return int(StoreStatus.SUCCESS), "", ids.study_instance_uid


def too_large_comment(limit: int) -> str:
    """The Error Comment of a data set over the size limit (0xA700)."""
    return f"data set larger than the {limit}-byte limit"


def _check_request_matches(request: StoreRequest, ids: InstanceIds) -> None:
    """The DIMSE command's UIDs must name the data set sent (PS3.4 B.2.3: else 0xA900)."""
    if request.sop_instance_uid != ids.sop_instance_uid:
        raise UnsafeUidError(request.sop_instance_uid, "AffectedSOPInstanceUID")
    if request.sop_class_uid != ids.sop_class_uid:
        raise UnsafeUidError(request.sop_class_uid, "AffectedSOPClassUID")


def handle_established(event: Event, associations: AssociationLog) -> None:
    """EVT_ESTABLISHED: start counting (logs calling AE and peer, never patient data)."""
    try:
        requestor = event.assoc.requestor
        associations.opened(
            id(event.assoc),
            calling_ae=requestor.ae_title,
            called_ae=_called_ae(event),
            peer=_peer(event),
            ours=event.assoc.acceptor.ae_title,
            principal=_principal(event),
        )
    except Exception:
        log.exception("logging an association failed")


def handle_ended(event: Event, associations: AssociationLog) -> None:
    """EVT_RELEASED / EVT_ABORTED / EVT_CONN_CLOSE: log the counts once."""
    if event.event == evt.EVT_RELEASED:
        outcome = "released"
    elif event.event == evt.EVT_ABORTED:
        outcome = "aborted"
    else:
        outcome = "closed"
    try:
        associations.ended(id(event.assoc), outcome)
    except Exception:
        log.exception("logging an association failed")


def _not_authorized(operation: str) -> Any:
    """What a Q/R handler answers a principal without the read role: 0x0124."""
    comment = "not authorized to read"
    if operation == "query":
        return iter([(failure(FindStatus.NOT_AUTHORIZED, comment), None)])
    return RetrievePlan.refuse(RetrieveStatus.NOT_AUTHORIZED, comment)


def _calling_ae(event: Any) -> str:
    return str(event.assoc.requestor.ae_title)


def _principal(event: Event) -> Principal | None:
    admission = association_admission(event)
    return None if admission is None else admission.principal


def _query_retrieve(
    name: str, associations: AssociationLog | None = None
) -> Callable[[Event, Archive], Any]:
    """The handler `name` of :mod:`receiver.qr_handlers`, imported on the first call: the
    Q/R stack (DuckDB, pyarrow) costs a worker ~60 MiB that storage alone never needs.
    The operation is counted for the association's audit event."""

    def handler(event: Event, archive: Archive) -> Any:
        return run_query_retrieve(
            name, event, archive, associations, id(event.assoc), _principal(event)
        )

    handler.__name__ = name
    return handler


def run_query_retrieve(
    name: str,
    event: Any,
    archive: Archive,
    associations: AssociationLog | None,
    assoc_id: int,
    principal: Principal | None,
) -> Any:
    """Count the operation for the association's audit event, refuse a principal without
    the read role (0x0124), else call :mod:`receiver.qr_handlers`' handler `name`; the
    same on both DIMSE paths (`event` is pynetdicom's, or the fast path's stand-in)."""
    operation = {"handle_find": "query", "handle_get": "retrieve", "handle_move": "move"}[name]
    if associations is not None:
        kind = operation
        with contextlib.suppress(Exception):
            if str(event.request.AffectedSOPClassUID) == MODALITY_WORKLIST_FIND:
                kind = "worklist-query"
        associations.note(assoc_id, kind)
    if principal is not None and not principal.has(Role.READ):
        log.warning(
            "refused %s from %s: %s may not read",
            operation,
            _calling_ae(event),
            principal.subject,
        )
        return _not_authorized(operation)
    module = importlib.import_module("receiver.qr_handlers")
    return getattr(module, name)(event, archive)


def event_handlers(
    landing: Landing, associations: AssociationLog, archive: Archive | None = None
) -> list[Any]:
    """The handler binding table for ``ae.start_server(evt_handlers=...)``."""
    qr: list[Any] = []
    if archive is not None:
        qr = [
            (evt.EVT_C_FIND, _query_retrieve("handle_find", associations), [archive]),
            (evt.EVT_C_GET, _query_retrieve("handle_get", associations), [archive]),
            (evt.EVT_C_MOVE, _query_retrieve("handle_move", associations), [archive]),
        ]
    return [
        *qr,
        (evt.EVT_C_ECHO, handle_echo, [associations]),
        (evt.EVT_REQUESTED, handle_requested),
        (evt.EVT_C_STORE, handle_store, [landing, associations]),
        (evt.EVT_ESTABLISHED, handle_established, [associations]),
        (evt.EVT_RELEASED, handle_ended, [associations]),
        (evt.EVT_ABORTED, handle_ended, [associations]),
        (evt.EVT_CONN_CLOSE, handle_ended, [associations]),
    ]
