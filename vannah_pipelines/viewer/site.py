"""OHIF's prebuilt files served under a path prefix on the DICOMweb service's own origin.

Pure functions the HTTP glue (``dicomweb/viewer.py``) calls: which file a request path
names (never one outside the dist), the ``app-config.js`` for an origin, the rewrites that
move a dist built for ``/`` under ``/viewer/``, and the translation of the product's launch
URL (``?studyUID=&token=``) to OHIF's own viewer route.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

from vannah_pipelines.dicom.uids import require_uid

# OHIF's basic viewer mode answers at "<routerBasename>/viewer".
OHIF_VIEWER_ROUTE = "viewer"
# webpack's runtime in OHIF's bundles (the app and its workers) loads chunks from here.
_WEBPACK_PUBLIC_PATH = '__webpack_require__.p = "/";'
_INDEX_PUBLIC_URL = 'window.PUBLIC_URL="/"'
_ROOT_ATTRIBUTE = re.compile(r'(\b(?:src|href|content)=")/(?!/)')
_ROOT_JSON_STRING = re.compile(r'(")/(?!/)')
_ROOT_CSS_URL = re.compile(r"""(url\(\s*["']?)/(?!/)""")
_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".map": "application/json",
    ".wasm": "application/wasm",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".woff2": "font/woff2",
    ".woff": "font/woff",
    ".ttf": "font/ttf",
    ".xml": "application/xml",
    ".txt": "text/plain; charset=utf-8",
}


@dataclass(frozen=True)
class Found:
    """What a request path under the viewer's prefix resolves to."""

    path: Path
    # True when no file has the name and the path is one of OHIF's client routes.
    fallback: bool = False


def media_type(path: Path) -> str:
    """The Content-Type of a dist file (``application/wasm`` matters to browsers).

    >>> media_type(Path("a/x.wasm")), media_type(Path("x.unknown"))
    ('application/wasm', 'application/octet-stream')
    """
    return _MEDIA_TYPES.get(path.suffix.lower(), "application/octet-stream")


def resolve(dist: Path, relative: str) -> Found | None:
    """The dist file a request for ``<prefix>/<relative>`` gets, or None (404).

    A name with a dot in its last part is a file and must exist; anything else that is
    not a file is one of OHIF's client routes and gets ``index.html`` (SPA fallback).
    Names with ``..``, ``.``, empty parts, backslashes or NUL are refused outright, and
    whatever is served must be inside `dist` once symbolic links are resolved.

    >>> resolve(Path("/d"), "../etc/passwd") is None
    True
    """
    parts = relative.split("/") if relative else []
    if parts and parts[-1] == "":
        parts.pop()  # "assets/" is "assets"
    if any(p in ("", ".", "..") or "\\" in p or "\0" in p for p in parts):
        return None
    root = dist.resolve()
    candidate = root.joinpath(*parts).resolve() if parts else root
    if not candidate.is_relative_to(root):
        return None
    if candidate.is_file():
        return Found(candidate)
    if candidate.is_dir() and (candidate / "index.html").is_file() and candidate != root:
        return None  # no folder listings, no other index pages as routes
    if parts and "." in parts[-1]:
        return None  # a missing asset is a 404, not the app
    return Found(root / "index.html", fallback=True)


def needs_rewrite(path: Path) -> bool:
    """Whether a dist file's content names the root path and must be rewritten."""
    return path.suffix in (".html", ".js", ".css") or path.name == "manifest.json"


def rewrite(path: Path, content: bytes, base: str) -> bytes:
    """`content` of the dist file `path` with its root-relative URLs moved under `base`.

    OHIF's dist is built for ``/``: ``index.html`` loads ``/app.bundle.js`` and sets
    ``window.PUBLIC_URL="/"``, webpack's runtime (``__webpack_require__.p``) loads chunks
    and workers from ``/``, and the CSS loads its font from ``url(/...)``. Files without
    those are returned unchanged.

    >>> rewrite(Path("index.html"), b'<script src="/a.js"></script>', "/viewer/")
    b'<script src="/viewer/a.js"></script>'
    >>> rewrite(Path("a.css"), b"@font-face{src:url(/f.woff2)}", "/viewer")
    b'@font-face{src:url(/viewer/f.woff2)}'
    """
    base = base.rstrip("/") + "/"
    if path.suffix == ".js":
        marker = _WEBPACK_PUBLIC_PATH.encode()
        if marker not in content:
            return content
        return content.replace(marker, f"__webpack_require__.p = {json.dumps(base)};".encode())
    text = content.decode("utf-8")
    if path.suffix == ".html":
        text = text.replace(_INDEX_PUBLIC_URL, f"window.PUBLIC_URL={json.dumps(base)}")
        text = _ROOT_ATTRIBUTE.sub(lambda m: m.group(1) + base, text)
    elif path.suffix == ".css":
        text = _ROOT_CSS_URL.sub(lambda m: m.group(1) + base, text)
    elif path.name == "manifest.json":
        text = _ROOT_JSON_STRING.sub(lambda m: m.group(1) + base, text)
    return text.encode("utf-8")


def app_config(origin: str, base: str, dicomweb_prefix: str = "/dicom-web") -> str:
    """OHIF's ``app-config.js``: one DICOMweb data source, on `origin` itself.

    Same origin, so no CORS; the router base is `base` (``/viewer``). The user's token,
    when the URL has ``?token=``, is added by OHIF itself as ``Authorization: Bearer``.

    >>> "http://h:8042/dicom-web" in app_config("http://h:8042", "/viewer")
    True
    """
    root = origin.rstrip("/") + dicomweb_prefix
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "vannah",
        "configuration": {
            "friendlyName": "VannahHealthCloud",
            "name": "vannah",
            "wadoUriRoot": f"{root}/wado",
            "qidoRoot": root,
            "wadoRoot": root,
            "qidoSupportsIncludeField": True,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": True,
            "supportsWildcard": True,
            "supportsReject": False,
            "omitQuotationForMultipartRequest": True,
            "bulkDataURI": {"enabled": True},
            "dicomUploadEnabled": False,
        },
    }
    config = {
        "routerBasename": base.rstrip("/") or "/",
        "extensions": [],
        "modes": [],
        "showStudyList": True,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": True,
        "showLoadingIndicator": True,
        "investigationalUseDialog": {"option": "never"},
        "dataSources": [source],
        "defaultDataSourceName": "vannah",
    }
    # json.dumps escapes quotes and control characters; "<" too, so the value cannot close
    # a <script> element if the file is ever inlined.
    body = json.dumps(config, indent=2).replace("<", "\\u003c")
    return f"/* generated by VannahHealthCloud */\nwindow.config = {body};\n"


def launch_target(query: Iterable[tuple[str, str]], base: str) -> str | None:
    """OHIF's viewer URL for the product's launch URL ``<base>?studyUID=X&token=T``, or
    None when the query names no study (the study list is served as it is).

    ``studyUID`` becomes OHIF's ``StudyInstanceUIDs`` (repeatable); every other parameter,
    ``token`` included, is kept as it is, for OHIF reads ``token`` itself.

    >>> launch_target([("studyUID", "1.2.3"), ("token", "abc")], "/viewer")
    '/viewer/viewer?StudyInstanceUIDs=1.2.3&token=abc'
    >>> launch_target([("token", "abc")], "/viewer") is None
    True

    Raises
    ------
    UnsafeUidError
        If a ``studyUID`` is not a DICOM UID.
    """
    items = list(query)
    if not any(key == "studyUID" for key, _ in items):
        return None
    translated = [
        ("StudyInstanceUIDs", require_uid(value, "studyUID")) if key == "studyUID" else (key, value)
        for key, value in items
    ]
    return f"{base.rstrip('/')}/{OHIF_VIEWER_ROUTE}?{urlencode(translated)}"
