"""Dry run and backtest: what each rule would send where, from the catalog, sending nothing."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from vannah_pipelines.catalog.schema import snake
from vannah_pipelines.routing.evaluate import (
    CATALOG_COLUMNS,
    InstanceFacts,
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
) -> Iterator[dict[str, Any]]:
    """Indexed current instances received in [since, until), `page` at a time (keyset
    pagination: memory holds one page, whatever the archive's size)."""
    where = ["coalesce(tier, '') <> 'landing'", "received_at IS NOT NULL"]
    params: list[Any] = []
    if since is not None:
        where.append("received_at >= ?")
        params.append(since)
    if until is not None:
        where.append("received_at < ?")
        params.append(until)
    sql = (
        f"SELECT {', '.join(columns)} FROM instances WHERE {' AND '.join(where)} "
        "{after} ORDER BY received_at, sop_instance_uid LIMIT ?"
    )
    after: tuple[Any, str] | None = None
    while True:
        if after is None:
            rows = catalog.query_dicts(sql.format(after=""), [*params, page])
        else:
            rows = catalog.query_dicts(
                sql.format(after="AND (received_at, sop_instance_uid) > (?, ?)"),
                [*params, *after, page],
            )
        yield from rows
        if len(rows) < page:
            return
        after = (rows[-1]["received_at"], rows[-1]["sop_instance_uid"])


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
    router = Router(rules)
    keywords = rules.keywords()
    columns = list(_BASE) + sorted(
        {snake(k) for k in keywords if snake(k) in CATALOG_COLUMNS} - set(_BASE)
    )
    need_header = any(snake(k) not in CATALOG_COLUMNS for k in keywords) or any(
        r.priority is None for r in rules.rules
    )
    tallies = [RouteTally(i, r) for i, r in enumerate(rules.rules, start=1)]
    result = DryRun(since, until, tallies)
    priorities = worklist_priorities or {}
    page_rows: list[dict[str, Any]] = []

    def flush() -> None:
        headers: dict[tuple[str, str], str] = {}
        if need_header and page_rows:
            headers = catalog.headers(
                [
                    (
                        r["source_file"],
                        r["sop_instance_uid"],
                        r["checksum"],
                        r["study_instance_uid"],
                    )
                    for r in page_rows
                ]
            )
        for row in page_rows:
            study = row["study_instance_uid"]
            facts = InstanceFacts(
                row,
                row["received_at"],
                header_from_json(headers.get((row["sop_instance_uid"], row["checksum"]))),
                priorities.get(study),
            )
            routes = router.routes(facts)
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
        page_rows.clear()

    for row in _rows(catalog, columns, since, until, page):
        page_rows.append(row)
        if len(page_rows) >= page:
            flush()
    flush()
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
