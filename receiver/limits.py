"""Per-association resource limits of the DIMSE receiver, for both paths (stdlib only).

A peer must not make a worker hold memory or a thread for long by declaring sizes it never
sends, sending very slowly, or never finishing: PDUs longer than the maximum we advertise
(PS3.8 9.3.1: ``Maximum Length Received``), data sets over ``max_instance_bytes``, an
association past ``dimse_association_max_seconds``, a PDU arriving slower than
``dimse_min_bytes_per_second`` over :data:`WINDOW_SECONDS` windows, and more than
``dimse_max_pending_connections`` connections per worker that have not sent their
A-ASSOCIATE-RQ yet. The fast path checks PDUs itself (``receiver.fast_store``); pynetdicom
reads through :class:`receiver.guarded_socket.GuardedSocket`, which uses :class:`PduMeter`.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from vannah_pipelines.dimse import pdu
from vannah_pipelines.settings import Settings

WINDOW_SECONDS = 10.0  # the throughput of a PDU in progress is judged over windows this long
# PS3.8 9.3.1: P-DATA-TF PDUs are bounded by the Maximum Length Received we advertise; the
# association PDUs are not, but an A-ASSOCIATE-RQ with hundreds of contexts is ~50 kB.
MAX_OTHER_PDU_BYTES = 1 << 20
_P_DATA_TF = 0x04
_PDU_HEADER = struct.Struct(">BxL")
_PDV_HEADER = struct.Struct(">LBB")
_PDV_COMMAND = 0x01
_PDV_LAST = 0x02


@dataclass(frozen=True)
class Limits:
    """The limits of one worker's associations (from :class:`Settings`)."""

    max_pdu_bytes: int
    max_instance_bytes: int
    min_bytes_per_second: int
    association_max_seconds: float
    max_pending_connections: int
    window_seconds: float = WINDOW_SECONDS

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            max_pdu_bytes=settings.dimse_max_pdu_bytes,
            max_instance_bytes=settings.max_instance_bytes,
            min_bytes_per_second=settings.dimse_min_bytes_per_second,
            association_max_seconds=settings.dimse_association_max_seconds,
            max_pending_connections=settings.dimse_max_pending_connections,
            window_seconds=WINDOW_SECONDS,
        )

    def pdu_too_long(self, pdu_type: int, length: int) -> str:
        """Why a PDU of `pdu_type` declaring `length` bytes is refused ("" if it is not).

        >>> Limits(4096, 1 << 20, 0, 60.0, 8).pdu_too_long(0x04, 4097)
        'a 4097-byte P-DATA-TF PDU, over the 4096-byte maximum'
        """
        if pdu_type == _P_DATA_TF and length > self.max_pdu_bytes:
            return f"a {length}-byte P-DATA-TF PDU, over the {self.max_pdu_bytes}-byte maximum"
        if pdu_type != _P_DATA_TF and length > max(MAX_OTHER_PDU_BYTES, self.max_pdu_bytes):
            return f"a {length}-byte PDU of type 0x{pdu_type:02X}"
        return ""


class LimitExceededError(Exception):
    """An association broke a limit: it is aborted (A-P-ABORT); the message says which."""

    def __init__(self, message: str, reason: int = pdu.REASON_NOT_SPECIFIED) -> None:
        super().__init__(message)
        self.reason = reason  # PS3.8 9.3.8: the A-ABORT reason


class Pace:
    """The clock of one association: its deadline, and the throughput of a PDU in progress.

    Call :meth:`received` after each read, :meth:`pdu_done` once a PDU has been read
    whole, and :meth:`wait` for how long the next read may block; it raises
    :class:`LimitExceededError` once the deadline has passed or a PDU in progress fell
    under ``min_bytes_per_second`` over a whole window, and :class:`TimeoutError` once the
    peer has been silent for `idle_seconds`. Not thread-safe: one reader per association.
    """

    def __init__(
        self,
        limits: Limits,
        idle_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limits = limits
        self._idle_seconds = idle_seconds
        self._clock = clock
        now = clock()
        self._deadline = now + limits.association_max_seconds
        self._last_read = now
        self._window_end: float | None = None  # None: between PDUs
        self._window_bytes = 0
        self._window_minimum = limits.min_bytes_per_second * limits.window_seconds

    def received(self, count: int) -> None:
        """`count` bytes arrived (the first byte of a PDU starts its first window)."""
        now = self._clock()
        self._last_read = now
        if self._window_end is None:
            self._window_end = now + self._limits.window_seconds
            self._window_bytes = count
            return
        self._window_bytes += count
        if now >= self._window_end:
            self._roll(now)

    @property
    def tick(self) -> float:
        """A fixed read timeout short enough for every check: a reader that sets it once
        and calls :meth:`wait` after each timeout notices a limit at most this late."""
        ticks = [self._idle_seconds, self._limits.association_max_seconds]
        if self._window_minimum > 0:
            ticks.append(self._limits.window_seconds)
        return min(ticks)

    @property
    def deadline(self) -> float:
        """When the association must have ended (on the clock's scale)."""
        return self._deadline

    def touch(self) -> None:
        """The peer is active now (a reader that waits for data elsewhere, between PDUs)."""
        self._last_read = self._clock()

    def pdu_done(self) -> None:
        """The PDU in progress has been read whole: back between PDUs."""
        self._window_end = None

    def wait(self) -> float:
        """Seconds the next read may block (> 0).

        Raises
        ------
        LimitExceededError
            The association's deadline has passed, or the PDU in progress was too slow.
        TimeoutError
            Nothing arrived for `idle_seconds`.
        """
        now = self._clock()
        left = self._deadline - now
        if left <= 0:
            raise LimitExceededError(
                f"association open longer than {self._limits.association_max_seconds:g} s"
            )
        idle = self._last_read + self._idle_seconds - now
        if idle <= 0:
            raise TimeoutError(f"peer silent for {self._idle_seconds:g} s")
        wait = min(left, idle)
        if self._window_end is not None and self._window_minimum > 0:
            if now >= self._window_end:
                self._roll(now)
            wait = min(wait, self._window_end - now)
        return max(wait, 0.001)

    def _roll(self, now: float) -> None:
        assert self._window_end is not None
        if self._window_minimum > 0 and self._window_bytes < self._window_minimum:
            raise LimitExceededError(
                f"{self._window_bytes} bytes in {self._limits.window_seconds:g} s within a "
                f"PDU, under {self._limits.min_bytes_per_second} bytes/s"
            )
        self._window_end = now + self._limits.window_seconds
        self._window_bytes = 0


class PduMeter:
    """Follows a PS3.8 PDU stream as it is read and refuses what breaks the limits: a PDU
    longer than allowed (on its header, before its body is read), or a data set whose
    fragments add up to more than ``max_instance_bytes``.

    >>> meter = PduMeter(Limits(4096, 1 << 20, 0, 60.0, 8))
    >>> meter.feed(bytes((0x04, 0)) + (10**9).to_bytes(4, "big"))
    Traceback (most recent call last):
    ...
    receiver.limits.LimitExceededError: a 1000000000-byte P-DATA-TF PDU, over the 4096-byte maximum
    """

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._header = bytearray()
        self._pdu_type = 0
        self._pdu_left = 0  # body bytes of the current PDU still to come
        self._in_pdu = False
        self._pdv_header = bytearray()
        self._pdv_left = 0  # bytes of the current PDV's fragment still to come
        self._pdv_flags = 0
        self._data_set_bytes = 0  # fragments of the data set in progress so far
        self.pdus = 0  # PDUs read whole

    @property
    def in_pdu(self) -> bool:
        """Whether a PDU has started (its header or body partly read)."""
        return self._in_pdu or bool(self._header)

    def feed(self, data: bytes | bytearray | memoryview) -> int:
        """Account for `data`, the next bytes of the stream; return how many PDUs it
        completed.

        Raises
        ------
        LimitExceededError
            On a PDU header declaring too long a PDU, or a data set over the limit.
        """
        view = memoryview(data)
        done = 0
        while view:
            if not self._in_pdu:
                take = min(len(view), _PDU_HEADER.size - len(self._header))
                self._header += view[:take]
                view = view[take:]
                if len(self._header) < _PDU_HEADER.size:
                    break
                self._pdu_type, self._pdu_left = _PDU_HEADER.unpack(self._header)
                self._header.clear()
                reason = self._limits.pdu_too_long(self._pdu_type, self._pdu_left)
                if reason:
                    raise LimitExceededError(reason, pdu.REASON_INVALID_PARAMETER)
                self._in_pdu = True
            else:
                take = min(len(view), self._pdu_left)
                if self._pdu_type == _P_DATA_TF:
                    self._pdvs(view[:take])
                view = view[take:]
                self._pdu_left -= take
            if self._in_pdu and self._pdu_left == 0:
                self._in_pdu = False
                self._pdv_header.clear()
                self._pdv_left = 0
                self.pdus += 1
                done += 1
        return done

    def _pdvs(self, view: memoryview) -> None:
        """PS3.8 9.3.5: the PDVs of a P-DATA-TF body, as far as `view` goes."""
        while view:
            if self._pdv_left == 0:
                take = min(len(view), _PDV_HEADER.size - len(self._pdv_header))
                self._pdv_header += view[:take]
                view = view[take:]
                if len(self._pdv_header) < _PDV_HEADER.size:
                    return
                item_length, _context, self._pdv_flags = _PDV_HEADER.unpack(self._pdv_header)
                self._pdv_header.clear()
                self._pdv_left = max(item_length - 2, 0)
                if self._pdv_left == 0:
                    self._fragment_end()
                continue
            take = min(len(view), self._pdv_left)
            if not self._pdv_flags & _PDV_COMMAND:
                self._data_set_bytes += take
                if self._data_set_bytes > self._limits.max_instance_bytes:
                    raise LimitExceededError(
                        f"data set over the {self._limits.max_instance_bytes}-byte limit"
                    )
            view = view[take:]
            self._pdv_left -= take
            if self._pdv_left == 0:
                self._fragment_end()

    def _fragment_end(self) -> None:
        if self._pdv_flags & _PDV_LAST and not self._pdv_flags & _PDV_COMMAND:
            self._data_set_bytes = 0


class PendingConnections:
    """Connections of a worker that have not sent their A-ASSOCIATE-RQ yet, up to a cap."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._lock = threading.Lock()
        self._count = 0

    @property
    def count(self) -> int:
        return self._count

    def admit(self) -> Callable[[], None] | None:
        """Count one more pending connection; return its (idempotent) release, or None if
        the cap is reached (the caller closes the connection)."""
        with self._lock:
            if self._count >= self.cap:
                return None
            self._count += 1
        released = False

        def release() -> None:
            nonlocal released
            with self._lock:
                if not released:
                    released = True
                    self._count -= 1

        return release
