"""The receiver's port: shared by its own workers (SO_REUSEPORT), never by another server."""

import socket

import pytest

from receiver.app import ReceiverError, reserve_port
from tests.servers import free_port


def _listener(port: int) -> socket.socket:
    """Another server on `port` that would share it (as a second receiver would)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_a_port_another_server_listens_on_is_refused_not_shared(host: str) -> None:
    port = free_port()
    with _listener(port), pytest.raises(ReceiverError, match="already listens"):
        reserve_port(host, port)
    held = reserve_port(host, port)  # once it has gone, the port is ours
    try:
        again = reserve_port(host, port)  # and our own workers share it
        again.close()
    finally:
        held.close()


def test_port_zero_picks_a_free_port() -> None:
    held = reserve_port("127.0.0.1", 0)
    try:
        assert held.getsockname()[1] > 0
    finally:
        held.close()
