"""Dry run and backtest: what each rule would send where, from the catalog, sending nothing."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from vannah_pipelines.catalog.schema import snake
from vannah_pipelines.routing.evaluate import (
    CATALOG_COLUMNS,
    InstanceFacts,
    Route,
    Router,
    header_from_json,
)
from vannah_pipelines.routing.rules import RoutingRules, Rule

if TYPE_CHECKING:
    from vannah_pipelines.catalog.reader import CatalogReader

EXAMPLES = 3
PAGE = 5000
_BASE = (
    "study_instance_uid",
    "series_instance_uid",
    "sop_instance_uid",
    "size_bytes",
    "received_at",
    "calling_ae",
    "source_file",
    "checksum",
)


@dataclass
class RouteTally:
    """What one rule would send to its destination."""

    index: int
    rule: Rule
    studies: set[str] = field(default_factory=set)
    instances: int = 0
    bytes: int = 0
    priorities: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def add_study(self, study_uid: str) -> None:
        if study_uid not in self.studies:
            self.studies.add(study_uid)
            if len(self.examples) < EXAMPLES:
                self.examples.append(study_uid)

    def to_json(self) -> dict[str, Any]:
        return {
            "rule": self.rule.name,
            "index": self.index,
            "mode": self.rule.mode,
            "destination": self.rule.destination.model_dump(
                mode="json", by_alias=True, exclude_none=True
            ),
            "studies": len(self.studies),
            "instances": self.instances,
            "bytes": self.bytes,
            "priorities": dict(sorted(self.priorities.items())),
            "example_studies": list(self.examples),
        }


@dataclass
class DryRun:
    """The dry run's result: per rule (in rule order) its tally, and what matched nothing."""

    since: datetime | None
    until: datetime | None
    tallies: list[RouteTally]
    instances: int = 0
    unrouted_instances: int = 0
    unrouted_studies: set[str] = field(default_factory=set)

    def to_json(self) -> dict[str, Any]:
        return {
            "since": self.since.isoformat() if self.since else None,
            "until": self.until.isoformat() if self.until else None,
            "instances_evaluated": self.instances,
            "unrouted_instances": self.unrouted_instances,
            "unrouted_studies": len(self.unrouted_studies),
            "routes": [t.to_json() for t in self.tallies],
        }


def _rows(
    catalog: CatalogReader,
    columns: list[str],
    since: datetime | None,
    until: datetime | None,
    page: int,
    order: str = "received_at",
    unrouted: bool = False,
) -> Iterator[list[dict[str, Any]]]:
    """Pages of indexed current instances whose `order` column (``received_at`` or
    ``indexed_at``) is in [since, until), `page` rows at a time (keyset pagination: memory
    holds one page, whatever the archive's size); with `unrouted`, only versions the
    delivery log holds nothing for."""
    if order not in ("received_at", "indexed_at"):
        raise ValueError(f"cannot page instances by {order!r}")
    where = ["coalesce(tier, '') <> 'landing'", f"{order} IS NOT NULL"]
    params: list[Any] = []
    if since is not None:
        where.append(f"{order} >= ?")
        params.append(since)
    if until is not None:
        where.append(f"{order} < ?")
        params.append(until)
    if unrouted:
        where.append(
            "NOT EXISTS (SELECT 1 FROM delivery_status d WHERE d.sop_instance_uid = "
            "instances.sop_instance_uid AND d.checksum = instances.checksum)"
        )
    sql = (
        f"SELECT {', '.join(dict.fromkeys([*columns, order]))} FROM instances "
        f"WHERE {' AND '.join(where)} {{after}} ORDER BY {order}, sop_instance_uid LIMIT ?"
    )
    after: tuple[Any, str] | None = None
    while True:
        if after is None:
            rows = catalog.query_dicts(sql.format(after=""), [*params, page])
        else:
            rows = catalog.query_dicts(
                sql.format(after=f"AND ({order}, sop_instance_uid) > (?, ?)"),
                [*params, *after, page],
            )
        if rows:
            yield rows
        if len(rows) < page:
            return
        after = (rows[-1][order], rows[-1]["sop_instance_uid"])


def route_pages(
    catalog: CatalogReader,
    rules: RoutingRules,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    order: str = "received_at",
    worklist_priorities: Mapping[str, str] | None = None,
    columns: Sequence[str] = (),
    page: int = PAGE,
    unrouted: bool = False,
) -> Iterator[list[tuple[dict[str, Any], list[Route]]]]:
    """The routes of each indexed current instance whose `order` column is in [`since`,
    `until`), a page at a time: (catalog row, its routes) pairs. Headers are read from the
    catalog's Parquet files only when a condition names an attribute without a column, or
    a rule leaves the priority to the header. `unrouted`: only instance versions the
    delivery log holds nothing for (what is left to queue)."""
    router = Router(rules)
    keywords = rules.keywords()
    wanted = (
        list(_BASE)
        + list(columns)
        + sorted({snake(k) for k in keywords if snake(k) in CATALOG_COLUMNS} - set(_BASE))
    )
    need_header = any(snake(k) not in CATALOG_COLUMNS for k in keywords) or any(
        r.priority is None for r in rules.rules
    )
    priorities = worklist_priorities or {}
    for rows in _rows(catalog, list(dict.fromkeys(wanted)), since, until, page, order, unrouted):
        headers: dict[tuple[str, str], str] = {}
        if need_header:
            headers = catalog.headers(
                [
                    (
                        r["source_file"],
                        r["sop_instance_uid"],
                        r["checksum"],
                        r["study_instance_uid"],
                    )
                    for r in rows
                ]
            )
        yield [
            (
                row,
                router.routes(
                    InstanceFacts(
                        row,
                        row["received_at"],
                        header_from_json(headers.get((row["sop_instance_uid"], row["checksum"]))),
                        priorities.get(row["study_instance_uid"]),
                    )
                ),
            )
            for row in rows
        ]


def dry_run(
    catalog: CatalogReader,
    rules: RoutingRules,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    worklist_priorities: Mapping[str, str] | None = None,
    page: int = PAGE,
) -> DryRun:
    """Evaluate `rules` over the indexed instances received in [`since`, `until`).

    Parameters
    ----------
    catalog
        The catalog (its ``instances`` view; headers read from its Parquet files when a
        condition names an attribute without a column, or a priority is derived).
    worklist_priorities
        Study Instance UID -> the worklist's RequestedProcedurePriority.

    Returns
    -------
    DryRun
        Per rule: studies, instances, bytes, priorities, example studies. An
        ``instance`` rule counts the matching instances; a ``study`` rule counts every
        current instance of each study with a matching instance (what it would send).
    """
    tallies = [RouteTally(i, r) for i, r in enumerate(rules.rules, start=1)]
    result = DryRun(since, until, tallies)
    for routed in route_pages(
        catalog,
        rules,
        since=since,
        until=until,
        worklist_priorities=worklist_priorities,
        page=page,
    ):
        for row, routes in routed:
            study = row["study_instance_uid"]
            result.instances += 1
            if not routes:
                result.unrouted_instances += 1
                result.unrouted_studies.add(study)
            for route in routes:
                tally = tallies[route.index - 1]
                tally.add_study(study)
                tally.priorities[route.priority] += 1
                if route.rule.mode == "instance":
                    tally.instances += 1
                    tally.bytes += int(row["size_bytes"] or 0)
    for tally in tallies:
        if tally.rule.mode == "study" and tally.studies:
            [(count, size)] = catalog.query(
                "SELECT count(*), coalesce(sum(size_bytes), 0) FROM instances "
                "WHERE coalesce(tier, '') <> 'landing' "
                "AND study_instance_uid IN (SELECT unnest(?))",
                [sorted(tally.studies)],
            )
            tally.instances, tally.bytes = int(count), int(size)
    return result
