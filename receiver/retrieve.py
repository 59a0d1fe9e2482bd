"""The Q/R service: C-FIND answers, and C-MOVE and C-GET sub-operations that send each
stored file as it is (PS3.4 C.4.1, C.4.2, C.4.3).

pynetdicom's own Q/R service re-encodes every instance from a decoded Dataset, which is not
byte-identical for every file, and passes every message through its DUL thread and queue.
:class:`ArchiveQueryRetrieveService` writes C-FIND answers to the socket itself and replaces
C-GET / C-MOVE: the EVT_C_GET / EVT_C_MOVE handler returns a :class:`RetrievePlan`
(instances with how to open their stored bytes, or a refusal), and each instance is opened
through the storage tiers when its sub-operation runs and sent in its stored transfer
syntax, not decoded when the peer accepts that syntax, its data set read from the stream
straight into P-DATA PDUs (:func:`vannah_pipelines.dimse.store_scu.send_message`): C-MOVE
sub-operations on an association of our own
(:class:`vannah_pipelines.dimse.store_scu.StoreSCU`), C-GET ones written to the C-GET
association's socket by the thread pynetdicom runs the request on. pynetdicom's own sending
passes every PDU through its DUL thread and queue, three times slower. When the peer does
not accept the stored syntax, the instance goes decompressed (or, uncompressed, re-encoded)
into an uncompressed syntax it accepts (:mod:`vannah_pipelines.dimse.negotiation`, shared
with routing); when that fails too, so does the sub-operation, with the reason in the Error
Comment. An instance that cannot be read (in the cold tier: a restore is requested; a tier
that is down) fails its sub-operation, and the reason goes in the final response's Error
Comment."""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any, BinaryIO, Protocol, cast

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import association as _association
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_FIND, C_GET, C_MOVE, C_STORE
from pynetdicom.dsutils import decode, encode
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class import QueryRetrieveServiceClass, ServiceClass
from pynetdicom.sop_class import uid_to_service_class

from receiver import pynetdicom_fixes
from receiver.contexts import PATIENT_ROOT_FIND, RETRIEVE_SOP_CLASSES, STUDY_ROOT_FIND
from receiver.responses import EncodedIdentifier
from receiver.status import RetrieveStatus
from vannah_pipelines.dicom.json_encode import NotEncodableError, encode_json_dataset
from vannah_pipelines.dimse import pdu
from vannah_pipelines.dimse.negotiation import NotSendableError, prepare
from vannah_pipelines.dimse.outbound import open_association, store_instance
from vannah_pipelines.dimse.peers import DicomPeer
from vannah_pipelines.dimse.store_scu import (
    StoreAssociationError,
    StoreSCU,
    send_message,
)
from vannah_pipelines.errors import (
    ArchivedError,
    InvalidDicomError,
    NotFoundError,
    StorageError,
    StorageUnavailableError,
)
from vannah_pipelines.storage.tiers import RestoreRequiredError

log = logging.getLogger(__name__)

MAX_SUBOPERATIONS = 65535  # the Number of ... Sub-operations are US (PS3.7 9.1.3)
# PS3.4 C.4.2.1.4 / C.4.3.1.4: pending responses are optional; one per sub-operation cost a
# response encode per instance, so they are sent at most this often (seconds).
PENDING_INTERVAL = 0.2
GET_POLL_DELAY = 0.0001  # seconds between the DUL's socket checks during a C-GET
QUERY_RETRIEVE_SOP_CLASSES = RETRIEVE_SOP_CLASSES | {PATIENT_ROOT_FIND, STUDY_ROOT_FIND}
FIND_PENDING, FIND_PENDING_WARNING = 0xFF00, 0xFF01
FIND_HANDLER_FAILED = 0xC311  # as pynetdicom answers an exception in the handler
FIND_CANNOT_ENCODE = 0xC312  # as pynetdicom answers an identifier it cannot encode


@dataclass(frozen=True)
class SubOperation:
    """One instance to send: its identity, transfer syntax, and how to open its stored bytes
    (a seekable stream from whatever tier holds them; raises StorageError, OSError or
    InvalidDicomError when they cannot be read)."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    opener: Callable[[], BinaryIO]


@dataclass
class RetrievePlan:
    """What a C-GET / C-MOVE handler returns: a refusal, or the sub-operations to run."""

    suboperations: list[SubOperation] = field(default_factory=list)
    destination: DicomPeer | None = None  # C-MOVE only
    refusal: RetrieveStatus | None = None
    comment: str = ""
    release: Callable[[], None] | None = None  # called once the retrieve ends, however

    @classmethod
    def refuse(cls, status: RetrieveStatus, comment: str) -> RetrievePlan:
        return cls(refusal=status, comment=comment)


@dataclass
class _Counts:
    remaining: int
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_uids: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)  # distinct, for the Error Comment

    def fail(self, uid: str, reason: str = "") -> None:
        self.failed += 1
        self.failed_uids.append(uid)
        if reason and reason not in self.reasons and len(self.reasons) < 4:
            self.reasons.append(reason)


def _comment(rsp: C_GET | C_MOVE, text: str) -> None:
    # PS3.7 C.4: Error Comment is LO, at most 64 characters, no patient data.
    cast(Any, rsp).ErrorComment = text.replace("\\", "/")[:64]


def _status_kind(status: int) -> str:
    if status == 0x0000:
        return "success"
    if status & 0xF000 == 0xB000:
        return "warning"  # PS3.4 B.2.3 coercion / elements discarded / not checked
    return "failure"


class ArchiveQueryRetrieveService(QueryRetrieveServiceClass):
    """pynetdicom's Q/R service with C-GET / C-MOVE sending stored files unchanged, and
    C-FIND answers written straight to the socket."""

    def _c_find_scp(self, req: C_FIND, context: PresentationContext) -> None:
        """C-FIND: the EVT_C_FIND handler's (status, identifier) pairs as C-FIND-RSPs.

        pynetdicom formats every answer for its debug log and passes each through its DUL
        thread and queue: about 1 ms an answer. Here each is encoded once (the identifier
        with pydicom, the command by hand) and written by this thread, the one pynetdicom
        runs the request on, so nothing else writes meanwhile; C-CANCEL still arrives
        through pynetdicom (``event.is_cancelled`` in the handler).
        """
        cx_id = cast(int, context.context_id)
        respond = _FindResponder(self, req, cx_id)

        def answers() -> Any:
            return evt.trigger(
                self.assoc,
                evt.EVT_C_FIND,
                {"request": req, "context": context.as_tuple, "_is_cancelled": self.is_cancelled},
            )

        answer_find(answers, respond, context.transfer_syntax[0], lambda: self.assoc.is_established)

    def _get_scp(self, req: C_GET, context: PresentationContext) -> None:
        self._retrieve(req, context, C_GET(), evt.EVT_C_GET)

    def _move_scp(self, req: C_MOVE, context: PresentationContext) -> None:
        self._retrieve(req, context, C_MOVE(), evt.EVT_C_MOVE)

    def _retrieve(
        self,
        req: C_GET | C_MOVE,
        context: PresentationContext,
        rsp: C_GET | C_MOVE,
        event: evt.EventType,
    ) -> None:
        cx_id = cast(int, context.context_id)
        rsp.MessageID = req.MessageID
        rsp.MessageIDBeingRespondedTo = req.MessageID
        rsp.AffectedSOPClassUID = req.AffectedSOPClassUID
        try:
            plan = evt.trigger(
                self.assoc,
                event,
                {"request": req, "context": context.as_tuple, "_is_cancelled": self.is_cancelled},
            )
        except Exception:
            log.exception("retrieve handler failed")
            plan = RetrievePlan.refuse(RetrieveStatus.UNABLE_TO_PROCESS, "internal error")
        if not isinstance(plan, RetrievePlan):
            plan = RetrievePlan.refuse(RetrieveStatus.UNABLE_TO_PROCESS, "no retrieve handler")
        try:
            self._serve(plan, req, context, rsp, cx_id)
        finally:
            if plan.release is not None:
                plan.release()

    def _serve(
        self,
        plan: RetrievePlan,
        req: C_GET | C_MOVE,
        context: PresentationContext,
        rsp: C_GET | C_MOVE,
        cx_id: int,
    ) -> None:
        if not self.assoc.is_established:
            return
        if plan.refusal is not None:
            rsp.Status = int(plan.refusal)
            _comment(rsp, plan.comment)
            self.dimse.send_msg(rsp, cx_id)
            return
        subops = plan.suboperations
        if len(subops) > MAX_SUBOPERATIONS:
            rsp.Status = int(RetrieveStatus.UNABLE_TO_CALCULATE_MATCHES)
            _comment(rsp, f"more than {MAX_SUBOPERATIONS} instances match")
            self.dimse.send_msg(rsp, cx_id)
            return
        counts = _Counts(remaining=len(subops))
        if not subops:
            self._final(rsp, cx_id, context, counts)
            return
        scu: StoreSCU | None = None
        if isinstance(req, C_MOVE):
            assert plan.destination is not None
            scu = self._open_destination(plan.destination, subops)
            if scu is None:
                counts.failed = counts.remaining
                counts.remaining = 0
                counts.failed_uids = [s.sop_instance_uid for s in subops]
                self._final(rsp, cx_id, context, counts, comment="destination unreachable")
                return
        last_pending = -PENDING_INTERVAL  # the first sub-operation is always reported
        dul = self.assoc.dul
        idle_delay = dul._run_loop_delay
        if scu is None:
            # C-GET responses come in through pynetdicom's DUL thread, which checks the
            # socket every `_run_loop_delay` (1 ms) when idle: poll faster while we wait.
            dul._run_loop_delay = GET_POLL_DELAY
        try:
            for index, subop in enumerate(subops):
                if not self.assoc.is_established or self.assoc.acse.is_aborted():
                    return
                if self.is_cancelled(cast(int, req.MessageID)):
                    rsp.Status = int(RetrieveStatus.CANCEL)
                    rsp.NumberOfRemainingSuboperations = counts.remaining
                    self._final(rsp, cx_id, context, counts, cancelled=True)
                    return
                msg_id = (cast(int, req.MessageID) + index) % 65535 + 1
                reason = ""
                try:
                    stream = subop.opener()
                except (StorageError, OSError, InvalidDicomError) as exc:
                    log.warning("sub-operation for %s failed: %s", subop.sop_instance_uid, exc)
                    kind, reason = "failure", unreadable_reason(exc)
                else:
                    with stream:
                        if scu is not None:
                            kind, reason = self._send_move(
                                scu, subop, stream, msg_id, cast(int, req.MessageID)
                            )
                        else:
                            kind, reason = self._send_get(subop, stream, msg_id)
                counts.remaining -= 1
                if kind == "success":
                    counts.completed += 1
                elif kind == "warning":
                    counts.warning += 1
                else:
                    counts.fail(subop.sop_instance_uid, reason)
                now = time.monotonic()
                if counts.remaining and now - last_pending >= PENDING_INTERVAL:
                    last_pending = now
                    self._pending(req, cx_id, counts)
        finally:
            dul._run_loop_delay = idle_delay
            if scu is not None:
                scu.release()
        self._final(rsp, cx_id, context, counts)

    def _open_destination(
        self, destination: DicomPeer, subops: list[SubOperation]
    ) -> StoreSCU | None:
        try:
            return open_association(
                destination,
                self.ae.ae_title,
                [(s.sop_class_uid, s.transfer_syntax_uid) for s in subops],
                timeout=float(self.ae.dimse_timeout or 30),
            )
        except StoreAssociationError as exc:
            log.warning("C-MOVE: cannot associate with %s: %s", destination, exc)
            return None

    def _send_move(
        self, scu: StoreSCU, subop: SubOperation, fp: BinaryIO, msg_id: int, originator_id: int
    ) -> tuple[str, str]:
        """One C-MOVE sub-operation on our own storage association, from the open `fp`:
        its kind (success, warning, failure) and the reason of a failure."""
        try:
            _syntax, result = store_instance(
                scu,
                fp,
                sop_class_uid=subop.sop_class_uid,
                sop_instance_uid=subop.sop_instance_uid,
                transfer_syntax_uid=subop.transfer_syntax_uid,
                message_id=msg_id,
                move_originator=(self.ae.ae_title, originator_id),
            )
        except NotSendableError as exc:
            log.warning("sub-operation for %s failed: %s", subop.sop_instance_uid, exc)
            return "failure", str(exc)
        except (OSError, InvalidDicomError, StoreAssociationError) as exc:
            log.warning("sub-operation for %s failed: %s", subop.sop_instance_uid, exc)
            return "failure", ""
        return self._outcome(subop, result.status), ""

    def _pending(self, req: C_GET | C_MOVE, cx_id: int, counts: _Counts) -> None:
        """A pending response, written straight to the socket like the C-GET
        sub-operations (through pynetdicom's queue it could land inside one of them)."""
        command = pdu.response(
            pdu.C_MOVE_RSP if isinstance(req, C_MOVE) else pdu.C_GET_RSP,
            cast(int, req.MessageID),
            str(req.AffectedSOPClassUID).encode("ascii"),
            int(RetrieveStatus.PENDING),
            suboperations=(counts.remaining, counts.completed, counts.failed, counts.warning),
        )
        send_message(self._socket(), self.dimse.maximum_pdu_size, cx_id, command)

    def _socket(self) -> socket.socket:
        sock = self.assoc.dul.socket
        if sock is None or sock.socket is None:
            raise OSError("the association has no socket")
        return sock.socket

    def _send_get(self, subop: SubOperation, fp: BinaryIO, msg_id: int) -> tuple[str, str]:
        """One C-GET sub-operation on the C-GET association, from the open `fp`: the
        C-STORE-RQ written to its socket directly (this thread is the one pynetdicom runs
        the request on, so nothing else writes meanwhile), the response read from
        pynetdicom's DIMSE queue."""
        try:
            # Contexts on which this association may send the SOP class (SCU role).
            contexts = {
                str(cx.transfer_syntax[0]): cast(int, cx.context_id)
                for cx in reversed(self.assoc.accepted_contexts)
                if cx.abstract_syntax == subop.sop_class_uid and cx.as_scu
            }
            syntax, data = prepare(fp, subop.transfer_syntax_uid, list(contexts))
            command = pdu.encode_request(
                pdu.C_STORE_RQ,
                msg_id,
                subop.sop_class_uid.encode("ascii"),
                subop.sop_instance_uid.encode("ascii"),
                has_data_set=True,
            )
            send_message(
                self._socket(),
                self.dimse.maximum_pdu_size,
                contexts[syntax],
                command,
                data,
            )
        except NotSendableError as exc:
            # No accepted context for the SOP class the file can go in, as stored or not.
            log.warning("sub-operation for %s failed: %s", subop.sop_instance_uid, exc)
            return "failure", str(exc)
        except (OSError, InvalidDicomError) as exc:
            log.warning("sub-operation for %s failed: %s", subop.sop_instance_uid, exc)
            return "failure", ""
        _cx, rsp = self.dimse.get_msg(block=True)
        if not isinstance(rsp, C_STORE) or rsp.Status is None:
            log.warning("sub-operation for %s: no C-STORE response", subop.sop_instance_uid)
            if self.assoc.is_established:
                self.assoc.abort()
            return "failure", ""
        return self._outcome(subop, int(rsp.Status)), ""

    @staticmethod
    def _outcome(subop: SubOperation, status: int) -> str:
        kind = _status_kind(status)
        if kind != "success":
            log.info("sub-operation for %s: C-STORE status 0x%04X", subop.sop_instance_uid, status)
        return kind

    def _final(
        self,
        rsp: C_GET | C_MOVE,
        cx_id: int,
        context: PresentationContext,
        counts: _Counts,
        *,
        cancelled: bool = False,
        comment: str = "",
    ) -> None:
        """The final response (PS3.4 C.4.2.1.5, C.4.3.1.5): success, 0xB000 some failed or
        warned, 0xA702 all failed, or 0xFE00 cancelled; with the Failed SOP Instance UID
        List, and in Error Comment (PS3.7 C.4.2) `comment` or else why instances could not
        be read (archived: a restore was requested; a storage tier down)."""
        if not cancelled:
            if not counts.failed and not counts.warning:
                rsp.Status = int(RetrieveStatus.SUCCESS)
            elif counts.failed and not counts.completed and not counts.warning:
                rsp.Status = int(RetrieveStatus.UNABLE_TO_PERFORM_SUBOPERATIONS)
            else:
                rsp.Status = int(RetrieveStatus.SUBOPERATIONS_FAILED)
        comment = comment or "; ".join(counts.reasons)
        if comment:
            _comment(rsp, comment)
        rsp.NumberOfCompletedSuboperations = counts.completed
        rsp.NumberOfFailedSuboperations = counts.failed
        rsp.NumberOfWarningSuboperations = counts.warning
        if counts.failed_uids:
            ts = context.transfer_syntax[0]
            ds = Dataset()
            ds.FailedSOPInstanceUIDList = counts.failed_uids
            data = encode(ds, ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated)
            if data is not None:
                rsp.Identifier = BytesIO(data)
        log.info(
            "retrieve final 0x%04X: %d completed, %d failed, %d warning",
            rsp.Status,
            counts.completed,
            counts.failed,
            counts.warning,
        )
        self.dimse.send_msg(rsp, cx_id)


class _FindResponder:
    """Writes the C-FIND-RSPs of one request to its association's socket."""

    def __init__(self, service: ArchiveQueryRetrieveService, req: C_FIND, cx_id: int) -> None:
        self._service = service
        self._message_id = cast(int, req.MessageID)
        self._sop_class = str(req.AffectedSOPClassUID).encode("ascii")
        self._cx_id = cx_id

    def __call__(self, status: int, identifier: bytes | None = None, comment: str = "") -> None:
        command = pdu.response(
            pdu.C_FIND_RSP,
            self._message_id,
            self._sop_class,
            status,
            has_data_set=identifier is not None,
            error_comment=comment,
        )
        service = self._service
        send_message(
            service._socket(),
            service.dimse.maximum_pdu_size,
            self._cx_id,
            command,
            None if identifier is None else BytesIO(identifier),
        )


class FindRespond(Protocol):
    """Sends one C-FIND-RSP: its status, the encoded identifier if any, an Error Comment."""

    def __call__(self, status: int, identifier: bytes | None = None, comment: str = "") -> None: ...


def answer_find(
    answers: Callable[[], Iterable[tuple[Any, Any]] | None],
    respond: FindRespond,
    syntax: UID,
    established: Callable[[], bool],
) -> None:
    """The EVT_C_FIND handler's (status, identifier) pairs as C-FIND-RSPs, on both DIMSE
    paths: each pending answer's identifier encoded in `syntax`, the first other status
    ends the answers (0x0000 if the handler ends without one); 0xC311 if the handler
    fails, 0xC312 for an answer that cannot be encoded (as pynetdicom answers them)."""
    try:
        for status, identifier in answers() or ():
            if not established():
                return
            code, comment = _status_and_comment(status)
            if code in (FIND_PENDING, FIND_PENDING_WARNING) and identifier is not None:
                data = _encode_identifier(identifier, syntax)
                if not data:
                    respond(FIND_CANNOT_ENCODE, comment="answer cannot be encoded")
                    return
                respond(code, data)
                continue
            respond(code, comment=comment)  # a final status ends the answers
            return
        respond(0x0000)
    except OSError as exc:
        log.warning("C-FIND response not sent: %s", exc)
    except Exception:
        log.exception("C-FIND failed unexpectedly")
        with contextlib.suppress(OSError):
            respond(FIND_HANDLER_FAILED, comment="internal error")


def _encode_identifier(
    identifier: Dataset | Mapping[str, Any] | EncodedIdentifier, syntax: UID
) -> bytes | None:
    """An answer's bytes in the context's transfer syntax: as the handler encoded it when
    in that syntax, DICOM JSON written directly when it is plain
    (:mod:`vannah_pipelines.dicom.json_encode`), else through pydicom."""
    if isinstance(identifier, EncodedIdentifier):
        if identifier.syntax == syntax:
            return identifier.data
        source = UID(identifier.syntax)
        identifier = decode(
            BytesIO(identifier.data),
            source.is_implicit_VR,
            source.is_little_endian,
            source.is_deflated,
        )
    if isinstance(identifier, Mapping):
        if syntax.is_little_endian and not syntax.is_deflated:
            try:
                return encode_json_dataset(identifier, implicit=syntax.is_implicit_VR)
            except NotEncodableError:
                pass
        identifier = Dataset.from_json(dict(identifier))
    return encode(identifier, syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated)


def _status_and_comment(status: Any) -> tuple[int, str]:
    """A handler's yielded status (an int, or a Dataset with Status and ErrorComment)."""
    if isinstance(status, Dataset):
        return int(status.Status), str(status.get("ErrorComment", ""))
    return int(status), ""


def _service_class_for(uid: str) -> type[ServiceClass]:
    if uid in QUERY_RETRIEVE_SOP_CLASSES:
        return ArchiveQueryRetrieveService
    return uid_to_service_class(uid)


def unreadable_reason(exc: BaseException) -> str:
    """Why an instance could not be read, short enough for an Error Comment (LO, 64
    characters) and free of patient data.

    >>> unreadable_reason(NotFoundError("hot: no object 'a/b/c.dcm'"))
    'stored object in no storage tier'
    """
    if isinstance(exc, RestoreRequiredError):
        seconds = exc.retry_after_seconds
        wait = f"{seconds // 3600} h" if seconds >= 3600 else f"{seconds} s"
        return f"in cold storage: restore requested, retry in {wait}"
    if isinstance(exc, ArchivedError):
        return "in cold storage, not restored yet"
    if isinstance(exc, NotFoundError):
        return "stored object in no storage tier"
    if isinstance(exc, StorageUnavailableError):
        return "storage tier unavailable"
    return "stored object unreadable"


def install() -> None:
    """Route the Patient / Study Root FIND, MOVE and GET SOP classes to
    :class:`ArchiveQueryRetrieveService` (a process-wide pynetdicom setting)."""
    pynetdicom_fixes.install()
    # pynetdicom picks a service class per SOP class with this module-level function and
    # has no registration for standard UIDs; wrapping it is the one hook needed.
    setattr(_association, "uid_to_service_class", _service_class_for)  # noqa: B010 (not exported)
