"""``python -m dicomweb``: serve the DICOMweb API with uvicorn on the configured port."""

from __future__ import annotations

import logging
import sys

import uvicorn

from dicomweb.app import create_app
from vannah_pipelines.errors import ConfigError
from vannah_pipelines.settings import load_settings


def main() -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = load_settings()
    except ConfigError as exc:
        logging.getLogger("dicomweb").error("%s", exc)
        return 2
    uvicorn.run(
        create_app(settings),
        host=settings.bind_host,
        port=settings.dicomweb_port,
        log_level="warning",
        access_log=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
