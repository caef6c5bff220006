"""Where services created by the API persist, so they survive a node restart (DESIGN.md).

`FileServiceStore` keeps one JSON file per service definition under `<data_dir>/services`.
A definition that was acknowledged must never be lost or half-written, so every save
writes a temporary file, fsyncs it, renames it over the old one and fsyncs the directory:
after a crash at any point the file holds the old definition or the new one. A save of a
name that must be new links the temporary file to its name instead of renaming it: a link
fails when the name exists, and the file gets its name whole all the same. A cluster keeps
its definitions in a JetStream key-value bucket behind the same `ServiceStore`
(`nkservice.cluster.kv_store`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ParamSpec, Protocol, TypeVar

import orjson

log = logging.getLogger(__name__)

_NAME = re.compile(r"[A-Za-z0-9_-]+")
# `<name>.json.<random>.tmp`: unique, so two stores on one directory never share one.
_TMP = re.compile(r"[A-Za-z0-9_-]+\.json\.[0-9a-f]+\.tmp")

P = ParamSpec("P")
T = TypeVar("T")


class ServiceStore(Protocol):
    async def load(self) -> dict[str, dict[str, Any]]:
        """Every stored definition by name. A file that cannot be read as a definition is set
        aside (renamed, never deleted) with one WARNING log line naming the file, where it went
        and why; the others load."""

    async def save(self, name: str, definition: dict[str, Any], *, new: bool = False) -> None:
        """Store (or replace) a definition atomically: after a crash at any point the store
        holds the old definition or the new one, never a mix or a corrupt file. Returns only
        when it is durable. With `new`, only a name not stored yet: else FileExistsError
        (and nothing changes), decided atomically, so of two creations of one name at once
        exactly one succeeds."""

    async def delete(self, name: str) -> None:
        """Forget a definition (durably); no error when there is none."""


class FileServiceStore:
    """A `ServiceStore` in a directory: `<directory>/<name>.json` per service."""

    def __init__(self, directory: Path) -> None:
        self._dir = directory
        self._lock = asyncio.Lock()

    async def load(self) -> dict[str, dict[str, Any]]:
        return await self._in_thread(self._load)

    async def save(self, name: str, definition: dict[str, Any], *, new: bool = False) -> None:
        _check_name(name)
        data = orjson.dumps(definition, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE)
        await self._in_thread(self._write, name, data, new)

    async def delete(self, name: str) -> None:
        _check_name(name)
        await self._in_thread(self._unlink, name)

    async def _in_thread(self, work: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run blocking file work off the event loop, one piece of work at a time."""
        async with self._lock:
            running = asyncio.ensure_future(asyncio.to_thread(work, *args, **kwargs))
            try:
                return await asyncio.shield(running)
            finally:
                if not running.done():  # cancelled, but a thread cannot be stopped:
                    await asyncio.wait([running])  # hold the lock until it has finished

    def _load(self) -> dict[str, dict[str, Any]]:
        self._make_dir()
        found: dict[str, dict[str, Any]] = {}
        for path in sorted(self._dir.iterdir()):
            if _TMP.fullmatch(path.name):
                path.unlink(missing_ok=True)
                log.info("removed %s, left over from an unfinished save", path)
            elif path.name.endswith(".json"):
                definition = _read(path)
                if isinstance(definition, str):
                    _set_aside(path, definition)
                else:
                    found[path.name.removesuffix(".json")] = definition
        return found

    def _write(self, name: str, data: bytes, new: bool) -> None:
        self._make_dir()
        tmp = self._dir / f"{name}.json.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            if new:
                # A hard link, unlike a rename, fails when the name exists (even for another
                # process on this directory); the whole file gets the name at once either way.
                try:
                    os.link(tmp, self._dir / f"{name}.json")
                except FileExistsError as e:
                    raise FileExistsError(f"the service {name} is already stored") from e
            else:
                os.replace(tmp, self._dir / f"{name}.json")
        except BaseException:
            # A failed save (a full disk, say) leaves nothing; after a crash, load() cleans up.
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        if new:
            with contextlib.suppress(OSError):  # saved already; load() removes it otherwise
                os.unlink(tmp)
        _fsync_dir(self._dir)

    def _unlink(self, name: str) -> None:
        try:
            os.unlink(self._dir / f"{name}.json")
        except FileNotFoundError:
            return
        _fsync_dir(self._dir)

    def _make_dir(self) -> None:
        if not self._dir.is_dir():
            self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            _fsync_dir(self._dir.parent)  # the new directory's own entry is durable too


def _check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise ValueError(f"not a service name: {name!r}")


def _read(path: Path) -> dict[str, Any] | str:
    """The definition in `path`, or why it is not one."""
    try:
        data = path.read_bytes()
    except OSError as e:
        return f"cannot read it: {e}"
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        return f"not valid JSON: {e}"
    name = path.name.removesuffix(".json")
    if not isinstance(value, dict):
        return f"a JSON {type(value).__name__}, not an object"
    if not _NAME.fullmatch(name):
        return "the file name is not a service name"
    if value.get("name") != name:
        return f"its name {value.get('name')!r} is not the file's {name!r}"
    return value


def _set_aside(path: Path, reason: str) -> None:
    """Rename, never delete: an operator may want what was in it."""
    base = f"{path.name}.corrupt-{_utc_stamp()}"
    aside, n = path.with_name(base), 1
    while aside.exists():
        aside, n = path.with_name(f"{base}-{n}"), n + 1
    os.rename(path, aside)
    log.warning("set aside corrupt service definition %s as %s: %s", path, aside, reason)


def _utc_stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


def _fsync_dir(directory: Path) -> None:
    """Make the names in `directory` durable (a rename or unlink is only in it)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
