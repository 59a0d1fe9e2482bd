"""Worklist REST API (JSON): create, list, read, replace and cancel scheduled procedure steps.

Mounted under /dicom-web: ``/dicom-web/worklist/items[/{step_id}]``. Bodies are validated by
:class:`StepIn`; any problem is a 400 whose ``errors`` list every reason.
"""

from __future__ import annotations

import json
import threading
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from vannah_pipelines.dicom.uids import is_uid
from vannah_pipelines.settings import Settings
from vannah_pipelines.worklist.errors import InvalidItemError, StepExistsError, StepNotFoundError
from vannah_pipelines.worklist.model import StepStatus, WorklistItem, item_from_fields
from vannah_pipelines.worklist.store import WorklistStore

router = APIRouter(prefix="/worklist", tags=["worklist"])
_store_lock = threading.Lock()

_DA = r"^[0-9]{8}$"
_TM = r"^[0-9]{2}([0-9]{2}([0-9]{2}(\.[0-9]{1,6})?)?)?$"
_SH = r"^[^\\\r\n]*$"
_PN = r"^[^\\\r\n]*$"


class StepIn(BaseModel):
    """A scheduled procedure step as the REST API takes it (snake_case DICOM keywords)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    step_id: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9._-]{1,16}$",
        description="ScheduledProcedureStepID; generated from the accession number if absent",
    )
    status: StepStatus = StepStatus.SCHEDULED
    patient_name: str = Field(min_length=1, max_length=320, pattern=_PN)
    patient_id: str = Field(min_length=1, max_length=64, pattern=_SH)
    patient_birth_date: str | None = Field(default=None, pattern=_DA)
    patient_sex: Literal["M", "F", "O"] | None = None
    accession_number: str | None = Field(default=None, max_length=16, pattern=_SH)
    referring_physician_name: str | None = Field(default=None, max_length=320, pattern=_PN)
    requesting_physician: str | None = Field(default=None, max_length=320, pattern=_PN)
    requested_procedure_id: str | None = Field(default=None, max_length=16, pattern=_SH)
    requested_procedure_description: str | None = Field(default=None, max_length=64)
    requested_procedure_priority: Literal["STAT", "HIGH", "ROUTINE", "MEDIUM", "LOW"] | None = None
    study_instance_uid: str | None = None
    study_description: str | None = Field(default=None, max_length=64)
    modality: str = Field(pattern=r"^[A-Z0-9_ ]{1,16}$")
    scheduled_station_ae_title: str | None = Field(default=None, max_length=16, pattern=_SH)
    scheduled_station_name: str | None = Field(default=None, max_length=16, pattern=_SH)
    scheduled_procedure_step_start_date: str = Field(pattern=_DA)
    scheduled_procedure_step_start_time: str | None = Field(default=None, pattern=_TM)
    scheduled_performing_physician_name: str | None = Field(default=None, max_length=320)
    scheduled_procedure_step_description: str | None = Field(default=None, max_length=64)
    scheduled_procedure_step_location: str | None = Field(default=None, max_length=16)

    @field_validator("study_instance_uid")
    @classmethod
    def _uid(cls, value: str | None) -> str | None:
        if value is not None and not is_uid(value):
            raise ValueError("not a valid DICOM UID")
        return value

    @field_validator("scheduled_procedure_step_start_date", "patient_birth_date")
    @classmethod
    def _date(cls, value: str | None) -> str | None:
        if value is not None:
            datetime.strptime(value, "%Y%m%d")  # ValueError: not a calendar date
        return value


def get_worklist(request: Request) -> WorklistStore:
    state = request.app.state
    with _store_lock:
        store = getattr(state, "worklist", None)
        if store is None:
            settings: Settings = state.settings
            store = state.worklist = WorklistStore(settings.catalog_dir / "worklist")
    return store


WorklistDep = Annotated[WorklistStore, Depends(get_worklist)]


async def _body(request: Request) -> bytes:
    return await request.body()


BodyDep = Annotated[bytes, Depends(_body)]
_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": StepIn.model_json_schema()}},
    }
}


def _bad_request(reasons: list[str]) -> JSONResponse:
    return JSONResponse(status_code=400, content={"errors": reasons})


def _parse(body: bytes, step_id: str | None = None) -> WorklistItem | JSONResponse:
    try:
        step = StepIn.model_validate_json(body or b"")
    except ValidationError as exc:
        return _bad_request(
            [
                f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}"
                for err in exc.errors(include_url=False)
            ]
        )
    fields = step.model_dump(mode="json")
    if step_id is not None:
        if fields.get("step_id") not in (None, step_id):
            return _bad_request(
                [f"step_id: the body names {fields['step_id']!r}, the URL {step_id!r}"]
            )
        fields["step_id"] = step_id
    try:
        return item_from_fields(fields)
    except InvalidItemError as exc:
        return _bad_request(exc.reasons)


def _json(item: WorklistItem, status: int = 200) -> Response:
    return Response(json.dumps(item.fields()), status_code=status, media_type="application/json")


def _not_found(step_id: str) -> JSONResponse:
    return JSONResponse(status_code=404, content={"errors": [f"no step {step_id!r}"]})


@router.post("/items", status_code=201, openapi_extra=_BODY_DOC)
def create_step(request: Request, body: BodyDep, store: WorklistDep) -> Response:
    """Schedule a procedure step; 201 with the stored step, 409 if its id exists."""
    item = _parse(body)
    if isinstance(item, JSONResponse):
        return item
    try:
        store.create(item, "rest")
    except StepExistsError:
        return JSONResponse(status_code=409, content={"errors": [f"step {item.step_id!r} exists"]})
    response = _json(item, 201)
    response.headers["Location"] = str(request.url_for("read_step", step_id=item.step_id))
    return response


@router.get("/items")
def list_steps(
    store: WorklistDep,
    request: Request,
    include_closed: Annotated[bool, Query(description="also completed/cancelled/past-due")] = False,
    modality: str | None = None,
    scheduled_station_ae_title: str | None = None,
    date: Annotated[str | None, Query(pattern=_DA)] = None,
    patient_id: str | None = None,
) -> Response:
    """The steps a modality would see (or every stored step with ``include_closed``)."""
    settings: Settings = request.app.state.settings
    items = (
        store.items()
        if include_closed
        else store.visible_items(datetime.now(), settings.worklist_past_due_hours)
    )
    wanted = {
        "modality": modality,
        "scheduled_station_ae_title": scheduled_station_ae_title,
        "scheduled_procedure_step_start_date": date,
        "patient_id": patient_id,
    }
    rows = [
        f
        for f in (i.fields() for i in items)
        if all(v is None or v in str(f.get(k) or "").split("\\") for k, v in wanted.items())
    ]
    return Response(json.dumps(rows), media_type="application/json")


@router.get("/items/{step_id}", name="read_step")
def read_step(step_id: str, store: WorklistDep) -> Response:
    """One stored step, whatever its status."""
    try:
        return _json(store.get(step_id))
    except StepNotFoundError:
        return _not_found(step_id)


@router.put("/items/{step_id}", openapi_extra=_BODY_DOC)
def replace_step(step_id: str, body: BodyDep, store: WorklistDep) -> Response:
    """Replace a stored step (all fields; its status too, e.g. COMPLETED)."""
    item = _parse(body, step_id)
    if isinstance(item, JSONResponse):
        return item
    try:
        store.update(item, "rest")
    except StepNotFoundError:
        return _not_found(step_id)
    return _json(item)


@router.delete("/items/{step_id}")
def cancel_step(step_id: str, store: WorklistDep) -> Response:
    """Cancel a step (status CANCELED; it stays stored, and C-FIND no longer returns it)."""
    try:
        return _json(store.set_status(step_id, StepStatus.CANCELED, "rest"))
    except StepNotFoundError:
        return _not_found(step_id)
