"""An instance answers QIDO-RS, WADO-RS and C-FIND right after its acknowledgement, before
any ingest run (no Dagster here at all: only the landed overlay can answer), and the same
after ingest indexes it and after compaction merges it."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient

from tests.dicomweb.conftest import start_server
from tests.receiver.receiver_support import ReceiverProcess, free_port
from vannah_pipelines.catalog.compaction import compact
from vannah_pipelines.catalog.ingest import IngestPaths, ingest_batches
from vannah_pipelines.dicom.synthetic import write_study
from vannah_pipelines.landing.layout import LandingZone
from vannah_pipelines.settings import load_settings


@pytest.fixture
def platform(tmp_path: Path) -> Iterator[tuple[ReceiverProcess, str, Path]]:
    data = tmp_path / "data"
    receiver = ReceiverProcess(data_dir=data, port=free_port(), workers=2).start()
    settings = load_settings(data_dir=data)
    server, thread, port = start_server(settings)
    try:
        yield receiver, f"http://127.0.0.1:{port}/dicom-web", data
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        receiver.stop()


def _findscu(port: int, study: str, out: Path) -> list[pydicom.Dataset]:
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            "findscu",
            "-S",
            "-aec",
            "VANNAHCLOUD",
            "-X",
            "-od",
            str(out),
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            f"StudyInstanceUID={study}",
            "-k",
            "NumberOfStudyRelatedInstances",
            "-k",
            "ModalitiesInStudy",
            "127.0.0.1",
            str(port),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def _answers(url: str, port: int, study: str, sops: dict[str, bytes], out: Path) -> int:
    """QIDO-RS, WADO-RS (bytes compared) and C-FIND for `study`; returns the instances QIDO
    counts."""
    client = DICOMwebClient(url)
    found = client.search_for_studies(search_filters={"StudyInstanceUID": study})
    assert len(found) == 1, found
    count = int(found[0]["00201208"]["Value"][0])
    instances = client.search_for_instances(study_instance_uid=study)
    assert {i["00080018"]["Value"][0] for i in instances} == set(sops)
    sop = sorted(sops)[0]
    series = next(i["0020000E"]["Value"][0] for i in instances if i["00080018"]["Value"][0] == sop)
    got = client.retrieve_instance(study, series, sop)
    assert got.SOPInstanceUID == sop
    assert got.PixelData == pydicom.dcmread(BytesIO(sops[sop])).PixelData
    answers = _findscu(port, study, out)
    assert [str(a.StudyInstanceUID) for a in answers] == [study]
    assert int(answers[0].NumberOfStudyRelatedInstances) == count
    return count


def test_an_acknowledged_instance_answers_at_once(
    platform: tuple[ReceiverProcess, str, Path], tmp_path: Path
) -> None:
    receiver, url, data = platform
    study = write_study(tmp_path / "study", "CT", series=2, instances_per_series=3)
    sops = {pydicom.dcmread(p).SOPInstanceUID: p.read_bytes() for p in study.files}
    subprocess.run(
        [
            "storescu",
            "-aec",
            "VANNAHCLOUD",
            "127.0.0.1",
            str(receiver.port),
            *[str(p) for p in study.files],
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    # storescu has returned: every instance was acknowledged. No sleep, no ingest.
    started = time.monotonic()
    assert _answers(url, receiver.port, study.study_uid, sops, tmp_path / "f1") == len(sops)
    assert time.monotonic() - started < 30  # a hang is a failure, not a latency figure

    # Ingest indexes the sealed batch (as the Dagster run would): the same answers.
    settings = load_settings(data_dir=data)
    zone = LandingZone(settings.landing_dir)
    deadline = time.monotonic() + 30
    while not zone.sealed_batches() and time.monotonic() < deadline:
        time.sleep(0.1)
    paths = IngestPaths(
        settings.landing_dir, settings.hot_dir, settings.catalog_dir, settings.quarantine_dir
    )
    ingest_batches(paths, [b.batch_id for b in zone.sealed_batches()])
    assert not list(settings.landing_dir.glob("*/*/*.dcm"))
    assert _answers(url, receiver.port, study.study_uid, sops, tmp_path / "f2") == len(sops)

    # Compaction merges it: the same answers again.
    compact(settings.catalog_dir)
    assert _answers(url, receiver.port, study.study_uid, sops, tmp_path / "f3") == len(sops)
