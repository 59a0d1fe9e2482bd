"""A storage SCU of our own, for C-MOVE sub-operations (PS3.4 C.4.2.3, PS3.8) and routing.

pynetdicom's SCU hands every P-DATA PDU of a data set through its DUL thread, queue and
state machine, and polls in 1 ms steps: with a peer's 16 kB maximum PDU a 0.5 MB instance is
32 such hand-offs and C-MOVE ran at a third of Orthanc's rate. Here one thread owns the
socket: the association is negotiated with pynetdicom's PDU classes, then each stored file
goes out as it is, its data set read from disk straight into P-DATA-TF PDUs sized to the
peer's maximum, and the C-STORE-RSP is read back with blocking, timed-out reads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO

from pydicom.uid import UID
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import build_context

from vannah_pipelines.dicom.inspection import read_file_meta
from vannah_pipelines.dimse import pdu

log = logging.getLogger(__name__)

APPLICATION_CONTEXT_NAME = "1.2.840.10008.3.1.1.1"
OUR_MAX_PDU = 65_536  # only C-STORE responses come back
META_PROBE = 65_536  # bytes read to find the end of a file's meta information
MAX_RESPONSE_PDU = 1 << 20  # a response PDU larger than this is a broken peer


class StoreAssociationError(Exception):
    """The association could not be made, or broke (peer abort, timeout, bad PDU)."""


@dataclass(frozen=True)
class StoreResult:
    """A C-STORE-RSP: the status, and the error comment if the peer gave one."""

    status: int
    comment: str = ""


def _associate_rq(
    calling_ae: str, called_ae: str, proposals: Sequence[tuple[str, Sequence[str]]]
) -> bytes:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = UID(APPLICATION_CONTEXT_NAME)
    primitive.calling_ae_title = calling_ae
    primitive.called_ae_title = called_ae
    contexts = []
    for index, (sop_class, syntaxes) in enumerate(proposals):
        context = build_context(sop_class, list(syntaxes))
        context.context_id = 2 * index + 1  # PS3.8 9.3.2.2: odd numbers 1-255
        contexts.append(context)
    primitive.presentation_context_definition_list = contexts
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = OUR_MAX_PDU
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = PYNETDICOM_IMPLEMENTATION_VERSION
    primitive.user_information = [max_length, implementation, version]
    request = A_ASSOCIATE_RQ()
    request.from_primitive(primitive)
    return bytes(request.encode())


class StoreSCU:
    """One storage association to a peer, used from one thread."""

    def __init__(
        self, sock: socket.socket, max_pdu: int, contexts: dict[tuple[str, str], int]
    ) -> None:
        self._sock = sock
        self._max_pdu = max_pdu  # the peer's maximum P-DATA-TF length (0: no limit)
        self._contexts = contexts  # (SOP class, transfer syntax) -> accepted context ID
        self._header = bytearray(pdu.PDU_HEADER.size)
        self.is_established = True

    @classmethod
    def request(
        cls,
        host: str,
        port: int,
        *,
        calling_ae: str,
        called_ae: str,
        proposals: Sequence[tuple[str, Sequence[str]]],
        timeout: float,
        tls: ssl.SSLContext | None = None,
    ) -> StoreSCU:
        """Connect (over TLS with `tls`: our certificate presented, the peer's checked by
        the context) and negotiate one presentation context per (SOP class, transfer
        syntaxes) proposal.

        Raises
        ------
        StoreAssociationError
            If the peer cannot be reached, rejects the association, or answers garbage.
        """
        if not 0 < len(proposals) <= 128:
            raise ValueError("between 1 and 128 presentation contexts")
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise StoreAssociationError(f"cannot connect: {exc}") from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls is not None:
                try:
                    sock = tls.wrap_socket(sock)  # the handshake, within `timeout`
                except (OSError, ValueError) as exc:
                    raise StoreAssociationError(f"TLS handshake failed: {exc}") from exc
            scu = cls(sock, 0, {})
            sock.sendall(_associate_rq(calling_ae, called_ae, proposals))
            kind, body = scu._read_pdu()
            if kind == pdu.A_ASSOCIATE_RJ:
                raise StoreAssociationError(f"association rejected ({bytes(body[:4]).hex()})")
            if kind != pdu.A_ASSOCIATE_AC:
                raise StoreAssociationError(f"unexpected PDU 0x{kind:02X} to A-ASSOCIATE-RQ")
            accepted = A_ASSOCIATE_AC()
            accepted.decode(pdu.PDU_HEADER.pack(kind, len(body)) + body)
            primitive = accepted.to_primitive()
        except BaseException:
            sock.close()
            raise
        for result in primitive.presentation_context_definition_results_list:
            index = (int(result.context_id or 0) - 1) // 2
            if result.result == 0 and 0 <= index < len(proposals) and result.transfer_syntax:
                key = (proposals[index][0], str(result.transfer_syntax[0]))
                scu._contexts.setdefault(key, int(result.context_id or 0))
        scu._max_pdu = int(primitive.maximum_length_received or 0)
        return scu

    def accepted_syntaxes(self, sop_class: str) -> list[str]:
        """The transfer syntaxes accepted for `sop_class`."""
        return [ts for (sop, ts) in self._contexts if sop == sop_class]

    def store(
        self,
        data: BinaryIO,
        *,
        sop_class: str,
        sop_instance: str,
        transfer_syntax: str,
        message_id: int,
        originator_ae: str | None = None,
        originator_message_id: int = 0,
    ) -> StoreResult:
        """Send the data set read from `data` (positioned at its start) with C-STORE-RQ;
        with `originator_ae`, as a C-MOVE sub-operation (Move Originator AE Title and
        Message ID, PS3.7 9.1.1.1).

        Raises
        ------
        KeyError
            If no context was accepted for (`sop_class`, `transfer_syntax`).
        StoreAssociationError
            If the association breaks; it is then aborted and every later call raises.
        """
        context_id = self._contexts[(sop_class, transfer_syntax)]
        if not self.is_established:
            raise StoreAssociationError("the association has ended")
        command = pdu.encode_request(
            pdu.C_STORE_RQ,
            message_id,
            sop_class.encode("ascii"),
            sop_instance.encode("ascii"),
            has_data_set=True,
            move_originator=None
            if originator_ae is None
            else (originator_ae.encode("ascii"), originator_message_id),
        )
        try:
            send_message(self._sock, self._max_pdu, context_id, command, data)
            return self._read_store_response(message_id)
        except (OSError, struct.error) as exc:
            self.abort()
            raise StoreAssociationError(f"association broken: {exc}") from exc
        except StoreAssociationError:
            self.abort()
            raise

    def _read_store_response(self, message_id: int) -> StoreResult:
        command = bytearray()
        while True:
            kind, body = self._read_pdu()
            if kind == pdu.A_ABORT:
                self.is_established = False
                raise StoreAssociationError("the peer aborted the association")
            if kind != pdu.P_DATA_TF:
                raise StoreAssociationError(f"unexpected PDU 0x{kind:02X} awaiting C-STORE-RSP")
            pos = 0
            while pos + pdu.PDV_HEADER.size <= len(body):
                length, _cx, flags = pdu.PDV_HEADER.unpack_from(body, pos)
                fragment = body[pos + pdu.PDV_HEADER.size : pos + 4 + length]
                pos += 4 + length
                if not flags & pdu.PDV_COMMAND:
                    continue  # a C-STORE-RSP has no data set; ignore stray fragments
                command += fragment
                if flags & pdu.PDV_LAST:
                    try:
                        fields = pdu.command_elements(command)
                    except pdu.CommandError as exc:
                        raise StoreAssociationError(f"bad C-STORE-RSP: {exc}") from exc
                    responded = fields.get(0x0120, b"")
                    if len(responded) == 2 and struct.unpack("<H", responded)[0] != message_id:
                        command.clear()
                        continue  # an answer to something else (not expected)
                    status = fields.get(0x0900, b"")
                    if len(status) != 2:
                        raise StoreAssociationError("C-STORE-RSP without a status")
                    comment = fields.get(0x0902, b"").decode("ascii", "replace").strip()
                    return StoreResult(struct.unpack("<H", status)[0], comment)

    def _read_pdu(self) -> tuple[int, bytearray]:
        _recv_exactly(self._sock, memoryview(self._header))
        kind, length = pdu.PDU_HEADER.unpack(self._header)
        if length > MAX_RESPONSE_PDU:
            raise StoreAssociationError(f"PDU of {length} bytes from the peer")
        body = bytearray(length)
        _recv_exactly(self._sock, memoryview(body))
        return kind, body

    def release(self) -> None:
        """A-RELEASE-RQ, wait for the reply (bounded by the socket timeout), close."""
        if not self.is_established:
            return
        self.is_established = False
        try:
            self._sock.sendall(pdu.PDU_HEADER.pack(pdu.A_RELEASE_RQ, 4) + bytes(4))
            kind, _body = self._read_pdu()
            if kind != pdu.A_RELEASE_RP:
                log.warning("peer answered A-RELEASE-RQ with PDU 0x%02X", kind)
        except (OSError, StoreAssociationError) as exc:
            log.warning("release of a storage association failed: %s", exc)
        finally:
            self._sock.close()

    def abort(self) -> None:
        """A-ABORT and close (safe to call more than once)."""
        was_open = self.is_established
        self.is_established = False
        with contextlib.suppress(OSError):
            if was_open:
                self._sock.sendall(pdu.abort())
        self._sock.close()


def send_message(
    sock: socket.socket,
    max_pdu: int,
    context_id: int,
    command: bytes,
    data: BinaryIO | None = None,
) -> None:
    """Write a DIMSE message as P-DATA-TF PDUs: the command set, then the data set read
    from `data` (from its current position to the end), each PDU within the peer's
    maximum length (`max_pdu`, 0: no limit). Blocking; the caller owns the socket.

    Raises
    ------
    OSError
        If the socket fails or times out.
    """
    for piece in pdu.command_pdus(context_id, command, max_pdu):
        sock.sendall(piece)
    if data is None:
        return
    # Any seekable stream: a file, or an object spooled from a storage tier (asking a
    # spooled one for its fileno would move it from memory to disk).
    start = data.tell()
    size = data.seek(0, os.SEEK_END) - start
    data.seek(start)
    room = (1 << 20) if max_pdu == 0 else max(1, max_pdu - pdu.PDV_HEADER.size)
    view = memoryview(bytearray(min(room, max(size, 1))))
    sent = 0
    while True:
        count = data.readinto(view) or 0  # type: ignore[attr-defined]
        sent += count
        last = sent >= size or count == 0
        header = pdu.PDU_HEADER.pack(pdu.P_DATA_TF, count + pdu.PDV_HEADER.size)
        pdv = pdu.PDV_HEADER.pack(count + 2, context_id, pdu.PDV_LAST if last else 0)
        _send_parts(sock, [header, pdv, view[:count]])
        if last:
            return


def _send_parts(sock: socket.socket, parts: list[bytes | memoryview]) -> None:
    total = sum(len(p) for p in parts)
    try:
        sent = sock.sendmsg(parts)
    except NotImplementedError:
        # A TLS socket has no sendmsg: the small headers in one record, the data next.
        sock.sendall(b"".join(bytes(p) for p in parts[:-1]))
        sock.sendall(parts[-1])
        return
    if sent < total:
        sock.sendall(b"".join(bytes(p) for p in parts)[sent:])


def _recv_exactly(sock: socket.socket, view: memoryview) -> None:
    pos = 0
    while pos < len(view):
        count = sock.recv_into(view[pos:])
        if count == 0:
            raise StoreAssociationError("the peer closed the connection")
        pos += count


def data_set_offset(fp: BinaryIO) -> int:
    """Where the data set of the Part-10 file `fp` starts (after its meta information).

    Raises
    ------
    InvalidDicomError
        If the file has no Part-10 header.
    """
    fp.seek(0)
    head = fp.read(META_PROBE)
    offset = read_file_meta(head).dataset_offset
    fp.seek(offset)
    return offset
