"""The platform's own viewer: the product's launch URL ``/viewer?studyUID=...&token=...``
opens the study in OHIF v3 (served by the DICOMweb service itself, same origin) in headless
Chromium, and every DICOMweb request OHIF makes carries the token.

OHIF's files come from the platform's own fetcher (``vannah viewer fetch``, run by ``make
test``; fetched here if missing); playwright-core drives Debian's Chromium (no browser
download), installed with npm under .cache/ in the repository. Screenshots are kept under
the test's tmp folder and copied to ``test-artifacts/``.

Authentication is on, with study-scoped tokens minted by the platform: with the study's own
token OHIF shows it; with another study's token DICOMweb refuses (403) and OHIF shows no
image.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from PIL import Image, ImageStat
from pydicom.uid import generate_uid

from dicomweb.app import create_app
from vannah_pipelines.catalog.ingest import IngestPaths, ingest_batches
from vannah_pipelines.dicom.synthetic import make_instance, to_part10
from vannah_pipelines.landing.layout import LandingZone, ReceiveFacts
from vannah_pipelines.security.principal import Scope
from vannah_pipelines.security.tokens import mint_scoped_token
from vannah_pipelines.settings import Settings, load_settings
from vannah_pipelines.viewer.fetch import fetch_viewer, ohif_package

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache"
ARTIFACTS = REPO / "test-artifacts"
PLAYWRIGHT_VERSION = "1.65.1"
CHROMIUM = Path("/usr/bin/chromium")


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
            uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")  # type: ignore[arg-type]
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


def _land_study(zone: LandingZone, seed: int) -> tuple[str, str]:
    """Five 256x256 CT slices of one new study, sealed as one landing batch: (batch, study)."""
    batch = zone.open_batch("stow")
    study_uid, series_uid = generate_uid(), generate_uid()
    for i in range(5):
        ds = make_instance(
            "CT",
            study_uid=study_uid,
            series_uid=series_uid,
            rows=256,
            columns=256,
            instance_number=i + 1,
            seed=seed * 10 + i,
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
    return sealed.batch_id, str(study_uid)


@dataclass(frozen=True)
class Platform:
    origin: str
    settings: Settings
    study: str
    other_study: str


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    """The DICOMweb service with its viewer, authentication on, two studies archived."""
    data = tmp_path_factory.mktemp("platform") / "data"
    defaults = load_settings()
    viewer_cache = defaults.viewer_cache_dir  # where `make test` fetched it
    fetch_viewer(viewer_cache, ohif_package(defaults.viewer_npm_registry))  # no-op if there
    settings = load_settings(
        data_dir=data,
        authentication_enabled=True,
        registered_users={"admin": "not-used-by-this-test"},
        viewer_enabled=True,
        viewer_cache_dir=viewer_cache,
    )
    zone = LandingZone(settings.landing_dir)
    (batch_a, study), (batch_b, other) = _land_study(zone, 1), _land_study(zone, 2)
    ingest_batches(
        IngestPaths(
            settings.landing_dir, settings.hot_dir, settings.catalog_dir, settings.quarantine_dir
        ),
        [batch_a, batch_b],
    )
    with _Server(create_app(settings)) as origin:
        yield Platform(origin, settings, study, other)


def _open(platform: Platform, token: str, shots: Path, name: str) -> tuple[dict[str, Any], Path]:
    """Open the product's launch URL for `platform.study` with `token` in Chromium."""
    assert CHROMIUM.exists(), "Debian chromium missing: run .ci/bootstrap (make test does)"
    node_modules = _node_modules()
    shot = shots / f"{name}.png"
    url = f"{platform.origin}/viewer?studyUID={platform.study}&token={token}"
    result = subprocess.run(
        [
            "node",
            str(REPO / "tests" / "viewer" / "ohif_open.js"),
            url,
            str(shot),
            str(shots / f"{name}-chromium-profile"),
        ],
        env={"NODE_PATH": str(node_modules), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(shot, ARTIFACTS / shot.name)
    report: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    (ARTIFACTS / f"{name}.json").write_text(json.dumps(report, indent=1))
    return report, shot


def _viewport_stddev(report: dict[str, Any], shot: Path) -> float:
    box = max(report["boxes"], key=lambda b: b["width"] * b["height"])
    image = Image.open(shot).convert("L")
    viewport = image.crop(
        (int(box["x"]), int(box["y"]), int(box["x"] + box["width"]), int(box["y"] + box["height"]))
    )
    return float(ImageStat.Stat(viewport).stddev[0])


def test_viewer_launch_url_opens_the_study_and_sends_its_token(
    platform: Platform, tmp_path: Path
) -> None:
    token = mint_scoped_token(platform.settings, "test", Scope(frozenset({platform.study})))
    report, shot = _open(platform, token, tmp_path, "ohif-own-token")
    requests = report["requests"]
    # The product's URL was redirected to OHIF's route, which then dropped the token.
    assert report["redirected"], report["finalUrl"]
    assert report["finalUrl"].startswith(f"{platform.origin}/viewer/viewer?"), report["finalUrl"]
    assert f"StudyInstanceUIDs={platform.study}" in report["finalUrl"]
    assert "token" not in report["finalUrl"]
    # Same origin only: DICOMweb on the viewer's own origin, nothing fetched elsewhere.
    assert not report["offOrigin"], report["offOrigin"]
    assert all(r["url"].startswith(f"{platform.origin}/dicom-web/") for r in requests)
    assert any("/metadata" in r["url"] or "/series" in r["url"] for r in requests), requests
    assert any("/frames/" in r["url"] and r["status"] == 200 for r in requests), report
    # OHIF's ?token= behaviour: every DICOMweb request carries it as a Bearer token.
    assert requests
    assert all(r["authorization"] == f"Bearer {token}" for r in requests), requests
    # Whatever names this study was served. (OHIF also searches the patient's other
    # studies: a scoped token may be refused those, which is no failure of this one.)
    refused = [r for r in requests if r["status"] >= 400]
    assert all(r["status"] == 403 and platform.study not in r["url"] for r in refused), refused
    assert not report["failedAssets"], report["failedAssets"]
    assert report["boxes"], "no viewport canvas"
    # Not blank: the CT slice (random pixels, windowed) gives a wide spread of grey levels.
    stddev = _viewport_stddev(report, shot)
    assert stddev > 10, stddev


def test_viewer_with_another_studys_token_shows_no_image(
    platform: Platform, tmp_path: Path
) -> None:
    # A valid token, of another study: the service must refuse every read of this one.
    token = mint_scoped_token(platform.settings, "test", Scope(frozenset({platform.other_study})))
    report, shot = _open(platform, token, tmp_path, "ohif-other-token")
    requests = report["requests"]
    assert requests, report
    assert all(r["authorization"] == f"Bearer {token}" for r in requests), requests
    refused = [r for r in requests if r["status"] == 403]
    assert refused, requests
    # Nothing of the study reached the browser: no successful read of it (WADO-RS under
    # /studies/{uid}), and no answer naming it in its body (QIDO-RS: a search for it by UID
    # answers 200 with an empty list, the patient's other studies included).
    served = [
        r["url"]
        for r in requests
        if r["status"] < 400
        and (f"/studies/{platform.study}" in r["url"] or platform.study in (r["body"] or ""))
    ]
    assert not served, served
    assert not any("/frames/" in r["url"] and r["status"] == 200 for r in requests), requests
    if report["boxes"]:
        assert _viewport_stddev(report, shot) < 2, "an image is shown"
