"""Two DICOMweb services on one DuckLake catalog (real PostgreSQL and SeaweedFS), each with its
own data folder, as replicas on two hosts would be: a study ingested through one is answered
by both."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import uvicorn
from dicomweb_client.api import DICOMwebClient

from tests.catalog.conftest import land
from tests.catalog.test_compaction import _study
from tests.conftest import lake_settings
from tests.dicomweb.conftest import start_server
from vannah_pipelines.catalog.ingest import IngestPaths, ingest_batches
from vannah_pipelines.catalog.lake import LakeConfig, init_lake
from vannah_pipelines.settings import Settings, load_settings


@pytest.fixture
def services(tmp_path: Path, lake_config: LakeConfig) -> Iterator[list[tuple[Settings, str]]]:
    """Two uvicorn DICOMweb services, data folders ``a/`` and ``b/``, one lake."""
    running: list[tuple[uvicorn.Server, threading.Thread]] = []
    found: list[tuple[Settings, str]] = []
    init_lake(lake_config)  # as the Dagster deployment does before the services start
    try:
        for name in ("a", "b"):
            settings = load_settings(data_dir=tmp_path / name, **lake_settings(lake_config))
            server, thread, port = start_server(settings)
            running.append((server, thread))
            found.append((settings, f"http://127.0.0.1:{port}/dicom-web"))
        yield found
    finally:
        for server, thread in running:
            server.should_exit = True
            thread.join(timeout=30)


def test_a_study_ingested_through_one_service_is_answered_by_both(
    services: list[tuple[Settings, str]],
) -> None:
    """QIDO-RS (studies, series, instances) and WADO-RS metadata answer the same from the
    service whose host ingested the study and from the other one, which has no file of it.

    WADO-RS of the instances themselves from the other host is the storage tier's issue, not
    this one: the bytes are in the first host's hot folder, which the second cannot read.
    Today it answers 500 before any byte, saying the stored object is in no storage tier
    this host reads (not a broken stream); once the hot tier is shared storage it answers
    the bytes.

    An instance landed on one host and not ingested yet is answered by that host only (its
    landed overlay works on the lake as on local files), then by both once ingested.
    """
    (settings_a, url_a), (_, url_b) = services
    paths = IngestPaths.for_settings(settings_a)
    assert paths.lake is not None
    blobs = _study("CT", 4, "VHC-LAKE-1")
    ingest_batches(paths, [land(paths, blobs)])
    study = DICOMwebClient(url_a).search_for_studies(search_filters={"PatientID": "VHC-LAKE-1"})
    assert len(study) == 1
    study_uid = study[0]["0020000D"]["Value"][0]

    answers = []
    for url in (url_a, url_b):
        client = DICOMwebClient(url)
        studies = client.search_for_studies(search_filters={"PatientID": "VHC-LAKE-1"})
        series = client.search_for_series(study_uid)
        instances = client.search_for_instances(study_uid)
        metadata = client.retrieve_study_metadata(study_uid)
        answers.append((studies, series, instances, metadata))
        assert studies[0]["00201208"]["Value"] == [4]  # NumberOfStudyRelatedInstances
        assert len(instances) == 4 and len(metadata) == 4
        assert {m["00080018"]["Value"][0] for m in metadata} == {uid for uid, _ in blobs}

    def strip(found: tuple[list[dict[str, object]], ...]) -> tuple[object, ...]:
        # Retrieve URLs name each service's own origin: the rest must be identical.
        return tuple(
            [{k: v for k, v in item.items() if k != "00081190"} for item in part] for part in found
        )

    assert strip(answers[0]) == strip(answers[1])

    sop = instances[0]["00080018"]["Value"][0]
    series_uid = instances[0]["0020000E"]["Value"][0]
    path = f"/studies/{study_uid}/series/{series_uid}/instances/{sop}"
    accept = {"Accept": "multipart/related; type=application/dicom"}
    here = requests.get(url_a + path, headers=accept, timeout=30)
    assert here.status_code == 200
    there = requests.get(url_b + path, headers=accept, timeout=30)
    assert there.status_code == 500, there.status_code
    assert "in no storage tier this service reads" in there.text

    # Landed on host A, not ingested yet: A answers it (its landed overlay), B not yet;
    # once ingested into the lake, both, once each.
    batch = land(paths, _study("US", 2, "VHC-LAKE-2"))
    search = {"PatientID": "VHC-LAKE-2"}
    assert len(DICOMwebClient(url_a).search_for_studies(search_filters=search)) == 1
    assert DICOMwebClient(url_b).search_for_studies(search_filters=search) == []
    ingest_batches(paths, [batch])
    for url in (url_a, url_b):
        found = DICOMwebClient(url).search_for_studies(search_filters=search)
        assert len(found) == 1 and found[0]["00201208"]["Value"] == [2], url
