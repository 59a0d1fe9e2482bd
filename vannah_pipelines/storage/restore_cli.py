"""``vannah restore STUDY_UID [--wait]``: bring a study back from the cold tier by hand, with
progress and each instance's state (what the Dagster restore job does for the spool)."""

from __future__ import annotations

import argparse
import getpass
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vannah_pipelines.dicom.uids import is_uid
from vannah_pipelines.settings import Settings, load_settings

if TYPE_CHECKING:  # the command imports them when it runs: `vannah` starts light
    from collections.abc import Callable

    from vannah_pipelines.storage.restoring import InstanceRestore, StudyRestore


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {"data_dir": Path(args.data_dir)} if getattr(args, "data_dir", None) else {}
    config = getattr(args, "config", None)
    return load_settings(Path(config) if config else None, **overrides)


def cmd_restore(args: argparse.Namespace) -> int:
    """Restore the study now as far as the archive allows; with --wait, until it is hot."""
    from tqdm import tqdm

    from vannah_pipelines.storage.lifecycle import open_catalog
    from vannah_pipelines.storage.restore import request_restore
    from vannah_pipelines.storage.restoring import (
        StudyState,
        UnknownStudyError,
        restore_study,
    )
    from vannah_pipelines.storage.tiers import StorageTiers

    study = str(args.study_uid).strip()
    if not is_uid(study):
        sys.stderr.write(f"vannah restore: {study[:80]!r} is not a Study Instance UID\n")
        return 2
    settings = _settings(args)
    tiers = StorageTiers(settings)
    changed_by = f"cli:{getpass.getuser()}"
    attempt = 0
    while True:
        attempt += 1
        catalog = open_catalog(settings)
        try:
            total = catalog.query(
                "SELECT count(*) FROM instances WHERE study_instance_uid = ?", [study]
            )[0][0]
            if not total:
                raise UnknownStudyError(study)
            with tqdm(
                total=total, unit="instance", desc="restore", disable=args.quiet, file=sys.stderr
            ) as bar:
                result = restore_study(
                    settings,
                    catalog,
                    study,
                    progress=_progress(bar.update),
                    tiers=tiers,
                    changed_by=changed_by,
                )
        except UnknownStudyError:
            sys.stderr.write(f"vannah restore: no study {study} in the catalog\n")
            return 1
        finally:
            catalog.close()
        _report(result, verbose=not args.summary_only)
        if result.state is StudyState.ONLINE:
            return 0
        # The sensor finishes what this run could not (the archive may take hours).
        request_restore(settings, study, reason="cli")
        if not args.wait or (result.failed and not result.pending):
            break
        sys.stderr.write(
            f"waiting {args.poll_seconds:g} s for the archive (attempt {attempt}; expected "
            f"within {settings.cold_restore_expected_hours:g} h)\n"
        )
        time.sleep(args.poll_seconds)
    if result.state is StudyState.RESTORING:
        sys.stdout.write(
            f"the archive is restoring {result.pending} instances (expected within "
            f"{settings.cold_restore_expected_hours:g} h): the restore request stays filed and "
            "the Dagster sensor (restore_request_sensor) finishes it; or run again with --wait\n"
        )
        return 3
    sys.stdout.write("restore failed: the restore request stays filed and is retried\n")
    return 1


def _progress(update: Callable[[int], object]) -> Callable[[InstanceRestore], None]:
    def step(_outcome: InstanceRestore) -> None:
        update(1)

    return step


def _report(result: StudyRestore, *, verbose: bool) -> None:
    out = sys.stdout
    if verbose:
        for i in result.instances:
            detail = f"  {i.detail}" if i.detail else ""
            out.write(f"{i.sop_instance_uid:<64} {i.state.value}{detail}\n")
    out.write(result.describe() + "\n")
    if result.hot_until is not None:
        out.write(f"held hot until {result.hot_until:%Y-%m-%d %H:%M} UTC\n")


def add_subparsers(sub: Any) -> None:
    """Add ``restore`` to the ``vannah`` subparsers `sub`."""
    p: argparse.ArgumentParser = sub.add_parser(
        "restore",
        help="bring a study back from the cold tier into the hot tier (kept "
        "restore_cache_days), showing each instance's state",
        description="Restore a study from the cold tier now, as far as the archive allows. "
        "Exit status: 0 no instance left in the cold tier; 1 unknown study, or a copy "
        "failed verification; 2 not a UID; 3 the archive is still restoring (the request "
        "stays filed and the Dagster sensor finishes it).",
    )
    p.add_argument("study_uid", help="Study Instance UID")
    p.add_argument(
        "--wait",
        action="store_true",
        help="poll the archive until no instance is left in the cold tier (hours)",
    )
    p.add_argument(
        "--poll-seconds", type=float, default=300.0, help="between polls with --wait (300)"
    )
    p.add_argument("--summary-only", action="store_true", help="no line per instance")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_restore)
