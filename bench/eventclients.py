"""Load-generator WebSocket connections for the event sections (picows, callbacks only).

One class serves as subscriber and as publisher. As a subscriber it answers every event
`{"result":"ok","tid":<the event's tid>}` as the protocol requires, and counts it in a
`Tally` shared by all the connections of the process. It is built to cost the load
generator as little as possible per event, so that 10,000 subscribers in one process on
one core do not limit the figures:

- an event in the form nkservice (and the ceiling server) writes it is recognised by its
  prefix and its tid sliced out as bytes; it is not parsed. Anything else is parsed with
  orjson and handled in general;
- client frames are masked with the all-zero key, so a frame is a header and the payload
  as is (RFC 6455 asks clients for unpredictable keys, against proxy cache poisoning; a
  server cannot tell, and unmasks the same way whatever the key);
- everything one read calls for goes out in a single write.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import orjson
import picows
from clients import masked_text_header
from eventmsgs import LOGIN, LOGIN_TID

HOST = "127.0.0.1"
CLOSE_TIMEOUT = 2.0
READ_BUFFER = 4096  # small: 10,000 idle connections stay cheap; picows grows it on demand
EVENT_PREFIX = b'{"class":"core","cmd":"event","tid":'
_PREFIX_LEN = len(EVENT_PREFIX)
# A masked text frame (zero key) holding {"result":"ok","tid":<tid>}: %c is 0x80 | length.
_ANSWER = b'\x81%c\x00\x00\x00\x00{"result":"ok","tid":%b}'
_ANSWER_LEN = len(b'{"result":"ok","tid":}')
_TEXT, _BINARY, _CLOSE = picows.WSMsgType.TEXT, picows.WSMsgType.BINARY, picows.WSMsgType.CLOSE


def masked(payload: bytes) -> bytes:
    """A client text frame carrying `payload`, masked with the zero key."""
    return masked_text_header(len(payload)) + b"\x00\x00\x00\x00" + payload


class Tally:
    """Events received by all the subscribers of the process, and a wait for a count."""

    __slots__ = ("count", "reached_ns", "target", "waiter")

    def __init__(self) -> None:
        self.count = 0
        self.target = -1
        self.reached_ns = 0
        self.waiter: asyncio.Future[None] | None = None

    def expect(self, more: int) -> asyncio.Future[None]:
        """A future done (and `reached_ns` set) when `more` further events have arrived."""
        self.target = self.count + more
        self.waiter = asyncio.get_running_loop().create_future()
        return self.waiter

    def reached(self) -> None:
        self.reached_ns = time.perf_counter_ns()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


class EventClient(picows.WSListener):
    def __init__(self, tally: Tally) -> None:
        self.tally = tally
        self._write: Callable[[bytes], None] | None = None
        self._transport: picows.WSTransport | None = None
        self._out: list[bytes] = []
        self.pending = 0  # our requests not answered yet
        self.ok = 0
        self.errors = 0
        self.first_error: str | None = None
        self.server_requests = 0  # requests other than events (e.g. pings)
        self.closed = False
        # Called on each answer to our requests; what it returns is sent (a publish window).
        self.on_answer: Callable[[], bytes | None] | None = None
        self._idle: asyncio.Future[None] | None = None
        self._login_sent = False
        self.login: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

    # -- picows callbacks ---------------------------------------------------------------------

    def on_ws_connected(self, transport: picows.WSTransport) -> None:
        self._transport = transport
        self._write = transport.underlying_transport.write

    def on_ws_frame(self, transport: picows.WSTransport, frame: picows.WSFrame) -> None:
        kind = frame.msg_type
        if kind in (_TEXT, _BINARY):
            payload = frame.get_payload_as_bytes()
            if payload.startswith(EVENT_PREFIX):
                tid = payload[_PREFIX_LEN : payload.index(b",", _PREFIX_LEN)]
                self._out.append(_ANSWER % (0x80 | (_ANSWER_LEN + len(tid)), tid))
                tally = self.tally
                tally.count += 1
                if tally.count == tally.target:
                    tally.reached()
            else:
                answer = self._other(payload)
                if answer is not None:
                    self._out.append(answer)
        elif kind == _CLOSE:
            if not transport.is_close_frame_sent:
                transport.send_close(frame.get_close_code())
            transport.disconnect()
            return
        if frame.last_in_buffer and self._out:
            assert self._write is not None
            self._write(b"".join(self._out))
            self._out = []

    def on_ws_disconnected(self, transport: picows.WSTransport) -> None:
        self.closed = True
        if self._login_sent and not self.login.done():
            self.login.set_exception(ConnectionError("closed before the login answer"))
        if self._idle is not None and not self._idle.done():
            self._idle.set_exception(ConnectionError("closed with requests unanswered"))

    # -- messages -----------------------------------------------------------------------------

    def _other(self, payload: bytes) -> bytes | None:
        """A message that is not an event in the expected form: handled in general."""
        msg = orjson.loads(payload)
        if "class" in msg and "cmd" in msg and "tid" in msg:
            if msg["cmd"] == "event":
                tally = self.tally
                tally.count += 1
                if tally.count == tally.target:
                    tally.reached()
            else:
                self.server_requests += 1
            return masked(orjson.dumps({"result": "ok", "tid": msg["tid"]}))
        if "result" not in msg:
            return None  # an ack
        self.pending -= 1
        if msg["result"] == "ok":
            self.ok += 1
        else:
            self.errors += 1
            if self.first_error is None:
                self.first_error = payload.decode(errors="replace")[:300]
        if msg.get("tid") == LOGIN_TID and not self.login.done():
            data = msg.get("data") or {}
            if msg["result"] == "ok" and isinstance(data, dict) and "session_id" in data:
                self.login.set_result(data)
            else:
                self.login.set_exception(ConnectionError(f"login refused: {msg!r}"))
        if self.on_answer is not None:
            following = self.on_answer()
            if following is not None:
                self.pending += 1
                return masked(following)
        if not self.pending and self._idle is not None and not self._idle.done():
            self._idle.set_result(None)
        return None

    def start_login(self) -> None:
        self._login_sent = True
        self.request([LOGIN])

    def request(self, messages: list[bytes]) -> None:
        """Send requests (all in one write); their answers are counted in ok/errors."""
        assert self._write is not None
        self.pending += len(messages)
        self._write(b"".join([masked(m) for m in messages]))

    async def wait_idle(self, timeout: float) -> None:
        """Until every request sent so far is answered."""
        if self.pending:
            self._idle = asyncio.get_running_loop().create_future()
            await asyncio.wait_for(self._idle, timeout)

    async def aclose(self) -> None:
        """The closing handshake, so that servers see a normal close and log no error."""
        transport = self._transport
        if transport is None or self.closed:
            return
        transport.send_close(picows.WSCloseCode.OK)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(transport.wait_disconnected(), CLOSE_TIMEOUT)
        transport.disconnect(graceful=False)


async def open_client(
    port: int, tally: Tally, *, path: str = "/", login: bool, subscribe: list[bytes], timeout: float
) -> EventClient:
    """Connect; unless `login` is false (the ceiling server), log in as the admin; then send
    the `subscribe` requests pipelined and wait until all are answered ok."""
    _, client = await picows.ws_connect(
        lambda: EventClient(tally),
        f"ws://{HOST}:{port}{path}",
        read_buffer_init_size=READ_BUFFER,
        use_aiofastnet=False,
    )
    assert isinstance(client, EventClient)
    try:
        if login:
            client.start_login()
            await asyncio.wait_for(client.login, timeout)
        if subscribe:
            client.request(subscribe)
            await client.wait_idle(timeout)
        if client.errors:
            raise ConnectionError(f"refused: {client.first_error}")
    except BaseException:
        await client.aclose()
        raise
    return client
