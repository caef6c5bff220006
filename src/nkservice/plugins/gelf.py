"""Session logs as GELF 1.1 over UDP (PROTOCOL.md §8): `session`/`log` to Graylog.

Three parts, each usable alone:

- `gelf_message()` and `datagrams()`: pure functions from the fields of a `session`/`log`
  request to the GELF message, and from its JSON to the UDP datagrams that carry it;
- `GelfSender`: an asyncio UDP sender that never blocks and never raises into its caller;
- `GelfLog`: the link of a service's logic chain that answers `session`/`log` by sending GELF.

Decisions (docs/gelf.md says the same for operators):

- **Additional fields.** Each `meta` key becomes `_<key>`. GELF allows `^[\\w\\.\\-]*$` in
  field names (`\\w` in the ASCII sense, as Graylog's Java regexes read it): any other
  character of a key is replaced by `_` (what Graylog itself does to a bad key). A name taken
  twice keeps the value of the key that needed no rewriting, else of the first one. The
  empty key and `id` (`_id` is forbidden by the spec) are left out, and so are `user`,
  `session_id` and `service`: `_user`, `_session_id` and `_service` are the server's, never
  the client's. Values: strings and numbers as they are; `null` left out (GELF has no null);
  booleans, lists and objects as their compact JSON text (GELF allows only strings and
  numbers, and Graylog would skip a boolean).
- **Mandatory fields.** Graylog drops a message whose `host` is blank or whose
  `short_message` is empty, while the API accepts both (like the base): such a message is
  sent with the service's name as `host` and `-` as `short_message`.
- **Datagrams.** At most `CHUNK_SIZE` (8192) bytes each, the size the GELF documentation gives
  for UDP and what every receiver reads; a message that fits is sent as plain JSON, one
  datagram. A larger one is compressed with zlib (level 1: fast, and log text compresses well)
  and, if it still does not fit, split into chunks: `0x1e 0x0f`, an 8-byte random message id,
  the sequence number and the sequence count (one byte each), then at most
  `CHUNK_SIZE - 12` bytes of the payload. Compressing only what would not fit keeps the usual
  small message cheap and readable on the wire, and makes a large one need fewer chunks (one
  lost chunk loses the whole message). Compressing and chunking a large message runs in a
  worker thread, so a 1 MiB log never stalls the event loop.
- **Too large.** The spec says a message MUST NOT consist of more than 128 chunks: one that
  would is dropped whole, with a warning. It is not truncated: a payload cut short is not
  JSON, and receivers discard a message whose chunks are incomplete. (With compression and the
  default size that takes about 1 MB of incompressible text.)
- **Failures.** UDP needs no answer, so the sender answers nothing: an unresolvable host, a
  collector that does not listen (ICMP "port unreachable"), a full socket buffer, all lose
  messages, never raise, and are logged at most once per `quiet` seconds per cause (60 by
  default) with the count of what was left unsaid. An endpoint that could not be opened is
  tried again on a later message, at most every `retry` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import time
import zlib
from collections.abc import Callable, Mapping
from typing import Any, Protocol, cast

import orjson

from nkservice.errors import ConfigError
from nkservice.plugins.api import Plugin
from nkservice.protocol.messages import Request
from nkservice.protocol.names import canonical
from nkservice.service.commands import LogEntry
from nkservice.service.config import ServiceConfig
from nkservice.service.contracts import CONTINUE, Caller
from nkservice.service.logic import Link

log = logging.getLogger(__name__)

GELF_VERSION = "1.1"
DEFAULT_LEVEL = 6  # informational

CHUNK_SIZE = 8192
"""The largest datagram sent, header included."""
CHUNK_MAGIC = b"\x1e\x0f"
CHUNK_HEADER = len(CHUNK_MAGIC) + 8 + 1 + 1  # magic, message id, sequence number, count
MAX_CHUNKS = 128
MAX_DATAGRAM = 65507  # the largest UDP payload over IPv4
COMPRESS_LEVEL = 1

RESERVED = frozenset({"id", "user", "session_id", "service"})
_VALID_NAME = re.compile(r"[\w.\-]*", re.ASCII)
_BAD_CHARACTER = re.compile(r"[^\w.\-]", re.ASCII)


class TooManyChunks(ValueError):
    """A message that would need more than `MAX_CHUNKS` chunks: it is not sent."""


# -- the message -------------------------------------------------------------------------------


def field_value(value: Any) -> str | int | float | None:
    """A meta value as GELF takes it: a string or a number, None to leave the field out."""
    if value is None:
        return None
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        return value
    return orjson.dumps(value).decode()


def additional_fields(meta: Mapping[str, Any]) -> dict[str, str | int | float]:
    """Each usable meta key as a GELF additional field `_<key>` (see the module's text)."""
    fields: dict[str, str | int | float] = {}
    rewritten: list[tuple[str, Any]] = []
    for key, value in meta.items():
        if _VALID_NAME.fullmatch(key):
            _add(fields, key, value)
        else:
            rewritten.append((_BAD_CHARACTER.sub("_", key), value))
    for key, value in rewritten:
        if f"_{key}" not in fields:
            _add(fields, key, value)
    return fields


def _add(fields: dict[str, str | int | float], key: str, value: Any) -> None:
    if not key or key in RESERVED:
        return
    converted = field_value(value)
    if converted is not None:
        fields[f"_{key}"] = converted


def gelf_message(*, source: str, message: str, level: int = DEFAULT_LEVEL,
                 full_message: str = "", meta: Mapping[str, Any] | None = None, user: str,
                 session_id: str, service: str, timestamp: float) -> dict[str, Any]:
    """The GELF 1.1 message of a `session`/`log` request of `user`'s session `session_id`
    in `service`, logged at `timestamp` (seconds since the epoch)."""
    gelf: dict[str, Any] = {
        "version": GELF_VERSION,
        "host": source if source.strip() else service,
        "short_message": message or "-",
    }
    if full_message:
        gelf["full_message"] = full_message
    gelf["timestamp"] = round(timestamp, 3)  # GELF: seconds, decimals for milliseconds
    gelf["level"] = level
    gelf.update(additional_fields(meta or {}))
    gelf.update({"_user": user, "_session_id": session_id, "_service": service})
    return gelf


def encode(message: Mapping[str, Any]) -> bytes:
    """The JSON of a GELF message."""
    return orjson.dumps(message)


# -- datagrams ---------------------------------------------------------------------------------


def check_chunk_size(chunk_size: int) -> int:
    if not CHUNK_HEADER < chunk_size <= MAX_DATAGRAM:
        raise ValueError(f"GELF chunk size must be between {CHUNK_HEADER + 1} and "
                         f"{MAX_DATAGRAM} bytes, not {chunk_size}")
    return chunk_size


def chunks(payload: bytes, *, message_id: bytes, chunk_size: int = CHUNK_SIZE) -> list[bytes]:
    """`payload` as chunked GELF datagrams of at most `chunk_size` bytes each; raises
    `TooManyChunks` when that takes more than `MAX_CHUNKS`."""
    if len(message_id) != 8:
        raise ValueError("a GELF message id is 8 bytes")
    room = check_chunk_size(chunk_size) - CHUNK_HEADER
    count = max(1, math.ceil(len(payload) / room))
    if count > MAX_CHUNKS:
        raise TooManyChunks(f"{len(payload)} bytes would take {count} chunks of {chunk_size} "
                            f"bytes (GELF allows {MAX_CHUNKS})")
    head = CHUNK_MAGIC + message_id
    return [head + bytes((sequence, count)) + payload[sequence * room:(sequence + 1) * room]
            for sequence in range(count)]


def datagrams(payload: bytes, *, chunk_size: int = CHUNK_SIZE, compress: bool = True,
              message_id: bytes | None = None) -> list[bytes]:
    """The datagrams that carry the JSON `payload`: itself when it fits in one, else (zlib
    compressed when `compress`) itself or its chunks. Raises `TooManyChunks`."""
    if len(payload) <= check_chunk_size(chunk_size):
        return [payload]
    if compress:
        payload = zlib.compress(payload, COMPRESS_LEVEL)
        if len(payload) <= chunk_size:
            return [payload]
    return chunks(payload, message_id=message_id or os.urandom(8), chunk_size=chunk_size)


# -- the sender --------------------------------------------------------------------------------


class _Throttle:
    """A warning at most once per `interval` seconds, then how many were left unsaid."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last = -math.inf
        self._unsaid = 0

    def warn(self, text: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last < self.interval:
            self._unsaid += 1
            return
        if self._unsaid:
            text += " (%d more like it since the last report)"
            args = (*args, self._unsaid)
        log.warning(text, *args)
        self._last = now
        self._unsaid = 0

    def flush(self, what: str) -> None:
        if self._unsaid:
            log.warning("%d more %s since the last report", self._unsaid, what)
            self._unsaid = 0


class _Transport(Protocol):
    """What the sender uses of a datagram transport (asyncio's and uvloop's both have it)."""

    def sendto(self, data: bytes, addr: Any = None) -> None: ...

    def get_write_buffer_size(self) -> int: ...

    def close(self) -> None: ...


class _Endpoint(asyncio.DatagramProtocol):
    def __init__(self, sender: GelfSender) -> None:
        self.sender = sender
        self.transport: _Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(_Transport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        pass  # a collector never answers

    def error_received(self, exc: Exception) -> None:
        self.sender._unreachable(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.sender._lost(self, exc)


class GelfSender:
    """Sends GELF messages to the UDP collector at `host`:`port`.

    `start()` opens the endpoint (it does not raise when the collector cannot be reached);
    `send()` hands over one message and returns at once; `close()` ends it. Messages that
    cannot be sent are lost, as UDP loses them: see the module's text for what is logged.
    `sent` counts the messages handed to the socket (UDP cannot tell whether they arrived),
    `dropped` those the sender gave up on itself.
    """

    def __init__(self, host: str, port: int, *, chunk_size: int = CHUNK_SIZE,
                 compress: bool = True, retry: float = 5.0, quiet: float = 60.0,
                 max_buffer: int = 4 * 1024 * 1024, max_waiting: int = 256,
                 max_encoding: int = 16) -> None:
        if not 0 < port < 65536:
            raise ValueError(f"GELF port must be between 1 and 65535, not {port}")
        self.host = host
        self.port = port
        self.chunk_size = check_chunk_size(chunk_size)
        self.compress = compress
        self.retry = retry  # seconds between attempts to open the endpoint
        self.max_buffer = max_buffer  # bytes queued in the transport before dropping
        self.max_waiting = max_waiting  # messages kept while the endpoint opens
        self.max_encoding = max_encoding  # large messages in worker threads at once
        self.sent = 0
        self.dropped = 0
        self._endpoint: _Endpoint | None = None
        self._opening: asyncio.Task[None] | None = None
        self._next_open = -math.inf
        self._waiting: list[list[bytes]] = []
        self._encoding: set[asyncio.Future[list[bytes]]] = set()
        self._closed = False
        self._network = _Throttle(quiet)
        self._overload = _Throttle(quiet)
        self._too_large = _Throttle(quiet)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> None:
        """Open the endpoint: resolve the host, connect the UDP socket. A failure is logged,
        and retried on a later message."""
        if self._closed or self._endpoint is not None:
            return
        if self._opening is None:
            self._opening = asyncio.get_running_loop().create_task(self._open())
        opening = self._opening
        try:
            await asyncio.shield(opening)
        except asyncio.CancelledError:
            if not opening.cancelled():  # this start() was cancelled, not the opening
                raise

    def send(self, message: Mapping[str, Any]) -> None:
        """Send one GELF message (a dict such as `gelf_message()` builds), from the event
        loop's thread; never blocks, never raises."""
        if self._closed:
            self._drop(self._overload, "GELF sender for %s is closed: message dropped",
                       self.address)
            return
        try:
            payload = encode(message)
        except orjson.JSONEncodeError as exc:
            self._drop(self._overload, "GELF message cannot be encoded (%s): dropped", exc)
            return
        if len(payload) <= self.chunk_size:
            self._transmit([payload])
        else:
            self._split_later(payload, _describe(message))

    def close(self) -> None:
        """Stop sending; what is still waiting or being compressed is dropped."""
        if self._closed:
            return
        self._closed = True
        self.dropped += len(self._waiting) + len(self._encoding)
        self._waiting.clear()
        for future in self._encoding:
            future.cancel()
        if self._opening is not None:
            self._opening.cancel()
            self._opening = None
        endpoint, self._endpoint = self._endpoint, None
        if endpoint is not None and endpoint.transport is not None:
            endpoint.transport.close()
        self._network.flush("GELF network errors")
        self._overload.flush("GELF messages dropped")
        self._too_large.flush("GELF messages dropped for their size")

    # -- inside ------------------------------------------------------------------------------

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, endpoint = await loop.create_datagram_endpoint(
                lambda: _Endpoint(self), remote_addr=(self.host, self.port))
        except Exception as exc:  # OSError, mostly: no such host, no route
            self._opening = None
            self._next_open = time.monotonic() + self.retry
            self.dropped += len(self._waiting)
            self._waiting.clear()
            self._network.warn("GELF collector %s cannot be reached (%s): messages are lost",
                               self.address, exc)
            return
        self._opening = None
        if self._closed:
            assert endpoint.transport is not None
            endpoint.transport.close()
            return
        self._endpoint = endpoint
        waiting, self._waiting = self._waiting, []
        for message in waiting:
            self._transmit(message)

    def _split_later(self, payload: bytes, what: str) -> None:
        """Compress and chunk a large payload in a worker thread, then send it."""
        if len(self._encoding) >= self.max_encoding:
            self._drop(self._overload, "GELF sender is behind on large messages: %s dropped",
                       what)
            return
        future = asyncio.get_running_loop().run_in_executor(
            None, lambda: datagrams(payload, chunk_size=self.chunk_size, compress=self.compress))
        self._encoding.add(future)
        future.add_done_callback(lambda done: self._split(done, what))

    def _split(self, future: asyncio.Future[list[bytes]], what: str) -> None:
        self._encoding.discard(future)
        if future.cancelled():
            return
        exc = future.exception()
        if isinstance(exc, TooManyChunks):
            self._drop(self._too_large, "GELF %s dropped: %s", what, exc)
        elif exc is not None:
            self._drop(self._overload, "GELF %s dropped: %r", what, exc)
        elif not self._closed:
            self._transmit(future.result())

    def _transmit(self, message: list[bytes]) -> None:
        endpoint = self._endpoint
        if endpoint is None or endpoint.transport is None:
            self._wait_for_endpoint(message)
            return
        transport = endpoint.transport
        if transport.get_write_buffer_size() > self.max_buffer:
            self._drop(self._overload, "GELF collector %s cannot keep up: message dropped",
                       self.address)
            return
        try:
            for datagram in message:
                transport.sendto(datagram)
        except Exception as exc:  # the transport failing under us; it reports most errors
            self._drop(self._network, "GELF message to %s not sent (%s)", self.address, exc)
            return
        self.sent += 1

    def _wait_for_endpoint(self, message: list[bytes]) -> None:
        if self._opening is None and not self._closed and time.monotonic() >= self._next_open:
            self._opening = asyncio.get_running_loop().create_task(self._open())
        if self._opening is None:
            self._drop(self._network, "GELF collector %s cannot be reached: message dropped",
                       self.address)
        elif len(self._waiting) >= self.max_waiting:
            self._drop(self._overload, "GELF collector %s is not open yet: message dropped",
                       self.address)
        else:
            self._waiting.append(message)

    def _drop(self, throttle: _Throttle, text: str, *args: object) -> None:
        self.dropped += 1
        throttle.warn(text, *args)

    def _unreachable(self, exc: Exception) -> None:
        """An error the socket reported (ICMP port unreachable, mostly): the datagram it
        concerns is lost."""
        self._network.warn("GELF collector %s is not receiving (%s): messages are lost",
                           self.address, exc)

    def _lost(self, endpoint: _Endpoint, exc: Exception | None) -> None:
        if self._endpoint is endpoint:  # closed under us: open a new one for what follows
            self._endpoint = None
            if exc is not None:
                self._network.warn("GELF endpoint to %s failed (%s)", self.address, exc)


def _describe(message: Mapping[str, Any]) -> str:
    """Which message, for a log line: where it comes from, not what it says."""
    return (f"message from {message.get('host')!r} (user {message.get('_user')!r}, "
            f"service {message.get('_service')!r})")


# -- the link ----------------------------------------------------------------------------------


class GelfLog(Link):
    """Answers the core `session`/`log` requests (seed name `log`) by sending them as GELF
    to `sender`; every other request goes on down the chain. It reads the fields with the
    base's `LogEntry` (the same errors), and checks no permission: `log` is open to users."""

    def __init__(self, sender: GelfSender, *, clock: Callable[[], float] = time.time) -> None:
        self.sender = sender
        self._clock = clock

    async def start(self) -> None:
        await self.sender.start()

    def stop(self) -> None:
        self.sender.close()

    def command(self, caller: Caller, request: Request) -> Any:
        if (request.class_ != "core"
                or canonical(request.subclass, request.cmd) != ("session", "log")):
            return CONTINUE
        entry = LogEntry.of(request)  # the same checks and errors as the base's `log`
        self.sender.send(gelf_message(
            source=entry.source, message=entry.message, level=entry.level,
            full_message=entry.full_message, meta=entry.meta, user=caller.user,
            session_id=caller.session_id, service=caller.service.name,
            timestamp=self._clock()))
        return None


class GelfPlugin(Plugin):
    """`plugins = ["gelf"]`: session logs go to the service's `gelf = {host, port}`."""

    name = "gelf"

    def link(self, service: ServiceConfig, settings: Any) -> Link:
        where = service.table
        if not service.gelf.host:
            raise ConfigError(f"{where}.gelf.host", "the gelf plugin needs the collector's host")
        try:
            sender = GelfSender(service.gelf.host, service.gelf.port)
        except ValueError as exc:
            raise ConfigError(f"{where}.gelf.port", str(exc)) from exc
        return GelfLog(sender)
