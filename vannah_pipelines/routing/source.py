"""The rules in force: the rules file re-read when it changes, the last good rules kept
(in memory and on disk) when it turns bad, so routing never stops for a rules error."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from vannah_pipelines.landing.layout import make_dirs, write_atomic
from vannah_pipelines.routing.rules import RoutingRules, RulesError, parse_rules
from vannah_pipelines.settings import Settings

log = logging.getLogger(__name__)

LAST_GOOD_FILE = "last-good-rules.json"
# The largest rules file read (``routing_rules_max_bytes``'s default): a larger one is
# refused from its size, unread. A thousand rules take ~300 KiB.
DEFAULT_MAX_BYTES = 1 << 20
Origin = Literal["file", "last-good", "settings", "none"]


@dataclass(frozen=True)
class _Stamp:
    mtime_ns: int
    size: int
    inode: int


class RulesSource:
    """The routing rules in force, re-read from `rules_file` when it changes.

    Every call to :meth:`current` stats the file; a changed stamp (mtime, size, inode)
    with changed content (sha256) is parsed again. A good file replaces the rules and is
    saved atomically as ``<state_dir>/last-good-rules.json``; a bad or missing file keeps
    the rules in force (at startup: the saved last good ones), sets :attr:`error` and logs
    it once. Rules errors never raise out of this class. A file larger than `max_bytes`
    is refused from its size, without being read.

    With no file, the `inline` rules (the settings' ``rules``) are in force, unchanging.
    """

    def __init__(
        self,
        rules_file: Path | None,
        state_dir: Path,
        *,
        inline: Sequence[Any] = (),
        secret_names: Collection[str] | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self.rules_file = Path(rules_file) if rules_file is not None else None
        self.state_dir = Path(state_dir)
        self.max_bytes = max_bytes
        self._secret_names = set(secret_names) if secret_names is not None else None
        self._lock = threading.Lock()
        self._stamp: _Stamp | None = None
        self._digest: str | None = None
        self._error: str | None = None
        self._rules = RoutingRules()
        self._origin: Origin = "none"
        if self.rules_file is None:
            if inline:
                try:
                    self._rules = parse_rules(
                        list(inline), secret_names=self._secret_names, source="rules"
                    )
                    self._origin = "settings"
                except RulesError as exc:  # Settings refuse these first; never raise here
                    self._error = str(exc)
                    log.error("routing rules refused: %s", exc)
            return
        self._load_last_good()

    @classmethod
    def from_settings(cls, settings: Settings, rules_file: Path | None = None) -> RulesSource:
        """The source the settings describe (`rules_file` overrides theirs)."""
        path = rules_file if rules_file is not None else settings.routing_rules_file
        return cls(
            path,
            settings.routing_dir,
            inline=() if rules_file is not None else settings.routing_rules,
            secret_names=settings.routing_secrets.keys(),
            max_bytes=settings.routing_rules_max_bytes,
        )

    @property
    def last_good_path(self) -> Path:
        return self.state_dir / LAST_GOOD_FILE

    @property
    def error(self) -> str | None:
        """Why the rules file is not in force (None: it is, or there is none)."""
        self.current()
        return self._error

    @property
    def origin(self) -> Origin:
        """Where the rules in force come from."""
        self.current()
        return self._origin

    def current(self) -> RoutingRules:
        """The rules in force now (re-reading the file if it changed)."""
        if self.rules_file is None:
            return self._rules
        with self._lock:
            self._check(self.rules_file)
            return self._rules

    def _check(self, path: Path) -> None:
        try:
            st = path.stat()
        except OSError as exc:
            self._refuse(None, None, f"cannot read {path}: {exc.strerror or exc}")
            return
        stamp = _Stamp(st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return
        if st.st_size > self.max_bytes:  # refused from its size: never read
            self._refuse(stamp, None, _too_large(path, st.st_size, self.max_bytes))
            return
        try:
            data = read_capped(path, self.max_bytes)
        except RulesError as exc:  # unreadable, or grown past the limit since the stat
            self._refuse(None, None, str(exc))
            return
        digest = hashlib.sha256(data).hexdigest()
        if digest == self._digest:
            self._stamp = stamp  # touched, same content
            return
        try:
            rules = self._parse(data, str(path))
        except RulesError as exc:
            self._refuse(stamp, digest, str(exc))
            return
        self._rules, self._origin, self._stamp, self._digest = rules, "file", stamp, digest
        if self._error is not None:
            log.info("routing rules %s are good again", path)
        self._error = None
        log.info("routing rules loaded from %s: %d rules", path, len(rules.rules))
        try:
            make_dirs(self.state_dir)
            write_atomic(self.last_good_path, data)
        except OSError:
            log.exception("cannot save the last good routing rules to %s", self.last_good_path)

    def _parse(self, data: bytes, source: str) -> RoutingRules:
        return parse_rules_bytes(data, source, secret_names=self._secret_names)

    def _refuse(self, stamp: _Stamp | None, digest: str | None, error: str) -> None:
        self._stamp, self._digest = stamp, digest
        if error != self._error:
            log.error(
                "routing rules refused, the %s rules stay in force: %s",
                "last good" if self._origin != "none" else "(no)",
                error,
            )
        self._error = error

    def _load_last_good(self) -> None:
        path = self.last_good_path
        if not path.exists():
            return
        try:
            self._rules = self._parse(read_capped(path, self.max_bytes), str(path))
        except RulesError as exc:
            log.error("the last good routing rules %s are not usable: %s", path, exc)
            return
        self._origin = "last-good"


def read_capped(path: Path, max_bytes: int) -> bytes:
    """The bytes of `path`, refused when it holds more than `max_bytes`: a larger file is
    known from its size and never read; one that grew since is read no further than
    ``max_bytes + 1`` bytes.

    Raises
    ------
    RulesError
        The file cannot be read, or is larger than `max_bytes`.
    """
    try:
        with Path(path).open("rb") as fp:
            size = os.fstat(fp.fileno()).st_size
            data = fp.read(max_bytes + 1) if size <= max_bytes else b""
    except OSError as exc:
        raise RulesError([f"cannot read {path}: {exc.strerror or exc}"]) from None
    if size > max_bytes or len(data) > max_bytes:
        raise RulesError([_too_large(path, max(size, len(data)), max_bytes)])
    return data


def _too_large(path: Path, size: int, max_bytes: int) -> str:
    return (
        f"{path}: {size} bytes, more than the limit of {max_bytes} bytes "
        "(routing_rules_max_bytes); not read"
    )


def parse_rules_bytes(
    data: bytes, source: str, *, secret_names: Collection[str] | None = None
) -> RoutingRules:
    """A rules file's bytes (JSON) validated.

    Raises
    ------
    RulesError
        Not JSON (or nested too deeply to parse), more than ``MAX_RULES`` rules, or
        not valid rules (see :func:`parse_rules`).

    >>> parse_rules_bytes(b"[" * 100_000, "deep.json")
    Traceback (most recent call last):
    ...
    vannah_pipelines.routing.rules.RulesError: deep.json: not JSON: nested too deeply
    """
    try:
        document = json.loads(data)
    except ValueError as exc:
        raise RulesError([f"{source}: not JSON: {exc}"]) from None
    except RecursionError:  # json recurses per nesting level: "[[[[..." exhausts the stack
        raise RulesError([f"{source}: not JSON: nested too deeply"]) from None
    return parse_rules(document, secret_names=secret_names, source=source)  # MAX_RULES too


def read_rules_file(
    path: Path,
    *,
    secret_names: Collection[str] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> RoutingRules:
    """Read and validate a rules file (``vannah route --check``); nothing is saved.

    Raises
    ------
    RulesError
        The file cannot be read, is larger than `max_bytes`, is not JSON, or holds
        invalid rules.
    """
    return parse_rules_bytes(read_capped(path, max_bytes), str(path), secret_names=secret_names)
