"""A stop request a signal handler can make safely.

A SIGTERM/SIGINT handler runs in the main thread between two bytecodes, possibly while
that thread holds a lock. ``threading.Event.set()`` takes the event's lock, so a handler
that calls it can deadlock the process: a second signal arriving while the first handler
is inside ``set()`` waits forever on a lock its own thread holds (seen: a receiver that
took two SIGTERMs in a row never stopped). :class:`StopFlag` only assigns an attribute in
the handler; the loops that wait on it poll it.
"""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType
from typing import Any


class StopFlag:
    """Set once a stop is requested; never takes a lock in its signal handler.

    >>> flag = StopFlag()
    >>> flag.handler(signal.SIGTERM, None); flag.handler(signal.SIGTERM, None)
    >>> flag.requested, flag.wait(0.01)
    (True, True)
    """

    def __init__(self) -> None:
        self.requested = False

    def handler(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True  # an attribute store: nothing to block on, re-entrant

    def install(self, *signums: signal.Signals) -> dict[signal.Signals, Any]:
        """Make `signums` (SIGTERM and SIGINT by default) set the flag, from the main
        thread only (elsewhere: nothing installed). Returns the previous handlers."""
        previous: dict[signal.Signals, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for signum in signums or (signal.SIGTERM, signal.SIGINT):
                previous[signum] = signal.signal(signum, self.handler)
        return previous

    def wait(self, timeout: float | None = None, poll: float = 0.1) -> bool:
        """Wait until a stop is requested or `timeout` seconds pass; returns the flag."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.requested:
            left = poll if deadline is None else min(poll, deadline - time.monotonic())
            if left <= 0:
                break
            time.sleep(left)
        return self.requested
