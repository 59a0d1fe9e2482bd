"""Modality Worklist C-FIND (PS3.4 K): the event handler and its presentation context.

The handler only unpacks the event; matching is :func:`vannah_pipelines.worklist.find.find_items`
over the steps :class:`~vannah_pipelines.worklist.store.WorklistStore` holds.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom.dsutils import encode

from receiver.responses import EncodedIdentifier, failure
from receiver.status import WorklistFindStatus
from vannah_pipelines.worklist.errors import InvalidIdentifierError
from vannah_pipelines.worklist.find import answer_item, compile_identifier, find_items
from vannah_pipelines.worklist.model import WorklistItem
from vannah_pipelines.worklist.store import WorklistStore

log = logging.getLogger(__name__)

MAX_REMEMBERED_QUERIES = 64  # distinct MWL identifiers whose answers a worker keeps
MAX_REMEMBERED_IDENTIFIER_BYTES = 8192  # a larger identifier is answered afresh each time


class _Remembered:
    """One identifier's compiled query and each step's answer to it, encoded."""

    def __init__(self, query: Any, syntax: UID) -> None:
        self.query = query
        self.syntax = syntax
        # id(item) -> (the item, its encoded answer or None: no match / not encodable)
        self.answers: dict[int, tuple[WorklistItem, bytes | None]] = {}

    def answer(self, item: WorklistItem) -> bytes | Dataset | None:
        """`item`'s answer: encoded (remembered while `item` is the step's current state),
        the Dataset when pydicom cannot encode it (answer_find then answers 0xC312), None
        when it does not match."""
        known = self.answers.get(id(item))
        if known is not None and known[0] is item:
            return known[1]
        response = answer_item(self.query, item)
        data: bytes | None = None
        if response is not None:
            syntax = self.syntax
            try:
                data = encode(
                    response, syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated
                )
            except Exception:
                data = None
            if not data:
                return response  # answer_find encodes it again, and fails as it would
        self.answers[id(item)] = (item, data)
        return data


class WorklistAnswers:
    """A worker's memory of MWL answers: modalities send the same query all day, and the
    answer to an identifier (its exact bytes, in one transfer syntax) for a step is always
    the same while the step is unchanged (the store keeps an unchanged step's object).
    Which steps are asked (``visible_items``: status, past due) is decided on every query.
    Decoding, matching and pydicom encoding are ~1 ms of a three-answer query."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queries: dict[tuple[bytes, str], _Remembered] = {}

    def get(self, identifier: bytes, syntax: UID) -> _Remembered | None:
        with self._lock:
            return self._queries.get((identifier, str(syntax)))

    def remember(self, identifier: bytes, syntax: UID, query: Any) -> _Remembered:
        remembered = _Remembered(query, syntax)
        if len(identifier) <= MAX_REMEMBERED_IDENTIFIER_BYTES:
            with self._lock:
                if len(self._queries) >= MAX_REMEMBERED_QUERIES:
                    self._queries.clear()
                self._queries[(identifier, str(syntax))] = remembered
        return remembered

    @staticmethod
    def prune(remembered: _Remembered, items: list[WorklistItem]) -> None:
        """Forget the answers of steps no longer asked about (bounded by the worklist)."""
        if len(remembered.answers) > 2 * len(items) + 16:
            current = {id(item) for item in items}
            for key in [k for k in remembered.answers if k not in current]:
                remembered.answers.pop(key, None)


def handle_worklist_find(
    event: Any,
    store: WorklistStore,
    past_due_hours: float = 24.0,
    now: Callable[[], datetime] = datetime.now,
    remembered: WorklistAnswers | None = None,
) -> Iterator[tuple[int | Dataset, Dataset | EncodedIdentifier | None]]:
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
    remembered
        The worker's :class:`WorklistAnswers`: used for an event that carries its
        identifier's bytes and transfer syntax (the fast path's), whose answers are then
        :class:`~receiver.responses.EncodedIdentifier`.
    """
    raw = getattr(event, "identifier_bytes", None)
    syntax = getattr(event, "syntax", None)
    if remembered is not None and isinstance(raw, bytes) and isinstance(syntax, UID):
        yield from _remembered_find(event, store, past_due_hours, now, remembered, raw, syntax)
        return
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


def _remembered_find(
    event: Any,
    store: WorklistStore,
    past_due_hours: float,
    now: Callable[[], datetime],
    memory: WorklistAnswers,
    raw: bytes,
    syntax: UID,
) -> Iterator[tuple[int | Dataset, Dataset | EncodedIdentifier | None]]:
    """:func:`handle_worklist_find` with answers remembered: the same statuses, answers
    and logs; an identifier not seen before is decoded and checked as there."""
    remembered = memory.get(raw, syntax)
    if remembered is None:
        try:
            identifier = event.identifier
            identifier.decode()
        except Exception as exc:  # a peer's undecodable bytes: any parse error means the same
            log.warning(
                "undecodable MWL identifier from %s: %s", _peer_ae(event), type(exc).__name__
            )
            yield failure(WorklistFindStatus.UNABLE_TO_PROCESS, "cannot decode identifier"), None
            return
        try:
            query = compile_identifier(identifier)
        except InvalidIdentifierError as exc:
            log.warning("malformed MWL identifier from %s", _peer_ae(event))
            yield failure(WorklistFindStatus.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, str(exc)), None
            return
        remembered = memory.remember(raw, syntax, query)
    try:
        items = store.visible_items(now(), past_due_hours)
    except Exception:
        log.exception("worklist store unreadable")
        yield failure(WorklistFindStatus.OUT_OF_RESOURCES, "worklist unavailable"), None
        return
    sent = 0
    try:
        for item in items:
            answer = remembered.answer(item)
            if answer is None:
                continue
            if event.is_cancelled:
                log.info("MWL C-FIND from %s cancelled after %d", _peer_ae(event), sent)
                yield WorklistFindStatus.CANCEL, None
                return
            sent += 1
            if isinstance(answer, Dataset):
                yield WorklistFindStatus.PENDING, answer
            else:
                yield WorklistFindStatus.PENDING, EncodedIdentifier(answer, str(syntax))
    except Exception:
        log.exception("MWL matching failed")
        yield failure(WorklistFindStatus.UNABLE_TO_PROCESS, "matching failed"), None
        return
    memory.prune(remembered, items)
    log.info("MWL C-FIND from %s: %d matches", _peer_ae(event), sent)
    yield WorklistFindStatus.SUCCESS, None


def _peer_ae(event: Any) -> str:
    try:
        return str(event.assoc.requestor.ae_title)
    except AttributeError:
        return "?"
