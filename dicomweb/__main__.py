"""``python -m dicomweb``: serve the DICOMweb API with uvicorn on the configured port."""

from __future__ import annotations

import logging
import sys

import uvicorn

from dicomweb.app import create_app
from vannah_pipelines.errors import ConfigError
from vannah_pipelines.settings import Settings, load_settings

# Largest request line + headers h11 buffers before it answers 431 (its default is 16 KiB).
MAX_HEADER_BYTES = 64 * 1024


def uvicorn_config(settings: Settings) -> uvicorn.Config:
    """The server's limits: bind address, connections served at once (503 past), keep-alive,
    header size (h11: httptools has no header size limit); HTTPS with ``ssl_enabled`` (one
    PEM file holding the certificate chain and the private key, as Orthanc reads it)."""
    certificate = str(settings.ssl_certificate) if settings.ssl_enabled else None
    return uvicorn.Config(
        create_app(settings),
        host=settings.dicomweb_bind_host,
        port=settings.dicomweb_port,
        http="h11",
        ws="none",
        limit_concurrency=settings.dicomweb_max_concurrency,
        timeout_keep_alive=int(max(1, round(settings.dicomweb_keep_alive_seconds))),
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        log_level="warning",
        access_log=False,
        ssl_certfile=certificate,
        ssl_keyfile=certificate,
    )


def main() -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = load_settings()
    except ConfigError as exc:
        logging.getLogger("dicomweb").error("%s", exc)
        return 2
    uvicorn.Server(uvicorn_config(settings)).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
