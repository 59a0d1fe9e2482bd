"""Turn a credential into a Principal: bearer JWTs (HS256, RS256, ES256; issuer, audience,
JWKS), the platform's launch tokens, static API keys, and Basic/DIMSE passwords.

Signature checks are PyJWT's (with `cryptography`); nothing here is hand-written crypto.
Each algorithm is only ever tried with its own kind of key, so a token cannot pick HS256
to be checked against a public key.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
from typing import Any

import jwt

from vannah_pipelines.errors import AuthenticationError
from vannah_pipelines.security.principal import Principal, Role, Scope, parse_roles
from vannah_pipelines.security.tokens import (
    LAUNCH_AUDIENCE,
    LAUNCH_ISSUER,
    SCOPE_CLAIM,
    signing_key,
)
from vannah_pipelines.settings import Settings

log = logging.getLogger(__name__)

ASYMMETRIC = ("RS256", "RS384", "RS512", "ES256", "ES384", "PS256")
JWKS_CACHE_SECONDS = 300


def _claim(claims: dict[str, Any], dotted: str) -> object:
    value: object = claims
    for part in dotted.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def scope_from_claim(value: object) -> Scope | None:
    """The Scope a token's ``vannah_scope`` claim names (None: the claim is absent).

    >>> scope_from_claim({"studies": ["1.2"]})
    Scope(study_uids=frozenset({'1.2'}), patient_id=None)
    >>> scope_from_claim({}) is None, scope_from_claim(None) is None
    (False, True)
    """
    if value is None:
        return None
    if not isinstance(value, dict):
        return Scope()  # malformed: a scope that allows nothing
    studies = value.get("studies") or []
    patient = value.get("patient_id")
    return Scope(
        study_uids=frozenset(str(s) for s in studies if isinstance(s, str)),
        patient_id=str(patient) if isinstance(patient, str) else None,
    )


class Authenticator:
    """Checks credentials against the settings; one per process, thread-safe."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._launch_key: bytes | None = None
        self._public_key: str | None = None
        if settings.jwt_public_key_file is not None:
            self._public_key = settings.jwt_public_key_file.read_text(encoding="ascii")
        self._jwks: jwt.PyJWKClient | None = None
        if settings.jwt_jwks_url:
            self._jwks = jwt.PyJWKClient(
                settings.jwt_jwks_url, cache_keys=True, lifespan=JWKS_CACHE_SECONDS, timeout=5
            )
        self._passwords = {
            user: secret.get_secret_value().encode()
            for user, secret in settings.registered_users.items()
        }
        self._keys = [
            (name, api.key.get_secret_value().encode(), parse_roles(list(api.roles)))
            for name, api in settings.api_keys.items()
        ]

    # -- what the HTTP boundary calls ---------------------------------------------------

    def from_http(self, authorization: str | None, api_key: str | None = None) -> Principal:
        """The principal of an HTTP request's ``Authorization`` (Bearer or Basic) or
        ``X-API-Key`` header.

        Raises
        ------
        AuthenticationError
            If there is no credential or it is not valid.
        """
        if api_key:
            return self.from_api_key(api_key)
        if not authorization:
            raise AuthenticationError("credentials required", bearer_error="invalid_request")
        scheme, _, value = authorization.strip().partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer" and value:
            return self.from_bearer(value)
        if scheme.lower() == "basic" and value:
            try:
                user, sep, password = base64.b64decode(value, validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                raise AuthenticationError("malformed Basic credentials") from None
            if not sep:
                raise AuthenticationError("malformed Basic credentials")
            return self.from_password(user, password)
        raise AuthenticationError(f"unsupported authorization scheme {scheme[:20]!r}")

    def from_api_key(self, key: str) -> Principal:
        given = key.strip().encode()
        for name, expected, roles in self._keys:
            if hmac.compare_digest(given, expected):
                return Principal(f"api-key:{name}", roles, "api-key")
        raise AuthenticationError("unknown API key")

    def from_password(self, user: str, password: str) -> Principal:
        """A registered user (Orthanc's ``RegisteredUsers``) and their roles."""
        expected = self._passwords.get(user)
        # Compare even for an unknown user, so timing does not tell which users exist.
        ok = hmac.compare_digest(password.encode(), expected or b"\0" * 32)
        if expected is None or not ok:
            raise AuthenticationError("unknown user or wrong password")
        configured = self.settings.user_roles.get(user)
        roles = parse_roles(list(configured)) if configured is not None else frozenset(Role)
        return Principal(user, roles, "basic")

    def from_bearer(self, token: str) -> Principal:
        """A JWT (the platform's launch token or one from the configured issuer), or an
        API key sent as a bearer."""
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            if self._keys:
                return self.from_api_key(token)
            raise AuthenticationError("malformed bearer token") from None
        if unverified.get("iss") == LAUNCH_ISSUER:
            return self._launch_token(token)
        return self._external_jwt(token, str(header.get("alg", "")))

    # -- token kinds ----------------------------------------------------------------------

    def _launch_token(self, token: str) -> Principal:
        if self._launch_key is None:
            self._launch_key = signing_key(self.settings.token_signing_key_path)
        claims = self._decode(
            token, self._launch_key, ["HS256"], issuer=LAUNCH_ISSUER, audience=LAUNCH_AUDIENCE
        )
        scope = scope_from_claim(claims.get(SCOPE_CLAIM))
        if scope is None:
            raise AuthenticationError("launch token without a scope")
        return Principal(
            str(claims.get("sub", "")),
            parse_roles(claims.get("roles")) & {Role.READ},
            "launch-token",
            scope=scope,
            claims=claims,
        )

    def _external_jwt(self, token: str, alg: str) -> Principal:
        settings = self.settings
        key: Any
        if alg == "HS256" and settings.jwt_hs256_secret is not None:
            key, algorithms = settings.jwt_hs256_secret.get_secret_value().encode(), ["HS256"]
        elif alg in ASYMMETRIC and self._jwks is not None:
            try:
                key = self._jwks.get_signing_key_from_jwt(token).key
            except jwt.PyJWKClientError as exc:
                raise AuthenticationError(f"no JWKS key for this token: {exc}") from None
            algorithms = list(ASYMMETRIC)
        elif alg in ASYMMETRIC and self._public_key is not None:
            key, algorithms = self._public_key, list(ASYMMETRIC)
        else:
            raise AuthenticationError(f"bearer tokens signed with {alg[:10]!r} are not accepted")
        claims = self._decode(
            token, key, algorithms, issuer=settings.jwt_issuer, audience=settings.jwt_audience
        )
        subject = str(claims.get("preferred_username") or claims.get("sub") or "")
        return Principal(
            subject,
            parse_roles(_claim(claims, settings.jwt_roles_claim)),
            "jwt",
            scope=scope_from_claim(claims.get(SCOPE_CLAIM)),
            claims=claims,
        )

    def _decode(
        self,
        token: str,
        key: Any,
        algorithms: list[str],
        issuer: str | None,
        audience: str | None,
    ) -> dict[str, Any]:
        options = {"require": ["exp"], "verify_aud": audience is not None}
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=algorithms,
                issuer=issuer,
                audience=audience,
                leeway=self.settings.jwt_leeway_seconds,
                options=options,  # type: ignore[arg-type]
            )
        except jwt.ExpiredSignatureError:
            raise AuthenticationError("token expired") from None
        except jwt.PyJWTError as exc:
            raise AuthenticationError(f"invalid token: {exc}") from None
        return claims
