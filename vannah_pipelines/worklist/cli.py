"""``vannah worklist ...``: import worklist files, apply HL7 orders, run the MLLP listener, list."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from vannah_pipelines.settings import Settings, load_settings
from vannah_pipelines.stop_flag import StopFlag
from vannah_pipelines.worklist.errors import InvalidItemError
from vannah_pipelines.worklist.store import WorklistStore

log = logging.getLogger(__name__)


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {"data_dir": Path(args.data_dir)} if getattr(args, "data_dir", None) else {}
    config = getattr(args, "config", None)
    return load_settings(Path(config) if config else None, **overrides)


def store_for(settings: Settings) -> WorklistStore:
    """The worklist table of `settings`' catalog."""
    return WorklistStore(settings.catalog_dir / "worklist")


def cmd_import(args: argparse.Namespace) -> int:
    from vannah_pipelines.worklist.files import list_worklist_files, read_worklist_files

    root = Path(args.path)
    if not root.exists():
        sys.stderr.write(f"vannah worklist import: {root} does not exist\n")
        return 2
    paths = list_worklist_files(root)
    if not paths:
        sys.stderr.write(f"vannah worklist import: no worklist files (.wl, .dump) in {root}\n")
        return 2
    try:
        items = read_worklist_files(paths)
    except InvalidItemError as exc:
        for reason in exc.reasons:
            sys.stderr.write(f"vannah worklist import: {reason}\n")
        sys.stderr.write("nothing imported\n")
        return 1
    actions = store_for(_settings(args)).upsert(items, "import")
    sys.stdout.write(
        f"imported {len(items)} steps ({actions.count('create')} new, "
        f"{actions.count('update')} replaced)\n"
    )
    return 0


def cmd_hl7(args: argparse.Namespace) -> int:
    from vannah_pipelines.worklist.hl7 import handle_message, split_batch
    from vannah_pipelines.worklist.mllp import decode

    store = store_for(_settings(args))
    failed = 0
    for name in args.files:
        path = Path(name)
        try:
            messages = split_batch(decode(path.read_bytes()))
        except OSError as exc:
            sys.stderr.write(f"vannah worklist hl7: {path}: {exc}\n")
            return 2
        if not messages:
            sys.stderr.write(f"vannah worklist hl7: {path}: no HL7 message (MSH) found\n")
            failed += 1
        for message in messages:
            ack, code = handle_message(message, store)
            reason = next((s.split("|")[3] for s in ack.split("\r") if s.startswith("MSA")), "")
            sys.stdout.write(f"{path.name}: {code}{' ' + reason if reason else ''}\n")
            failed += code != "AA"
    return 1 if failed else 0


def cmd_mllp(args: argparse.Namespace) -> int:
    from vannah_pipelines.worklist.mllp import MllpServer

    settings = _settings(args)
    port = args.port if args.port is not None else settings.worklist_mllp_port
    server = MllpServer(
        (settings.mllp_bind_host, port),
        store_for(settings),
        settings.mllp_idle_timeout_seconds,
        max_message_bytes=settings.mllp_max_message_bytes,
        max_connections=settings.mllp_max_connections,
    )
    stop = StopFlag()
    stop.install(signal.SIGTERM, signal.SIGINT)
    thread = server.start()
    log.info("MLLP listener on %s:%d", settings.mllp_bind_host, server.server_address[1])
    stop.wait()
    server.shutdown()
    server.server_close()
    thread.join(5)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    settings = _settings(args)
    store = store_for(settings)
    items = (
        store.items()
        if args.all
        else store.visible_items(datetime.now(), settings.worklist_past_due_hours)
    )
    rows: list[dict[str, Any]] = [i.fields() for i in items]
    if args.json:
        sys.stdout.write(json.dumps(rows, indent=1) + "\n")
    else:
        for r in rows:
            sys.stdout.write(
                f"{r['step_id']:<16} {r['status']:<12} {r['modality'] or '':<4} "
                f"{r['scheduled_procedure_step_start_date'] or ''} "
                f"{(r['scheduled_procedure_step_start_time'] or '')[:6]:<6} "
                f"{r['scheduled_station_ae_title'] or '':<16} {r['accession_number'] or ''}\n"
            )
    return 0


def add_subparsers(sub: Any) -> argparse.ArgumentParser:
    """Add ``worklist`` with its subcommands to the ``vannah`` subparsers `sub`."""
    parser: argparse.ArgumentParser = sub.add_parser(
        "worklist", help="Modality Worklist: import files, HL7 orders, MLLP listener, list"
    )
    wl = parser.add_subparsers(dest="worklist_command", required=True)
    p = wl.add_parser("import", help="import DICOM worklist files (.wl) or DCMTK dumps (.dump)")
    p.add_argument("path", help="a file, or a folder searched for *.wl, *.dcm, *.dump")
    p.set_defaults(func=cmd_import)
    p = wl.add_parser("hl7", help="apply HL7 v2 ORM^O01 / OMI^O23 messages from files")
    p.add_argument("files", nargs="+")
    p.set_defaults(func=cmd_hl7)
    p = wl.add_parser("mllp", help="run the HL7 MLLP listener (answers ACK per message)")
    p.add_argument("--port", type=int, default=None, help="default: worklist_mllp_port")
    p.set_defaults(func=cmd_mllp)
    p = wl.add_parser("list", help="print the worklist C-FIND would return")
    p.add_argument("--all", action="store_true", help="also completed, cancelled and past-due")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)
    return parser
