"""``GET /viewer/launch?studyUID=...[&scope=patient]``: mint a study-scoped token for a caller
who may read the study, and redirect (302) to the viewer with it."""

from __future__ import annotations

import logging
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import RedirectResponse

from dicomweb.auth import PrincipalDep, require_study
from dicomweb.deps import CatalogDep, SettingsDep
from dicomweb.errors import BadRequestError, NotFoundError
from vannah_pipelines.catalog.lookup import study_patients
from vannah_pipelines.dicom.uids import is_uid
from vannah_pipelines.security.principal import Scope
from vannah_pipelines.security.tokens import launch_url, mint_scoped_token

log = logging.getLogger(__name__)

router = APIRouter(tags=["viewer"])


@router.get("/viewer/launch", summary="Open the viewer on a study with a scoped token")
def launch_viewer(
    request: Request,
    principal: PrincipalDep,
    catalog: CatalogDep,
    settings: SettingsDep,
    study_uid: Annotated[str | None, Query(alias="studyUID")] = None,
    scope: Annotated[Literal["study", "patient"], Query()] = "study",
) -> RedirectResponse:
    """302 to ``viewer_launch_url`` with a read-only token for the study (or, with
    ``scope=patient``, every study of its patient); 404 for a study the archive lacks."""
    if not study_uid or not is_uid(study_uid):
        raise BadRequestError("studyUID must be a Study Instance UID")
    patients = study_patients(catalog, [study_uid])
    if study_uid not in patients:
        raise NotFoundError(f"no study {study_uid}")
    patient_id = patients[study_uid]
    require_study(principal, study_uid, catalog)
    if scope == "patient":
        if not patient_id:
            raise BadRequestError("the study has no Patient ID: use scope=study")
        granted = Scope(patient_id=patient_id)
    else:
        granted = Scope(frozenset({study_uid}))
    token = mint_scoped_token(settings, principal.subject, granted)
    origin = f"{request.url.scheme}://{request.url.netloc}"
    log.info("viewer launch of study %s (%s scope) for %s", study_uid, scope, principal.subject)
    url = launch_url(settings, token, study_uid, patient_id, base=origin)
    return RedirectResponse(url, status_code=302, headers={"Cache-Control": "no-store"})
