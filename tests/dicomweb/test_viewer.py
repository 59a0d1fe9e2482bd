"""/viewer on the DICOMweb service: OHIF's files from the cache, moved under /viewer/, an
app-config.js for the requesting origin, SPA fallback, no path traversal, 503 when not
fetched, 404 when turned off, and the product's launch URL translated for OHIF."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from dicomweb.app import create_app
from vannah_pipelines.settings import Settings, load_settings
from vannah_pipelines.viewer.fetch import OHIF_VERSION, dist_dir
from vannah_pipelines.viewer.site import resolve

ORIGIN = "http://localhost:8042"
SECRET = "not for the browser"
# The shapes OHIF 3.13's dist has (index.html, webpack runtime, CSS font, manifest).
INDEX_HTML = (
    '<!doctype html><html><head><meta name="msapplication-TileImage" '
    'content="/assets/mstile.png"><script>window.PUBLIC_URL="/"</script>'
    '<link rel="manifest" href="/manifest.json"><script src="/app-config.js"></script>'
    '<script defer src="/app.bundle.1.js"></script><link href="/app.bundle.css" '
    'rel="stylesheet"><a href="https://ohif.org/">ohif</a></head><body></body></html>'
)
APP_JS = '(() => {\n__webpack_require__.p = "/";\n})();\nfetch("/dicom-web");'


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    """A viewer cache holding a small stand-in of OHIF's dist, and a secret beside it."""
    root = tmp_path / "ohif"
    dist = dist_dir(root)
    (dist / "assets").mkdir(parents=True)
    (dist / "index.html").write_text(INDEX_HTML)
    (dist / "app.bundle.1.js").write_text(APP_JS)
    (dist / "worker.js").write_text("self.onmessage = () => {};")
    (dist / "app.bundle.css").write_text("@font-face{src:url(/a1.woff2) format('woff2')}")
    (dist / "manifest.json").write_text('{"start_url": "/", "icons": [{"src": "/assets/i.png"}]}')
    (dist / "app-config.js").write_text("window.config = {dataSources: []}; // OHIF's demo")
    (dist / "assets" / "i.png").write_bytes(b"\x89PNG")
    (dist / "x.wasm").write_bytes(b"\0asm")
    (dist / "customizations").mkdir()
    (dist / "customizations" / "index.html").write_text("<p>demo</p>")
    (dist.parent / "INTEGRITY").write_text(SECRET)
    (tmp_path / "secret.txt").write_text(SECRET)
    (dist / "escape").symlink_to(tmp_path / "secret.txt")
    return root


def _settings(tmp_path: Path, cache: Path, **overrides: Any) -> Settings:
    return load_settings(data_dir=tmp_path / "data", viewer_cache_dir=cache, **overrides)


@pytest.fixture
def client(tmp_path: Path, cache: Path) -> TestClient:
    return TestClient(create_app(_settings(tmp_path, cache)), base_url=ORIGIN)


def test_viewer_index_is_moved_under_viewer(client: TestClient) -> None:
    for path in ("/viewer", "/viewer/", "/viewer/index.html"):
        response = client.get(path)
        assert response.status_code == 200, path
        assert response.headers["content-type"].startswith("text/html")
        assert response.headers["referrer-policy"] == "no-referrer"
        text = response.text
        assert 'window.PUBLIC_URL="/viewer/"' in text
        assert 'src="/viewer/app.bundle.1.js"' in text
        assert 'src="/viewer/app-config.js"' in text
        assert 'href="/viewer/app.bundle.css"' in text
        assert 'content="/viewer/assets/mstile.png"' in text
        assert 'href="https://ohif.org/"' in text  # other origins untouched
        assert not re.search(r'(src|href|content)="/(?!viewer/)', text)


def test_viewer_assets_load_from_viewer(client: TestClient) -> None:
    js = client.get("/viewer/app.bundle.1.js")
    assert js.status_code == 200
    assert js.headers["content-type"].startswith("text/javascript")
    assert '__webpack_require__.p = "/viewer/";' in js.text
    assert 'fetch("/dicom-web")' in js.text  # only webpack's public path is moved
    assert client.get("/viewer/worker.js").text == "self.onmessage = () => {};"
    assert "url(/viewer/a1.woff2)" in client.get("/viewer/app.bundle.css").text
    manifest = client.get("/viewer/manifest.json").json()
    assert manifest == {"start_url": "/viewer/", "icons": [{"src": "/viewer/assets/i.png"}]}
    wasm = client.get("/viewer/x.wasm")
    assert wasm.headers["content-type"] == "application/wasm" and wasm.content == b"\0asm"
    assert client.get("/viewer/assets/i.png").content == b"\x89PNG"
    assert client.head("/viewer/assets/i.png").status_code == 200


def test_viewer_app_config_is_for_the_requesting_origin(client: TestClient) -> None:
    response = client.get("/viewer/app-config.js")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/javascript")
    assert response.headers["cache-control"] == "no-store"
    text = response.text
    assert "OHIF's demo" not in text  # generated, never the dist's own
    match = re.search(r"window\.config = (\{.*\});", text, re.S)
    assert match is not None
    config = json.loads(match.group(1))
    assert config["routerBasename"] == "/viewer"
    assert config["defaultDataSourceName"] == "vannah"
    [source] = config["dataSources"]
    assert source["namespace"] == "@ohif/extension-default.dataSourcesModule.dicomweb"
    settings = source["configuration"]
    assert settings["qidoRoot"] == f"{ORIGIN}/dicom-web"
    assert settings["wadoRoot"] == f"{ORIGIN}/dicom-web"
    assert settings["wadoUriRoot"] == f"{ORIGIN}/dicom-web/wado"
    assert settings["supportsFuzzyMatching"] is True
    assert settings["qidoSupportsIncludeField"] is True
    other = TestClient(client.app, base_url="http://127.0.0.1:9999")
    assert (
        '"qidoRoot": "http://127.0.0.1:9999/dicom-web"' in other.get("/viewer/app-config.js").text
    )


@pytest.mark.parametrize(
    "path", ["/viewer/viewer", "/viewer/viewer/dicomweb", "/viewer/segmentation", "/viewer/local"]
)
def test_viewer_client_routes_get_the_index(client: TestClient, path: str) -> None:
    response = client.get(path, params={"StudyInstanceUIDs": "1.2.3"})
    assert response.status_code == 200
    assert 'window.PUBLIC_URL="/viewer/"' in response.text


@pytest.mark.parametrize("path", ["/viewer/missing.js", "/viewer/assets/nope.png"])
def test_viewer_missing_asset_is_404(client: TestClient, path: str) -> None:
    assert client.get(path).status_code == 404


def _raw_get(app: Any, path: str) -> tuple[int, bytes]:
    """GET `path` exactly as given (no client-side URL normalisation)."""
    messages: list[dict[str, Any]] = []
    requested = False

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        while not any(
            m["type"] == "http.response.body" and not m.get("more_body") for m in messages
        ):
            await asyncio.sleep(0.01)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"localhost")],
        "server": ("localhost", 80),
        "client": ("127.0.0.1", 12345),
    }
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in messages if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return status, body


@pytest.mark.parametrize(
    "path",
    [
        "/viewer/../3.13.2/INTEGRITY",
        "/viewer/../INTEGRITY",
        "/viewer/assets/../../INTEGRITY",
        "/viewer/../../../secret.txt",
        "/viewer/./index.html/../../INTEGRITY",
        "/viewer//etc/passwd",
        "/viewer/escape",  # a symbolic link out of the dist
        "/viewer/assets\\..\\..\\INTEGRITY",
        "/viewer/customizations/",  # no other index page, no listing
    ],
)
def test_viewer_refuses_path_traversal(client: TestClient, path: str) -> None:
    status, body = _raw_get(client.app, path)
    assert status == 404, (path, body[:200])
    assert SECRET.encode() not in body


def test_viewer_refuses_encoded_traversal(client: TestClient) -> None:
    for path in (
        "/viewer/%2e%2e/INTEGRITY",
        "/viewer/..%2fINTEGRITY",
        "/viewer/%2e%2e%2f..%2fsecret.txt",
    ):
        response = client.get(path)
        assert response.status_code == 404, path
        assert SECRET not in response.text


def test_resolve_stays_in_dist(cache: Path) -> None:
    dist = dist_dir(cache)
    assert resolve(dist, "../INTEGRITY") is None
    assert resolve(dist, "escape") is None
    assert resolve(dist, "index.html\0") is None
    found = resolve(dist, "viewer")
    assert found is not None and found.fallback and found.path.name == "index.html"
    found = resolve(dist, "assets/i.png")
    assert found is not None and not found.fallback


def test_viewer_launch_url_is_translated_for_ohif(client: TestClient) -> None:
    response = client.get(
        "/viewer",
        params={"studyUID": "1.2.840.113619.2.1", "token": "a.b-c_d"},
        follow_redirects=False,
    )
    assert response.status_code == 302
    assert response.headers["location"] == (
        "/viewer/viewer?StudyInstanceUIDs=1.2.840.113619.2.1&token=a.b-c_d"
    )
    assert response.headers["referrer-policy"] == "no-referrer"
    bad = client.get(
        "/viewer", params={"studyUID": "../../x", "token": "t"}, follow_redirects=False
    )
    assert bad.status_code == 400


def test_viewer_not_fetched_is_503_saying_how_to_fetch(tmp_path: Path) -> None:
    client = TestClient(create_app(_settings(tmp_path, tmp_path / "empty")), base_url=ORIGIN)
    for path in ("/viewer", "/viewer/app-config.js", "/viewer/viewer", "/viewer/app.bundle.1.js"):
        response = client.get(path)
        assert response.status_code == 503, path
        assert "vannah viewer fetch" in response.text
        assert OHIF_VERSION in response.text
    assert client.get("/dicom-web/studies").status_code == 200  # the service itself runs


def test_viewer_disabled_is_404(tmp_path: Path, cache: Path) -> None:
    client = TestClient(
        create_app(_settings(tmp_path, cache, viewer_enabled=False)), base_url=ORIGIN
    )
    for path in ("/viewer", "/viewer/index.html", "/viewer/app-config.js", "/viewer/viewer"):
        assert client.get(path).status_code == 404, path


def test_viewer_does_not_shadow_dicomweb(client: TestClient) -> None:
    assert client.get("/dicom-web/studies").status_code == 200
    assert client.get("/dicom-web/nothing-here").status_code == 404
