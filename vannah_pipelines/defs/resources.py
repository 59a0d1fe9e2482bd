"""Resources: thin adapters that turn the process's settings into the pure layer's objects."""

import dagster as dg

from vannah_pipelines.catalog.ingest import IngestPaths
from vannah_pipelines.landing.layout import LandingZone
from vannah_pipelines.settings import Settings, load_settings


class ArchiveResource(dg.ConfigurableResource):  # type: ignore[type-arg]
    """The archive's folders, from the process's settings only (``VANNAH_CONFIG`` and
    ``VANNAH_*`` env, which is how ``--config`` reaches the daemon and its runs).

    It has no configurable field on purpose: run config (the UI launchpad) cannot point
    ingest at another folder.
    """

    def settings(self) -> Settings:
        return load_settings()

    def landing(self) -> LandingZone:
        return LandingZone(self.settings().landing_dir)

    def ingest_paths(self) -> IngestPaths:
        return IngestPaths.for_settings(self.settings())


# Bound to every job, sensor and schedule by vannah_pipelines/definitions.py.
RESOURCES = {"archive": ArchiveResource()}
