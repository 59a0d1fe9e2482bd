"""Resources: thin adapters that turn ``VANNAH_*`` settings into the pure layer's objects."""

from pathlib import Path

import dagster as dg

from vannah_pipelines.catalog.ingest import IngestPaths
from vannah_pipelines.landing.layout import LandingZone
from vannah_pipelines.settings import Settings, load_settings


class ArchiveResource(dg.ConfigurableResource):  # type: ignore[type-arg]
    """The archive's data folder; everything else is derived by :class:`Settings`."""

    data_dir: str

    def settings(self) -> Settings:
        return load_settings(data_dir=Path(self.data_dir))

    def landing(self) -> LandingZone:
        return LandingZone(self.settings().landing_dir)

    def ingest_paths(self) -> IngestPaths:
        s = self.settings()
        return IngestPaths(s.landing_dir, s.hot_dir, s.catalog_dir, s.quarantine_dir)


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(
        resources={"archive": ArchiveResource(data_dir=dg.EnvVar("VANNAH_DATA_DIR"))}
    )
