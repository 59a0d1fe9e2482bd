"""The C-ECHO/C-STORE handlers in-process (pynetdicom server in this process, real peers)."""

from __future__ import annotations

import random
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom.data
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dsutils import encode, split_dataset
from receiver_raw_scu import send_raw_c_store
from receiver_support import sealed_instances, wait_sealed

from receiver.app import build_ae
from receiver.handlers import AssociationLog, Landing, event_handlers
from receiver.status import StoreStatus
from vannah_pipelines.dicom.synthetic import make_instance
from vannah_pipelines.landing.layout import LandingZone, RollingBatch
from vannah_pipelines.settings import load_settings

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"
CT = "1.2.840.10008.5.1.4.1.1.2"


@dataclass
class InProcess:
    port: int
    data_dir: Path
    root: Path


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[InProcess]:
    settings = load_settings(data_dir=tmp_path / "data", dicom_port=0)
    landing = Landing(RollingBatch(LandingZone(settings.landing_dir), "dimse", 500, 0.2))
    ae = build_ae(settings)
    server = ae.start_server(
        ("127.0.0.1", 0),
        block=False,
        evt_handlers=event_handlers(landing, AssociationLog()),
    )
    yield InProcess(server.socket.getsockname()[1], settings.data_dir, tmp_path)
    server.shutdown()
    landing.close()


def _dataset(**overrides: object) -> tuple[bytes, str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid values on purpose
        ds = make_instance("CT", rows=16, columns=16, **overrides)
        data = encode(ds, False, True)
    assert data is not None
    return data, str(ds.get("SOPInstanceUID", ""))


def _files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def _landed_dcm(data_dir: Path) -> list[Path]:
    return [p for p in (data_dir / "landing").rglob("*") if p.suffix == ".dcm" or ".tmp-" in p.name]


def test_handle_echo_answers_success(scp: InProcess) -> None:
    ae = AE(ae_title="ECHOTEST")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="SOMEOTHERAE")  # called AE not ours
    assert assoc.is_established
    assert assoc.send_c_echo().Status == StoreStatus.SUCCESS
    assoc.release()


def test_handle_store_lands_raw_bytes_as_received(scp: InProcess) -> None:
    data, uid = _dataset()
    result = send_raw_c_store(
        "127.0.0.1",
        scp.port,
        sop_class=CT,
        sop_instance=uid,
        transfer_syntax=ExplicitVRLittleEndian,
        dataset=data,
        calling_ae="RAWOK",
    )
    assert result.status == StoreStatus.SUCCESS
    landed = wait_sealed(scp.data_dir, {uid})[uid]
    assert landed[0].dataset_bytes() == data
    assert landed[0].receipt is not None
    assert landed[0].receipt["calling_ae"] == "RAWOK"
    assert landed[0].receipt["transfer_syntax_uid"] == ExplicitVRLittleEndian


def _broken_inputs() -> list[tuple[str, str, str, bytes, set[int]]]:
    cases: list[tuple[str, str, str, bytes, set[int]]] = []
    a900 = {StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS}
    c000 = {StoreStatus.CANNOT_UNDERSTAND}
    for name in ("MR_truncated.dcm", "rtplan_truncated.dcm"):
        path = TEST_FILES / name
        meta, offset = split_dataset(path)
        cases.append(
            (
                name,
                str(meta.MediaStorageSOPClassUID),
                str(meta.MediaStorageSOPInstanceUID),
                path.read_bytes()[offset:],
                c000,
            )
        )
    data, uid = _dataset()
    # Cut inside the last element's value (a cut at an element boundary is a complete,
    # if short, data set: only ingest's completeness check can tell).
    cases.append(("truncated-synthetic", CT, uid, data[: len(data) - 3], c000))
    rng = random.Random(3)
    cases.append(("random-bytes", CT, "1.2.3.4", rng.randbytes(3000), c000 | a900))
    cases.append(("empty", CT, "1.2.3.5", b"", a900))
    data, _ = _dataset(SOPInstanceUID=None)
    cases.append(("no-sop-instance-uid", CT, "1.2.3.6", data, a900))
    data, uid = _dataset(StudyInstanceUID="../../etc")
    cases.append(("study-uid-traversal", CT, uid, data, a900))
    data, uid = _dataset(SeriesInstanceUID="not-a-uid")
    cases.append(("series-not-uid", CT, uid, data, a900))
    data, _ = _dataset(SOPInstanceUID="../../evil")
    cases.append(("sop-uid-traversal", CT, "../../evil", data, a900))
    data, _ = _dataset()
    cases.append(("affected-uid-mismatch", CT, "1.2.3.7", data, a900))
    data, uid = _dataset()
    cases.append(("affected-class-mismatch", "1.2.840.10008.5.1.4.1.1.4", uid, data, a900))
    return cases


@pytest.mark.parametrize(
    ("name", "sop_class", "sop_instance", "data", "statuses"),
    _broken_inputs(),
    ids=[c[0] for c in _broken_inputs()],
)
def test_handle_store_refuses_broken_input_and_writes_nothing(
    scp: InProcess, name: str, sop_class: str, sop_instance: str, data: bytes, statuses: set[int]
) -> None:
    before = _files_under(scp.root)
    result = send_raw_c_store(
        "127.0.0.1",
        scp.port,
        sop_class=sop_class,
        sop_instance=sop_instance,
        transfer_syntax=ExplicitVRLittleEndian,
        dataset=data,
    )
    assert result.accepted
    assert result.status in statuses
    assert _landed_dcm(scp.data_dir) == []
    assert _files_under(scp.root) - before <= {
        p for p in _files_under(scp.data_dir / "landing") if p.name in {".lock", "receipts.jsonl"}
    }
    assert not list(scp.root.parent.rglob("evil*"))
    assert sealed_instances(scp.data_dir) == {}
