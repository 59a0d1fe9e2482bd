"""Query/Retrieve against a real ``python -m receiver``: DCMTK findscu, movescu, getscu and a
storescp destination, on an archive built by storescu + ingest."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    AllStoragePresentationContexts,
    StoragePresentationContexts,
    build_role,
    evt,
)
from receiver_support import (
    DCMTK_ENV,
    TEST_FILES,
    ReceiverProcess,
    dataset_bytes_of_file,
    free_ports,
    wait_sealed,
)

from receiver.status import FindStatus, RetrieveStatus
from vannah_pipelines.catalog.ingest import IngestPaths, ingest_batches
from vannah_pipelines.catalog.reader import CatalogReader
from vannah_pipelines.dicom.synthetic import make_instance, to_part10, write_study
from vannah_pipelines.landing.layout import LandingZone
from vannah_pipelines.settings import load_settings

pytestmark = pytest.mark.integration

AEC = "VANNAHCLOUD"
DEST_AET = "MOVEDEST"
STRICT_AET = "STRICTDEST"  # a storescp accepting uncompressed syntaxes only
PICKY_AET = "PICKYDEST"  # a pynetdicom storage SCP answering the statuses a test sets
PYDICOM_FILES = ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "rtplan.dcm")
NON_ASCII_NAME = "Müller^Jürgen"
PATHS = ["fast", "pynetdicom"]  # the DIMSE paths C-FIND is served on


@dataclass
class Archive:
    receiver: ReceiverProcess
    data_dir: Path
    studies: dict[str, list[Path]]  # study uid -> files sent
    patients: dict[str, str]  # study uid -> patient id
    dest_port: int
    strict_port: int
    picky_port: int

    @property
    def hot(self) -> Path:
        return self.data_dir / "hot"

    def stored(self) -> dict[str, Path]:
        """SOP Instance UID -> hot-tier file, from the catalog."""
        reader = CatalogReader(self.data_dir / "catalog")
        try:
            rows = reader.query("SELECT sop_instance_uid, storage_key FROM instances")
        finally:
            reader.close()
        return {uid: self.hot / key for uid, key in rows}


def _run(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, env=DCMTK_ENV, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def archive(request: pytest.FixtureRequest, built_archive: Archive) -> Iterator[Archive]:
    """The archive served on the DIMSE path ``request.param``: "fast" (the receiver as it
    runs, C-FIND on its fast path) by default; "pynetdicom" is a second receiver on the same
    data folder with the fast path off. The C-FIND tests run on both (``indirect``)."""
    if getattr(request, "param", "fast") == "fast":
        yield built_archive
        return
    rx = ReceiverProcess(
        data_dir=built_archive.data_dir,
        port=0,
        workers=1,
        env={**built_archive.receiver.env, "VANNAH_RECEIVER_FAST_STORE": "false"},
        runs=100,  # its port and log files apart from the first receiver's
    ).start()
    yield dataclasses.replace(built_archive, receiver=rx)
    if rx.proc is not None and rx.proc.poll() is None:
        rx.stop()


@pytest.fixture(scope="module")
def built_archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    root = tmp_path_factory.mktemp("qr-archive")
    data_dir = root / "data"
    dest_port, strict_port, picky_port, port = free_ports(4)
    modalities = {
        "dest": [DEST_AET, "127.0.0.1", dest_port],
        "strict": {"AET": STRICT_AET, "Host": "127.0.0.1", "Port": strict_port},
        "picky": [PICKY_AET, "127.0.0.1", picky_port],
        # The SCUs that query and retrieve are known peers too: with DicomModalities set,
        # unknown AE titles may only store and echo (docs/security.md).
        **{scu.lower(): [scu, "127.0.0.1", 104] for scu in ("FINDSCU", "MOVESCU", "GETSCU")},
        "qrtest": ["QRTEST", "127.0.0.1", 104],
    }
    rx = ReceiverProcess(
        data_dir=data_dir,
        port=port,
        workers=2,
        env={"VANNAH_DICOM_MODALITIES": json.dumps(modalities)},
    ).start()
    studies: dict[str, list[Path]] = {}
    patients: dict[str, str] = {}
    src = root / "src"
    plan = [
        ("CT", "QR-PAT-1", "20240110", 2),
        ("MR", "QR-PAT-1", "20240115", 1),
        ("US", "QR-PAT-2", "20240201", 1),
        ("CT", "QR-PAT-3", "20240305", 1),
    ]
    for index, (modality, patient, date, series) in enumerate(plan):
        study = write_study(
            src / f"s{index}",
            modality,
            series=series,
            instances_per_series=2,
            patient_id=patient,
            study_date=date,
        )
        studies[study.study_uid] = study.files
        patients[study.study_uid] = patient
    # One study with a non-ASCII patient name (UTF-8).
    ds = make_instance("CR", patient_id="QR-PAT-UTF8", patient_name=NON_ASCII_NAME)
    ds.SpecificCharacterSet = "ISO_IR 192"
    utf8 = src / "utf8" / f"{ds.SOPInstanceUID}.dcm"
    utf8.parent.mkdir(parents=True)
    utf8.write_bytes(to_part10(ds))
    studies[str(ds.StudyInstanceUID)] = [utf8]
    patients[str(ds.StudyInstanceUID)] = "QR-PAT-UTF8"
    for path in _sequence_study(src / "seq"):
        meta = pydicom.dcmread(path, stop_before_pixels=True)
        studies.setdefault(str(meta.StudyInstanceUID), []).append(path)
        patients[str(meta.StudyInstanceUID)] = SEQ_PATIENT
    for name in PYDICOM_FILES:
        path = TEST_FILES / name
        meta = pydicom.dcmread(path, stop_before_pixels=True)
        studies.setdefault(str(meta.StudyInstanceUID), []).append(path)
        patients[str(meta.StudyInstanceUID)] = str(meta.get("PatientID", ""))
    files = [p for paths in studies.values() for p in paths]
    jpeg2000 = TEST_FILES / "JPEG2000.dcm"
    implicit = [str(p) for u, ps in studies.items() if patients[u] == "QR-PAT-2" for p in ps]
    plain = [str(p) for p in files if p != jpeg2000 and str(p) not in implicit]
    # storescu proposes a compressed syntax only when told to: the JPEG 2000 file alone;
    # QR-PAT-2's study is stored in Implicit VR Little Endian (C-GET re-encodes it).
    for options, paths in (([], plain), (["-xw"], [str(jpeg2000)]), (["-xi"], implicit)):
        result = _run(["storescu", "-aec", AEC, *options, "127.0.0.1", str(rx.port), *paths])
        assert result.returncode == 0, result.stderr
    uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}
    landed = wait_sealed(data_dir, uids)
    assert uids <= landed.keys(), rx.log()
    settings = load_settings(data_dir=data_dir)
    zone = LandingZone(settings.landing_dir)
    ingest_batches(
        IngestPaths(
            settings.landing_dir, settings.hot_dir, settings.catalog_dir, settings.quarantine_dir
        ),
        [b.batch_id for b in zone.sealed_batches()],
    )
    yield Archive(rx, data_dir, studies, patients, dest_port, strict_port, picky_port)
    if rx.proc is not None and rx.proc.poll() is None:
        rx.stop()


SEQ_PATIENT = "QRSEQ-1"


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "99VHC"
    item.CodeMeaning = meaning
    return item


def _request(procedure: str, step: str) -> Dataset:
    item = Dataset()
    item.RequestedProcedureID = procedure
    item.ScheduledProcedureStepID = step
    return item


def _sequence_study(folder: Path) -> list[Path]:
    """Two studies of one patient carrying sequences: a CT study (procedure code CTCHEST,
    two series with two and one request items) and an MR study (MRBRAIN, no requests)."""
    folder.mkdir(parents=True)
    paths = []
    ct_study, mr_study = generate_uid(), generate_uid()
    plan = [
        (
            "CT",
            ct_study,
            1,
            _code("CTCHEST", "CT Chest"),
            [_request("RP1", "SPS1"), _request("RP2", "SPS2")],
        ),
        ("CT", ct_study, 2, _code("CTCHEST", "CT Chest"), [_request("RP3", "SPS3")]),
        ("MR", mr_study, 1, _code("MRBRAIN", "MR Brain"), None),
    ]
    for modality, study, series_number, code, requests in plan:
        overrides: dict[str, object] = {
            "ProcedureCodeSequence": Sequence([code]),
            "PatientAge": "045Y",
        }
        if requests is not None:
            overrides["RequestAttributesSequence"] = Sequence(requests)
        ds = make_instance(
            modality,
            study_uid=study,
            series_uid=generate_uid(),
            patient_id=SEQ_PATIENT,
            study_date="20230601",
            series_number=series_number,
            **overrides,
        )
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        path.write_bytes(to_part10(ds))
        paths.append(path)
    return paths


def _findscu(
    archive: Archive, out: Path, keys: list[str], *, root: str = "-S", extra: list[str] = ()
) -> tuple[subprocess.CompletedProcess[str], list[Dataset]]:
    out.mkdir(parents=True, exist_ok=True)
    args = ["findscu", "-v", root, "-aec", AEC, "-X", "-od", str(out), *extra]
    for key in keys:
        args += ["-k", key]
    result = _run([*args, "127.0.0.1", str(archive.receiver.port)])
    answers = [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]
    return result, answers


def _keywords(ds: Dataset) -> set[str]:
    return {e.keyword for e in ds}


# --- C-FIND -------------------------------------------------------------------------------


@pytest.mark.parametrize("archive", PATHS, indirect=True)
def test_findscu_study_root_study_level_returns_exactly_requested_keys(
    archive: Archive, tmp_path: Path
) -> None:
    result, answers = _findscu(
        archive,
        tmp_path,
        ["QueryRetrieveLevel=STUDY", "PatientID=QR-PAT-1", "StudyDate", "ModalitiesInStudy"],
    )
    assert result.returncode == 0, result.stderr
    expected = {u for u, p in archive.patients.items() if p == "QR-PAT-1"}
    assert {str(a.StudyInstanceUID) for a in answers} == expected
    for answer in answers:
        assert _keywords(answer) == {
            "QueryRetrieveLevel",
            "PatientID",
            "StudyDate",
            "ModalitiesInStudy",
            "StudyInstanceUID",
        }
        assert answer.QueryRetrieveLevel == "STUDY"
        assert answer.PatientID == "QR-PAT-1"
    assert sorted(a.StudyDate for a in answers) == ["20240110", "20240115"]


@pytest.mark.parametrize("archive", PATHS, indirect=True)
def test_findscu_date_range_wildcard_and_uid_list(archive: Archive, tmp_path: Path) -> None:
    _, answers = _findscu(
        archive,
        tmp_path / "range",
        ["QueryRetrieveLevel=STUDY", "StudyDate=20240112-20240301", "PatientID=QR-PAT-?"],
    )
    assert sorted(str(a.PatientID) for a in answers) == ["QR-PAT-1", "QR-PAT-2"]
    wanted = sorted(u for u, p in archive.patients.items() if p in ("QR-PAT-2", "QR-PAT-3"))
    _, answers = _findscu(
        archive,
        tmp_path / "list",
        ["QueryRetrieveLevel=STUDY", "StudyInstanceUID=" + "\\".join(wanted)],
    )
    assert sorted(str(a.StudyInstanceUID) for a in answers) == wanted
    assert all(_keywords(a) == {"QueryRetrieveLevel", "StudyInstanceUID"} for a in answers)


@pytest.mark.parametrize("archive", PATHS, indirect=True)
def test_findscu_series_and_image_levels(archive: Archive, tmp_path: Path) -> None:
    study = next(
        u for u, p in archive.patients.items() if p == "QR-PAT-1" and len(archive.studies[u]) == 4
    )
    _, series = _findscu(
        archive,
        tmp_path / "series",
        [
            "QueryRetrieveLevel=SERIES",
            f"StudyInstanceUID={study}",
            "Modality",
            "SeriesNumber",
            "NumberOfSeriesRelatedInstances",
        ],
    )
    assert len(series) == 2
    for answer in series:
        assert _keywords(answer) == {
            "QueryRetrieveLevel",
            "StudyInstanceUID",
            "SeriesInstanceUID",
            "Modality",
            "SeriesNumber",
            "NumberOfSeriesRelatedInstances",
        }
        assert answer.Modality == "CT"
        assert int(answer.NumberOfSeriesRelatedInstances) == 2
    one = str(series[0].SeriesInstanceUID)
    _, images = _findscu(
        archive,
        tmp_path / "image",
        [
            "QueryRetrieveLevel=IMAGE",
            f"StudyInstanceUID={study}",
            f"SeriesInstanceUID={one}",
            "SOPClassUID",
            "InstanceNumber",
        ],
    )
    assert sorted(int(a.InstanceNumber) for a in images) == [1, 2]
    for answer in images:
        assert _keywords(answer) == {
            "QueryRetrieveLevel",
            "StudyInstanceUID",
            "SeriesInstanceUID",
            "SOPInstanceUID",
            "SOPClassUID",
            "InstanceNumber",
        }


@pytest.mark.parametrize("archive", PATHS, indirect=True)
def test_findscu_patient_root_every_level(archive: Archive, tmp_path: Path) -> None:
    _, patients = _findscu(
        archive,
        tmp_path / "p",
        ["QueryRetrieveLevel=PATIENT", "PatientID=QR-PAT-?", "NumberOfPatientRelatedStudies"],
        root="-P",
    )
    counts = {str(a.PatientID): int(a.NumberOfPatientRelatedStudies) for a in patients}
    assert counts == {"QR-PAT-1": 2, "QR-PAT-2": 1, "QR-PAT-3": 1}
    _, studies = _findscu(
        archive,
        tmp_path / "s",
        ["QueryRetrieveLevel=STUDY", "PatientID=QR-PAT-2", "StudyDate"],
        root="-P",
    )
    assert len(studies) == 1
    study = str(studies[0].StudyInstanceUID)
    _, series = _findscu(
        archive,
        tmp_path / "se",
        ["QueryRetrieveLevel=SERIES", "PatientID=QR-PAT-2", f"StudyInstanceUID={study}"],
        root="-P",
    )
    assert len(series) == 1
    assert _keywords(series[0]) == {
        "QueryRetrieveLevel",
        "PatientID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
    }
    _, images = _findscu(
        archive,
        tmp_path / "i",
        [
            "QueryRetrieveLevel=IMAGE",
            "PatientID=QR-PAT-2",
            f"StudyInstanceUID={study}",
            f"SeriesInstanceUID={series[0].SeriesInstanceUID}",
        ],
        root="-P",
    )
    assert len(images) == 2


def _seq_studies(archive: Archive) -> dict[str, str]:
    """Study UID -> modality of the two sequence studies."""
    return {
        u: str(pydicom.dcmread(ps[0], stop_before_pixels=True).Modality)
        for u, ps in archive.studies.items()
        if archive.patients[u] == SEQ_PATIENT
    }


def _codes(answer: Dataset) -> list[dict[str, str]]:
    return [{e.keyword: str(e.value) for e in item} for item in answer.ProcedureCodeSequence]


@pytest.mark.parametrize("archive", PATHS, indirect=True)
def test_findscu_sequence_matching_at_study_level(archive: Archive, tmp_path: Path) -> None:
    """PS3.4 C.2.2.2.6: a sequence key with one item matches when a stored item matches all
    of the item's keys; the answer carries the matching items with the requested keys."""
    by_modality = {m: u for u, m in _seq_studies(archive).items()}
    result, answers = _findscu(
        archive,
        tmp_path / "single",
        [
            "QueryRetrieveLevel=STUDY",
            "ProcedureCodeSequence[0].CodeValue=CTCHEST",
            "ProcedureCodeSequence[0].CodeMeaning",
        ],
    )
    assert result.returncode == 0, result.stderr
    assert [str(a.StudyInstanceUID) for a in answers] == [by_modality["CT"]]
    assert _codes(answers[0]) == [{"CodeValue": "CTCHEST", "CodeMeaning": "CT Chest"}]
    assert _keywords(answers[0]) == {
        "QueryRetrieveLevel",
        "StudyInstanceUID",
        "ProcedureCodeSequence",
    }
    _, answers = _findscu(
        archive,
        tmp_path / "wildcard",
        [
            "QueryRetrieveLevel=STUDY",
            f"PatientID={SEQ_PATIENT}",
            "ProcedureCodeSequence[0].CodeMeaning=*Brain",
            "ProcedureCodeSequence[0].CodingSchemeDesignator=99VHC",
        ],
    )
    assert [str(a.StudyInstanceUID) for a in answers] == [by_modality["MR"]]
    assert _codes(answers[0]) == [{"CodingSchemeDesignator": "99VHC", "CodeMeaning": "MR Brain"}]
    _, answers = _findscu(
        archive,
        tmp_path / "none",
        ["QueryRetrieveLevel=STUDY", "ProcedureCodeSequence[0].CodeValue=NOSUCH"],
    )
    assert answers == []


def _other_study_asking(archive: Archive, out: Path, key: str) -> Dataset:
    """The one answer for QR-PAT-3's study (no sequences, no age) with `key` requested."""
    other = next(u for u, p in archive.patients.items() if p == "QR-PAT-3")
    _, answers = _findscu(
        archive, out, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={other}", key]
    )
    assert len(answers) == 1
    return answers[0]


@pytest.mark.parametrize("archive", PATHS, indirect=True)
def test_findscu_empty_sequence_key_returns_every_item_whole(
    archive: Archive, tmp_path: Path
) -> None:
    _, answers = _findscu(
        archive,
        tmp_path,
        ["QueryRetrieveLevel=STUDY", f"PatientID={SEQ_PATIENT}", "ProcedureCodeSequence"],
    )
    found = {str(a.StudyInstanceUID): _codes(a) for a in answers}
    codes = {"CT": ("CTCHEST", "CT Chest"), "MR": ("MRBRAIN", "MR Brain")}
    assert found == {
        uid: [
            {
                "CodeValue": codes[modality][0],
                "CodingSchemeDesignator": "99VHC",
                "CodeMeaning": codes[modality][1],
            }
        ]
        for uid, modality in _seq_studies(archive).items()
    }
    # A study without the sequence still matches, with the sequence empty.
    answer = _other_study_asking(archive, tmp_path / "other", "ProcedureCodeSequence")
    assert "ProcedureCodeSequence" in answer
    assert len(answer.ProcedureCodeSequence) == 0


@pytest.mark.parametrize("archive", PATHS, indirect=True)
def test_findscu_sequence_matching_at_series_level_returns_matching_items_only(
    archive: Archive, tmp_path: Path
) -> None:
    ct = next(u for u, m in _seq_studies(archive).items() if m == "CT")
    _, answers = _findscu(
        archive,
        tmp_path,
        [
            "QueryRetrieveLevel=SERIES",
            f"StudyInstanceUID={ct}",
            "SeriesNumber",
            "RequestAttributesSequence[0].RequestedProcedureID=RP2",
            "RequestAttributesSequence[0].ScheduledProcedureStepID",
        ],
    )
    assert [int(a.SeriesNumber) for a in answers] == [1]
    items = answers[0].RequestAttributesSequence
    assert [(i.RequestedProcedureID, i.ScheduledProcedureStepID) for i in items] == [
        ("RP2", "SPS2")
    ]
    _, answers = _findscu(
        archive,
        tmp_path / "both",
        [
            "QueryRetrieveLevel=SERIES",
            f"StudyInstanceUID={ct}",
            "SeriesNumber",
            "RequestAttributesSequence[0].ScheduledProcedureStepID=SPS*",
        ],
    )
    steps = {
        int(a.SeriesNumber): [str(i.ScheduledProcedureStepID) for i in a.RequestAttributesSequence]
        for a in answers
    }
    assert steps == {1: ["SPS1", "SPS2"], 2: ["SPS3"]}


@pytest.mark.parametrize("archive", PATHS, indirect=True)
def test_findscu_attribute_outside_the_catalog_columns_is_matched_from_headers(
    archive: Archive, tmp_path: Path
) -> None:
    _, answers = _findscu(
        archive, tmp_path, ["QueryRetrieveLevel=STUDY", "PatientAge=045Y", "ModalitiesInStudy"]
    )
    assert {str(a.StudyInstanceUID) for a in answers} == set(_seq_studies(archive))
    assert all(a.PatientAge == "045Y" for a in answers)
    answer = _other_study_asking(archive, tmp_path / "returned", "PatientAge")
    assert answer.PatientAge in ("", None)


@pytest.mark.parametrize("archive", PATHS, indirect=True)
def test_sequence_key_with_two_items_is_refused(archive: Archive) -> None:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.ProcedureCodeSequence = Sequence([_code("A", "a"), _code("B", "b")])
    responses = _pynetdicom_find(archive, identifier, STUDY_ROOT_FIND)
    assert [s for s, _ in responses] == [FindStatus.UNABLE_TO_PROCESS]


@pytest.mark.parametrize("archive", PATHS, indirect=True)
def test_findscu_non_ascii_answer_is_utf8(archive: Archive, tmp_path: Path) -> None:
    _, answers = _findscu(
        archive,
        tmp_path,
        ["QueryRetrieveLevel=STUDY", "PatientID=QR-PAT-UTF8", "PatientName"],
    )
    assert len(answers) == 1
    assert answers[0].SpecificCharacterSet == "ISO_IR 192"
    assert str(answers[0].PatientName) == NON_ASCII_NAME


@pytest.mark.parametrize("archive", PATHS, indirect=True)
def test_findscu_cancel_stops_answers(archive: Archive, tmp_path: Path) -> None:
    result, answers = _findscu(
        archive,
        tmp_path / "c",
        ["QueryRetrieveLevel=STUDY", "StudyInstanceUID"],
        extra=["--cancel", "1"],
    )
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert "Sending C-CANCEL" in output or "Cancel" in output, output
    # The archive is small: every answer may be on the wire before the C-CANCEL arrives.
    if "Received Final Find Response (Matching terminated due to Cancel request)" in output:
        assert len(answers) < len(archive.studies)


def _study_of(archive: Archive, patient: str, files: int) -> str:
    return next(
        u for u, p in archive.patients.items() if p == patient and len(archive.studies[u]) == files
    )


def _pynetdicom_find(
    archive: Archive, identifier: Dataset, model: str
) -> list[tuple[int, Dataset | None]]:
    ae = AE(ae_title="QRTEST")
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", archive.receiver.port, ae_title=AEC)
    assert assoc.is_established
    try:
        return [
            (int(status.Status), ident)
            for status, ident in assoc.send_c_find(identifier, model)
            if status is not None and "Status" in status
        ]
    finally:
        assoc.release()


STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"


@pytest.mark.parametrize(
    ("model", "elements", "status"),
    [
        # QueryRetrieveLevel missing
        (STUDY_ROOT_FIND, {"StudyInstanceUID": ""}, FindStatus.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS),
        # invalid level
        (
            STUDY_ROOT_FIND,
            {"QueryRetrieveLevel": "FOO"},
            FindStatus.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
        ),
        # PATIENT level is not in the Study Root model
        (
            STUDY_ROOT_FIND,
            {"QueryRetrieveLevel": "PATIENT"},
            FindStatus.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
        ),
        # Patient Root STUDY level without the PatientID unique key
        (
            PATIENT_ROOT_FIND,
            {"QueryRetrieveLevel": "STUDY"},
            FindStatus.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
        ),
        # SERIES level without the study's unique key
        (
            STUDY_ROOT_FIND,
            {"QueryRetrieveLevel": "SERIES", "Modality": "CT"},
            FindStatus.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
        ),
        # a UID list for a higher level's unique key
        (
            STUDY_ROOT_FIND,
            {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": "1.2.3\\1.2.4"},
            FindStatus.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
        ),
        # a malformed UID, a malformed date range
        (
            STUDY_ROOT_FIND,
            {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "1.2.abc"},
            FindStatus.UNABLE_TO_PROCESS,
        ),
        (
            STUDY_ROOT_FIND,
            {"QueryRetrieveLevel": "STUDY", "StudyDate": "2024-01-01"},
            FindStatus.UNABLE_TO_PROCESS,
        ),
    ],
)
@pytest.mark.parametrize("archive", PATHS, indirect=True)
def test_malformed_find_identifiers_are_refused(
    archive: Archive, model: str, elements: dict[str, str], status: int
) -> None:
    before = sorted(p.relative_to(archive.data_dir) for p in archive.data_dir.rglob("*"))
    identifier = Dataset()
    for keyword, value in elements.items():
        setattr(identifier, keyword, value)
    responses = _pynetdicom_find(archive, identifier, model)
    assert [s for s, _ in responses] == [status]
    after = sorted(p.relative_to(archive.data_dir) for p in archive.data_dir.rglob("*"))
    assert before == after


@pytest.mark.parametrize("archive", PATHS, indirect=True)
def test_pynetdicom_c_cancel_during_find(archive: Archive) -> None:
    ae = AE(ae_title="QRTEST")
    ae.add_requested_context(STUDY_ROOT_FIND)
    assoc = ae.associate("127.0.0.1", archive.receiver.port, ae_title=AEC)
    assert assoc.is_established
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "SERIES"
    identifier.StudyInstanceUID = _study_of(archive, "QR-PAT-1", 4)
    identifier.SeriesInstanceUID = ""
    statuses = []
    try:
        for status, _ident in assoc.send_c_find(identifier, STUDY_ROOT_FIND, msg_id=7):
            statuses.append(int(status.Status))
            if len(statuses) == 1:
                assoc.send_c_cancel(7, query_model=STUDY_ROOT_FIND)
                time.sleep(0.2)
    finally:
        assoc.release()
    assert statuses[0] == FindStatus.PENDING
    assert statuses[-1] in (FindStatus.CANCEL, FindStatus.SUCCESS)


# --- C-MOVE ------------------------------------------------------------------------------


@dataclass
class StoreSCP:
    proc: subprocess.Popen[bytes]
    out: Path

    def received(self) -> dict[str, Path]:
        files = {}
        for path in self.out.rglob("*"):
            if path.is_file():
                try:
                    uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
                except Exception:
                    continue
                files[uid] = path
        return files


@pytest.fixture
def storescp(tmp_path: Path, archive: Archive) -> Iterator[StoreSCP]:
    out = tmp_path / "storescp"
    out.mkdir()
    proc = subprocess.Popen(
        ["storescp", "-aet", DEST_AET, "+xa", "+B", "-od", str(out), str(archive.dest_port)],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_port(archive.dest_port)
    yield StoreSCP(proc, out)
    proc.terminate()
    proc.wait(timeout=30)


def _wait_port(port: int) -> None:
    import socket

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


def _movescu(archive: Archive, keys: list[str], dest: str = DEST_AET, root: str = "-S") -> str:
    args = ["movescu", "-v", root, "-aec", AEC, "-aem", dest]
    for key in keys:
        args += ["-k", key]
    result = _run([*args, "127.0.0.1", str(archive.receiver.port)])
    return result.stdout + result.stderr


def _assert_identical(received: dict[str, Path], stored: dict[str, Path], uids: set[str]) -> None:
    assert set(received) == uids
    for uid in uids:
        assert dataset_bytes_of_file(received[uid]) == dataset_bytes_of_file(stored[uid]), uid


def test_movescu_study_series_image_levels_byte_identical(
    archive: Archive, storescp: StoreSCP
) -> None:
    stored = archive.stored()
    study = _study_of(archive, "QR-PAT-1", 4)
    uids = {
        pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in archive.studies[study]
    }
    output = _movescu(archive, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}"])
    assert "Received Final Move Response (Success)" in output, output
    deadline = time.monotonic() + 10
    while len(storescp.received()) < 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    _assert_identical(storescp.received(), stored, uids)

    # series level (patient root), then image level
    for path in storescp.out.iterdir():
        path.unlink()
    ds = pydicom.dcmread(archive.studies[study][0], stop_before_pixels=True)
    series_uids = {
        pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
        for p in archive.studies[study]
        if pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID == ds.SeriesInstanceUID
    }
    output = _movescu(
        archive,
        [
            "QueryRetrieveLevel=SERIES",
            "PatientID=QR-PAT-1",
            f"StudyInstanceUID={study}",
            f"SeriesInstanceUID={ds.SeriesInstanceUID}",
        ],
        root="-P",
    )
    deadline = time.monotonic() + 10
    while len(storescp.received()) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    _assert_identical(storescp.received(), stored, series_uids)

    for path in storescp.out.iterdir():
        path.unlink()
    output = _movescu(
        archive,
        [
            "QueryRetrieveLevel=IMAGE",
            f"StudyInstanceUID={study}",
            f"SeriesInstanceUID={ds.SeriesInstanceUID}",
            f"SOPInstanceUID={ds.SOPInstanceUID}",
        ],
    )
    deadline = time.monotonic() + 10
    while not storescp.received() and time.monotonic() < deadline:
        time.sleep(0.1)
    _assert_identical(storescp.received(), stored, {str(ds.SOPInstanceUID)})


def test_pynetdicom_move_counts_and_compressed_file_identical(
    archive: Archive, storescp: StoreSCP
) -> None:
    jpeg = pydicom.dcmread(TEST_FILES / "JPEG2000.dcm", stop_before_pixels=True)
    responses = _pynetdicom_move(archive, str(jpeg.StudyInstanceUID), DEST_AET)
    final = responses[-1][0]
    assert final.Status == RetrieveStatus.SUCCESS
    assert final.NumberOfCompletedSuboperations == len(archive.studies[str(jpeg.StudyInstanceUID)])
    assert final.NumberOfFailedSuboperations == 0
    stored = archive.stored()
    received = storescp.received()
    assert dataset_bytes_of_file(received[str(jpeg.SOPInstanceUID)]) == dataset_bytes_of_file(
        stored[str(jpeg.SOPInstanceUID)]
    )


STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"


def _pynetdicom_move(
    archive: Archive, study: str, dest: str, *, cancel: bool = False
) -> list[tuple[Dataset, Dataset | None]]:
    """The C-MOVE responses; with `cancel`, a C-CANCEL follows the first pending one."""
    ae = AE(ae_title="QRTEST")
    ae.add_requested_context(STUDY_ROOT_MOVE)
    assoc = ae.associate("127.0.0.1", archive.receiver.port, ae_title=AEC)
    assert assoc.is_established
    answers = assoc.send_c_move(_study_key(study), dest, STUDY_ROOT_MOVE, msg_id=9)
    return _collect(assoc, answers, STUDY_ROOT_MOVE, 9, cancel=cancel)


def _study_key(study: str) -> Dataset:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study
    return identifier


def _collect(
    assoc: Any,
    answers: Iterator[tuple[Dataset, Dataset | None]],
    model: str,
    msg_id: int,
    *,
    cancel: bool,
) -> list[tuple[Dataset, Dataset | None]]:
    """Every response of a C-MOVE / C-GET, a C-CANCEL sent after the first with `cancel`;
    releases the association."""
    responses = []
    try:
        for status, answer in answers:
            responses.append((status, answer))
            if cancel and len(responses) == 1:
                assoc.send_c_cancel(msg_id, query_model=model)
        return responses
    finally:
        assoc.release()


def test_move_to_unknown_destination_is_a801(archive: Archive) -> None:
    study = _study_of(archive, "QR-PAT-2", 2)
    responses = _pynetdicom_move(archive, study, "NOBODY")
    assert [int(s.Status) for s, _ in responses] == [RetrieveStatus.MOVE_DESTINATION_UNKNOWN]
    output = _movescu(
        archive, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}"], dest="NOBODY"
    )
    assert "Refused: MoveDestinationUnknown" in output, output


def test_move_decompresses_for_an_uncompressed_only_peer_and_missing_file_is_b000(
    archive: Archive, tmp_path: Path
) -> None:
    out = tmp_path / "strict"
    out.mkdir()
    # storescp without +xa accepts uncompressed syntaxes only: JPEG 2000 goes decompressed.
    proc = subprocess.Popen(
        ["storescp", "-aet", STRICT_AET, "+B", "-od", str(out), str(archive.strict_port)],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_port(archive.strict_port)
        jpeg = pydicom.dcmread(TEST_FILES / "JPEG2000.dcm", stop_before_pixels=True)
        study = str(jpeg.StudyInstanceUID)
        responses = _pynetdicom_move(archive, study, STRICT_AET)
        final, identifier = responses[-1]
        total = len(archive.studies[study])
        assert final.Status == RetrieveStatus.SUCCESS
        assert final.NumberOfCompletedSuboperations == total
        assert final.NumberOfFailedSuboperations == 0
        copy = pydicom.dcmread(out / _received_name(out, str(jpeg.SOPInstanceUID)))
        assert copy.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        original = pydicom.dcmread(TEST_FILES / "JPEG2000.dcm")
        assert (copy.pixel_array == original.pixel_array).all()
        # a hot-tier file deleted before the move: that sub-operation fails
        victim_study = _study_of(archive, "QR-PAT-3", 2)
        stored = archive.stored()
        victim = pydicom.dcmread(archive.studies[victim_study][0], stop_before_pixels=True)
        hot_file = stored[str(victim.SOPInstanceUID)]
        backup = tmp_path / "backup.dcm"
        shutil.copy2(hot_file, backup)
        hot_file.unlink()
        try:
            responses = _pynetdicom_move(archive, victim_study, STRICT_AET)
        finally:
            shutil.copy2(backup, hot_file)
        final, identifier = responses[-1]
        assert final.Status == RetrieveStatus.SUBOPERATIONS_FAILED
        assert final.NumberOfCompletedSuboperations == 1
        assert final.NumberOfFailedSuboperations == 1
        assert identifier is not None
        assert str(identifier.FailedSOPInstanceUIDList) == str(victim.SOPInstanceUID)
        pending = [s for s, _ in responses[:-1]]
        assert all(int(s.Status) == RetrieveStatus.PENDING for s in pending)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _received_name(out: Path, uid: str) -> str:
    for path in out.iterdir():
        if str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) == uid:
            return path.name
    raise AssertionError(f"{uid} not received")


# --- C-GET -------------------------------------------------------------------------------


def _getscu(archive: Archive, out: Path, keys: list[str]) -> str:
    out.mkdir(parents=True, exist_ok=True)
    # +xe: getscu proposes Explicit VR Little Endian first, the stored syntax.
    args = ["getscu", "-v", "-S", "+xe", "-aec", AEC, "-od", str(out)]
    for key in keys:
        args += ["-k", key]
    result = _run([*args, "127.0.0.1", str(archive.receiver.port)])
    return result.stdout + result.stderr


def test_getscu_study_and_series_levels(archive: Archive, tmp_path: Path) -> None:
    stored = archive.stored()
    # Stored in Explicit VR Little Endian, the syntax we accept first: byte-identical.
    study = _study_of(archive, "QR-PAT-1", 4)
    uids = {_sop_uid(p) for p in archive.studies[study]}
    output = _getscu(
        archive, tmp_path / "study", ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}"]
    )
    received = {_sop_uid(p): p for p in (tmp_path / "study").iterdir()}
    assert set(received) == uids, output
    for uid in uids:
        assert dataset_bytes_of_file(received[uid]) == dataset_bytes_of_file(stored[uid]), uid
    # Stored in Implicit VR Little Endian, negotiated Explicit: same elements, re-encoded.
    study = _study_of(archive, "QR-PAT-2", 2)
    first = pydicom.dcmread(archive.studies[study][0], stop_before_pixels=True)
    output = _getscu(
        archive,
        tmp_path / "series",
        [
            "QueryRetrieveLevel=SERIES",
            f"StudyInstanceUID={study}",
            f"SeriesInstanceUID={first.SeriesInstanceUID}",
        ],
    )
    received = {_sop_uid(p): p for p in (tmp_path / "series").iterdir()}
    assert received, output
    for uid, path in received.items():
        got, want = pydicom.dcmread(path), pydicom.dcmread(stored[uid])
        assert got.SeriesInstanceUID == first.SeriesInstanceUID
        assert got.PixelData == want.PixelData
        assert [e.tag for e in got] == [e.tag for e in want]


def _sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_get_unknown_study_succeeds_with_no_suboperations(archive: Archive) -> None:
    ae = AE(ae_title="QRTEST")
    ae.add_requested_context(STUDY_ROOT_GET)
    assoc = ae.associate("127.0.0.1", archive.receiver.port, ae_title=AEC)
    assert assoc.is_established
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = "1.2.3.4.5.6.7"
    try:
        responses = list(assoc.send_c_get(identifier, STUDY_ROOT_GET))
    finally:
        assoc.release()
    assert [int(s.Status) for s, _ in responses] == [RetrieveStatus.SUCCESS]


def test_get_without_unique_key_is_refused(archive: Archive) -> None:
    ae = AE(ae_title="QRTEST")
    ae.add_requested_context(STUDY_ROOT_GET)
    assoc = ae.associate("127.0.0.1", archive.receiver.port, ae_title=AEC)
    assert assoc.is_established
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "SERIES"
    identifier.SeriesInstanceUID = "1.2.3"
    try:
        responses = list(assoc.send_c_get(identifier, STUDY_ROOT_GET))
    finally:
        assoc.release()
    assert [int(s.Status) for s, _ in responses] == [
        RetrieveStatus.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS
    ]


@dataclass
class PickySCP:
    """A pynetdicom storage SCP answering `statuses` in turn (then success), recording each
    request's command fields and data set bytes."""

    statuses: list[int]
    received: list[tuple[str, str, int, str, bytes]] = field(default_factory=list)
    delay: float = 0.0  # seconds each C-STORE takes
    abort_at: int | None = None  # abort the association on this C-STORE (0: the first)

    def handle(self, event: Any) -> int:
        time.sleep(self.delay)
        if self.abort_at == len(self.received):
            event.assoc.abort()
        request = event.request
        self.received.append(
            (
                str(request.AffectedSOPInstanceUID),
                str(request.MoveOriginatorApplicationEntityTitle or "").strip(),
                int(request.MoveOriginatorMessageID or 0),
                str(event.context.transfer_syntax),
                request.DataSet.getvalue(),
            )
        )
        return self.statuses.pop(0) if self.statuses else 0x0000


@contextlib.contextmanager
def _picky_scp(
    archive: Archive, statuses: list[int], syntaxes: list[str] | None = None
) -> Iterator[PickySCP]:
    scp = PickySCP(list(statuses))
    ae = AE(ae_title=PICKY_AET)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, syntaxes or ALL_TRANSFER_SYNTAXES)
    server = ae.start_server(
        ("127.0.0.1", archive.picky_port),
        block=False,
        evt_handlers=[(evt.EVT_C_STORE, scp.handle)],
    )
    try:
        yield scp
    finally:
        server.shutdown()


def test_move_counts_each_status_the_destination_answers(archive: Archive) -> None:
    """Our own storage association (vannah_pipelines/dimse/store_scu.py) sends the stored
    bytes with the move originator, and reads back success, warning and failure statuses."""
    study = _study_of(archive, "QR-PAT-1", 4)
    with _picky_scp(archive, [0x0000, 0xB007, 0xA700, 0x0000]) as scp:
        responses = _pynetdicom_move(archive, study, PICKY_AET)
    _assert_counted(archive, study, responses, scp, originator=(AEC, 9))


def _assert_counted(
    archive: Archive,
    study: str,
    responses: list[tuple[Dataset, Dataset | None]],
    scp: PickySCP,
    originator: tuple[str, int],
) -> None:
    """The responses to a retrieve of `study`'s 4 instances answered success, warning,
    failure, success: counts, failed UID, pending responses, bytes sent as stored."""
    final, identifier = responses[-1]
    assert final.Status == RetrieveStatus.SUBOPERATIONS_FAILED
    assert (
        final.NumberOfCompletedSuboperations,
        final.NumberOfWarningSuboperations,
        final.NumberOfFailedSuboperations,
    ) == (2, 1, 1)
    assert identifier is not None
    assert str(identifier.FailedSOPInstanceUIDList) == scp.received[2][0]
    # Pending responses: after the first sub-operation, then at most every 0.2 s.
    pending = [s for s, _ in responses[:-1]]
    assert pending and int(pending[0].NumberOfRemainingSuboperations) == 3
    for status in pending:
        assert int(status.Status) == RetrieveStatus.PENDING
        done = (
            status.NumberOfCompletedSuboperations
            + status.NumberOfWarningSuboperations
            + status.NumberOfFailedSuboperations
        )
        assert done + status.NumberOfRemainingSuboperations == 4
    stored = archive.stored()
    assert {r[0] for r in scp.received} == {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
        for p in archive.studies[study]
    }
    for uid, sent_by, sent_id, _syntax, data in scp.received:
        assert (sent_by, sent_id) == originator
        assert data == dataset_bytes_of_file(stored[uid])


def test_move_re_encodes_an_uncompressed_file_the_destination_cannot_take_as_stored(
    archive: Archive,
) -> None:
    study = _study_of(archive, "QR-PAT-2", 2)  # stored in Implicit VR Little Endian
    with _picky_scp(archive, [], [ExplicitVRLittleEndian]) as scp:
        responses = _pynetdicom_move(archive, study, PICKY_AET)
    assert responses[-1][0].Status == RetrieveStatus.SUCCESS
    assert len(scp.received) == 2
    stored = archive.stored()
    for uid, _originator, _id, syntax, data in scp.received:
        assert syntax == ExplicitVRLittleEndian
        original = pydicom.dcmread(stored[uid])
        assert original.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
        received = read_dataset(BytesIO(data), is_implicit_VR=False, is_little_endian=True)
        assert received.SOPInstanceUID == uid
        assert received.PixelData == original.PixelData


def test_move_cancel_stops_the_sub_operations(archive: Archive) -> None:
    study = _study_of(archive, "QR-PAT-1", 4)
    with _picky_scp(archive, []) as scp:
        scp.delay = 1.0  # a deadline for a loaded machine, not a timing assertion
        responses = _pynetdicom_move(archive, study, PICKY_AET, cancel=True)
    final = responses[-1][0]
    assert final.Status == RetrieveStatus.CANCEL
    assert final.NumberOfRemainingSuboperations > 0
    assert final.NumberOfCompletedSuboperations == len(scp.received) < 4


def test_move_to_a_destination_not_listening_fails_every_sub_operation(
    archive: Archive,
) -> None:
    study = _study_of(archive, "QR-PAT-1", 4)
    responses = _pynetdicom_move(archive, study, PICKY_AET)  # nothing on its port
    final, identifier = responses[-1]
    assert final.Status == RetrieveStatus.UNABLE_TO_PERFORM_SUBOPERATIONS
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (0, 4)
    assert identifier is not None and len(identifier.FailedSOPInstanceUIDList) == 4


def test_move_to_a_destination_that_aborts_midway_fails_the_rest(archive: Archive) -> None:
    study = _study_of(archive, "QR-PAT-1", 4)
    with _picky_scp(archive, []) as scp:
        scp.abort_at = 1
        responses = _pynetdicom_move(archive, study, PICKY_AET)
    final = responses[-1][0]
    assert final.Status == RetrieveStatus.SUBOPERATIONS_FAILED
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (1, 3)
    # The receiver goes on serving.
    again = _pynetdicom_move(archive, _study_of(archive, "QR-PAT-2", 2), DEST_AET + "X")
    assert int(again[-1][0].Status) == RetrieveStatus.MOVE_DESTINATION_UNKNOWN


def _pynetdicom_get(
    archive: Archive, study: str, scp: PickySCP, *, cancel: bool = False
) -> list[tuple[Dataset, Dataset | None]]:
    """C-GET responses; the sub-operations answered by `scp` on the same association."""
    ae = AE(ae_title="QRTEST")
    ae.add_requested_context(STUDY_ROOT_GET)
    roles = []
    for context in StoragePresentationContexts[:120]:
        ae.add_requested_context(context.abstract_syntax, ExplicitVRLittleEndian)
        roles.append(build_role(context.abstract_syntax, scp_role=True))
    assoc = ae.associate(
        "127.0.0.1",
        archive.receiver.port,
        ae_title=AEC,
        ext_neg=roles,
        evt_handlers=[(evt.EVT_C_STORE, scp.handle)],
    )
    assert assoc.is_established
    answers = assoc.send_c_get(_study_key(study), STUDY_ROOT_GET, msg_id=5)
    return _collect(assoc, answers, STUDY_ROOT_GET, 5, cancel=cancel)


def test_get_counts_each_status_and_sends_stored_bytes(archive: Archive) -> None:
    study = _study_of(archive, "QR-PAT-1", 4)
    scp = PickySCP([0x0000, 0xB007, 0xA700, 0x0000])
    responses = _pynetdicom_get(archive, study, scp)
    _assert_counted(archive, study, responses, scp, originator=("", 0))  # not a C-MOVE


def test_get_cancel_stops_the_sub_operations(archive: Archive) -> None:
    study = _study_of(archive, "QR-PAT-1", 4)
    scp = PickySCP([], delay=1.0)  # as in the C-MOVE cancel test
    responses = _pynetdicom_get(archive, study, scp, cancel=True)
    final = responses[-1][0]
    assert final.Status == RetrieveStatus.CANCEL
    assert final.NumberOfRemainingSuboperations > 0
    assert final.NumberOfCompletedSuboperations == len(scp.received) < 4
