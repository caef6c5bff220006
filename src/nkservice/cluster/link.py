"""One process's connection to NATS, for the hot paths of a cluster.

nats-py's public API costs a coroutine per publish and, per subscription, a queue and a
task: fine for a few subscriptions, too much for a bus that holds one subscription per
distinct event key of the process (two per session: its automatic subscriptions) and
publishes for every event. `NatsLink` keeps nats-py for what it does well — connecting,
reconnecting, the protocol parser, JetStream — and adds:

- `publish`: synchronous; the command goes to the client's pending buffer, and one flush
  is asked per turn of the event loop (many publishes, one write);
- `subscribe` / `unsubscribe`: synchronous; a subscription is a slot in the client's table
  whose messages go straight to a plain callback, on the client's reading task, in order.
  The client replays it after a reconnect like its own.

This is the one module that uses nats-py's internals (`_subs`, `_pending`, `_process_msg`,
`_flush_queue`), so `pyproject.toml` pins the versions it was written against.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from nats import errors
from nats.aio.client import Client
from nats.protocol import command

from nkservice.errors import ServerError

log = logging.getLogger(__name__)

Handler = Callable[[bytes, bytes, bytes, bytes], None]
"""A subscription's callback: (subject, reply subject, payload, headers)."""

NO_RESPONDERS = b"NATS/1.0 503"  # the status NATS sends to a request nobody listens for
DEFAULT_MAX_PAYLOAD = 1024 * 1024  # what a server allows unless it says otherwise
WRITE_AHEAD = 1024 * 1024  # bytes the socket may hold unsent before we wait for it


class _Slot:
    """What the client's subscription table needs of an entry to replay it after a
    reconnect and to let go of it when closing, and our callback."""

    __slots__ = ("_max_msgs", "_message_iterator", "_pending_next_msgs_calls", "_queue",
                 "_received", "_subject", "_wait_for_msgs_task", "handler")

    def __init__(self, subject: str, queue: str, handler: Handler) -> None:
        self._subject = subject
        self._queue = queue
        self._max_msgs = 0
        self._received = 0
        self._wait_for_msgs_task = None
        self._message_iterator = None
        self._pending_next_msgs_calls: dict[Any, Any] = {}
        self.handler = handler


class TooLarge(ValueError):
    """A message over the NATS server's `max_payload`."""


class _Client(Client):
    """A nats-py client whose table may hold `_Slot`s: their messages skip its machinery."""

    async def _process_err(self, err_msg: str) -> None:
        """The server refused something and closes the connection: nats-py would then give
        up for good; reconnect instead (but not after an authorization error)."""
        if "authorization" in err_msg.lower():
            await super()._process_err(err_msg)
            return
        log.error("NATS refused what this process sent (%s); reconnecting", err_msg)
        await self._process_op_err(errors.Error(f"nats: {err_msg}"))

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes,
                           headers: bytes) -> None:
        slot: Any = self._subs.get(sid)
        if type(slot) is _Slot:
            try:
                slot.handler(subject, reply, data, headers or b"")
            except Exception:  # one bad message must not stop the reading task
                log.exception("handling a message on %s failed", subject)
            return
        await super()._process_msg(sid, subject, reply, data, headers)


class NatsLink:
    """Connects at `start`, reconnects forever; `connected` says whether NATS is there."""

    def __init__(self, url: str, name: str, *,
                 on_state: Callable[[bool], None] | None = None) -> None:
        self.url = url
        self.name = name
        self.client = _Client()
        self._on_state = on_state
        self._flush_asked = False
        self._confirming: asyncio.Future[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.dropped = 0  # publishes given up while NATS was away and the buffer full

    @property
    def connected(self) -> bool:
        return bool(self.client.is_connected)

    async def start(self, *, attempts: int = 10) -> None:
        """Connect: a node does not start without its cluster, so the first connection is
        tried `attempts` times, half a second apart, then `ServerError`; once connected,
        a lost connection is tried again forever, in the background."""
        self._loop = asyncio.get_running_loop()
        servers = [url.strip() for url in self.url.split(",") if url.strip()]
        try:
            await self.client.connect(
                # no_echo: NATS never brings a process its own messages (it has seen them).
                servers, name=self.name, connect_timeout=2, no_echo=True,
                allow_reconnect=True, max_reconnect_attempts=attempts,
                reconnect_time_wait=0.5,  # type: ignore[arg-type]  # seconds: a float works
                disconnected_cb=self._state(False), reconnected_cb=self._state(True),
                error_cb=self._error, pending_size=64 * 1024 * 1024)
        except Exception as exc:
            raise ServerError(f"cannot join the cluster at {self.url}: no NATS server "
                              f"answered ({exc or type(exc).__name__}); start it, or fix "
                              "node.cluster") from exc
        self.client.options["max_reconnect_attempts"] = -1  # from now on: never give up

    def _state(self, up: bool) -> Callable[[], Awaitable[None]]:
        async def changed() -> None:
            if self._closing:
                return
            log.log(logging.INFO if up else logging.WARNING, "NATS %s: %s",
                    "connection back" if up else "connection lost", self.url)
            if self._on_state is not None:
                self._on_state(up)
        return changed

    async def _error(self, error: Exception) -> None:
        log.debug("NATS: %s", error)

    async def close(self) -> None:
        self._closing = True
        client = self.client
        if client.is_closed:
            return
        if not client.is_connected:
            # While reconnecting, nats-py would write what it buffered to the old, closed
            # transport (uvloop raises there and the close stops half-way): that is lost
            # anyway.
            client._pending, client._pending_data_size = [], 0
        try:
            await client.close()
        except Exception as error:  # leaving: the log says why, the node still stops
            log.warning("closing the NATS connection: %s", error)

    # -- the hot paths ---------------------------------------------------------------------

    def publish(self, subject: str, payload: bytes, reply: str = "") -> None:
        """Queue a message; `TooLarge` when NATS would refuse it (and cut the connection:
        it answers an oversized message with an error and closes)."""
        client = self.client
        if len(payload) > (client.max_payload or DEFAULT_MAX_PAYLOAD):
            raise TooLarge(f"{len(payload)} bytes for {subject[:64]}")
        cmd = command.pub_cmd(subject, reply, payload)
        if client._pending_data_size + len(cmd) > client._max_pending_size:
            self.dropped += 1  # NATS is away or slower than us: the cluster is degraded
            return
        self._send(cmd)

    def subscribe(self, subject: str, handler: Handler, queue: str = "") -> int:
        client = self.client
        client._sid += 1
        sid: int = client._sid
        client._subs[sid] = _Slot(subject, queue, handler)  # type: ignore[assignment]
        self._send(command.sub_cmd(subject, queue, sid))
        return sid

    def unsubscribe(self, sid: int) -> None:
        if self.client._subs.pop(sid, None) is not None:
            self._send(command.unsub_cmd(sid, 0))

    def _send(self, cmd: bytes) -> None:
        client = self.client
        client._pending.append(cmd)
        client._pending_data_size += len(cmd)
        self._ask_flush()

    def _ask_flush(self) -> None:
        if not self._flush_asked and self._loop is not None:
            self._flush_asked = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_asked = False
        self.write_now()

    def write_now(self) -> None:
        """Write everything queued so far, at once (the end of a loop's turn does, for all
        of that turn); when the socket is already behind, leave it to the client's
        flusher, which waits for it to drain."""
        client = self.client
        if not client.is_connected or not client._pending:
            return  # reconnecting: nats-py sends the buffer after its CONNECT
        writer = getattr(client._transport, "_io_writer", None)  # a TCP connection's stream
        if writer is not None and writer.transport.get_write_buffer_size() < WRITE_AHEAD:
            self._write_pending()
            return
        queue = client._flush_queue
        if queue is not None and queue.empty():
            assert self._loop is not None
            queue.put_nowait(self._loop.create_future())

    def _write_pending(self) -> None:
        """Hand what is queued to the socket now (connected only)."""
        client = self.client
        if client._pending_data_size and client._transport is not None:
            client._transport.writelines(client._pending)
            client._pending = []
            client._pending_data_size = 0

    def confirm(self) -> asyncio.Future[None] | None:
        """A future done once NATS has taken everything sent so far (its answer to a PING
        written after it): a subscription is active for every publisher from then on. None
        when NATS is away: there is nobody to wait for."""
        if not self.connected or self._loop is None:
            return None
        if self._confirming is None:
            self._confirming = self._loop.create_future()
            task = self._loop.create_task(self._confirm(self._confirming))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return self._confirming

    async def _confirm(self, done: asyncio.Future[None]) -> None:
        self._confirming = None  # what is sent from now on needs a PING of its own
        client = self.client
        try:
            if not client.is_connected:
                return  # reconnecting: nats-py sends the buffer after its CONNECT
            self._write_pending()  # before the PING, in order
            await client.flush(timeout=5)
        except Exception as error:  # NATS went away meanwhile: degraded, nothing to wait for
            log.debug("NATS: no answer to a PING: %s", error)
        finally:
            if not done.done():
                done.set_result(None)

    def new_inbox(self) -> str:
        return str(self.client.new_inbox())

