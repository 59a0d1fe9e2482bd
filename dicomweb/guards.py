"""ASGI guards in front of every route: the Host header check (DNS rebinding) and the
request body limit of every route but STOW-RS.

Both answer before the application sees the request: a refused Host is 400, a body over
``dicomweb_max_body_bytes`` is 413 (by Content-Length, or while a chunked body is counted),
each with a DICOM JSON reason.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dicomweb.errors import DicomWebError, PayloadTooLargeError

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


def host_name(value: str) -> str | None:
    """The host name of a Host header value, port and IPv6 brackets removed, lower-cased;
    None if it is malformed.

    >>> host_name("[::1]:8042"), host_name("LocalHost:80"), host_name("a.example")
    ('::1', 'localhost', 'a.example')
    >>> host_name("[::1"), host_name("a b")
    (None, None)
    """
    value = value.strip()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        name, rest = value[1:end], value[end + 1 :]
        if rest and not re.fullmatch(r":[0-9]{0,5}", rest):
            return None
    else:
        name, _, port = value.partition(":")
        if port and not port.isdigit():
            return None
    if not name or not re.fullmatch(r"[A-Za-z0-9._:%-]+", name):
        return None
    return name.lower()


def allowed_hosts(configured: Iterable[str], remote_access_allowed: bool) -> frozenset[str] | None:
    """The host names the service answers; None means any.

    Configured names are taken exactly (brackets of an IPv6 literal dropped); with none
    configured: loopback only, or any host when remote access is allowed.

    >>> sorted(allowed_hosts([], False) or [])
    ['127.0.0.1', '::1', 'localhost']
    >>> allowed_hosts([], True) is None, sorted(allowed_hosts(["PACS.example"], True) or [])
    (True, ['pacs.example'])
    """
    names = frozenset(n.strip().strip("[]").lower() for n in configured if n.strip())
    if names:
        return names
    return None if remote_access_allowed else LOOPBACK_HOSTS


async def _answer(send: Send, error: DicomWebError) -> None:
    body = json.dumps(error.body()).encode("utf-8")
    await send(
        {
            "type": "http.response.start",
            "status": error.status,
            "headers": [
                (b"content-type", b"application/dicom+json"),
                (b"content-length", str(len(body)).encode("ascii")),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


class TrustedHostGuard:
    """Refuse (400) a request whose Host header names a host not in `hosts` (None: any).

    A browser tricked by DNS rebinding sends the attacker's host name: refusing it keeps a
    web page from reaching a loopback-only service.
    """

    def __init__(self, app: ASGIApp, hosts: frozenset[str] | None) -> None:
        self.app = app
        self.hosts = hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.hosts is None:
            await self.app(scope, receive, send)
            return
        value = _header(scope, b"host")
        name = host_name(value) if value is not None else None
        if name is None or name not in self.hosts:
            await _answer(send, DicomWebError("this service does not answer for that Host"))
            return
        await self.app(scope, receive, send)


class _BodyTooLargeError(PayloadTooLargeError):
    """Raised from receive() once a body exceeds the limit (answered 413)."""


class BodyLimitGuard:
    """Refuse (413) a request body over `max_bytes`, unless `exempt(scope)` (STOW-RS, which
    has its own, larger limit and streams to disk)."""

    def __init__(self, app: ASGIApp, max_bytes: int, exempt: Callable[[Scope], bool]) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.exempt = exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.exempt(scope):
            await self.app(scope, receive, send)
            return
        length = _header(scope, b"content-length")
        if length is not None:
            if not length.strip().isdigit():
                await _answer(send, DicomWebError(f"invalid Content-Length: {length[:40]!r}"))
                return
            if int(length) > self.max_bytes:
                await _answer(send, self._error())
                return
        received = 0
        started = False

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._error()
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _BodyTooLargeError as exc:
            if started:
                raise
            await _answer(send, exc)

    def _error(self) -> _BodyTooLargeError:
        return _BodyTooLargeError(f"request body exceeds {self.max_bytes} bytes")
