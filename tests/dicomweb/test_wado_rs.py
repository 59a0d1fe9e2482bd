"""WADO-RS: retrieve, metadata, frames, bulk data, rendered; TestClient and a real server."""

from __future__ import annotations

import dataclasses
import threading
from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO

import httpx
import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from fastapi.testclient import TestClient
from PIL import Image
from pydicom.encaps import get_frame

from dicomweb.multipart import decode_parts
from tests.dicomweb.conftest import Archive, Stored, land_and_ingest, start_server
from vannah_pipelines.dicom.synthetic import make_instance, to_part10
from vannah_pipelines.settings import load_settings
from vannah_pipelines.storage.local import LocalStorage

EXPLICIT_LE = "1.2.840.10008.1.2.1"
STAR = "multipart/related; type=application/dicom; transfer-syntax=*"
LOSSLESS = (
    "CT_small",
    "MR_small_implicit",
    "MR_small_bigendian",
    "MR_small_RLE",
    "MR_small_jp2klossless",
    "MR_small_jpeg_ls_lossless",
    "SC_rgb_rle_2frame",
    "rtdose",
)


def url(s: Stored, suffix: str = "") -> str:
    return f"/dicom-web/studies/{s.study}/series/{s.series}/instances/{s.sop}{suffix}"


def parts(response: httpx.Response) -> list[tuple[dict[str, str], bytes]]:
    assert response.status_code == 200, response.text
    return decode_parts(response.content, response.headers["content-type"])


def assert_dicom_error(response: httpx.Response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    reason = response.json()["00000902"]["Value"][0]
    for word in words:
        assert word in reason


# ---------------------------------------------------------------- retrieve


def test_retrieve_study_as_stored_is_byte_identical(client: TestClient, archive: Archive) -> None:
    study = archive.instances["CT_small"].study
    response = client.get(f"/dicom-web/studies/{study}", headers={"Accept": STAR})
    media_type = response.headers["content-type"]
    assert media_type.startswith('multipart/related; type="application/dicom"')
    assert "content-length" not in response.headers  # streamed
    got = parts(response)
    expected = archive.studies[study]
    assert len(got) == len(expected)
    by_sop = {
        pydicom.dcmread(BytesIO(c), stop_before_pixels=True).SOPInstanceUID: (h, c) for h, c in got
    }
    for stored in expected:
        headers, content = by_sop[stored.sop]
        assert content == stored.data == archive.hot_file(stored.sop)
        assert headers["content-type"] == (
            f"application/dicom; transfer-syntax={stored.transfer_syntax}"
        )


def test_retrieve_series_default_is_explicit_vr_little_endian(
    client: TestClient, archive: Archive
) -> None:
    ct = archive.instances["synthetic-ct-1-1"]
    got = parts(
        client.get(
            f"/dicom-web/studies/{ct.study}/series/{ct.series}",
            headers={"Accept": 'multipart/related; type="application/dicom"'},
        )
    )
    assert len(got) == 3
    sent = {archive.instances[f"synthetic-ct-1-{i}"].data for i in range(1, 4)}
    assert {c for _, c in got} == sent  # stored explicit LE: sent as is


@pytest.mark.parametrize("name", LOSSLESS)
def test_retrieve_instance_transcodes_to_explicit_le_by_default(
    client: TestClient, archive: Archive, name: str
) -> None:
    stored = archive.instances[name]
    ((headers, content),) = parts(client.get(url(stored)))
    assert headers["content-type"] == f"application/dicom; transfer-syntax={EXPLICIT_LE}"
    ds = pydicom.dcmread(BytesIO(content))
    assert ds.file_meta.TransferSyntaxUID == EXPLICIT_LE
    original = pydicom.dcmread(BytesIO(stored.data))
    assert ds.SOPInstanceUID == stored.sop
    assert np.array_equal(ds.pixel_array, original.pixel_array)


def test_retrieve_instance_decodes_lossy_jpeg(client: TestClient, archive: Archive) -> None:
    stored = archive.instances["SC_rgb_jpeg_dcmtk"]
    ((_, content),) = parts(client.get(url(stored)))
    ds = pydicom.dcmread(BytesIO(content))
    assert ds.file_meta.TransferSyntaxUID == EXPLICIT_LE
    assert ds.pixel_array.shape == (100, 100, 3)


def test_retrieve_instance_transcodes_to_requested_lossless_syntax(
    client: TestClient, archive: Archive
) -> None:
    stored = archive.instances["synthetic-ct-1-1"]
    rle = "1.2.840.10008.1.2.5"
    accept = f'multipart/related; type="application/dicom"; transfer-syntax={rle}'
    ((headers, content),) = parts(client.get(url(stored), headers={"Accept": accept}))
    assert headers["content-type"].endswith(rle)
    ds = pydicom.dcmread(BytesIO(content))
    assert ds.file_meta.TransferSyntaxUID == rle
    assert np.array_equal(ds.pixel_array, pydicom.dcmread(BytesIO(stored.data)).pixel_array)


def test_retrieve_takes_first_acceptable_of_several(client: TestClient, archive: Archive) -> None:
    stored = archive.instances["SC_rgb_jpeg_dcmtk"]
    accept = (
        "multipart/related; type=application/dicom; transfer-syntax=1.2.840.10008.1.2.4.91, "
        'multipart/related; type="application/dicom"; transfer-syntax=*;q=0.5'
    )
    ((_, content),) = parts(client.get(url(stored), headers={"Accept": accept}))
    assert content == stored.data


def test_retrieve_unacceptable_is_406_with_reason(client: TestClient, archive: Archive) -> None:
    stored = archive.instances["synthetic-ct-1-1"]
    accept = "multipart/related; type=application/dicom; transfer-syntax=1.2.840.10008.1.2.4.50"
    assert_dicom_error(
        client.get(url(stored), headers={"Accept": accept}), 406, "1.2.840.10008.1.2.4.50"
    )
    assert_dicom_error(client.get(url(stored), headers={"Accept": "text/html"}), 406)


def test_retrieve_bare_application_dicom_gives_one_part(
    client: TestClient, archive: Archive
) -> None:
    stored = archive.instances["CT_small"]
    response = client.get(url(stored), headers={"Accept": "application/dicom; transfer-syntax=*"})
    assert response.headers["content-type"].startswith("application/dicom")
    assert response.content == stored.data


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/dicom-web/studies/1.2.3.999", 404),
        ("/dicom-web/studies/1.2.3.999/metadata", 404),
        ("/dicom-web/studies/1.2.3.999/series/1.2.4", 404),
        ("/dicom-web/studies/1.2.abc", 400),
        ("/dicom-web/studies/1.2.3%00", 400),
        ("/dicom-web/studies/" + "1" * 65, 400),
        ("/dicom-web/studies/1.2/series/1..2/metadata", 400),
        ("/dicom-web/studies/1.2/series/1.3/instances/x/frames/1", 400),
        ("/dicom-web/studies/1.2/series/1.3/instances/1.4/rendered", 404),
    ],
)
def test_bad_uids_are_400_and_unknown_ones_404(
    client: TestClient, archive: Archive, path: str, status: int
) -> None:
    before = archive.snapshot()
    response = client.get(path)
    assert_dicom_error(response, status)
    assert archive.snapshot() == before


def test_unknown_instance_in_known_series_is_404(client: TestClient, archive: Archive) -> None:
    stored = archive.instances["CT_small"]
    missing = dataclasses.replace(stored, sop="1.2.3.4.5")
    assert_dicom_error(client.get(url(missing)), 404, "1.2.3.4.5")
    assert_dicom_error(client.get(url(missing, "/frames/1")), 404)


def test_instance_the_catalog_places_in_another_tier_is_found_where_it_is(
    client: TestClient, archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The catalog says warm (or cold), the object is still hot (a move not finished, or
    restored): the storage tiers fall back to the tier that holds it."""
    from dicomweb.routes import wado_rs
    from vannah_pipelines.catalog import lookup

    for tier in ("warm", "cold"):

        def moved(*args: Any, tier: str = tier) -> Any:
            return [dataclasses.replace(i, tier=tier) for i in lookup.find_instances(*args)]

        monkeypatch.setattr(wado_rs, "find_instances", moved)
        stored = archive.instances["CT_small"]
        accept = {"Accept": "application/dicom; transfer-syntax=*"}
        response = client.get(url(stored), headers=accept)
        assert response.status_code == 200, (tier, response.text[:300])
        assert response.content == archive.hot_file(stored.sop)


# ---------------------------------------------------------------- metadata and bulk data


def test_metadata_comes_from_catalog_with_bulk_data_uris(
    client: TestClient, archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_files(*_: Any) -> BinaryIO:
        raise AssertionError("metadata must not open stored files")

    monkeypatch.setattr(LocalStorage, "open", no_files)
    study = archive.instances["CT_small"].study
    response = client.get(
        f"/dicom-web/studies/{study}/metadata", headers={"Accept": "application/dicom+json"}
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/dicom+json"
    items = response.json()
    assert len(items) == len(archive.studies[study])
    ct = next(i for i in items if i["00080018"]["Value"][0] == archive.instances["CT_small"].sop)
    assert ct["7FE00010"]["BulkDataURI"] == url(archive.instances["CT_small"], "/bulk/7FE00010")
    for item in items:
        for element in item.values():
            assert element.get("BulkDataURI", "x") != ""


def test_metadata_levels_and_406(client: TestClient, archive: Archive) -> None:
    s = archive.instances["synthetic-ct-2-1"]
    assert len(client.get(f"/dicom-web/studies/{s.study}/series/{s.series}/metadata").json()) == 3
    (one,) = client.get(url(s, "/metadata")).json()
    assert one["0020000D"]["Value"] == [s.study]
    accept = 'multipart/related; type="application/dicom+xml"'
    assert_dicom_error(client.get(url(s, "/metadata"), headers={"Accept": accept}), 406)


def test_bulk_data_uri_returns_the_element_bytes(client: TestClient, archive: Archive) -> None:
    stored = archive.instances["waveform_ecg"]
    (meta,) = client.get(url(stored, "/metadata")).json()
    waveform = meta["54000100"]["Value"][0]["54001010"]
    got = parts(client.get(waveform["BulkDataURI"]))
    ds = pydicom.dcmread(BytesIO(stored.data))
    assert got[0][1] == ds.WaveformSequence[0].WaveformData
    pixel = parts(client.get(url(archive.instances["CT_small"], "/bulk/7FE00010")))
    assert pixel[0][1] == pydicom.dcmread(BytesIO(archive.instances["CT_small"].data)).PixelData
    assert_dicom_error(client.get(url(stored, "/bulk/00091001")), 404)
    assert_dicom_error(client.get(url(stored, "/bulk/00100010")), 400, "not bulk data")
    assert_dicom_error(client.get(url(stored, "/bulk/zz")), 400)


# ---------------------------------------------------------------- frames


@pytest.mark.parametrize(
    "accept",
    [
        "multipart/related; type=application/octet-stream; transfer-syntax=*",
        'multipart/related; type="application/octet-stream"; transfer-syntax="*"',
    ],
)
@pytest.mark.parametrize(
    "name", ["SC_rgb_rle_2frame", "examples_ybr_color", "CT_small", "MR_small_jp2klossless"]
)
def test_frames_as_stored_for_ohif(
    client: TestClient, archive: Archive, accept: str, name: str
) -> None:
    stored = archive.instances[name]
    ds = pydicom.dcmread(BytesIO(stored.data))
    frames = int(ds.get("NumberOfFrames") or 1)
    numbers = [1, frames] if frames > 1 else [1]
    got = parts(
        client.get(
            url(stored, f"/frames/{','.join(map(str, numbers))}"), headers={"Accept": accept}
        )
    )
    assert len(got) == len(numbers)
    for (headers, content), number in zip(got, numbers, strict=True):
        assert headers["content-type"] == (
            f"application/octet-stream; transfer-syntax={stored.transfer_syntax}"
        )
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            assert content == get_frame(ds.PixelData, number - 1, number_of_frames=frames)
        else:
            size = len(ds.PixelData) // frames
            assert content == ds.PixelData[(number - 1) * size : number * size]


@pytest.mark.parametrize(
    "name", ["SC_rgb_rle_2frame", "MR_small_jp2klossless", "rtdose", "MR_small_bigendian"]
)
def test_frames_default_is_uncompressed_little_endian(
    client: TestClient, archive: Archive, name: str
) -> None:
    stored = archive.instances[name]
    ds = pydicom.dcmread(BytesIO(stored.data))
    arr = ds.pixel_array
    frames = int(ds.get("NumberOfFrames") or 1)
    got = parts(
        client.get(
            url(stored, "/frames/1"),
            headers={"Accept": "multipart/related; type=application/octet-stream"},
        )
    )
    ((headers, content),) = got
    assert headers["content-type"].endswith(EXPLICIT_LE)
    first = arr[0] if frames > 1 else arr
    assert content == first.astype(first.dtype.newbyteorder("<")).tobytes()


def test_frames_in_stored_compressed_media_type(client: TestClient, archive: Archive) -> None:
    stored = archive.instances["examples_ybr_color"]
    got = parts(
        client.get(
            url(stored, "/frames/3"), headers={"Accept": 'multipart/related; type="image/jpeg"'}
        )
    )
    ((headers, content),) = got
    assert headers["content-type"] == "image/jpeg; transfer-syntax=1.2.840.10008.1.2.4.50"
    assert content[:2] == b"\xff\xd8"
    assert Image.open(BytesIO(content)).size == (320, 240)
    j2k = archive.instances["MR_small_jp2klossless"]
    assert_dicom_error(
        client.get(url(j2k, "/frames/1"), headers={"Accept": "multipart/related; type=image/jpeg"}),
        406,
        "image/jpeg",
    )


def test_frames_out_of_range_or_malformed(client: TestClient, archive: Archive) -> None:
    stored = archive.instances["SC_rgb_rle_2frame"]
    assert_dicom_error(client.get(url(stored, "/frames/3")), 404, "frame 3")
    assert_dicom_error(client.get(url(stored, "/frames/0")), 400)
    assert_dicom_error(client.get(url(stored, "/frames/1,x")), 400)
    assert_dicom_error(client.get(url(archive.instances["waveform_ecg"], "/frames/1")), 400)


# ---------------------------------------------------------------- rendered


def _image(response: httpx.Response, media_type: str) -> Image.Image:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == media_type
    return Image.open(BytesIO(response.content))


def test_rendered_instance_jpeg_default_png_on_request(
    client: TestClient, archive: Archive
) -> None:
    stored = archive.instances["CT_small"]
    assert _image(client.get(url(stored, "/rendered")), "image/jpeg").size == (128, 128)
    png = _image(client.get(url(stored, "/rendered"), headers={"Accept": "image/png"}), "image/png")
    assert png.mode == "L"
    assert _image(client.get(url(stored, "/rendered?accept=image/png")), "image/png")
    sized = _image(client.get(url(stored, "/rendered?viewport=64,32")), "image/jpeg")
    assert sized.size == (32, 32)


def test_rendered_window_and_monochrome1(client: TestClient, archive: Archive) -> None:
    stored = archive.instances["CT_small"]
    narrow = _image(
        client.get(url(stored, "/rendered?window=-10000,1&accept=image/png")), "image/png"
    )
    assert set(np.asarray(narrow).flatten()) == {255}  # everything above the window
    assert_dicom_error(client.get(url(stored, "/rendered?window=1")), 400)
    mono1 = archive.instances["synthetic-mono1"]
    inverted = np.asarray(
        _image(client.get(url(mono1, "/rendered?accept=image/png")), "image/png")
    ).astype(int)
    ds = pydicom.dcmread(BytesIO(mono1.data))
    arr = ds.pixel_array.astype(float)
    expected_bright = arr == arr.min()  # MONOCHROME1: lowest values are white
    assert inverted[expected_bright].mean() > 200


def test_rendered_colour_frames_and_thumbnails(client: TestClient, archive: Archive) -> None:
    ybr = archive.instances["examples_ybr_color"]
    frame = _image(
        client.get(url(ybr, "/frames/30/rendered"), headers={"Accept": "image/png"}), "image/png"
    )
    assert frame.mode == "RGB" and frame.size == (320, 240)
    assert (
        _image(
            client.get(url(archive.instances["examples_palette"], "/rendered")), "image/jpeg"
        ).mode
        == "RGB"
    )
    thumb = _image(client.get(url(ybr, "/thumbnail")), "image/jpeg")
    assert max(thumb.size) == 128
    ct = archive.instances["synthetic-ct-1-2"]
    series = _image(
        client.get(f"/dicom-web/studies/{ct.study}/series/{ct.series}/thumbnail"), "image/jpeg"
    )
    assert series.size == (64, 64)
    assert _image(
        client.get(f"/dicom-web/studies/{ct.study}/thumbnail?viewport=32,32"), "image/jpeg"
    ).size == (32, 32)
    assert_dicom_error(
        client.get(url(ybr, "/rendered"), headers={"Accept": "application/pdf"}), 406
    )
    assert_dicom_error(client.get(url(ybr, "/frames/31/rendered")), 404)


# ---------------------------------------------------------------- a real server


def test_dicomweb_client_against_uvicorn(live_url: str, archive: Archive) -> None:
    dw = DICOMwebClient(url=live_url)
    ct = archive.instances["CT_small"]
    # retrieve, as stored: byte-identical to the hot-tier files
    study = dw.retrieve_study(ct.study, media_types=(("application/dicom", "*"),))
    assert len(study) == len(archive.studies[ct.study])
    raw = httpx.get(f"{live_url}/studies/{ct.study}", headers={"Accept": STAR}, timeout=30)
    contents = {c for _, c in parts(raw)}
    assert contents == {archive.hot_file(s.sop) for s in archive.studies[ct.study]}
    series = dw.retrieve_series(ct.study, ct.series)
    assert [str(d.SOPInstanceUID) for d in series] == [ct.sop]
    instance = dw.retrieve_instance(
        ct.study, ct.series, ct.sop, media_types=(("application/dicom", "*"),)
    )
    assert instance.SOPInstanceUID == ct.sop
    jpeg = archive.instances["SC_rgb_jpeg_dcmtk"]
    decoded = dw.retrieve_instance(
        jpeg.study, jpeg.series, jpeg.sop, media_types=(("application/dicom", EXPLICIT_LE),)
    )
    assert decoded.file_meta.TransferSyntaxUID == EXPLICIT_LE
    # metadata
    meta = dw.retrieve_study_metadata(ct.study)
    assert len(meta) == len(archive.studies[ct.study])
    one = dw.retrieve_instance_metadata(ct.study, ct.series, ct.sop)
    assert one["00080018"]["Value"] == [ct.sop]
    # frames: default (uncompressed) and as stored
    rle = archive.instances["SC_rgb_rle_2frame"]
    frames = dw.retrieve_instance_frames(rle.study, rle.series, rle.sop, [1, 2])
    arr = pydicom.dcmread(BytesIO(rle.data)).pixel_array
    assert frames == [arr[0].tobytes(), arr[1].tobytes()]
    stored_frames = dw.retrieve_instance_frames(
        rle.study, rle.series, rle.sop, [2], media_types=(("application/octet-stream", "*"),)
    )
    ds = pydicom.dcmread(BytesIO(rle.data))
    assert stored_frames == [get_frame(ds.PixelData, 1, number_of_frames=2)]
    # rendered
    rendered = dw.retrieve_instance_rendered(
        ct.study, ct.series, ct.sop, media_types=("image/png",)
    )
    assert Image.open(BytesIO(rendered)).size == (128, 128)
    # bulk data through the URI the metadata gives
    bulk = dw.retrieve_bulkdata(
        live_url.removesuffix("/dicom-web") + one["7FE00010"]["BulkDataURI"]
    )
    assert bulk == [pydicom.dcmread(BytesIO(ct.data)).PixelData]


# ---------------------------------------------------------------- bounded memory


class _OpenCounter:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.opened = 0
        self.open_now = 0
        self.max_open = 0


@pytest.mark.slow
def test_retrieve_large_series_streams_one_file_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = load_settings(data_dir=tmp_path)
    study, series = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2"
    blobs = []
    for i in range(1, 201):
        ds = make_instance("CT", study_uid=study, series_uid=series, instance_number=i)
        blobs.append((str(ds.SOPInstanceUID), to_part10(ds)))
    land_and_ingest(settings, blobs)
    total = sum(len(b) for _, b in blobs)

    counter = _OpenCounter()
    real_open = LocalStorage.open

    class Tracked:
        def __init__(self, stream: BinaryIO) -> None:
            self.stream = stream

        def read(self, size: int = -1) -> bytes:
            assert size > 0, "a stored file must be read in chunks, never whole"
            return self.stream.read(size)

        def __enter__(self) -> Tracked:
            return self

        def __exit__(self, *_: object) -> None:
            self.stream.close()
            with counter.lock:
                counter.open_now -= 1

    def tracked_open(self: LocalStorage, key: str) -> Tracked:
        stream = real_open(self, key)
        with counter.lock:
            counter.opened += 1
            counter.open_now += 1
            counter.max_open = max(counter.max_open, counter.open_now)
        return Tracked(stream)

    monkeypatch.setattr(LocalStorage, "open", tracked_open)
    server, thread, port = start_server(settings)
    try:
        with httpx.stream(
            "GET",
            f"http://127.0.0.1:{port}/dicom-web/studies/{study}/series/{series}",
            headers={"Accept": STAR},
            timeout=60,
        ) as response:
            assert response.status_code == 200
            assert "content-length" not in response.headers
            assert response.headers.get("transfer-encoding") == "chunked"
            chunks = response.iter_raw(64 * 1024)
            received = len(next(chunks))
            opened_at_start = counter.opened
            for chunk in chunks:
                received += len(chunk)
        assert opened_at_start < 200  # the first bytes left before most files were opened
        assert counter.opened == 200
        assert counter.max_open == 1
        assert received > total
    finally:
        server.should_exit = True
        thread.join(timeout=30)
