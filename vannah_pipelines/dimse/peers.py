"""Who we send to: a DICOM peer, and finding one by the name an operator gives (a
``DicomModalities`` key, the AE title of one, or ``AET@host:port``).

No pynetdicom here: the command line resolves peers before it loads the network stack.
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass

from vannah_pipelines.errors import VannahError
from vannah_pipelines.settings import RemoteModality, Settings

_ADDRESS = re.compile(r"(?P<aet>[^@]{1,16})@(?P<host>\[[^\]]+\]|[^:@]+):(?P<port>\d{1,5})")


class UnknownPeerError(VannahError):
    """A destination that is neither a known modality nor ``AET@host:port``."""


@dataclass(frozen=True)
class DicomPeer:
    """A DICOM application entity we connect to: AE title, host, port, and the TLS
    context to use (None: plain TCP), as for a ``UseDicomTls`` modality."""

    aet: str
    host: str
    port: int
    tls: ssl.SSLContext | None = None

    def __str__(self) -> str:
        return f"{self.aet}@{self.host}:{self.port}"


def parse_address(text: str) -> DicomPeer | None:
    """``AET@host:port`` as a peer (plain TCP), or None if `text` is not one.

    >>> str(parse_address("STORESCP@127.0.0.1:11112"))
    'STORESCP@127.0.0.1:11112'
    >>> parse_address("[::1]:104") is None, parse_address("PACS@host:70000") is None
    (True, True)
    """
    match = _ADDRESS.fullmatch(text.strip())
    if match is None:
        return None
    port = int(match["port"])
    if not 0 < port <= 65535:
        return None
    return DicomPeer(match["aet"].strip(), match["host"].strip("[]"), port)


def resolve_peer(settings: Settings, destination: str) -> DicomPeer:
    """The peer `destination` names: a key of ``dicom_modalities``, else the AE title of
    one of them, else the name or AE title of a DICOM destination of the routing rules in
    force, else ``AET@host:port``. A modality with ``use_dicom_tls`` gets our client
    TLS context (:func:`vannah_pipelines.dimse.tls.client_tls_context`).

    Raises
    ------
    UnknownPeerError
        If it is none of these.
    """
    modality = settings.dicom_modalities.get(destination) or settings.modality_by_aet(destination)
    if modality is not None:
        return peer_of(settings, modality)
    routed = _routing_destination(settings, destination)
    if routed is not None:
        return routed
    peer = parse_address(destination)
    if peer is None:
        known = ", ".join(sorted(settings.dicom_modalities)) or "none configured"
        raise UnknownPeerError(
            f"unknown destination {destination!r}: not a DicomModalities name or AE title "
            f"(known: {known}), nor AET@host:port"
        )
    return peer


def _routing_destination(settings: Settings, name: str) -> DicomPeer | None:
    """The DICOM destination of the routing rule called `name`, or with AE title `name`."""
    from vannah_pipelines.routing.rules import DicomDestination
    from vannah_pipelines.routing.source import RulesSource

    for rule in RulesSource.from_settings(settings).current().rules:
        dest = rule.destination
        if isinstance(dest, DicomDestination) and name in (rule.name, dest.aet.strip()):
            tls = None
            if dest.use_dicom_tls:
                from vannah_pipelines.dimse.tls import client_tls_context

                tls = client_tls_context(settings)
            return DicomPeer(dest.aet, dest.host, dest.port, tls)
    return None


def peer_of(settings: Settings, modality: RemoteModality) -> DicomPeer:
    """A configured modality as a peer (over TLS when it has ``use_dicom_tls``)."""
    tls = None
    if modality.use_dicom_tls:
        from vannah_pipelines.dimse.tls import client_tls_context

        tls = client_tls_context(settings)
    return DicomPeer(modality.aet, modality.host, modality.port, tls)
