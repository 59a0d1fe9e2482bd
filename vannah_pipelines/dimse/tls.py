"""Our TLS context as a DICOM TLS client (PS3.15 B.1): C-MOVE sub-operations, routing and
C-ECHO towards a ``UseDicomTls`` peer."""

from __future__ import annotations

import ssl

from vannah_pipelines.settings import Settings


def client_tls_context(settings: Settings) -> ssl.SSLContext:
    """Our TLS context towards a ``UseDicomTls`` peer (C-MOVE / C-STORE SCU): TLS 1.2 or
    later, our certificate and key presented, the peer's certificate checked against
    ``DicomTlsTrustedCertificates`` (the system's CAs if unset). Host names are not
    checked: DICOM peers are identified by certificate chain, and are often addressed by IP.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    if settings.dicom_tls_certificate is not None and settings.dicom_tls_private_key is not None:
        context.load_cert_chain(settings.dicom_tls_certificate, settings.dicom_tls_private_key)
    if settings.dicom_tls_trusted_certificates is not None:
        context.load_verify_locations(cafile=settings.dicom_tls_trusted_certificates)
    else:
        context.load_default_certs()
    return context
