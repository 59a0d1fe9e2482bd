"""The DIMSE admission decision: called AE, known peers, always-allowed SOP classes, user
identity (table-driven; no network)."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest

from vannah_pipelines.security.peers import (
    VERIFICATION_SOP_CLASS,
    AssociationRefusedError,
    AssociationRequest,
    PeerPolicy,
    UserIdentity,
)
from vannah_pipelines.security.principal import Role
from vannah_pipelines.settings import load_settings

CT = "1.2.840.10008.5.1.4.1.1.2"
FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STORAGE = [CT, "1.2.840.10008.5.1.4.1.1.4"]
SECRET = "s" * 32
MODALITIES = {"ct": {"AET": "CTSCAN", "Host": "10.0.0.5", "Port": 104}}
PERMANENT_CALLING = (1, 1, 3)
PERMANENT_CALLED = (1, 1, 7)
IDENTITY = (2, 2, 1)


def _token(sub: str = "alice", roles: list[str] | None = None, exp: float = 86400) -> bytes:
    # Made when the cases are collected: valid for a day, however long the suite runs.
    claims: dict[str, Any] = {"sub": sub, "roles": roles or ["read"], "exp": time.time() + exp}
    return jwt.encode(claims, SECRET, algorithm="HS256").encode()


def _policy(**overrides: Any) -> PeerPolicy:
    settings = load_settings(dicom_port=0, **overrides)
    return PeerPolicy(settings, STORAGE, resolve=lambda host: frozenset())


def _request(
    calling: str = "CTSCAN",
    called: str = "VANNAHCLOUD",
    host: str = "10.0.0.5",
    syntaxes: tuple[str, ...] = (CT,),
    identity: UserIdentity | None = None,
) -> AssociationRequest:
    return AssociationRequest(calling, called, host, frozenset(syntaxes), identity)


AUTH = {
    "authentication_enabled": True,
    "registered_users": {"alice": "wonderland1", "bob": "builder22"},
    "user_roles": {"bob": ["read"]},
    "jwt_hs256_secret": SECRET,
}

CASES: list[tuple[str, dict[str, Any], AssociationRequest, Any]] = [
    # name, settings, request, expected (subject, method) or the (result, source, reason)
    (
        "default admits anyone",
        {},
        _request("X", "ANY", syntaxes=(FIND,)),
        ("anonymous", "anonymous"),
    ),
    (
        "called AE checked",
        {"dicom_check_called_aet": True},
        _request(called="OTHER"),
        PERMANENT_CALLED,
    ),
    (
        "called AE ours",
        {"dicom_check_called_aet": True},
        _request(called="VANNAHCLOUD "),
        ("anonymous", "anonymous"),
    ),
    (
        "known peer queries",
        {"dicom_modalities": MODALITIES},
        _request(syntaxes=(FIND,)),
        ("CTSCAN", "dimse-peer"),
    ),
    (
        "unknown peer queries",
        {"dicom_modalities": MODALITIES},
        _request("X", syntaxes=(FIND,)),
        PERMANENT_CALLING,
    ),
    ("unknown peer stores", {"dicom_modalities": MODALITIES}, _request("X"), ("X", "anonymous")),
    (
        "unknown peer echoes",
        {"dicom_modalities": MODALITIES},
        _request("X", syntaxes=(VERIFICATION_SOP_CLASS,)),
        ("X", "anonymous"),
    ),
    (
        "unknown peer stores and echoes",
        {"dicom_modalities": MODALITIES},
        _request("X", syntaxes=(CT, VERIFICATION_SOP_CLASS)),
        ("X", "anonymous"),
    ),
    (
        "store not always allowed",
        {"dicom_modalities": MODALITIES, "dicom_always_allow_store": False},
        _request("X"),
        PERMANENT_CALLING,
    ),
    (
        "echo not always allowed",
        {"dicom_modalities": MODALITIES, "dicom_always_allow_echo": False},
        _request("X", syntaxes=(CT, VERIFICATION_SOP_CLASS)),
        PERMANENT_CALLING,
    ),
    (
        "store allowed, echo not",
        {"dicom_modalities": MODALITIES, "dicom_always_allow_echo": False},
        _request("X"),
        ("X", "anonymous"),
    ),
    (
        "known AE from its host",
        {"dicom_modalities": MODALITIES, "dicom_check_modality_host": True},
        _request(syntaxes=(FIND,)),
        ("CTSCAN", "dimse-peer"),
    ),
    (
        "known AE from another host",
        {"dicom_modalities": MODALITIES, "dicom_check_modality_host": True},
        _request(host="10.0.0.6", syntaxes=(FIND,)),
        PERMANENT_CALLING,
    ),
    (
        "known AE from another host stores",
        {"dicom_modalities": MODALITIES, "dicom_check_modality_host": True},
        _request(host="10.0.0.6"),
        ("CTSCAN", "anonymous"),
    ),
    (
        "host not checked",
        {"dicom_modalities": MODALITIES},
        _request(host="10.0.0.6", syntaxes=(FIND,)),
        ("CTSCAN", "dimse-peer"),
    ),
    ("auth: no identity, unknown, query", AUTH, _request("X", syntaxes=(FIND,)), PERMANENT_CALLING),
    ("auth: no identity, unknown, store", AUTH, _request("X"), ("X", "anonymous")),
    (
        "auth: no identity, known peer",
        {**AUTH, "dicom_modalities": MODALITIES},
        _request(syntaxes=(FIND,)),
        ("CTSCAN", "dimse-peer"),
    ),
    (
        "auth: password",
        AUTH,
        _request("X", syntaxes=(FIND,), identity=UserIdentity(2, b"alice", b"wonderland1")),
        ("alice", "dimse-user"),
    ),
    (
        "auth: wrong password",
        AUTH,
        _request("X", identity=UserIdentity(2, b"alice", b"nope")),
        IDENTITY,
    ),
    (
        "auth: unknown user",
        AUTH,
        _request("X", identity=UserIdentity(2, b"mallory", b"x")),
        IDENTITY,
    ),
    (
        "auth: jwt",
        AUTH,
        _request("X", syntaxes=(FIND,), identity=UserIdentity(5, _token())),
        ("alice", "dimse-jwt"),
    ),
    (
        "auth: expired jwt",
        AUTH,
        _request("X", identity=UserIdentity(5, _token(exp=-3600))),
        IDENTITY,
    ),
    ("auth: garbage jwt", AUTH, _request("X", identity=UserIdentity(5, b"not.a.jwt")), IDENTITY),
    ("auth: kerberos", AUTH, _request("X", identity=UserIdentity(3, b"ticket")), IDENTITY),
    (
        "auth: username only, registered, store",
        AUTH,
        _request("X", identity=UserIdentity(1, b"alice")),
        ("alice", "anonymous"),
    ),
    (
        "auth: username only, registered, query",
        AUTH,
        _request("X", syntaxes=(FIND,), identity=UserIdentity(1, b"alice")),
        PERMANENT_CALLING,
    ),
    (
        "auth: username only, unknown",
        AUTH,
        _request("X", identity=UserIdentity(1, b"mallory")),
        IDENTITY,
    ),
    (
        "auth off: identity ignored",
        {"dicom_modalities": MODALITIES},
        _request("X", identity=UserIdentity(2, b"a", b"b")),
        ("X", "anonymous"),
    ),
]


@pytest.mark.parametrize(
    ("settings", "request_", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_peer_policy_admit_decides(
    settings: dict[str, Any], request_: AssociationRequest, expected: Any
) -> None:
    policy = _policy(**settings)
    if isinstance(expected[0], int):
        with pytest.raises(AssociationRefusedError) as refused:
            policy.admit(request_)
        assert refused.value.rsd == expected
    else:
        admission = policy.admit(request_)
        assert (admission.principal.subject, admission.principal.method) == expected


def test_peer_policy_roles_follow_the_identity() -> None:
    policy = _policy(**AUTH)
    bob = policy.admit(_request("X", identity=UserIdentity(2, b"bob", b"builder22")))
    assert not bob.may_store and bob.principal.has(Role.READ)
    alice = policy.admit(_request("X", identity=UserIdentity(5, _token(roles=["write"]))))
    assert alice.may_store
    anonymous_store = policy.admit(_request("X"))
    assert anonymous_store.may_store


def test_peer_policy_answers_a_positive_response_when_asked() -> None:
    policy = _policy(**AUTH)
    asked = UserIdentity(2, b"alice", b"wonderland1", positive_response_requested=True)
    assert policy.admit(_request(identity=asked)).identity_response == b""
    not_asked = UserIdentity(2, b"alice", b"wonderland1")
    assert policy.admit(_request(identity=not_asked)).identity_response is None


def test_peer_policy_active_only_when_a_rule_is_set() -> None:
    assert not _policy().active
    assert _policy(dicom_check_called_aet=True).active
    assert _policy(dicom_modalities=MODALITIES).active
    assert _policy(**AUTH).active


def test_peer_policy_resolves_host_names() -> None:
    settings = load_settings(
        dicom_port=0,
        dicom_modalities={"ct": {"AET": "CTSCAN", "Host": "ct.example", "Port": 104}},
        dicom_check_modality_host=True,
    )
    policy = PeerPolicy(settings, STORAGE, resolve=lambda host: frozenset({"10.0.0.5"}))
    assert policy.admit(_request(syntaxes=(FIND,))).principal.method == "dimse-peer"
    with pytest.raises(AssociationRefusedError):
        policy.admit(_request(host="10.9.9.9", syntaxes=(FIND,)))
