"""The outbound API: C-ECHO a peer, and send instances to it with C-STORE over one
association, each with its own result (what routing calls; C-MOVE shares the pieces).

Instances go out in their stored transfer syntax, untouched, when the peer accepts it;
else decompressed (or re-encoded) into an uncompressed syntax it accepts
(:mod:`.negotiation`). A failure of one instance (unreadable, not acceptable, refused by
the peer) is that instance's result, never an exception.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import Any, BinaryIO

from pynetdicom import AE, evt
from pynetdicom.pdu_primitives import A_ABORT, A_ASSOCIATE, A_P_ABORT
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from vannah_pipelines.dimse.negotiation import (
    DEFAULT_MAX_DECODED_BYTES,
    MAX_CONTEXTS,
    NotSendableError,
    prepare,
    proposals,
)
from vannah_pipelines.dimse.peers import DicomPeer
from vannah_pipelines.dimse.store_scu import StoreAssociationError, StoreResult, StoreSCU
from vannah_pipelines.errors import VannahError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0  # seconds: connect, each PDU awaited


@dataclass(frozen=True)
class EchoResult:
    """A C-ECHO's outcome: `ok` when the peer answered Success; its status (None when no
    C-ECHO-RSP came), the time from connecting to the response (or to the failure), and
    why it failed."""

    ok: bool
    status: int | None
    latency_ms: float
    reason: str = ""


def is_success(status: int) -> bool:
    """A C-STORE status that counts as stored: success or a warning (PS3.4 B.2.3).

    >>> is_success(0x0000), is_success(0xB007), is_success(0xA700)
    (True, True, False)
    """
    return status == 0x0000 or status & 0xF000 == 0xB000


def echo(peer: DicomPeer, calling_aet: str, timeout: float = 10.0) -> EchoResult:
    """Verify `peer` with C-ECHO (PS3.4 A.4) on an association of its own.

    Parameters
    ----------
    peer
        Who to call.
    calling_aet
        Our AE title.
    timeout
        Seconds for the connection, the association answer and the C-ECHO response each.

    Returns
    -------
    EchoResult
        Never raises for a peer that is down, rejects or does not answer: `reason` says.
    """
    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(Verification)
    ae.connection_timeout = timeout
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    received: list[Any] = []
    handlers: list[Any] = [(evt.EVT_ACSE_RECV, lambda event: received.append(event.primitive))]
    start = time.monotonic()

    def elapsed() -> float:
        return (time.monotonic() - start) * 1000

    assoc = ae.associate(
        peer.host,
        peer.port,
        ae_title=peer.aet,
        evt_handlers=handlers,
        tls_args=None if peer.tls is None else (peer.tls, peer.host),  # SNI only
    )
    if not assoc.is_established:
        return EchoResult(False, None, elapsed(), _no_association(peer, received, timeout))
    try:
        response = assoc.send_c_echo()
        latency = elapsed()
    finally:
        if assoc.is_established:
            assoc.release()
    if "Status" not in response:
        return EchoResult(False, None, latency, f"no C-ECHO response within {timeout:g} s")
    status = int(response.Status)
    if status != 0x0000:
        return EchoResult(False, status, latency, f"C-ECHO status 0x{status:04X}")
    return EchoResult(True, status, latency)


def _no_association(peer: DicomPeer, received: list[Any], timeout: float) -> str:
    """Why the association to `peer` was not made, from what the peer sent."""
    for primitive in received:
        if isinstance(primitive, A_ASSOCIATE) and primitive.result not in (None, 0):
            return (
                f"association rejected ({primitive.result_str}, {primitive.source_str}: "
                f"{primitive.reason_str})"
            )
        if isinstance(primitive, A_ABORT | A_P_ABORT):
            return "the peer aborted the association"
    if received:
        return "association not established"
    try:  # pynetdicom only logs why the connection failed: ask the socket once more
        with socket.create_connection((peer.host, peer.port), timeout=timeout):
            pass
    except OSError as exc:
        return f"cannot connect to {peer.host}:{peer.port}: {exc}"
    return f"no answer to the association request within {timeout:g} s"


@dataclass(frozen=True)
class OutboundInstance:
    """One instance to send: its identity, stored transfer syntax, and its Part-10 bytes,
    or a function opening them as a seekable stream (from a storage tier; it may raise
    OSError or a VannahError)."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    data: bytes | Callable[[], BinaryIO]

    def open(self) -> BinaryIO:
        return BytesIO(self.data) if isinstance(self.data, bytes) else self.data()


@dataclass(frozen=True)
class SendResult:
    """One instance's outcome: the peer's C-STORE status (None when it was not sent), the
    reason it was not sent or the peer's Error Comment, the transfer syntax it went in
    ("" when not sent), and, for one not sent, whether sending it again cannot help
    (`permanent`: not DICOM, or in no syntax the peer takes) rather than may (the peer
    down, the association broken, the stored copy unreadable for now)."""

    sop_instance_uid: str
    status: int | None
    reason: str = ""
    transfer_syntax_uid: str = ""
    permanent: bool = False

    @property
    def ok(self) -> bool:
        return self.status is not None and is_success(self.status)


def open_association(
    peer: DicomPeer,
    calling_aet: str,
    instances: Sequence[tuple[str, str]],
    timeout: float = DEFAULT_TIMEOUT,
) -> StoreSCU:
    """A storage association to `peer` proposing the contexts :func:`.proposals` gives for
    (SOP class, stored transfer syntax) pairs, the first :data:`.MAX_CONTEXTS` of them.

    Raises
    ------
    StoreAssociationError
        If the peer cannot be reached or rejects the association.
    """
    offered = proposals(instances)
    if len(offered) > MAX_CONTEXTS:
        log.warning(
            "%s: %d presentation contexts needed; proposing the first %d",
            peer,
            len(offered),
            MAX_CONTEXTS,
        )
    return StoreSCU.request(
        peer.host,
        peer.port,
        calling_ae=calling_aet,
        called_ae=peer.aet,
        proposals=offered[:MAX_CONTEXTS],
        timeout=timeout,
        tls=peer.tls,
    )


def store_instance(
    scu: StoreSCU,
    fp: BinaryIO,
    *,
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax_uid: str,
    message_id: int,
    move_originator: tuple[str, int] | None = None,
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
) -> tuple[str, StoreResult]:
    """C-STORE the Part-10 stream `fp` on `scu`, as stored or converted (:func:`.prepare`);
    with `move_originator` (AE title, message ID) as a C-MOVE sub-operation.

    Returns
    -------
    tuple
        The transfer syntax sent in, and the peer's response.

    Raises
    ------
    NotSendableError
        If the peer accepted no syntax it can go in, or decompression failed.
    InvalidDicomError
        If `fp` is not a Part-10 file.
    StoreAssociationError, OSError
        If the association breaks (it is then aborted).
    """
    syntax, data = prepare(
        fp,
        transfer_syntax_uid,
        scu.accepted_syntaxes(sop_class_uid),
        max_decoded_bytes=max_decoded_bytes,
    )
    originator_ae, originator_id = move_originator or (None, 0)
    result = scu.store(
        data,
        sop_class=sop_class_uid,
        sop_instance=sop_instance_uid,
        transfer_syntax=syntax,
        message_id=message_id,
        originator_ae=originator_ae,
        originator_message_id=originator_id,
    )
    return syntax, result


def send_instances(
    peer: DicomPeer,
    instances: Sequence[OutboundInstance],
    *,
    calling_aet: str,
    timeout: float = DEFAULT_TIMEOUT,
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
) -> list[SendResult]:
    """C-STORE `instances` to `peer` over one association, in order.

    Returns
    -------
    list of SendResult
        One per instance, in order. When the association cannot be made or breaks, the
        instances not sent carry that reason; nothing is retried.
    """
    if not instances:
        return []
    try:
        scu = open_association(
            peer,
            calling_aet,
            [(i.sop_class_uid, i.transfer_syntax_uid) for i in instances],
            timeout,
        )
    except StoreAssociationError as exc:
        log.warning("cannot associate with %s: %s", peer, exc)
        return [SendResult(i.sop_instance_uid, None, str(exc)) for i in instances]
    results: list[SendResult] = []
    broken = ""
    try:
        for index, instance in enumerate(instances):
            uid = instance.sop_instance_uid
            if broken:
                results.append(SendResult(uid, None, broken))
                continue
            try:
                results.append(_send_one(scu, instance, index % 65535 + 1, max_decoded_bytes))
            except (StoreAssociationError, OSError) as exc:
                broken = f"association broken: {exc}"
                log.warning("%s: %s", peer, broken)
                results.append(SendResult(uid, None, broken))
    finally:
        scu.release()
    return results


def _send_one(
    scu: StoreSCU, instance: OutboundInstance, message_id: int, max_decoded_bytes: int
) -> SendResult:
    """One instance's result; raises only when the association breaks."""
    uid = instance.sop_instance_uid
    try:
        stream = instance.open()
    except (OSError, VannahError) as exc:
        log.warning("%s not sent: cannot read it: %s", uid, exc)
        return SendResult(uid, None, f"cannot read the stored instance: {exc}")
    with stream:
        try:
            syntax, response = store_instance(
                scu,
                stream,
                sop_class_uid=instance.sop_class_uid,
                sop_instance_uid=uid,
                transfer_syntax_uid=instance.transfer_syntax_uid,
                message_id=message_id,
                max_decoded_bytes=max_decoded_bytes,
            )
        except NotSendableError as exc:
            detail = f"{exc}: {exc.__cause__}" if exc.__cause__ else str(exc)
            log.warning("%s not sent: %s", uid, detail)
            return SendResult(uid, None, detail, permanent=True)
        except VannahError as exc:  # InvalidDicomError: no Part-10 header
            log.warning("%s not sent: %s", uid, exc)
            return SendResult(uid, None, f"not a DICOM Part-10 instance: {exc}", permanent=True)
        except OSError as exc:
            if not scu.is_established:
                raise
            log.warning("%s not sent: cannot read it: %s", uid, exc)
            return SendResult(uid, None, f"cannot read the stored instance: {exc}")
    if not is_success(response.status):
        log.info("%s: C-STORE status 0x%04X %s", uid, response.status, response.comment)
    return SendResult(uid, response.status, response.comment, syntax)
