"""The cluster's `ServiceStore`: service definitions in a JetStream key-value bucket.

Every node of a cluster must see the services created by API and start them (DESIGN.md
"Cluster"), so the definitions live where all of them read: a key-value bucket of the NATS
the nodes share, one key per service (its name), the definition's JSON as the value. The
bucket keeps one revision per key (history 1) in file storage, `replicas` copies in a NATS
cluster.

Besides the store's load / save / delete, a node needs two things a directory of files
cannot give it:

- `save(..., new=True)` creates a name only if no one has it, atomically across the
  cluster (the key-value `create`): two nodes creating the same service at once, one wins;
- `watch(changed)` tells a node of every change any node makes, so it starts, updates and
  stops services where they were not asked for. It follows the bucket's stream by
  sequence number and, when its feed is lost (NATS restarted, a reconnect, a message lost
  on the way), starts a new feed right after the last change it saw: it ends up at every
  key's last revision whatever happened meanwhile. The bucket keeps one revision per key,
  so a revision replaced before the watch read it is never seen: the one that replaced it
  is.

The watch uses a consumer of its own rather than nats-py's `KeyValue.watch`: that one
starts with the current value of every key, or with all history, never at a given
revision (a node would miss what changed between its load and its watch), and it finds a
consumer lost with the server only after two missed 5-second heartbeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import api
from nats.js.kv import KV_DEL, KV_OP, KV_PURGE, KeyValue

log = logging.getLogger(__name__)

BUCKET = "nks_services"
HEARTBEAT = 1.0  # seconds between the server's heartbeats on an idle watch
CONSUMER_IDLE = 30.0  # seconds a consumer nobody reads lives on in the server
_NAME = re.compile(r"[A-Za-z0-9_-]+")

Changed = Callable[[str, dict[str, Any] | None], None]
"""What `watch` calls: (name, definition) for a save, (name, None) for a delete."""


class _FeedLost(Exception):
    """A consumer stopped delivering, or lost a message on the way."""


@dataclass
class _Seen:
    """The last revision (stream sequence number) a watch has passed on."""

    revision: int


class KvServiceStore:
    """A `ServiceStore` in the JetStream key-value bucket `bucket` of a connected client.

    The bucket is created on first use if it does not exist (with `replicas` copies; an
    existing bucket is used as it is). Failures of NATS (not connected, no answer in time,
    JetStream refusing) raise `OSError` saying which, as a failing disk would; a save that
    timed out may still have happened, as a write to a disk that failed may have.

    "Durable" is as durable as JetStream makes it: a save returns once the server (each
    replica) stored it. nats-server writes it to its files at once but fsyncs them only
    every 2 minutes by default (`sync_interval`): a crash of the server process loses
    nothing, a power cut of a one-server cluster can lose the last minutes.
    """

    def __init__(self, nc: Client, bucket: str = BUCKET, *, replicas: int = 1,
                 heartbeat: float = HEARTBEAT) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self._bucket = bucket
        self._stream = f"KV_{bucket}"
        self._prefix = f"$KV.{bucket}."
        self._replicas = replicas
        self._heartbeat = heartbeat
        self._kv: KeyValue | None = None
        self._binding = asyncio.Lock()
        self._loading = asyncio.Lock()  # a watch started meanwhile starts after the load
        self.revision: int | None = None
        """The bucket's revision (its stream's last sequence number) that the last `load`
        reflects at least; `watch` starts right after it."""

    async def load(self) -> dict[str, dict[str, Any]]:
        """Every stored definition by name. A value that is not a definition (not a JSON
        object, or not of the key's name: written by something else than a node) is left
        out with one WARNING log line. It cannot be set aside as a corrupt file is: it
        stays in the bucket until a save or a delete of that name replaces it."""
        async with self._loading:
            return await self._load()

    async def _load(self) -> dict[str, dict[str, Any]]:
        with self._failures("load the definitions"):
            await self._bind()
            revision = (await self._js.stream_info(self._stream)).state.last_seq
            found: dict[str, dict[str, Any]] = {}
            async with self._consumer(api.DeliverPolicy.LAST_PER_SUBJECT) as (sub, pending):
                while pending:
                    msg = await self._next(sub)
                    if msg is None:
                        raise _FeedLost("no message and no heartbeat from the server")
                    if _is_status(msg):
                        continue
                    pending = msg.metadata.num_pending
                    name, definition = self._entry(msg)
                    if name is not None and definition is not None:
                        found[name] = definition
            self.revision = revision
            return found

    async def save(self, name: str, definition: dict[str, Any], *, new: bool = False) -> None:
        """Store or replace a definition; with `new`, only if the name is not stored yet
        (else FileExistsError), decided by JetStream: of two nodes creating one name at
        once, exactly one succeeds."""
        _check_name(name)
        data = orjson.dumps(definition)
        with self._failures(f"save the definition of {name}"):
            self._check_connected()
            kv = await self._bind()
            if not new:
                await kv.put(name, data)
                return
            try:
                await kv.create(name, data)
            except nats.js.errors.KeyWrongLastSequenceError:
                raise FileExistsError(f"the service {name} is already stored") from None

    async def delete(self, name: str) -> None:
        """Forget a definition; no error when there is none (watchers may then see the
        delete of a name they do not know)."""
        _check_name(name)
        with self._failures(f"delete the definition of {name}"):
            self._check_connected()
            kv = await self._bind()
            await kv.delete(name)

    async def watch(self, changed: Changed) -> None:
        """Call `changed(name, definition)` for every save and `changed(name, None)` for
        every delete made after the last `load()` (one under way when the watch starts is
        waited for; without one: after the watch started), by any process, this one
        included; until cancelled. A change made while the last load ran may come again:
        applying one twice must do no harm. A key saved again before the watch read it is
        seen once, with its last value. While NATS is away the watch waits for it, then
        goes on from where it was. Values that are not definitions are logged and skipped;
        an exception of `changed` is logged. Ends (with ConnectionClosedError) only when
        the client is closed."""
        async with self._loading:  # a load under way: start where it left off
            seen = None if self.revision is None else _Seen(self.revision)
        lost = False
        while True:
            try:
                await self._wait_connected()
                if seen is None:
                    await self._bind()
                    seen = _Seen((await self._js.stream_info(self._stream)).state.last_seq)
                async with self._consumer(api.DeliverPolicy.BY_START_SEQUENCE,
                                          start=seen.revision + 1) as (sub, _):
                    if lost:
                        log.info("watching %s again from revision %d", self._bucket,
                                 seen.revision + 1)
                        lost = False
                    await self._follow(sub, seen, changed)
            except (_FeedLost, nats.errors.Error, OSError) as e:
                if self._nc.is_closed:
                    raise nats.errors.ConnectionClosedError from e
                if not lost:
                    after = "its start" if seen is None else f"revision {seen.revision + 1}"
                    log.warning("the watch of %s lost its feed (%s): following it again from "
                                "%s when NATS answers", self._bucket,
                                str(e) or type(e).__name__, after)
                    lost = True
                else:
                    log.debug("the watch of %s cannot follow yet: %r", self._bucket, e)
                await asyncio.sleep(self._heartbeat / 2)  # do not spin while NATS is away

    # -- following a consumer --------------------------------------------------------------

    async def _follow(self, sub: Subscription, seen: _Seen, changed: Changed) -> None:
        """Deliver the changes of one consumer, noting each in `seen`; raises `_FeedLost`
        when the consumer stops delivering or skipped a message (the consumer numbers its
        deliveries 1, 2, 3...: a message lost on the way shows as a gap)."""
        delivered = 0
        while True:
            msg = await self._next(sub)
            if msg is None:
                raise _FeedLost("no heartbeat")
            if _is_status(msg):
                # An idle heartbeat says how many messages the consumer has sent: one lost
                # on the way (a reconnect, a slow consumer) shows here when none follows.
                if _last_sent(msg, delivered) != delivered:
                    raise _FeedLost("a message was lost on the way")
                continue
            sequence = msg.metadata.sequence
            if sequence.consumer != delivered + 1:
                raise _FeedLost("a message was lost on the way")
            delivered, seen.revision = sequence.consumer, sequence.stream
            name, definition = self._entry(msg)
            if name is None:
                continue
            try:
                changed(name, definition)
            except Exception:
                log.exception("the watch of %s: applying the change of %s failed",
                              self._bucket, name)

    @contextlib.asynccontextmanager
    async def _consumer(self, policy: api.DeliverPolicy, *, start: int | None = None
                        ) -> AsyncIterator[tuple[Subscription, int]]:
        """An ephemeral push consumer of the bucket's stream with heartbeats, delivering on
        an inbox of ours, and how many messages it has to deliver; deleted on exit."""
        sub = await self._nc.subscribe(self._nc.new_inbox())
        consumer = ""
        try:
            info = await self._js.add_consumer(self._stream, api.ConsumerConfig(
                deliver_subject=sub.subject, deliver_policy=policy, opt_start_seq=start,
                filter_subject=f"{self._prefix}>", ack_policy=api.AckPolicy.NONE,
                idle_heartbeat=self._heartbeat, inactive_threshold=CONSUMER_IDLE,
                mem_storage=True, num_replicas=1,
            ))
            consumer = info.name
            yield sub, info.num_pending or 0
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
            if consumer and self._nc.is_connected:  # else the server drops it when idle
                with contextlib.suppress(nats.errors.Error, TimeoutError):
                    async with asyncio.timeout(self._heartbeat):
                        await self._js.delete_consumer(self._stream, consumer)

    async def _next(self, sub: Subscription) -> Msg | None:
        """The next message or heartbeat; None when two heartbeats were missed."""
        try:
            return await sub.next_msg(timeout=2 * self._heartbeat)
        except nats.errors.TimeoutError:
            return None

    def _entry(self, msg: Msg) -> tuple[str | None, dict[str, Any] | None]:
        """(name, definition) of a bucket message; (name, None) for a delete; (None, None)
        with a WARNING for what is no definition."""
        name = msg.subject.removeprefix(self._prefix)
        if not _NAME.fullmatch(name):
            log.warning("skipped the key %r of %s: not a service name", name, self._bucket)
            return None, None
        if (msg.headers or {}).get(KV_OP) in (KV_DEL, KV_PURGE):
            return name, None
        why = _not_a_definition(name, msg.data)
        if why:
            log.warning("skipped the value of %s in %s: %s", name, self._bucket, why)
            return None, None
        definition: dict[str, Any] = orjson.loads(msg.data)
        return name, definition

    # -- NATS ------------------------------------------------------------------------------

    async def _bind(self) -> KeyValue:
        """The bucket, created on first use by whichever node comes first (JetStream takes
        the same creation twice as one)."""
        async with self._binding:
            if self._kv is None:
                try:
                    self._kv = await self._js.key_value(self._bucket)
                except nats.js.errors.BucketNotFoundError:
                    self._kv = await self._js.create_key_value(api.KeyValueConfig(
                        bucket=self._bucket, description="nkservice: services created by API",
                        history=1, storage=api.StorageType.FILE, replicas=self._replicas,
                    ))
            return self._kv

    def _check_connected(self) -> None:
        """Refuse a change while NATS is away: nats-py would hold it and send it on
        reconnecting, after its caller was told it failed."""
        if not self._nc.is_connected:
            raise OSError(f"not connected to NATS, the key-value bucket {self._bucket} "
                          "cannot be changed now")

    async def _wait_connected(self) -> None:
        while not self._nc.is_connected:
            if self._nc.is_closed:
                raise nats.errors.ConnectionClosedError
            await asyncio.sleep(self._heartbeat / 4)

    @contextlib.contextmanager
    def _failures(self, what: str) -> Iterator[None]:
        """NATS failing, said as OSError (what the node expects of a store)."""
        try:
            yield
        except (nats.errors.Error, TimeoutError, _FeedLost) as e:
            raise OSError(f"cannot {what} in the NATS key-value bucket {self._bucket}: "
                          f"{e}") from e


def _check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise ValueError(f"not a service name: {name!r}")


def _is_status(msg: Msg) -> bool:
    """A heartbeat (status 100) rather than a message of the stream."""
    return not msg.reply and "Status" in (msg.headers or {})


def _last_sent(heartbeat: Msg, default: int) -> int:
    return int((heartbeat.headers or {}).get("Nats-Last-Consumer", default))


def _not_a_definition(name: str, data: bytes) -> str:
    """Why `data` is not the definition of the service `name`; "" when it is."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        return f"not valid JSON: {e}"
    if not isinstance(value, dict):
        return f"a JSON {type(value).__name__}, not an object"
    if value.get("name") != name:
        return f"its name {value.get('name')!r} is not the key's {name!r}"
    return ""
