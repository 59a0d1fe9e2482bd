"""A minimal raw DIMSE C-STORE SCU (PS3.8 PDUs by hand) that sends data set bytes as given.

pynetdicom's SCU decodes and re-encodes what it sends, so it cannot send truncated or
garbage data sets; this sender can, which is what hostile-input tests need.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from dataclasses import dataclass

_APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
_IMPLEMENTATION_UID = b"1.2.826.0.1.3680043.9.7433.1.1"
_CONTEXT_ID = 1


@dataclass(frozen=True)
class StoreResult:
    accepted: bool  # presentation context accepted
    status: int | None  # C-STORE-RSP Status, None if not sent


def _pad_ae(title: str) -> bytes:
    return title.encode("ascii").ljust(16, b" ")


def _item(item_type: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(payload)) + payload


def _even(uid: str) -> bytes:
    raw = uid.encode("ascii", "replace")
    return raw + b"\x00" if len(raw) % 2 else raw


def _element(group: int, elem: int, value: bytes) -> bytes:
    # Command sets are always implicit VR little endian (PS3.7 6.3.1).
    return struct.pack("<HHL", group, elem, len(value)) + value


def _command(sop_class: str, sop_instance: str, message_id: int) -> bytes:
    body = b"".join(
        [
            _element(0x0000, 0x0002, _even(sop_class)),
            _element(0x0000, 0x0100, struct.pack("<H", 0x0001)),  # C-STORE-RQ
            _element(0x0000, 0x0110, struct.pack("<H", message_id)),
            _element(0x0000, 0x0700, struct.pack("<H", 0)),  # priority medium
            _element(0x0000, 0x0800, struct.pack("<H", 0x0000)),  # a data set follows
            _element(0x0000, 0x1000, _even(sop_instance)),
        ]
    )
    return _element(0x0000, 0x0000, struct.pack("<L", len(body))) + body


def associate_rq(
    contexts: list[tuple[int, str, list[str]]],
    *,
    calling_ae: str = "RAWSCU",
    called_ae: str = "VANNAHCLOUD",
    max_pdu: int = 0,
    user_items: bytes = b"",
) -> bytes:
    """An A-ASSOCIATE-RQ PDU proposing `contexts` as (context ID, abstract syntax, transfer
    syntaxes); `user_items` are extra user information sub-items (role selection, ...)."""
    items = b""
    for context_id, abstract_syntax, transfer_syntaxes in contexts:
        payload = struct.pack(">BBBB", context_id, 0, 0, 0) + _item(
            0x30, abstract_syntax.encode("ascii")
        )
        payload += b"".join(_item(0x40, ts.encode("ascii")) for ts in transfer_syntaxes)
        items += _item(0x20, payload)
    user_info = _item(0x51, struct.pack(">L", max_pdu)) + _item(0x52, _IMPLEMENTATION_UID)
    body = (
        struct.pack(">HH", 1, 0)
        + _pad_ae(called_ae)
        + _pad_ae(calling_ae)
        + b"\x00" * 32
        + _item(0x10, _APPLICATION_CONTEXT)
        + items
        + _item(0x50, user_info + user_items)
    )
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


def role_selection_item(sop_class: str, scu: bool, scp: bool) -> bytes:
    """An SCP/SCU Role Selection sub-item (PS3.7 D.3.3.4) for `associate_rq(user_items=...)`."""
    uid = sop_class.encode("ascii")
    return _item(0x54, struct.pack(">H", len(uid)) + uid + bytes((int(scu), int(scp))))


def pdata(pdvs: list[tuple[int, int, bytes]]) -> bytes:
    """One P-DATA-TF PDU holding `pdvs` as (context ID, control header, fragment)."""
    body = b"".join(struct.pack(">LBB", len(d) + 2, cx, flags) + d for cx, flags, d in pdvs)
    return struct.pack(">BBL", 0x04, 0, len(body)) + body


def store_command(sop_class: str, sop_instance: str, message_id: int = 1) -> bytes:
    """A C-STORE-RQ command set (implicit VR little endian), a data set to follow."""
    return _command(sop_class, sop_instance, message_id)


class RawAssociation:
    """A hand-driven association: send any bytes, read PDUs back (hostile-input tests)."""

    def __init__(self, host: str, port: int, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def associate(self, request: bytes) -> tuple[int, bytes]:
        """Send an A-ASSOCIATE-RQ PDU; return the answer's (PDU type, whole PDU bytes)."""
        self.sock.sendall(request)
        pdu_type, body = _recv_pdu(self.sock)
        return pdu_type, struct.pack(">BBL", pdu_type, 0, len(body)) + body

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_pdu(self) -> tuple[int, bytes]:
        return _recv_pdu(self.sock)

    def command_status(self) -> int | None:
        """Read P-DATA-TF PDUs up to the end of one command set; return its Status."""
        answered, status = _read_command_status(self.sock)
        if not answered:
            raise ConnectionError("another PDU instead of a response")
        return status

    def release(self) -> int:
        """Send A-RELEASE-RQ; return the type of the PDU that answers it."""
        self.sock.sendall(struct.pack(">BBL", 0x05, 0, 4) + b"\x00\x00\x00\x00")
        return _recv_pdu(self.sock)[0]

    def abort(self) -> None:
        self.sock.sendall(struct.pack(">BBL", 0x07, 0, 4) + b"\x00\x00\x00\x00")

    def read_until_closed(self) -> bytes:
        """Read until the peer closes the connection; return what it sent meanwhile."""
        data = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := self.sock.recv(65536):
                data += chunk
        return data

    def close(self) -> None:
        self.sock.close()


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks = []
    while size:
        chunk = sock.recv(size)
        if not chunk:
            raise ConnectionError("peer closed the connection")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _recv_pdu(sock: socket.socket) -> tuple[int, bytes]:
    pdu_type, _, length = struct.unpack(">BBL", _recv_exact(sock, 6))
    return pdu_type, _recv_exact(sock, length)


def _pdata(flags: int, data: bytes) -> bytes:
    pdv = struct.pack(">LBB", len(data) + 2, _CONTEXT_ID, flags) + data
    return struct.pack(">BBL", 0x04, 0, len(pdv)) + pdv


def command_elements(command: bytes) -> dict[int, bytes]:
    """A command set's values by element number (group 0000, implicit VR LE)."""
    elements: dict[int, bytes] = {}
    pos = 0
    while pos + 8 <= len(command):
        _group, element, length = struct.unpack_from("<HHL", command, pos)
        elements[element] = command[pos + 8 : pos + 8 + length]
        pos += 8 + length
    return elements


def _status_of(command: bytes) -> int | None:
    status = command_elements(command).get(0x0900)
    return int(struct.unpack("<H", status)[0]) if status is not None else None


def send_raw_c_store(
    host: str,
    port: int,
    *,
    sop_class: str,
    sop_instance: str,
    transfer_syntax: str,
    dataset: bytes,
    calling_ae: str = "RAWSCU",
    called_ae: str = "VANNAHCLOUD",
    max_pdv: int = 16_000,
    timeout: float = 30.0,
) -> StoreResult:
    """Associate, send one C-STORE whose data set is exactly `dataset`, release."""
    request = associate_rq(
        [(_CONTEXT_ID, sop_class, [transfer_syntax])], calling_ae=calling_ae, called_ae=called_ae
    )
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(request)
        pdu_type, payload = _recv_pdu(sock)
        if pdu_type != 0x02:
            return StoreResult(accepted=False, status=None)
        accepted = False
        pos = 68
        while pos + 4 <= len(payload):
            item_type, _, length = struct.unpack_from(">BBH", payload, pos)
            if item_type == 0x21 and payload[pos + 4] == _CONTEXT_ID:
                accepted = payload[pos + 6] == 0
            pos += 4 + length
        if not accepted:
            sock.sendall(struct.pack(">BBL", 0x07, 0, 4) + b"\x00\x00\x00\x00")  # A-ABORT
            return StoreResult(accepted=False, status=None)
        sock.sendall(_pdata(0x03, _command(sop_class, sop_instance, 1)))
        if not dataset:
            sock.sendall(_pdata(0x02, b""))
        for start in range(0, len(dataset), max_pdv):
            last = start + max_pdv >= len(dataset)
            sock.sendall(_pdata(0x02 if last else 0x00, dataset[start : start + max_pdv]))
        _answered, status = _read_command_status(sock)
        sock.sendall(struct.pack(">BBL", 0x05, 0, 4) + b"\x00\x00\x00\x00")  # A-RELEASE-RQ
        with contextlib.suppress(ConnectionError, OSError):
            _recv_pdu(sock)
        return StoreResult(accepted=True, status=status)


def read_command(sock: socket.socket) -> bytes | None:
    """Read P-DATA-TF PDUs up to the end of one command set and return it, or None if
    another PDU comes first."""
    command = b""
    while True:
        pdu_type, payload = _recv_pdu(sock)
        if pdu_type != 0x04:
            return None
        pos = 0
        while pos + 6 <= len(payload):
            length, _cx, flags = struct.unpack_from(">LBB", payload, pos)
            command += payload[pos + 6 : pos + 4 + length]
            pos += 4 + length
            if flags & 0x03 == 0x03:
                return command


def _read_command_status(sock: socket.socket) -> tuple[bool, int | None]:
    """(True, the Status of the next command set), or (False, None) if another PDU comes
    first."""
    command = read_command(sock)
    return (False, None) if command is None else (True, _status_of(command))
