"""What the Q/R and worklist handlers read, each opened on first use (catalog, tiers, worklist)."""

from __future__ import annotations

import ssl
import threading
from typing import TYPE_CHECKING

from vannah_pipelines.dimse.tls import client_tls_context
from vannah_pipelines.settings import RemoteModality, Settings

if TYPE_CHECKING:
    from receiver.worklist import WorklistAnswers
    from vannah_pipelines.catalog.holder import CatalogHolder
    from vannah_pipelines.storage.tiers import StorageTiers
    from vannah_pipelines.worklist.store import WorklistStore


class Archive:
    """What the Q/R handlers read: the worker's catalog copy, its storage tiers, the
    worklist, known peers. Each is opened on first use, so a worker that only stores never
    loads the catalog stack (DuckDB, pyarrow) nor an object-storage client (minio, boto3)."""

    def __init__(self, settings: Settings) -> None:
        self.aet = settings.dicom_aet
        self.worklist_past_due_hours = settings.worklist_past_due_hours
        self._settings = settings
        self._lock = threading.Lock()
        self._catalog: CatalogHolder | None = None
        self._tiers: StorageTiers | None = None
        self._worklist: WorklistStore | None = None
        self._client_tls: ssl.SSLContext | None = None
        self._worklist_answers: WorklistAnswers | None = None

    @property
    def settings(self) -> Settings:
        return self._settings

    @property
    def catalog(self) -> CatalogHolder:
        with self._lock:
            if self._catalog is None:
                from vannah_pipelines.catalog.holder import CatalogHolder  # lazy: see the docstring

                settings = self._settings
                self._catalog = CatalogHolder.for_settings(
                    settings, settings.qr_catalog_refresh_seconds
                )
            return self._catalog

    @property
    def worklist(self) -> WorklistStore:
        with self._lock:
            if self._worklist is None:
                from vannah_pipelines.worklist.store import WorklistStore  # lazy

                self._worklist = WorklistStore(self._settings.catalog_dir / "worklist")
            return self._worklist

    @property
    def worklist_answers(self) -> WorklistAnswers:
        """The worker's remembered MWL answers (``receiver.worklist.WorklistAnswers``)."""
        with self._lock:
            if self._worklist_answers is None:
                from receiver.worklist import WorklistAnswers  # lazy, as the worklist

                self._worklist_answers = WorklistAnswers()
            return self._worklist_answers

    @property
    def tiers(self) -> StorageTiers:
        """The worker's one :class:`StorageTiers`: every C-GET / C-MOVE reads instance bytes
        through it (each tier's backend built on its first read)."""
        with self._lock:
            if self._tiers is None:
                from vannah_pipelines.storage.tiers import StorageTiers  # lazy, as the catalog

                self._tiers = StorageTiers(self._settings)
            return self._tiers

    def client_tls(self) -> ssl.SSLContext:
        """The TLS context of associations to ``UseDicomTls`` peers (built once)."""
        with self._lock:
            if self._client_tls is None:
                self._client_tls = client_tls_context(self._settings)
            return self._client_tls

    def destination(self, aet: str) -> RemoteModality | None:
        return self._settings.modality_by_aet(aet)

    def close(self) -> None:
        with self._lock:
            if self._catalog is not None:
                self._catalog.close()
