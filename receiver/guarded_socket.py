"""The socket pynetdicom reads an association through: the limits of ``receiver.limits``.

pynetdicom reads a PDU by its declared length, 4 kB at a time into a growing buffer, with
no limit on that length, no limit on a data set's size, and blocking reads in mid-PDU
(an accepted socket has no timeout). :class:`GuardedSocket` stands in for the accepted
socket (``AssociationSocket(client_socket=...)`` takes any socket-like object): each
``recv`` goes through a :class:`~receiver.limits.PduMeter` and a
:class:`~receiver.limits.Pace`; past a limit it sends A-ABORT (PS3.8 9.3.8, service
provider) and fails the read, which pynetdicom treats as the connection closing.

It also replays the A-ASSOCIATE-RQ the receiver's gate has already read (``prefix``), and
works over TLS: bytes the TLS layer has decrypted but not yet handed out (``pending()``)
do not show in ``select``, so while any are buffered ``fileno`` names a descriptor that
is always readable, and pynetdicom's reactor reads on.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import select
import socket
import time
from collections.abc import Callable
from typing import Any

from receiver.limits import LimitExceededError, Limits, Pace, PduMeter
from vannah_pipelines.dimse import pdu

log = logging.getLogger(__name__)


class GuardedSocket:
    """A connected socket whose reads enforce `limits` (the rest is the socket's own)."""

    def __init__(
        self,
        sock: socket.socket,
        limits: Limits,
        *,
        peer: str,
        idle_seconds: float,
        release_pending: Callable[[], None] = lambda: None,
        prefix: bytes = b"",
        admission: object = None,
    ) -> None:
        self._sock = sock
        self._prefix = bytearray(prefix)
        self.admission = admission  # the gate's decision, for the pynetdicom handlers
        self._limits = limits
        self._meter = PduMeter(limits)
        self._pace = Pace(limits, idle_seconds)
        self._peer = peer
        self._release_pending = release_pending
        self._failed = False

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        """Read up to `bufsize` bytes, waiting no longer than the limits allow.

        Raises
        ------
        OSError
            After aborting the association for a broken limit (or a timeout in mid-PDU).
        """
        if self._failed:
            raise OSError("association aborted for a limit")
        try:
            if not self._meter.in_pdu:
                self._pace.touch()  # pynetdicom waits between PDUs itself (network timeout)
            if self._prefix:
                data = bytes(self._prefix[:bufsize])
                del self._prefix[:bufsize]
            else:
                while not self._buffered():
                    timeout = self._pace.wait()
                    ready, _, _ = select.select([self._sock], [], [], timeout)
                    if ready:
                        break
                data = self._sock.recv(bufsize, flags)
            if data:
                self._pace.received(len(data))
                if self._meter.feed(data):
                    self._pace.pdu_done()
                    self._release_pending()  # idempotent: the A-ASSOCIATE-RQ has arrived
            return data
        except LimitExceededError as exc:
            self._abort(str(exc), exc.reason)
            raise OSError(f"association aborted: {exc}") from exc
        except TimeoutError as exc:
            self._abort(f"{exc} in mid-PDU", pdu.REASON_NOT_SPECIFIED)
            raise OSError(f"association aborted: {exc}") from exc

    def _buffered(self) -> bool:
        """Bytes readable without waiting on the descriptor (replay or TLS buffer)."""
        if self._prefix:
            return True
        pending = getattr(self._sock, "pending", None)
        return bool(pending is not None and pending())

    def _abort(self, message: str, reason: int) -> None:
        self._failed = True
        log.warning("aborting the association from %s: %s", self._peer, message)
        with contextlib.suppress(OSError):
            self._sock.sendall(pdu.abort(pdu.ABORT_SERVICE_PROVIDER, reason))
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._release_pending()  # no longer a pending connection, whatever it sent
        self._sock.close()

    def fileno(self) -> int:
        # pynetdicom's reactor polls the socket with select() between PDUs, which asks
        # for this: the association's deadline is enforced here even when it is idle.
        if not self._failed and time.monotonic() >= self._pace.deadline:
            self._abort(
                f"association open longer than {self._limits.association_max_seconds:g} s",
                pdu.REASON_NOT_SPECIFIED,
            )
        if self._buffered():
            return _always_readable()
        return self._sock.fileno()

    def __getattr__(self, name: str) -> Any:
        # send, shutdown, close, getsockname, ...: the socket's own.
        return getattr(self._sock, name)

    def __str__(self) -> str:
        return str(self._sock)


@functools.cache
def _always_readable() -> int:
    """A pipe's read end holding one byte no one reads: ``select`` always finds it ready."""
    read_end, write_end = os.pipe()
    os.write(write_end, b"\0")
    return read_end
