"""The few PS3.8 PDUs and PS3.7 command sets the storage fast path reads and writes by hand.

Pure (stdlib only), shared by the receiver's fast paths and the outbound sender
(:mod:`vannah_pipelines.dimse.store_scu`). The association negotiation PDUs are pynetdicom's;
this module covers what repeats per message: PDU and PDV headers, the implicit VR little
endian command set of a request, and the C-STORE-RSP / C-ECHO-RSP command sets.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass

# PS3.8 9.3.1: PDU types.
A_ASSOCIATE_RQ = 0x01
A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
A_ABORT = 0x07

PDU_HEADER = struct.Struct(">BxL")  # type, reserved, length
PDV_HEADER = struct.Struct(">LBB")  # item length, presentation context ID, control header
PDV_COMMAND = 0x01  # PS3.8 E.2: control header bit 0, command (else data set)
PDV_LAST = 0x02  # bit 1, last fragment

# PS3.8 9.3.8: A-ABORT source and reason.
ABORT_SERVICE_USER = 0x00
ABORT_SERVICE_PROVIDER = 0x02
REASON_NOT_SPECIFIED = 0x00
REASON_UNRECOGNISED_PDU = 0x01
REASON_UNEXPECTED_PDU = 0x02
REASON_INVALID_PARAMETER = 0x06

# PS3.7 E.1: command fields and the "no data set" value of CommandDataSetType.
C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
C_ECHO_RQ = 0x0030
C_FIND_RQ = 0x0020
C_CANCEL_RQ = 0x0FFF
C_ECHO_RSP = 0x8030
C_GET_RSP = 0x8010
C_FIND_RSP = 0x8020
C_MOVE_RSP = 0x8021
NO_DATA_SET = 0x0101

_ELEMENT = struct.Struct("<HHL")  # implicit VR little endian: group, element, length
_US = struct.Struct("<H")
_UL = struct.Struct("<L")
_AFFECTED_SOP_CLASS_UID = 0x0002
_COMMAND_FIELD = 0x0100
_MESSAGE_ID = 0x0110
_MESSAGE_ID_BEING_RESPONDED_TO = 0x0120
_PRIORITY = 0x0700
_COMMAND_DATA_SET_TYPE = 0x0800
_STATUS = 0x0900
_ERROR_COMMENT = 0x0902
_AFFECTED_SOP_INSTANCE_UID = 0x1000
_MOVE_ORIGINATOR_AE = 0x1030
_MOVE_ORIGINATOR_MESSAGE_ID = 0x1031
_NUMBER_OF_SUBOPERATIONS = (0x1020, 0x1021, 0x1022, 0x1023)  # remaining/completed/failed/warning


class CommandError(ValueError):
    """A command set that cannot be parsed (truncated, not group 0000, missing fields)."""


@dataclass(frozen=True)
class Command:
    """The fields of a DIMSE request the fast path acts on (UIDs as sent, padding removed)."""

    command_field: int
    message_id: int
    has_data_set: bool
    affected_sop_class_uid: bytes = b""
    affected_sop_instance_uid: bytes = b""
    priority: int = 0
    responded_to: int = 0  # a C-CANCEL-RQ's MessageIDBeingRespondedTo


def parse_command(data: bytes | bytearray | memoryview) -> Command:
    """Parse an implicit VR little endian command set (PS3.7 6.3.1, E.1).

    Raises
    ------
    CommandError
        If an element runs past the end, an element is not in group 0000, or
        CommandField, MessageID or CommandDataSetType is missing.

    Examples
    --------
    >>> cmd = parse_command(encode_request(C_ECHO_RQ, 7, b"1.2.840.10008.1.1"))
    >>> cmd.command_field == C_ECHO_RQ, cmd.message_id, cmd.has_data_set
    (True, 7, False)
    """
    values = command_elements(data)
    try:
        command_field = _us(values[_COMMAND_FIELD])
        data_set_type = _us(values[_COMMAND_DATA_SET_TYPE])
        priority = _us(values[_PRIORITY]) if _PRIORITY in values else 0
        responded_to = 0
        if command_field == C_CANCEL_RQ:  # PS3.7 9.3.2.3: no MessageID of its own
            message_id = 0
            responded_to = _us(values[_MESSAGE_ID_BEING_RESPONDED_TO])
        else:
            message_id = _us(values[_MESSAGE_ID])
    except (KeyError, struct.error) as exc:
        raise CommandError(f"command set lacks a valid {exc}") from exc
    return Command(
        command_field=command_field,
        message_id=message_id,
        has_data_set=data_set_type != NO_DATA_SET,
        affected_sop_class_uid=_strip(values.get(_AFFECTED_SOP_CLASS_UID, b"")),
        affected_sop_instance_uid=_strip(values.get(_AFFECTED_SOP_INSTANCE_UID, b"")),
        priority=priority,
        responded_to=responded_to,
    )


def command_elements(data: bytes | bytearray | memoryview) -> dict[int, bytes]:
    """The values of an implicit VR little endian command set, by element number.

    Raises
    ------
    CommandError
        If an element runs past the end or is not in group 0000.
    """
    view = memoryview(data)
    values: dict[int, bytes] = {}
    pos, end = 0, len(view)
    while pos < end:
        if end - pos < _ELEMENT.size:
            raise CommandError("truncated command element header")
        group, element, length = _ELEMENT.unpack_from(view, pos)
        pos += _ELEMENT.size
        if group != 0x0000:
            raise CommandError(f"element ({group:04X},{element:04X}) in a command set")
        if length > end - pos:
            raise CommandError(f"command element (0000,{element:04X}) is truncated")
        values[element] = bytes(view[pos : pos + length])
        pos += length
    return values


def _us(value: bytes) -> int:
    return int(_US.unpack(value)[0])


def _strip(uid: bytes) -> bytes:
    # PS3.5 9.1: UIDs are padded with a trailing NUL; tolerate spaces as pydicom does.
    return uid.rstrip(b"\x00 ")


def _element(element: int, value: bytes) -> bytes:
    return _ELEMENT.pack(0x0000, element, len(value)) + value


def _ui(element: int, uid: bytes) -> bytes:
    return _element(element, uid + b"\x00" if len(uid) % 2 else uid)


def _command_set(elements: list[bytes]) -> bytes:
    body = b"".join(elements)
    return _element(0x0000, _UL.pack(len(body))) + body


def response(
    command_field: int,
    message_id: int,
    sop_class_uid: bytes,
    status: int,
    *,
    has_data_set: bool = False,
    error_comment: str = "",
    sop_instance_uid: bytes | None = None,
    suboperations: tuple[int, int, int, int] | None = None,
) -> bytes:
    """Encode a DIMSE response command set (PS3.7 9.3): group length, Affected SOP Class
    UID, CommandField, MessageIDBeingRespondedTo, CommandDataSetType, Status, then if given
    Error Comment, Affected SOP Instance UID and the Number of Remaining, Completed, Failed
    and Warning Sub-operations: the elements, order and encoding pynetdicom uses."""
    elements = [
        _ui(_AFFECTED_SOP_CLASS_UID, sop_class_uid),
        _element(_COMMAND_FIELD, _US.pack(command_field)),
        _element(_MESSAGE_ID_BEING_RESPONDED_TO, _US.pack(message_id)),
        _element(_COMMAND_DATA_SET_TYPE, _US.pack(0x0000 if has_data_set else NO_DATA_SET)),
        _element(_STATUS, _US.pack(status)),
    ]
    if error_comment:
        comment = error_comment.encode("ascii", "replace")
        elements.append(_element(_ERROR_COMMENT, comment + b" " if len(comment) % 2 else comment))
    if sop_instance_uid is not None:
        elements.append(_ui(_AFFECTED_SOP_INSTANCE_UID, sop_instance_uid))
    if suboperations is not None:
        elements += [
            _element(tag, _US.pack(count))
            for tag, count in zip(_NUMBER_OF_SUBOPERATIONS, suboperations, strict=True)
        ]
    return _command_set(elements)


def store_response(command: Command, status: int, error_comment: str = "") -> bytes:
    """Encode the C-STORE-RSP command set answering `command` (PS3.7 9.3.1.2)."""
    return response(
        C_STORE_RSP,
        command.message_id,
        command.affected_sop_class_uid,
        status,
        error_comment=error_comment,
        sop_instance_uid=command.affected_sop_instance_uid,
    )


def echo_response(command: Command, status: int = 0x0000) -> bytes:
    """Encode the C-ECHO-RSP command set answering `command` (PS3.7 9.3.5.2)."""
    return response(C_ECHO_RSP, command.message_id, command.affected_sop_class_uid, status)


def command_pdus(context_id: int, command: bytes, max_pdu_length: int) -> Iterator[bytes]:
    """P-DATA-TF PDUs carrying `command` on `context_id`, none longer than the peer's
    maximum PDU length (0: no limit), one PDV each (PS3.8 9.3.5, E.2)."""
    room = len(command) if max_pdu_length == 0 else max(1, max_pdu_length - PDV_HEADER.size)
    pos = 0
    while True:
        fragment = command[pos : pos + room]
        pos += len(fragment)
        flags = PDV_COMMAND | (PDV_LAST if pos >= len(command) else 0)
        pdv = PDV_HEADER.pack(len(fragment) + 2, context_id, flags) + fragment
        yield PDU_HEADER.pack(P_DATA_TF, len(pdv)) + pdv
        if pos >= len(command):
            return


def data_pdus(context_id: int, data: bytes, max_pdu_length: int) -> list[bytes]:
    """P-DATA-TF PDUs carrying the data set `data` on `context_id`, none longer than the
    peer's maximum PDU length (0: no limit), one PDV each (PS3.8 9.3.5, E.2)."""
    room = len(data) if max_pdu_length == 0 else max(1, max_pdu_length - PDV_HEADER.size)
    pieces: list[bytes] = []
    pos = 0
    while True:
        fragment = data[pos : pos + room]
        pos += len(fragment)
        flags = PDV_LAST if pos >= len(data) else 0
        pdv = PDV_HEADER.pack(len(fragment) + 2, context_id, flags) + fragment
        pieces.append(PDU_HEADER.pack(P_DATA_TF, len(pdv)) + pdv)
        if pos >= len(data):
            return pieces


def release_rp() -> bytes:
    """A-RELEASE-RP (PS3.8 9.3.7)."""
    return PDU_HEADER.pack(A_RELEASE_RP, 4) + b"\x00" * 4


def abort(source: int = ABORT_SERVICE_USER, reason: int = REASON_NOT_SPECIFIED) -> bytes:
    """A-ABORT (PS3.8 9.3.8); the reason is only meaningful from the service provider."""
    return PDU_HEADER.pack(A_ABORT, 4) + bytes((0, 0, source, reason))


def associate_rj(result: int, source: int, reason: int) -> bytes:
    """A-ASSOCIATE-RJ (PS3.8 9.3.4)."""
    return PDU_HEADER.pack(A_ASSOCIATE_RJ, 4) + bytes((0, result, source, reason))


# How long an acceptor waits, after its A-ASSOCIATE-RJ, for the requestor to close the
# connection (PS3.8 ARTIM timer, state Sta13).
ARTIM_SECONDS = 5.0


def close(sock: socket.socket) -> None:
    """Close `sock` now, both directions (errors ignored: the peer may be gone)."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def send_final(sock: socket.socket, data: bytes, artim: float = ARTIM_SECONDS) -> None:
    """Send a last PDU (A-ASSOCIATE-RJ), then close once the peer has (PS3.8 Sta13).

    Closing straight after the PDU races the requestor, which may see the connection
    end before it reads the rejection and report an abort instead; so wait for its close,
    up to `artim` seconds (a peer that keeps the connection open is cut off then).
    """
    deadline = time.monotonic() + artim
    try:
        sock.settimeout(artim)
        sock.sendall(data)
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            if not sock.recv(4096):
                break
    except OSError:
        pass
    close(sock)


def encode_request(
    command_field: int,
    message_id: int,
    sop_class_uid: bytes,
    sop_instance_uid: bytes = b"",
    *,
    has_data_set: bool = False,
    move_originator: tuple[bytes, int] | None = None,
) -> bytes:
    """Encode a C-STORE-RQ or C-ECHO-RQ command set (priority medium), as an SCU sends it;
    `move_originator` (AE title, message ID) marks a C-MOVE sub-operation (PS3.7 9.3.1.1)."""
    elements = [
        _ui(_AFFECTED_SOP_CLASS_UID, sop_class_uid),
        _element(_COMMAND_FIELD, _US.pack(command_field)),
        _element(_MESSAGE_ID, _US.pack(message_id)),
    ]
    if command_field == C_STORE_RQ:
        elements.append(_element(_PRIORITY, _US.pack(0)))
    elements.append(_element(_COMMAND_DATA_SET_TYPE, _US.pack(0 if has_data_set else NO_DATA_SET)))
    if sop_instance_uid:
        elements.append(_ui(_AFFECTED_SOP_INSTANCE_UID, sop_instance_uid))
    if move_originator is not None:
        aet, originator_id = move_originator
        elements.append(_element(_MOVE_ORIGINATOR_AE, aet.ljust(16)[:16]))
        elements.append(_element(_MOVE_ORIGINATOR_MESSAGE_ID, _US.pack(originator_id)))
    return _command_set(elements)


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    """Exactly `size` bytes from `sock` (ConnectionError if the peer closes first)."""
    data = bytearray(size)
    view = memoryview(data)
    pos = 0
    while pos < size:
        received = sock.recv_into(view[pos:])
        if not received:
            raise ConnectionError("the peer closed the connection")
        pos += received
    return bytes(data)
