"""Who may associate with the DIMSE receiver: known peers, called AE title and user identity.

One pure decision per A-ASSOCIATE-RQ (:meth:`PeerPolicy.admit`), taken before either DIMSE
path (the storage fast path or pynetdicom) answers it, so both enforce the same rules
(Orthanc's ``DicomCheckCalledAet``, ``DicomModalities``, ``DicomCheckModalityHost``,
``DicomAlwaysAllowStore``/``Echo``; user identity negotiation, PS3.7 D.3.3.7).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import IntEnum
from functools import lru_cache
from typing import TYPE_CHECKING

from vannah_pipelines.errors import AuthenticationError, VannahError
from vannah_pipelines.security.principal import ANONYMOUS, Principal, Role
from vannah_pipelines.settings import Settings

if TYPE_CHECKING:
    from vannah_pipelines.security.authn import Authenticator

log = logging.getLogger(__name__)

VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"
PEER_ROLES = frozenset({Role.READ, Role.WRITE})  # a peer listed in DicomModalities
STORE_ROLES = frozenset({Role.WRITE})  # an unknown peer admitted by DicomAlwaysAllowStore


class UserIdentityType(IntEnum):
    """PS3.7 D.3.3.7.1: User-Identity-Type."""

    USERNAME = 1
    USERNAME_AND_PASSCODE = 2
    KERBEROS = 3
    SAML = 4
    JWT = 5


class RejectResult(IntEnum):
    """PS3.8 9.3.4: A-ASSOCIATE-RJ Result."""

    PERMANENT = 1
    TRANSIENT = 2


class RejectSource(IntEnum):
    """PS3.8 9.3.4: A-ASSOCIATE-RJ Source."""

    SERVICE_USER = 1
    SERVICE_PROVIDER_ACSE = 2
    SERVICE_PROVIDER_PRESENTATION = 3


class RejectReason(IntEnum):
    """PS3.8 9.3.4: A-ASSOCIATE-RJ Reason/Diag. (service-user and ACSE values)."""

    NO_REASON_GIVEN = 1
    CALLING_AE_NOT_RECOGNIZED = 3
    CALLED_AE_NOT_RECOGNIZED = 7


class AssociationRefusedError(VannahError):
    """The association must be answered with A-ASSOCIATE-RJ (result, source, reason)."""

    def __init__(
        self, result: RejectResult, source: RejectSource, reason: RejectReason, detail: str
    ) -> None:
        super().__init__(detail)
        self.result = result
        self.source = source
        self.reason = reason
        self.detail = detail

    @property
    def rsd(self) -> tuple[int, int, int]:
        """``(result, source, reason)`` as the A-ASSOCIATE-RJ PDU carries them."""
        return int(self.result), int(self.source), int(self.reason)


@dataclass(frozen=True)
class UserIdentity:
    """A User Identity Negotiation sub-item of an A-ASSOCIATE-RQ (PS3.7 D.3.3.7.1)."""

    identity_type: int
    primary: bytes
    secondary: bytes = b""
    positive_response_requested: bool = False


@dataclass(frozen=True)
class AssociationRequest:
    """What the admission decision reads of an A-ASSOCIATE-RQ and its connection."""

    calling_ae: str
    called_ae: str
    peer_host: str
    abstract_syntaxes: frozenset[str]
    user_identity: UserIdentity | None = None


@dataclass(frozen=True)
class Admission:
    """An admitted association: who it acts as, and the user identity response to send.

    `identity_response` is None when no User Identity Negotiation AC sub-item is due (none
    requested, or authentication off); ``b""`` is an item with an empty server response
    (PS3.7 D.3.3.7.2: types 1 and 2).
    """

    principal: Principal
    identity_response: bytes | None = None

    @property
    def may_store(self) -> bool:
        return self.principal.has(Role.WRITE)


def _resolve(host: str) -> frozenset[str]:
    """The addresses `host` names (itself if it is an address; empty if unresolvable)."""
    try:
        return frozenset({str(ipaddress.ip_address(host))})
    except ValueError:
        pass
    return _resolve_name(host)


@lru_cache(maxsize=256)
def _resolve_name(host: str) -> frozenset[str]:
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return frozenset()
    return frozenset(str(info[4][0]) for info in infos)


def _same_host(configured: str, peer_host: str, resolve: Callable[[str], frozenset[str]]) -> bool:
    peer = peer_host.removeprefix("::ffff:")  # an IPv4 peer on a dual-stack socket
    return configured.strip().lower() == peer.lower() or peer in resolve(configured.strip())


class PeerPolicy:
    """The receiver's admission rules, built once per worker from the settings.

    Parameters
    ----------
    settings
        ``dicom_aet``, ``dicom_check_called_aet``, ``dicom_modalities``,
        ``dicom_check_modality_host``, ``dicom_always_allow_store``/``echo``,
        ``authentication_enabled``.
    storage_sop_classes
        The storage SOP class UIDs (what ``DicomAlwaysAllowStore`` admits).
    authenticator
        Checks user identities (types 2 and 5); built from `settings` if not given.
    resolve
        Host name -> addresses, for ``DicomCheckModalityHost`` with host names.
    """

    def __init__(
        self,
        settings: Settings,
        storage_sop_classes: Iterable[str],
        authenticator: Authenticator | None = None,
        resolve: Callable[[str], frozenset[str]] = _resolve,
    ) -> None:
        self.settings = settings
        self.storage_sop_classes = frozenset(storage_sop_classes)
        self._authenticator = authenticator
        self._resolve = resolve
        always: set[str] = set()
        if settings.dicom_always_allow_store:
            always |= self.storage_sop_classes
        if settings.dicom_always_allow_echo:
            always.add(VERIFICATION_SOP_CLASS)
        self.always_allowed = frozenset(always)

    @property
    def active(self) -> bool:
        """Whether any rule can refuse an association (else every one is admitted as today)."""
        s = self.settings
        return bool(s.dicom_check_called_aet or s.dicom_modalities or s.authentication_enabled)

    @property
    def authenticator(self) -> Authenticator:
        if self._authenticator is None:
            # Imported on first use: PyJWT and cryptography cost a storage-only worker memory.
            from vannah_pipelines.security.authn import Authenticator

            self._authenticator = Authenticator(self.settings)
        return self._authenticator

    def admit(self, request: AssociationRequest) -> Admission:
        """Decide whether to accept an A-ASSOCIATE-RQ, and as whom.

        In order: the called AE title (with ``DicomCheckCalledAet``); a user identity (with
        ``AuthenticationEnabled``: type 2 password or type 5 JWT must be valid, type 1 must
        name a registered user and is admitted like an association without identity);
        then a peer in ``DicomModalities`` (from its host with ``DicomCheckModalityHost``),
        or a proposal of only the SOP classes ``DicomAlwaysAllowStore``/``Echo`` allow.

        Returns
        -------
        Admission
            The principal the association acts as.

        Raises
        ------
        AssociationRefusedError
            Called AE title not ours: permanent, service-user, reason 7. Invalid user
            identity: transient, ACSE, reason 1 (no reason given; pynetdicom's answer).
            Unknown peer, or a known AE title from another host, proposing more than the
            always-allowed SOP classes: permanent, service-user, reason 3.

        >>> s = Settings(dicom_check_called_aet=True)
        >>> policy = PeerPolicy(s, ["1.2.840.10008.5.1.4.1.1.2"])
        >>> policy.admit(AssociationRequest("CT", "VANNAHCLOUD", "10.0.0.9",
        ...     frozenset({"1.2.840.10008.1.1"}))).principal.method
        'anonymous'
        >>> policy.admit(AssociationRequest("CT", "OTHER", "10.0.0.9", frozenset()))
        Traceback (most recent call last):
        ...
        vannah_pipelines.security.peers.AssociationRefusedError: called AE title 'OTHER' ...
        """
        s = self.settings
        if s.dicom_check_called_aet and request.called_ae.strip() != s.dicom_aet.strip():
            raise AssociationRefusedError(
                RejectResult.PERMANENT,
                RejectSource.SERVICE_USER,
                RejectReason.CALLED_AE_NOT_RECOGNIZED,
                f"called AE title {request.called_ae.strip()!r} is not ours",
            )
        identity = request.user_identity if s.authentication_enabled else None
        claimed = ""
        if identity is not None:
            principal, claimed = self._identity(identity)
            if principal is not None:
                response = b"" if identity.positive_response_requested else None
                return Admission(principal, response)
        known = self._known_peer(request)
        if known is not None:
            principal = Principal(claimed or request.calling_ae.strip(), PEER_ROLES, "dimse-peer")
            return Admission(principal, b"" if claimed and _asked(identity) else None)
        if not (s.dicom_modalities or s.authentication_enabled):
            return Admission(ANONYMOUS)
        if request.abstract_syntaxes and request.abstract_syntaxes <= self.always_allowed:
            stores = bool(request.abstract_syntaxes & self.storage_sop_classes)
            subject = claimed or request.calling_ae.strip()
            return Admission(
                Principal(subject, STORE_ROLES if stores else frozenset(), "anonymous"),
                b"" if claimed and _asked(identity) else None,
            )
        raise AssociationRefusedError(
            RejectResult.PERMANENT,
            RejectSource.SERVICE_USER,
            RejectReason.CALLING_AE_NOT_RECOGNIZED,
            f"calling AE title {request.calling_ae.strip()!r} from {request.peer_host} is not "
            "a known peer" + (" or has no valid user identity" if s.authentication_enabled else ""),
        )

    def _identity(self, identity: UserIdentity) -> tuple[Principal | None, str]:
        """A verified principal (types 2, 5), or (None, user name) for a type 1 naming a
        registered user; raises for anything else."""
        kind = identity.identity_type
        try:
            user = identity.primary.decode("utf-8")
            if kind == UserIdentityType.USERNAME_AND_PASSCODE:
                secret = identity.secondary.decode("utf-8")
                found = self.authenticator.from_password(user, secret)
                return Principal(found.subject, found.roles, "dimse-user"), found.subject
            if kind == UserIdentityType.JWT:
                found = self.authenticator.from_bearer(user.strip())
                return (
                    Principal(found.subject, found.roles, "dimse-jwt", found.scope, found.claims),
                    found.subject,
                )
            if kind == UserIdentityType.USERNAME and user in self.settings.registered_users:
                return None, user
            problem = f"user identity type {kind} is not accepted"
        except (AuthenticationError, UnicodeDecodeError) as exc:
            problem = f"user identity type {kind} refused: {exc}"
        raise AssociationRefusedError(
            RejectResult.TRANSIENT,
            RejectSource.SERVICE_PROVIDER_ACSE,
            RejectReason.NO_REASON_GIVEN,
            problem,
        )

    def _known_peer(self, request: AssociationRequest) -> str | None:
        """The DicomModalities name of the calling peer (its host checked if configured)."""
        calling = request.calling_ae.strip()
        for name, modality in self.settings.dicom_modalities.items():
            if modality.aet.strip() != calling:
                continue
            if not self.settings.dicom_check_modality_host or _same_host(
                modality.host, request.peer_host, self._resolve
            ):
                return name
        return None


def _asked(identity: UserIdentity | None) -> bool:
    return identity is not None and identity.positive_response_requested
