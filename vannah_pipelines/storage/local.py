"""Local-folder storage backend (the embedded default for every tier)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from vannah_pipelines.errors import ChecksumMismatchError, NotFoundError, StorageError
from vannah_pipelines.landing.layout import fsync_dir, make_dirs
from vannah_pipelines.storage.base import CHUNK_BYTES, RestoreState, Tier


class LocalStorage:
    """Objects as files under `root`; writes are atomic and fsynced."""

    needs_restore = False

    def __init__(self, root: Path, tier: Tier = Tier.HOT) -> None:
        self.root = Path(root)
        self.tier = tier

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r}, {self.tier.value})"

    def path(self, key: str) -> Path:
        """The file of `key`, refusing anything that could leave the root."""
        pure = PurePosixPath(key)
        if pure.is_absolute() or not pure.parts or any(p in ("", ".", "..") for p in pure.parts):
            raise StorageError(f"unsafe storage key: {key[:120]!r}")
        return self.root.joinpath(*pure.parts)

    def put(self, key: str, source: Path, *, sync: bool = True) -> int:
        """Store `source` under `key`. With ``sync=False`` the caller must call
        :meth:`sync` on the keys before relying on them (one folder fsync per batch).
        New folders (study, series) are made durable at once, every level of them."""
        target = self.path(key)
        if not target.parent.is_dir():
            make_dirs(target.parent)
        tmp = target.with_name(f".tmp-{target.name}.{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        try:
            try:
                os.link(source, tmp)  # same file system: no copy; the source is immutable
            except OSError:
                shutil.copyfile(source, tmp)
                with tmp.open("rb+") as handle:
                    os.fsync(handle.fileno())
            tmp.replace(target)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        if sync:
            fsync_dir(target.parent)
        return target.stat().st_size

    def write(self, key: str, stream: BinaryIO, size: int, sha256: str) -> None:
        """Copy `size` bytes of `stream` under `key`, hashed as written and fsynced; the
        name appears (atomically) only once the bytes are verified."""
        target = self.path(key)
        if not target.parent.is_dir():
            make_dirs(target.parent)
        tmp = target.with_name(f".tmp-{target.name}.{os.getpid()}")
        digest = hashlib.sha256()
        written = 0
        try:
            stream.seek(0)
            with tmp.open("wb") as out:
                while chunk := stream.read(CHUNK_BYTES):
                    digest.update(chunk)
                    out.write(chunk)
                    written += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            if written != size or digest.hexdigest() != sha256.lower():
                raise ChecksumMismatchError(
                    f"{self.tier}: {key!r} wrote {written} bytes hashing to "
                    f"{digest.hexdigest()[:16]}..., expected {size} hashing to {sha256[:16]}..."
                )
            tmp.replace(target)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        fsync_dir(target.parent)

    def sync(self, keys: list[str]) -> None:
        """Make the names of `keys` durable: one fsync per distinct folder."""
        for folder in sorted({self.path(k).parent for k in keys}):
            fsync_dir(folder)

    def open(self, key: str) -> BinaryIO:
        try:
            return self.path(key).open("rb")
        except FileNotFoundError as exc:
            raise NotFoundError(f"{self.tier}: no object {key!r}") from exc

    def stat(self, key: str) -> int:
        try:
            return self.path(key).stat().st_size
        except FileNotFoundError as exc:
            raise NotFoundError(f"{self.tier}: no object {key!r}") from exc

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def keys(self, prefix: str = "") -> Iterator[str]:
        """Every object under `prefix`, in no set order (temporary files left out)."""
        base = self.path(prefix.rstrip("/")) if prefix.strip("/") else self.root
        if not base.is_dir():
            return
        for folder, dirs, files in os.walk(base):
            dirs.sort()
            rel = Path(folder).relative_to(self.root).as_posix()
            for name in sorted(files):
                if not name.startswith(".tmp-"):
                    yield name if rel == "." else f"{rel}/{name}"

    def restore(self, key: str, days: int) -> RestoreState:
        """A folder is always readable: nothing to restore."""
        return self.restore_state(key)

    def restore_state(self, key: str) -> RestoreState:
        self.stat(key)
        return RestoreState.ONLINE
