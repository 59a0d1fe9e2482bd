"""An authenticated caller: who, with which roles, and limited to which studies."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Role(StrEnum):
    """Roles, each including the ones before it: read < write < admin."""

    READ = "read"
    WRITE = "write"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return _RANK[self]


_RANK = {Role.READ: 1, Role.WRITE: 2, Role.ADMIN: 3}


def parse_roles(values: object) -> frozenset[Role]:
    """Role names from a claim or a setting; unknown names are ignored.

    >>> sorted(r.value for r in parse_roles(["read", "Write", "viewer"]))
    ['read', 'write']
    >>> sorted(r.value for r in parse_roles("admin"))
    ['admin']
    """
    if isinstance(values, str):
        values = values.replace(",", " ").split()
    if not isinstance(values, list | tuple | set | frozenset):
        return frozenset()
    found = set()
    for value in values:
        try:
            found.add(Role(str(value).strip().lower()))
        except ValueError:
            continue
    return frozenset(found)


@dataclass(frozen=True)
class Scope:
    """What a scoped token may read: some studies, or every study of one patient.

    A principal without a scope (``Principal.scope is None``) may read the whole archive.
    """

    study_uids: frozenset[str] = frozenset()
    patient_id: str | None = None

    def allows(self, study_uid: str, patient_id: str | None) -> bool:
        """Whether the study `study_uid` (of patient `patient_id`) is inside the scope.

        >>> one = Scope(frozenset({"1.2"}))
        >>> one.allows("1.2", "P"), one.allows("1.3", "P")
        (True, False)
        >>> Scope(patient_id="P").allows("1.3", "P"), Scope(patient_id="P").allows("1.3", "Q")
        (True, False)
        """
        if study_uid in self.study_uids:
            return True
        return self.patient_id is not None and patient_id == self.patient_id

    def as_claim(self) -> dict[str, object]:
        claim: dict[str, object] = {}
        if self.study_uids:
            claim["studies"] = sorted(self.study_uids)
        if self.patient_id is not None:
            claim["patient_id"] = self.patient_id
        return claim


@dataclass(frozen=True)
class Principal:
    """The caller of one request or association.

    `method` says how it authenticated: ``jwt``, ``launch-token``, ``api-key``, ``basic``,
    ``dimse-user``, ``dimse-peer`` or ``anonymous`` (authentication off).
    """

    subject: str
    roles: frozenset[Role]
    method: str
    scope: Scope | None = None
    claims: dict[str, object] = field(default_factory=dict, compare=False, hash=False)

    def has(self, role: Role) -> bool:
        """Whether any of the principal's roles includes `role` (admin includes write)."""
        return any(r.rank >= role.rank for r in self.roles)

    def can_read_study(self, study_uid: str, patient_id: str | None) -> bool:
        if not self.has(Role.READ):
            return False
        return self.scope is None or self.scope.allows(study_uid, patient_id)


ANONYMOUS = Principal("anonymous", frozenset({Role.ADMIN}), "anonymous")
"""The principal of every request when authentication is off."""
