"""The Authenticator against real signed tokens: HS256 secrets, RS256/ES256 keys from a PEM
file or a JWKS document served over HTTP on loopback, the platform's own launch tokens,
API keys and Basic passwords."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from vannah_pipelines.errors import AuthenticationError, ConfigError
from vannah_pipelines.security.authn import Authenticator
from vannah_pipelines.security.principal import Principal, Role, Scope
from vannah_pipelines.security.tokens import (
    launch_url,
    mint_scoped_token,
    parse_ttl,
    signing_key,
)
from vannah_pipelines.settings import Settings, load_settings

SECRET = "s" * 40
API_KEY = "k" * 24


def _settings(tmp_path: Path, **values: Any) -> Settings:
    base: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "authentication_enabled": True,
        "registered_users": {"alice": "wonderland", "rita": "reader"},
        "user_roles": {"rita": ["read"]},
        "api_keys": {"ai": {"key": API_KEY, "roles": ["read", "write"]}},
        "jwt_hs256_secret": SECRET,
    }
    base.update(values)
    return load_settings(**base)


def _claims(**extra: Any) -> dict[str, Any]:
    return {"sub": "bob", "roles": ["read"], "exp": int(time.time()) + 300, **extra}


class _Jwks(BaseHTTPRequestHandler):
    document: bytes = b"{}"
    hits = 0
    served: type[_Jwks] | None = None  # the handler class the jwks_url fixture serves with

    def do_GET(self) -> None:
        type(self).hits += 1
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.document)))
        self.end_headers()
        self.wfile.write(self.document)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    return {
        "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ec": ec.generate_private_key(ec.SECP256R1()),
        "other_rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
    }


@pytest.fixture
def jwks_url(keys: dict[str, Any]) -> Iterator[str]:
    """A JWKS document with the RSA and EC public keys, served over real HTTP."""
    entries = []
    for kid, alg in (("rsa", "RS256"), ("ec", "ES256")):
        jwk = json.loads(
            jwt.algorithms.get_default_algorithms()[alg].to_jwk(keys[kid].public_key())
        )
        entries.append({**jwk, "kid": kid, "alg": alg, "use": "sig"})
    handler = type("Jwks", (_Jwks,), {"document": json.dumps({"keys": entries}).encode()})
    _Jwks.served = handler
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/certs"
    server.shutdown()
    server.server_close()


def test_hs256_token_gives_its_roles(tmp_path: Path) -> None:
    auth = Authenticator(_settings(tmp_path))
    token = jwt.encode(_claims(roles=["write"]), SECRET, algorithm="HS256")
    principal = auth.from_http(f"Bearer {token}")
    assert (principal.subject, principal.method) == ("bob", "jwt")
    assert principal.has(Role.READ) and principal.has(Role.WRITE) and not principal.has(Role.ADMIN)
    assert principal.scope is None


@pytest.mark.parametrize(
    "claims, message",
    [
        ({"exp": int(time.time()) - 3600}, "expired"),
        ({"exp": None}, "exp"),
    ],
)
def test_expired_or_unbounded_tokens_are_refused(
    tmp_path: Path, claims: dict[str, Any], message: str
) -> None:
    auth = Authenticator(_settings(tmp_path))
    body = {k: v for k, v in _claims(**claims).items() if v is not None}
    token = jwt.encode(body, SECRET, algorithm="HS256")
    with pytest.raises(AuthenticationError, match=message):
        auth.from_bearer(token)


def test_tampered_and_wrongly_signed_tokens_are_refused(tmp_path: Path) -> None:
    auth = Authenticator(_settings(tmp_path))
    good = jwt.encode(_claims(), SECRET, algorithm="HS256")
    header, _payload, signature = good.split(".")
    forged_payload = base64.urlsafe_b64encode(json.dumps(_claims(roles=["admin"])).encode()).rstrip(
        b"="
    )
    with pytest.raises(AuthenticationError, match="Signature"):
        auth.from_bearer(f"{header}.{forged_payload.decode()}.{signature}")
    with pytest.raises(AuthenticationError, match="Signature"):
        auth.from_bearer(jwt.encode(_claims(), "x" * 40, algorithm="HS256"))
    unsigned = jwt.encode(_claims(), None, algorithm="none")  # type: ignore[arg-type]
    with pytest.raises(AuthenticationError, match="not accepted"):
        auth.from_bearer(unsigned)


def test_issuer_and_audience_are_checked_when_configured(tmp_path: Path) -> None:
    auth = Authenticator(_settings(tmp_path, jwt_issuer="https://kc/realms/r", jwt_audience="vhc"))
    ok = _claims(iss="https://kc/realms/r", aud="vhc")
    assert auth.from_bearer(jwt.encode(ok, SECRET, algorithm="HS256")).subject == "bob"
    for wrong in ({**ok, "iss": "https://evil"}, {**ok, "aud": "other"}, _claims()):
        with pytest.raises(AuthenticationError):
            auth.from_bearer(jwt.encode(wrong, SECRET, algorithm="HS256"))


@pytest.mark.parametrize("kid, alg", [("rsa", "RS256"), ("ec", "ES256")])
def test_asymmetric_tokens_verified_with_the_jwks_served_over_http(
    tmp_path: Path, keys: dict[str, Any], jwks_url: str, kid: str, alg: str
) -> None:
    auth = Authenticator(
        _settings(tmp_path, jwt_jwks_url=jwks_url, jwt_roles_claim="realm_access.roles")
    )
    claims = _claims(roles=None, realm_access={"roles": ["admin"]}, preferred_username="carol")
    token = jwt.encode(claims, keys[kid], algorithm=alg, headers={"kid": kid})
    principal = auth.from_bearer(token)
    assert principal.subject == "carol" and principal.has(Role.ADMIN)
    # Signed by a key the JWKS does not hold, under a kid it does: refused.
    forged = jwt.encode(claims, keys["other_rsa"], algorithm="RS256", headers={"kid": "rsa"})
    with pytest.raises(AuthenticationError):
        auth.from_bearer(forged)


def test_public_key_cannot_be_used_as_an_hs256_secret(tmp_path: Path, keys: dict[str, Any]) -> None:
    # The classic algorithm-confusion attack: sign HS256 with the public key's PEM text.
    pem = (
        keys["rsa"]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    (tmp_path / "pub.pem").write_bytes(pem)
    auth = Authenticator(
        _settings(tmp_path, jwt_hs256_secret=None, jwt_public_key_file=tmp_path / "pub.pem")
    )
    good = jwt.encode(_claims(), keys["rsa"], algorithm="RS256")
    assert auth.from_bearer(good).subject == "bob"
    import hashlib
    import hmac

    header = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=")
    payload = base64.urlsafe_b64encode(json.dumps(_claims(roles=["admin"])).encode()).rstrip(b"=")
    mac = hmac.new(pem, header + b"." + payload, hashlib.sha256).digest()
    forged = b".".join([header, payload, base64.urlsafe_b64encode(mac).rstrip(b"=")]).decode()
    with pytest.raises(AuthenticationError, match="not accepted"):
        auth.from_bearer(forged)


def test_api_keys_and_basic_passwords(tmp_path: Path) -> None:
    auth = Authenticator(_settings(tmp_path))
    service = auth.from_http(None, api_key=API_KEY)
    assert service.subject == "api-key:ai" and service.has(Role.WRITE)
    assert auth.from_http(f"Bearer {API_KEY}").subject == "api-key:ai"
    with pytest.raises(AuthenticationError, match="unknown API key"):
        auth.from_http(None, api_key="k" * 23 + "x")
    basic = base64.b64encode(b"alice:wonderland").decode()
    assert auth.from_http(f"Basic {basic}").has(Role.ADMIN)  # unlisted user: every role
    rita = base64.b64encode(b"rita:reader").decode()
    reader = auth.from_http(f"Basic {rita}")
    assert reader.has(Role.READ) and not reader.has(Role.WRITE)
    for bad in ("alice:nope", "mallory:wonderland", "no-colon"):
        with pytest.raises(AuthenticationError):
            auth.from_http("Basic " + base64.b64encode(bad.encode()).decode())
    with pytest.raises(AuthenticationError, match="credentials required") as missing:
        auth.from_http(None)
    assert missing.value.bearer_error == "invalid_request"
    with pytest.raises(AuthenticationError, match="unsupported"):
        auth.from_http("Digest abc")


def test_launch_token_reads_only_its_scope(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    token = mint_scoped_token(settings, "alice", Scope(frozenset({"1.2.3"})), ttl_seconds=60)
    principal = Authenticator(settings).from_bearer(token)
    assert principal.method == "launch-token" and principal.roles == frozenset({Role.READ})
    assert principal.can_read_study("1.2.3", "P1")
    assert not principal.can_read_study("1.2.4", "P1")
    patient = mint_scoped_token(settings, "alice", Scope(patient_id="P1"))
    by_patient = Authenticator(settings).from_bearer(patient)
    assert by_patient.can_read_study("9.9", "P1") and not by_patient.can_read_study("9.9", "P2")


def test_launch_token_expires_and_cannot_be_widened(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    auth = Authenticator(settings)
    old = mint_scoped_token(settings, "a", Scope(frozenset({"1.2"})), 60, now=time.time() - 3600)
    with pytest.raises(AuthenticationError, match="expired"):
        auth.from_bearer(old)
    # Re-signed with the external HS256 secret but claiming the platform's issuer: refused.
    claims = jwt.decode(
        mint_scoped_token(settings, "a", Scope(frozenset({"1.2"}))),
        options={"verify_signature": False},
    )
    claims["vannah_scope"] = {"studies": ["1.2", "6.6"]}
    with pytest.raises(AuthenticationError, match="Signature"):
        auth.from_bearer(jwt.encode(claims, SECRET, algorithm="HS256"))
    # Another platform's key (another data folder): refused.
    other = _settings(tmp_path / "other")
    with pytest.raises(AuthenticationError, match="Signature"):
        auth.from_bearer(mint_scoped_token(other, "a", Scope(frozenset({"1.2"}))))


def test_signing_key_is_created_once_private_and_shared(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "token-signing.key"
    first = signing_key(path)
    assert signing_key(path) == first and len(first) >= 32
    assert path.stat().st_mode & 0o077 == 0
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]
    path.write_text("short")
    with pytest.raises(ConfigError, match="fewer than 32"):
        signing_key(path)


def test_launch_url_fills_the_template(tmp_path: Path) -> None:
    settings = _settings(tmp_path, public_base_url="https://pacs.example/")
    url = launch_url(settings, "a.b+c", study_uid="1.2.3")
    assert url == "https://pacs.example/viewer?studyUID=1.2.3&token=a.b%2Bc"
    meddream = _settings(
        tmp_path, viewer_launch_url="https://md.example/?study={studyUID}&token={token}"
    )
    assert launch_url(meddream, "t", "1.2") == "https://md.example/?study=1.2&token=t"
    assert parse_ttl("15m") == 900


def test_anonymous_principal_reads_everything() -> None:
    from vannah_pipelines.security.principal import ANONYMOUS

    assert isinstance(ANONYMOUS, Principal) and ANONYMOUS.can_read_study("1", None)


def test_unknown_key_ids_cannot_make_every_request_fetch_the_jwks(
    tmp_path: Path, keys: dict[str, Any], jwks_url: str
) -> None:
    # A hostile client sending tokens with ever-new `kid`s must not turn each request into
    # an outbound fetch from the identity provider (amplification, worker threads blocked).
    auth = Authenticator(_settings(tmp_path, jwt_jwks_url=jwks_url))
    good = jwt.encode(_claims(), keys["rsa"], algorithm="RS256", headers={"kid": "rsa"})
    assert auth.from_bearer(good).subject == "bob"
    served = _Jwks.served
    assert served is not None
    before = served.hits
    for i in range(50):
        forged = jwt.encode(
            _claims(), keys["other_rsa"], algorithm="RS256", headers={"kid": f"k{i}"}
        )
        with pytest.raises(AuthenticationError, match="no JWKS key"):
            auth.from_bearer(forged)
    assert served.hits - before <= 1, served.hits - before
    assert auth.from_bearer(good).subject == "bob"
