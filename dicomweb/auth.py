"""Who is calling, what they may do, and the audit row of every request.

:class:`AuthGuard` (ASGI middleware) resolves the caller's :class:`Principal` once per
request from ``Authorization`` (Bearer JWT or API key, Basic) or ``X-API-Key``, answers
401 with a ``WWW-Authenticate`` challenge when that fails, and appends one audit event per
request when the answer is sent. :func:`authorize` (a router dependency) checks the role a
route needs and the token's study scope (403). With authentication off every request's
principal is :data:`ANONYMOUS`, and everything is allowed as before.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import replace
from typing import Annotated
from urllib.parse import parse_qs

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dicomweb.errors import DicomWebError
from vannah_pipelines.catalog.lookup import study_patients
from vannah_pipelines.catalog.query import QuerySpec
from vannah_pipelines.catalog.reader import CatalogReader
from vannah_pipelines.errors import AuthenticationError, PermissionDeniedError
from vannah_pipelines.security.audit import AuditEvent, AuditLog
from vannah_pipelines.security.authn import Authenticator
from vannah_pipelines.security.principal import ANONYMOUS, Principal, Role

log = logging.getLogger(__name__)

REALM = "VannahHealthCloud"
PREFIX = "/dicom-web"
LAUNCH_PATH = "/viewer/launch"
WORKLIST_PREFIX = PREFIX + "/worklist"
WADO_URI_PATH = PREFIX + "/wado"
READ_METHODS = frozenset({"GET", "HEAD"})

# Searches (QIDO-RS): /studies, /series, /instances, each maybe under a study or series.
_SEARCH = re.compile(r"(/studies/[^/]+(/series/[^/]+)?)?/(studies|series|instances)/?")


def is_protected(path: str) -> bool:
    """Whether `path` needs credentials: the DICOMweb API (with its worklist and OpenAPI
    pages) and the viewer launch; the viewer's static files carry no patient data.

    >>> is_protected("/dicom-web/studies"), is_protected("/viewer/launch")
    (True, True)
    >>> is_protected("/viewer/index.html"), is_protected("/dicom-webx")
    (False, False)
    """
    return path in (PREFIX, LAUNCH_PATH) or path.startswith(PREFIX + "/")


def audit_action(method: str, path: str) -> str:
    """The audit action of a request (docs/security.md).

    >>> audit_action("GET", "/dicom-web/studies"), audit_action("GET", "/dicom-web/studies/1")
    ('query', 'retrieve')
    >>> audit_action("POST", "/dicom-web/studies"), audit_action("PUT", "/dicom-web/worklist/x")
    ('store', 'worklist-change')
    """
    if path == LAUNCH_PATH:
        return "launch"
    if path.startswith(WORKLIST_PREFIX):
        return "worklist-query" if method in READ_METHODS else "worklist-change"
    if method not in READ_METHODS:
        return "store"
    rest = path[len(PREFIX) :]
    if _SEARCH.fullmatch(rest) or not rest.startswith(("/studies", "/wado")):
        return "query"  # searches, and the OpenAPI pages
    return "retrieve"


def loggable_path(path: str) -> str:
    """`path` as logs and audit rows may show it: a worklist step id (which may be made of
    an accession number) is left out.

    >>> loggable_path("/dicom-web/worklist/items/ACC123"), loggable_path("/dicom-web/studies")
    ('/dicom-web/worklist/items/{step_id}', '/dicom-web/studies')
    """
    items = WORKLIST_PREFIX + "/items/"
    return items + "{step_id}" if path.startswith(items) else path


def challenge_headers(error: AuthenticationError, basic: bool) -> list[tuple[bytes, bytes]]:
    """RFC 6750 / RFC 7617 challenges of a 401."""
    code = re.sub(r"[^a-z_]", "", error.bearer_error) or "invalid_token"
    headers = [(b"www-authenticate", f'Bearer realm="{REALM}", error="{code}"'.encode())]
    if basic:
        headers.append((b"www-authenticate", f'Basic realm="{REALM}"'.encode()))
    return headers


def _outcome(status: int) -> str:
    if status in (401, 403):
        return "refused"
    if status == 202:
        return "partial"  # STOW-RS: some parts failed
    return "success" if status < 400 else "failure"


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


class AuthGuard:
    """Resolve the principal of every protected request (401 when there is none) and audit
    each request once its answer is sent.

    Parameters
    ----------
    app
        The application behind.
    authenticator
        Checks credentials; None when authentication is off (every caller is ANONYMOUS).
    audit
        Where the audit rows go.
    """

    def __init__(
        self, app: ASGIApp, authenticator: Authenticator | None, audit: AuditLog | None
    ) -> None:
        self.app = app
        self.authenticator = authenticator
        self.audit = audit
        settings = authenticator.settings if authenticator is not None else None
        self.basic = bool(settings and settings.registered_users)
        # A JWKS fetch is network I/O: then credentials are checked off the event loop.
        self.blocking = bool(settings and settings.jwt_jwks_url)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = str(scope.get("path", ""))
        if scope["type"] != "http" or scope.get("method") == "OPTIONS" or not is_protected(path):
            await self.app(scope, receive, send)  # CORS preflight, static files
            return
        started = time.perf_counter()
        state = scope.setdefault("state", {})
        try:
            principal = await self._principal(scope)
        except AuthenticationError as exc:
            nobody = Principal("", frozenset(), _scheme(scope))
            self._record(scope, nobody, 401, 0, started, str(exc), refused_login=True)
            await self._refuse(scope, send, exc)
            return
        state["principal"] = principal
        status = 500
        sent = 0
        recorded = False

        def record() -> None:
            nonlocal recorded
            if not recorded:
                recorded = True
                detail = str(state.get("audit_detail", ""))
                self._record(scope, principal, status, sent, started, detail)

        async def tracked_send(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
                if not message.get("more_body", False):
                    record()  # before the last byte: a client that got its answer finds the row
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        finally:
            record()

    async def _principal(self, scope: Scope) -> Principal:
        if self.authenticator is None:
            return ANONYMOUS
        authorization = _header(scope, b"authorization")
        api_key = _header(scope, b"x-api-key")
        if self.blocking:
            return await run_in_threadpool(self.authenticator.from_http, authorization, api_key)
        return self.authenticator.from_http(authorization, api_key)

    async def _refuse(self, scope: Scope, send: Send, exc: AuthenticationError) -> None:
        client = scope.get("client")
        log.info(
            "401 for %s %s from %s: %s",
            scope.get("method"),
            loggable_path(str(scope.get("path"))),
            client[0] if client else "?",
            exc,
        )
        body = json.dumps(DicomWebError(f"authentication required: {exc}").body()).encode()
        headers = [
            (b"content-type", b"application/dicom+json"),
            (b"content-length", str(len(body)).encode("ascii")),
            (b"cache-control", b"no-store"),
            *challenge_headers(exc, self.basic),
        ]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _record(
        self,
        scope: Scope,
        principal: Principal,
        status: int,
        sent: int,
        started: float,
        detail: str,
        refused_login: bool = False,
    ) -> None:
        if self.audit is None:
            return
        method, path = str(scope.get("method", "")), str(scope.get("path", ""))
        state = scope.get("state", {})
        if refused_login or status == 401:
            action = "login-refused"
        elif status == 403:
            action = "access-denied"
        else:
            action = audit_action(method, path)
        client = scope.get("client")
        event = AuditEvent(
            service="dicomweb",
            action=action,
            outcome=_outcome(status),
            address=client[0] if client else "",
            study_uids=_studies(scope, path),
            instances=state.get("audit_instances"),
            bytes=sent,
            status=str(status),
            detail=(detail or f"{method} {loggable_path(path)}")[:500],
            duration_ms=round((time.perf_counter() - started) * 1000, 3),
        ).by(principal)
        self.audit.record(event)


def _scheme(scope: Scope) -> str:
    """How a refused caller tried: ``api-key``, ``bearer``, ``basic`` (or "" for nothing)."""
    if _header(scope, b"x-api-key"):
        return "api-key"
    scheme = (_header(scope, b"authorization") or "").strip().partition(" ")[0].lower()
    return scheme[:20]


def _studies(scope: Scope, path: str) -> list[str]:
    state = scope.get("state", {})
    named: list[str] = list(state.get("audit_studies", ()))
    study = scope.get("path_params", {}).get("study")
    if study is None and path in (WADO_URI_PATH, LAUNCH_PATH):
        query = parse_qs(bytes(scope.get("query_string", b"")).decode("latin-1"))
        study = next(iter(query.get("studyUID", [])), None)
    if isinstance(study, str) and study not in named:
        named.insert(0, study[:64])
    return named


# ------------------------------------------------------------------------- in routes


def principal_of(request: Request) -> Principal:
    """The caller resolved by :class:`AuthGuard` (ANONYMOUS when authentication is off)."""
    principal = getattr(request.state, "principal", None)
    return principal if isinstance(principal, Principal) else ANONYMOUS


PrincipalDep = Annotated[Principal, Depends(principal_of)]


def require_role(principal: Principal, role: Role) -> None:
    """Raise PermissionDeniedError unless `principal` has `role` (or a higher one)."""
    if not principal.has(role):
        raise PermissionDeniedError(f"{principal.subject or 'caller'} lacks the {role} role")


def require_study(principal: Principal, study_uid: str, catalog: CatalogReader) -> None:
    """Raise PermissionDeniedError unless `principal` may read the study `study_uid`
    (a study outside a token's scope, known or not, is refused alike)."""
    require_role(principal, Role.READ)
    scope = principal.scope
    if scope is None or study_uid in scope.study_uids:
        return
    if scope.patient_id is not None:
        patients = study_patients(catalog, [study_uid])
        if study_uid in patients and scope.allows(study_uid, patients[study_uid]):
            return
    raise PermissionDeniedError(f"study {study_uid[:64]!r} is outside this token's scope")


def scoped_query(spec: QuerySpec, principal: Principal) -> QuerySpec:
    """`spec` limited to the studies `principal` may read (unchanged without a scope)."""
    scope = principal.scope
    if scope is None:
        return spec
    return replace(
        spec, within_studies=tuple(sorted(scope.study_uids)), within_patient=scope.patient_id
    )


def authorize(request: Request) -> None:
    """Router dependency: the role the route needs (read to read, write to change), and
    for a scoped token the study it names (403 otherwise)."""
    principal = principal_of(request)
    path = request.url.path
    writing = request.method not in READ_METHODS
    require_role(principal, Role.WRITE if writing else Role.READ)
    if principal.scope is None:
        return
    if writing:
        raise PermissionDeniedError("a study-scoped token may only read")
    if path.startswith(WORKLIST_PREFIX):
        raise PermissionDeniedError("a study-scoped token does not read the worklist")
    study = request.path_params.get("study")
    if study is None and path == WADO_URI_PATH:
        study = request.query_params.get("studyUID")
    if study is not None:
        require_study(principal, str(study), request.app.state.catalog.get())
