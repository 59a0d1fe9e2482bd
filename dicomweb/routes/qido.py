"""QIDO-RS (PS3.18 10.6): search studies, series and instances from the catalog alone."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from dicomweb.auth import principal_of, scoped_query
from dicomweb.deps import CatalogDep, SettingsDep
from dicomweb.errors import BadRequestError
from dicomweb.qido_params import InvalidQidoParameterError, parse_qido
from vannah_pipelines.catalog.query import InvalidQueryError, run_query_json
from vannah_pipelines.dicom.keys import Level
from vannah_pipelines.dicom.uids import is_uid

router = APIRouter(tags=["QIDO-RS"])


def _search(
    request: Request,
    catalog: CatalogDep,
    settings: SettingsDep,
    level: Level,
    study: str | None = None,
    series: str | None = None,
) -> Response:
    scope: dict[str, str] = {}
    for keyword, value in (("StudyInstanceUID", study), ("SeriesInstanceUID", series)):
        if value is not None:
            if not is_uid(value):
                raise BadRequestError(f"{keyword} in the path is not a valid UID")
            scope[keyword] = value
    try:
        spec, warnings = parse_qido(
            request.query_params.multi_items(),
            level,
            max_limit=settings.dicomweb_max_limit,
            max_offset=settings.dicomweb_max_offset,
            scope=scope,
        )
        spec = scoped_query(spec, principal_of(request))  # a scoped token sees its studies only
        base = str(request.base_url).rstrip("/") + "/dicom-web"
        result = run_query_json(catalog, spec, retrieve_base=base)
    except (InvalidQidoParameterError, InvalidQueryError) as exc:
        raise BadRequestError(str(exc)) from exc
    warnings.extend(result.warnings)
    if result.more:
        warnings.append("There are additional results that can be requested")
    headers = {"Warning": ", ".join(f'299 vannah "{w}"' for w in warnings)} if warnings else {}
    # An empty answer is 200 with [] (PS3.18 allows 204; 200 is what viewers handle best).
    return Response(result.body, media_type="application/dicom+json", headers=headers)


@router.get("/studies")
def search_for_studies(request: Request, catalog: CatalogDep, settings: SettingsDep) -> Response:
    """Search for studies."""
    return _search(request, catalog, settings, Level.STUDY)


@router.get("/series")
def search_for_series(request: Request, catalog: CatalogDep, settings: SettingsDep) -> Response:
    """Search for series of all studies."""
    return _search(request, catalog, settings, Level.SERIES)


@router.get("/studies/{study}/series")
def search_for_study_series(
    request: Request, study: str, catalog: CatalogDep, settings: SettingsDep
) -> Response:
    """Search for series of one study."""
    return _search(request, catalog, settings, Level.SERIES, study)


@router.get("/instances")
def search_for_instances(request: Request, catalog: CatalogDep, settings: SettingsDep) -> Response:
    """Search for instances of all studies."""
    return _search(request, catalog, settings, Level.IMAGE)


@router.get("/studies/{study}/instances")
def search_for_study_instances(
    request: Request, study: str, catalog: CatalogDep, settings: SettingsDep
) -> Response:
    """Search for instances of one study."""
    return _search(request, catalog, settings, Level.IMAGE, study)


@router.get("/studies/{study}/series/{series}/instances")
def search_for_series_instances(
    request: Request, study: str, series: str, catalog: CatalogDep, settings: SettingsDep
) -> Response:
    """Search for instances of one series."""
    return _search(request, catalog, settings, Level.IMAGE, study, series)
