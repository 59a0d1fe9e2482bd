"""C-CANCEL cuts a long C-FIND answer short (PS3.4 C.4.1.3.1 and K.4.1.3.1)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from receiver_support import ReceiverProcess

from receiver.status import FindStatus
from tests.data_builds import without_fsync
from vannah_pipelines.catalog.ingest import IngestPaths, ingest_batches
from vannah_pipelines.dicom.synthetic import make_instance, to_part10
from vannah_pipelines.landing.layout import LandingZone, ReceiveFacts
from vannah_pipelines.settings import load_settings

pytestmark = pytest.mark.integration

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
# Enough answers that sending them all takes longer than a C-CANCEL needs to arrive, even
# on a loaded machine (with 600, pynetdicom's path once sent every answer first).
STUDIES = 2000


@pytest.fixture(scope="module", params=["fast", "pynetdicom"])
def receiver(request: pytest.FixtureRequest, cancel_data: Path) -> Iterator[ReceiverProcess]:
    """A receiver over the archive, C-FIND served on the DIMSE path ``request.param``."""
    env = {"VANNAH_RECEIVER_FAST_STORE": "false"} if request.param == "pynetdicom" else {}
    rx = ReceiverProcess(data_dir=cancel_data, port=0, workers=1, env=env).start()
    yield rx
    rx.stop()


@pytest.fixture(scope="module")
def cancel_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data folder of many small studies (built through the real ingest, without fsync:
    what is tested is C-FIND and C-CANCEL on it)."""
    data_dir = tmp_path_factory.mktemp("cancel") / "data"
    settings = load_settings(data_dir=data_dir)
    with without_fsync():
        batch = LandingZone(settings.landing_dir).open_batch("import")
        for i in range(STUDIES):
            ds = make_instance("CT", rows=8, columns=8, patient_id=f"CANCEL-{i:04d}")
            batch.write_instance(
                to_part10(ds),
                ReceiveFacts(ds.SOPInstanceUID, ds.SOPClassUID, "1.2.840.10008.1.2.1", "import"),
            )
        sealed = batch.seal()
        assert sealed is not None
        paths = IngestPaths(
            settings.landing_dir, settings.hot_dir, settings.catalog_dir, settings.quarantine_dir
        )
        ingest_batches(paths, [sealed.batch_id])
    return Path(data_dir)


def _find_all(rx: ReceiverProcess, cancel_after: float | None) -> list[int]:
    ae = AE(ae_title="CANCELSCU")
    ae.add_requested_context(STUDY_ROOT_FIND)
    assoc = ae.associate("127.0.0.1", rx.port, ae_title="VANNAHCLOUD")
    assert assoc.is_established
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = ""
    identifier.PatientID = "CANCEL-*"
    statuses: list[int] = []
    done = threading.Event()
    if cancel_after is not None:
        # C-CANCEL may come any time after the request (PS3.7 9.3.2.3). Sent from another
        # thread, not after reading an answer: the answers would all be in the socket
        # buffers before a loaded client read the first one. Sent again every 20 ms until the
        # answer ends, because pynetdicom drops a C-CANCEL that arrives before it dispatches
        # the request to the handler (association.py clears cancel_req first): on a loaded
        # machine the first one may come that early.
        def cancel() -> None:
            time.sleep(cancel_after)
            while not done.is_set():
                assoc.send_c_cancel(11, query_model=STUDY_ROOT_FIND)
                done.wait(0.02)

        threading.Thread(target=cancel, daemon=True).start()
    try:
        for status, _ in assoc.send_c_find(identifier, STUDY_ROOT_FIND, msg_id=11):
            statuses.append(int(status.Status))
    finally:
        done.set()
        assoc.release()
    return statuses


def test_c_find_without_cancel_returns_every_match(receiver: ReceiverProcess) -> None:
    statuses = _find_all(receiver, cancel_after=None)
    assert statuses.count(FindStatus.PENDING) == STUDIES
    assert statuses[-1] == FindStatus.SUCCESS


def test_c_cancel_stops_the_answer_early(receiver: ReceiverProcess) -> None:
    statuses = _find_all(receiver, cancel_after=0.05)
    assert statuses[-1] == FindStatus.CANCEL  # 0xFE00: matching terminated due to cancel
    assert statuses.count(FindStatus.PENDING) < STUDIES
