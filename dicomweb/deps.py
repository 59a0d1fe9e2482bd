"""FastAPI dependencies: the catalog (from the app's CatalogHolder), the storage tiers (the
app's one StorageTiers) and the settings, injected into routes."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from vannah_pipelines.catalog.reader import CatalogReader
from vannah_pipelines.settings import Settings
from vannah_pipelines.storage.tiers import StorageTiers


def get_catalog(request: Request) -> CatalogReader:
    return request.app.state.catalog.get()  # type: ignore[no-any-return]


def get_tiers(request: Request) -> StorageTiers:
    return request.app.state.tiers  # type: ignore[no-any-return]


def get_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


CatalogDep = Annotated[CatalogReader, Depends(get_catalog)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
TiersDep = Annotated[StorageTiers, Depends(get_tiers)]
