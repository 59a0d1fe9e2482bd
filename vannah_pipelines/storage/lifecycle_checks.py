"""What the tiering asset checks: catalog locations that are not in their tier, and objects
in a tier that the catalog does not know. Both are bounded, so a check costs the same on a
small archive and a large one.

- Locations: a random sample of at most `sample` current instances per tier is looked up
  in that tier (one ``stat`` each: a HEAD request on object storage, which an archived
  object answers too), and the object must have the catalog's size.
- Objects: each tier is listed up to `limit` keys (in listing order: a full scan when the
  tier holds fewer), and every key listed must be the storage key of some version the
  catalog holds (in any tier: a restored study keeps its cold copy on purpose). A hot
  object whose instance is still in a sealed landing batch is being ingested: not counted.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vannah_pipelines.errors import NotFoundError, StorageError
from vannah_pipelines.storage.base import Tier
from vannah_pipelines.storage.tiers import TIER_ORDER, StorageTiers

if TYPE_CHECKING:
    from vannah_pipelines.catalog.reader import CatalogReader

LOCATION_SAMPLE = 200
SCAN_LIMIT = 10_000


@dataclass
class LocationCheck:
    """Sampled catalog locations, and those whose object is missing or of another size."""

    checked: dict[str, int] = field(default_factory=dict)  # per tier
    missing: list[str] = field(default_factory=list)  # "<tier>:<storage key>"
    unreadable: list[str] = field(default_factory=list)  # the tier could not be asked

    @property
    def passed(self) -> bool:
        return not self.missing and not self.unreadable


def check_locations(
    catalog: CatalogReader, tiers: StorageTiers, sample: int = LOCATION_SAMPLE
) -> LocationCheck:
    """Look up a random sample of at most `sample` current instances of each tier."""
    found = LocationCheck()
    for tier in TIER_ORDER:
        rows = catalog.query(
            "SELECT storage_key, size_bytes FROM instances WHERE tier = ? "
            "ORDER BY random() LIMIT ?",
            [tier.value, sample],
        )
        found.checked[tier.value] = len(rows)
        if not rows:
            continue
        store = tiers[tier]
        for key, size in rows:
            try:
                if store.stat(key) != int(size or 0):
                    found.missing.append(f"{tier.value}:{key} (size differs)")
            except NotFoundError:
                found.missing.append(f"{tier.value}:{key}")
            except StorageError as exc:
                found.unreadable.append(f"{tier.value}: {exc}")
                break
    return found


@dataclass
class ObjectCheck:
    """Listed objects per tier, and those the catalog does not know."""

    scanned: dict[str, int] = field(default_factory=dict)
    complete: dict[str, bool] = field(default_factory=dict)  # the whole tier was listed
    unknown: list[str] = field(default_factory=list)  # "<tier>:<key>"
    unreadable: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.unknown and not self.unreadable


def _sop_of(key: str) -> str:
    """``<study>/<series>/<sop>.<sha16>.dcm`` -> ``<sop>``.

    >>> _sop_of("1.2/1.2.3/1.2.3.4.abababababababab.dcm")
    '1.2.3.4'
    """
    return key.rsplit("/", 1)[-1].rsplit(".", 2)[0]


def check_objects(
    catalog: CatalogReader,
    tiers: StorageTiers,
    landing_sops: Iterable[str] = (),
    limit: int = SCAN_LIMIT,
) -> ObjectCheck:
    """List each tier up to `limit` keys; report those no catalog version has."""
    found = ObjectCheck()
    being_ingested = set(landing_sops)
    for tier in TIER_ORDER:
        try:
            keys = list(itertools.islice(tiers[tier].keys(), limit + 1))
        except StorageError as exc:
            found.unreadable.append(f"{tier.value}: {exc}")
            continue
        found.complete[tier.value] = len(keys) <= limit
        keys = keys[:limit]
        found.scanned[tier.value] = len(keys)
        if not keys:
            continue
        known = {
            k
            for (k,) in catalog.query(
                "SELECT DISTINCT storage_key FROM instance_versions "
                "WHERE storage_key IN (SELECT unnest(?))",
                [keys],
            )
        }
        for key in keys:
            if key in known or (tier is Tier.HOT and _sop_of(key) in being_ingested):
                continue
            found.unknown.append(f"{tier.value}:{key}")
    return found
