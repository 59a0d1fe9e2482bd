"""C-MOVE and C-GET sub-operations that send each stored file as it is (PS3.4 C.4.2, C.4.3).

pynetdicom's own Q/R service re-encodes every instance from a decoded Dataset, which is not
byte-identical for every file. :class:`ArchiveQueryRetrieveService` keeps pynetdicom's C-FIND
and replaces its C-GET / C-MOVE: the EVT_C_GET / EVT_C_MOVE handler returns a
:class:`RetrievePlan` (instances with their stored file, or a refusal), and each file is
sent with ``send_c_store(path)`` in its stored transfer syntax, never decoded
(``_config.STORE_SEND_CHUNKED_DATASET``). A peer that does not accept that syntax fails
that sub-operation.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any, cast

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import _config, evt
from pynetdicom import association as _association
from pynetdicom.dimse_primitives import C_GET, C_MOVE
from pynetdicom.dsutils import encode
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.service_class import QueryRetrieveServiceClass, ServiceClass
from pynetdicom.sop_class import uid_to_service_class

from receiver import pynetdicom_fixes
from receiver.contexts import RETRIEVE_SOP_CLASSES
from receiver.status import RetrieveStatus

log = logging.getLogger(__name__)

MAX_SUBOPERATIONS = 65535  # the Number of ... Sub-operations are US (PS3.7 9.1.3)
UNCOMPRESSED = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"})
MAX_CONTEXTS = 128  # presentation contexts one association may propose (PS3.8 9.3.2.2)


@dataclass(frozen=True)
class SubOperation:
    """One instance to send: its identity, transfer syntax and file (None: cannot be sent)."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    path: Path | None
    problem: str = ""  # why `path` is None (logged with the UID)


@dataclass(frozen=True)
class Destination:
    """A C-MOVE destination: a known peer."""

    aet: str
    host: str
    port: int


@dataclass
class RetrievePlan:
    """What a C-GET / C-MOVE handler returns: a refusal, or the sub-operations to run."""

    suboperations: list[SubOperation] = field(default_factory=list)
    destination: Destination | None = None  # C-MOVE only
    refusal: RetrieveStatus | None = None
    comment: str = ""

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
    """pynetdicom's Q/R service with C-GET / C-MOVE sending stored files unchanged."""

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
        sender = self.assoc
        is_move = isinstance(req, C_MOVE)
        if is_move:
            assert plan.destination is not None
            opened = self._open_destination(plan.destination, subops)
            if opened is None:
                counts.failed = counts.remaining
                counts.remaining = 0
                counts.failed_uids = [s.sop_instance_uid for s in subops]
                self._final(rsp, cx_id, context, counts, comment="destination unreachable")
                return
            sender = opened
        try:
            for index, subop in enumerate(subops):
                if not self.assoc.is_established or self.assoc.acse.is_aborted():
                    return
                if self.is_cancelled(cast(int, req.MessageID)):
                    rsp.Status = int(RetrieveStatus.CANCEL)
                    rsp.NumberOfRemainingSuboperations = counts.remaining
                    self._final(rsp, cx_id, context, counts, cancelled=True)
                    return
                kind = self._send(sender, subop, req, index, originator=is_move)
                counts.remaining -= 1
                if kind == "success":
                    counts.completed += 1
                elif kind == "warning":
                    counts.warning += 1
                else:
                    counts.failed += 1
                    counts.failed_uids.append(subop.sop_instance_uid)
                if counts.remaining:
                    pending = type(rsp)()
                    pending.MessageIDBeingRespondedTo = req.MessageID
                    pending.AffectedSOPClassUID = req.AffectedSOPClassUID
                    pending.Status = int(RetrieveStatus.PENDING)
                    pending.NumberOfRemainingSuboperations = counts.remaining
                    pending.NumberOfCompletedSuboperations = counts.completed
                    pending.NumberOfFailedSuboperations = counts.failed
                    pending.NumberOfWarningSuboperations = counts.warning
                    self.dimse.send_msg(pending, cx_id)
        finally:
            if sender is not self.assoc and sender.is_established:
                sender.release()
        self._final(rsp, cx_id, context, counts)

    def _open_destination(
        self, destination: Destination, subops: list[SubOperation]
    ) -> _association.Association | None:
        pairs = sorted({(s.sop_class_uid, s.transfer_syntax_uid) for s in subops if s.path})
        if len(pairs) > MAX_CONTEXTS:
            log.warning(
                "C-MOVE to %s needs %d presentation contexts; proposing the first %d",
                destination.aet,
                len(pairs),
                MAX_CONTEXTS,
            )
        contexts = [build_context(sop, [ts]) for sop, ts in pairs[:MAX_CONTEXTS]]
        if not contexts:  # nothing sendable: every sub-operation fails without a peer
            contexts = [build_context("1.2.840.10008.1.1")]
        store_assoc = self.ae.associate(
            destination.host,
            destination.port,
            contexts=contexts,
            ae_title=destination.aet,
            evt_handlers=[(evt.EVT_CONN_OPEN, _no_delay)],
        )
        if not store_assoc.is_established:
            log.warning(
                "C-MOVE: cannot associate with %s at %s:%d",
                destination.aet,
                destination.host,
                destination.port,
            )
            return None
        return store_assoc

    def _send(
        self,
        sender: _association.Association,
        subop: SubOperation,
        req: C_GET | C_MOVE,
        index: int,
        *,
        originator: bool,
    ) -> str:
        if subop.path is None:
            log.warning("sub-operation for %s failed: %s", subop.sop_instance_uid, subop.problem)
            return "failure"
        if not subop.path.is_file():
            log.warning("sub-operation for %s failed: file missing", subop.sop_instance_uid)
            return "failure"
        msg_id = (cast(int, req.MessageID) + index) % 65535 + 1
        kwargs: dict[str, Any] = {"msg_id": msg_id}
        if originator:
            kwargs["originator_aet"] = self.ae.ae_title
            kwargs["originator_id"] = req.MessageID
        try:
            try:
                status = sender.send_c_store(subop.path, **kwargs)
            except ValueError:
                # No context with the stored syntax. An uncompressed file may still go in
                # another uncompressed syntax the peer accepted (pydicom re-encodes it:
                # the same elements, not the same bytes); anything else fails.
                if subop.transfer_syntax_uid not in UNCOMPRESSED:
                    raise
                status = sender.send_c_store(dcmread(subop.path), **kwargs)
                log.info("sub-operation for %s re-encoded", subop.sop_instance_uid)
        except (ValueError, AttributeError, OSError, RuntimeError) as exc:
            # No accepted context for the stored SOP class / transfer syntax, or I/O.
            log.warning("sub-operation for %s failed: %s", subop.sop_instance_uid, exc)
            return "failure"
        if "Status" not in status:
            log.warning("sub-operation for %s: no C-STORE response", subop.sop_instance_uid)
            return "failure"
        kind = _status_kind(int(status.Status))
        if kind != "success":
            log.info(
                "sub-operation for %s: C-STORE status 0x%04X",
                subop.sop_instance_uid,
                int(status.Status),
            )
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
        """The final response (PS3.4 C.4.2.1.5): success, 0xB000 some failed or warned,
        0xA702 all failed, or 0xFE00 cancelled; with the Failed SOP Instance UID List."""
        if not cancelled:
            if not counts.failed and not counts.warning:
                rsp.Status = int(RetrieveStatus.SUCCESS)
            elif counts.failed and not counts.completed and not counts.warning:
                rsp.Status = int(RetrieveStatus.UNABLE_TO_PERFORM_SUBOPERATIONS)
            else:
                rsp.Status = int(RetrieveStatus.SUBOPERATIONS_FAILED)
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


def _service_class_for(uid: str) -> type[ServiceClass]:
    if uid in RETRIEVE_SOP_CLASSES:
        return ArchiveQueryRetrieveService
    return uid_to_service_class(uid)


def _no_delay(event: evt.Event) -> None:
    """EVT_CONN_OPEN: turn Nagle off on the outgoing connection (PS3.8 peers answer each
    C-STORE before the next; with Nagle every sub-operation waits for a delayed ACK)."""
    sock = event.assoc.dul.socket
    if sock is not None and sock.socket is not None:
        sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def install() -> None:
    """Route the C-GET / C-MOVE SOP classes to :class:`ArchiveQueryRetrieveService` and send
    stored files without decoding them (process-wide pynetdicom settings)."""
    pynetdicom_fixes.install()
    _config.STORE_SEND_CHUNKED_DATASET = True
    # pynetdicom picks a service class per SOP class with this module-level function and
    # has no registration for standard UIDs; wrapping it is the one hook needed.
    setattr(_association, "uid_to_service_class", _service_class_for)  # noqa: B010 (not exported)
