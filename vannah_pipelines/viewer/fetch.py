"""Fetch OHIF's prebuilt viewer (npm package ``@ohif/app``, pinned) into a local cache.

Stdlib only, no Node: the tarball is downloaded with urllib, its npm integrity (SRI
``sha512-...``) checked before anything is extracted, and only ``package/dist`` is
extracted, member by member (regular files and folders only; no links, no absolute or
``..`` names). The result appears at ``<cache>/<version>/dist`` by one atomic rename, so a
half-extracted cache is never used.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import shutil
import tarfile
import tempfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from vannah_pipelines.errors import ViewerFetchError

log = logging.getLogger(__name__)

OHIF_PACKAGE = "@ohif/app"
OHIF_VERSION = "3.13.2"
# The npm registry's `dist.integrity` of @ohif/app 3.13.2 (SRI: sha512 of the tarball).
OHIF_INTEGRITY = (
    "sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq"
    "+jd5xXZB9E8EA=="
)
DEFAULT_REGISTRY = "https://registry.npmjs.org"
# The tarball is ~50 MB; anything much bigger is not the package we pinned.
MAX_TARBALL_BYTES = 256 * 1024**2
# Its dist unpacks to ~215 MB; a bound on what extraction may write.
MAX_EXTRACTED_BYTES = 1024**3
_DIST_PREFIX = PurePosixPath("package/dist")
_CHUNK = 1024**2
_HASHES = {"sha512": hashlib.sha512, "sha384": hashlib.sha384, "sha256": hashlib.sha256}


@dataclass(frozen=True)
class ViewerPackage:
    """One pinned npm tarball: where it is and what it must hash to."""

    version: str
    url: str
    integrity: str


def ohif_package(registry: str = DEFAULT_REGISTRY) -> ViewerPackage:
    """The pinned ``@ohif/app`` tarball on `registry` (an npm registry or a mirror of it).

    >>> ohif_package().url
    'https://registry.npmjs.org/@ohif/app/-/app-3.13.2.tgz'
    """
    return ViewerPackage(
        OHIF_VERSION,
        f"{registry.rstrip('/')}/{OHIF_PACKAGE}/-/app-{OHIF_VERSION}.tgz",
        OHIF_INTEGRITY,
    )


def dist_dir(cache_dir: Path, version: str = OHIF_VERSION) -> Path:
    """Where the viewer's files of `version` are (or will be) in `cache_dir`.

    >>> dist_dir(Path("/c")).as_posix()
    '/c/3.13.2/dist'
    """
    return cache_dir / version / "dist"


def is_fetched(cache_dir: Path, version: str = OHIF_VERSION) -> bool:
    """Whether `cache_dir` holds a complete viewer of `version` (it only appears whole)."""
    return (dist_dir(cache_dir, version) / "index.html").is_file()


def parse_integrity(integrity: str) -> tuple[str, bytes]:
    """Split an SRI value (``sha512-<base64>``) into the hash name and the digest.

    >>> parse_integrity("sha256-" + "A" * 43 + "=")[0]
    'sha256'

    Raises
    ------
    ViewerFetchError
        If the algorithm is not sha256/384/512 or the digest is not base64 of its size.
    """
    algorithm, _, encoded = integrity.partition("-")
    if algorithm not in _HASHES:
        raise ViewerFetchError(f"unsupported integrity algorithm: {integrity[:20]!r}")
    try:
        digest = base64.b64decode(encoded, validate=True)
    except ValueError as exc:
        raise ViewerFetchError(f"integrity is not base64: {integrity[:20]!r}") from exc
    if len(digest) != _HASHES[algorithm]().digest_size:
        raise ViewerFetchError(f"integrity digest has the wrong size: {integrity[:20]!r}")
    return algorithm, digest


def download(
    url: str,
    target: Path,
    integrity: str,
    progress: Callable[[int, int | None], None] | None = None,
    timeout: float = 60.0,
    max_bytes: int = MAX_TARBALL_BYTES,
) -> None:
    """Download `url` into `target` and check it against `integrity`.

    `progress(bytes_read, total_or_None)` is called after each chunk. `target` is left in
    place only if it matches.

    Raises
    ------
    ViewerFetchError
        On a network error, a body over `max_bytes`, or an integrity mismatch.
    """
    algorithm, expected = parse_integrity(integrity)
    digest = _HASHES[algorithm]()
    read = 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, target.open("wb") as out:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            while chunk := response.read(_CHUNK):
                read += len(chunk)
                if read > max_bytes:
                    raise ViewerFetchError(f"{url}: larger than {max_bytes} bytes")
                digest.update(chunk)
                out.write(chunk)
                if progress is not None:
                    progress(read, total)
    except OSError as exc:  # URLError and HTTPError are OSErrors
        target.unlink(missing_ok=True)
        raise ViewerFetchError(f"cannot download {url}: {exc}") from exc
    except ViewerFetchError:
        target.unlink(missing_ok=True)
        raise
    if digest.digest() != expected:
        target.unlink(missing_ok=True)
        actual = base64.b64encode(digest.digest()).decode()
        raise ViewerFetchError(
            f"{url}: integrity mismatch (expected {integrity}, got {algorithm}-{actual}); "
            "nothing was extracted"
        )


def _dist_member_path(member: tarfile.TarInfo) -> PurePosixPath | None:
    """The path of `member` relative to ``package/dist``, or None if it is outside it.

    Raises
    ------
    ViewerFetchError
        If the member is a link or a special file, or its name is absolute or holds ``..``.
    """
    name = PurePosixPath(member.name)
    if name.is_absolute() or ".." in name.parts or "\\" in member.name or "\0" in member.name:
        raise ViewerFetchError(f"unsafe tar member name: {member.name!r}")
    if not (member.isfile() or member.isdir()):
        raise ViewerFetchError(f"tar member is not a regular file or folder: {member.name!r}")
    if name == _DIST_PREFIX or _DIST_PREFIX not in name.parents:
        return None
    return name.relative_to(_DIST_PREFIX)


def extract_dist(tarball: Path, target: Path, max_bytes: int = MAX_EXTRACTED_BYTES) -> int:
    """Extract the ``package/dist`` files of `tarball` into `target` (created); return how
    many files were written.

    Every member is checked, even outside ``package/dist``: one unsafe member refuses the
    whole package.

    Raises
    ------
    ViewerFetchError
        On an unsafe member, a corrupt archive, more than `max_bytes`, or no
        ``package/dist/index.html``.
    """
    target.mkdir(parents=True)
    root = target.resolve()
    written = 0
    size = 0
    try:
        with tarfile.open(tarball, mode="r:gz") as tar:
            for member in tar:
                relative = _dist_member_path(member)
                if relative is None:
                    continue
                path = root.joinpath(*relative.parts)
                if not path.resolve().is_relative_to(root):  # belt and braces
                    raise ViewerFetchError(f"unsafe tar member name: {member.name!r}")
                if member.isdir():
                    path.mkdir(parents=True, exist_ok=True)
                    continue
                size += member.size
                if size > max_bytes:
                    raise ViewerFetchError(f"{tarball.name}: unpacks to more than {max_bytes}")
                source = tar.extractfile(member)
                if source is None:
                    raise ViewerFetchError(f"cannot read tar member {member.name!r}")
                path.parent.mkdir(parents=True, exist_ok=True)
                with source, path.open("xb") as out:
                    shutil.copyfileobj(source, out, _CHUNK)
                written += 1
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ViewerFetchError(f"cannot extract {tarball.name}: {exc}") from exc
    if not (root / "index.html").is_file():
        raise ViewerFetchError(f"{tarball.name} has no package/dist/index.html")
    return written


def fetch_viewer(
    cache_dir: Path,
    package: ViewerPackage | None = None,
    progress: Callable[[int, int | None], None] | None = None,
) -> Path:
    """Make sure the viewer's files are in `cache_dir`; return their folder.

    Downloads and extracts only when missing. The download and the extraction happen in a
    temporary folder inside `cache_dir`, renamed to ``<version>`` once complete: a reader
    sees the whole dist or none of it, and two concurrent fetches cannot mix their files.

    Raises
    ------
    ViewerFetchError
        If the package cannot be downloaded, does not match its integrity, or is unsafe.
    """
    package = package or ohif_package()
    final = cache_dir / package.version
    if is_fetched(cache_dir, package.version):
        return dist_dir(cache_dir, package.version)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".tmp-{package.version}-", dir=cache_dir))
    except OSError as exc:
        raise ViewerFetchError(f"cannot create the viewer cache {cache_dir}: {exc}") from exc
    try:
        tarball = work / "package.tgz"
        log.info("downloading %s", package.url)
        download(package.url, tarball, package.integrity, progress)
        staged = work / "staged"
        files = extract_dist(tarball, staged / "dist")
        (staged / "INTEGRITY").write_text(f"{package.url}\n{package.integrity}\n")
        if final.exists() and not is_fetched(cache_dir, package.version):
            # Not ours to have left (we only rename whole folders in): set it aside.
            shutil.rmtree(final)
        try:
            staged.rename(final)
        except OSError:
            if not is_fetched(cache_dir, package.version):
                raise
            log.info("another process fetched %s %s first", OHIF_PACKAGE, package.version)
        else:
            log.info("viewer %s: %d files in %s", package.version, files, final / "dist")
    except OSError as exc:
        raise ViewerFetchError(f"cannot write the viewer cache {cache_dir}: {exc}") from exc
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(work)
    return dist_dir(cache_dir, package.version)
