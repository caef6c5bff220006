"""The file store of API-created services: atomic saves, crashes, corrupt files."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import stat
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from nkservice.service import store as store_module
from nkservice.service.store import FileServiceStore


def definition(name: str, n: int = 0) -> dict[str, Any]:
    return {"name": name, "listen": ["ws://127.0.0.1:9020/"], "users": {"alice": f"pw{n}"}}


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def leftovers(directory: Path) -> list[str]:
    return [name for name in names(directory) if name.endswith(".tmp")]


async def test_save_load_replace_and_delete(tmp_path: Path) -> None:
    directory = tmp_path / "data" / "services"
    store = FileServiceStore(directory)
    assert await store.load() == {}  # a missing directory: nothing stored yet
    await store.save("demo", definition("demo"))
    await store.save("other", definition("other"))
    await store.save("demo", definition("demo", 2))  # replaced
    assert await FileServiceStore(directory).load() == {
        "demo": definition("demo", 2),
        "other": definition("other"),
    }
    await store.delete("demo")
    await store.delete("demo")  # no longer there: no error
    await FileServiceStore(tmp_path / "never").delete("demo")
    assert await FileServiceStore(directory).load() == {"other": definition("other")}
    assert names(directory) == ["other.json"]


async def test_files_are_private_and_readable(tmp_path: Path) -> None:
    directory = tmp_path / "data" / "services"
    await FileServiceStore(directory).save("demo", definition("demo"))
    path = directory / "demo.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # definitions carry passwords
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert path.read_text("utf-8").startswith('{\n  "name": "demo",\n')


@pytest.mark.parametrize("name", ["", "a/b", "a.b", "..", "x\0"])
async def test_a_name_that_is_no_file_name_is_refused(tmp_path: Path, name: str) -> None:
    store = FileServiceStore(tmp_path)
    with pytest.raises(ValueError, match="not a service name"):
        await store.save(name, definition(name))
    with pytest.raises(ValueError, match="not a service name"):
        await store.delete(name)
    assert names(tmp_path) == []


async def test_a_save_writes_fsyncs_renames_then_fsyncs_the_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "services"
    store = FileServiceStore(directory)
    await store.save("demo", definition("demo"))
    steps: list[tuple[str, Any]] = []
    real_fsync, real_replace = os.fsync, os.replace
    loop_thread = threading.get_ident()

    def fsync(fd: int) -> None:
        assert threading.get_ident() != loop_thread  # never holds the event loop
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            steps.append(("fsync dir", info.st_ino))
        else:
            steps.append(("fsync file", (info.st_ino, info.st_size)))  # size: written first
        real_fsync(fd)

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        steps.append(("replace", (Path(src).parent, Path(dst))))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    await store.save("demo", definition("demo", 1))
    path = directory / "demo.json"
    assert steps == [
        ("fsync file", (path.stat().st_ino, path.stat().st_size)),
        ("replace", (directory, path)),
        ("fsync dir", directory.stat().st_ino),
    ]
    steps.clear()
    await store.delete("demo")
    assert steps == [("fsync dir", directory.stat().st_ino)]


async def test_a_new_name_is_saved_only_if_it_is_not_stored(tmp_path: Path) -> None:
    directory = tmp_path / "services"
    store = FileServiceStore(directory)
    await store.save("demo", definition("demo", 1), new=True)
    with pytest.raises(FileExistsError, match="the service demo is already stored"):
        await store.save("demo", definition("demo", 2), new=True)
    assert await FileServiceStore(directory).load() == {"demo": definition("demo", 1)}
    assert names(directory) == ["demo.json"]  # the refused save left nothing behind
    assert stat.S_IMODE((directory / "demo.json").stat().st_mode) == 0o600
    await store.delete("demo")
    await store.save("demo", definition("demo", 3), new=True)
    assert await FileServiceStore(directory).load() == {"demo": definition("demo", 3)}


async def test_of_new_saves_of_one_name_at_once_exactly_one_wins(tmp_path: Path) -> None:
    directory = tmp_path / "services"
    stores = [FileServiceStore(directory) for _ in range(8)]  # no lock in common: threads
    for _ in range(5):
        results = await asyncio.gather(
            *(store.save("demo", definition("demo", n), new=True)
              for n, store in enumerate(stores)),
            return_exceptions=True,
        )
        winners = [n for n, result in enumerate(results) if result is None]
        assert len(winners) == 1, results
        assert all(isinstance(r, FileExistsError) for r in results if r is not None)
        assert await stores[0].load() == {"demo": definition("demo", winners[0])}
        assert names(directory) == ["demo.json"]
        await stores[0].delete("demo")


async def test_a_new_save_writes_fsyncs_links_then_fsyncs_the_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "services"
    store = FileServiceStore(directory)
    await store.save("other", definition("other"))
    steps: list[tuple[str, Any]] = []
    real_fsync, real_link = os.fsync, os.link

    def fsync(fd: int) -> None:
        info = os.fstat(fd)
        steps.append(("fsync dir" if stat.S_ISDIR(info.st_mode) else "fsync file", info.st_ino))
        real_fsync(fd)

    def link(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        steps.append(("link", Path(dst)))
        real_link(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "link", link)
    await store.save("demo", definition("demo"), new=True)
    path = directory / "demo.json"
    assert steps == [
        ("fsync file", path.stat().st_ino),  # the data is durable before it has the name
        ("link", path),
        ("fsync dir", directory.stat().st_ino),
    ]
    assert names(directory) == ["demo.json", "other.json"]


class Crash(Exception):
    """The power went out."""


def crash_at(step: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail at `step` of the next save; the failed save cannot clean up, as in a real crash."""
    real_write, real_fsync = os.write, os.fsync

    def write(fd: int, data: bytes) -> int:
        real_write(fd, data[: len(data) // 2])  # half of it reached the file
        raise Crash

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode) == (step == "fsync dir"):
            raise Crash
        real_fsync(fd)

    def fail(*args: object) -> None:
        raise Crash

    def no_cleanup(*args: object) -> None:
        raise OSError("crashed")

    if step == "write":
        monkeypatch.setattr(os, "write", write)
    elif step in ("replace", "link"):
        monkeypatch.setattr(os, step, fail)
    else:
        monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "unlink", no_cleanup)


@pytest.mark.parametrize(
    ("step", "survivor"),
    [("write", 1), ("fsync file", 1), ("replace", 1), ("fsync dir", 2)],
)
@pytest.mark.parametrize("first_save", [True, False])
async def test_a_crash_at_any_step_leaves_the_old_definition_or_the_new(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str, survivor: int, first_save: bool
) -> None:
    directory = tmp_path / "services"
    await FileServiceStore(directory).save("other", definition("other"))
    if not first_save:
        await FileServiceStore(directory).save("demo", definition("demo", 1))
    with monkeypatch.context() as crashing:
        crash_at(step, crashing)
        with pytest.raises(Crash):
            await FileServiceStore(directory).save("demo", definition("demo", 2))
    if step != "fsync dir":
        assert len(leftovers(directory)) == 1  # the crash left the temporary file
    expected = {"other": definition("other")}
    if survivor == 2 or not first_save:
        expected["demo"] = definition("demo", survivor)
    assert await FileServiceStore(directory).load() == expected
    assert leftovers(directory) == []


@pytest.mark.parametrize("step", ["write", "fsync file", "link"])
async def test_a_crash_in_a_new_save_leaves_no_definition(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    directory = tmp_path / "services"
    await FileServiceStore(directory).save("other", definition("other"))
    with monkeypatch.context() as crashing:
        crash_at(step, crashing)
        with pytest.raises(Crash):
            await FileServiceStore(directory).save("demo", definition("demo"), new=True)
    assert len(leftovers(directory)) == 1  # the crash left the temporary file
    assert await FileServiceStore(directory).load() == {"other": definition("other")}
    assert names(directory) == ["other.json"]
    await FileServiceStore(directory).save("demo", definition("demo"), new=True)  # free


CHILD = """
import asyncio, sys
from pathlib import Path
from nkservice.service.store import FileServiceStore

async def main() -> None:
    store = FileServiceStore(Path(sys.argv[1]))
    n = 0
    while True:
        print(n, flush=True)  # starting save n: saves 0 .. n-1 returned
        await store.save("demo", {"name": "demo", "n": n, "pad": str(n) * 20000})
        n += 1

asyncio.run(main())
"""


@pytest.mark.parametrize("kill_after", [1, 3, 10, 25, 60])
async def test_a_process_killed_mid_save_leaves_a_whole_definition(
    tmp_path: Path, kill_after: int
) -> None:
    directory = tmp_path / "services"
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, str(directory), stdout=asyncio.subprocess.PIPE
    )
    assert child.stdout is not None
    started = -1
    try:
        async with asyncio.timeout(30):
            while started < kill_after:
                started = int(await child.stdout.readline())
    finally:
        child.send_signal(signal.SIGKILL)
        await child.wait()
    assert child.returncode == -signal.SIGKILL
    loaded = await FileServiceStore(directory).load()
    n = loaded["demo"]["n"]
    assert started - 1 <= n <= started  # the last returned save, or the one under way
    assert loaded == {"demo": {"name": "demo", "n": n, "pad": str(n) * 20000}}
    assert names(directory) == ["demo.json"]


async def test_corrupt_files_are_set_aside_and_the_others_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "services"
    await FileServiceStore(directory).save("good", definition("good"))
    bad = {
        "garbage": b"\xff\x00{not json",
        "empty": b"",
        "list": b'["name", "list"]',
        "misnamed": b'{"name": "other"}',
    }
    for name, content in bad.items():
        (directory / f"{name}.json").write_bytes(content)
    (directory / "half.json.0badc0de.tmp").write_bytes(b'{"name": "ha')
    (directory / "notes.txt").write_bytes(b"not a definition")
    (directory / "garbage.json.corrupt-20260101T000000Z").write_bytes(b"set aside before")
    monkeypatch.setattr(store_module, "_utc_stamp", lambda: "20260101T000000Z")
    with caplog.at_level(logging.INFO, logger="nkservice.service.store"):
        assert await FileServiceStore(directory).load() == {"good": definition("good")}
    aside = {
        "empty": "empty.json.corrupt-20260101T000000Z",
        "garbage": "garbage.json.corrupt-20260101T000000Z-1",  # that name was taken
        "list": "list.json.corrupt-20260101T000000Z",
        "misnamed": "misnamed.json.corrupt-20260101T000000Z",
    }
    for name, new_name in aside.items():
        assert (directory / new_name).read_bytes() == bad[name]  # renamed, never deleted
    assert names(directory) == sorted(
        [*aside.values(), "garbage.json.corrupt-20260101T000000Z", "good.json", "notes.txt"]
    )
    warnings = {r.getMessage() for r in caplog.records if r.levelno == logging.WARNING}
    reasons = {
        "empty": "not valid JSON: ",
        "garbage": "not valid JSON: ",
        "list": "a JSON list, not an object",
        "misnamed": "its name 'other' is not the file's 'misnamed'",
    }
    assert len(warnings) == 4
    for name, reason in reasons.items():
        prefix = (
            f"set aside corrupt service definition {directory / name}.json"
            f" as {directory / aside[name]}: {reason}"
        )
        assert any(w.startswith(prefix) for w in warnings), prefix
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    tmp = directory / "half.json.0badc0de.tmp"
    assert infos == [f"removed {tmp}, left over from an unfinished save"]


async def test_a_cancelled_save_finishes_before_the_next_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FileServiceStore(tmp_path)
    entered, release = threading.Event(), threading.Event()
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            entered.set()
            release.wait(10)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    saving = asyncio.create_task(store.save("demo", definition("demo")))
    await asyncio.to_thread(entered.wait, 10)
    saving.cancel()
    deleting = asyncio.create_task(store.delete("demo"))
    await asyncio.sleep(0.05)
    assert not deleting.done()  # the save's thread still runs: the delete waits for it
    release.set()
    await deleting
    with pytest.raises(asyncio.CancelledError):
        await saving
    assert await store.load() == {}  # the delete came last, as it was asked
