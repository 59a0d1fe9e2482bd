"""STOW-RS routes (PS3.18 10.5): ``POST /studies`` and ``POST /studies/{study}``.

The body is streamed: chunks are handed to :class:`dicomweb.stow.StowRequest` in a worker
thread (spooling, validation, fsync and rename never block the event loop), so memory
stays bounded whatever the body size.
"""

from __future__ import annotations

import json
import logging

import anyio
from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from dicomweb.deps import SettingsDep
from dicomweb.errors import BadRequestError, DicomWebError
from dicomweb.stow import (
    DICOM_JSON,
    StowRequest,
    check_accept,
    check_content_length,
    response_body,
    response_status,
    stow_boundary,
)
from vannah_pipelines.dicom.uids import is_uid
from vannah_pipelines.landing.layout import LandingZone
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
    check_content_length(headers.get("content-length"), settings.stow_max_bytes)
    client = request.client
    stow = StowRequest(
        LandingZone(settings.landing_dir),
        boundary,
        settings.stow_max_bytes,
        study_uid=study_uid,
        peer=f"{client.host}:{client.port}" if client else "",
    )
    try:
        await run_in_threadpool(stow.open)
    except OSError as exc:
        log.error("STOW-RS cannot open a landing batch: %s", exc)
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
    finally:
        with anyio.CancelScope(shield=True):  # a client that hangs up still gets cleaned
            await run_in_threadpool(stow.close)
    status = response_status(outcomes)
    log.info(
        "STOW-RS from %s: %d stored, %d failed (batch %s)",
        stow.peer,
        sum(o.stored for o in outcomes),
        sum(not o.stored for o in outcomes),
        stow.batch_id,
    )
    body = response_body(outcomes, _service_root(request), study_uid)
    return Response(json.dumps(body), status_code=status, media_type=DICOM_JSON)


def _service_root(request: Request) -> str:
    """The URL the /studies resources hang from (``.../dicom-web``), as the client sees it."""
    path = request.url.path
    root = path[: path.rfind("/studies")]
    return f"{request.url.scheme}://{request.url.netloc}{root}"
