"""The platform's own study-scoped tokens: minted for a viewer launch, verified by every
service. HS256 with a secret kept in one file all processes share (created on first use)."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jwt

from vannah_pipelines.errors import ConfigError
from vannah_pipelines.security.principal import Role, Scope
from vannah_pipelines.settings import Settings

LAUNCH_ISSUER = "vannah-launch"
LAUNCH_AUDIENCE = "vannah"
SCOPE_CLAIM = "vannah_scope"
MAX_TTL_SECONDS = 7 * 86400  # the launch_token_ttl_seconds ceiling too


def signing_key(path: Path) -> bytes:
    """The secret in `path`, created (256 random bits, mode 0600) if missing.

    Creation is atomic (a temp file hard-linked into place), so processes starting together
    all read the same key.

    Raises
    ------
    ConfigError
        If the file cannot be read or created, or holds fewer than 32 bytes.
    """
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, secrets.token_hex(32).encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
            tmp.unlink()
        key = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"token signing key {path}: {exc}") from exc
    if len(key) < 32:
        raise ConfigError(f"token signing key {path}: fewer than 32 bytes")
    return key


_TTL = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([smhd]?)\s*")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_ttl(text: str) -> float:
    """A lifetime such as ``15m``, ``900``, ``2h`` or ``1d``, in seconds.

    >>> parse_ttl("15m"), parse_ttl("90"), parse_ttl("1.5h")
    (900.0, 90.0, 5400.0)
    >>> parse_ttl("30d")
    Traceback (most recent call last):
    ...
    ValueError: a launch token lives at most 7 days: '30d'
    >>> parse_ttl("soon")
    Traceback (most recent call last):
    ...
    ValueError: not a lifetime (use 900, 15m, 2h or 1d): 'soon'
    """
    match = _TTL.fullmatch(text)
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f"not a lifetime (use 900, 15m, 2h or 1d): {text!r}")
    seconds = float(match.group(1)) * _UNIT[match.group(2)]
    if seconds > MAX_TTL_SECONDS:
        raise ValueError(f"a launch token lives at most 7 days: {text!r}")
    return seconds


def mint_scoped_token(
    settings: Settings,
    subject: str,
    scope: Scope,
    ttl_seconds: float | None = None,
    now: float | None = None,
) -> str:
    """A read-only token for the studies of `scope`, valid `ttl_seconds` (default: the
    ``launch_token_ttl_seconds`` setting)."""
    if not scope.study_uids and scope.patient_id is None:
        raise ValueError("a scoped token needs at least one study or a patient")
    issued = time.time() if now is None else now
    ttl = settings.launch_token_ttl_seconds if ttl_seconds is None else ttl_seconds
    claims: dict[str, Any] = {
        "iss": LAUNCH_ISSUER,
        "aud": LAUNCH_AUDIENCE,
        "sub": subject,
        "iat": int(issued),
        "exp": int(issued + ttl),
        "jti": uuid.uuid4().hex,
        "roles": [Role.READ.value],
        SCOPE_CLAIM: scope.as_claim(),
    }
    return jwt.encode(claims, signing_key(settings.token_signing_key_path), algorithm="HS256")


def launch_url(
    settings: Settings, token: str, study_uid: str = "", patient_id: str = "", base: str = ""
) -> str:
    """The ``viewer_launch_url`` template filled in (values URL-quoted); a relative
    template is made absolute with `base` (default: the service's base URL)."""
    base = (base or settings.base_url).rstrip("/")
    url = settings.viewer_launch_url.format(
        studyUID=quote(study_uid, safe=""),
        patientID=quote(patient_id, safe=""),
        token=quote(token, safe=""),
        base=base,
    )
    return base + url if url.startswith("/") else url
