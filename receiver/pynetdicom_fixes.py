"""A fix for a race in pynetdicom's association reactor (pynetdicom 3.0; upstream #435).

``Association.send_c_store`` (and every other ``send_*``) pauses the reactor thread by
clearing ``_reactor_checkpoint`` and waiting for ``_is_paused``. The reactor sets
``_is_paused = True`` *before* it waits on the checkpoint, so a sender can see the flag,
send its request, and have the reactor — woken a moment earlier — take the response off the
DIMSE queue. The reactor then drops it as "unexpected ... service message" and the sender
waits for the whole DIMSE timeout. With many concurrent associations on a busy machine this
happens: the C-MOVE SCP's sub-associations here, and any pynetdicom SCU.

The fix: a response the reactor takes while a sender has paused it (checkpoint cleared) goes
back to the front of the queue, where the sender's blocking ``get_msg`` finds it.
"""

from __future__ import annotations

import queue
from typing import Any

from pynetdicom.association import Association

_original_serve_request = Association._serve_request


def _serve_request(self: Association, msg: Any, context_id: int) -> None:
    if not msg.is_valid_request and not self._reactor_checkpoint.is_set():
        msg_queue: queue.Queue[Any] = self.dimse.msg_queue
        with msg_queue.mutex:
            msg_queue.queue.appendleft((context_id, msg))
            msg_queue.not_empty.notify()
        return
    _original_serve_request(self, msg, context_id)


def install() -> None:
    """Patch :class:`pynetdicom.association.Association` (process-wide, idempotent)."""
    setattr(Association, "_serve_request", _serve_request)  # noqa: B010
