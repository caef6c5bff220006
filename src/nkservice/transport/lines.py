"""The `tcp` and `tls` transports: newline-delimited JSON over a stream (PROTOCOL.md §2)."""

from __future__ import annotations

import asyncio
from typing import cast

from nkservice.protocol.connection import Connection, Goodbye
from nkservice.protocol.framing import LineFramer, MessageTooLarge
from nkservice.transport.base import Accept, WakeUps, peer_address


class LineProtocol(asyncio.Protocol):
    """Newline framing. What one read brings about, or one turn of the event loop (events,
    callback requests, answers that came later), is written together in one system call,
    not one call per message: pipelining clients and fan-outs send many."""

    __slots__ = ("_accept", "_batch", "_call_soon", "_conn", "_framer", "_key", "_paused",
                 "_scheme", "_transport", "_wake_ups")

    def __init__(self, accept: Accept, scheme: str) -> None:
        self._accept = accept
        self._scheme = scheme
        self._transport: asyncio.Transport | None = None
        self._conn: Connection | None = None
        self._framer: LineFramer | None = None
        self._wake_ups: WakeUps | None = None
        self._key = 0
        self._batch: list[bytes] | None = None  # a list while a read is being handled
        self._paused = False  # the socket's send buffer is over its high-water mark

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self._transport = cast(asyncio.Transport, transport)
        wake_ups = self._wake_ups = WakeUps.of(asyncio.get_running_loop())
        self._call_soon = wake_ups.call_soon
        self._key = wake_ups.new_key()
        host, port = peer_address(transport)
        self._conn = self._accept(self, wake_ups.clock, self._scheme, host, port)
        self._framer = LineFramer(self._conn.limits.max_message_size)

    def data_received(self, data: bytes) -> None:
        assert self._conn is not None and self._framer is not None
        try:
            messages = self._framer.feed(data)
        except MessageTooLarge:
            self._conn.message_too_large()
            return
        receive = self._conn.receive
        if self._batch is None:
            self._batch = []
        try:
            for message in messages:
                receive(message)
        finally:
            self._flush()

    def _flush(self) -> None:
        batch, self._batch = self._batch, None
        if batch and self._transport is not None:
            self._transport.write(b"".join(batch))

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        # Let go of the connection (it points back here: a cycle) and of the transport.
        conn, self._conn = self._conn, None
        self._transport = self._framer = self._batch = None
        if self._wake_ups is not None:
            self._wake_ups.cancel(self._key)
        if conn is not None:
            conn.lost()

    # -- Wire --------------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        batch = self._batch
        if batch is None:  # outside a read: written at the end of this turn of the loop
            self._batch = batch = []
            self._call_soon(self._flush)
        batch += (data, b"\n")

    def close(self, goodbye: Goodbye) -> None:
        if self._transport is None:  # gone already
            return
        self.send(goodbye.line)  # the last line says why (§1.3)
        self._flush()
        self._transport.close()

    def backlog(self) -> int:
        # Asked for at every event sent: only look once the transport has said it is full.
        if not self._paused or self._transport is None:
            return 0
        return self._transport.get_write_buffer_size()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False

    def wake_at(self, when: float) -> None:
        if self._wake_ups is not None and self._transport is not None:  # not once lost
            self._wake_ups.wake_at(self._key, self, when)

    def on_timer(self) -> None:
        if self._conn is not None:
            self._conn.on_timer()
