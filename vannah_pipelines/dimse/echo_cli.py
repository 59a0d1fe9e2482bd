"""``vannah echo DESTINATION``: C-ECHO a known modality or ``AET@host:port``; exit 0 when it
answers Success, 1 when it fails (unreachable, rejected, no answer), 2 for an unknown name.

Importing this module does not import pynetdicom (the command line's layer must not): the
network stack is loaded when the command runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from vannah_pipelines.dimse.peers import UnknownPeerError, resolve_peer
from vannah_pipelines.settings import Settings, load_settings


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {"data_dir": Path(args.data_dir)} if getattr(args, "data_dir", None) else {}
    config = getattr(args, "config", None)
    return load_settings(Path(config) if config else None, **overrides)


def cmd_echo(args: argparse.Namespace) -> int:
    settings = _settings(args)
    try:
        peer = resolve_peer(settings, args.destination)
    except UnknownPeerError as exc:
        sys.stderr.write(f"vannah echo: {exc}\n")
        return 2
    from vannah_pipelines.dimse.outbound import echo  # pynetdicom: only when it runs

    calling = args.aet or settings.dicom_aet
    result = echo(peer, calling, timeout=args.timeout)
    tls = " (TLS)" if peer.tls is not None else ""
    if result.ok:
        sys.stdout.write(
            f"{peer}{tls}: C-ECHO success (status 0x0000) in {result.latency_ms:.1f} ms\n"
        )
        return 0
    sys.stderr.write(
        f"vannah echo: {peer}{tls}: failed after {result.latency_ms:.1f} ms: {result.reason}\n"
    )
    return 1


def add_subparsers(sub: Any) -> None:
    """Register ``echo`` on the ``vannah`` command's subparsers."""
    p = sub.add_parser(
        "echo",
        help="C-ECHO a DICOM peer: a DicomModalities name, its AE title, or AET@host:port",
    )
    p.add_argument("destination", help="modality name, AE title, or AET@host:port")
    p.add_argument("--aet", help="calling AE title (default: dicom_aet)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per step (default 10)")
    p.set_defaults(func=cmd_echo)
