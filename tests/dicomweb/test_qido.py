"""QIDO-RS against an expectation computed from the files themselves (never the catalog)."""

import threading
import time
import unicodedata
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pydicom.data
import pytest
import uvicorn
from dicomweb_client.api import DICOMwebClient
from fastapi.testclient import TestClient

from dicomweb.app import create_app
from vannah_pipelines.catalog.ingest import IngestPaths, ingest_batches
from vannah_pipelines.dicom.synthetic import make_instance, to_part10
from vannah_pipelines.landing.layout import LandingZone, ReceiveFacts
from vannah_pipelines.settings import Settings, load_settings

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"
PEOPLE = [
    ("Doe^John", "P1"),
    ("Émile^Zola", "P2"),
    ("Anderson^Ann", "P3"),
    ("doe^jane", "P4"),
    ("Müller^Jürgen", "P5"),
]


def _files(tmp: Path) -> list[Path]:
    """Synthetic studies over five patients, four dates and several modalities."""
    out = []
    for n, (name, pid) in enumerate(PEOPLE):
        for s, modality in enumerate(["CT", "MR"] if n % 2 else ["US", "CT", "XA"]):
            study = make_instance(modality).StudyInstanceUID
            date = f"202401{n * 7 + s + 1:02d}"
            for series in range(2):
                series_uid = make_instance(modality).SeriesInstanceUID
                for i in range(2):
                    ds = make_instance(
                        modality if series == 0 else "CR",
                        study_uid=study,
                        series_uid=series_uid,
                        patient_name=name,
                        patient_id=pid,
                        study_date=date,
                        rows=8,
                        columns=8,
                        series_number=series + 1,
                        instance_number=i + 1,
                    )
                    path = tmp / f"{ds.SOPInstanceUID}.dcm"
                    path.write_bytes(to_part10(ds))
                    out.append(path)
    for name in ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "rtdose.dcm"):
        out.append(TEST_FILES / name)
    return out


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, list[pydicom.Dataset]]:
    root = tmp_path_factory.mktemp("qido")
    src = root / "src"
    src.mkdir()
    settings = load_settings(data_dir=root / "data")
    files = _files(src)
    batch = LandingZone(settings.landing_dir).open_batch("stow")
    datasets = []
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        datasets.append(ds)
        batch.write_instance(
            path.read_bytes(),
            ReceiveFacts(
                str(ds.SOPInstanceUID), str(ds.SOPClassUID), "1.2.840.10008.1.2.1", "stow"
            ),
        )
    sealed = batch.seal()
    assert sealed is not None
    ingest_batches(
        IngestPaths(
            settings.landing_dir, settings.hot_dir, settings.catalog_dir, settings.quarantine_dir
        ),
        [sealed.batch_id],
    )
    return settings, datasets


@pytest.fixture(scope="module")
def client(archive: tuple[Settings, list[pydicom.Dataset]]) -> TestClient:
    return TestClient(create_app(archive[0]), base_url="http://localhost")


def _fold(text: str) -> str:
    return "".join(
        c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c)
    ).lower()


def _studies(datasets: list[pydicom.Dataset], keep: Callable[[pydicom.Dataset], bool]) -> set[str]:
    return {str(ds.StudyInstanceUID) for ds in datasets if keep(ds)}


def _uids(answer: list[dict], tag: str = "0020000D") -> set[str]:
    return {a[tag]["Value"][0] for a in answer}


CASES: list[tuple[str, Callable[[pydicom.Dataset], bool]]] = [
    ("PatientID=P2", lambda ds: ds.PatientID == "P2"),
    ("00100020=P3", lambda ds: ds.PatientID == "P3"),
    ("PatientName=Doe^John", lambda ds: str(ds.PatientName) == "Doe^John"),
    ("PatientName=Doe*", lambda ds: str(ds.PatientName).startswith("Doe")),
    ("PatientName=*o*", lambda ds: "o" in str(ds.PatientName)),
    (
        "PatientName=D?e^J*",
        lambda ds: str(ds.PatientName)[:1] == "D" and str(ds.PatientName)[2:5] == "e^J",
    ),
    (
        "PatientName=doe&fuzzymatching=true",
        lambda ds: any(_fold(part).startswith("doe") for part in str(ds.PatientName).split("^")),
    ),
    (
        "PatientName=emile&fuzzymatching=true",
        lambda ds: any(_fold(p).startswith("emile") for p in str(ds.PatientName).split("^")),
    ),
    (
        "PatientName=MULLER*&fuzzymatching=true",
        lambda ds: _fold(str(ds.PatientName)).startswith("muller"),
    ),
    ("PatientName=doe*&fuzzymatching=false", lambda ds: str(ds.PatientName).startswith("doe")),
    ("StudyDate=20240110-20240120", lambda ds: "20240110" <= ds.get("StudyDate", "") <= "20240120"),
    ("StudyDate=20240115-", lambda ds: ds.get("StudyDate", "") >= "20240115"),
    ("StudyDate=-20240108", lambda ds: "" < ds.get("StudyDate", "") <= "20240108"),
    ("StudyDate=20240101", lambda ds: ds.get("StudyDate") == "20240101"),
    ("ModalitiesInStudy=MR", lambda ds: None),  # filled in by study, below
    ("ModalitiesInStudy=XA\\MR", lambda ds: None),
    ("AccessionNumber=", lambda ds: True),  # universal matching
]


def _modalities(datasets: list[pydicom.Dataset]) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for ds in datasets:
        found.setdefault(str(ds.StudyInstanceUID), set()).add(str(ds.get("Modality", "")))
    return found


@pytest.mark.parametrize("query, keep", CASES, ids=[c[0] for c in CASES])
def test_qido_studies_match_like_the_files_say(
    client: TestClient,
    archive: tuple[Settings, list[pydicom.Dataset]],
    query: str,
    keep: Callable[[pydicom.Dataset], bool],
) -> None:
    datasets = archive[1]
    if query.startswith("ModalitiesInStudy"):
        wanted = set(query.split("=", 1)[1].split("\\"))
        expected = {s for s, mods in _modalities(datasets).items() if mods & wanted}
    else:
        expected = _studies(datasets, keep)
    response = client.get(f"/dicom-web/studies?{query}")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/dicom+json")
    assert _uids(response.json()) == expected


def test_qido_study_computed_attributes(
    client: TestClient, archive: tuple[Settings, list[pydicom.Dataset]]
) -> None:
    datasets = archive[1]
    for answer in client.get("/dicom-web/studies").json():
        study = answer["0020000D"]["Value"][0]
        mine = [ds for ds in datasets if ds.StudyInstanceUID == study]
        series = {ds.SeriesInstanceUID for ds in mine}
        assert answer["00201206"]["Value"] == [len(series)]
        assert answer["00201208"]["Value"] == [len({ds.SOPInstanceUID for ds in mine})]
        assert answer["00080061"]["Value"] == sorted({ds.Modality for ds in mine})
        assert answer["00080056"]["Value"] == ["ONLINE"]
        assert answer["00081190"]["Value"][0].endswith(f"/dicom-web/studies/{study}")
        name = str(mine[0].PatientName)
        if name:
            assert answer["00100010"]["Value"][0]["Alphabetic"] == name.split("=")[0]


def test_qido_series_and_instances_levels(
    client: TestClient, archive: tuple[Settings, list[pydicom.Dataset]]
) -> None:
    datasets = archive[1]
    study = next(ds.StudyInstanceUID for ds in datasets if ds.PatientID == "P1")
    series = client.get(f"/dicom-web/studies/{study}/series").json()
    expected = {ds.SeriesInstanceUID for ds in datasets if ds.StudyInstanceUID == study}
    assert _uids(series, "0020000E") == expected
    for answer in series:
        uid = answer["0020000E"]["Value"][0]
        count = sum(1 for ds in datasets if ds.SeriesInstanceUID == uid)
        assert answer["00201209"]["Value"] == [count]
    cr = client.get("/dicom-web/series?Modality=CR&PatientID=P3").json()
    assert _uids(cr, "0020000E") == {
        ds.SeriesInstanceUID for ds in datasets if ds.Modality == "CR" and ds.PatientID == "P3"
    }
    one = sorted(expected)[0]
    instances = client.get(f"/dicom-web/studies/{study}/series/{one}/instances").json()
    assert _uids(instances, "00080018") == {
        ds.SOPInstanceUID for ds in datasets if ds.SeriesInstanceUID == one
    }
    assert {a["00280010"]["Value"][0] for a in instances} == {8}
    by_number = client.get(f"/dicom-web/studies/{study}/instances?InstanceNumber=2").json()
    assert _uids(by_number, "00080018") == {
        ds.SOPInstanceUID
        for ds in datasets
        if ds.StudyInstanceUID == study and ds.InstanceNumber == 2
    }
    uid_list = ",".join(sorted(expected))
    listed = client.get(f"/dicom-web/series?SeriesInstanceUID={uid_list}").json()
    assert _uids(listed, "0020000E") == expected
    # An attribute outside the catalog columns is matched from the header at instance level.
    ct = client.get("/dicom-web/instances?00180050=*&includefield=00180050").json()
    assert all("00180050" in a for a in ct)


def test_qido_includefield_limit_offset_and_warning(client: TestClient) -> None:
    everything = client.get("/dicom-web/studies").json()
    page = client.get("/dicom-web/studies?limit=2&offset=1")
    assert page.status_code == 200
    assert "additional results" in page.headers["warning"]
    assert [a["0020000D"] for a in page.json()] == [a["0020000D"] for a in everything[1:3]]
    last = client.get(f"/dicom-web/studies?limit=2&offset={len(everything) - 1}")
    assert "warning" not in last.headers and len(last.json()) == 1
    # OHIF's exact study list request: a comma-separated hex includefield, incl. Modality
    # (not a study attribute: left out with a warning, never an error).
    ohif = client.get(
        "/dicom-web/studies?limit=101&offset=0&fuzzymatching=true"
        "&includefield=00081030%2C00080060%2C00080090%2C00100030"
    )
    assert ohif.status_code == 200 and len(ohif.json()) == len(everything)
    assert all({"00081030", "00080090", "00100030"} <= set(a) for a in ohif.json())
    full = client.get("/dicom-web/studies?includefield=all&limit=1").json()[0]
    assert "00100040" in full and "00080061" in full
    ordered = client.get("/dicom-web/studies?orderby=StudyDate").json()
    dates = [a["00080020"]["Value"][0] for a in ordered if "Value" in a["00080020"]]
    assert dates == sorted(dates)
    empty = client.get("/dicom-web/studies?PatientID=nobody")
    assert empty.status_code == 200 and empty.json() == []


@pytest.mark.parametrize(
    "query, reason",
    [
        ("Foo=1", "Foo"),
        ("StudyDate=2024", "DA"),
        ("StudyInstanceUID=../../etc", "UID"),
        ("limit=-1", "limit"),
        ("limit=abc", "limit"),
        ("fuzzymatching=maybe", "fuzzymatching"),
        ("includefield=NoSuchKeyword", "NoSuchKeyword"),
        ("00100010.00100020=x", "sequence"),
        ("NumberOfStudyRelatedInstances=x", "number"),
    ],
)
def test_qido_bad_requests_are_400_with_reason(client: TestClient, query: str, reason: str) -> None:
    response = client.get(f"/dicom-web/studies?{query}")
    assert response.status_code == 400
    assert reason in response.json()["00000902"]["Value"][0]


def test_qido_bad_path_uid_is_400(client: TestClient) -> None:
    assert client.get("/dicom-web/studies/1.2.x/series").status_code == 400


@pytest.fixture(scope="module")
def http_base(archive: tuple[Settings, list[pydicom.Dataset]]) -> Iterator[str]:
    server = uvicorn.Server(
        uvicorn.Config(create_app(archive[0]), host="127.0.0.1", port=0, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}/dicom-web"
    server.should_exit = True
    thread.join(timeout=10)


def test_qido_with_dicomweb_client_over_http(
    http_base: str, archive: tuple[Settings, list[pydicom.Dataset]]
) -> None:
    datasets = archive[1]
    client = DICOMwebClient(url=http_base)
    studies = client.search_for_studies(search_filters={"PatientID": "P4"})
    assert _uids(studies) == _studies(datasets, lambda ds: ds.PatientID == "P4")
    study = next(iter(_uids(studies)))
    series = client.search_for_series(study)
    assert _uids(series, "0020000E") == {
        ds.SeriesInstanceUID for ds in datasets if ds.StudyInstanceUID == study
    }
    instances = client.search_for_instances(study, fuzzymatching=True)
    assert len(instances) == sum(1 for ds in datasets if ds.StudyInstanceUID == study)
    dated = client.search_for_studies(search_filters={"StudyDate": "20240101-20240107"})
    assert _uids(dated) == _studies(
        datasets, lambda ds: "20240101" <= ds.get("StudyDate", "") <= "20240107"
    )
