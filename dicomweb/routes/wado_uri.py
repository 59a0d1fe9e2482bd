"""WADO-URI (PS3.18 9): ``GET /wado?requestType=WADO&studyUID=&seriesUID=&objectUID=``."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import Response, StreamingResponse

from dicomweb.deps import CatalogDep, SettingsDep, TiersDep
from dicomweb.errors import BadRequestError, NotAcceptableError
from dicomweb.media import DICOM, RENDERED_MEDIA_TYPES, InstanceChoice
from dicomweb.rendering import RenderOptions, Window
from dicomweb.routes.wado_rs import (
    check_transcode,
    instance_body,
    lookup,
    opener,
    rendered_response,
)
from vannah_pipelines.dicom.transcoding import transcode_reason

router = APIRouter(tags=["WADO-URI"])

_MAX_SIZE = 8192

Param = Annotated[str | None, Query()]


def _content_type(value: str | None, is_image: bool) -> str:
    """The first supported media type of the contentType list (PS3.18 9.1.2.1.4)."""
    if value is None or not value.strip():
        return "image/jpeg" if is_image else DICOM
    offered = [v.split(";")[0].strip().lower() for v in value.split(",")]
    for media_type in offered:
        if media_type == DICOM:
            return DICOM
        if media_type in RENDERED_MEDIA_TYPES and is_image:
            return media_type
        if media_type in ("*/*", "image/*") and is_image:
            return "image/jpeg"
    raise NotAcceptableError(
        f"contentType {value[:100]!r}: this object is sent as "
        + (
            "application/dicom, image/jpeg, image/png or image/gif"
            if is_image
            else "application/dicom"
        )
    )


def _int(name: str, value: str | None, low: int, high: int) -> int | None:
    if value is None or value == "":
        return None
    # ASCII digits, few of them (int() takes other scripts' digits, and 4300 of them).
    if not re.fullmatch(r"[0-9]{1,10}", value) or not low <= int(value) <= high:
        raise BadRequestError(f"{name} must be an integer in {low}..{high}")
    return int(value)


def _window(center: str | None, width: str | None) -> Window | None:
    if center is None and width is None:
        return None
    if center is None or width is None:
        raise BadRequestError("windowCenter and windowWidth go together")
    try:
        c, w = float(center), float(width)
    except ValueError as exc:
        raise BadRequestError("windowCenter and windowWidth are numbers") from exc
    if not w > 0:
        raise BadRequestError("windowWidth must be > 0")
    return Window(c, w)


@router.get("/wado", summary="WADO-URI retrieve")
def wado(
    catalog: CatalogDep,
    settings: SettingsDep,
    tiers: TiersDep,
    request_type: Annotated[str | None, Query(alias="requestType")] = None,
    study_uid: Annotated[str | None, Query(alias="studyUID")] = None,
    series_uid: Annotated[str | None, Query(alias="seriesUID")] = None,
    object_uid: Annotated[str | None, Query(alias="objectUID")] = None,
    content_type: Annotated[str | None, Query(alias="contentType")] = None,
    transfer_syntax: Annotated[str | None, Query(alias="transferSyntax")] = None,
    rows: Param = None,
    columns: Param = None,
    window_center: Annotated[str | None, Query(alias="windowCenter")] = None,
    window_width: Annotated[str | None, Query(alias="windowWidth")] = None,
    frame_number: Annotated[str | None, Query(alias="frameNumber")] = None,
    image_quality: Annotated[str | None, Query(alias="imageQuality")] = None,
) -> Response:
    if request_type != "WADO":
        raise BadRequestError(f"requestType must be WADO, not {str(request_type)[:40]!r}")
    if not (study_uid and series_uid and object_uid):
        raise BadRequestError("studyUID, seriesUID and objectUID are required")
    stored = lookup(catalog, study_uid, series_uid, object_uid)[0]
    media_type = _content_type(content_type, stored.frames > 0)
    if media_type == DICOM:
        target = transfer_syntax or stored.transfer_syntax_uid
        reason = transcode_reason(stored.transfer_syntax_uid, target)
        if reason is not None:
            raise NotAcceptableError(f"transferSyntax {target[:80]}: {reason}")
        choice = InstanceChoice(False, target)
        open_stream = opener(tiers, stored, at_once=True)
        if choice.transcode(stored.transfer_syntax_uid):
            check_transcode(settings, stored, open_stream)
        return StreamingResponse(
            instance_body(
                open_stream,
                stored.transfer_syntax_uid,
                choice,
                settings.dicomweb_max_decoded_bytes,
            ),
            media_type=DICOM,
        )
    height = _int("rows", rows, 1, _MAX_SIZE)
    width = _int("columns", columns, 1, _MAX_SIZE)
    viewport = (
        None if height is None and width is None else (width or _MAX_SIZE, height or _MAX_SIZE)
    )
    options = RenderOptions(
        media_type,
        _window(window_center, window_width),
        viewport,
        _int("imageQuality", image_quality, 1, 100) or 90,
    )
    number = _int("frameNumber", frame_number, 1, 1 << 30) or 1
    return rendered_response(settings, tiers, stored, number, options)
