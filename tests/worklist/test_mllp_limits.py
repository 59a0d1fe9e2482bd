"""The MLLP listener's limits: message size (AR, then close), connections at once, idle
timeout, and framing that holds and scans each byte once whatever the chunking."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from tests.worklist.conftest import today
from vannah_pipelines.worklist.hl7 import parse_message
from vannah_pipelines.worklist.mllp import (
    MessageTooLargeError,
    MllpFramer,
    MllpServer,
    frame,
)
from vannah_pipelines.worklist.store import WorklistStore

LIMIT = 4096


def _orm(accession: str = "ACC100", padding: int = 0) -> str:
    obr = ["OBR", "1", "PL100", accession, "CTCHEST^CT CHEST W/O^L"] + [""] * 25
    obr[18], obr[19], obr[20], obr[21], obr[24] = accession, "RP100", "SPS100", "CT01", "CT"
    segments = [
        "MSH|^~\\&|RIS|HOSP|VANNAH|HOSP|20240101120000||ORM^O01|MSG0042|P|2.3.1",
        "PID|1||PID100^^^HOSP||DOE^JOHN^Q||19700101|M",
        f"ORC|NW|PL100|{accession}||||^^^{today()}2300^^R",
        "|".join(obr),
    ]
    if padding:
        segments.append("NTE|1||" + "x" * padding)
    return "\r".join(segments) + "\r"


def _ack(sock: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\x1c\r"):
        chunk = sock.recv(65536)
        assert chunk, "connection closed before the ACK"
        data += chunk
    return data[1:-2].decode()


def _closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


@pytest.fixture
def server(store: WorklistStore) -> Iterator[MllpServer]:
    mllp = MllpServer(
        ("127.0.0.1", 0), store, idle_timeout=0.5, max_message_bytes=LIMIT, max_connections=2
    )
    mllp.start()
    try:
        yield mllp
    finally:
        mllp.shutdown()
        mllp.server_close()


def _connect(server: MllpServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10)


def test_mllp_message_over_the_limit_gets_ar_then_close(
    server: MllpServer, store: WorklistStore
) -> None:
    with _connect(server) as sock:
        sock.sendall(frame(_orm(padding=2 * LIMIT)))
        ack = parse_message(_ack(sock))
        assert (ack.get("MSA", 1), ack.get("MSA", 2)) == ("AR", "MSG0042")
        assert f"exceeds {LIMIT} bytes" in ack.get("MSA", 3)
        assert _closed(sock)
    assert store.items() == []
    with _connect(server) as sock:  # the listener still serves
        sock.sendall(frame(_orm()))
        assert parse_message(_ack(sock)).get("MSA", 1) == "AA"


def test_mllp_unterminated_message_over_the_limit_is_refused_without_its_end(
    server: MllpServer,
) -> None:
    with _connect(server) as sock:
        sock.sendall(b"\x0b" + _orm().encode() + b"y" * 2 * LIMIT)  # no <FS><CR> ever
        assert parse_message(_ack(sock)).get("MSA", 1) == "AR"
        assert _closed(sock)


def test_mllp_connections_over_the_cap_are_closed(server: MllpServer) -> None:
    first, second = _connect(server), _connect(server)
    try:
        for sock in (first, second):  # both served: each holds a slot
            sock.sendall(frame(_orm()))
            assert parse_message(_ack(sock)).get("MSA", 1) == "AA"
        with _connect(server) as third:
            assert _closed(third)
    finally:
        first.close()
        second.close()
    deadline = time.monotonic() + 10  # slots come back once the handlers see the close
    while True:
        with _connect(server) as sock:
            sock.sendall(frame(_orm()))
            try:
                assert parse_message(_ack(sock)).get("MSA", 1) == "AA"
                break
            except (AssertionError, ConnectionResetError):
                assert time.monotonic() < deadline, "slots never released"
                time.sleep(0.05)


def test_mllp_idle_connection_is_closed(server: MllpServer) -> None:
    with _connect(server) as sock:
        sock.sendall(b"\x0bMSH|^~\\&|")  # a message begun, then silence
        assert _closed(sock)  # after idle_timeout (0.5 s); the client waits up to 10 s


def test_mllp_message_dripped_slower_than_the_idle_timeout_allows_is_cut(
    server: MllpServer,
) -> None:
    """A byte every 0.2 s never trips the 0.5 s idle timeout, but the message must end
    within 0.5 s of its first byte: the connection is closed, the slot freed."""
    with _connect(server) as sock:
        start = time.monotonic()
        sock.sendall(b"\x0bMSH|")
        closed = False
        for byte in b"^~\\&|RIS|HOSP|" * 20:  # 10 s of drip at most
            time.sleep(0.2)
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
        assert closed or _closed(sock)
        assert time.monotonic() - start < 8  # cut, not served to the end of the drip


def test_framer_takes_any_chunking() -> None:
    message = _orm(padding=1000).encode()
    stream = b"noise" + frame(_orm()) + b"\r\n" + b"\x0b" + message + b"\x1c\r"
    framer = MllpFramer(LIMIT)
    out: list[bytes] = []
    for i in range(len(stream)):
        out.extend(framer.feed(stream[i : i + 1]))
    assert out == [_orm().encode(), message]
    # At most one message is held, however it is chunked.
    assert framer.held == 0


def test_framer_refuses_at_the_limit_not_before() -> None:
    framer = MllpFramer(LIMIT)
    assert framer.feed(b"\x0b" + b"M" * LIMIT + b"\x1c\r") == [b"M" * LIMIT]
    with pytest.raises(MessageTooLargeError):
        framer.feed(b"\x0b" + b"M" * (LIMIT + 1) + b"\x1c\r")
    chunks = [b"\x0b"] + [b"M" * 1000] * 5
    framer = MllpFramer(LIMIT)
    with pytest.raises(MessageTooLargeError):
        for chunk in chunks:
            framer.feed(chunk)


def test_mllp_logs_carry_no_patient_data_at_info(
    server: MllpServer, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("INFO"), _connect(server) as sock:
        sock.sendall(frame(_orm(accession="ACCSECRET")))
        assert parse_message(_ack(sock)).get("MSA", 1) == "AA"
        sock.sendall(frame(_orm(accession="ACCSECRET").replace("PID100", "")))
        assert parse_message(_ack(sock)).get("MSA", 1) == "AE"
        sock.sendall(frame(_orm(accession="ACCSECRET", padding=2 * LIMIT)))
        assert parse_message(_ack(sock)).get("MSA", 1) == "AR"
    text = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("vannah"))
    assert "MSG0042" in text  # the control id is logged
    for secret in ("DOE", "JOHN", "PID100", "ACCSECRET"):
        assert secret not in text, secret
