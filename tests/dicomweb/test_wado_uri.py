"""WADO-URI: GET /dicom-web/wado?requestType=WADO&studyUID=&seriesUID=&objectUID=."""

from __future__ import annotations

from io import BytesIO

import httpx
import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.dicomweb.conftest import Archive, Stored


def wado(client: TestClient, s: Stored, **params: str) -> httpx.Response:
    query = {
        "requestType": "WADO",
        "studyUID": s.study,
        "seriesUID": s.series,
        "objectUID": s.sop,
        **params,
    }
    response: httpx.Response = client.get("/dicom-web/wado", params=query)
    return response


def reason(response: httpx.Response) -> str:
    return str(response.json()["00000902"]["Value"][0])


def test_wado_uri_default_is_jpeg(client: TestClient, archive: Archive) -> None:
    response = wado(client, archive.instances["CT_small"])
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/jpeg"
    assert Image.open(BytesIO(response.content)).size == (128, 128)


def test_wado_uri_application_dicom_is_the_file_as_stored(
    client: TestClient, archive: Archive
) -> None:
    stored = archive.instances["SC_rgb_jpeg_dcmtk"]
    response = wado(client, stored, contentType="application/dicom")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/dicom"
    assert response.content == stored.data == archive.hot_file(stored.sop)


def test_wado_uri_transfer_syntax_transcodes(client: TestClient, archive: Archive) -> None:
    stored = archive.instances["MR_small_RLE"]
    response = wado(
        client, stored, contentType="application/dicom", transferSyntax="1.2.840.10008.1.2.1"
    )
    ds = pydicom.dcmread(BytesIO(response.content))
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert ds.SOPInstanceUID == stored.sop
    assert np.array_equal(ds.pixel_array, pydicom.dcmread(BytesIO(stored.data)).pixel_array)
    refused = wado(
        client, stored, contentType="application/dicom", transferSyntax="1.2.840.10008.1.2.4.50"
    )
    assert refused.status_code == 406
    assert "1.2.840.10008.1.2.4.50" in reason(refused)


def test_wado_uri_png_size_window_and_frame(client: TestClient, archive: Archive) -> None:
    stored = archive.instances["examples_ybr_color"]
    response = wado(client, stored, contentType="image/png", rows="120", frameNumber="30")
    assert response.headers["content-type"] == "image/png"
    assert Image.open(BytesIO(response.content)).size == (160, 120)
    ct = archive.instances["CT_small"]
    bright = wado(client, ct, contentType="image/png", windowCenter="-10000", windowWidth="1")
    assert set(np.asarray(Image.open(BytesIO(bright.content))).flatten()) == {255}
    assert wado(client, stored, frameNumber="31").status_code == 404


def test_wado_uri_non_image_defaults_to_dicom(client: TestClient, archive: Archive) -> None:
    stored = archive.instances["waveform_ecg"]
    response = wado(client, stored)
    assert response.headers["content-type"] == "application/dicom"
    assert response.content == stored.data
    assert wado(client, stored, contentType="image/jpeg").status_code == 406


@pytest.mark.parametrize(
    ("params", "status"),
    [
        ({"requestType": "WADO-RS"}, 400),
        ({"objectUID": "1.2.x"}, 400),
        ({"objectUID": "1.2.3.4.5"}, 404),
        ({"windowCenter": "40"}, 400),
        ({"rows": "-1"}, 400),
        ({"contentType": "text/html"}, 406),
    ],
)
def test_wado_uri_bad_requests(
    client: TestClient, archive: Archive, params: dict[str, str], status: int
) -> None:
    before = archive.snapshot()
    response = wado(client, archive.instances["CT_small"], **params)
    assert response.status_code == status, response.text
    assert reason(response)
    assert archive.snapshot() == before


def test_wado_uri_missing_uids_is_400(client: TestClient) -> None:
    response = client.get("/dicom-web/wado", params={"requestType": "WADO"})
    assert response.status_code == 400
    assert "required" in reason(response)
