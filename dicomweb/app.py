"""The DICOMweb service (PS3.18) under /dicom-web: app factory, error mapping, routers."""

from __future__ import annotations

import logging
import re

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Scope

from dicomweb.auth import AuthGuard, authorize, loggable_path
from dicomweb.errors import DicomWebError
from dicomweb.guards import BodyLimitGuard, TrustedHostGuard, allowed_hosts
from dicomweb.routes import launch, qido, stow_rs, wado_rs, wado_uri, worklist
from dicomweb.viewer import mount_viewer
from vannah_pipelines.catalog.holder import CatalogHolder
from vannah_pipelines.errors import PermissionDeniedError
from vannah_pipelines.security.audit import AuditLog
from vannah_pipelines.security.authn import Authenticator
from vannah_pipelines.settings import Settings
from vannah_pipelines.storage.tiers import StorageTiers

log = logging.getLogger(__name__)

PREFIX = "/dicom-web"

# The STOW-RS routes (POST /studies, POST /studies/{study}) stream their body to disk under
# their own limit (stow_max_bytes); every other route is held to dicomweb_max_body_bytes.
_STOW_PATH = re.compile(re.escape(PREFIX) + r"/studies(/[^/]+)?/?")
# CORS: the methods the API has, and the request headers a viewer sends beyond the
# CORS-safelisted ones.
CORS_METHODS = ("GET", "POST", "PUT", "DELETE")
CORS_HEADERS = ("Accept", "Authorization", "X-API-Key", "Content-Type", "Range", "Cache-Control")
# A request brings the service's catalog up to date at most this often.
CATALOG_REFRESH_SECONDS = 0.5


def is_stow(scope: Scope) -> bool:
    """Whether an ASGI request scope is a STOW-RS request."""
    return scope.get("method") == "POST" and bool(_STOW_PATH.fullmatch(str(scope.get("path"))))


def _dicomweb_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DicomWebError)
    return JSONResponse(status_code=exc.status, content=exc.body(), headers=exc.headers)


def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    # Starlette's own 404/405 (no route matched) get a DICOM JSON reason like ours.
    assert isinstance(exc, StarletteHTTPException)
    body = DicomWebError(str(exc.detail), status=exc.status_code).body()
    return JSONResponse(
        status_code=exc.status_code, content=body, headers=getattr(exc, "headers", None)
    )


def _permission_denied(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, PermissionDeniedError)
    request.state.audit_detail = str(exc)
    log.info("403 for %s %s: %s", request.method, loggable_path(request.url.path), exc)
    body = DicomWebError(f"access denied: {exc}", status=403).body()
    return JSONResponse(status_code=403, content=body)


def create_app(settings: Settings) -> FastAPI:
    """Build the service for `settings` (no global state: tests build as many as they like)."""
    app = FastAPI(
        title="VannahHealthCloud DICOMweb",
        docs_url=f"{PREFIX}/docs",
        openapi_url=f"{PREFIX}/openapi.json",
    )
    app.state.settings = settings
    app.state.catalog = CatalogHolder.for_settings(settings, CATALOG_REFRESH_SECONDS)
    app.state.catalog.load()  # at start-up, not on the first request
    # Every read of an instance's bytes goes through this one object (each tier's backend
    # is built on first use: the S3 clients only if a warm or cold tier is configured).
    app.state.tiers = StorageTiers(settings)
    # Added innermost first: the Host check runs before CORS, CORS before the body limit.
    app.add_middleware(BodyLimitGuard, max_bytes=settings.dicomweb_max_body_bytes, exempt=is_stow)
    # Credentials are checked (401) after the Host check and CORS (so a browser can read
    # the 401), before anything else; every request is audited here.
    app.add_middleware(
        AuthGuard,
        authenticator=Authenticator(settings) if settings.authentication_enabled else None,
        audit=AuditLog(settings.audit_dir, "dicomweb"),
    )
    app.add_middleware(
        CORSMiddleware,
        allow_origins=list(settings.dicomweb_cors_origins),  # none until configured
        allow_methods=list(CORS_METHODS),
        allow_headers=list(CORS_HEADERS),
        expose_headers=[
            "Content-Type",
            "Content-Length",
            "Warning",
            "Location",
            "Content-Location",
            "WWW-Authenticate",
        ],
        max_age=600,
    )
    app.add_middleware(
        TrustedHostGuard,
        hosts=allowed_hosts(settings.dicomweb_allowed_hosts, settings.remote_access_allowed),
    )
    app.add_exception_handler(DicomWebError, _dicomweb_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(PermissionDeniedError, _permission_denied)
    for module in (qido, wado_rs, stow_rs, wado_uri, worklist):
        app.include_router(module.router, prefix=PREFIX, dependencies=[Depends(authorize)])
    app.include_router(launch.router)
    mount_viewer(app, settings)  # last: its /viewer/{path} catch-all must not shadow a route
    return app
