"""An asyncio client of the External API (PROTOCOL.md §1, §3, §5.2), on any of the four
transports.

One `Client` holds at most one connection at a time. Each connection is a `_Link`: the
transport, our requests waiting for an answer on it (they fail with `ConnectionError` when
it drops: the server forgets them), the server's requests our handlers are still working
on (cancelled then, for the same reason), and a future that resolves when it is gone. What
outlives a connection lives on the `Client`: handlers, event consumers, and the
credentials and session id used to log in again after a reconnect.

Deadlines of our own requests: `request_timeout` (or the request's `timeout`), restarted by
every ack from the server with the larger of that timeout and the server's ack window
(`ACK_WINDOW`, 180 s), so a server that keeps acking keeps the request alive.

Reconnecting (`reconnect=True`): after a drop, wait a random delay between `backoff_min`
and `backoff_min * 2**attempt` (capped at `backoff_max`: "full jitter", so the clients of a
restarted server do not all come back at once), connect, log in again with the same user,
password, meta and session id (the server lets a user take over its own session id), then
call `on_reconnect`. Every failure, a refused login included (the server may refuse for a
while, e.g. `service_unavailable`), is retried until `close()`. Requests made while
disconnected fail at once with `ConnectionError`. `on_disconnect(reason)` is called at each
drop (and each refused login again) before the next try.

Why a connection ended (§1.3): the server says so before it closes, on tcp/tls as a last
line `{"result":"error","tid":null,"data":{"code":100081,"error":"Connection closed: …"}}`,
on ws/wss in the close frame. The link keeps that text (or the transport's error) as its
`reason`: it is the message of the `ConnectionError` its pending requests fail with, and
what `on_disconnect` is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
import ssl as ssl_module
from collections.abc import Awaitable, Callable, Coroutine
from types import TracebackType
from typing import Any

import orjson

from nkservice.client.transports import Transport, open_transport
from nkservice.errors import ApiError, ErrorCode
from nkservice.protocol.messages import (
    Ack,
    BadMessage,
    Request,
    Response,
    decode,
    encode_ack,
    encode_error,
    encode_ok,
    encode_request,
)

log = logging.getLogger(__name__)

ACK_WINDOW = 180.0  # what an ack buys on the server side (§1.3); we grant the server the same
CONNECTION_CLOSED = 100081  # the code of the server's last line on tcp/tls (§1.3, §10)

Event = dict[str, Any]
RequestHandler = Callable[[Any], Any]  # data → reply data, or an awaitable of it
EventCallback = Callable[[Event], None]
ReconnectHook = Callable[[], Awaitable[None] | None]
DisconnectHook = Callable[[str], Awaitable[None] | None]  # given why the connection ended


class Client:
    """A connection to one service's External API (see the module text for the rules).

    ```python
    async with Client("wss://host:9011/", ssl=context) as client:
        await client.login("alice", "secret")
        reply = await client.request("core", "ping", subclass="core")
    ```
    """

    def __init__(self, url: str, *, ssl: ssl_module.SSLContext | None = None,
                 request_timeout: float = 30.0, reconnect: bool = False,
                 backoff_min: float = 0.1, backoff_max: float = 10.0,
                 ack_after: float = 0.5, ack_every: float = 60.0,
                 on_reconnect: ReconnectHook | None = None,
                 on_disconnect: DisconnectHook | None = None) -> None:
        self.url = url
        self.ssl = ssl
        self.request_timeout = request_timeout
        self.reconnect = reconnect
        self.backoff_min = backoff_min
        self.backoff_max = max(backoff_max, backoff_min)
        self.ack_after = ack_after
        self.ack_every = ack_every
        self.on_reconnect = on_reconnect
        self.on_disconnect = on_disconnect
        self.session_id: str | None = None
        self.user: str | None = None
        # Set when the client is done for good: `close()`, or a drop without `reconnect`.
        self.closed = asyncio.Event()
        self._link: _Link | None = None
        self._closing = False
        self._credentials: dict[str, Any] | None = None
        self._subscriptions: dict[tuple[str, ...], dict[str, Any]] = {}
        self._registrations: list[dict[str, Any]] = []  # callbacks, registered again later
        self._next_tid = 1
        self._handlers: dict[tuple[str, str], RequestHandler] = {}
        self._event_callbacks: list[EventCallback] = []
        self._event_streams: set[EventStream] = set()
        self._supervisor: asyncio.Task[None] | None = None

    # -- life ------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._link is not None and not self._link.lost.done()

    async def connect(self) -> None:
        """Open the connection (no retry: the first failure is raised)."""
        if self.connected:
            return
        self._closing = False
        self.closed.clear()
        await self._open()
        if self.reconnect and (self._supervisor is None or self._supervisor.done()):
            self._supervisor = asyncio.get_running_loop().create_task(self._supervise())

    async def close(self) -> None:
        """Close the connection cleanly (a close frame on WebSocket) and stop reconnecting."""
        self._closing = True
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor
        link = self._link
        if link is not None:
            link.close()
            await link.wait_lost()
        self._finish()

    async def wait_closed(self) -> None:
        await self.closed.wait()

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    def _finish(self) -> None:
        self.closed.set()
        for stream in list(self._event_streams):
            stream.close()

    async def _open(self) -> _Link:
        link = _Link(self)
        async with asyncio.timeout(self.request_timeout):
            await open_transport(self.url, link, ssl=self.ssl)
        self._link = link
        return link

    def _connection_lost(self, link: _Link) -> None:
        if link is self._link and not self.reconnect and not self._closing:
            self._finish()

    # -- reconnecting ----------------------------------------------------------------------

    async def _supervise(self) -> None:
        """Whenever the connection drops, open a new one and log in again, until closed."""
        while True:
            link = self._link
            assert link is not None
            await link.wait_lost()
            reason = link.reason or "connection lost"
            log.info("connection to %s lost (%s); reconnecting", self.url, reason)
            await _run_hook(self.on_disconnect, reason)
            await self._reestablish()
            await _run_hook(self.on_reconnect)

    async def _reestablish(self) -> None:
        attempt = 0
        while True:
            # Full jitter: spread the clients of a restarted server over the whole window.
            ceiling = min(self.backoff_max, self.backoff_min * 2 ** attempt)
            await asyncio.sleep(random.uniform(self.backoff_min, ceiling))
            attempt += 1
            try:
                link = await self._open()
            except Exception as exc:  # refused, TLS, handshake (an HTTP answer), timeout
                log.info("reconnect to %s failed: %s", self.url, exc)
                continue
            if self._credentials is None:
                return
            try:
                await self._login(self._credentials)
                await self._resubscribe()
                for registration in self._registrations:
                    await self.request("core", "register", registration, "callback")
                return
            except (ApiError, ConnectionError, TimeoutError) as exc:
                log.warning("login again on %s failed: %s", self.url, exc)
                link.close()
                await link.wait_lost()
                await _run_hook(self.on_disconnect, f"logging in again failed: {exc}")

    # -- our requests ------------------------------------------------------------------------

    async def login(self, user: str, password: str, *, meta: Any = None,
                    session_id: str | None = None) -> dict[str, Any]:
        """Log in; the answer (`session_id`, `user`, …) is returned and kept for reconnects."""
        fields: dict[str, Any] = {"user": user, "password": password}
        if meta is not None:
            fields["meta"] = meta
        if session_id is not None:
            fields["session_id"] = session_id
        return await self._login(fields)

    async def _login(self, fields: dict[str, Any]) -> dict[str, Any]:
        reply = await self.request("core", "login", fields, "user")
        if not isinstance(reply, dict) or not isinstance(reply.get("session_id"), str):
            raise ApiError(ErrorCode.invalid_reply, "login")
        self.session_id = reply["session_id"]
        self.user = reply.get("user", fields["user"])
        # A reconnect takes over the same session id (§3.3), and so its subscriptions
        # when the service resumes sessions.
        self._credentials = {**fields, "session_id": self.session_id}
        return reply

    # -- events ------------------------------------------------------------------------------

    async def subscribe(self, class_: str, subclass: str = "*", type: str = "*",
                        obj_id: str = "*", *, body: Any = None,
                        service: str | None = None) -> None:
        """Subscribe to events (§5); `*` matches any value. Replayed after a reconnect."""
        keys = _event_keys(class_, subclass, type, obj_id, service)
        data = keys if body is None else {**keys, "body": body}
        await self.request("core", "subscribe", data, "event")
        self._subscriptions[_key_of(keys)] = data

    async def unsubscribe(self, class_: str, subclass: str = "*", type: str = "*",
                          obj_id: str = "*", *, service: str | None = None) -> None:
        """Remove the subscription with exactly these keys."""
        keys = _event_keys(class_, subclass, type, obj_id, service)
        self._subscriptions.pop(_key_of(keys), None)
        await self.request("core", "unsubscribe", keys, "event")

    async def send_event(self, class_: str, subclass: str = "*", type: str = "*",
                         obj_id: str = "*", *, body: Any = None,
                         service: str | None = None) -> None:
        """Publish an event (needs a service admin or a permission)."""
        keys = _event_keys(class_, subclass, type, obj_id, service)
        await self.request("core", "send", keys if body is None else {**keys, "body": body},
                           "event")

    async def _resubscribe(self) -> None:
        # A new connection is a new session unless the old one was still alive: subscribe
        # again (the same keys again only replace the body, so this is safe either way).
        for data in list(self._subscriptions.values()):
            await self.request("core", "subscribe", data, "event")

    # -- requests ------------------------------------------------------------------------------

    async def request(self, class_: str, cmd: str, data: Any = None,
                      subclass: str | None = None, *,
                      timeout: float | None = None) -> Any:
        """Send a request; return the ok answer's `data` (None when absent).

        Raises `ApiError` for an error answer, `TimeoutError` when no answer (or ack) came
        within `timeout` (default: `request_timeout`), `ConnectionError` when not connected
        or the connection drops first.
        """
        link = self._link
        if link is None or link.lost.done():
            raise ConnectionError(f"not connected to {self.url}")
        tid = self._next_tid
        self._next_tid += 1
        pending = _Pending(self.request_timeout if timeout is None else timeout)
        link.pending[tid] = pending
        pending.restart(pending.timeout)
        try:
            link.send(encode_request(tid, class_, cmd, data, subclass))
            return await pending.future
        finally:
            pending.cancel_timer()
            link.pending.pop(tid, None)

    def _answered(self, link: _Link, response: Response) -> None:
        pending = link.pending.pop(response.tid, None) if type(response.tid) is int else None
        if pending is None:
            log.debug("ignoring a response to unknown tid %r", response.tid)
        elif response.ok:
            pending.succeed(response.data)
        else:
            pending.fail(response.error())

    def _acked(self, link: _Link, ack: Ack) -> None:
        pending = link.pending.get(ack.tid) if type(ack.tid) is int else None
        if pending is None:
            log.debug("ignoring an ack of unknown tid %r", ack.tid)
        else:
            pending.restart(max(ACK_WINDOW, pending.timeout))

    # -- the server's requests ---------------------------------------------------------------

    def on_request(self, class_: str, cmd: str, handler: RequestHandler) -> None:
        """Answer the server's `class_`/`cmd` requests (any subclass) with `handler(data)`.

        The handler returns the reply data, or an awaitable of it; raising `ApiError` sends
        that error, any other exception `internal_error`. A handler still running after
        `ack_after` seconds gets the request acked, again every `ack_every` seconds.
        `core`/`ping` is answered ok without a handler; one may be set to watch the pings.
        `core`/`event` always goes to the event consumers (`on_event`, `events`).
        """
        self._handlers[(class_, cmd)] = handler

    async def register_callback(self, kind: str, handler: RequestHandler, *,
                                service: str | None = None, class_: str | None = None
                                ) -> None:
        """Serve a service's callbacks of `kind` (PROTOCOL.md §7): `login`, `subscribe`,
        `cmd` (for the requests of `class_`) or `event` (of `class_`, or of every class).

        `handler(data)` gets the callback request's data and returns the answer, e.g.
        `{"authorized": True}` for a login, or raises `ApiError` (a `cmd` callback's error
        goes to the user as is). It may be async: a slow one gets the request acked, as
        `on_request` says. One handler serves each kind (a `cmd` handler every class
        registered: `data["request"]["class"]` tells them apart). The client must be logged
        in as the global admin or the service's admin; the registration is made again
        after a reconnect.
        """
        registration: dict[str, Any] = {"callback": kind}
        if service is not None:
            registration["service"] = service
        if class_ is not None:
            registration["class"] = class_
        self.on_request("core", f"api_server_{kind}", handler)
        await self.request("core", "register", registration, "callback")
        self._registrations.append(registration)

    def on_event(self, callback: EventCallback) -> None:
        """Call `callback(event)` for each event the server delivers (§5.2)."""
        self._event_callbacks.append(callback)

    def events(self) -> EventStream:
        """An async iterator of the events delivered from now on; it ends when the client
        closes. Events queue up until read: iterate it, or `close()` it when done."""
        stream = EventStream(self._event_streams)
        self._event_streams.add(stream)
        return stream

    def _served(self, link: _Link, request: Request) -> None:
        data = request.data if request.data is not None else {}
        is_core = request.class_ == "core"
        if is_core and request.cmd == "event":
            link.send(encode_ok(request.tid))
            self._deliver(data)
            return
        handler = self._handlers.get((request.class_, request.cmd))
        if handler is None:
            if request.cmd == "event" or (is_core and request.cmd == "ping"):
                link.send(encode_ok(request.tid))  # every class must take events (seed rule)
            else:
                link.send(encode_error(request.tid,
                                       ApiError(ErrorCode.unknown_command, request.cmd)))
            return
        try:
            result = handler(data)
            if inspect.isawaitable(result):
                link.spawn(self._answer_later(link, request, result))
                return
            reply = encode_ok(request.tid, result)  # raises on data JSON cannot carry
        except Exception as exc:
            reply = encode_error(request.tid, _as_api_error(exc, request))
        link.send(reply)

    async def _answer_later(self, link: _Link, request: Request, work: Awaitable[Any]) -> None:
        loop = asyncio.get_running_loop()
        timer: asyncio.TimerHandle | None = None

        def ack() -> None:
            nonlocal timer
            link.send(encode_ack(request.tid))
            timer = loop.call_later(self.ack_every, ack)

        timer = loop.call_later(self.ack_after, ack)
        try:
            reply = encode_ok(request.tid, await work)
        except Exception as exc:
            reply = encode_error(request.tid, _as_api_error(exc, request))
        finally:
            timer.cancel()
        link.send(reply)

    def _deliver(self, event: Any) -> None:
        for callback in self._event_callbacks:
            try:
                callback(event)
            except Exception:
                log.exception("event callback failed")
        for stream in self._event_streams:
            stream.put(event)

    # -- input -------------------------------------------------------------------------------

    def _received(self, link: _Link, raw: bytes) -> None:
        try:
            message = decode(raw)
        except BadMessage as bad:
            error = _untagged_error(raw)
            if error is None:
                log.warning("ignoring a bad message from %s (%s): %.200r", self.url,
                            bad.error.name, raw)
            elif error.code == CONNECTION_CLOSED:
                link.reason = error.text  # the server's last line says why it closes (§1.3)
            else:  # e.g. our bytes were not JSON, or too large: nothing to match it with
                log.warning("the server reported an error about no request: %s", error.text)
            return
        if type(message) is Request:
            self._served(link, message)
        elif type(message) is Response:
            self._answered(link, message)
        else:
            assert type(message) is Ack
            self._acked(link, message)


def _event_keys(class_: str, subclass: str, type_: str, obj_id: str, service: str | None
                ) -> dict[str, Any]:
    keys = {"class": class_, "subclass": subclass, "type": type_, "obj_id": obj_id}
    return keys if service is None else {**keys, "service": service}


def _key_of(keys: dict[str, Any]) -> tuple[str, ...]:
    return tuple(keys.get(name) or "" for name in ("service", "class", "subclass", "type",
                                                   "obj_id"))


def _untagged_error(raw: bytes) -> ApiError | None:
    """An error response with `tid: null` (§1.4, §1.3), which `decode` refuses, or None."""
    try:
        message = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if (isinstance(message, dict) and message.get("result") == "error"
            and "tid" in message and message["tid"] is None):
        return ApiError.from_wire(message.get("data"))
    return None


async def _run_hook(hook: Callable[..., Awaitable[None] | None] | None, *args: Any) -> None:
    if hook is None:
        return
    try:
        result = hook(*args)
        if result is not None:
            await result
    except Exception:
        log.exception("%s hook failed", getattr(hook, "__name__", "a"))


def _as_api_error(exc: Exception, request: Request) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    log.error("handler of %s/%s failed", request.class_, request.cmd, exc_info=exc)
    return ApiError(ErrorCode.internal_error)


class _Link:
    """One connection: a transport `Peer` that feeds the client while it is current."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._transport: Transport | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.pending: dict[int, _Pending] = {}  # our requests sent on this connection
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.reason: str | None = None  # why it ended, when the server or transport said

    def connection_made(self, transport: Transport) -> None:
        self._transport = transport

    def message_received(self, data: bytes) -> None:
        if not self.lost.done():
            self._client._received(self, data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost.done():
            return
        if self.reason is None and exc is not None:
            self.reason = str(exc) or type(exc).__name__
        self.lost.set_result(None)
        pending, self.pending = self.pending, {}
        for entry in pending.values():
            entry.fail(ConnectionError(self.reason or "connection lost"))
        # A handler's answer has nowhere to go now: the server forgot the request.
        for task in self._tasks:
            task.cancel()
        self._client._connection_lost(self)

    def send(self, data: bytes) -> None:
        if self._transport is not None and not self.lost.done():
            self._transport.send(data)

    def close(self) -> None:
        if self._transport is not None and not self.lost.done():
            self._transport.close()

    async def wait_lost(self) -> None:
        # Shielded: a waiter that is cancelled must not mark the connection as lost.
        await asyncio.shield(self.lost)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class _Pending:
    """One of our requests: its future and its deadline timer."""

    __slots__ = ("_timer", "future", "timeout")

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._timer: asyncio.TimerHandle | None = None

    def restart(self, delay: float) -> None:
        self.cancel_timer()
        self._timer = asyncio.get_running_loop().call_later(
            delay, self.fail, TimeoutError(f"no answer within {delay:g} s"))

    def cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def succeed(self, data: Any) -> None:
        if not self.future.done():
            self.future.set_result(data)

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)


_END = object()


class EventStream:
    """Events from `Client.events()`, in arrival order."""

    def __init__(self, registry: set[EventStream]) -> None:
        self._registry = registry
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._ended = False

    def put(self, event: Any) -> None:
        if not self._ended:
            self._queue.put_nowait(event)

    def close(self) -> None:
        """Stop receiving; iteration ends after the events already queued."""
        if not self._ended:
            self._ended = True
            self._registry.discard(self)
            self._queue.put_nowait(_END)

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Any:
        event = await self._queue.get()
        if event is _END:
            self._queue.put_nowait(_END)  # stay ended for later calls
            raise StopAsyncIteration
        return event


def call(url: str, class_: str, cmd: str, data: Any = None, *, subclass: str | None = None,
         user: str | None = None, password: str | None = None,
         ssl: ssl_module.SSLContext | None = None, timeout: float = 30.0) -> Any:
    """For scripts: connect, log in when `user` is given, make one request, close."""

    async def run() -> Any:
        async with Client(url, ssl=ssl, request_timeout=timeout) as client:
            if user is not None:
                await client.login(user, password or "")
            return await client.request(class_, cmd, data, subclass)

    return asyncio.run(run())
