"""The one holder of the catalog in a reading process (the DICOMweb service, a receiver worker).

Both services hold their catalog the same way: a :class:`CatalogReader` on the serving
database, its buffer pool held to `memory_limit_mb`, opened once (at start-up, or on the
first request that needs it) and brought up to date with new batch files at most every
`refresh_seconds`, so a burst of requests costs one refresh. With `landing_dir`, every
request also picks up instances landed since the last one (a few stat calls when none
were), so an instance answers the moment its store is acknowledged.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vannah_pipelines.catalog.lake import LakeConfig
    from vannah_pipelines.catalog.reader import CatalogReader
    from vannah_pipelines.settings import Settings


class CatalogHolder:
    """The process's catalog: opened on first use (or by :meth:`load`), refreshed at most
    every `refresh_seconds`.

    Thread-safe. The first load blocks every caller until it is done (there is nothing to
    answer from before). A later refresh is made by the first caller that finds it due;
    callers arriving while it runs answer from the copy as it stands (a refresh commits
    whole, so they see the previous state, never half of a batch). Importing this module
    does not import DuckDB: a process that never queries never loads the catalog stack.
    """

    def __init__(
        self,
        root: Path,
        refresh_seconds: float,
        *,
        memory_limit_mb: int = 256,
        landing_dir: Path | None = None,
        landed_max_instances: int = 0,
        landed_max_file_bytes: int = 64 * 1024**2,
        lake: LakeConfig | None = None,
    ) -> None:
        self.root = Path(root)
        self.refresh_seconds = refresh_seconds
        self.memory_limit_mb = memory_limit_mb
        self.landing_dir = landing_dir
        self.landed_max_instances = landed_max_instances
        self.landed_max_file_bytes = landed_max_file_bytes
        self.lake = lake
        self._lock = threading.Lock()
        self._reader: CatalogReader | None = None
        # When the reader was last brought up to date; None: on the next get().
        self._refreshed: float | None = None

    @classmethod
    def for_settings(cls, settings: Settings, refresh_seconds: float) -> CatalogHolder:
        """The holder a service makes from its settings (memory bound, landed overlay, and
        the DuckLake as the base when ``catalog_lake_*`` is set)."""
        lake = None
        if settings.catalog_lake_postgres is not None:  # lazy: see the module doc
            from vannah_pipelines.catalog.lake import LakeConfig

            lake = LakeConfig.from_settings(settings)
        return cls(
            settings.catalog_dir,
            refresh_seconds,
            memory_limit_mb=settings.catalog_memory_limit_mb,
            landing_dir=settings.landing_dir,
            landed_max_instances=settings.landed_overlay_max_instances,
            landed_max_file_bytes=settings.landed_overlay_max_file_bytes,
            lake=lake,
        )

    def load(self) -> CatalogReader:
        """Open the reader now if it is not open (start-up pays for it, not the first
        request); the next :meth:`get` still brings it up to date."""
        with self._lock:
            if self._reader is None:
                self._reader = self._open()
                self._refreshed = None
            return self._reader

    def get(self) -> CatalogReader:
        """The reader: loaded on first use, refreshed when the last refresh is older than
        `refresh_seconds` (by this caller, unless another is refreshing it already)."""
        reader = self._reader
        if reader is None:
            with self._lock:
                if self._reader is None:
                    self._reader = self._open()
                    self._refreshed = time.monotonic()
                return self._reader
        now = time.monotonic()
        last = self._refreshed
        if (last is None or now - last >= self.refresh_seconds) and self._lock.acquire(
            blocking=False
        ):
            try:
                if self._reader is reader:  # not closed meanwhile
                    reader.refresh()
                    self._refreshed = now
            finally:
                self._lock.release()
        else:
            reader.refresh_landed()
        return reader

    def close(self) -> None:
        """Close the reader; a later :meth:`get` opens it again."""
        with self._lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None
                self._refreshed = None

    def _open(self) -> CatalogReader:
        from vannah_pipelines.catalog.reader import CatalogReader  # lazy: see the module doc

        landed = None
        if self.landing_dir is not None and self.landed_max_instances > 0:
            from vannah_pipelines.catalog.landed import LandedIndex

            landed = LandedIndex(
                self.landing_dir, self.landed_max_instances, self.landed_max_file_bytes
            )
        return CatalogReader(
            self.root,
            memory_limit_mb=self.memory_limit_mb,
            landed=landed,
            lake=self.lake,
            deliveries=False,  # the services never read the delivery log (CatalogReader)
        )
