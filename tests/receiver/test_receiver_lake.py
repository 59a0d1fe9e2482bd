"""The receiver's Q/R on the DuckLake catalog (real PostgreSQL and SeaweedFS): a worker on
one host finds a study that an ingest run on another host appended to the lake."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from receiver_support import Worker

from receiver.contexts import STUDY_ROOT_FIND
from tests.catalog.conftest import land
from tests.catalog.test_compaction import _study
from tests.conftest import lake_settings
from vannah_pipelines.catalog.ingest import IngestPaths, ingest_batches
from vannah_pipelines.catalog.lake import LakeConfig, init_lake
from vannah_pipelines.settings import load_settings


@pytest.mark.parametrize("name", ["fast", "pynetdicom"])
def test_c_find_on_the_lake_finds_a_study_ingested_on_another_host(
    name: str, start_worker: Callable[..., Worker], lake_config: LakeConfig, tmp_path: Path
) -> None:
    init_lake(lake_config)
    worker = start_worker(name, data_dir=tmp_path / "rx", **lake_settings(lake_config))
    ingesting = load_settings(data_dir=tmp_path / "ingest-host", **lake_settings(lake_config))
    paths = IngestPaths.for_settings(ingesting)
    blobs = _study("MR", 3, "VHC-LAKE-QR")
    ingest_batches(paths, [land(paths, blobs)])

    ae = AE(ae_title="LAKEFIND")
    ae.add_requested_context(STUDY_ROOT_FIND)
    assoc = ae.associate("127.0.0.1", worker.port, ae_title="VANNAHCLOUD")
    assert assoc.is_established
    try:
        query = pydicom.Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.PatientID = "VHC-LAKE-QR"
        query.StudyInstanceUID = ""
        query.ModalitiesInStudy = ""
        query.NumberOfStudyRelatedInstances = ""
        answers = list(assoc.send_c_find(query, STUDY_ROOT_FIND))
        found = [ds for status, ds in answers if int(status.Status) in (0xFF00, 0xFF01)]
        assert [int(s.Status) for s, _ in answers][-1] == 0x0000
        assert len(found) == 1
        study = found[0]
        assert (study.ModalitiesInStudy, int(study.NumberOfStudyRelatedInstances)) == ("MR", 3)

        series = pydicom.Dataset()
        series.QueryRetrieveLevel = "SERIES"
        series.StudyInstanceUID = study.StudyInstanceUID
        series.SeriesInstanceUID = ""
        series_uids = [
            str(ds.SeriesInstanceUID)
            for status, ds in assoc.send_c_find(series, STUDY_ROOT_FIND)
            if int(status.Status) in (0xFF00, 0xFF01)
        ]
        assert len(series_uids) == 2
        sops = set()
        for series_uid in series_uids:
            images = pydicom.Dataset()
            images.QueryRetrieveLevel = "IMAGE"
            images.StudyInstanceUID = study.StudyInstanceUID
            images.SeriesInstanceUID = series_uid
            images.SOPInstanceUID = ""
            for status, ds in assoc.send_c_find(images, STUDY_ROOT_FIND):
                if int(status.Status) in (0xFF00, 0xFF01):
                    sops.add(str(ds.SOPInstanceUID))
        assert sops == {uid for uid, _ in blobs}
    finally:
        assoc.release()
    assert not list((tmp_path / "rx").glob("**/*.parquet"))  # nothing local on this host
