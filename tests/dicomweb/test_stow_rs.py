"""STOW-RS (PS3.18 10.5) over real HTTP: dicomweb-client and httpx -> uvicorn -> landing
batch -> the same ingest as DIMSE -> catalog + hot tier, byte-identical; and every kind of
bad request, which must leave the archive as it was."""

from __future__ import annotations

import threading
import time
import tracemalloc
import warnings
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pydicom.data
import pytest
import uvicorn
from dicomweb_client.api import DICOMwebClient
from pydicom.uid import generate_uid

from dicomweb.app import create_app
from dicomweb.errors import BadRequestError, PayloadTooLargeError, UnsupportedMediaTypeError
from dicomweb.stow import (
    FailureReason,
    MultipartDecoder,
    PartData,
    PartEnd,
    PartStart,
    StowRequest,
    parse_media_type,
    stow_boundary,
)
from vannah_pipelines.catalog.ingest import IngestPaths, ingest_batches
from vannah_pipelines.catalog.reader import CatalogReader
from vannah_pipelines.dicom.headers import read_header
from vannah_pipelines.dicom.synthetic import make_instance, to_part10, write_study
from vannah_pipelines.errors import InvalidDicomError
from vannah_pipelines.landing.layout import LandingZone, OpenBatch
from vannah_pipelines.settings import Settings

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"
BOUNDARY = "vannah-stow-test"
DICOM_MULTIPART = f'multipart/related; type="application/dicom"; boundary="{BOUNDARY}"'
UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")

# DICOM JSON tags of the Store Instances Response Module.
RETRIEVE_URL, FAILED_SOP, REFERENCED_SOP = "00081190", "00081198", "00081199"
SOP_CLASS, SOP_INSTANCE, FAILURE_REASON = "00081150", "00081155", "00081197"


# --- helpers ------------------------------------------------------------------------


class Service:
    """A real uvicorn server on 127.0.0.1:<ephemeral> in a thread, for `settings`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=0, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    def start(self) -> Service:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/dicom-web"
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)

    def post(
        self, path: str, body: bytes | Iterator[bytes], content_type: str | None, **headers: str
    ) -> httpx.Response:
        sent = dict(headers)
        if content_type is not None:
            sent["Content-Type"] = content_type
        return httpx.post(f"{self.url}{path}", content=body, headers=sent, timeout=60)

    # The archive, as ingest and researchers see it.

    def sealed(self) -> list[Path]:
        return [b.path for b in LandingZone(self.settings.landing_dir).sealed_batches()]

    def landing_files(self) -> list[Path]:
        root = self.settings.landing_dir
        return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []

    def ingest(self) -> CatalogReader:
        s = self.settings
        paths = IngestPaths(s.landing_dir, s.hot_dir, s.catalog_dir, s.quarantine_dir)
        batches = [p.name for p in self.sealed()]
        assert batches, "nothing was sealed"
        result = ingest_batches(paths, batches)
        assert result.batches == batches
        return CatalogReader(s.catalog_dir)


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Callable[..., Service]]:
    """Factory: start a DICOMweb server on its own data folder; stopped at teardown."""
    started: list[Service] = []

    def start(**overrides: Any) -> Service:
        settings = Settings(data_dir=tmp_path / f"data{len(started)}", **overrides)
        started.append(Service(settings).start())
        return started[-1]

    yield start
    for svc in started:
        svc.stop()


def multipart(
    parts: list[bytes], boundary: str = BOUNDARY, part_type: str = "application/dicom"
) -> bytes:
    """Encode `parts` as a multipart/related body (a preamble and an epilogue included)."""
    out = [b"preamble, ignored\r\n"]
    for part in parts:
        out.append(f"--{boundary}\r\nContent-Type: {part_type}\r\n\r\n".encode())
        out.append(part)
        out.append(b"\r\n")
    out.append(f"--{boundary}--\r\nepilogue, ignored".encode())
    return b"".join(out)


def encode(ds: pydicom.Dataset) -> bytes:
    """The bytes dicomweb-client sends for `ds` (it calls pydicom.dcmwrite)."""
    with BytesIO() as buf:
        pydicom.dcmwrite(buf, ds)
        return buf.getvalue()


def element(item: dict[str, Any], tag: str) -> Any:
    values = item[tag].get("Value")
    return values[0] if values else None


def failures(body: dict[str, Any]) -> list[tuple[str | None, int]]:
    return [
        (element(i, SOP_INSTANCE), element(i, FAILURE_REASON))
        for i in body.get(FAILED_SOP, {}).get("Value", [])
    ]


def stored(body: dict[str, Any]) -> list[str]:
    return [element(i, SOP_INSTANCE) for i in body.get(REFERENCED_SOP, {}).get("Value", [])]


def assert_catalog_holds(svc: Service, sent: dict[str, list[bytes]]) -> None:
    """Ingest; every version sent of every SOP UID is indexed, its hot file byte-identical;
    the current row of each UID is the last version sent."""
    reader = svc.ingest()
    versions = reader.query("SELECT sop_instance_uid, storage_key, source FROM instance_versions")
    assert sorted(uid for uid, _, _ in versions) == sorted(
        uid for uid, blobs in sent.items() for _ in blobs
    )
    for uid, key, source in versions:
        assert source == "stow"
        assert (svc.settings.hot_dir / key).read_bytes() in sent[uid]
    current = dict(reader.query("SELECT sop_instance_uid, storage_key FROM instances"))
    assert set(current) == set(sent)
    for uid, key in current.items():
        assert (svc.settings.hot_dir / key).read_bytes() == sent[uid][-1], uid
    assert reader.query("SELECT count(*) FROM quarantine") == [(0,)]
    assert svc.landing_files() == []  # ingest removed the batch; no temp file was left


def pydicom_datasets() -> list[pydicom.Dataset]:
    """pydicom's bundled files (not get_testdata_files(): it downloads) that carry the four
    UIDs and that pydicom can write back, as dicomweb-client would send them."""
    found: list[pydicom.Dataset] = []
    for path in sorted(TEST_FILES.rglob("*.dcm")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds = pydicom.dcmread(path)
                encode(ds)
            except Exception:
                continue
        if all(ds.get(k) for k in UIDS) and "truncated" not in path.name:
            found.append(ds)
    return found


# --- the happy paths, end to end ----------------------------------------------------


def test_stow_rs_dicomweb_client_study_and_pydicom_files_reach_catalog_byte_identical(
    service: Callable[..., Service], tmp_path: Path
) -> None:
    svc = service()
    study = write_study(tmp_path / "study", "CT", series=3, instances_per_series=2)
    client = DICOMwebClient(svc.url)

    response = client.store_instances([pydicom.dcmread(p) for p in study.files])
    referenced = {str(i.ReferencedSOPInstanceUID): i for i in response.ReferencedSOPSequence}
    assert set(referenced) == {p.stem for p in study.files}
    assert "FailedSOPSequence" not in response
    assert response.RetrieveURL == f"{svc.url}/studies/{study.study_uid}"
    some = pydicom.dcmread(study.files[-1])
    assert referenced[some.SOPInstanceUID].RetrieveURL == (
        f"{svc.url}/studies/{study.study_uid}/series/{some.SeriesInstanceUID}"
        f"/instances/{some.SOPInstanceUID}"
    )
    assert referenced[some.SOPInstanceUID].ReferencedSOPClassUID == some.SOPClassUID

    datasets = pydicom_datasets()
    assert len(datasets) >= 40
    response = client.store_instances(datasets)  # many studies: no study RetrieveURL
    assert "FailedSOPSequence" not in response
    assert len(response.ReferencedSOPSequence) == len(datasets)
    assert "RetrieveURL" not in response

    assert len(svc.sealed()) == 2  # one batch per request, sealed when it ended
    sent: dict[str, list[bytes]] = {p.stem: [p.read_bytes()] for p in study.files}
    for ds in datasets:
        sent.setdefault(str(ds.SOPInstanceUID), []).append(encode(ds))
    assert_catalog_holds(svc, sent)
    reader = CatalogReader(svc.settings.catalog_dir)
    series = reader.query(
        "SELECT count(DISTINCT series_instance_uid), any_value(peer) FROM instances"
        " WHERE study_instance_uid = ?",
        [study.study_uid],
    )
    assert series[0][0] == 3
    assert series[0][1].startswith("127.0.0.1:")


def test_stow_rs_raw_pydicom_files_stored_or_refused_with_the_right_reason(
    service: Callable[..., Service],
) -> None:
    """Every bundled file, byte for byte: each part is stored as sent or refused with a
    reason an independent reading (pydicom) agrees with; the good parts are not lost."""
    svc = service()
    files = sorted(TEST_FILES.rglob("*.dcm"))
    blobs = [p.read_bytes() for p in files]
    response = svc.post("/studies", multipart(blobs), DICOM_MULTIPART)
    assert response.status_code == 202, response.text
    assert response.headers["content-type"] == "application/dicom+json"
    body = response.json()
    assert len(body[REFERENCED_SOP]["Value"]) + len(body[FAILED_SOP]["Value"]) == len(files)
    refused = {reason for _, reason in failures(body)}
    assert refused == {
        FailureReason.CANNOT_UNDERSTAND,
        FailureReason.DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
    }

    # Which file became which outcome: parts are answered in body order.
    stored_items = iter(body[REFERENCED_SOP]["Value"])
    failed_items = iter(body[FAILED_SOP]["Value"])
    sent: dict[str, list[bytes]] = {}
    for path, data in zip(files, blobs, strict=True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds = pydicom.dcmread(BytesIO(data), force=True)
                has_uids = all(ds.get(k) for k in UIDS)
                has_syntax = bool(ds.file_meta.get("TransferSyntaxUID"))
            except Exception:
                has_uids = has_syntax = False
        is_part10 = data[128:132] == b"DICM"
        try:
            read_header(path, data)
            readable = True
        except InvalidDicomError:
            readable = False
        if is_part10 and has_uids and readable:
            item = next(stored_items)
            assert element(item, SOP_INSTANCE) == ds.SOPInstanceUID, path.name
            sent.setdefault(str(ds.SOPInstanceUID), []).append(data)
            continue
        reason = element(next(failed_items), FAILURE_REASON)
        if is_part10 and has_syntax and not has_uids:  # readable, but UIDs are missing
            assert reason == FailureReason.DATA_SET_DOES_NOT_MATCH_SOP_CLASS, path.name
        else:  # no Part-10 prefix, no transfer syntax, or truncated
            assert reason == FailureReason.CANNOT_UNDERSTAND, path.name
    assert len(sent) >= 30  # distinct SOP Instance UIDs: several files share one
    assert_catalog_holds(svc, sent)


def test_stow_rs_big_instances_stream_chunked_with_bounded_memory(
    service: Callable[..., Service],
) -> None:
    svc = service()
    study_uid = generate_uid()
    big = [
        to_part10(make_instance("CT", study_uid=study_uid, rows=2048, columns=2048, seed=i))
        for i in range(3)
    ]
    assert all(len(b) > 8 * 1024**2 for b in big)
    body = multipart(big)

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer encoding
        for start in range(0, len(body), 300_001):
            yield body[start : start + 300_001]

    response = svc.post(f"/studies/{study_uid}", chunks(), DICOM_MULTIPART)
    assert response.status_code == 200, response.text
    assert element(response.json(), RETRIEVE_URL) == f"{svc.url}/studies/{study_uid}"
    sops = [str(pydicom.dcmread(BytesIO(b), stop_before_pixels=True).SOPInstanceUID) for b in big]
    assert stored(response.json()) == sops
    assert_catalog_holds(svc, {uid: [b] for uid, b in zip(sops, big, strict=True)})


def test_stow_rs_a_slow_upload_does_not_block_other_requests(
    service: Callable[..., Service],
) -> None:
    svc = service()
    slow_body = multipart([to_part10(make_instance("CT", rows=256, columns=256))])
    resume = threading.Event()
    results: list[httpx.Response] = []

    def slow_chunks() -> Iterator[bytes]:
        yield slow_body[: len(slow_body) // 2]
        assert resume.wait(30)
        yield slow_body[len(slow_body) // 2 :]

    uploader = threading.Thread(
        target=lambda: results.append(svc.post("/studies", slow_chunks(), DICOM_MULTIPART))
    )
    uploader.start()
    try:
        quick = svc.post("/studies", multipart([GOOD]), DICOM_MULTIPART)  # meanwhile
        assert quick.status_code == 200
    finally:
        resume.set()
        uploader.join(30)
    assert [r.status_code for r in results] == [200]
    assert len(svc.sealed()) == 2  # one batch per request


def test_stow_request_memory_stays_bounded_for_a_big_body(tmp_path: Path) -> None:
    data = to_part10(make_instance("CT", rows=4096, columns=4096))  # 32 MiB
    body = multipart([data])
    stow = StowRequest(LandingZone(tmp_path / "landing"), BOUNDARY, 1 << 30).open()
    tracemalloc.start()
    try:
        for start in range(0, len(body), 1 << 20):
            stow.feed(body[start : start + (1 << 20)])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    [outcome] = stow.finish()
    assert outcome.stored
    assert peak < 8 * 1024**2, peak  # a few chunks, never the 32 MiB body
    [batch] = LandingZone(tmp_path / "landing").sealed_batches()
    [instance] = batch.instances()
    assert instance.path.read_bytes() == data


# --- partial failures ----------------------------------------------------------------


def test_stow_rs_study_path_refuses_parts_of_another_study(
    service: Callable[..., Service], tmp_path: Path
) -> None:
    svc = service()
    study = write_study(tmp_path / "a", "MR", series=2, instances_per_series=1)
    other = write_study(tmp_path / "b", "MR", series=1, instances_per_series=1)
    blobs = [p.read_bytes() for p in [study.files[0], other.files[0], study.files[1]]]
    client = DICOMwebClient(svc.url)
    response = client.store_instances(
        [pydicom.dcmread(p) for p in [study.files[0], other.files[0], study.files[1]]],
        study_instance_uid=study.study_uid,
    )
    # dicomweb-client sends "Host: 127.0.0.1" without the port on a small body, and the
    # URLs follow the Host header as a proxy would have it: compare the paths.
    assert response.RetrieveURL.endswith(f"/dicom-web/studies/{study.study_uid}")
    [failed] = response.FailedSOPSequence
    assert failed.ReferencedSOPInstanceUID == other.files[0].stem
    assert failed.FailureReason == 0xA900
    assert failed.ReferencedSOPClassUID == pydicom.dcmread(other.files[0]).SOPClassUID
    assert [i.ReferencedSOPInstanceUID for i in response.ReferencedSOPSequence] == [
        study.files[0].stem,
        study.files[1].stem,
    ]
    # The same over httpx, to see the status: 202 Accepted with the failure listed.
    again = svc.post(f"/studies/{study.study_uid}", multipart(blobs), DICOM_MULTIPART)
    assert again.status_code == 202
    assert failures(again.json()) == [(other.files[0].stem, 0xA900)]
    assert_catalog_holds(svc, {p.stem: [p.read_bytes(), p.read_bytes()] for p in study.files})


def test_stow_rs_partial_failure_keeps_the_good_parts(
    service: Callable[..., Service], tmp_path: Path
) -> None:
    svc = service()
    good = [to_part10(make_instance("CT", instance_number=i)) for i in range(2)]
    no_study = to_part10(make_instance("CT", StudyInstanceUID=None))
    bad_uid = to_part10(make_instance("CT", SeriesInstanceUID="1.2.3/../../etc"))
    truncated = good[0][: len(good[0]) // 2]
    not_dicom = b"%PDF-1.4 this is not DICOM at all"
    response = svc.post(
        "/studies",
        multipart([not_dicom, good[0], no_study, bad_uid, truncated, good[1]]),
        DICOM_MULTIPART,
    )
    assert response.status_code == 202
    body = response.json()
    good_uids = [str(pydicom.dcmread(BytesIO(b)).SOPInstanceUID) for b in good]
    assert stored(body) == good_uids
    assert [reason for _, reason in failures(body)] == [0xC000, 0xA900, 0xA900, 0xC000]
    # Valid UIDs of a refused part are echoed; unknown ones are left empty.
    assert failures(body)[0][0] is None
    assert failures(body)[1][0] == str(pydicom.dcmread(BytesIO(no_study)).SOPInstanceUID)
    [batch] = svc.sealed()
    names = sorted(p.name for p in batch.iterdir())
    assert names == sorted(["receipts.jsonl", *(f"{u}.dcm" for u in good_uids)])
    assert_catalog_holds(svc, {u: [b] for u, b in zip(good_uids, good, strict=True)})


def test_stow_rs_write_failure_is_out_of_resources_and_others_are_kept(
    service: Callable[..., Service], monkeypatch: pytest.MonkeyPatch
) -> None:
    svc = service()
    blobs = [to_part10(make_instance("CT", instance_number=i)) for i in range(3)]
    uids = [str(pydicom.dcmread(BytesIO(b)).SOPInstanceUID) for b in blobs]
    real = OpenBatch.write_instance

    def full_disk(self: OpenBatch, data: Any, facts: Any) -> Path:
        if facts.sop_instance_uid == uids[1]:
            raise OSError(28, "No space left on device")
        return real(self, data, facts)

    monkeypatch.setattr(OpenBatch, "write_instance", full_disk)
    response = svc.post("/studies", multipart(blobs), DICOM_MULTIPART)
    assert response.status_code == 202
    assert failures(response.json()) == [(uids[1], 0xA700)]
    assert stored(response.json()) == [uids[0], uids[2]]
    assert_catalog_holds(svc, {uids[0]: [blobs[0]], uids[2]: [blobs[2]]})


def test_stow_rs_all_parts_failing_is_409_and_stores_nothing(
    service: Callable[..., Service],
) -> None:
    svc = service()
    parts = [b"garbage", to_part10(make_instance("CT", SOPInstanceUID=None))]
    response = svc.post("/studies", multipart(parts), DICOM_MULTIPART)
    assert response.status_code == 409
    assert [r for _, r in failures(response.json())] == [0xC000, 0xA900]
    assert REFERENCED_SOP not in response.json()
    assert svc.sealed() == []
    assert svc.landing_files() == []


def test_stow_rs_part_of_another_media_type_fails(service: Callable[..., Service]) -> None:
    svc = service()
    body = multipart([b'{"00100010": {"vr": "PN"}}'], part_type="application/dicom+json")
    response = svc.post("/studies", body, f"multipart/related; boundary={BOUNDARY}")
    assert response.status_code == 409
    assert failures(response.json()) == [(None, 0xC000)]
    assert svc.landing_files() == []


# --- bad requests: a standard error, and the archive as it was ------------------------

GOOD = to_part10(make_instance("CT", rows=64, columns=64))


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        (None, 415),
        ("application/json", 415),
        ("application/dicom", 415),
        (f'multipart/related; type="application/dicom+json"; boundary="{BOUNDARY}"', 415),
        (f"multipart/related; type=application/dicom+xml; boundary={BOUNDARY}", 415),
        ("multipart/form-data; boundary=" + BOUNDARY, 415),
        ('multipart/related; type="application/dicom"', 400),
        ('multipart/related; type="application/dicom"; boundary=""', 400),
        (f'multipart/related; type="application/dicom"; boundary="{"x" * 71}"', 400),
    ],
)
def test_stow_rs_wrong_content_type_is_refused(
    service: Callable[..., Service], content_type: str | None, status: int
) -> None:
    svc = service()
    response = svc.post("/studies", multipart([GOOD]), content_type)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json()["00000902"]["Value"][0]  # ErrorComment: the reason
    assert svc.landing_files() == []


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (multipart([GOOD])[: -len("--\r\nepilogue, ignored")], "close delimiter"),
        (multipart([GOOD])[:-200], "close delimiter"),
        (b"\x00garbage" * 100_000, "no multipart boundary"),
        (multipart([GOOD], boundary="another"), "no multipart boundary"),
        (b"", "no multipart boundary"),
        (f"--{BOUNDARY}--\r\n".encode(), "no part"),
        (f"--{BOUNDARY}\r\nno colon here\r\n\r\nxx\r\n--{BOUNDARY}--".encode(), "header"),
    ],
    ids=["no-close", "cut-short", "garbage", "other-boundary", "empty", "no-parts", "header"],
)
def test_stow_rs_broken_multipart_is_400_and_stores_nothing(
    service: Callable[..., Service], body: bytes, reason: str
) -> None:
    svc = service()
    response = svc.post("/studies", body, DICOM_MULTIPART)
    assert response.status_code == 400, response.text
    assert reason in response.json()["00000902"]["Value"][0]
    assert svc.sealed() == []
    assert svc.landing_files() == []


def test_stow_rs_oversize_body_is_413_by_content_length_or_while_streaming(
    service: Callable[..., Service],
) -> None:
    body = multipart([GOOD, GOOD])
    svc = service(stow_max_bytes=len(GOOD) + 1000)
    response = svc.post("/studies", body, DICOM_MULTIPART)  # Content-Length is declared
    assert response.status_code == 413
    assert "exceeds" in response.json()["00000902"]["Value"][0]

    def chunks() -> Iterator[bytes]:  # chunked: no declared length, counted as it comes
        yield from (body[i : i + 4096] for i in range(0, len(body), 4096))

    response = svc.post("/studies", chunks(), DICOM_MULTIPART)
    assert response.status_code == 413
    assert svc.sealed() == []
    assert svc.landing_files() == []
    # Under the limit, the same server stores.
    assert svc.post("/studies", multipart([GOOD]), DICOM_MULTIPART).status_code == 200


def test_stow_rs_refuses_an_unsafe_study_uid_in_the_path(service: Callable[..., Service]) -> None:
    svc = service()
    for study in ("1.2.3.abc", "..", "1.2.3%2F..%2F..", "9" * 65):
        response = svc.post(f"/studies/{study}", multipart([GOOD]), DICOM_MULTIPART)
        assert response.status_code in (400, 404), (study, response.status_code)
    assert svc.landing_files() == []


def test_stow_rs_only_answers_dicom_json(service: Callable[..., Service]) -> None:
    svc = service()
    response = svc.post(
        "/studies", multipart([GOOD]), DICOM_MULTIPART, Accept="application/dicom+xml"
    )
    assert response.status_code == 406
    assert svc.landing_files() == []
    ok = svc.post(
        "/studies",
        multipart([GOOD]),
        DICOM_MULTIPART,
        Accept="application/dicom+xml;q=0.9, application/dicom+json",
    )
    assert ok.status_code == 200


def test_stow_rs_a_failed_request_leaves_the_archive_unchanged(
    service: Callable[..., Service],
) -> None:
    svc = service()
    assert svc.post("/studies", multipart([GOOD]), DICOM_MULTIPART).status_code == 200
    before = {p: p.read_bytes() for p in svc.landing_files()}
    other = to_part10(make_instance("CT"))
    for body, content_type in [
        (multipart([other])[:-30], DICOM_MULTIPART),  # cut short after a good part
        (multipart([other]), "application/json"),
        (multipart([b"junk"]), DICOM_MULTIPART),
    ]:
        assert svc.post("/studies", body, content_type).status_code >= 400
    assert {p: p.read_bytes() for p in svc.landing_files()} == before
    assert len(svc.sealed()) == 1
    assert not list(svc.settings.data_dir.rglob(".tmp-*"))


# --- pure parts: header parsing and the decoder ---------------------------------------


@pytest.mark.parametrize(
    ("value", "boundary"),
    [
        ('multipart/related; type="application/dicom"; boundary="a b:c"', "a b:c"),
        ("multipart/related;type=application/dicom;boundary=abc", "abc"),
        ('Multipart/Related; Boundary=abc; TYPE="Application/DICOM"', "abc"),
        ("multipart/related; boundary=abc", "abc"),  # type defaults to application/dicom
        ('multipart/related; type="application/dicom"; boundary="q\\"x"; start="<1>"', 'q"x'),
    ],
)
def test_stow_boundary_parses_quoted_and_unquoted_parameters(value: str, boundary: str) -> None:
    if '"' in boundary:
        with pytest.raises(BadRequestError):  # '"' is no bchar (RFC 2046)
            stow_boundary(value)
    else:
        assert stow_boundary(value) == boundary


def test_parse_media_type_refuses_garbage() -> None:
    for value in ("", "multipart", "a/b; =x", 'a/b; c="unterminated'):
        with pytest.raises(BadRequestError):
            parse_media_type(value)
    with pytest.raises(UnsupportedMediaTypeError):
        stow_boundary("not a media type")


def _decode(body: bytes, size: int) -> list[Any]:
    decoder = MultipartDecoder(BOUNDARY)
    events: list[Any] = []
    for start in range(0, len(body), size):
        events.extend(decoder.feed(body[start : start + size]))
    decoder.close()
    merged: list[Any] = []
    for event in events:  # the split of the data into events depends on the chunking
        if isinstance(event, PartData) and merged and isinstance(merged[-1], PartData):
            merged[-1] = PartData(merged[-1].data + event.data)
        else:
            merged.append(event)
    return merged


def test_multipart_decoder_is_independent_of_chunking() -> None:
    tricky = [
        b"",
        b"\r\n--" + BOUNDARY.encode() + b"X not a delimiter\r\n",
        b"--" + BOUNDARY.encode() + b"--",
        bytes(range(256)) * 40,
    ]
    body = multipart(tricky)
    expected: list[Any] = []
    for part in tricky:
        expected += [PartStart({"content-type": "application/dicom"})]
        expected += [PartData(part)] if part else []
        expected += [PartEnd()]
    for size in (1, 2, 3, 7, 64, 1000, len(body)):
        assert _decode(body, size) == expected, size


def test_multipart_decoder_accepts_padding_folding_and_no_headers() -> None:
    body = (
        f"--{BOUNDARY}  \t\r\nContent-Type: application/dicom;\r\n transfer-syntax=1.2\r\n\r\n"
        f"one\r\n--{BOUNDARY}\r\n\r\ntwo\r\n--{BOUNDARY}--"
    ).encode()
    assert _decode(body, 5) == [
        PartStart({"content-type": "application/dicom; transfer-syntax=1.2"}),
        PartData(b"one"),
        PartEnd(),
        PartStart({}),
        PartData(b"two"),
        PartEnd(),
    ]


def test_stow_request_oversize_while_streaming_raises_and_cleans_up(tmp_path: Path) -> None:
    zone = LandingZone(tmp_path / "landing")
    stow = StowRequest(zone, BOUNDARY, 1000).open()
    with pytest.raises(PayloadTooLargeError):
        stow.feed(multipart([GOOD]))
    stow.close()
    assert [p for p in zone.root.rglob("*") if p.is_file()] == []


def test_stow_rs_deflated_part_inflating_past_max_instance_bytes_is_out_of_resources(
    service: Callable[..., Service],
) -> None:
    """A 1 MiB data set deflated to a few kB (a small deflate bomb) against a 64 KiB
    max_instance_bytes: inflation stops at the cap, the part fails 0xA700, its neighbour is
    stored."""
    svc = service(max_instance_bytes=64 * 1024)
    bomb = make_instance("CT", rows=1024, columns=512)
    bomb.PixelData = bytes(len(bomb.PixelData))  # zeros: deflates ~1000:1
    bomb.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    bomb_bytes = encode(bomb)
    assert len(bomb_bytes) < 64 * 1024 < len(bomb.PixelData)
    good = to_part10(make_instance("CT", rows=16, columns=16))
    response = svc.post("/studies", multipart([bomb_bytes, good]), DICOM_MULTIPART)
    assert response.status_code == 202
    assert failures(response.json()) == [(str(bomb.SOPInstanceUID), 0xA700)]
    assert stored(response.json()) == [str(pydicom.dcmread(BytesIO(good)).SOPInstanceUID)]
