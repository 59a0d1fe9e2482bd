"""Routing's DICOM AE sender: a batch of instances C-STOREd over one association with
:func:`.outbound.send_instances`, each result as a routing :class:`Delivered`."""

from __future__ import annotations

import ssl
from collections.abc import Callable, Sequence

from vannah_pipelines.dimse.outbound import (
    DEFAULT_TIMEOUT,
    OutboundInstance,
    SendResult,
    send_instances,
)
from vannah_pipelines.dimse.peers import DicomPeer
from vannah_pipelines.routing.rules import Coercion, DicomDestination
from vannah_pipelines.routing.senders import Delivered, DestinationError, Outgoing, send_each
from vannah_pipelines.settings import Settings

OUT_OF_RESOURCES_MASK = 0xFF00
OUT_OF_RESOURCES = 0xA700  # PS3.4 B.2.3 Refused: Out of Resources (0xA7xx)


def delivered(result: SendResult, size: int) -> Delivered:
    """`result` as routing counts it: success and warnings (0x0000, 0xBxxx) delivered;
    not sent for a reason a retry may fix (peer down, association broken, stored copy
    unreadable) or refused 0xA7xx (out of resources) transient; other refusals and
    instances that cannot be sent at all permanent."""
    uid = result.sop_instance_uid
    if result.status is None:
        return Delivered(uid, False, result.reason, transient=not result.permanent)
    detail = f"C-STORE 0x{result.status:04X}" + (f" {result.reason}" if result.reason else "")
    if result.ok:
        return Delivered(uid, True, detail, bytes_sent=size)
    transient = result.status & OUT_OF_RESOURCES_MASK == OUT_OF_RESOURCES
    return Delivered(uid, False, detail, transient=transient)


class DicomSender:
    """C-STORE to a DICOM AE: each :meth:`send` is one association (instances in their
    stored transfer syntax when the peer takes it, else converted; see
    :mod:`.negotiation`). Give `tls` for a ``useDicomTls`` destination."""

    def __init__(
        self,
        destination: DicomDestination,
        *,
        calling_aet: str,
        coercion: Coercion | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        if destination.use_dicom_tls and tls is None:
            raise DestinationError(
                f"{destination.describe()} uses DICOM TLS: build it with dicom_senders(settings)"
            )
        self.peer = DicomPeer(destination.aet, destination.host, destination.port, tls)
        self.calling_aet = calling_aet
        self.coercion = coercion
        self.timeout = timeout

    def send(self, batch: Sequence[Outgoing]) -> list[Delivered]:
        return send_each(batch, self.coercion, self._deliver)

    def close(self) -> None:
        pass  # an association lasts one send

    def _deliver(self, ready: list[Outgoing]) -> list[Delivered]:
        instances = [
            OutboundInstance(o.sop_class_uid, o.sop_instance_uid, o.transfer_syntax_uid, o.open)
            for o in ready
        ]
        results = send_instances(
            self.peer, instances, calling_aet=self.calling_aet, timeout=self.timeout
        )
        return [delivered(r, o.size) for r, o in zip(results, ready, strict=True)]


def dicom_senders(settings: Settings) -> Callable[..., DicomSender]:
    """The ``dicom`` factory of :func:`vannah_pipelines.routing.senders.build_sender` with
    our client TLS context (:func:`.tls.client_tls_context`) for ``useDicomTls`` peers."""

    def make(destination: DicomDestination, **options: object) -> DicomSender:
        tls = None
        if destination.use_dicom_tls:
            from vannah_pipelines.dimse.tls import client_tls_context

            tls = client_tls_context(settings)
        return DicomSender(destination, tls=tls, **options)  # type: ignore[arg-type]

    return make
