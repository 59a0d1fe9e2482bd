"""Routing rules: the product documentation's rules JSON (verbatim) and its extensions.

``parse_rules`` validates a rules document into :class:`RoutingRules`; a bad document is
refused with a :class:`RulesError` naming the rule (1-based index and name) and the field.
See docs/routing.md for the format.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from datetime import time
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails
from pydicom.datadict import dictionary_VR, keyword_dict

from vannah_pipelines.dicom.matching import InvalidMatchError, Match, parse_match
from vannah_pipelines.errors import ConfigError

Priority = Literal["STAT", "HIGH", "ROUTINE", "LOW"]
PRIORITY_ORDER: dict[str, int] = {"STAT": 0, "HIGH": 1, "ROUTINE": 2, "LOW": 3}
DEFAULT_STABLE_AGE_SECONDS = 60  # Orthanc's StableAge default

# Attributes a routed copy may never change: the identity of what is sent.
_PROTECTED = frozenset({"SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID"})
# Coercion writes text values only.
_TEXT_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UR", "UT"}
)
# Conditions match text; these VRs hold sequences or binary data.
_UNMATCHABLE_VRS = frozenset({"SQ", "OB", "OD", "OF", "OL", "OV", "OW", "UN"})
_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_DAY_NAMES = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_HHMM = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])")
# S3 bucket naming rules (the common subset AWS, MinIO and SeaweedFS accept).
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_SECRET_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class RulesError(ConfigError):
    """A rules document that cannot be used; the message names every problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


def _strict() -> ConfigDict:
    return ConfigDict(frozen=True, extra="forbid")


def keyword_vr(keyword: str) -> str:
    """The VR of DICOM `keyword` (the first of a multi-VR entry).

    >>> keyword_vr("PatientSex"), keyword_vr("ReferringPhysicianName")
    ('CS', 'PN')

    Raises
    ------
    ValueError
        `keyword` is not in the DICOM data dictionary.
    """
    tag = keyword_dict.get(keyword)
    if tag is None:
        raise ValueError(f"{keyword!r} is not a DICOM keyword")
    return dictionary_VR(tag).split(" or ")[0]


# ---------------------------------------------------------------- conditions


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


Pattern = Annotated[list[str], BeforeValidator(_as_list)]


def parse_pattern(keyword: str, values: list[str]) -> tuple[Match, ...]:
    """The PS3.4 C.2.2.2 matches a condition value asks for (a list means any of them).

    Raises
    ------
    ValueError
        A value that cannot mean anything for the attribute's VR, or an empty list.
    """
    if not values:
        raise ValueError("an empty list matches nothing; leave the condition out instead")
    vr = "AE" if keyword == "calling_ae" else keyword_vr(keyword)
    if vr in _UNMATCHABLE_VRS:
        raise ValueError(f"{keyword} ({vr}) cannot be matched: sequences and binary values")
    try:
        return tuple(parse_match(vr, v) for v in values)
    except InvalidMatchError as exc:
        raise ValueError(str(exc)) from None


# Condition field -> the DICOM keyword it matches (catalog column snake(keyword)).
CONDITION_KEYWORDS: dict[str, str] = {
    "modality": "Modality",
    "body_part": "BodyPartExamined",
    "referring_physician": "ReferringPhysicianName",
    "institution": "InstitutionName",
    "station": "StationName",
    "study_description": "StudyDescription",
}


class TimeWindow(BaseModel):
    """When a rule applies, by the instance's received time in `timezone`.

    ``start`` > ``end`` is an overnight window (18:00-07:00): it belongs to the day it
    starts on, so with ``days`` Mon-Fri, Saturday 03:00 is in Friday's window.
    """

    model_config = _strict()

    timezone: str = "UTC"
    days: list[str] = Field(default_factory=lambda: list(_DAYS))
    start: str | None = None
    end: str | None = None

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{value!r} is not an IANA time zone") from None
        return value

    @field_validator("days", mode="before")
    @classmethod
    def _days(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            out = []
            for day in value:
                text = str(day).strip().lower()
                key = text[:3]
                if key not in _DAYS or text not in (key, _DAY_NAMES[_DAYS.index(key)]):
                    raise ValueError(f"{day!r} is not a day of the week (Mon ... Sun)")
                out.append(key)
            if not out:
                raise ValueError("at least one day")
            return out
        return value

    @field_validator("start", "end")
    @classmethod
    def _hhmm(cls, value: str | None) -> str | None:
        if value is not None and not _HHMM.fullmatch(value):
            raise ValueError(f"{value!r} is not a time of day HH:MM (00:00-23:59)")
        return value

    @model_validator(mode="after")
    def _both(self) -> TimeWindow:
        if (self.start is None) != (self.end is None):
            raise ValueError("give both start and end, or neither (the whole day)")
        if self.start is not None and self.start == self.end:
            raise ValueError("start and end are equal; leave both out for the whole day")
        return self

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def bounds(self) -> tuple[time, time] | None:
        if self.start is None or self.end is None:
            return None
        return time.fromisoformat(self.start), time.fromisoformat(self.end)


def _as_windows(value: Any) -> Any:
    return [value] if isinstance(value, Mapping) else value


class Condition(BaseModel):
    """What an instance must match: every field given (AND); a list value is any-of."""

    model_config = _strict()

    modality: Pattern | None = None
    body_part: Pattern | None = Field(default=None, alias="bodyPart")
    referring_physician: Pattern | None = Field(default=None, alias="referringPhysician")
    calling_ae: Pattern | None = Field(default=None, alias="callingAe")
    institution: Pattern | None = None
    station: Pattern | None = None
    study_description: Pattern | None = Field(default=None, alias="studyDescription")
    attributes: dict[str, Pattern] = Field(default_factory=dict)
    time: Annotated[list[TimeWindow], BeforeValidator(_as_windows)] | None = None
    not_: Condition | None = Field(default=None, alias="not")

    @model_validator(mode="after")
    def _patterns(self) -> Condition:
        for name, keyword in CONDITION_KEYWORDS.items():
            values = getattr(self, name)
            if values is not None:
                try:
                    parse_pattern(keyword, values)
                except ValueError as exc:
                    raise ValueError(f"{name}: {exc}") from None
        if self.calling_ae is not None:
            try:
                parse_pattern("calling_ae", self.calling_ae)
            except ValueError as exc:
                raise ValueError(f"callingAe: {exc}") from None
        for keyword, values in self.attributes.items():
            try:
                parse_pattern(keyword, values)
            except ValueError as exc:
                raise ValueError(f"attributes.{keyword}: {exc}") from None
        if self.time is not None and not self.time:
            raise ValueError("time: an empty list matches nothing")
        return self

    def terms(self) -> list[tuple[str, tuple[Match, ...]]]:
        """(keyword or ``calling_ae``, matches) of every attribute this condition tests."""
        out = [
            (keyword, parse_pattern(keyword, getattr(self, name)))
            for name, keyword in CONDITION_KEYWORDS.items()
            if getattr(self, name) is not None
        ]
        if self.calling_ae is not None:
            out.append(("calling_ae", parse_pattern("calling_ae", self.calling_ae)))
        out += [(k, parse_pattern(k, v)) for k, v in self.attributes.items()]
        return out

    def windows(self) -> list[TimeWindow]:
        return list(self.time or [])

    def keywords(self) -> set[str]:
        """Every DICOM keyword this condition (and its negation) reads."""
        found = {k for k, _ in self.terms() if k != "calling_ae"}
        return found | (self.not_.keywords() if self.not_ is not None else set())


# ---------------------------------------------------------------- destinations


def _secret_name(value: str | None, info: ValidationInfo) -> str | None:
    if value is None:
        return None
    if not _SECRET_NAME.fullmatch(value):
        raise ValueError(
            f"{value[:64]!r} is not a secret name (1-64 of A-Z a-z 0-9 _ . -); the secret "
            "itself goes in VANNAH_ROUTING_SECRETS, never in the rules"
        )
    known = (info.context or {}).get("secret_names")
    if known is not None and value not in known:
        raise ValueError(f"no secret {value!r} in routing_secrets (VANNAH_ROUTING_SECRETS)")
    return value


class DicomDestination(BaseModel):
    """A DICOM AE reached by C-STORE (the default when ``aet`` is given and no ``type``)."""

    model_config = _strict()

    type: Literal["dicom"] = "dicom"
    aet: str
    host: str = Field(min_length=1)
    port: int
    use_dicom_tls: bool = Field(default=False, alias="useDicomTls")
    storage_commitment: bool = Field(default=False, alias="storageCommitment")

    @field_validator("aet")
    @classmethod
    def _aet(cls, value: str) -> str:
        if not 1 <= len(value.strip()) <= 16 or len(value) > 16 or "\\" in value:
            raise ValueError("must be an AE title of 1-16 characters, no backslash")
        if not value.isprintable():
            raise ValueError("must not hold control characters")
        return value

    @field_validator("port", mode="before")
    @classmethod
    def _port(cls, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            raise ValueError("must be 1-65535")
        return value

    def describe(self) -> str:
        return f"dicom {self.aet}@{self.host}:{self.port}"


class S3Destination(BaseModel):
    """An S3-compatible bucket; objects at ``<prefix>/<Study>/<Series>/<SOP>.dcm``."""

    model_config = _strict()

    type: Literal["s3"]
    bucket: str
    region: str | None = None
    endpoint: str | None = None
    prefix: str = ""
    credentials: str | None = None

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, value: str) -> str:
        if not _BUCKET.fullmatch(value) or ".." in value:
            raise ValueError("must be an S3 bucket name (3-63 of a-z 0-9 . -)")
        return value

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        parts = value.strip("/").split("/") if value.strip("/") else []
        if any(p in ("", ".", "..") for p in parts):
            raise ValueError("must be a key prefix without empty, '.' or '..' parts")
        return "/".join(parts)

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is not None:
            _require_url(value)
        return value

    @field_validator("credentials")
    @classmethod
    def _credentials(cls, value: str | None, info: ValidationInfo) -> str | None:
        return _secret_name(value, info)

    def object_key(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        """The key an instance is stored under.

        >>> S3Destination(type="s3", bucket="vhc-archive", prefix="site1/").object_key(
        ...     "1.2", "1.2.3", "1.2.3.4")
        'site1/1.2/1.2.3/1.2.3.4.dcm'
        """
        key = f"{study_uid}/{series_uid}/{sop_uid}.dcm"
        return f"{self.prefix}/{key}" if self.prefix else key

    def describe(self) -> str:
        where = f"s3://{self.bucket}/{self.prefix}"
        return where + (f" ({self.region})" if self.region else "")


def _require_url(value: str) -> None:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{value[:100]!r} is not an http(s) URL")
    if parts.username or parts.password:
        raise ValueError("credentials do not go in the URL; name a secret instead")


class StowDestination(BaseModel):
    """A DICOMweb STOW-RS endpoint (``<url>/studies``); the secret is named, never given."""

    model_config = _strict()

    type: Literal["stow"]
    url: str
    token: str | None = None
    api_key: str | None = Field(default=None, alias="apiKey")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        _require_url(value)
        return value.rstrip("/")

    @field_validator("token", "api_key")
    @classmethod
    def _secret(cls, value: str | None, info: ValidationInfo) -> str | None:
        return _secret_name(value, info)

    @model_validator(mode="after")
    def _one_secret(self) -> StowDestination:
        if self.token is not None and self.api_key is not None:
            raise ValueError("give token or apiKey, not both")
        return self

    def describe(self) -> str:
        return f"stow {self.url}"


class FolderDestination(BaseModel):
    """A local folder; files at ``<path>/<Study>/<Series>/<SOP>.dcm``."""

    model_config = _strict()

    type: Literal["folder"]
    path: str

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must be an absolute path")
        if any(part == ".." for part in value.split("/")) or "\0" in value:
            raise ValueError("must not contain '..' or NUL")
        return value.rstrip("/") or "/"

    def describe(self) -> str:
        return f"folder {self.path}"


def _default_type(value: Any) -> Any:
    if isinstance(value, dict) and "type" not in value and "aet" in value:
        return {**value, "type": "dicom"}
    return value


Destination = Annotated[
    DicomDestination | S3Destination | StowDestination | FolderDestination,
    Field(discriminator="type"),
    BeforeValidator(_default_type),
]
DESTINATION_TYPES = ("dicom", "s3", "stow", "folder")


# ---------------------------------------------------------------- coercion


def _coerce_keyword(keyword: str) -> str:
    vr = keyword_vr(keyword)
    if keyword_dict[keyword] >> 16 == 0x0002:
        raise ValueError(f"{keyword}: file meta attributes are not coerced")
    if keyword in _PROTECTED:
        raise ValueError(f"{keyword}: the identity of an instance is never coerced")
    return vr


class Coercion(BaseModel):
    """Changes made to the copy sent (never to the archive): applied set, replace,
    prefix, then remove."""

    model_config = _strict()

    set: dict[str, str] = Field(default_factory=dict)
    replace: dict[str, str] = Field(default_factory=dict)
    prefix: dict[str, str] = Field(default_factory=dict)
    remove: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _keywords(self) -> Coercion:
        for op in ("set", "replace", "prefix"):
            for keyword in getattr(self, op):
                try:
                    vr = _coerce_keyword(keyword)
                except ValueError as exc:
                    raise ValueError(f"{op}: {exc}") from None
                if vr not in _TEXT_VRS:
                    raise ValueError(f"{op}.{keyword}: only text attributes can be {op}")
        for keyword in self.remove:
            try:
                _coerce_keyword(keyword)
            except ValueError as exc:
                raise ValueError(f"remove: {exc}") from None
        return self


# ---------------------------------------------------------------- rules


class Rule(BaseModel):
    """One routing rule: a condition and where matching instances go."""

    model_config = _strict()

    name: str = Field(min_length=1, max_length=200)
    condition: Condition
    destination: Destination
    priority: Priority | None = None
    mode: Literal["instance", "study"] = "instance"
    stable_age: int | None = Field(default=None, alias="stableAge")
    coerce: Coercion | None = None

    @field_validator("priority", mode="before")
    @classmethod
    def _priority(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("stable_age")
    @classmethod
    def _stable_age(cls, value: int | None) -> int | None:
        if value is not None and not 1 <= value <= 7 * 86400:
            raise ValueError("must be 1-604800 seconds")
        return value

    @model_validator(mode="after")
    def _mode(self) -> Rule:
        if self.stable_age is not None and self.mode != "study":
            raise ValueError('stableAge applies to "mode": "study" only')
        return self

    @property
    def stable_age_seconds(self) -> int:
        return self.stable_age if self.stable_age is not None else DEFAULT_STABLE_AGE_SECONDS


class RoutingRules(BaseModel):
    """The rules document: ``{"rules": [...]}``, evaluated in order."""

    model_config = _strict()

    rules: list[Rule] = Field(default_factory=list)

    def keywords(self) -> set[str]:
        """Every DICOM keyword the conditions read."""
        found: set[str] = set()
        for rule in self.rules:
            found |= rule.condition.keywords()
        return found


def _loc(loc: tuple[int | str, ...]) -> str:
    parts = [str(p) for p in loc]
    # A discriminated destination's loc holds its type tag: destination.dicom.port.
    if len(parts) > 1 and parts[0] == "destination" and parts[1] in DESTINATION_TYPES:
        parts = [parts[0], *parts[2:]]
    return ".".join(parts)


def _message(err: ErrorDetails) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown key (docs/routing.md lists the format)"
    if err["type"] in ("union_tag_not_found", "union_tag_invalid"):
        return 'needs "type" (one of dicom, s3, stow, folder), or "aet" for a DICOM AE'
    msg = err["msg"]
    for lead in ("Value error, ", "Assertion failed, "):
        if msg.startswith(lead):
            return msg[len(lead) :]
    return msg


# The most rules a document (a rules file, or the settings' inline ``rules``) may hold:
# each instance is evaluated against every rule.
MAX_RULES = 1000


def parse_rules(
    document: Any, *, secret_names: Collection[str] | None = None, source: str = "rules"
) -> RoutingRules:
    """Validate a rules document (``{"rules": [...]}``, or the bare list) into rules.

    Parameters
    ----------
    document
        The parsed JSON.
    secret_names
        When given, the secret names a destination may reference (the keys of
        ``routing_secrets``); an unknown name is refused.
    source
        What the document is, for messages (a file path, ``rules`` of the settings).

    Raises
    ------
    RulesError
        Naming each problem as ``rule <n> "<name>": <field>: <message>`` (n from 1).

    >>> parse_rules({"rules": [{"name": "x", "condition": {"modality": "CT"},
    ...     "destination": {"aet": "AI", "host": "h", "port": 0}}]})
    Traceback (most recent call last):
    ...
    vannah_pipelines.routing.rules.RulesError: rules: rule 1 "x": destination.port: must be 1-65535
    """
    if isinstance(document, list):
        document = {"rules": document}
    listed = document.get("rules") if isinstance(document, Mapping) else None
    if isinstance(listed, list) and len(listed) > MAX_RULES:  # before validating them all
        raise RulesError([f"{source}: {len(listed)} rules, more than the limit of {MAX_RULES}"])
    context = {"secret_names": set(secret_names)} if secret_names is not None else None
    try:
        rules = RoutingRules.model_validate(document, context=context)
    except ValidationError as exc:
        raw = document.get("rules") if isinstance(document, Mapping) else None
        problems = []
        for err in exc.errors():
            loc = err["loc"]
            if len(loc) >= 2 and loc[0] == "rules" and isinstance(loc[1], int):
                index = loc[1]
                name = None
                if isinstance(raw, list) and isinstance(raw[index], Mapping):
                    name = raw[index].get("name")
                label = f"rule {index + 1}" + (f' "{name}"' if isinstance(name, str) else "")
                field = _loc(loc[2:]) or "rule"
                problems.append(f"{source}: {label}: {field}: {_message(err)}")
            else:
                problems.append(f"{source}: {_loc(loc) or 'document'}: {_message(err)}")
        raise RulesError(problems) from None
    seen: dict[str, int] = {}
    problems = []
    for index, rule in enumerate(rules.rules, start=1):
        if rule.name in seen:
            problems.append(
                f'{source}: rule {index} "{rule.name}": name: the same name as rule '
                f"{seen[rule.name]}; rule names must be unique"
            )
        seen.setdefault(rule.name, index)
    if problems:
        raise RulesError(problems)
    return rules
