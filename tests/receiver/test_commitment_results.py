"""Storage Commitment results the archive could not deliver at first, delivered later:
``python -m receiver`` as the SCP, a requestor (a second receiver, AE ``ROUTER``) that is
down when the result is first sent and up afterwards, and the pass that takes the owed
results up again (``report_owed_results``, what Dagster's ``commitment_results`` runs)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from receiver_support import ReceiverProcess, free_port
from test_commitment import FILES, _refs, _store, _wait

from vannah_pipelines.catalog.holder import CatalogHolder
from vannah_pipelines.defs.resources import ArchiveResource
from vannah_pipelines.dimse.commitment import PENDING, request_commitment
from vannah_pipelines.dimse.commitment_results import (
    MAX_AGE_SECONDS,
    UNDELIVERED,
    any_due,
    report_owed_results,
)
from vannah_pipelines.dimse.peers import DicomPeer
from vannah_pipelines.routing.commitments import (
    REPORTED,
    CommitmentSpool,
    commitments_dir,
    owed_reports_dir,
)
from vannah_pipelines.settings import Settings, load_settings

pytestmark = pytest.mark.integration  # DCMTK: installed by `make test`'s bootstrap

LATER = 61.0  # past the first retry wait (60 s) after the receiver's one attempt


class Site:
    """The archive (a receiver that knows ROUTER in its dicom_modalities) and the router's
    port, where nothing listens until :meth:`start_router`."""

    def __init__(self, tmp_path: Path) -> None:
        self.router_port = free_port()
        self.modalities = {"router": ["ROUTER", "127.0.0.1", self.router_port]}
        self.archive = ReceiverProcess(
            data_dir=tmp_path / "archive" / "data",
            workers=1,
            env={"VANNAH_DICOM_MODALITIES": json.dumps(self.modalities)},
        )
        self.router = ReceiverProcess(
            data_dir=tmp_path / "router" / "data",
            port=self.router_port,
            workers=1,
            # Its own settings, whatever the test process's env holds: any calling AE.
            env={"VANNAH_DICOM_AET": "ROUTER", "VANNAH_DICOM_MODALITIES": "{}"},
        )
        for rx in (self.archive, self.router):
            rx.data_dir.parent.mkdir(parents=True)
        self.router_spool = CommitmentSpool(commitments_dir(self.router.data_dir))

    def settings(self) -> Settings:
        """The archive's settings, as its Dagster runs load them."""
        return load_settings(
            data_dir=self.archive.data_dir,
            dicom_modalities=self.modalities,
            dicom_port=self.archive.port,
        )

    def request(self, names: tuple[str, ...]) -> str:
        """ROUTER asks the archive to commit `names` and leaves at once."""
        result = request_commitment(
            DicomPeer("VANNAHCLOUD", "127.0.0.1", self.archive.port),
            _refs(names),
            calling_aet="ROUTER",
            spool=self.router_spool,
            wait_seconds=0,
        )
        assert result.outcome == PENDING, (result, self.archive.log())
        return result.transaction_uid

    def owed(self) -> CommitmentSpool:
        return CommitmentSpool(owed_reports_dir(self.archive.data_dir))

    def undelivered(self, txn: str) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            record = self.owed().read(txn)
            return record if record and record["state"] == UNDELIVERED else None

        return dict(_wait(check))


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    s = Site(tmp_path)
    s.archive.start()
    try:
        yield s
    finally:
        for rx in (s.archive, s.router):
            if rx.proc is not None and rx.proc.poll() is None:
                rx.stop()


def _pass(site: Site, now: float) -> Any:
    settings = site.settings()
    holder = CatalogHolder.for_settings(settings, refresh_seconds=0.0)
    try:
        return report_owed_results(settings, holder.get(), now=now)
    finally:
        holder.close()


def test_owed_result_is_judged_again_and_delivered_once_the_requestor_is_up(
    site: Site,
) -> None:
    """The requestor is down when the archive reports: the result is kept (one attempt,
    MR_small failed: not sent yet). MR_small arrives, the requestor comes up; the next
    pass judges afresh and delivers both as committed, and the record is gone."""
    _store(site.archive.port, FILES[:1])
    txn = site.request(FILES)
    record = site.undelivered(txn)
    assert record["attempts"] == 1
    assert [sop for _c, sop in record["committed"]] == [_refs(FILES[:1])[0][1]]
    assert [f["failure_reason"] for f in record["failed"]] == [0x0112]

    not_yet = _pass(site, now=time.time())  # inside the first backoff: not tried
    assert (not_yet.delivered, not_yet.still_owed, not_yet.failed_attempts) == (0, 1, 0)

    down = _pass(site, now=time.time() + LATER)  # due, the requestor still down
    assert (down.delivered, down.failed_attempts) == (0, 1)
    assert site.owed().read(txn)["attempts"] == 2

    _store(site.archive.port, FILES[1:])
    site.router.start()
    up = _pass(site, now=time.time() + LATER + 2 * LATER)
    assert (up.delivered, up.still_owed) == (1, 0), site.router.log()
    reported = site.router_spool.read(txn)
    assert reported is not None and reported["state"] == REPORTED
    assert sorted(s for _c, s in reported["committed"]) == sorted(s for _c, s in _refs(FILES))
    assert reported["failed"] == []
    assert reported["reported_on"] == "new-association"
    assert site.owed().read(txn) is None


def test_result_of_an_unknown_requestor_is_kept_then_set_aside_when_too_old(
    site: Site,
) -> None:
    """A requestor not in dicom_modalities: every pass keeps the result (attempts
    counted); past MAX_AGE_SECONDS it is moved to owed/expired and no longer owed."""
    _store(site.archive.port, FILES[:1])
    site.modalities = {}  # the archive's Dagster run does not know ROUTER either
    txn = site.request(FILES[:1])
    site.undelivered(txn)

    kept = _pass(site, now=time.time() + LATER)
    assert (kept.unknown_requestor, kept.still_owed, kept.delivered) == (1, 1, 0)
    assert site.owed().read(txn)["attempts"] == 2

    old = _pass(site, now=time.time() + MAX_AGE_SECONDS + 1)
    assert (old.expired, old.still_owed) == (1, 0)
    assert site.owed().read(txn) is None
    assert (owed_reports_dir(site.archive.data_dir) / "expired" / f"{txn}.json").is_file()


def test_dagster_sensor_requests_a_run_only_when_a_result_is_due_and_the_run_delivers(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sensor skips while nothing is due (the result inside its backoff), requests a
    run once it is; the asset delivers it with its metadata and the check passes."""
    from vannah_pipelines.defs.routing.commitment_results import (
        commitment_results,
        owed_commitment_results_sensor,
    )

    monkeypatch.delenv("VANNAH_CONFIG", raising=False)
    monkeypatch.setenv("VANNAH_DATA_DIR", str(site.archive.data_dir))
    monkeypatch.setenv("VANNAH_DICOM_MODALITIES", json.dumps(site.modalities))
    _store(site.archive.port, FILES[:1])
    txn = site.request(FILES[:1])
    record = site.undelivered(txn)
    instance = dg.DagsterInstance.ephemeral()

    def tick() -> Any:
        context = dg.build_sensor_context(
            instance=instance, resources={"archive": ArchiveResource()}
        )
        return owed_commitment_results_sensor(context)

    assert isinstance(tick(), dg.SkipReason)
    assert not any_due(site.settings())
    # As if the backoff had passed: the receiver's attempt recorded a minute earlier.
    site.owed().write(txn, {**record, "last_attempt_at": record["last_attempt_at"] - LATER})
    assert isinstance(tick(), dg.RunRequest)

    site.router.start()
    result = dg.materialize(
        [commitment_results], instance=instance, resources={"archive": ArchiveResource()}
    )
    assert result.success
    (materialization,) = result.asset_materializations_for_node("commitment_results")
    assert materialization.metadata["delivered"].value == 1
    assert materialization.metadata["still_owed"].value == 0
    (check,) = result.get_asset_check_evaluations()
    assert check.passed
    assert site.router_spool.read(txn)["state"] == REPORTED
    assert isinstance(tick(), dg.SkipReason)
