"""Helpers of the restore tests: a catalog built by ingesting generated DICOM, a study moved
to the cold tier by hand (the lifecycle's job, written elsewhere), and a TCP proxy in front
of the cold tier's S3 server that can be taken down and brought back (an archive outage)."""

from __future__ import annotations

import contextlib
import socket
import threading
from pathlib import Path

from pydicom.uid import generate_uid

from tests.servers import free_port
from vannah_pipelines.catalog.changes import INSTANCE_LOCATIONS, append_change
from vannah_pipelines.catalog.compaction import ensure_catalog
from vannah_pipelines.catalog.ingest import IngestPaths, ingest_batches
from vannah_pipelines.catalog.lake import LakeConfig, append_change_file
from vannah_pipelines.catalog.lookup import StoredInstance, find_instances
from vannah_pipelines.catalog.writer import CatalogWriter
from vannah_pipelines.dicom.synthetic import make_instance, to_part10
from vannah_pipelines.landing.layout import LandingZone, ReceiveFacts
from vannah_pipelines.settings import Settings
from vannah_pipelines.storage.base import Tier
from vannah_pipelines.storage.lifecycle import open_catalog
from vannah_pipelines.storage.tiers import StorageTiers


def ingest_study(
    settings: Settings,
    *,
    patient_id: str = "VHC-RESTORE-1",
    study_date: str = "20240115",
    instances: int = 3,
    modality: str = "CT",
) -> tuple[str, dict[str, bytes]]:
    """Land and ingest one generated study; returns its UID and each SOP UID's bytes."""
    study_uid, series_uid = generate_uid(), generate_uid()
    batch = LandingZone(settings.landing_dir).open_batch("dimse")
    sent: dict[str, bytes] = {}
    for n in range(instances):
        ds = make_instance(
            modality,
            study_uid=study_uid,
            series_uid=series_uid,
            patient_id=patient_id,
            study_date=study_date,
            instance_number=n + 1,
            rows=16,
            columns=16,
            seed=n,
        )
        data = to_part10(ds)
        sent[str(ds.SOPInstanceUID)] = data
        batch.write_instance(
            data,
            ReceiveFacts(ds.SOPInstanceUID, ds.SOPClassUID, "1.2.840.10008.1.2.1", "dimse"),
        )
    sealed = batch.seal()
    assert sealed is not None
    ingest_batches(IngestPaths.for_settings(settings), [sealed.batch_id])
    ensure_catalog(settings.catalog_dir)
    return study_uid, sent


def study_instances(settings: Settings, study_uid: str) -> list[StoredInstance]:
    """The study's instances as a fresh catalog reader sees them now."""
    catalog = open_catalog(settings)
    try:
        return find_instances(catalog, study_uid)
    finally:
        catalog.close()


def move_to_cold(settings: Settings, study_uid: str) -> list[StoredInstance]:
    """Do what the lifecycle does, by hand: copy the study's objects to the cold tier
    (verified), record them cold with one append (to the lake too, if configured), delete
    the hot files."""
    tiers = StorageTiers(settings)
    found = study_instances(settings, study_uid)
    for i in found:
        with tiers.hot.open(i.storage_key) as stream:
            tiers[Tier.COLD].write(i.storage_key, stream, i.size_bytes, i.checksum)
    change = append_change(
        CatalogWriter(settings.catalog_dir),
        INSTANCE_LOCATIONS,
        [
            {
                "sop_instance_uid": i.sop_instance_uid,
                "checksum": i.checksum,
                "tier": Tier.COLD.value,
                "storage_key": i.storage_key,
            }
            for i in found
        ],
        changed_by="test:lifecycle",
    )
    lake = LakeConfig.from_settings(settings)
    if lake is not None:
        append_change_file(lake, change)
    for i in found:
        tiers.hot.delete(i.storage_key)
    return found


def tiers_of(settings: Settings, study_uid: str) -> list[str]:
    return sorted({i.tier for i in study_instances(settings, study_uid)})


def hot_bytes(settings: Settings, key: str) -> bytes:
    return (Path(settings.hot_dir) / key).read_bytes()


class TcpProxy:
    """127.0.0.1:`port` forwarded to `target`. :meth:`stop` closes the listener and every
    connection (the server is down: connections are refused), :meth:`start` listens again
    on the same port."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._sockets.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)
