"""FastAPI dependencies: the catalog (from the app's CatalogHolder) and the settings, injected
into routes."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from vannah_pipelines.catalog.reader import CatalogReader
from vannah_pipelines.settings import Settings


def get_catalog(request: Request) -> CatalogReader:
    return request.app.state.catalog.get()  # type: ignore[no-any-return]


def get_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


CatalogDep = Annotated[CatalogReader, Depends(get_catalog)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
