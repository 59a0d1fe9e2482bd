"""``vannah tier [--as-of DATE] [--dry-run] [--study UID]``: the storage lifecycle by hand."""

from __future__ import annotations

import argparse
import getpass
import sys
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from vannah_pipelines.settings import Settings, load_settings

if TYPE_CHECKING:  # imported when the command runs: `vannah --help` stays light
    from vannah_pipelines.storage.lifecycle import LifecycleResult, StudyMove, StudyResult


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {"data_dir": Path(args.data_dir)} if getattr(args, "data_dir", None) else {}
    config = getattr(args, "config", None)
    return load_settings(Path(config) if config else None, **overrides)


def _day(value: str) -> str:
    """``--as-of``: a YYYY-MM-DD date, refused by argparse otherwise."""
    try:
        date.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a YYYY-MM-DD date: {value!r}") from None
    return value


def _mb(size: int) -> str:
    return f"{size / 1e6:,.1f} MB"


def print_plan(result: LifecycleResult, out: TextIO) -> None:
    """Per (from, to) tier: the studies, instances and bytes the plan moves (and frees)."""
    out.write(f"tier policy as of {result.as_of:%Y-%m-%d}\n")
    planned = result.planned()
    if not planned:
        out.write("nothing to move\n")
    for (source, target), load in sorted(planned.items()):
        studies = sum(1 for m in result.moves if source in m.sources and m.target is target)
        out.write(
            f"  {source.value:>4} -> {target.value:<4} {studies} studies, "
            f"{load.instances} instances, {_mb(load.bytes)} (freed in {source.value})\n"
        )
    resumed = sum(1 for m in result.moves if m.resumed)
    if resumed:
        out.write(f"  {resumed} studies left pending by an earlier run are completed\n")


def print_summary(result: LifecycleResult, out: TextIO) -> None:
    out.write(
        f"moved {result.instances_moved} instances of {result.studies_moved} studies "
        f"({_mb(result.bytes_moved)}); deleted {result.objects_deleted} source objects "
        f"({_mb(result.bytes_freed)} freed); {len(result.failed)} studies failed; "
        f"{result.seconds:.1f} s\n"
    )
    for study in result.failed:
        out.write(f"failed {study.study_uid} -> {study.target.value}:\n")
        for reason in study.failures[:20]:
            out.write(f"  {reason}\n")


def cmd_tier(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from vannah_pipelines.storage.lifecycle import as_of_date, run_lifecycle

    settings = _settings(args)
    as_of = as_of_date(args.as_of) if args.as_of else None
    out = sys.stdout
    if args.dry_run:
        result = run_lifecycle(
            settings, as_of=as_of, dry_run=True, study=args.study, changed_by="cli:dry-run"
        )
        print_plan(result, out)
        return 0
    with tqdm(unit="study", desc="tier", disable=args.quiet) as bar:

        def progress(done: StudyResult) -> None:
            bar.update(1)

        def planned(moves: list[StudyMove]) -> None:
            bar.reset(total=len(moves))

        result = run_lifecycle(
            settings,
            as_of=as_of,
            study=args.study,
            changed_by=f"cli:{getpass.getuser()}",
            progress=progress,
            planned=planned,
        )
    print_plan(result, out)
    print_summary(result, out)
    return 1 if result.failed else 0


def add_subparsers(sub: Any) -> argparse.ArgumentParser:
    """Add ``tier`` to the ``vannah`` subparsers `sub`."""
    p: argparse.ArgumentParser = sub.add_parser(
        "tier",
        help="move studies hot -> warm -> cold by the tier policy (copy, verify, record, "
        "delete the source); --dry-run shows what would move and the bytes freed",
    )
    p.add_argument(
        "--as-of", type=_day, help="apply the policy as of this date, YYYY-MM-DD (default today)"
    )
    p.add_argument("--dry-run", action="store_true", help="only print what would move")
    p.add_argument("--study", help="only this Study Instance UID")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_tier)
    return p
