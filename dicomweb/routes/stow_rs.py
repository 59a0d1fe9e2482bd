"""STOW-RS routes (PS3.18 10.5): ``POST /studies`` and ``POST /studies/{study}``.

The body is streamed: chunks are handed to :class:`dicomweb.stow.StowRequest` in a worker
thread (spooling, validation, fsync and rename never block the event loop), so memory
stays bounded whatever the body size.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import anyio
from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from dicomweb.deps import SettingsDep
from dicomweb.errors import BadRequestError, DicomWebError, InsufficientStorageError
from dicomweb.stow import (
    DICOM_JSON,
    StowRequest,
    check_accept,
    check_content_length,
    response_body,
    response_status,
    stow_boundary,
    unlisted_failures,
)
from vannah_pipelines.dicom.uids import is_uid
from vannah_pipelines.errors import InsufficientSpaceError
from vannah_pipelines.landing.layout import LandingZone
from vannah_pipelines.landing.space import is_disk_full, require_free_space
from vannah_pipelines.settings import Settings

log = logging.getLogger(__name__)

router = APIRouter()

# Body chunks are gathered up to this size before each hop to a worker thread.
_FEED_BYTES = 1024 * 1024


@router.post("/studies")
async def store_instances(request: Request, settings: SettingsDep) -> Response:
    """Store Instances (PS3.18 10.5): multipart/related; type="application/dicom"."""
    return await _store(request, settings, study_uid=None)


@router.post("/studies/{study}")
async def store_study_instances(study: str, request: Request, settings: SettingsDep) -> Response:
    """Store Instances of one study: a part of another study fails with 0xA900."""
    if not is_uid(study):
        raise BadRequestError(f"not a Study Instance UID: {study[:80]!r}")
    return await _store(request, settings, study_uid=study)


async def _store(request: Request, settings: Settings, study_uid: str | None) -> Response:
    headers = request.headers
    check_accept(headers.get("accept"))
    boundary = stow_boundary(headers.get("content-type"))
    length = check_content_length(headers.get("content-length"), settings.stow_max_bytes)
    reserve = settings.free_space_reserve_bytes
    # Before anything is written: the body, spooled, must leave the reserve free.
    _require_space(_existing(settings.landing_dir), length or 0, reserve)
    client = request.client
    stow = StowRequest(
        LandingZone(settings.landing_dir),
        boundary,
        settings.stow_max_bytes,
        max_parts=settings.stow_max_parts,
        reserve_bytes=reserve,
        max_instance_bytes=settings.max_instance_bytes,
        study_uid=study_uid,
        peer=f"{client.host}:{client.port}" if client else "",
    )
    try:
        await run_in_threadpool(stow.open)
    except OSError as exc:
        log.error("STOW-RS cannot open a landing batch: %s", exc)
        if is_disk_full(exc):
            raise InsufficientStorageError("the archive's disk is full") from exc
        raise DicomWebError("the archive cannot accept instances now", status=503) from exc
    try:
        pending = bytearray()
        async for chunk in request.stream():
            pending += chunk
            if len(pending) >= _FEED_BYTES:
                await run_in_threadpool(stow.feed, bytes(pending))
                pending.clear()
        if pending:
            await run_in_threadpool(stow.feed, bytes(pending))
        outcomes = await run_in_threadpool(stow.finish)
    except InsufficientSpaceError as exc:
        log.warning("STOW-RS from %s refused: free-space reserve reached", stow.peer)
        raise InsufficientStorageError(str(exc)) from exc
    finally:
        with anyio.CancelScope(shield=True):  # a client that hangs up still gets cleaned
            await run_in_threadpool(stow.close)
    status = response_status(outcomes)
    stored = [o for o in outcomes if o.stored]
    request.state.audit_instances = len(stored)
    request.state.audit_studies = sorted(
        {o.study_instance_uid for o in stored if o.study_instance_uid}
    )
    log.info(
        "STOW-RS from %s: %d stored, %d failed (batch %s)",
        stow.peer,
        sum(o.stored for o in outcomes),
        sum(not o.stored for o in outcomes),
        stow.batch_id,
    )
    body = response_body(outcomes, _service_root(request), study_uid)
    unlisted = unlisted_failures(outcomes)
    warning = (
        {"Warning": f'299 vannah "{unlisted} more failed parts without a SOP Instance UID"'}
        if unlisted
        else None
    )
    return Response(json.dumps(body), status_code=status, media_type=DICOM_JSON, headers=warning)


def _existing(path: Path) -> Path:
    """`path`, or its nearest existing parent (the landing folder may not exist yet)."""
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _require_space(path: Path, needed: int, reserve: int) -> None:
    try:
        require_free_space(path, needed, reserve)
    except InsufficientSpaceError as exc:
        log.warning("STOW-RS refused: free-space reserve (%d bytes to write)", needed)
        raise InsufficientStorageError(str(exc)) from exc


def _service_root(request: Request) -> str:
    """The URL the /studies resources hang from (``.../dicom-web``), as the client sees it."""
    path = request.url.path
    root = path[: path.rfind("/studies")]
    return f"{request.url.scheme}://{request.url.netloc}{root}"
