"""Modality Worklist C-FIND (PS3.4 K): the event handler and its presentation context.

The handler only unpacks the event; matching is :func:`vannah_pipelines.worklist.find.find_items`
over the steps :class:`~vannah_pipelines.worklist.store.WorklistStore` holds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

from pydicom.dataset import Dataset

from receiver.responses import failure
from receiver.status import WorklistFindStatus
from vannah_pipelines.worklist.errors import InvalidIdentifierError
from vannah_pipelines.worklist.find import find_items
from vannah_pipelines.worklist.store import WorklistStore

log = logging.getLogger(__name__)


def handle_worklist_find(
    event: Any,
    store: WorklistStore,
    past_due_hours: float = 24.0,
    now: Callable[[], datetime] = datetime.now,
) -> Iterator[tuple[int | Dataset, Dataset | None]]:
    """EVT_C_FIND on the MWL model: yield ``(0xFF00, identifier)`` per matching step, then
    ``(0x0000, None)``; ``(0xFE00, None)`` on C-CANCEL; a failure status for a bad query.

    Parameters
    ----------
    event
        pynetdicom's ``Event`` (uses ``identifier``, ``is_cancelled``, ``assoc``).
    store
        The worklist store (one per receiver process; reads are lock-free).
    past_due_hours
        ``settings.worklist_past_due_hours``: open steps stop being returned this long
        after their scheduled start (0: never).
    """
    try:
        identifier = event.identifier
        identifier.decode()
    except Exception as exc:  # a peer's undecodable bytes: any parse error means the same
        log.warning("undecodable MWL identifier from %s: %s", _peer_ae(event), type(exc).__name__)
        yield failure(WorklistFindStatus.UNABLE_TO_PROCESS, "cannot decode identifier"), None
        return
    try:
        items = store.visible_items(now(), past_due_hours)
    except Exception:
        log.exception("worklist store unreadable")
        yield failure(WorklistFindStatus.OUT_OF_RESOURCES, "worklist unavailable"), None
        return
    try:
        responses = find_items(items, identifier)
    except InvalidIdentifierError as exc:
        log.warning("malformed MWL identifier from %s", _peer_ae(event))
        yield failure(WorklistFindStatus.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, str(exc)), None
        return
    sent = 0
    try:
        for response in responses:
            if event.is_cancelled:
                log.info("MWL C-FIND from %s cancelled after %d", _peer_ae(event), sent)
                yield WorklistFindStatus.CANCEL, None
                return
            sent += 1
            yield WorklistFindStatus.PENDING, response
    except Exception:
        log.exception("MWL matching failed")
        yield failure(WorklistFindStatus.UNABLE_TO_PROCESS, "matching failed"), None
        return
    log.info("MWL C-FIND from %s: %d matches", _peer_ae(event), sent)
    yield WorklistFindStatus.SUCCESS, None


def _peer_ae(event: Any) -> str:
    try:
        return str(event.assoc.requestor.ae_title)
    except AttributeError:
        return "?"
