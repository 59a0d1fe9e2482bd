"""Priors ready before the exam: when the worklist schedules a step, file restore requests
for that patient's prior studies in the cold tier, so they are hot when the images arrive.

A follower of the worklist's event files (:meth:`WorklistStore.changes_after`) sees every
step, whatever created it (REST, a ``.wl`` import, an HL7 order): steps still open and not
past due are looked up by Patient ID in the catalog, and the patient's studies with an
instance in the cold tier, within ``prefetch_lookback_days`` of the scheduled start, at most
``prefetch_max_studies`` of the most recent, get a restore request (reason ``prior``). The
restore job does the rest, as for any request.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import TYPE_CHECKING

from vannah_pipelines.dicom.uids import is_uid
from vannah_pipelines.storage.base import Tier
from vannah_pipelines.storage.restore import request_restore
from vannah_pipelines.storage.restoring import PRIOR_REASON
from vannah_pipelines.worklist.store import StepChange, WorklistStore

if TYPE_CHECKING:
    from vannah_pipelines.catalog.reader import CatalogReader
    from vannah_pipelines.settings import Settings

log = logging.getLogger(__name__)


def worklist_store(settings: Settings) -> WorklistStore:
    """The worklist table of `settings`' catalog."""
    return WorklistStore(settings.catalog_dir / "worklist")


@dataclass(frozen=True)
class ScheduledStep:
    """An open step whose patient may have priors (its Patient ID is never logged)."""

    step_id: str
    patient_id: str
    study_uid: str  # the study the step will make: never its own prior
    start: date


def scheduled_steps(
    changes: list[StepChange], now: datetime, past_due_hours: float
) -> list[ScheduledStep]:
    """The steps created or updated in `changes` that are, in their latest state, still
    open and not past due (what MWL C-FIND returns), with a Patient ID."""
    latest: dict[str, StepChange] = {}
    scheduled: set[str] = set()  # steps created or updated (a status change schedules none)
    for change in changes:
        latest[change.item.step_id] = change
        if change.action != "status":
            scheduled.add(change.item.step_id)
    steps = []
    local_now = now.astimezone().replace(tzinfo=None)  # DICOM DA/TM are local times
    for step_id, change in latest.items():
        item = change.item
        if step_id not in scheduled or not item.visible(local_now, past_due_hours):
            continue
        fields = item.fields()
        patient_id = fields.get("patient_id") or ""
        if not patient_id.strip():
            continue
        start = item.start()
        steps.append(
            ScheduledStep(
                item.step_id,
                patient_id,
                fields.get("study_instance_uid") or "",
                start.date() if start is not None else now.date(),
            )
        )
    return steps


@dataclass(frozen=True)
class ColdPrior:
    study_uid: str
    study_date: date | None


def cold_priors(
    catalog: CatalogReader,
    step: ScheduledStep,
    *,
    lookback_days: int,
    max_studies: int,
) -> list[ColdPrior]:
    """The patient's studies with an instance in the cold tier, other than the step's own,
    dated within `lookback_days` before the step's start (0: any age), the `max_studies`
    most recent. A study without a valid StudyDate counts as within the look-back and
    ranks after the dated ones."""
    if max_studies <= 0:
        return []
    rows = catalog.query(
        "SELECT study_instance_uid, max(study_date) FROM instances "
        "WHERE patient_id = ? AND study_instance_uid IS DISTINCT FROM ? "
        "GROUP BY study_instance_uid HAVING bool_or(tier = ?)",
        [step.patient_id, step.study_uid, Tier.COLD.value],
    )
    cutoff = step.start - timedelta(days=lookback_days) if lookback_days else None
    found = []
    for uid, text in rows:
        if not is_uid(str(uid)):
            continue
        when = _study_date(text)
        if cutoff is not None and when is not None and when < cutoff:
            continue
        found.append(ColdPrior(str(uid), when))
    found.sort(key=lambda p: (p.study_date is None, -(p.study_date or date.min).toordinal()))
    return found[:max_studies]


def _study_date(text: object) -> date | None:
    try:
        return datetime.strptime(str(text or ""), "%Y%m%d").date()
    except ValueError:
        return None


@dataclass
class PrefetchResult:
    """What one prefetch pass did (counts only: no patient identifier)."""

    steps: int = 0
    patients: int = 0
    patients_with_priors: int = 0
    priors: list[str] = field(default_factory=list)  # Study Instance UIDs found cold
    filed: list[str] = field(default_factory=list)  # of which newly requested
    already_requested: int = 0

    def describe(self) -> str:
        return (
            f"{self.steps} scheduled steps of {self.patients} patients: "
            f"{len(self.priors)} cold priors ({self.patients_with_priors} patients), "
            f"{len(self.filed)} restore requests filed, {self.already_requested} already filed"
        )


def prefetch_priors(
    settings: Settings, catalog: CatalogReader, steps: list[ScheduledStep]
) -> PrefetchResult:
    """File a restore request (reason ``prior``) for each cold prior of each step's patient.

    Parameters
    ----------
    settings
        ``prefetch_priors`` (off: nothing is filed), ``prefetch_lookback_days``,
        ``prefetch_max_studies`` and the restore spool.
    catalog
        Where the patients' studies and their tiers are.
    steps
        The scheduled steps (:func:`scheduled_steps`).

    Returns
    -------
    PrefetchResult
        The counts, and the studies found and filed.
    """
    result = PrefetchResult(steps=len(steps))
    if not settings.prefetch_priors:
        return result
    seen: set[str] = set()
    patients: set[str] = set()
    with_priors: set[str] = set()
    for step in steps:
        patients.add(step.patient_id)
        priors = cold_priors(
            catalog,
            step,
            lookback_days=settings.prefetch_lookback_days,
            max_studies=settings.prefetch_max_studies,
        )
        if priors:
            with_priors.add(step.patient_id)
        for prior in priors:
            if prior.study_uid in seen:  # two steps of one patient
                continue
            seen.add(prior.study_uid)
            result.priors.append(prior.study_uid)
            if request_restore(settings, prior.study_uid, reason=PRIOR_REASON):
                result.filed.append(prior.study_uid)
                log.info("prior %s of step %s: restore requested", prior.study_uid, step.step_id)
            else:
                result.already_requested += 1
    result.patients = len(patients)
    result.patients_with_priors = len(with_priors)
    return result
