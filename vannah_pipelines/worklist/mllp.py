"""MLLP listener: HL7 v2 messages framed ``<VT>message<FS><CR>``, each answered by an ACK.

Release 1 framing (HL7 v2 Appendix C). Every message is applied to the worklist store before
its ACK is sent, so AA means the change is durable.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading

from vannah_pipelines.worklist.hl7 import handle_message
from vannah_pipelines.worklist.store import WorklistStore

log = logging.getLogger(__name__)

START, END = b"\x0b", b"\x1c\x0d"
MAX_MESSAGE_BYTES = 1 << 20


def frame(text: str, encoding: str = "utf-8") -> bytes:
    """Wrap one message in MLLP framing."""
    return START + text.encode(encoding) + END


def decode(data: bytes) -> str:
    """Message bytes as text: UTF-8, else Latin-1 (HL7's common default)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


class _Handler(socketserver.BaseRequestHandler):
    server: MllpServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(self.server.idle_timeout)
        buffer = b""
        peer = f"{self.client_address[0]}:{self.client_address[1]}"
        while True:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, OSError):
                return
            if not chunk:
                return
            buffer += chunk
            while True:
                start = buffer.find(START)
                if start < 0:
                    buffer = b""
                    break
                end = buffer.find(END, start)
                if end < 0:
                    buffer = buffer[start:]
                    if len(buffer) > MAX_MESSAGE_BYTES:
                        log.warning("MLLP message from %s too large; closing", peer)
                        return
                    break
                body, buffer = buffer[start + 1 : end], buffer[end + len(END) :]
                with self.server.apply_lock:
                    ack, _code = handle_message(decode(body), self.server.store)
                try:
                    sock.sendall(frame(ack))
                except OSError:
                    return


class MllpServer(socketserver.ThreadingTCPServer):
    """A threaded MLLP server applying orders to `store`. ``server_address[1]`` is the port."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self, address: tuple[str, int], store: WorklistStore, idle_timeout: float = 300.0
    ) -> None:
        self.store = store
        self.idle_timeout = idle_timeout
        self.apply_lock = threading.Lock()  # messages are applied in arrival order
        super().__init__(address, _Handler)

    def start(self) -> threading.Thread:
        """Serve from a daemon thread (tests); stop with ``shutdown(); server_close()``."""
        thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.1}, name="mllp", daemon=True
        )
        thread.start()
        return thread
