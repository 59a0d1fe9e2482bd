"""The fast path: a minimal DIMSE acceptor for associations that only store, echo and find.

pynetdicom serves an association on three threads that hand every PDU through queues and
poll with 1 ms sleeps, reads the socket 4 KB at a time, and decodes and encodes every
command set with pydicom. Most of our associations are modalities sending images, so the
receiver peeks at each A-ASSOCIATE-RQ (``MSG_PEEK``, nothing consumed) and serves the ones
that propose only Verification, the storage and the FIND SOP classes, with no role selection
and no user identity, itself: on the connection's thread, blocking reads into one reused
buffer, command sets parsed and answered by hand (``vannah_pipelines.dimse.pdu``), instances
landed by the same code as the pynetdicom handler (``receiver.handlers.receive_instance``).
C-FIND (Q/R and Modality Worklist) is served the same way (``receiver.fast_find``). Anything
else, or a request that cannot be peeked and decoded, goes to pynetdicom on the untouched
socket. Negotiation is pynetdicom's own (``negotiate_as_acceptor`` and its PDU classes), so
both paths accept the same contexts and transfer syntaxes and send the same A-ASSOCIATE-AC."""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import ssl
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from pydicom.uid import UID
from pynetdicom import AE
from pynetdicom import pdu as dul
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
    UserIdentityNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

from receiver.archive import Archive
from receiver.contexts import STORAGE_SOP_CLASSES, VERIFICATION_SOP_CLASS
from receiver.fast_find import FIND_SOP_CLASSES, MAX_IDENTIFIER_BYTES, FindEvent, serve_find
from receiver.gate import identity_response
from receiver.handlers import (
    AssociationLog,
    Landing,
    StoreRequest,
    receive_instance,
    too_large_comment,
)
from receiver.limits import LimitExceededError, Limits, Pace
from receiver.responses import error_comment
from receiver.status import StoreStatus
from vannah_pipelines.dimse import pdu
from vannah_pipelines.security.peers import Admission
from vannah_pipelines.security.principal import Role

log = logging.getLogger(__name__)

APPLICATION_CONTEXT_NAME = "1.2.840.10008.3.1.1.1"  # PS3.7 A.2.1: the DICOM application context
FAST_SOP_CLASSES = frozenset({VERIFICATION_SOP_CLASS, *STORAGE_SOP_CLASSES})
# A larger A-ASSOCIATE-RQ goes to pynetdicom: a peek can only wait for what the socket's
# receive buffer holds (128 contexts with 3 transfer syntaxes each are about 13 kB).
MAX_REQUEST_BYTES = 32 * 1024
MAX_COMMAND_BYTES = 64 * 1024  # a C-STORE-RQ command set is a few hundred bytes
MAX_SMALL_PDU_BYTES = 64  # A-RELEASE-RQ and A-ABORT bodies are 4 bytes
INITIAL_BUFFER_BYTES = 1 << 20  # the data set buffer grows to the largest instance received
KEEP_BUFFER_BYTES = 64 << 20  # and is dropped after an instance larger than this
DRAIN_BUFFER_BYTES = 256 << 10  # a data set over max_instance_bytes is read through this
# PS3.8 9.3.4: A-ASSOCIATE-RJ rejected-transient, service-provider (presentation), local
# limit exceeded; what pynetdicom answers past maximum_associations.
REJECT_LIMIT = (0x02, 0x03, 0x02)
# Distinct A-ASSOCIATE-RQs whose decision and A-ASSOCIATE-AC a worker remembers (a site's
# modalities and viewers each send the same request every time); past it, it starts over.
NEGOTIATION_MEMO_SIZE = 64
_TIMEVAL = struct.Struct("ll")
_T = TypeVar("_T")


class _PeerAbortedError(Exception):
    """The peer sent A-ABORT while a C-FIND was being answered."""


class _PduError(Exception):
    """A protocol error: the association is aborted (A-P-ABORT with this reason)."""

    def __init__(self, reason: int, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Proposal:
    """A peeked A-ASSOCIATE-RQ: its primitive, size, and whether the fast path may serve it."""

    primitive: A_ASSOCIATE
    length: int  # bytes of the whole PDU, to consume once decided
    eligible: bool
    peer_max_pdu: int  # the requestor's Maximum Length Received (0: no limit)
    consumed: bool = False  # already read off the socket (by the gate), not peeked
    admission: Admission | None = None  # the gate's decision (None: no rule applies)
    request: bytes = b""  # the PDU, when its answer may be remembered (peeked, not gated)


class FastStore:
    """A worker's storage fast path: decides per connection, admits, runs associations.

    Built from the worker's AE, so the fast path answers with the AE's maximum PDU size,
    implementation class UID and version name, timeouts and association limit.
    """

    def __init__(
        self,
        ae: AE,
        ae_title: str,
        contexts: list[PresentationContext],
        landing: Landing,
        associations: AssociationLog,
        limits: Limits,
        archive: Archive | None = None,
    ) -> None:
        self.ae_title = ae_title
        self.archive = archive  # None: C-FIND associations go to pynetdicom
        self.limits = limits
        self.contexts = contexts
        self.landing = landing
        self.associations = associations
        self.max_pdu = int(ae.maximum_pdu_size)
        self.implementation_class_uid = str(ae.implementation_class_uid)
        self.implementation_version_name = ae.implementation_version_name
        self.acse_timeout = float(ae.acse_timeout or 30)
        self.network_timeout = float(ae.network_timeout or 60)
        self.max_associations = int(ae.maximum_associations)
        fast = FAST_SOP_CLASSES | (FIND_SOP_CLASSES if archive is not None else frozenset())
        self._supported = {str(cx.abstract_syntax) for cx in contexts} & fast
        self._lock = threading.Lock()
        self._running: set[FastAssociation] = set()
        self.served = 0  # associations accepted on the fast path, ever
        # A peeked request's bytes -> its Proposal and, once accepted, the answer
        # (:meth:`peek`, :meth:`accept`). Everything they depend on besides the bytes is
        # fixed when the worker starts; a gated request (user identity, admission) is
        # decided and answered afresh every time.
        self._decided: dict[bytes, Proposal] = {}
        self._answers: dict[bytes, tuple[bytes, dict[int, tuple[str, str]]]] = {}

    def running(self) -> list[FastAssociation]:
        """The fast-path associations in progress (for the worker's drain at shutdown)."""
        with self._lock:
            return list(self._running)

    def serve(
        self,
        sock: socket.socket,
        address: tuple[str, int],
        *,
        others: Callable[[], int],
        hand_off: Callable[[], None],
        arrived: Callable[[], None] = lambda: None,
        proposal: Proposal | None = None,
    ) -> None:
        """Serve the connection `sock` on this thread, or `hand_off` it to pynetdicom.

        `others` counts the pynetdicom associations in progress: with the fast ones, they
        make up ``max_associations``; past it the request is rejected here whichever path
        it would take. A request that cannot be peeked is handed off untouched (pynetdicom
        then applies its own limit). `arrived` is called once the A-ASSOCIATE-RQ has.
        A `proposal` the gate has already read and admitted is served as it is.
        """
        if proposal is None and not isinstance(sock, ssl.SSLSocket):
            proposal = self.peek(sock)
        if proposal is not None:
            arrived()
        if proposal is None:
            if _closed_by_peer(sock):
                # A port probe (connect, close): nothing to answer. Handed off, it would
                # hold a pynetdicom association thread (and a worker's drain) until its
                # ACSE timer ran out.
                arrived()
                sock.close()
                return
            hand_off()
            return
        assoc: FastAssociation | None = None
        with self._lock:
            running = others() + len(self._running)
            if running < self.max_associations:
                if not proposal.eligible:
                    hand_off()  # under the lock: the new pynetdicom thread counts from now
                    return
                assoc = FastAssociation(self, sock, address, proposal)
                self._running.add(assoc)
                self.served += 1
        if assoc is None:
            self._reject(sock, proposal, running)
            return
        try:
            assoc.run()
        finally:
            with self._lock:
                self._running.discard(assoc)

    def peek(self, sock: socket.socket) -> Proposal | None:
        """Peek at (without consuming) an A-ASSOCIATE-RQ for up to the ACSE timeout.

        Returns None when nothing decodable arrived in time: the wrong PDU type, a PDU
        over ``MAX_REQUEST_BYTES``, garbage, a timeout or a closed connection. The socket's
        blocking mode and timeouts are as they were either way.
        """
        timeout = sock.gettimeout()
        try:
            sock.settimeout(None)  # MSG_WAITALL waits only on a blocking socket
            _set_receive_timeout(sock, self.acse_timeout)
            try:
                wanted = pdu.PDU_HEADER.size
                data = sock.recv(wanted, socket.MSG_PEEK | socket.MSG_WAITALL)
                if len(data) == wanted:
                    pdu_type, length = pdu.PDU_HEADER.unpack(data)
                    if pdu_type != pdu.A_ASSOCIATE_RQ or length > MAX_REQUEST_BYTES:
                        return None
                    wanted += length
                    data = sock.recv(wanted, socket.MSG_PEEK | socket.MSG_WAITALL)
            finally:
                _set_receive_timeout(sock, 0)
                sock.settimeout(timeout)
        except OSError:
            return None
        if len(data) != wanted:
            return None
        proposal = self._decided.get(data)
        if proposal is None:
            proposal = self.decide(data)
            if proposal is not None:
                _remember(self._decided, data, proposal)
        return proposal

    def decide(
        self, data: bytes, *, consumed: bool = False, admission: Admission | None = None
    ) -> Proposal | None:
        """Decode an A-ASSOCIATE-RQ PDU; None if pynetdicom cannot decode it either.

        With an `admission` (the gate has checked the association, user identity included),
        user identity negotiation does not send it to pynetdicom; a principal that may not
        store, or may not read and proposes C-FIND, does (refused there, 0x0124).
        """
        try:
            rq = dul.A_ASSOCIATE_RQ()
            rq.decode(data)
            primitive = rq.to_primitive()
            contexts = list(primitive.presentation_context_definition_list)
            user_items = list(primitive.user_information)
            protocol_version = rq.protocol_version
            application_context = str(primitive.application_context_name)
        except Exception:  # whatever a garbled PDU raises; pynetdicom will answer it
            return None
        syntaxes = {str(cx.abstract_syntax) for cx in contexts}
        peer_max_pdu: int | None = None
        negotiates_more = False
        for item in user_items:
            if isinstance(item, MaximumLengthNotification):
                peer_max_pdu = int(item.maximum_length_received or 0)
            elif isinstance(item, SCP_SCU_RoleSelectionNegotiation) or (
                isinstance(item, UserIdentityNegotiation) and admission is None
            ):
                negotiates_more = True
        eligible = (
            protocol_version == 0x0001
            and application_context == APPLICATION_CONTEXT_NAME
            and bool(contexts)
            and syntaxes <= self._supported
            and peer_max_pdu is not None
            and not negotiates_more
            and (
                admission is None
                or admission.may_store
                or not syntaxes.intersection(STORAGE_SOP_CLASSES)
            )
            and (
                admission is None
                or admission.principal.has(Role.READ)
                or not syntaxes & FIND_SOP_CLASSES
            )
        )
        request = b"" if consumed or admission is not None else bytes(data)
        return Proposal(
            primitive, len(data), eligible, peer_max_pdu or 0, consumed, admission, request
        )

    def accept(self, proposal: Proposal) -> tuple[bytes, dict[int, tuple[str, str]]]:
        """Negotiate as pynetdicom does; return the A-ASSOCIATE-AC PDU and the accepted
        contexts as ``{context ID: (abstract syntax, transfer syntax)}``.

        The same request gets the same answer: a peeked request's answer is remembered
        (decoding, negotiating and encoding cost ~0.2 ms of each short association).
        """
        if proposal.request:
            answer = self._answers.get(proposal.request)
            if answer is None:
                answer = self._negotiate(proposal)
                _remember(self._answers, proposal.request, answer)
            return answer[0], dict(answer[1])
        return self._negotiate(proposal)

    def _negotiate(self, proposal: Proposal) -> tuple[bytes, dict[int, tuple[str, str]]]:
        rq = proposal.primitive
        results, _roles = negotiate_as_acceptor(
            rq.presentation_context_definition_list, self.contexts
        )
        accepted = [cx for cx in results if cx.result == 0x00]
        ac = A_ASSOCIATE()
        ac.application_context_name = UID(APPLICATION_CONTEXT_NAME)
        ac.calling_ae_title = rq.calling_ae_title
        ac.called_ae_title = rq.called_ae_title
        ac.result = 0x00
        ac.result_source = 0x01
        # pynetdicom's order: the accepted contexts, then the rejected ones.
        ac.presentation_context_definition_results_list = accepted + [
            cx for cx in results if cx.result != 0x00
        ]
        max_length = MaximumLengthNotification()
        max_length.maximum_length_received = self.max_pdu
        class_uid = ImplementationClassUIDNotification()
        class_uid.implementation_class_uid = UID(self.implementation_class_uid)
        user_information: list[object] = [max_length, class_uid]
        if self.implementation_version_name:
            version = ImplementationVersionNameNotification()
            version.implementation_version_name = self.implementation_version_name
            user_information.append(version)
        response = identity_response(proposal.admission)
        if response is not None:
            user_information.append(response)
        ac.user_information = user_information  # type: ignore[assignment]
        encoded = dul.A_ASSOCIATE_AC()
        encoded.from_primitive(ac)
        contexts = {
            int(cx.context_id or 0): (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
            for cx in accepted
        }
        return encoded.encode(), contexts

    def _reject(self, sock: socket.socket, proposal: Proposal, running: int) -> None:
        log.warning(
            "rejected an association from %s: %d associations running (max_associations)",
            proposal.primitive.calling_ae_title,
            running,
        )
        try:
            sock.settimeout(self.acse_timeout)
            if not proposal.consumed:
                pdu.recv_exactly(sock, proposal.length)
        except OSError:
            pdu.close(sock)
            return
        pdu.send_final(
            sock, pdu.associate_rj(*REJECT_LIMIT), min(self.acse_timeout, pdu.ARTIM_SECONDS)
        )


class FastAssociation:
    """One fast-path association, served on the thread that calls :meth:`run`.

    PS3.8 upper layer and PS3.7 message exchange, acceptor side, for C-ECHO and C-STORE
    only; a PDU or command outside that aborts the association (A-P-ABORT) with a warning.
    """

    def __init__(
        self, store: FastStore, sock: socket.socket, address: tuple[str, int], proposal: Proposal
    ) -> None:
        self._store = store
        self._sock = sock
        self._proposal = proposal
        self.calling_ae = str(proposal.primitive.calling_ae_title)
        self.called_ae = str(proposal.primitive.called_ae_title)
        self.peer = f"{address[0]}:{address[1]}"
        self._contexts: dict[int, tuple[str, str]] = {}
        self._send_lock = threading.Lock()
        self._done = threading.Event()
        self._closing = False
        self._header = bytearray(pdu.PDU_HEADER.size)
        self._header_view = memoryview(self._header)
        self._command = bytearray()
        self._command_context: int | None = None
        self._pending: tuple[int, pdu.Command] | None = None  # a request awaiting its data set
        self._finding = False  # answering a C-FIND: only C-CANCEL may come meanwhile
        self._cancelled: set[int] = set()  # C-CANCEL-RQs received (MessageIDBeingRespondedTo)
        self._broken: BaseException | None = None  # what ended a C-FIND's reads, raised after
        self._data = bytearray(0)
        self._view = memoryview(self._data)
        self._used = 0
        self._oversize = False  # the data set in progress is over the limit: drained
        self._pace = Pace(store.limits, store.network_timeout)

    # ------------------------------------------------------------------ control

    def abort(self) -> None:
        """Abort from another thread (worker shutdown): A-ABORT, then close the connection;
        an instance being received is dropped, one being written completes unacknowledged."""
        self._closing = True
        # Not behind a send blocked on a peer that stopped reading: the shutdown ends both.
        if self._send_lock.acquire(timeout=1.0):
            try:
                with contextlib.suppress(OSError):
                    self._sock.sendall(pdu.abort())
            finally:
                self._send_lock.release()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def join(self, timeout: float | None = None) -> None:
        """Wait until the association has ended."""
        self._done.wait(timeout)

    def run(self) -> None:
        """Accept, serve until release or abort, log the outcome, close the connection."""
        store = self._store
        opened = False
        outcome = "aborted"
        try:
            self._sock.settimeout(store.acse_timeout)
            if not self._proposal.consumed:
                pdu.recv_exactly(self._sock, self._proposal.length)  # the peeked A-ASSOCIATE-RQ
            ac, self._contexts = store.accept(self._proposal)
            self._send(ac)
            store.associations.opened(
                id(self),
                calling_ae=self.calling_ae,
                called_ae=self.called_ae,
                peer=self.peer,
                ours=store.ae_title,
                principal=None
                if self._proposal.admission is None
                else (self._proposal.admission.principal),
            )
            opened = True
            # One timeout for every read and send: each read that times out asks the pace
            # whether a limit has passed (the deadline, the idle timeout, a slow PDU).
            self._sock.settimeout(self._pace.tick)
            outcome = self._serve()
        except (_PduError, LimitExceededError) as exc:
            log.warning(
                "aborting the association from %s at %s: %s", self.calling_ae, self.peer, exc
            )
            self._send_quietly(pdu.abort(pdu.ABORT_SERVICE_PROVIDER, exc.reason))
        except TimeoutError:
            log.warning(
                "association from %s at %s silent for %.0f s; aborting",
                self.calling_ae,
                self.peer,
                store.network_timeout,
            )
            self._send_quietly(pdu.abort(pdu.ABORT_SERVICE_PROVIDER, pdu.REASON_NOT_SPECIFIED))
        except OSError as exc:
            if not self._closing:
                log.warning(
                    "connection from %s at %s lost without release: %s",
                    self.calling_ae,
                    self.peer,
                    exc,
                )
        except Exception:
            log.exception("fast-path association from %s failed", self.calling_ae)
            self._send_quietly(pdu.abort(pdu.ABORT_SERVICE_PROVIDER, pdu.REASON_NOT_SPECIFIED))
        finally:
            if opened:
                store.associations.ended(id(self), outcome)
            pdu.close(self._sock)
            self._done.set()

    # ------------------------------------------------------------------ PDUs

    def _serve(self) -> str:
        while True:
            try:
                outcome = self._next_pdu()
            except _PeerAbortedError:
                return "aborted"
            if outcome is not None:
                return outcome

    def _next_pdu(self) -> str | None:
        """Read and act on one PDU; the outcome once the association has ended."""
        self._pace.pdu_done()
        self._recv_into(self._header_view)
        pdu_type, length = pdu.PDU_HEADER.unpack(self._header)
        too_long = self._store.limits.pdu_too_long(pdu_type, length)
        if too_long:
            raise _PduError(pdu.REASON_INVALID_PARAMETER, too_long)
        if pdu_type == pdu.P_DATA_TF:
            self._p_data(length)
        elif pdu_type == pdu.A_RELEASE_RQ and not self._finding:
            self._skip(length)
            self._send(pdu.release_rp())
            return "released"
        elif pdu_type == pdu.A_ABORT:
            self._skip(length)
            if self._finding:
                raise _PeerAbortedError
            return "aborted"
        elif pdu.A_ASSOCIATE_RQ <= pdu_type <= pdu.A_ABORT:
            raise _PduError(pdu.REASON_UNEXPECTED_PDU, f"unexpected PDU type 0x{pdu_type:02X}")
        else:
            raise _PduError(pdu.REASON_UNRECOGNISED_PDU, f"unknown PDU type 0x{pdu_type:02X}")
        return None

    def _skip(self, length: int) -> None:
        if length > MAX_SMALL_PDU_BYTES:
            raise _PduError(pdu.REASON_INVALID_PARAMETER, f"a {length}-byte release or abort PDU")
        self._recv_bytes(length)

    def _p_data(self, length: int) -> None:
        """PS3.8 9.3.5: one P-DATA-TF, PDV by PDV, each read straight to where it belongs."""
        remaining = length
        while remaining:
            if remaining < pdu.PDV_HEADER.size:
                raise _PduError(pdu.REASON_INVALID_PARAMETER, "truncated PDV header")
            self._recv_into(self._header_view)
            item_length, context_id, flags = pdu.PDV_HEADER.unpack(self._header)
            if item_length < 2 or item_length + 4 > remaining:
                raise _PduError(pdu.REASON_INVALID_PARAMETER, f"PDV length {item_length}")
            remaining -= item_length + 4
            if context_id not in self._contexts:
                raise _PduError(
                    pdu.REASON_INVALID_PARAMETER,
                    f"PDV for presentation context {context_id}, which was not accepted",
                )
            size = item_length - 2
            if flags & pdu.PDV_COMMAND:
                self._command_fragment(context_id, size, last=bool(flags & pdu.PDV_LAST))
            else:
                self._data_fragment(context_id, size, last=bool(flags & pdu.PDV_LAST))

    def _command_fragment(self, context_id: int, size: int, *, last: bool) -> None:
        if self._pending is not None:
            raise _PduError(pdu.REASON_UNEXPECTED_PDU, "a command PDV where a data set was due")
        if self._command_context not in (None, context_id):
            raise _PduError(pdu.REASON_INVALID_PARAMETER, "command fragments on two contexts")
        if len(self._command) + size > MAX_COMMAND_BYTES:
            raise _PduError(pdu.REASON_INVALID_PARAMETER, "command set too long")
        self._command_context = context_id
        self._command += self._recv_bytes(size)
        if not last:
            return
        try:
            command = pdu.parse_command(self._command)
        except pdu.CommandError as exc:
            raise _PduError(pdu.REASON_INVALID_PARAMETER, str(exc)) from exc
        self._command.clear()
        self._command_context = None
        self._dispatch(context_id, command)

    def _dispatch(self, context_id: int, command: pdu.Command) -> None:
        abstract_syntax = self._contexts[context_id][0]
        verification = abstract_syntax == VERIFICATION_SOP_CLASS
        find = abstract_syntax in FIND_SOP_CLASSES
        field = command.command_field
        if field == pdu.C_CANCEL_RQ and not command.has_data_set:
            # PS3.7 9.3.2.3: for a C-FIND in progress; any other is ignored, as pynetdicom does.
            if self._finding:
                self._cancelled.add(command.responded_to)
        elif self._finding:
            raise _PduError(pdu.REASON_UNEXPECTED_PDU, "a request while a C-FIND is answered")
        elif field == pdu.C_ECHO_RQ and verification and not command.has_data_set:
            self._store.associations.note(id(self), "echo")
            self._reply(context_id, pdu.echo_response(command))
        elif (field == pdu.C_STORE_RQ and not verification and not find) or (
            field == pdu.C_FIND_RQ and find
        ):
            if not command.has_data_set:
                raise _PduError(pdu.REASON_NOT_SPECIFIED, "a request without its data set")
            self._pending = (context_id, command)
            self._used = 0
            self._oversize = False
        else:
            raise _PduError(
                pdu.REASON_NOT_SPECIFIED,
                f"DIMSE command 0x{command.command_field:04X} on {abstract_syntax} "
                "is not served here",
            )

    def _data_fragment(self, context_id: int, size: int, *, last: bool) -> None:
        if self._pending is None or self._pending[0] != context_id:
            raise _PduError(pdu.REASON_UNEXPECTED_PDU, "a data set PDV without its request")
        end = self._used + size
        if self._pending[1].command_field == pdu.C_FIND_RQ:
            if end > MAX_IDENTIFIER_BYTES:
                raise _PduError(pdu.REASON_INVALID_PARAMETER, "C-FIND identifier too long")
            if self._used + size > len(self._data):
                self._grow(max(end, 4096))
            self._recv_into(self._view[self._used : end])
            self._used = end
            if last:
                self._find()
            return
        if not self._oversize and end > self._store.limits.max_instance_bytes:
            # Drain the rest without keeping it, then answer 0xA700 (the sender learns
            # why, and the association goes on).
            self._oversize = True
            self._used = 0
            self._drop_buffer()
        if self._oversize:
            self._discard(size)
            if last:
                self._refuse_oversize()
            return
        while self._used < end:
            # Grow only as bytes arrive: never more than twice what was received (a PDV
            # may declare far more than its peer ever sends).
            if self._used == len(self._data):
                self._grow(min(end, max(INITIAL_BUFFER_BYTES, 2 * self._used)))
            chunk_end = min(end, len(self._data))
            self._recv_into(self._view[self._used : chunk_end])
            self._used = chunk_end
        if last:
            self._land()

    def _discard(self, size: int) -> None:
        scratch = memoryview(bytearray(min(size, DRAIN_BUFFER_BYTES)))
        while size:
            take = min(size, len(scratch))
            self._recv_into(scratch[:take])
            size -= take

    def _refuse_oversize(self) -> None:
        assert self._pending is not None
        context_id, command = self._pending
        self._pending = None
        self._oversize = False
        limit = self._store.limits.max_instance_bytes
        log.warning(
            "refused C-STORE from %s: data set over the %d-byte limit", self.calling_ae, limit
        )
        self._store.associations.record(id(self), stored=False)
        self._reply(
            context_id,
            pdu.store_response(
                command, StoreStatus.OUT_OF_RESOURCES, error_comment(too_large_comment(limit))
            ),
        )

    def _drop_buffer(self) -> None:
        self._data = bytearray(0)
        self._view = memoryview(self._data)

    def _land(self) -> None:
        assert self._pending is not None
        context_id, command = self._pending
        self._pending = None
        store = self._store
        request = StoreRequest(
            sop_class_uid=command.affected_sop_class_uid.decode("ascii", "replace"),
            sop_instance_uid=command.affected_sop_instance_uid.decode("ascii", "replace"),
            transfer_syntax=self._contexts[context_id][1],
            calling_ae=self.calling_ae,
            called_ae=self.called_ae,
            peer=self.peer,
        )
        dataset = self._view[: self._used]
        status, comment = receive_instance(
            store.landing, store.associations, id(self), request, dataset
        )
        del dataset
        if len(self._data) > KEEP_BUFFER_BYTES:
            self._drop_buffer()
        self._reply(context_id, pdu.store_response(command, status, error_comment(comment)))

    def _find(self) -> None:
        """Answer the C-FIND whose identifier has arrived (``receiver.fast_find``); a
        C-CANCEL-RQ is looked for between answers."""
        assert self._pending is not None
        context_id, command = self._pending
        self._pending = None
        identifier = bytes(self._view[: self._used])
        store = self._store
        assert store.archive is not None
        admission = self._proposal.admission
        event = FindEvent(
            command,
            identifier,
            UID(self._contexts[context_id][1]),
            self.calling_ae,
            self._cancel_requested,
        )
        sop_class = command.affected_sop_class_uid
        peer_max = self._proposal.peer_max_pdu

        def respond(status: int, identifier: bytes | None = None, comment: str = "") -> None:
            rsp = pdu.response(
                pdu.C_FIND_RSP,
                command.message_id,
                sop_class,
                status,
                has_data_set=identifier is not None,
                error_comment=comment,
            )
            pieces = list(pdu.command_pdus(context_id, rsp, peer_max))
            if identifier is not None:
                pieces += pdu.data_pdus(context_id, identifier, peer_max)
            self._send(b"".join(pieces))

        self._finding = True
        try:
            serve_find(
                event,
                respond,
                archive=store.archive,
                associations=store.associations,
                assoc_id=id(self),
                principal=None if admission is None else admission.principal,
                established=lambda: not self._closing and self._broken is None,
            )
        finally:
            self._finding = False
            self._cancelled.clear()
        broken, self._broken = self._broken, None
        if broken is not None:
            raise broken

    def _cancel_requested(self, message_id: int) -> bool:
        """Whether a C-CANCEL-RQ for `message_id` has come: reads, without waiting, the PDUs
        already received (a C-CANCEL, an A-ABORT: anything else aborts the association).

        Never raises (the handlers would take an error for theirs): what ends the reads is
        kept, the answers stop unsent, and :meth:`_find` raises it once the handler is done.
        """
        if self._broken is not None:
            return True
        try:
            while message_id not in self._cancelled and self._readable():
                self._next_pdu()
        except Exception as exc:
            self._broken = exc
            return True
        return message_id in self._cancelled

    def _readable(self) -> bool:
        sock = self._sock
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable)

    def _grow(self, capacity: int) -> None:
        """A data set buffer of `capacity` bytes, keeping what was received."""
        data = bytearray(capacity)
        data[: self._used] = self._view[: self._used]
        self._data = data
        self._view = memoryview(data)

    # ------------------------------------------------------------------ socket

    def _recv_into(self, view: memoryview) -> None:
        """Fill `view`, within the association's deadline, idle timeout and, in mid-PDU,
        minimum throughput (:class:`~receiver.limits.Pace`)."""
        pos, end = 0, len(view)
        pace = self._pace
        while pos < end:
            try:
                received = self._sock.recv_into(view[pos:] if pos else view)
            except TimeoutError:
                pace.wait()  # raises if a limit has passed, else read on
                continue
            if not received:
                raise ConnectionError("the peer closed the connection")
            pace.received(received)
            pos += received

    def _recv_bytes(self, size: int) -> bytes:
        data = bytearray(size)
        self._recv_into(memoryview(data))
        return bytes(data)

    def _reply(self, context_id: int, command: bytes) -> None:
        peer_max = self._proposal.peer_max_pdu
        self._send(b"".join(pdu.command_pdus(context_id, command, peer_max)))

    def _send(self, data: bytes) -> None:
        with self._send_lock:
            self._sock.sendall(data)

    def _send_quietly(self, data: bytes) -> None:
        with contextlib.suppress(OSError):
            self._send(data)


def _remember(memo: dict[bytes, _T], key: bytes, value: _T) -> None:
    """Keep `value` for `key`, at most NEGOTIATION_MEMO_SIZE entries (then start over)."""
    if len(memo) >= NEGOTIATION_MEMO_SIZE:
        memo.clear()
    memo[key] = value


def _closed_by_peer(sock: socket.socket) -> bool:
    """True if the peer closed `sock` before sending a byte (never for a TLS socket)."""
    if isinstance(sock, ssl.SSLSocket):
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except OSError:  # BlockingIOError (nothing yet), a reset: pynetdicom decides as before
        return False


def _set_receive_timeout(sock: socket.socket, seconds: float) -> None:
    whole = int(seconds)
    sock.setsockopt(
        socket.SOL_SOCKET,
        socket.SO_RCVTIMEO,
        _TIMEVAL.pack(whole, int((seconds - whole) * 1_000_000)),
    )
