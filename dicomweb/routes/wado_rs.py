"""WADO-RS (PS3.18 10.4): instances, metadata, frames, bulk data, rendered and thumbnails.

Glue only: validate the path, look the instances up in the catalog, negotiate with
dicomweb.media, stream with dicomweb.multipart, draw with dicomweb.rendering.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Annotated, BinaryIO

import pydicom
from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import Response, StreamingResponse
from pydicom.dataset import Dataset

from dicomweb.deps import CatalogDep, SettingsDep, TiersDep
from dicomweb.errors import (
    BadRequestError,
    DicomWebError,
    NotAcceptableError,
    NotFoundError,
    ServiceUnavailableError,
)
from dicomweb.media import (
    DICOM,
    OCTET_STREAM,
    FrameChoice,
    InstanceChoice,
    choose_bulk,
    choose_frames,
    choose_instance,
    choose_metadata,
    choose_rendered,
    header_with_bulk_data_uris,
    parse_accept,
)
from dicomweb.multipart import (
    Part,
    chunked,
    content_type,
    encode_parts,
    new_boundary,
    read_chunks,
)
from dicomweb.rendering import (
    PIXEL_DATA_TAG,
    FrameError,
    RenderOptions,
    bulk_value,
    check_decode,
    check_frame_codestreams,
    check_frames,
    declared_frames,
    decoded_frame,
    frame_count,
    needs_decode,
    parse_bulk_path,
    parse_frame_list,
    parse_quality,
    parse_viewport,
    parse_window,
    render_frame,
    stored_frame,
    thumbnail_options,
)
from vannah_pipelines.catalog.lookup import StoredInstance, find_instances, iter_headers
from vannah_pipelines.dicom.pixel_limits import PixelError, is_encapsulated
from vannah_pipelines.dicom.transcoding import check_decompress, transcode
from vannah_pipelines.dicom.uids import require_uid
from vannah_pipelines.errors import (
    ArchivedError,
    StorageError,
    StorageUnavailableError,
    UnsafeUidError,
)
from vannah_pipelines.errors import NotFoundError as StorageNotFoundError
from vannah_pipelines.settings import Settings
from vannah_pipelines.storage.base import Tier
from vannah_pipelines.storage.tiers import ReadAhead, RestoreRequiredError, StorageTiers

log = logging.getLogger(__name__)

router = APIRouter(tags=["WADO-RS"])

AcceptHeader = Annotated[str | None, Header(alias="accept")]
STUDY = "/studies/{study}"
SERIES = STUDY + "/series/{series}"
INSTANCE = SERIES + "/instances/{instance}"


# ---------------------------------------------------------------- shared with WADO-URI


def check_uids(study: str, series: str | None = None, instance: str | None = None) -> None:
    """400 for any path UID that is not a PS3.5 UID (they never reach SQL or a path)."""
    try:
        require_uid(study, "StudyInstanceUID")
        if series is not None:
            require_uid(series, "SeriesInstanceUID")
        if instance is not None:
            require_uid(instance, "SOPInstanceUID")
    except UnsafeUidError as exc:
        raise BadRequestError(str(exc)) from exc


def lookup(
    catalog: CatalogDep, study: str, series: str | None = None, instance: str | None = None
) -> list[StoredInstance]:
    """The instances named (404 with the reason when there are none)."""
    check_uids(study, series, instance)
    found = find_instances(catalog, study, series, instance)
    if not found:
        if instance is not None:
            what = f"no instance {instance} in series {series} of study {study}"
        elif series is not None:
            what = f"no series {series} in study {study}"
        else:
            what = f"no study {study}"
        raise NotFoundError(what)
    return found


def open_stored(tiers: StorageTiers, instance: StoredInstance) -> BinaryIO:
    """The stored bytes of `instance` as a seekable stream, from whatever tier holds them
    (:meth:`StorageTiers.open_instance`); a storage failure becomes the answer the client
    gets: 503 with ``Retry-After`` for an archived instance (its restore is requested),
    503 for a tier that cannot be reached now, 500 for an object in no tier at all or one
    the store refuses."""
    sop = instance.sop_instance_uid
    try:
        return tiers.open_instance(instance)
    except RestoreRequiredError as exc:
        log.info("instance %s is archived: restore of study %s requested", sop, exc.study_uid)
        raise ServiceUnavailableError(
            f"instance {sop} is archived: {exc}; retry after {exc.retry_after_seconds} s",
            headers={"Retry-After": str(exc.retry_after_seconds)},
        ) from exc
    except ArchivedError as exc:
        raise ServiceUnavailableError(f"instance {sop} is archived: {exc}") from exc
    except StorageNotFoundError as exc:
        # Before the answer starts (a stream cannot change its status): with a shared
        # catalog (the DuckLake), the instance may be in another host's hot folder.
        log.error("catalogued object in no storage tier: %s", exc)
        raise DicomWebError(
            f"the stored object of instance {sop} is in no storage tier this service reads",
            status=500,
        ) from exc
    except StorageUnavailableError as exc:
        log.warning("instance %s unreadable: %s", sop, exc)
        which = f"the {instance.tier}" if instance.tier in (Tier.WARM, Tier.COLD) else "a"
        raise ServiceUnavailableError(
            f"instance {sop} cannot be read now: {which} storage tier is unavailable; "
            "try again later"
        ) from exc
    except StorageError as exc:  # refused by the store, or a location that makes no sense
        log.error("instance %s unreadable: %s", sop, exc)
        raise DicomWebError(
            f"the stored object of instance {sop} cannot be read", status=500
        ) from exc


def opener(
    tiers: StorageTiers, instance: StoredInstance, *, at_once: bool = False
) -> Callable[[], BinaryIO]:
    """How to open the stored bytes of `instance` (see :func:`open_stored`). With
    `at_once` they are opened now, so an instance that cannot be read is answered (503,
    500) before the response starts: the first call gets that stream, later ones open it
    again."""
    if not at_once:
        return lambda: open_stored(tiers, instance)
    first = [open_stored(tiers, instance)]

    def open_stream() -> BinaryIO:
        return first.pop() if first else open_stored(tiers, instance)

    return open_stream


def read_dataset(tiers: StorageTiers, instance: StoredInstance) -> Dataset:
    """The whole stored instance, parsed (one instance in memory)."""
    with open_stored(tiers, instance) as stream:
        return pydicom.dcmread(stream, force=True)


def instance_body(
    open_stream: Callable[[], BinaryIO],
    stored: str,
    choice: InstanceChoice,
    max_decoded_bytes: int,
) -> Iterator[bytes]:
    """The instance's bytes: the stored file in chunks, or transcoded."""
    if not choice.transcode(stored):
        yield from read_chunks(open_stream)
        return
    with open_stream() as stream:
        data = transcode(stream, choice.transfer_syntax_uid, max_decoded_bytes)
    yield from chunked(data)


def check_transcode(
    settings: Settings,
    instance: StoredInstance,
    open_stream: Callable[[], BinaryIO],
    *,
    whole: bool = True,
) -> None:
    """Before the answer starts: refuse (400) transcoding an instance whose pixel data
    would decode over ``dicomweb_max_decoded_bytes``, or promises more than it holds
    (nothing is decoded). `whole`: read the pixel data too, to check the frame count and
    codestreams; else (one of many instances) the header's budget only, the rest being
    checked again by :func:`~vannah_pipelines.dicom.transcoding.transcode` just before it
    decodes."""
    with open_stream() as stream:
        ds = pydicom.dcmread(stream, force=True, stop_before_pixels=not whole)
    try:
        if whole:
            check_decompress(ds, settings.dicomweb_max_decoded_bytes)
        elif "Rows" in ds:
            check_decode(ds, declared_frames(ds), settings.dicomweb_max_decoded_bytes)
    except PixelError as exc:
        raise pixel_error(instance, exc) from exc


def render_options(
    accept: str | None,
    accept_param: str | None,
    window: str | None,
    viewport: str | None,
    quality: str | None,
) -> RenderOptions:
    media_type = choose_rendered(parse_accept(accept_param or accept))
    if media_type is None:
        raise NotAcceptableError(
            "rendered images are image/jpeg, image/png or image/gif; "
            f"accepted: {accept_param or accept}"
        )
    try:
        return RenderOptions(
            media_type, parse_window(window), parse_viewport(viewport), parse_quality(quality)
        )
    except ValueError as exc:
        raise BadRequestError(str(exc)) from exc


def rendered_response(
    settings: Settings,
    tiers: StorageTiers,
    instance: StoredInstance,
    number: int,
    options: RenderOptions,
) -> Response:
    ds = read_dataset(tiers, instance)
    try:
        data = render_frame(ds, number, options, settings.dicomweb_max_decoded_bytes)
    except PixelError as exc:
        raise pixel_error(instance, exc) from exc
    return Response(content=data, media_type=options.media_type)


def pixel_error(instance: StoredInstance, exc: PixelError) -> DicomWebError:
    """A frame that does not exist: 404. Pixel data whose header the data does not back,
    or a decode over the budget: 400 (the request is refused, not the server failing; 413
    would tell the client to shrink a request body it did not send)."""
    status = 404 if isinstance(exc, FrameError) and "does not exist" in str(exc) else 400
    return DicomWebError(f"instance {instance.sop_instance_uid}: {exc}", status=status)


# ---------------------------------------------------------------- instances


def _retrieve(
    settings: Settings,
    tiers: StorageTiers,
    instances: list[StoredInstance],
    accept: str | None,
) -> Response:
    ranges = parse_accept(accept)
    single = len(instances) == 1
    choices: list[InstanceChoice] = []
    for instance in instances:
        choice = choose_instance(ranges, instance.transfer_syntax_uid, single_part_ok=single)
        if isinstance(choice, str):
            raise NotAcceptableError(f"instance {instance.sop_instance_uid}: {choice}")
        choices.append(choice)
    planned: list[tuple[StoredInstance, Callable[[], BinaryIO], InstanceChoice]] = []
    tried: set[str] = set()
    for instance, choice in zip(instances, choices, strict=True):
        # The first instance of each catalog tier is opened before the answer starts: an
        # archived study or a tier that is down is answered 503 then, not a broken stream.
        open_stream = opener(tiers, instance, at_once=instance.tier not in tried)
        tried.add(instance.tier)
        if choice.transcode(instance.transfer_syntax_uid):
            check_transcode(settings, instance, open_stream, whole=single)
        planned.append((instance, open_stream, choice))
    budget = settings.dicomweb_max_decoded_bytes
    if single and not planned[0][2].multipart:
        instance, open_stream, choice = planned[0]
        return StreamingResponse(
            instance_body(open_stream, instance.transfer_syntax_uid, choice, budget),
            media_type=f"{DICOM}; transfer-syntax={choice.transfer_syntax_uid}",
        )
    boundary = new_boundary()
    ahead: ReadAhead | None = None
    if any(tiers.is_remote(instance.tier) for instance, _, _ in planned):
        # Object storage: the next instances are fetched while this one is sent.
        ahead = ReadAhead([open_stream for _, open_stream, _ in planned])
        planned = [(i, ahead.opener(n), c) for n, (i, _, c) in enumerate(planned)]

    def parts() -> Iterator[Part]:
        try:
            for instance, open_stream, choice in planned:
                yield Part(
                    f"{DICOM}; transfer-syntax={choice.transfer_syntax_uid}",
                    instance_body(open_stream, instance.transfer_syntax_uid, choice, budget),
                )
        finally:
            if ahead is not None:
                ahead.close()

    return StreamingResponse(
        encode_parts(parts(), boundary), media_type=content_type(DICOM, boundary)
    )


@router.get(STUDY, summary="Retrieve a study")
def retrieve_study(
    study: str,
    catalog: CatalogDep,
    settings: SettingsDep,
    tiers: TiersDep,
    accept: AcceptHeader = None,
) -> Response:
    return _retrieve(settings, tiers, lookup(catalog, study), accept)


@router.get(SERIES, summary="Retrieve a series")
def retrieve_series(
    study: str,
    series: str,
    catalog: CatalogDep,
    settings: SettingsDep,
    tiers: TiersDep,
    accept: AcceptHeader = None,
) -> Response:
    return _retrieve(settings, tiers, lookup(catalog, study, series), accept)


@router.get(INSTANCE, summary="Retrieve an instance")
def retrieve_instance(
    study: str,
    series: str,
    instance: str,
    catalog: CatalogDep,
    settings: SettingsDep,
    tiers: TiersDep,
    accept: AcceptHeader = None,
) -> Response:
    return _retrieve(settings, tiers, lookup(catalog, study, series, instance), accept)


# ---------------------------------------------------------------- metadata


def _base_url(request: Request) -> str:
    """The service root as an absolute path (whatever prefix the app is mounted under)."""
    path = request.url.path
    return path[: path.index("/studies/")]


def _metadata(
    request: Request,
    catalog: CatalogDep,
    accept: str | None,
    study: str,
    series: str | None = None,
    instance: str | None = None,
) -> Response:
    media_type = choose_metadata(parse_accept(accept))
    if media_type is None:
        raise NotAcceptableError(f"metadata is application/dicom+json; accepted: {accept}")
    check_uids(study, series, instance)
    rows = iter_headers(catalog, study, series, instance)
    first = next(rows, None)
    if first is None:
        lookup(catalog, study, series, instance)  # raises the 404 with its reason
    assert first is not None
    base = _base_url(request)

    def body() -> Iterator[bytes]:
        # About 64 KB per chunk: one ASGI message per instance costs more than the JSON.
        chunk: list[str] = ["["]
        size = 1
        for n, (stored, header) in enumerate(_chain(first, rows)):
            url = (
                f"{base}/studies/{stored.study_instance_uid}/series/"
                f"{stored.series_instance_uid}/instances/{stored.sop_instance_uid}"
            )
            text = header_with_bulk_data_uris(header, url)
            chunk.append("," + text if n else text)
            size += len(text) + 1
            if size >= 65536:
                yield "".join(chunk).encode("utf-8")
                chunk, size = [], 0
        chunk.append("]")
        yield "".join(chunk).encode("utf-8")

    return StreamingResponse(body(), media_type=media_type)


def _chain(
    first: tuple[StoredInstance, str], rest: Iterator[tuple[StoredInstance, str]]
) -> Iterator[tuple[StoredInstance, str]]:
    yield first
    yield from rest


@router.get(STUDY + "/metadata", summary="Retrieve study metadata")
def study_metadata(
    request: Request, study: str, catalog: CatalogDep, accept: AcceptHeader = None
) -> Response:
    return _metadata(request, catalog, accept, study)


@router.get(SERIES + "/metadata", summary="Retrieve series metadata")
def series_metadata(
    request: Request, study: str, series: str, catalog: CatalogDep, accept: AcceptHeader = None
) -> Response:
    return _metadata(request, catalog, accept, study, series)


@router.get(INSTANCE + "/metadata", summary="Retrieve instance metadata")
def instance_metadata(
    request: Request,
    study: str,
    series: str,
    instance: str,
    catalog: CatalogDep,
    accept: AcceptHeader = None,
) -> Response:
    return _metadata(request, catalog, accept, study, series, instance)


# ---------------------------------------------------------------- frames and bulk data


def _frames_response(
    stored: StoredInstance,
    ds: Dataset,
    numbers: Sequence[int],
    accept: str | None,
    max_decoded_bytes: int,
) -> Response:
    choice = choose_frames(parse_accept(accept), stored.transfer_syntax_uid, len(numbers))
    if isinstance(choice, str):
        raise NotAcceptableError(f"instance {stored.sop_instance_uid}: {choice}")
    try:
        check_frames(ds, numbers)
        # Native 1-bit frames are unpacked even when asked as stored (stored_frame).
        if needs_decode(ds) and (choice.decode or not is_encapsulated(ds)):
            check_decode(ds, len(numbers), max_decoded_bytes)
            check_frame_codestreams(ds, numbers)
    except PixelError as exc:
        raise pixel_error(stored, exc) from exc

    def frame(number: int, how: FrameChoice) -> bytes:
        return decoded_frame(ds, number) if how.decode else stored_frame(ds, number)

    if not choice.multipart:
        return Response(content=frame(numbers[0], choice), media_type=choice.part_content_type)
    boundary = new_boundary()
    parts = (Part(choice.part_content_type, _lazy(frame, n, choice)) for n in numbers)
    return StreamingResponse(
        encode_parts(parts, boundary), media_type=content_type(choice.media_type, boundary)
    )


def _lazy(
    make: Callable[[int, FrameChoice], bytes], number: int, choice: FrameChoice
) -> Iterator[bytes]:
    yield make(number, choice)


@router.get(INSTANCE + "/frames/{frames}", summary="Retrieve frames")
def retrieve_frames(
    study: str,
    series: str,
    instance: str,
    frames: str,
    catalog: CatalogDep,
    settings: SettingsDep,
    tiers: TiersDep,
    accept: AcceptHeader = None,
) -> Response:
    try:
        numbers = parse_frame_list(frames, settings.dicomweb_max_frames)
    except FrameError as exc:
        raise BadRequestError(str(exc)) from exc
    stored = lookup(catalog, study, series, instance)[0]
    ds = read_dataset(tiers, stored)
    return _frames_response(stored, ds, numbers, accept, settings.dicomweb_max_decoded_bytes)


@router.get(INSTANCE + "/bulk/{path:path}", summary="Retrieve bulk data")
def retrieve_bulk_data(
    study: str,
    series: str,
    instance: str,
    path: str,
    catalog: CatalogDep,
    settings: SettingsDep,
    tiers: TiersDep,
    accept: AcceptHeader = None,
) -> Response:
    try:
        tags = parse_bulk_path(path)
    except ValueError as exc:
        raise BadRequestError(str(exc)) from exc
    stored = lookup(catalog, study, series, instance)[0]
    ds = read_dataset(tiers, stored)
    if tags == [PIXEL_DATA_TAG]:
        try:
            count = frame_count(ds)  # checked against the data: never a list of 2^31 frames
        except PixelError as exc:
            raise pixel_error(stored, exc) from exc
        return _frames_response(
            stored, ds, range(1, count + 1), accept, settings.dicomweb_max_decoded_bytes
        )
    multipart = choose_bulk(parse_accept(accept))
    if isinstance(multipart, str):
        raise NotAcceptableError(multipart)
    try:
        data = bulk_value(ds, tags)
    except KeyError as exc:
        raise NotFoundError(f"instance {instance}: {exc.args[0]}") from exc
    except ValueError as exc:
        raise BadRequestError(f"instance {instance}: {exc}") from exc
    if not multipart:
        return Response(content=data, media_type=OCTET_STREAM)
    boundary = new_boundary()
    return StreamingResponse(
        encode_parts([Part(OCTET_STREAM, [data])], boundary),
        media_type=content_type(OCTET_STREAM, boundary),
    )


# ---------------------------------------------------------------- rendered and thumbnails

WindowQuery = Annotated[str | None, Query(description="center,width[,function]")]
ViewportQuery = Annotated[str | None, Query(description="width,height")]
QualityQuery = Annotated[str | None, Query(description="JPEG quality 1..100")]
AcceptQuery = Annotated[str | None, Query(alias="accept", description="overrides Accept")]


def _render_dep(
    accept: AcceptHeader = None,
    window: WindowQuery = None,
    viewport: ViewportQuery = None,
    quality: QualityQuery = None,
    accept_param: AcceptQuery = None,
) -> RenderOptions:
    return render_options(accept, accept_param, window, viewport, quality)


def _thumbnail_dep(
    accept: AcceptHeader = None,
    viewport: ViewportQuery = None,
    accept_param: AcceptQuery = None,
) -> RenderOptions:
    return thumbnail_options(render_options(accept, accept_param, None, viewport, None))


# The query parameters of /rendered (window, viewport, quality, accept) and /thumbnail
# (viewport, accept), parsed once for every route.
RenderDep = Annotated[RenderOptions, Depends(_render_dep)]
ThumbnailDep = Annotated[RenderOptions, Depends(_thumbnail_dep)]


def _frame_number(frames: str) -> int:
    try:
        numbers = parse_frame_list(frames)
    except FrameError as exc:
        raise BadRequestError(str(exc)) from exc
    if len(numbers) != 1:
        raise BadRequestError("rendered frames are asked one at a time")
    return numbers[0]


def _middle(instances: list[StoredInstance]) -> StoredInstance:
    images = [i for i in instances if i.frames > 0]
    if not images:
        raise NotFoundError("no image instance to draw a thumbnail from")
    series_uid = images[0].series_instance_uid  # the first series with images
    images = [i for i in images if i.series_instance_uid == series_uid]
    return images[len(images) // 2]


@router.get(INSTANCE + "/rendered", summary="Retrieve a rendered instance (its first frame)")
def rendered_instance(
    study: str,
    series: str,
    instance: str,
    catalog: CatalogDep,
    settings: SettingsDep,
    tiers: TiersDep,
    options: RenderDep,
) -> Response:
    return rendered_response(
        settings, tiers, lookup(catalog, study, series, instance)[0], 1, options
    )


@router.get(INSTANCE + "/frames/{frames}/rendered", summary="Retrieve a rendered frame")
def rendered_frame(
    study: str,
    series: str,
    instance: str,
    frames: str,
    catalog: CatalogDep,
    settings: SettingsDep,
    tiers: TiersDep,
    options: RenderDep,
) -> Response:
    number = _frame_number(frames)
    stored = lookup(catalog, study, series, instance)[0]
    return rendered_response(settings, tiers, stored, number, options)


@router.get(INSTANCE + "/thumbnail", summary="Retrieve an instance thumbnail")
def instance_thumbnail(
    study: str,
    series: str,
    instance: str,
    catalog: CatalogDep,
    settings: SettingsDep,
    tiers: TiersDep,
    options: ThumbnailDep,
) -> Response:
    return rendered_response(
        settings, tiers, lookup(catalog, study, series, instance)[0], 1, options
    )


@router.get(INSTANCE + "/frames/{frames}/thumbnail", summary="Retrieve a frame thumbnail")
def frame_thumbnail(
    study: str,
    series: str,
    instance: str,
    frames: str,
    catalog: CatalogDep,
    settings: SettingsDep,
    tiers: TiersDep,
    options: ThumbnailDep,
) -> Response:
    number = _frame_number(frames)
    stored = lookup(catalog, study, series, instance)[0]
    return rendered_response(settings, tiers, stored, number, options)


@router.get(SERIES + "/thumbnail", summary="Retrieve a series thumbnail (its middle image)")
def series_thumbnail(
    study: str,
    series: str,
    catalog: CatalogDep,
    settings: SettingsDep,
    tiers: TiersDep,
    options: ThumbnailDep,
) -> Response:
    middle = _middle(lookup(catalog, study, series))
    return rendered_response(settings, tiers, middle, 1, options)


@router.get(STUDY + "/thumbnail", summary="Retrieve a study thumbnail (a middle image)")
def study_thumbnail(
    study: str,
    catalog: CatalogDep,
    settings: SettingsDep,
    tiers: TiersDep,
    options: ThumbnailDep,
) -> Response:
    middle = _middle(lookup(catalog, study))
    return rendered_response(settings, tiers, middle, 1, options)
