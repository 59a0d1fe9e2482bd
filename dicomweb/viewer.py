"""The built-in OHIF viewer at /viewer, on the DICOMweb service's own origin (no CORS).

Glue only: the files come from the cache ``vannah viewer fetch`` fills, and which file a
path names, the rewrites and the generated ``app-config.js`` are decided in
``vannah_pipelines.viewer.site``. The viewer's files are public (no patient data); the
DICOMweb requests OHIF makes carry the user's token (``?token=``) as a Bearer header.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, PlainTextResponse, RedirectResponse, Response

from vannah_pipelines.errors import UnsafeUidError
from vannah_pipelines.settings import Settings
from vannah_pipelines.viewer.fetch import OHIF_VERSION, dist_dir, is_fetched
from vannah_pipelines.viewer.site import (
    app_config,
    launch_target,
    media_type,
    needs_rewrite,
    resolve,
    rewrite,
)

log = logging.getLogger(__name__)

VIEWER_PREFIX = "/viewer"
DICOMWEB_PREFIX = "/dicom-web"
# The page holds the token in its URL until OHIF removes it: no Referer carries it away.
_PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}
_ASSET_HEADERS = {"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"}
NOT_FETCHED = (
    f"The built-in viewer (OHIF {OHIF_VERSION}) is enabled but not installed on this server.\n"
    "An administrator installs it with `vannah viewer fetch` (`make up` does it), which "
    "downloads the @ohif/app package from the npm registry into the viewer cache "
    "(viewer_cache_dir), or turns it off with VANNAH_VIEWER_ENABLED=false.\n"
)


class ViewerSite:
    """The dist folder and the rewritten copies of the few files that name ``/``.

    A rewritten file is kept in memory once made (the dist never changes: a new version is
    a new folder); a file found not to need one is remembered as such.
    """

    def __init__(self, dist: Path, base: str = VIEWER_PREFIX) -> None:
        self.dist = dist
        self.base = base
        self._rewritten: dict[Path, bytes | None] = {}
        self._lock = threading.Lock()

    def content(self, path: Path) -> bytes | None:
        """The rewritten content of `path`, or None when the file is served as it is."""
        if not needs_rewrite(path):
            return None
        with self._lock:
            if path in self._rewritten:
                return self._rewritten[path]
        original = path.read_bytes()
        content = rewrite(path, original, self.base)
        changed = None if content == original else content
        with self._lock:
            self._rewritten[path] = changed
        return changed


def _not_fetched() -> Response:
    return PlainTextResponse(NOT_FETCHED, status_code=503, headers={"Retry-After": "3600"})


def mount_viewer(app: FastAPI, settings: Settings) -> None:
    """Serve OHIF at /viewer when ``viewer_enabled`` (otherwise /viewer is a 404)."""
    if not settings.viewer_enabled:
        return
    site = ViewerSite(dist_dir(settings.viewer_cache_dir))
    if not is_fetched(settings.viewer_cache_dir):
        log.warning(
            "viewer enabled but not fetched (%s): /viewer answers 503 until "
            "`vannah viewer fetch` is run",
            site.dist,
        )
    router = APIRouter(include_in_schema=False)

    @router.api_route(VIEWER_PREFIX, methods=["GET", "HEAD"])
    @router.api_route(VIEWER_PREFIX + "/", methods=["GET", "HEAD"])
    def viewer_home(request: Request) -> Response:
        """The product's launch URL (``?studyUID=&token=``) or OHIF's study list."""
        try:
            target = launch_target(request.query_params.multi_items(), VIEWER_PREFIX)
        except UnsafeUidError as exc:
            return PlainTextResponse(f"{exc}\n", status_code=400)
        if target is not None:
            return RedirectResponse(target, status_code=302, headers=_PAGE_HEADERS)
        return _serve(site, "")

    @router.api_route(VIEWER_PREFIX + "/app-config.js", methods=["GET", "HEAD"])
    def viewer_config(request: Request) -> Response:
        """OHIF's configuration for the origin the browser used (same-origin DICOMweb)."""
        if not is_fetched(settings.viewer_cache_dir):
            return _not_fetched()
        origin = f"{request.url.scheme}://{request.url.netloc}"
        return Response(
            app_config(origin, VIEWER_PREFIX, DICOMWEB_PREFIX),
            media_type="text/javascript; charset=utf-8",
            headers={**_PAGE_HEADERS, "Cache-Control": "no-store", "Vary": "Host"},
        )

    @router.api_route(VIEWER_PREFIX + "/{path:path}", methods=["GET", "HEAD"])
    def viewer_file(path: str) -> Response:
        """A file of OHIF's dist, or index.html for OHIF's client routes."""
        return _serve(site, path)

    app.include_router(router)


def _serve(site: ViewerSite, relative: str) -> Response:
    if not (site.dist / "index.html").is_file():
        return _not_fetched()
    found = resolve(site.dist, relative)
    if found is None:
        return PlainTextResponse("Not Found\n", status_code=404)
    headers = _PAGE_HEADERS if found.path.suffix == ".html" else _ASSET_HEADERS
    kind = media_type(found.path)
    content = site.content(found.path)
    if content is not None:
        return Response(content, media_type=kind, headers=headers)
    return FileResponse(found.path, media_type=kind, headers=headers)
