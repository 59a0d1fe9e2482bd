"""``vannah route --dry-run [--since] [--until] [--rules FILE] [--json]`` and
``vannah route --check FILE``: routing rules checked and backtested, nothing sent."""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from vannah_pipelines.settings import Settings, load_settings

if TYPE_CHECKING:  # imported when the command runs: `vannah --help` stays light
    from vannah_pipelines.routing.dry_run import DryRun
    from vannah_pipelines.routing.rules import RoutingRules


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {"data_dir": Path(args.data_dir)} if getattr(args, "data_dir", None) else {}
    config = getattr(args, "config", None)
    return load_settings(Path(config) if config else None, **overrides)


def parse_when(value: str, *, end: bool = False) -> datetime:
    """``--since``/``--until``: a YYYY-MM-DD date (UTC; ``--until`` takes the whole day) or
    an ISO 8601 date and time (naive: UTC).

    >>> parse_when("2026-03-07").isoformat(), parse_when("2026-03-07", end=True).isoformat()
    ('2026-03-07T00:00:00+00:00', '2026-03-08T00:00:00+00:00')
    """
    text = value.strip()
    try:
        if len(text) == 10:
            day = datetime.combine(datetime.fromisoformat(text).date(), time(), UTC)
            return day + timedelta(days=1) if end else day
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a YYYY-MM-DD date or ISO date and time: {value!r}"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _mb(size: int) -> str:
    return f"{size / 1e6:,.1f} MB"


def print_dry_run(result: DryRun, out: TextIO) -> None:
    """Per rule and destination: studies, instances, bytes, priorities, example studies."""
    since = result.since.isoformat() if result.since else "the start"
    until = result.until.isoformat() if result.until else "now"
    out.write(
        f"dry run over {result.instances} indexed instances received from {since} to "
        f"{until}; nothing is sent\n"
    )
    for tally in result.tallies:
        rule = tally.rule
        out.write(f'rule {tally.index} "{rule.name}" -> {rule.destination.describe()}')
        out.write(f" ({rule.mode} mode)\n" if rule.mode == "study" else "\n")
        out.write(
            f"  {len(tally.studies)} studies, {tally.instances} instances, "
            f"{_mb(tally.bytes)} ({tally.bytes} bytes)"
        )
        if tally.priorities:
            out.write(
                "; priority " + ", ".join(f"{p} {n}" for p, n in sorted(tally.priorities.items()))
            )
        out.write("\n")
        for uid in tally.examples:
            out.write(f"    e.g. {uid}\n")
    out.write(
        f"matched by no rule: {result.unrouted_instances} instances of "
        f"{len(result.unrouted_studies)} studies\n"
    )


def print_summary(rules: RoutingRules, source: str, out: TextIO) -> None:
    out.write(f"{source}: {len(rules.rules)} rules, valid\n")
    for index, rule in enumerate(rules.rules, start=1):
        priority = rule.priority or "derived"
        out.write(
            f'  {index}. "{rule.name}" -> {rule.destination.describe()}; '
            f"{rule.mode} mode; priority {priority}\n"
        )


def _worklist_priorities(settings: Settings) -> dict[str, str]:
    """Study Instance UID -> RequestedProcedurePriority of the worklist's steps."""
    from vannah_pipelines.worklist.store import WorklistStore

    found: dict[str, str] = {}
    for item in WorklistStore(settings.catalog_dir / "worklist").items():
        fields = item.fields()
        study, priority = (
            fields.get("study_instance_uid"),
            fields.get("requested_procedure_priority"),
        )
        if study and priority:
            found[str(study)] = str(priority)
    return found


def cmd_route(args: argparse.Namespace) -> int:
    from vannah_pipelines.routing.rules import RulesError
    from vannah_pipelines.routing.source import RulesSource, read_rules_file

    settings = _settings(args)
    out = sys.stdout
    if args.retry or args.status:
        return _retry_or_status(settings, args, out)
    if args.check is not None:
        try:
            rules = read_rules_file(
                Path(args.check),
                secret_names=settings.routing_secrets,
                max_bytes=settings.routing_rules_max_bytes,
            )
        except RulesError as exc:
            sys.stderr.write("".join(f"{p}\n" for p in exc.problems))
            return 1
        print_summary(rules, args.check, out)
        return 0
    from vannah_pipelines.routing.dry_run import dry_run
    from vannah_pipelines.storage.lifecycle import open_catalog

    if args.rules is not None:
        try:
            rules = read_rules_file(Path(args.rules), max_bytes=settings.routing_rules_max_bytes)
        except RulesError as exc:
            sys.stderr.write("".join(f"{p}\n" for p in exc.problems))
            return 1
    else:
        source = RulesSource.from_settings(settings)
        rules = source.current()
        if source.error is not None:
            sys.stderr.write(f"vannah route: using the last good rules: {source.error}\n")
    if not rules.rules:
        sys.stderr.write(
            "vannah route: no routing rules (routing_rules_file, the settings' rules, "
            "or --rules FILE)\n"
        )
        return 1
    catalog = open_catalog(settings)
    try:
        result = dry_run(
            catalog,
            rules,
            since=args.since,
            until=args.until,
            worklist_priorities=_worklist_priorities(settings),
        )
    finally:
        catalog.close()
    if args.json:
        out.write(json.dumps(result.to_json(), indent=2) + "\n")
    else:
        print_dry_run(result, out)
    return 0


def _retry_or_status(settings: Settings, args: argparse.Namespace, out: TextIO) -> int:
    """``--retry``: queue dead (and with --include-failed, failed) deliveries again;
    ``--status``: the delivery log per destination."""
    from vannah_pipelines.catalog.changes import DELIVERIES
    from vannah_pipelines.catalog.lake import record_change
    from vannah_pipelines.routing.deliveries import backlog, retry_dead
    from vannah_pipelines.storage.lifecycle import open_catalog

    catalog = open_catalog(settings)
    try:
        if args.retry:
            user = getpass.getuser()
            count = retry_dead(
                catalog,
                lambda rows: record_change(settings, DELIVERIES, rows, changed_by=f"cli:{user}"),
                destination=args.destination,
                rule=args.rule,
                study=args.study,
                include_failed=args.include_failed,
            )
            out.write(f"{count} deliveries queued again; the next routing run sends them\n")
            return 0
        rows = backlog(catalog)
    finally:
        catalog.close()
    now = datetime.now(UTC)
    if args.json:
        out.write(
            json.dumps(
                [
                    {
                        "destination": b.destination,
                        "queued": b.queued,
                        "waiting": b.waiting,
                        "failed": b.failed,
                        "dead": b.dead,
                        "delivered": b.delivered,
                        "oldest_due_age_s": round(b.age_seconds(now), 1),
                    }
                    for b in rows
                ],
                indent=2,
            )
            + "\n"
        )
        return 0
    if not rows:
        out.write("the delivery log is empty\n")
    for b in rows:
        out.write(
            f"{b.destination}: {b.delivered} delivered, {b.queued} queued, {b.waiting} waiting "
            f"for a stable study, {b.failed} failed (retrying), {b.dead} dead; oldest due "
            f"{b.age_seconds(now):.0f} s\n"
        )
    return 0


def _since(value: str) -> datetime:
    return parse_when(value)


def _until(value: str) -> datetime:
    return parse_when(value, end=True)


def add_subparsers(sub: Any) -> argparse.ArgumentParser:
    """Add ``route`` to the ``vannah`` subparsers `sub`."""
    p: argparse.ArgumentParser = sub.add_parser(
        "route",
        help="routing rules: --check FILE validates a rules file; --dry-run shows, from the "
        "catalog, what each rule would send where (nothing is sent)",
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--dry-run", action="store_true", help="backtest the rules on the catalog")
    what.add_argument("--check", metavar="FILE", help="validate a rules file")
    what.add_argument(
        "--retry",
        action="store_true",
        help="queue dead-lettered deliveries again (attempts from 0)",
    )
    what.add_argument("--status", action="store_true", help="the delivery log per destination")
    p.add_argument("--destination", help="--retry: only this destination (as --status shows it)")
    p.add_argument("--rule", help="--retry: only this rule's deliveries")
    p.add_argument("--study", help="--retry: only this study's deliveries")
    p.add_argument(
        "--include-failed",
        action="store_true",
        help="--retry: failed deliveries too, without waiting for their backoff",
    )
    p.add_argument(
        "--since", type=_since, help="received from: YYYY-MM-DD (UTC) or ISO date and time"
    )
    p.add_argument(
        "--until",
        type=_until,
        help="received until: YYYY-MM-DD (that whole day, UTC) or ISO date and time",
    )
    p.add_argument("--rules", metavar="FILE", help="these rules instead of the configured ones")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_route)
    return p
