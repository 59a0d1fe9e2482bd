"""The viewer fetcher against tarballs served by a loopback http.server: integrity checked
before extraction, unsafe members refused, only package/dist kept, the cache made whole."""

from __future__ import annotations

import base64
import hashlib
import io
import tarfile
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from vannah_pipelines.cli import main
from vannah_pipelines.errors import ViewerFetchError
from vannah_pipelines.viewer import fetch
from vannah_pipelines.viewer.fetch import (
    ViewerPackage,
    dist_dir,
    fetch_viewer,
    is_fetched,
    ohif_package,
    parse_integrity,
)

VERSION = "9.9.9"
INDEX = b"<!doctype html><title>OHIF</title>"


def _member(
    name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE
) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
        info.linkname = data.decode()
    return info, data


def _tarball(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return out.getvalue()


def _good() -> list[tuple[tarfile.TarInfo, bytes]]:
    return [
        _member("package/package.json", b"{}"),
        _member("package/README.md", b"readme"),
        _member("package/dist", kind=tarfile.DIRTYPE),
        _member("package/dist/index.html", INDEX),
        _member("package/dist/assets/logo.png", b"png"),
        _member("package/dist/app.bundle.js", b"js"),
    ]


def _integrity(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


class _Registry:
    """A folder served over http://127.0.0.1:<port>/, counting the requests it answers."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.hits = 0
        registry = self

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self) -> None:
                registry.hits += 1
                super().do_GET()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def publish(self, name: str, data: bytes) -> ViewerPackage:
        (self.root / name).write_bytes(data)
        return ViewerPackage(VERSION, f"{self.url}/{name}", _integrity(data))


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[_Registry]:
    root = tmp_path / "registry"
    root.mkdir()
    served = _Registry(root)
    thread = threading.Thread(target=served.server.serve_forever, daemon=True)
    thread.start()
    yield served
    served.server.shutdown()
    served.server.server_close()
    thread.join(timeout=5)


def _leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def test_fetch_viewer_keeps_only_dist(registry: _Registry, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    package = registry.publish("app.tgz", _tarball(*_good()))
    dist = fetch_viewer(cache, package)
    assert dist == dist_dir(cache, VERSION) and is_fetched(cache, VERSION)
    assert (dist / "index.html").read_bytes() == INDEX
    assert (dist / "assets" / "logo.png").read_bytes() == b"png"
    assert sorted(p.name for p in (cache / VERSION).iterdir()) == ["INTEGRITY", "dist"]
    assert package.integrity in (cache / VERSION / "INTEGRITY").read_text()
    assert _leftovers(cache) == [VERSION]  # no temporary folder left


def test_fetch_viewer_downloads_once(registry: _Registry, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    package = registry.publish("app.tgz", _tarball(*_good()))
    fetch_viewer(cache, package)
    fetch_viewer(cache, package)
    assert registry.hits == 1


def test_fetch_viewer_refuses_an_integrity_mismatch(registry: _Registry, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    package = registry.publish("app.tgz", _tarball(*_good()))
    tampered = ViewerPackage(VERSION, package.url, _integrity(b"another tarball"))
    with pytest.raises(ViewerFetchError, match="integrity mismatch"):
        fetch_viewer(cache, tampered)
    assert not is_fetched(cache, VERSION)
    assert _leftovers(cache) == []


def test_fetch_viewer_checks_integrity_before_extracting(
    registry: _Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = registry.publish("app.tgz", _tarball(*_good()))
    extracted: list[Path] = []
    monkeypatch.setattr(fetch, "extract_dist", lambda tarball, target: extracted.append(target))
    with pytest.raises(ViewerFetchError):
        fetch_viewer(tmp_path / "cache", ViewerPackage(VERSION, package.url, _integrity(b"x")))
    assert extracted == []


@pytest.mark.parametrize(
    "bad",
    [
        _member("package/dist/../../escaped.txt", b"x"),
        _member("package/../escaped.txt", b"x"),
        _member("/tmp/escaped.txt", b"x"),
        _member("package/dist/link", b"/etc/passwd", tarfile.SYMTYPE),
        _member("package/dist/hard", b"package/dist/index.html", tarfile.LNKTYPE),
        _member("package/other/link", b"../../..", tarfile.SYMTYPE),  # outside dist too
        _member("package/dist/fifo", b"", tarfile.FIFOTYPE),
    ],
    ids=["dotdot-in-dist", "dotdot", "absolute", "symlink", "hardlink", "symlink-outside", "fifo"],
)
def test_fetch_viewer_refuses_an_unsafe_member(
    registry: _Registry, tmp_path: Path, bad: tuple[tarfile.TarInfo, bytes]
) -> None:
    cache = tmp_path / "cache"
    package = registry.publish("app.tgz", _tarball(*_good(), bad))
    with pytest.raises(ViewerFetchError, match=r"unsafe tar member|not a regular file"):
        fetch_viewer(cache, package)
    assert not is_fetched(cache, VERSION)
    assert _leftovers(cache) == []
    assert not (tmp_path / "escaped.txt").exists()
    assert not list(tmp_path.rglob("escaped.txt"))


def test_fetch_viewer_refuses_a_package_without_index(registry: _Registry, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    package = registry.publish("app.tgz", _tarball(_member("package/dist/app.js", b"js")))
    with pytest.raises(ViewerFetchError, match=r"no package/dist/index\.html"):
        fetch_viewer(cache, package)
    assert _leftovers(cache) == []


def test_fetch_viewer_reports_a_download_error(registry: _Registry, tmp_path: Path) -> None:
    missing = ViewerPackage(VERSION, f"{registry.url}/missing.tgz", _integrity(b""))
    with pytest.raises(ViewerFetchError, match="cannot download"):
        fetch_viewer(tmp_path / "cache", missing)
    assert _leftovers(tmp_path / "cache") == []


def test_fetch_viewer_never_shows_a_half_extracted_cache(
    registry: _Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    package = registry.publish("app.tgz", _tarball(*_good()))
    seen: list[bool] = []
    real = fetch.extract_dist

    def extract_and_look(tarball: Path, target: Path) -> int:
        files = real(tarball, target)
        # Everything is extracted, but not renamed into place yet.
        seen.append(is_fetched(cache, VERSION) or (cache / VERSION).exists())
        return files

    monkeypatch.setattr(fetch, "extract_dist", extract_and_look)
    fetch_viewer(cache, package)
    assert seen == [False]
    assert is_fetched(cache, VERSION)


def test_fetch_viewer_replaces_a_folder_it_did_not_complete(
    registry: _Registry, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    (cache / VERSION / "dist" / "assets").mkdir(parents=True)  # e.g. copied in by hand, half
    package = registry.publish("app.tgz", _tarball(*_good()))
    dist = fetch_viewer(cache, package)
    assert (dist / "index.html").read_bytes() == INDEX


def test_ohif_package_is_pinned_with_its_npm_integrity() -> None:
    package = ohif_package("https://mirror.example/npm/")
    assert package.url == "https://mirror.example/npm/@ohif/app/-/app-3.13.2.tgz"
    algorithm, digest = parse_integrity(package.integrity)
    assert algorithm == "sha512" and len(digest) == 64


@pytest.mark.parametrize("value", ["md5-AAAA", "sha512-not base64!", "sha512-AAAA", "nothing"])
def test_parse_integrity_refuses_bad_values(value: str) -> None:
    with pytest.raises(ViewerFetchError):
        parse_integrity(value)


def test_cli_viewer_fetch_does_nothing_when_disabled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("VANNAH_VIEWER_ENABLED", "false")
    monkeypatch.setenv("VANNAH_VIEWER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("VANNAH_VIEWER_NPM_REGISTRY", "http://127.0.0.1:9/unreachable")
    assert main(["viewer", "fetch", "--if-enabled"]) == 0
    assert "nothing to fetch" in capsys.readouterr().out
    assert not (tmp_path / "cache").exists()


def test_cli_viewer_fetch_reports_what_is_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    (dist_dir(cache) / "index.html").parent.mkdir(parents=True)
    (dist_dir(cache) / "index.html").write_bytes(INDEX)
    monkeypatch.setenv("VANNAH_VIEWER_CACHE_DIR", str(cache))
    monkeypatch.setenv("VANNAH_VIEWER_NPM_REGISTRY", "http://127.0.0.1:9/unreachable")
    assert main(["viewer", "fetch", "-q"]) == 0
    assert f"@ohif/app 3.13.2 already in {dist_dir(cache)}" in capsys.readouterr().out


def test_cli_viewer_fetch_fails_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("VANNAH_VIEWER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("VANNAH_VIEWER_NPM_REGISTRY", "http://127.0.0.1:9/unreachable")
    assert main(["viewer", "fetch", "-q"]) == 2
    assert "cannot download http://127.0.0.1:9/unreachable/@ohif/app/-/app-3.13.2.tgz" in (
        capsys.readouterr().err
    )
    assert _leftovers(tmp_path / "cache") == []
