"""Every service reads instance bytes through StorageTiers, whatever the tier: WADO-RS,
WADO-URI (dicomweb-client and plain HTTP on a real uvicorn), C-MOVE and C-GET (DCMTK
movescu / getscu / storescp and pynetdicom against a real ``python -m receiver``), with the
warm tier on SeaweedFS (minio SDK) and the cold tier on moto (boto3, DEEP_ARCHIVE).

The archive: study W with W1 moved to warm (catalog updated) and W2 in warm while the
catalog still says hot (a read falls back to the tier that has it); study C whose one
instance is in cold; study M with one hot and one cold instance. Each instance was
ingested into the hot tier, then written to its tier through the storage interface, its
location appended to the catalog, and its hot file deleted.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, build_role
from pynetdicom import evt as pynetdicom_evt
from pynetdicom.sop_class import CTImageStorage

from dicomweb.app import create_app
from receiver.status import RetrieveStatus
from tests.conftest import object_tier_settings
from tests.dicomweb.conftest import LOCAL_URL, land_and_ingest, start_server
from tests.receiver.receiver_support import (
    DCMTK_ENV,
    ReceiverProcess,
    dataset_bytes_of_file,
    free_port,
    free_ports,
)
from tests.servers import S3Server
from vannah_pipelines.catalog.changes import append_change
from vannah_pipelines.catalog.lookup import StoredInstance, find_instances
from vannah_pipelines.catalog.reader import CatalogReader
from vannah_pipelines.catalog.writer import CatalogWriter
from vannah_pipelines.dicom.synthetic import make_instance, to_part10
from vannah_pipelines.settings import Settings, load_settings
from vannah_pipelines.storage.base import Tier
from vannah_pipelines.storage.restore import pending_requests
from vannah_pipelines.storage.tiers import StorageTiers

pytestmark = pytest.mark.integration

AEC = "VANNAHCLOUD"
DEST_AET = "TIERDEST"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"


@dataclass
class TieredArchive:
    settings: Settings
    tier_settings: dict[str, object]
    files: dict[str, bytes]  # SOP Instance UID -> stored Part-10 bytes (as ingested)
    studies: dict[str, str]  # W, C, M -> Study Instance UID
    sops: dict[str, str]  # W1, W2, C1, M1, M2 -> SOP Instance UID
    series: dict[str, str]  # SOP Instance UID -> Series Instance UID
    url: str  # DICOMweb root on a real uvicorn
    receiver: ReceiverProcess
    dest_port: int


def _env(values: dict[str, object]) -> dict[str, str]:
    """Settings as the VANNAH_* environment the receiver reads."""
    return {
        f"VANNAH_{k.upper()}": str(v).lower() if isinstance(v, bool) else str(v)
        for k, v in values.items()
    }


def _stored(settings: Settings, study: str) -> list[StoredInstance]:
    reader = CatalogReader(settings.catalog_dir)
    try:
        return find_instances(reader, study)
    finally:
        reader.close()


def _move(
    settings: Settings, tiers: StorageTiers, inst: StoredInstance, tier: Tier, *, record: bool
) -> None:
    """Write the instance's object to `tier` through the storage interface (verified),
    append its new location to the catalog when `record`, delete its hot file."""
    with tiers.hot.open(inst.storage_key) as stream:
        size = tiers.hot.stat(inst.storage_key)
        tiers[tier].write(inst.storage_key, stream, size, inst.checksum)
    if record:
        append_change(
            CatalogWriter(settings.catalog_dir),
            "instance_locations",
            [
                {
                    "sop_instance_uid": inst.sop_instance_uid,
                    "checksum": inst.checksum,
                    "tier": tier.value,
                    "storage_key": inst.storage_key,
                }
            ],
            changed_by="test_services_tiers",
        )
    tiers.hot.delete(inst.storage_key)


@pytest.fixture(scope="module")
def tiered(
    tmp_path_factory: pytest.TempPathFactory, seaweedfs: S3Server, moto_s3: S3Server
) -> Iterator[TieredArchive]:
    root = tmp_path_factory.mktemp("tiers")
    dest_port, port = free_ports(2)
    modalities = {
        "dest": [DEST_AET, "127.0.0.1", dest_port],
        **{scu.lower(): [scu, "127.0.0.1", 104] for scu in ("MOVESCU", "GETSCU", "TIERTEST")},
    }
    tier_settings = object_tier_settings(seaweedfs, moto_s3)
    settings = load_settings(data_dir=root / "data", **tier_settings)
    studies = {name: generate_uid() for name in ("W", "C", "M")}
    plan = {"W1": "W", "W2": "W", "C1": "C", "M1": "M", "M2": "M"}
    blobs: list[tuple[str, bytes]] = []
    sops: dict[str, str] = {}
    series: dict[str, str] = {}
    series_of = {name: generate_uid() for name in studies}
    for number, (name, study) in enumerate(plan.items(), start=1):
        ds = make_instance(
            "CT",
            study_uid=studies[study],
            series_uid=series_of[study],
            instance_number=number,
            rows=64,
            columns=64,
        )
        sops[name] = str(ds.SOPInstanceUID)
        series[sops[name]] = series_of[study]
        blobs.append((sops[name], to_part10(ds)))
    land_and_ingest(settings, blobs)
    tiers = StorageTiers(settings)
    files: dict[str, bytes] = {}
    for study in studies.values():
        for inst in _stored(settings, study):
            with tiers.hot.open(inst.storage_key) as stream:
                files[inst.sop_instance_uid] = stream.read()
    by_sop = {i.sop_instance_uid: i for s in studies.values() for i in _stored(settings, s)}
    _move(settings, tiers, by_sop[sops["W1"]], Tier.WARM, record=True)
    _move(settings, tiers, by_sop[sops["W2"]], Tier.WARM, record=False)  # catalog: hot
    _move(settings, tiers, by_sop[sops["C1"]], Tier.COLD, record=True)
    _move(settings, tiers, by_sop[sops["M2"]], Tier.COLD, record=True)
    assert {i.sop_instance_uid: i.tier for i in _stored(settings, studies["W"])} == {
        sops["W1"]: "warm",
        sops["W2"]: "hot",
    }
    assert not list(settings.hot_dir.rglob(f"{sops['W1']}.*"))
    server, thread, http_port = start_server(settings)
    env = {
        **_env(tier_settings),
        "VANNAH_DICOM_MODALITIES": json.dumps(modalities),
    }
    rx = ReceiverProcess(data_dir=settings.data_dir, port=port, workers=1, env=env).start()
    try:
        yield TieredArchive(
            settings,
            tier_settings,
            files,
            studies,
            sops,
            series,
            f"http://127.0.0.1:{http_port}/dicom-web",
            rx,
            dest_port,
        )
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        if rx.proc is not None and rx.proc.poll() is None:
            rx.stop()


def _instance_path(a: TieredArchive, name: str) -> str:
    sop = a.sops[name]
    study = a.studies[name[0]]
    return f"/studies/{study}/series/{a.series[sop]}/instances/{sop}"


def _dataset(data: bytes) -> Dataset:
    return pydicom.dcmread(BytesIO(data))


# ---------------------------------------------------------------- DICOMweb


def test_warm_instances_are_served_by_wado_rs_and_wado_uri_unchanged(
    tiered: TieredArchive,
) -> None:
    client = DICOMwebClient(tiered.url)
    study = tiered.studies["W"]
    w1, w2 = tiered.sops["W1"], tiered.sops["W2"]
    # The study: W1 from warm (the catalog's tier), W2 from warm by fallback (catalog: hot).
    found = {str(ds.SOPInstanceUID): ds for ds in client.retrieve_study(study)}
    assert set(found) == {w1, w2}
    for sop, ds in found.items():
        assert ds.PixelData == _dataset(tiered.files[sop]).PixelData, sop
    series = client.retrieve_series(study, tiered.series[w1])
    assert {str(ds.SOPInstanceUID) for ds in series} == {w1, w2}
    # One instance as stored: byte-identical.
    for name in ("W1", "W2"):
        response = requests.get(
            tiered.url + _instance_path(tiered, name),
            headers={"Accept": "application/dicom; transfer-syntax=*"},
            timeout=30,
        )
        assert response.status_code == 200, response.text[:300]
        assert response.content == tiered.files[tiered.sops[name]], name
    original = _dataset(tiered.files[w1])
    frames = client.retrieve_instance_frames(study, tiered.series[w1], w1, frame_numbers=[1])
    assert frames == [original.PixelData]
    rendered = client.retrieve_instance_rendered(
        study, tiered.series[w1], w1, media_types=("image/png",)
    )
    assert rendered.startswith(b"\x89PNG")
    thumb = requests.get(tiered.url + _instance_path(tiered, "W1") + "/thumbnail", timeout=30)
    assert thumb.status_code == 200 and thumb.content.startswith(b"\xff\xd8")
    metadata = client.retrieve_instance_metadata(study, tiered.series[w1], w1)
    origin = tiered.url.removesuffix("/dicom-web")  # the service gives absolute paths
    bulk = client.retrieve_bulkdata(origin + metadata["7FE00010"]["BulkDataURI"])
    assert bulk == [original.PixelData]
    wado = requests.get(
        tiered.url + "/wado",
        params={
            "requestType": "WADO",
            "studyUID": study,
            "seriesUID": tiered.series[w1],
            "objectUID": w1,
            "contentType": "application/dicom",
        },
        timeout=30,
    )
    assert wado.status_code == 200 and wado.content == tiered.files[w1]


def test_cold_instance_is_503_with_retry_after_and_files_a_restore(
    tiered: TieredArchive,
) -> None:
    study = tiered.studies["C"]
    c1 = tiered.sops["C1"]
    retry = str(int(tiered.settings.cold_restore_expected_hours * 3600))
    wado_uri = "/wado?requestType=WADO&" + (
        f"studyUID={study}&seriesUID={tiered.series[c1]}&objectUID={c1}"
    )
    for path in (
        _instance_path(tiered, "C1"),
        f"/studies/{study}",
        _instance_path(tiered, "C1") + "/rendered",
        _instance_path(tiered, "C1") + "/frames/1",
        wado_uri,
        wado_uri + "&contentType=application/dicom",
    ):
        response = requests.get(tiered.url + path, timeout=30)
        assert response.status_code == 503, (path, response.status_code, response.text[:300])
        assert response.headers["Retry-After"] == retry, path
        reason = response.json()["00000902"]["Value"][0]
        assert "cold tier" in reason and "restore was requested" in reason, reason
    assert study in {r.study_uid for r in pending_requests(tiered.settings)}
    # The client's own view: dicomweb-client gets the HTTP error, never a broken stream
    # (it retries a 503 itself unless told not to, with its own back-off).
    client = DICOMwebClient(tiered.url)
    client.set_http_retry_params(retry=False)
    with pytest.raises(requests.HTTPError) as caught:
        client.retrieve_study(study)
    assert caught.value.response.status_code == 503


def test_warm_tier_down_is_503_with_a_reason_not_500(tiered: TieredArchive) -> None:
    """The warm object server unreachable (stopped: nothing listens on its port): warm
    instances answer 503 saying so, hot ones are served as ever."""
    down = load_settings(
        data_dir=tiered.settings.data_dir,
        **{**tiered.tier_settings, "warm_s3_endpoint": f"127.0.0.1:{free_port()}"},
    )
    with TestClient(create_app(down), base_url=LOCAL_URL) as client:
        for suffix in ("", "/rendered", "/frames/1"):
            response = client.get("/dicom-web" + _instance_path(tiered, "W1") + suffix)
            assert response.status_code == 503, (suffix, response.text[:300])
            reason = response.json()["00000902"]["Value"][0]
            assert "warm storage tier is unavailable" in reason, reason
        hot = client.get(
            "/dicom-web" + _instance_path(tiered, "M1"),
            headers={"Accept": "application/dicom; transfer-syntax=*"},
        )
        assert hot.status_code == 200 and hot.content == tiered.files[tiered.sops["M1"]]


# ---------------------------------------------------------------- C-MOVE / C-GET


@pytest.fixture
def storescp(tmp_path: Path, tiered: TieredArchive) -> Iterator[Path]:
    out = tmp_path / "storescp"
    out.mkdir()
    proc = subprocess.Popen(
        ["storescp", "-aet", DEST_AET, "+xa", "-od", str(out), str(tiered.dest_port)],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_port(tiered.dest_port)
        yield out
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _wait_port(port: int) -> None:
    import socket

    deadline = time.monotonic() + 30  # bounds a hang, not a performance threshold
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


def _run(args: list[str]) -> str:
    result = subprocess.run(
        args, env=DCMTK_ENV, capture_output=True, text=True, timeout=120, check=False
    )
    return result.stdout + result.stderr


def _received(folder: Path) -> dict[str, Path]:
    found = {}
    for path in folder.rglob("*"):
        if path.is_file():
            found[str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)] = path
    return found


def _assert_identical(tiered: TieredArchive, received: dict[str, Path], names: set[str]) -> None:
    assert set(received) == {tiered.sops[n] for n in names}
    for name in names:
        sop = tiered.sops[name]
        stored = tiered.files[sop]
        offset = len(stored) - len(dataset_bytes_of_file(received[sop]))
        assert dataset_bytes_of_file(received[sop]) == stored[offset:], name
        assert (
            _dataset(stored).file_meta.TransferSyntaxUID
            == pydicom.dcmread(received[sop]).file_meta.TransferSyntaxUID
        )


def test_movescu_and_getscu_of_a_warm_study_are_byte_identical(
    tiered: TieredArchive, storescp: Path, tmp_path: Path
) -> None:
    study = tiered.studies["W"]
    port = str(tiered.receiver.port)
    keys = ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}"]
    output = _run(["movescu", "-v", "-S", "-aec", AEC, "-aem", DEST_AET, *keys, "127.0.0.1", port])
    assert "Received Final Move Response (Success)" in output, output
    deadline = time.monotonic() + 10  # bounds a hang: storescp writes as it receives
    while len(_received(storescp)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    _assert_identical(tiered, _received(storescp), {"W1", "W2"})

    out = tmp_path / "get"
    out.mkdir()
    output = _run(
        ["getscu", "-v", "-S", "+xe", "-aec", AEC, "-od", str(out), *keys, "127.0.0.1", port]
    )
    assert "Received C-GET Response (Success)" in output, output
    _assert_identical(tiered, _received(out), {"W1", "W2"})


def _c_move(tiered: TieredArchive, study: str, port: int | None = None) -> list[Any]:
    ae = AE(ae_title="TIERTEST")
    ae.add_requested_context(STUDY_ROOT_MOVE)
    assoc = ae.associate("127.0.0.1", port or tiered.receiver.port, ae_title=AEC)
    assert assoc.is_established
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study
    try:
        return list(assoc.send_c_move(identifier, DEST_AET, STUDY_ROOT_MOVE))
    finally:
        assoc.release()


def _failed_uids(identifier: Dataset | None) -> set[str]:
    assert identifier is not None
    element = identifier["FailedSOPInstanceUIDList"]
    return {str(v) for v in element.value} if element.VM > 1 else {str(element.value)}


def test_move_of_a_cold_study_fails_with_the_reason_and_files_a_restore(
    tiered: TieredArchive, storescp: Path
) -> None:
    study = tiered.studies["C"]
    final, identifier = _c_move(tiered, study)[-1]
    # PS3.4 C.4.2.1.5: every sub-operation failed.
    assert final.Status == RetrieveStatus.UNABLE_TO_PERFORM_SUBOPERATIONS
    assert final.NumberOfFailedSuboperations == 1 and final.NumberOfCompletedSuboperations == 0
    assert "restore requested" in final.ErrorComment, final.ErrorComment
    assert _failed_uids(identifier) == {tiered.sops["C1"]}
    assert study in {r.study_uid for r in pending_requests(tiered.settings)}
    keys = ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}"]
    output = _run(
        ["movescu", "-d", "-S", "-aec", AEC, "-aem", DEST_AET, *keys, "127.0.0.1",
         str(tiered.receiver.port)]
    )  # fmt: skip
    assert "0xa702" in output.lower() and "restore requested" in output, output
    assert _received(storescp) == {}


def test_get_of_a_study_partly_cold_sends_the_rest_and_says_why_one_failed(
    tiered: TieredArchive,
) -> None:
    study = tiered.studies["M"]
    received: dict[str, bytes] = {}

    def store(event: Any) -> int:
        received[str(event.request.AffectedSOPInstanceUID)] = event.encoded_dataset(False)
        return 0x0000

    ae = AE(ae_title="TIERTEST")
    ae.add_requested_context(STUDY_ROOT_GET)
    ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
    assoc = ae.associate(
        "127.0.0.1",
        tiered.receiver.port,
        ae_title=AEC,
        ext_neg=[build_role(CTImageStorage, scp_role=True)],
        evt_handlers=[(pynetdicom_evt.EVT_C_STORE, store)],
    )
    assert assoc.is_established
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study
    try:
        final, failed = list(assoc.send_c_get(identifier, STUDY_ROOT_GET))[-1]
    finally:
        assoc.release()
    m1, m2 = tiered.sops["M1"], tiered.sops["M2"]
    assert final.Status == RetrieveStatus.SUBOPERATIONS_FAILED  # B000: one of two failed
    assert final.NumberOfCompletedSuboperations == 1 and final.NumberOfFailedSuboperations == 1
    assert "restore requested" in final.ErrorComment, final.ErrorComment
    assert _failed_uids(failed) == {m2}
    assert set(received) == {m1}
    assert tiered.files[m1].endswith(received[m1])
    assert study in {r.study_uid for r in pending_requests(tiered.settings)}


def test_move_with_the_warm_tier_down_fails_the_warm_sub_operations_with_the_reason(
    tiered: TieredArchive, storescp: Path
) -> None:
    env = {
        **tiered.receiver.env,
        **_env({"warm_s3_endpoint": f"127.0.0.1:{free_port()}"}),
    }
    rx = ReceiverProcess(
        data_dir=tiered.settings.data_dir, port=0, workers=1, env=env, runs=100
    ).start()
    try:
        final, identifier = _c_move(tiered, tiered.studies["W"], rx.port)[-1]
    finally:
        rx.stop()
    assert final.Status == RetrieveStatus.UNABLE_TO_PERFORM_SUBOPERATIONS
    assert final.NumberOfFailedSuboperations == 2
    assert "storage tier unavailable" in final.ErrorComment, final.ErrorComment
    assert _failed_uids(identifier) == {tiered.sops["W1"], tiered.sops["W2"]}
