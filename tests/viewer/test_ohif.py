"""OHIF v3 opens a study from our DICOMweb service in headless Chromium and shows pixels.

OHIF's prebuilt dist comes from the npm package @ohif/app (npm pack, no install) and
playwright-core drives Debian's Chromium (no browser download); both are cached under
.cache/ in the repository. The viewer is served from one origin and the DICOMweb API from
another, so CORS is exercised the way a real deployment does.
"""

import json
import shutil
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from PIL import Image, ImageStat
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.responses import FileResponse
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

from dicomweb.app import create_app
from vannah_pipelines.catalog.ingest import IngestPaths, ingest_batches
from vannah_pipelines.dicom.synthetic import make_instance, to_part10
from vannah_pipelines.landing.layout import LandingZone, ReceiveFacts
from vannah_pipelines.settings import Settings, load_settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache"
OHIF_VERSION = "3.13.2"
PLAYWRIGHT_VERSION = "1.65.1"
CHROMIUM = Path("/usr/bin/chromium")


def _ohif_dist() -> Path:
    dist = CACHE / f"ohif-{OHIF_VERSION}" / "dist"
    if not (dist / "index.html").exists():
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(
                ["npm", "pack", f"@ohif/app@{OHIF_VERSION}", "--silent", "--pack-destination", tmp],
                check=True,
                capture_output=True,
                timeout=600,
            )
            [tarball] = Path(tmp).glob("*.tgz")
            with tarfile.open(tarball) as tar:
                tar.extractall(tmp, filter="data")
            shutil.rmtree(dist.parent, ignore_errors=True)
            dist.parent.mkdir(parents=True)
            shutil.move(str(Path(tmp) / "package" / "dist"), dist)
    return dist


def _node_modules() -> Path:
    prefix = CACHE / "node"
    if not (prefix / "node_modules" / "playwright-core").exists():
        prefix.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                "npm",
                "install",
                "--no-audit",
                "--no-fund",
                "--prefix",
                str(prefix),
                f"playwright-core@{PLAYWRIGHT_VERSION}",
            ],
            check=True,
            capture_output=True,
            timeout=600,
        )
    return prefix / "node_modules"


class _Server:
    def __init__(self, app: object) -> None:
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


class _SpaFiles(StaticFiles):
    """Static files, with index.html for the viewer's client-side routes."""

    async def get_response(self, path: str, scope):  # type: ignore[no-untyped-def]
        try:
            return await super().get_response(path, scope)
        except HTTPException as exc:
            if exc.status_code != 404:
                raise
            return FileResponse(Path(str(self.directory)) / "index.html")


def _app_config(dicomweb: str) -> str:
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "vannah",
        "configuration": {
            "friendlyName": "VannahHealthCloud",
            "name": "vannah",
            "wadoUriRoot": f"{dicomweb}/dicom-web/wado",
            "qidoRoot": f"{dicomweb}/dicom-web",
            "wadoRoot": f"{dicomweb}/dicom-web",
            "qidoSupportsIncludeField": True,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": True,
            "supportsWildcard": True,
            "omitQuotationForMultipartRequest": True,
            "bulkDataURI": {"enabled": True},
        },
    }
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "showStudyList": True,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "dataSources": [source],
        "defaultDataSourceName": "vannah",
    }
    return f"window.config = {json.dumps(config)};\n"


@pytest.fixture
def study(tmp_path: Path) -> Iterator[tuple[str, Settings]]:
    settings = load_settings(data_dir=tmp_path / "data")
    batch = LandingZone(settings.landing_dir).open_batch("stow")
    first = make_instance("CT", rows=256, columns=256)
    for i in range(5):
        ds = make_instance(
            "CT",
            study_uid=first.StudyInstanceUID,
            series_uid=first.SeriesInstanceUID,
            rows=256,
            columns=256,
            instance_number=i + 1,
            seed=i,
            ImagePositionPatient=[0, 0, i],
            ImageOrientationPatient=[1, 0, 0, 0, 1, 0],
            PixelSpacing=[1, 1],
            SliceThickness=1,
            RescaleSlope=1,
            RescaleIntercept=0,
        )
        batch.write_instance(
            to_part10(ds),
            ReceiveFacts(ds.SOPInstanceUID, ds.SOPClassUID, "1.2.840.10008.1.2.1", "stow"),
        )
    sealed = batch.seal()
    assert sealed is not None
    ingest_batches(
        IngestPaths(
            settings.landing_dir, settings.hot_dir, settings.catalog_dir, settings.quarantine_dir
        ),
        [sealed.batch_id],
    )
    yield str(first.StudyInstanceUID), settings


def test_ohif_opens_a_study_and_the_image_is_not_blank(
    tmp_path: Path, study: tuple[str, Settings]
) -> None:
    assert CHROMIUM.exists(), "Debian chromium missing: run .ci/bootstrap (make test does)"
    study_uid, settings = study
    site = tmp_path / "ohif"
    shutil.copytree(_ohif_dist(), site)
    node_modules = _node_modules()
    viewer = Starlette(routes=[Mount("/", app=_SpaFiles(directory=site, html=True))])
    with _Server(viewer) as ohif:
        # CORS allows no origin by default: the viewer's origin is configured, as
        # docs/viewers.md says to.
        api = create_app(settings.model_copy(update={"dicomweb_cors_origins": (ohif,)}))
        with _Server(api) as dicomweb:
            (site / "app-config.js").write_text(_app_config(dicomweb))
            shot = tmp_path / "ohif.png"
            result = subprocess.run(
                [
                    "node",
                    str(REPO / "tests" / "viewer" / "ohif_open.js"),
                    f"{ohif}/viewer?StudyInstanceUIDs={study_uid}",
                    str(shot),
                    str(tmp_path / "chromium-profile"),
                ],
                env={"NODE_PATH": str(node_modules), "PATH": "/usr/bin:/bin"},
                capture_output=True,
                text=True,
                timeout=300,
            )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    requests = report["requests"]
    assert any("/metadata" in u or "/series" in u for u in requests), requests
    assert any("/frames/" in u for u in requests), (requests, report["errors"])
    failed = [e for e in report["errors"] if e[:3].isdigit()]
    assert not failed, failed
    assert report["boxes"], "no viewport canvas"
    box = max(report["boxes"], key=lambda b: b["width"] * b["height"])
    image = Image.open(shot).convert("L")
    viewport = image.crop(
        (int(box["x"]), int(box["y"]), int(box["x"] + box["width"]), int(box["y"] + box["height"]))
    )
    # Not blank: the CT slice (random pixels, windowed) gives a wide spread of grey levels.
    stats = ImageStat.Stat(viewport)
    assert stats.stddev[0] > 10, (stats.stddev, stats.mean)
    shutil.copy(shot, REPO / ".cache" / "ohif-last.png")
