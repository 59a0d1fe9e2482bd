"""The ``vannah`` command line: up, receiver, dicomweb, import, ingest, catalog, quarantine,
token, viewer, tier, restore, route, echo."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from vannah_pipelines.dimse.echo_cli import add_subparsers as add_echo_command
from vannah_pipelines.errors import VannahError
from vannah_pipelines.routing.cli import add_subparsers as add_route_command
from vannah_pipelines.settings import Settings, load_settings
from vannah_pipelines.storage.restore_cli import add_subparsers as add_restore_command
from vannah_pipelines.storage.tier_cli import add_subparsers as add_tier_command
from vannah_pipelines.worklist.cli import add_subparsers as add_worklist_commands


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {"data_dir": Path(args.data_dir)} if args.data_dir else {}
    return load_settings(Path(args.config) if args.config else None, **overrides)


def cmd_up(args: argparse.Namespace) -> int:
    from vannah_pipelines.platform import run_platform

    return run_platform(_settings(args), Path(args.config) if args.config else None)


def _exec_service(args: argparse.Namespace, module: str) -> int:
    """Replace this process by ``python -m <module>`` with the resolved settings' env."""
    settings = _settings(args)
    env = dict(os.environ, VANNAH_DATA_DIR=str(settings.data_dir.resolve()))
    if args.config:
        env["VANNAH_CONFIG"] = str(Path(args.config).resolve())
    os.execve(sys.executable, [sys.executable, "-m", module], env)
    return 0  # pragma: no cover - execve does not return


def cmd_receiver(args: argparse.Namespace) -> int:
    return _exec_service(args, "receiver")


def cmd_dicomweb(args: argparse.Namespace) -> int:
    return _exec_service(args, "dicomweb")


def cmd_import(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from vannah_pipelines.catalog.ingest import ingest_batches
    from vannah_pipelines.landing.importer import import_files, list_import_files
    from vannah_pipelines.landing.layout import LandingZone

    settings = _settings(args)
    root = Path(args.path)
    if not root.exists():
        sys.stderr.write(f"vannah import: {root} does not exist\n")
        return 2
    files = list_import_files(root)
    with tqdm(total=len(files), unit="file", desc="import", disable=args.quiet) as bar:
        summary = import_files(
            files,
            LandingZone(settings.landing_dir),
            settings.landing_batch_max_files,
            progress=bar.update,
        )
    out = sys.stdout
    out.write(
        f"accepted {summary.accepted} files ({summary.bytes / 1e6:.1f} MB) into "
        f"{len(summary.batches)} landing batches; rejected {len(summary.rejected)}; "
        f"skipped {len(summary.skipped)}\n"
    )
    if summary.modalities:
        out.write(
            "modalities: "
            + ", ".join(f"{m or '?'} {n}" for m, n in sorted(summary.modalities.items()))
            + "\n"
        )
    for path, reason in summary.rejected:
        out.write(f"rejected {path}: {reason}\n")
    if args.ingest and summary.batches:
        from vannah_pipelines.catalog.ingest import IngestPaths

        result = ingest_batches(
            IngestPaths.for_settings(settings),
            summary.batches,
            workers=settings.ingest_workers,
        )
        out.write(f"indexed {result.instances} instances, quarantined {result.quarantined}\n")
    elif summary.batches:
        out.write(
            "the Dagster sensor (landed_batch_sensor) indexes them; or run `vannah ingest` now\n"
        )
    return 1 if summary.rejected and not summary.accepted else 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from vannah_pipelines.catalog.compaction import publish
    from vannah_pipelines.catalog.ingest import IngestPaths, ingest_batches
    from vannah_pipelines.landing.layout import LandingZone

    settings = _settings(args)
    zone = LandingZone(settings.landing_dir)
    zone.seal_stranded()
    batch_ids = [b.batch_id for b in zone.sealed_batches()]
    result = ingest_batches(
        IngestPaths.for_settings(settings),
        batch_ids,
        workers=settings.ingest_workers,
    )
    publish(settings.catalog_dir)
    sys.stdout.write(
        f"indexed {result.instances} instances from {len(result.batches)} batches, "
        f"quarantined {result.quarantined}\n"
    )
    return 0


def cmd_catalog(args: argparse.Namespace) -> int:
    import duckdb

    from vannah_pipelines.catalog.compaction import ensure_catalog

    settings = _settings(args)
    path = ensure_catalog(settings.catalog_dir).resolve()
    if not args.sql:
        sys.stdout.write(f"{path}\n")
        sys.stderr.write(
            'open it read-only, e.g. python -c "import duckdb; '
            f"print(duckdb.connect('{path}', read_only=True).sql('FROM studies'))\"\n"
            "or: vannah catalog --sql 'SELECT modality, count(*) FROM instances GROUP BY 1'\n"
        )
        return 0
    con = duckdb.connect(str(path), read_only=True)
    try:
        con.sql(args.sql).show(max_rows=args.max_rows, max_width=200)
    except duckdb.Error as exc:
        sys.stderr.write(f"vannah catalog: {exc}\n")
        return 2
    finally:
        con.close()
    return 0


def cmd_quarantine_list(args: argparse.Namespace) -> int:
    from vannah_pipelines.catalog.quarantine import list_quarantine

    settings = _settings(args)
    rows = list_quarantine(settings.catalog_dir, args.status)
    out = sys.stdout
    out.write(f"{'key':<60} {'quarantined at (UTC)':<20} {'status':<11} reason\n")
    for q in rows:
        when = f"{q.quarantined_at:%Y-%m-%d %H:%M:%S}" if q.quarantined_at else "?"
        # One line, no terminal control characters (a reason may quote the file's bytes).
        reason = "".join(c if c.isprintable() else "?" for c in " ".join(q.reason.split()))
        if len(reason) > args.reason_width:
            reason = reason[: args.reason_width - 1] + "…"
        status = q.status
        if q.released_batch_id:
            status += f" -> {q.released_batch_id}"
        out.write(f"{q.quarantine_key:<60} {when:<20} {status:<11} {reason}\n")
    sys.stderr.write(f"{len(rows)} quarantined file(s)\n")
    return 0


def cmd_quarantine_release(args: argparse.Namespace) -> int:
    import getpass

    from vannah_pipelines.catalog.compaction import publish
    from vannah_pipelines.catalog.ingest import IngestPaths
    from vannah_pipelines.catalog.quarantine import QuarantineError, release_quarantined

    settings = _settings(args)
    paths = IngestPaths(
        settings.landing_dir, settings.hot_dir, settings.catalog_dir, settings.quarantine_dir
    )
    try:
        release = release_quarantined(
            paths, args.key, reason=args.reason, changed_by=f"cli:{getpass.getuser()}"
        )
    except QuarantineError as exc:
        sys.stderr.write(f"vannah quarantine release: {exc}\n")
        return 1
    publish(settings.catalog_dir)  # the quarantine view shows the status
    sys.stdout.write(
        f"released {release.quarantine_key} into landing batch {release.batch_id}; "
        "the Dagster sensor (landed_batch_sensor) ingests it, or run `vannah ingest` now\n"
    )
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    """Print a viewer launch URL with a read-only token for one study (or its patient)."""
    import getpass

    from vannah_pipelines.catalog.lookup import study_patients
    from vannah_pipelines.catalog.reader import CatalogReader
    from vannah_pipelines.dicom.uids import require_uid
    from vannah_pipelines.security.audit import AuditEvent, AuditLog
    from vannah_pipelines.security.principal import Scope
    from vannah_pipelines.security.tokens import launch_url, mint_scoped_token, parse_ttl

    settings = _settings(args)
    study = require_uid(args.study, "StudyInstanceUID")
    try:
        ttl = parse_ttl(args.ttl) if args.ttl else settings.launch_token_ttl_seconds
    except ValueError as exc:
        sys.stderr.write(f"vannah token: {exc}\n")
        return 2
    reader = CatalogReader(settings.catalog_dir)
    try:
        patients = study_patients(reader, [study])
    finally:
        reader.close()
    if study not in patients:
        sys.stderr.write(f"vannah token: no study {study} in the catalog\n")
        return 1
    patient_id = patients[study]
    if args.patient and not patient_id:
        sys.stderr.write("vannah token: the study has no Patient ID; leave out --patient\n")
        return 1
    scope = Scope(patient_id=patient_id) if args.patient else Scope(frozenset({study}))
    subject = f"cli:{getpass.getuser()}"
    token = mint_scoped_token(settings, subject, scope, ttl_seconds=ttl)
    AuditLog(settings.audit_dir, "cli").record(
        AuditEvent(
            service="cli",
            action="token-minted",
            outcome="success",
            subject=subject,
            auth_method="local",
            study_uids=[study],
            detail=f"{'patient' if args.patient else 'study'} scope, ttl {ttl:g}s",
        )
    )
    sys.stdout.write(launch_url(settings, token, study, patient_id) + "\n")
    return 0


def cmd_lake_init(args: argparse.Namespace) -> int:
    from vannah_pipelines.catalog.lake import LakeConfig, init_lake

    settings = _settings(args)
    config = LakeConfig.from_settings(settings)
    if config is None:
        sys.stderr.write(
            "vannah lake init: no lake configured (catalog_lake_postgres and "
            "catalog_lake_data_path, docs/deployment.md)\n"
        )
        return 2
    init_lake(config)
    sys.stdout.write(f"lake ready: tables created or present under {config.data_prefix}\n")
    return 0


def cmd_viewer_fetch(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from vannah_pipelines.viewer.fetch import OHIF_PACKAGE, fetch_viewer, is_fetched, ohif_package

    settings = _settings(args)
    if args.if_enabled and not settings.viewer_enabled:
        sys.stdout.write("viewer_enabled is false: nothing to fetch\n")
        return 0
    package = ohif_package(settings.viewer_npm_registry)
    if is_fetched(settings.viewer_cache_dir, package.version):
        dist = fetch_viewer(settings.viewer_cache_dir, package)
        sys.stdout.write(f"{OHIF_PACKAGE} {package.version} already in {dist}\n")
        return 0
    with tqdm(
        unit="B", unit_scale=True, desc=f"{OHIF_PACKAGE} {package.version}", disable=args.quiet
    ) as bar:

        def progress(done: int, total: int | None) -> None:
            if total is not None and bar.total != total:
                bar.total = total
            bar.update(done - bar.n)

        dist = fetch_viewer(settings.viewer_cache_dir, package, progress)
    sys.stdout.write(f"{OHIF_PACKAGE} {package.version} (integrity checked) in {dist}\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vannah", description=__doc__)
    parser.add_argument(
        "--config", help="JSON settings file (Orthanc-style keys accepted); default $VANNAH_CONFIG"
    )
    parser.add_argument("--data-dir", help="data folder (default $VANNAH_DATA_DIR or ./data)")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "up", help="run the whole platform (receiver, Dagster webserver + daemon)"
    ).set_defaults(func=cmd_up)
    sub.add_parser("receiver", help="run the DIMSE receiver").set_defaults(func=cmd_receiver)
    sub.add_parser("dicomweb", help="run the DICOMweb service").set_defaults(func=cmd_dicomweb)
    p = sub.add_parser("import", help="bulk-import a folder or DICOMDIR tree")
    p.add_argument("path")
    p.add_argument(
        "--ingest",
        action="store_true",
        help="index right away in this process instead of waiting for the sensor",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_import)
    sub.add_parser(
        "ingest", help="index every sealed landing batch now, without Dagster"
    ).set_defaults(func=cmd_ingest)
    add_worklist_commands(sub)
    add_restore_command(sub)
    add_tier_command(sub)
    add_route_command(sub)
    add_echo_command(sub)
    viewer = sub.add_parser("viewer", help="the built-in OHIF viewer at /viewer")
    viewer_sub = viewer.add_subparsers(dest="viewer_command", required=True)
    p = viewer_sub.add_parser(
        "fetch",
        help="download the pinned @ohif/app from the npm registry into viewer_cache_dir "
        "(integrity checked; nothing to do when already there)",
    )
    p.add_argument(
        "--if-enabled", action="store_true", help="do nothing when viewer_enabled is false"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_viewer_fetch)
    lake = sub.add_parser("lake", help="the DuckLake catalog (catalog_lake_* settings)")
    lake_sub = lake.add_subparsers(dest="lake_command", required=True)
    lake_sub.add_parser(
        "init", help="create the lake's tables (once, before the services start)"
    ).set_defaults(func=cmd_lake_init)
    p = sub.add_parser("catalog", help="print the DuckDB catalog's path, or run --sql on it")
    p.add_argument("--sql", help="a query, e.g. 'FROM studies LIMIT 10'")
    p.add_argument("--max-rows", type=int, default=40)
    p.set_defaults(func=cmd_catalog)
    quarantine = sub.add_parser("quarantine", help="list quarantined files, or release one")
    quarantine_sub = quarantine.add_subparsers(dest="quarantine_command", required=True)
    p = quarantine_sub.add_parser(
        "list", help="quarantined files: key, when, status (quarantined/released), reason"
    )
    p.add_argument("--status", choices=["quarantined", "released"], help="only this status")
    p.add_argument("--reason-width", type=int, default=100, help="cut reasons to this width")
    p.set_defaults(func=cmd_quarantine_list)
    p = quarantine_sub.add_parser(
        "release",
        help="copy a quarantined file back into the landing zone as a new batch, so ingest "
        "indexes it (or quarantines it again under a new key); recorded as released",
    )
    p.add_argument("key", help="its quarantine key (<batch_id>/<file>, from `list`)")
    p.add_argument("--reason", help="why it is released (kept in the catalog)")
    p.set_defaults(func=cmd_quarantine_release)
    p = sub.add_parser(
        "token", help="print a viewer launch URL with a read-only token for one study"
    )
    p.add_argument("--study", required=True, help="Study Instance UID")
    p.add_argument("--ttl", help="lifetime: 900, 15m, 2h, 1d (default launch_token_ttl_seconds)")
    p.add_argument(
        "--patient", action="store_true", help="scope the token to every study of the patient"
    )
    p.set_defaults(func=cmd_token)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except VannahError as exc:
        sys.stderr.write(f"vannah: {exc}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
