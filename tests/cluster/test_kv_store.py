"""The key-value service store on a real NATS server: round trips, exclusive creation, the
watch (across clients, across a server restart) and values that are no definitions."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any, cast

import nats.errors
import orjson
import pytest
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import api

from nkservice.cluster.kv_store import BUCKET, KvServiceStore, _FeedLost, _Seen
from nkservice.cluster.server import EmbeddedNats
from tests.cluster.conftest import Nats, NatsFactory

HEARTBEAT = 0.2  # a lost watch is found after two missed heartbeats: keep tests quick
Change = tuple[str, dict[str, Any] | None]


def definition(name: str, n: int = 0) -> dict[str, Any]:
    return {"name": name, "listen": ["ws://127.0.0.1:9020/"], "users": {"alice": f"pw{n}"}}


def kv_store(nc: Nats) -> KvServiceStore:
    return KvServiceStore(nc, heartbeat=HEARTBEAT)


class Watch:
    """A store's watch running in a task; its changes in a queue."""

    def __init__(self, store: KvServiceStore) -> None:
        self.changes: asyncio.Queue[Change] = asyncio.Queue()
        self.task = asyncio.create_task(store.watch(self.changed))

    def changed(self, name: str, definition: dict[str, Any] | None) -> None:
        self.changes.put_nowait((name, definition))

    async def next(self, count: int = 1) -> list[Change]:
        async with asyncio.timeout(10):
            return [await self.changes.get() for _ in range(count)]

    async def stop(self) -> None:
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task


@pytest.fixture
async def watches(connect_nats: NatsFactory) -> AsyncIterator[list[Watch]]:
    """Watches a test starts; cancelled before its clients close (set up after them)."""
    started: list[Watch] = []
    yield started
    for watch in started:
        await watch.stop()


def watch(store: KvServiceStore, watches: list[Watch]) -> Watch:
    started = Watch(store)
    watches.append(started)
    return started


async def test_save_load_replace_and_delete(nc: Nats, connect_nats: NatsFactory) -> None:
    store = kv_store(nc)
    assert await store.load() == {}  # the bucket is created on first use
    await store.save("demo", definition("demo"))
    await store.save("other", definition("other"))
    await store.save("demo", definition("demo", 2))  # replaced
    elsewhere = kv_store(await connect_nats())
    assert await elsewhere.load() == {"demo": definition("demo", 2), "other": definition("other")}
    await store.delete("demo")
    await store.delete("demo")  # no longer there: no error
    await store.delete("never")
    assert await elsewhere.load() == {"other": definition("other")}
    bucket = await nc.jetstream().stream_info(f"KV_{BUCKET}")
    assert bucket.config.max_msgs_per_subject == 1  # history 1
    assert bucket.config.storage == api.StorageType.FILE
    assert bucket.config.num_replicas == 1


@pytest.mark.parametrize("name", ["", "a.b", "a b", "*", ">", "a/b"])
async def test_a_name_that_is_no_service_name_is_refused(nc: Nats, name: str) -> None:
    store = kv_store(nc)
    with pytest.raises(ValueError, match="not a service name"):
        await store.save(name, definition(name))
    with pytest.raises(ValueError, match="not a service name"):
        await store.delete(name)


async def test_a_new_name_is_saved_only_if_it_is_not_stored(nc: Nats) -> None:
    store = kv_store(nc)
    await store.save("demo", definition("demo", 1), new=True)
    with pytest.raises(FileExistsError, match="the service demo is already stored"):
        await store.save("demo", definition("demo", 2), new=True)
    assert await store.load() == {"demo": definition("demo", 1)}
    await store.delete("demo")
    await store.save("demo", definition("demo", 3), new=True)  # deleted: free again
    assert await store.load() == {"demo": definition("demo", 3)}


async def test_of_two_nodes_creating_one_name_at_once_exactly_one_wins(
    connect_nats: NatsFactory,
) -> None:
    stores = [kv_store(await connect_nats()) for _ in range(2)]
    await stores[0].load()  # the bucket exists: the race is on the key
    for round_ in range(5):  # the first round on a fresh key, then over delete markers
        results = await asyncio.gather(
            *(store.save("demo", definition("demo", n), new=True)
              for n, store in enumerate(stores)),
            return_exceptions=True,
        )
        winners = [n for n, result in enumerate(results) if result is None]
        assert len(winners) == 1, (round_, results)
        assert all(isinstance(r, FileExistsError) for r in results if r is not None)
        assert await stores[1].load() == {"demo": definition("demo", winners[0])}
        await stores[0].delete("demo")


async def test_watch_sees_saves_and_deletes_of_every_client(
    nc: Nats, connect_nats: NatsFactory, watches: list[Watch]
) -> None:
    store, other = kv_store(nc), kv_store(await connect_nats())
    await other.save("before", definition("before"))
    await store.load()  # the watch starts after what this saw
    seen = watch(store, watches)
    await other.save("demo", definition("demo"))
    assert await seen.next() == [("demo", definition("demo"))]
    await other.save("demo", definition("demo", 2))
    assert await seen.next() == [("demo", definition("demo", 2))]
    await store.save("mine", definition("mine"))  # this process's own changes too
    assert await seen.next() == [("mine", definition("mine"))]
    await other.delete("demo")
    assert await seen.next() == [("demo", None)]
    assert seen.changes.empty()  # "before" was loaded, not watched


async def test_a_watch_started_during_a_load_starts_after_it(
    nc: Nats, connect_nats: NatsFactory, watches: list[Watch]
) -> None:
    store, other = kv_store(nc), kv_store(await connect_nats())
    await other.save("loaded", definition("loaded"))
    seen = watch(store, watches)  # its task runs once the load below is under way
    assert await store.load() == {"loaded": definition("loaded")}
    await other.save("after", definition("after"))
    assert await seen.next() == [("after", definition("after"))]
    assert seen.changes.empty()


async def test_a_watch_behind_sees_the_last_revision_of_a_key(
    nc: Nats, watches: list[Watch]
) -> None:
    store = kv_store(nc)
    await store.load()
    for n in range(3):
        await store.save("demo", definition("demo", n))
    await store.save("other", definition("other"))
    seen = watch(store, watches)  # starts after the load, but only now
    # The bucket keeps one revision per key: revisions replaced before the watch read them
    # are gone, the last one is there.
    assert await seen.next(2) == [("demo", definition("demo", 2)), ("other", definition("other"))]


async def test_watch_starts_right_after_the_last_load(
    nc: Nats, connect_nats: NatsFactory, watches: list[Watch]
) -> None:
    store, other = kv_store(nc), kv_store(await connect_nats())
    await other.save("loaded", definition("loaded"))
    assert await store.load() == {"loaded": definition("loaded")}
    await other.save("meanwhile", definition("meanwhile"))  # after the load, before the watch
    seen = watch(store, watches)
    assert await seen.next() == [("meanwhile", definition("meanwhile"))]


async def test_watch_survives_a_server_restart(
    nats_server: EmbeddedNats, nc: Nats, connect_nats: NatsFactory, watches: list[Watch],
    caplog: pytest.LogCaptureFixture,
) -> None:
    other_nc = await connect_nats()
    store, other = kv_store(nc), kv_store(other_nc)
    await store.load()
    seen = watch(store, watches)
    await other.save("first", definition("first"))
    assert await seen.next() == [("first", definition("first"))]
    await nats_server.restart()  # the watch's consumer is gone with the server
    async with asyncio.timeout(10):
        await other_nc.reconnected.wait()
    await other.save("second", definition("second"))  # before the watch noticed, likely
    await other.delete("first")
    assert await seen.next(2) == [("second", definition("second")), ("first", None)]
    await other.save("third", definition("third"))
    assert await seen.next() == [("third", definition("third"))]
    assert seen.changes.empty()  # nothing twice
    assert any("the watch of nks_services lost its feed" in r.getMessage()
               for r in caplog.records if r.levelno == logging.WARNING)


async def test_changes_while_nats_is_away_fail_and_the_watch_catches_up(
    nats_server: EmbeddedNats, nc: Nats, connect_nats: NatsFactory, watches: list[Watch]
) -> None:
    other_nc = await connect_nats()
    store, other = kv_store(nc), kv_store(other_nc)
    await store.load()
    seen = watch(store, watches)
    await other.save("before", definition("before"))
    assert await seen.next() == [("before", definition("before"))]  # the watch is going
    await nats_server.stop()
    async with asyncio.timeout(10):
        await other_nc.disconnected.wait()
    with pytest.raises(OSError, match="not connected to NATS"):
        await other.save("lost", definition("lost"))  # refused at once, never sent later
    await nats_server.start()
    async with asyncio.timeout(10):
        await other_nc.reconnected.wait()
    await other.save("after", definition("after"))
    assert await seen.next() == [("after", definition("after"))]
    assert await store.load() == {"before": definition("before"), "after": definition("after")}


async def test_a_watch_started_while_nats_is_away_waits_for_it(
    nats_server: EmbeddedNats, nc: Nats, watches: list[Watch]
) -> None:
    store = kv_store(nc)
    await store.load()
    await nats_server.stop()
    async with asyncio.timeout(10):
        await nc.disconnected.wait()
    seen = watch(store, watches)
    await nats_server.start()
    async with asyncio.timeout(10):
        await nc.reconnected.wait()
    await store.save("demo", definition("demo"))
    assert await seen.next() == [("demo", definition("demo"))]


async def test_values_that_are_no_definitions_are_skipped_with_a_log_line(
    nc: Nats, watches: list[Watch], caplog: pytest.LogCaptureFixture
) -> None:
    store = kv_store(nc)
    await store.save("good", definition("good"))
    await store.load()
    seen = watch(store, watches)
    raw = await nc.jetstream().key_value(BUCKET)  # something else than a node writes
    garbage = {
        "garbage": (b"\xff\x00{not json", "not valid JSON: "),
        "list": (b'["name", "list"]', "a JSON list, not an object"),
        "misnamed": (b'{"name": "other"}', "its name 'other' is not the key's 'misnamed'"),
    }
    for name, (value, _) in garbage.items():
        await raw.put(name, value)
    await raw.put("not.a.name", b'{"name": "not.a.name"}')
    await store.save("last", definition("last"))
    assert await seen.next() == [("last", definition("last"))]  # the others were skipped
    assert await store.load() == {"good": definition("good"), "last": definition("last")}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for name, (_, why) in garbage.items():
        prefix = f"skipped the value of {name} in nks_services: {why}"
        assert sum(w.startswith(prefix) for w in warnings) == 2, prefix  # watch, then load
    assert warnings.count("skipped the key 'not.a.name' of nks_services: not a service "
                          "name") == 2


async def test_a_failing_callback_is_logged_and_the_watch_goes_on(
    nc: Nats, caplog: pytest.LogCaptureFixture
) -> None:
    store = kv_store(nc)
    await store.load()
    changes: asyncio.Queue[str] = asyncio.Queue()

    def changed(name: str, definition: dict[str, Any] | None) -> None:
        changes.put_nowait(name)
        if name == "bad":
            raise RuntimeError("a bug")

    task = asyncio.create_task(store.watch(changed))
    try:
        await store.save("bad", definition("bad"))
        await store.save("good", definition("good"))
        async with asyncio.timeout(10):
            assert [await changes.get(), await changes.get()] == ["bad", "good"]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.getMessage() for r in errors] == [
        "the watch of nks_services: applying the change of bad failed"]


async def test_the_watch_ends_when_its_client_is_closed(nc: Nats) -> None:
    store = kv_store(nc)
    await store.load()
    seen = Watch(store)
    await store.save("demo", definition("demo"))
    assert await seen.next() == [("demo", definition("demo"))]  # waiting for the next one
    await nc.close()
    async with asyncio.timeout(10):
        with pytest.raises(nats.errors.ConnectionClosedError):
            await seen.task


async def test_a_failure_of_nats_is_an_oserror(nc: Nats) -> None:
    store = kv_store(nc)
    await store.load()
    await nc.close()
    with pytest.raises(OSError, match="not connected to NATS"):
        await store.save("demo", definition("demo"))
    with pytest.raises(OSError, match="cannot load the definitions in the NATS key-value"):
        await store.load()


class Feed:
    """What a consumer sends, made up: a lost message cannot be arranged on a real one."""

    def __init__(self, nc: Nats, *items: tuple[int, int] | int) -> None:
        """(consumer sequence, stream sequence) for a message; an int for a heartbeat
        saying how many messages were sent."""
        self.msgs: list[Msg] = []
        for item in items:
            if isinstance(item, int):
                self.msgs.append(Msg(nc, subject="_INBOX.x", headers={
                    "Status": "100", "Description": "Idle Heartbeat",
                    "Nats-Last-Consumer": str(item), "Nats-Last-Stream": "0"}))
            else:
                consumer, stream = item
                name = f"s{stream}"
                self.msgs.append(Msg(
                    nc, subject=f"$KV.{BUCKET}.{name}",
                    reply=f"$JS.ACK.KV_{BUCKET}.c.1.{stream}.{consumer}.1796026432660905715.0",
                    data=orjson.dumps(definition(name)),
                ))

    async def next_msg(self, timeout: float) -> Msg:
        if not self.msgs:
            raise nats.errors.TimeoutError
        return self.msgs.pop(0)


@pytest.mark.parametrize(("items", "why"), [
    ([(1, 4), (2, 7), (4, 9)], "a message was lost on the way"),  # a gap in the sequence
    ([(1, 4), (2, 7), 3], "a message was lost on the way"),  # the heartbeat says 3 were sent
    ([(1, 4), (2, 7), 2], "no heartbeat"),  # all there; then silence
])
async def test_a_feed_that_lost_a_message_goes_on_after_the_last_one_seen(
    nc: Nats, items: list[tuple[int, int] | int], why: str
) -> None:
    store, seen = kv_store(nc), _Seen(3)
    changed: list[str] = []
    with pytest.raises(_FeedLost, match=why):
        await store._follow(cast(Subscription, Feed(nc, *items)), seen,
                            lambda name, definition: changed.append(name))
    assert changed == ["s4", "s7"]
    assert seen.revision == 7  # the watch's next feed starts at 8
