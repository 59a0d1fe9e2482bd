"""``python -m receiver``: configure logging, then serve the DIMSE SCP with the loaded settings."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from receiver.app import ReceiverError, configure_logging, serve
from vannah_pipelines.errors import ConfigError
from vannah_pipelines.settings import Settings, load_settings

log = logging.getLogger("receiver")


def run(settings: Settings, *, port_file: Path | None = None) -> int:
    """Serve until SIGTERM/SIGINT; return the process exit code (0 on a clean stop)."""
    try:
        serve(settings, block=True, port_file=port_file)
    except ReceiverError as exc:
        log.error("%s", exc)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv`, configure logging, load the settings and serve; return the exit code."""
    parser = argparse.ArgumentParser(prog="python -m receiver", description=__doc__)
    parser.add_argument("--config", type=Path, help="JSON config file (else $VANNAH_CONFIG)")
    parser.add_argument(
        "--port-file", type=Path, help="write the bound port here once ready (for port 0)"
    )
    parser.add_argument("--log-level", default="INFO", help="root log level (default INFO)")
    args = parser.parse_args(argv)
    configure_logging(args.log_level.upper())
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    return run(settings, port_file=args.port_file)


if __name__ == "__main__":
    sys.exit(main())
