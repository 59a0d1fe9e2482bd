"""What every connection passes before either DIMSE path serves it: the TLS handshake (on the
connection's own thread, within the ACSE timeout) and the admission decision on its
A-ASSOCIATE-RQ (``vannah_pipelines.security.peers``), answered with A-ASSOCIATE-RJ here.

When TLS is on or a peer rule is set, the A-ASSOCIATE-RQ is read (consumed) here rather than
peeked (a TLS socket cannot peek); pynetdicom then gets it back through
:class:`receiver.guarded_socket.GuardedSocket`'s replay buffer.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import time
from dataclasses import dataclass

from pynetdicom.pdu_primitives import A_ASSOCIATE, UserIdentityNegotiation

from receiver.contexts import STORAGE_SOP_CLASSES
from receiver.limits import Limits
from vannah_pipelines.dimse import pdu
from vannah_pipelines.security.audit import AuditEvent, AuditLog
from vannah_pipelines.security.peers import (
    Admission,
    AssociationRefusedError,
    AssociationRequest,
    PeerPolicy,
    UserIdentity,
)
from vannah_pipelines.settings import Settings

log = logging.getLogger(__name__)

SERVICE = "receiver"


def server_tls_context(settings: Settings) -> ssl.SSLContext:
    """The receiver's TLS context (Orthanc's ``DicomTls*`` keys): TLS 1.2 or later, our
    certificate chain and key; peers' certificates required and checked against
    ``DicomTlsTrustedCertificates`` when ``DicomTlsRemoteCertificateRequired``, else asked
    for and checked only if sent (``CERT_OPTIONAL``) or not asked for without a bundle."""
    assert settings.dicom_tls_certificate is not None
    assert settings.dicom_tls_private_key is not None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.dicom_tls_certificate, settings.dicom_tls_private_key)
    trusted = settings.dicom_tls_trusted_certificates
    if trusted is not None:
        context.load_verify_locations(cafile=trusted)
    if settings.dicom_tls_remote_certificate_required:
        context.verify_mode = ssl.CERT_REQUIRED
    elif trusted is not None:
        context.verify_mode = ssl.CERT_OPTIONAL
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


@dataclass(frozen=True)
class Request:
    """An A-ASSOCIATE-RQ read off the connection: its bytes (to replay) and, if it could be
    decoded, its primitive."""

    data: bytes
    primitive: A_ASSOCIATE | None


class Gate:
    """A worker's TLS and admission checks (one per worker, thread-safe)."""

    def __init__(
        self,
        settings: Settings,
        limits: Limits,
        *,
        acse_timeout: float,
        audit: AuditLog | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.policy = PeerPolicy(settings, STORAGE_SOP_CLASSES)
        self.limits = limits
        self.acse_timeout = acse_timeout
        self.audit = audit
        self.tls = tls
        self.called_ae = settings.dicom_aet
        self.handshakes_failed = 0
        self.refused = 0

    @classmethod
    def from_settings(
        cls, settings: Settings, limits: Limits, acse_timeout: float, audit: AuditLog | None
    ) -> Gate:
        tls = server_tls_context(settings) if settings.dicom_tls_enabled else None
        return cls(settings, limits, acse_timeout=acse_timeout, audit=audit, tls=tls)

    @property
    def reads_request(self) -> bool:
        """Whether the A-ASSOCIATE-RQ is read here (TLS, or a rule that can refuse)."""
        return self.tls is not None or self.policy.active

    # ------------------------------------------------------------------ TLS

    def handshake(self, sock: socket.socket, address: tuple[str, int]) -> ssl.SSLSocket | None:
        """Wrap `sock` in TLS and complete the handshake within the ACSE timeout; None (and
        the connection closed) if it fails or times out."""
        assert self.tls is not None
        started = time.monotonic()
        try:
            tls_sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        except (OSError, ValueError) as exc:
            pdu.close(sock)
            self._refused_event(address, "", "", f"TLS setup failed: {exc}")
            return None
        try:
            tls_sock.settimeout(self.acse_timeout)
            tls_sock.do_handshake()
            tls_sock.settimeout(None)
        except (OSError, ValueError) as exc:
            self.handshakes_failed += 1
            # A peer that closes before sending anything is a port probe (the platform's
            # own readiness check, a load balancer): INFO; anything else is a WARNING.
            quiet = isinstance(exc, ssl.SSLEOFError | ConnectionResetError)
            log.log(
                logging.INFO if quiet else logging.WARNING,
                "TLS handshake with %s failed after %.1f s: %s",
                address[0],
                time.monotonic() - started,
                exc,
            )
            pdu.close(tls_sock)
            self._refused_event(address, "", "", f"TLS handshake failed: {exc}")
            return None
        return tls_sock

    # ------------------------------------------------------------------ A-ASSOCIATE-RQ

    def read_request(self, sock: socket.socket) -> Request | None:
        """Read the first PDU (within the ACSE timeout); None if the connection closed or
        timed out first. A PDU that is not an A-ASSOCIATE-RQ, is too long or cannot be
        decoded comes back with ``primitive=None``."""
        try:
            sock.settimeout(self.acse_timeout)
            header = pdu.recv_exactly(sock, pdu.PDU_HEADER.size)
            pdu_type, length = pdu.PDU_HEADER.unpack(header)
            if pdu_type != pdu.A_ASSOCIATE_RQ or self.limits.pdu_too_long(pdu_type, length):
                return Request(header, None)
            data = header + pdu.recv_exactly(sock, length)
            sock.settimeout(None)
        except (OSError, ValueError):
            return None
        return Request(data, decode_request(data))

    def admit(
        self, sock: socket.socket, primitive: A_ASSOCIATE, address: tuple[str, int]
    ) -> Admission | None:
        """The admission of an A-ASSOCIATE-RQ (already read off `sock`), or None after
        answering A-ASSOCIATE-RJ and closing the connection."""
        request = association_request(primitive, address[0])
        try:
            return self.policy.admit(request)
        except AssociationRefusedError as refusal:
            self.refused += 1
            log.warning(
                "rejected an association from %s at %s: %s (A-ASSOCIATE-RJ %d/%d/%d)",
                request.calling_ae,
                address[0],
                refusal.detail,
                *refusal.rsd,
            )
            pdu.send_final(
                sock, pdu.associate_rj(*refusal.rsd), min(self.acse_timeout, pdu.ARTIM_SECONDS)
            )
            self._refused_event(
                address,
                request.calling_ae,
                request.called_ae,
                refusal.detail,
                status="A-ASSOCIATE-RJ {}/{}/{}".format(*refusal.rsd),
                subject=_claimed_user(request.user_identity),
            )
            return None

    def abort(self, sock: socket.socket) -> None:
        """Answer a first PDU that cannot be admitted (not a decodable A-ASSOCIATE-RQ)."""
        with contextlib.suppress(OSError):
            sock.sendall(pdu.abort(pdu.ABORT_SERVICE_PROVIDER, pdu.REASON_NOT_SPECIFIED))
        pdu.close(sock)

    def _refused_event(
        self,
        address: tuple[str, int],
        calling_ae: str,
        called_ae: str,
        detail: str,
        *,
        status: str = "",
        subject: str = "",
    ) -> None:
        if self.audit is None:
            return
        self.audit.record(
            AuditEvent(
                service=SERVICE,
                action="association",
                outcome="refused",
                subject=subject or calling_ae,
                address=f"{address[0]}:{address[1]}",
                calling_ae=calling_ae,
                called_ae=called_ae,
                status=status,
                detail=detail[:200],
            )
        )


def decode_request(data: bytes) -> A_ASSOCIATE | None:
    """An A-ASSOCIATE-RQ PDU's primitive; None if pynetdicom cannot decode it."""
    from pynetdicom import pdu as dul

    try:
        rq = dul.A_ASSOCIATE_RQ()
        rq.decode(data)
        return rq.to_primitive()
    except Exception:  # whatever a garbled PDU raises
        return None


def association_request(primitive: A_ASSOCIATE, peer_host: str) -> AssociationRequest:
    """What the admission decision reads of an A-ASSOCIATE-RQ primitive."""
    identity = None
    for item in primitive.user_information:
        if isinstance(item, UserIdentityNegotiation):
            identity = UserIdentity(
                int(item.user_identity_type or 0),
                bytes(item.primary_field or b""),
                bytes(item.secondary_field or b""),
                bool(item.positive_response_requested),
            )
    return AssociationRequest(
        calling_ae=str(primitive.calling_ae_title).strip(),
        called_ae=str(primitive.called_ae_title).strip(),
        peer_host=peer_host,
        abstract_syntaxes=frozenset(
            str(cx.abstract_syntax) for cx in primitive.presentation_context_definition_list
        ),
        user_identity=identity,
    )


def identity_response(admission: Admission | None) -> UserIdentityNegotiation | None:
    """The User Identity Negotiation AC sub-item the admission calls for, if any."""
    if admission is None or admission.identity_response is None:
        return None
    item = UserIdentityNegotiation()
    item.server_response = admission.identity_response
    return item


def _claimed_user(identity: UserIdentity | None) -> str:
    if identity is None or identity.identity_type not in (1, 2):
        return ""
    return identity.primary.decode("utf-8", "replace")[:64]
