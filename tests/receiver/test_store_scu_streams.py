"""The C-STORE sender sends a data set from any seekable stream: a file, or an object a
storage tier spooled in memory (no file number), sized by seek/tell (no network)."""

from __future__ import annotations

import socket
import threading
from io import BytesIO
from typing import BinaryIO

import pytest

from vannah_pipelines.dimse import pdu
from vannah_pipelines.dimse.store_scu import send_message
from vannah_pipelines.storage.base import spool


def _sent(data: BinaryIO, max_pdu: int) -> list[tuple[int, bytes]]:
    """(flags, fragment) of every data-set PDV `send_message` writes for `data`."""
    left, right = socket.socketpair()
    received = bytearray()

    def drain() -> None:
        while chunk := right.recv(65536):
            received.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        command = pdu.encode_request(pdu.C_STORE_RQ, 1, b"1.2.3", b"1.2.3.4", has_data_set=True)
        send_message(left, max_pdu, 1, command, data)
    finally:
        left.close()
        reader.join(timeout=30)
        right.close()
    found = []
    pos = 0
    while pos < len(received):
        _kind, length = pdu.PDU_HEADER.unpack_from(received, pos)
        body = received[pos + pdu.PDU_HEADER.size : pos + pdu.PDU_HEADER.size + length]
        pos += pdu.PDU_HEADER.size + length
        size, _cx, flags = pdu.PDV_HEADER.unpack_from(body, 0)
        if not flags & pdu.PDV_COMMAND:
            found.append((flags, bytes(body[pdu.PDV_HEADER.size : 4 + size])))
    return found


@pytest.mark.parametrize("kind", ["spooled", "spooled-to-disk", "bytesio"])
def test_send_message_sends_a_spooled_stream_from_its_position(kind: str) -> None:
    payload = bytes(range(256)) * 300  # 76800 bytes: several PDUs of 16 KiB
    head = b"PREAMBLE" * 4
    if kind == "bytesio":
        stream: BinaryIO = BytesIO(head + payload)
    else:
        memory = 1 << 20 if kind == "spooled" else 1024
        stream = spool([head, payload], max_memory=memory)
    stream.seek(len(head))  # where the data set starts, as data_set_offset leaves it
    pdvs = _sent(stream, 16384)
    assert b"".join(f for _, f in pdvs) == payload
    assert [flags & pdu.PDV_LAST for flags, _ in pdvs][-1] and not any(
        flags & pdu.PDV_LAST for flags, _ in pdvs[:-1]
    )
    assert all(len(f) <= 16384 - pdu.PDV_HEADER.size for _, f in pdvs)
