"""MLLP listener: HL7 v2 messages framed ``<VT>message<FS><CR>``, each answered by an ACK.

Release 1 framing (HL7 v2 Appendix C). Every message is applied to the worklist store before
its ACK is sent, so AA means the change is durable. Bounded: a message over
``mllp_max_message_bytes`` is answered AR and the connection closed; at most
``mllp_max_connections`` connections are served at once (more are closed at accept); a
connection silent for ``mllp_idle_timeout_seconds``, or whose message is not complete that long
after its first byte, is closed. Framing is linear: each
received byte is scanned once.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
import time
from typing import Any

from vannah_pipelines.worklist.errors import InvalidItemError
from vannah_pipelines.worklist.hl7 import Message, build_ack, handle_message, parse_message
from vannah_pipelines.worklist.store import WorklistStore

log = logging.getLogger(__name__)

START, END = b"\x0b", b"\x1c\x0d"
MAX_MESSAGE_BYTES = 1 << 20
_RECV_BYTES = 65536
# The MSH segment of an oversized message is looked for in its first bytes (for the AR ACK).
_MSH_BYTES = 4096


def frame(text: str, encoding: str = "utf-8") -> bytes:
    """Wrap one message in MLLP framing."""
    return START + text.encode(encoding) + END


def decode(data: bytes) -> str:
    """Message bytes as text: UTF-8, else Latin-1 (HL7's common default)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


class MessageTooLargeError(ValueError):
    """An MLLP message longer than the limit; `head` holds its first bytes."""

    def __init__(self, limit: int, head: bytes) -> None:
        super().__init__(f"HL7 message exceeds {limit} bytes")
        self.head = head


class MllpFramer:
    """Incremental MLLP deframing: bytes in any chunking, whole messages out.

    Each byte is scanned once (the search for the end resumes where the last one
    stopped), and at most `max_bytes` of one message are held.

    >>> framer = MllpFramer(1024)
    >>> framer.feed(b"junk\\x0bMSH|a\\x1c"), framer.feed(b"\\x0d\\x0bMSH|b\\x1c\\x0d")
    ([], [b'MSH|a', b'MSH|b'])
    """

    def __init__(self, max_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._buf = bytearray()
        self._in_message = False
        self._scan = 0  # where the search for END resumes

    @property
    def held(self) -> int:
        """Bytes held for a message not complete yet."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        """The messages `data` completes.

        Raises
        ------
        MessageTooLargeError
            If a message (complete or not) is longer than `max_bytes`.
        """
        self._buf += data
        messages: list[bytes] = []
        while True:
            if not self._in_message:
                start = self._buf.find(START)
                if start < 0:
                    self._buf.clear()  # bytes outside a frame are ignored
                    return messages
                del self._buf[:start]
                self._in_message, self._scan = True, 1
            end = self._buf.find(END, self._scan)
            if end < 0:
                self._scan = max(1, len(self._buf) - len(END) + 1)
                self._check(len(self._buf) - 1)
                return messages
            self._check(end - 1)
            messages.append(bytes(self._buf[1:end]))
            del self._buf[: end + len(END)]
            self._in_message = False

    def _check(self, size: int) -> None:
        if size > self.max_bytes:
            head = bytes(self._buf[1 : 1 + _MSH_BYTES])
            self._buf.clear()
            self._in_message = False
            raise MessageTooLargeError(self.max_bytes, head)


def _reject_ack(head: bytes, reason: str) -> str:
    """An AR ACK for a message known only by its first bytes (its MSH, if there)."""
    message: Message | None
    try:
        message = parse_message(decode(head).split("\r", 1)[0])
    except InvalidItemError:
        message = None
    return build_ack(message, "AR", reason)


class _Handler(socketserver.BaseRequestHandler):
    server: MllpServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(self.server.idle_timeout)
        framer = MllpFramer(self.server.max_message_bytes)
        peer = f"{self.client_address[0]}:{self.client_address[1]}"
        idle = self.server.idle_timeout
        # A message begun must end within the idle timeout of its first byte: a sender
        # dripping a byte now and then cannot hold a connection slot forever.
        message_deadline: float | None = None
        while True:
            now = time.monotonic()
            if framer.held and message_deadline is None:
                message_deadline = now + idle
            elif not framer.held:
                message_deadline = None
            left = idle if message_deadline is None else message_deadline - now
            if left <= 0:
                log.info("MLLP message from %s not finished in %.0f s; closing", peer, idle)
                return
            sock.settimeout(min(idle, left))
            try:
                chunk = sock.recv(_RECV_BYTES)
            except TimeoutError:
                log.info("MLLP connection from %s idle; closing", peer)
                return
            except OSError:
                return
            if not chunk:
                return
            try:
                messages = framer.feed(chunk)
            except MessageTooLargeError as exc:
                log.warning(
                    "MLLP message from %s over %d bytes: AR, closing",
                    peer,
                    self.server.max_message_bytes,
                )
                self._send(sock, _reject_ack(exc.head, str(exc)))
                return
            for body in messages:
                with self.server.apply_lock:
                    ack, _code = handle_message(decode(body), self.server.store)
                if not self._send(sock, ack):
                    return

    @staticmethod
    def _send(sock: socket.socket, ack: str) -> bool:
        try:
            sock.sendall(frame(ack))
        except OSError:
            return False
        return True


class MllpServer(socketserver.ThreadingTCPServer):
    """A threaded MLLP server applying orders to `store`. ``server_address[1]`` is the port.

    At most `max_connections` connections are served at once: one more is closed as soon
    as it is accepted (the sender retries later).
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        store: WorklistStore,
        idle_timeout: float = 60.0,
        *,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        max_connections: int = 16,
    ) -> None:
        self.store = store
        self.idle_timeout = idle_timeout
        self.max_message_bytes = max_message_bytes
        self.max_connections = max_connections
        self.apply_lock = threading.Lock()  # messages are applied in arrival order
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            log.warning(
                "MLLP connection from %s refused: %d connections open",
                client_address[0],
                self.max_connections,
            )
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def start(self) -> threading.Thread:
        """Serve from a daemon thread (tests); stop with ``shutdown(); server_close()``."""
        thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.1}, name="mllp", daemon=True
        )
        thread.start()
        return thread
