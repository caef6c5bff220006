"""Bare echo servers: the ceilings that nkservice is compared with.

    python bench/echo_servers.py {tcp|picows|websockets|fanout} PORT

Each one does the least a server of that library can do per message, so the gap between
it and nkservice is the cost of nkservice's own work (JSON, dispatch, sessions):
- tcp: an asyncio Protocol that splits the stream into lines and writes each line back
  with its own write() (one write per message, as a per-message server must);
- picows: each frame's payload sent back as one text frame;
- websockets: ``async for msg in ws: await ws.send(msg)`` on the asyncio implementation;
- fanout (picows): the ceiling of the event fan-out. Connections to `/pub` are publishers,
  all others subscribers. Each message from a publisher makes it write one event frame to
  every subscriber (the bytes nkservice delivers, with a per-connection tid counting up),
  then answer the publisher ok; the subscribers' answers are read and dropped.
All run under uvloop and stop on SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Callable
from typing import cast

import picows
import uvloop
from eventmsgs import EVENT, PAD
from oslimits import raise_nofile_limit
from websockets.asyncio.server import ServerConnection, serve

HOST = "127.0.0.1"


class LineEcho(asyncio.Protocol):
    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._pending = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        assert self._transport is not None
        lines = (self._pending + data).split(b"\n") if self._pending else data.split(b"\n")
        # The last piece is an incomplete line (empty when data ended with "\n").
        self._pending = lines.pop()
        write = self._transport.write
        for line in lines:
            write(line + b"\n")


class FrameEcho(picows.WSListener):
    def on_ws_frame(self, transport: picows.WSTransport, frame: picows.WSFrame) -> None:
        if frame.msg_type == picows.WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()
        elif frame.msg_type in (picows.WSMsgType.TEXT, picows.WSMsgType.BINARY):
            transport.send(frame.msg_type, frame.get_payload_as_memoryview())


class FanoutSubscriber(picows.WSListener):
    def __init__(self, subscribers: set[FanoutSubscriber]) -> None:
        self._subscribers = subscribers
        self.transport: picows.WSTransport | None = None
        self.next_tid = 1

    def on_ws_connected(self, transport: picows.WSTransport) -> None:
        self.transport = transport
        self._subscribers.add(self)

    def on_ws_frame(self, transport: picows.WSTransport, frame: picows.WSFrame) -> None:
        if frame.msg_type == picows.WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()
        # Anything else is an answer to an event: read, and dropped.

    def on_ws_disconnected(self, transport: picows.WSTransport) -> None:
        self._subscribers.discard(self)


class FanoutPublisher(picows.WSListener):
    def __init__(self, subscribers: set[FanoutSubscriber]) -> None:
        self._subscribers = subscribers

    def on_ws_frame(self, transport: picows.WSTransport, frame: picows.WSFrame) -> None:
        if frame.msg_type == picows.WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()
            return
        payload = frame.get_payload_as_bytes()
        start = payload.index(b'"tid":') + 6  # the publish's tid, for the answer
        tid = payload[start : payload.index(b",", start)]
        text = picows.WSMsgType.TEXT
        for sub in self._subscribers:
            tid_n = sub.next_tid
            sub.next_tid = tid_n + 1
            assert sub.transport is not None
            sub.transport.send(text, EVENT % (tid_n, 0, PAD))
        transport.send(text, b'{"result":"ok","tid":%b}' % tid)


def _fanout_route(subscribers: set[FanoutSubscriber]) -> Callable[..., picows.WSListener]:
    def route(request: picows.WSUpgradeRequest) -> picows.WSListener:
        if request.path == b"/pub":
            return FanoutPublisher(subscribers)
        return FanoutSubscriber(subscribers)

    return route


async def _websockets_echo(ws: ServerConnection) -> None:
    async for message in ws:
        await ws.send(message)


async def _serve(kind: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set_result, None)
    if kind == "websockets":
        # compression=None: the load generator never offers permessage-deflate anyway, and
        # this keeps the reference honest if a client ever does.
        async with serve(_websockets_echo, HOST, port, compression=None, backlog=4096):
            await stop
        return
    if kind == "tcp":
        server = await loop.create_server(LineEcho, HOST, port, backlog=4096)
    elif kind == "fanout":
        server = await picows.ws_create_server(
            _fanout_route(set()), HOST, port, backlog=4096, use_aiofastnet=False
        )
    else:
        # use_aiofastnet=False: serve on uvloop's transport, the I/O path nkservice uses
        # (it builds picows's protocol over loop.create_server).
        server = await picows.ws_create_server(
            lambda _request: FrameEcho(), HOST, port, backlog=4096, use_aiofastnet=False
        )
    async with server:
        await stop


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("kind", choices=["tcp", "picows", "websockets", "fanout"])
    parser.add_argument("port", type=int)
    args = parser.parse_args()
    raise_nofile_limit()
    uvloop.run(_serve(args.kind, args.port))


if __name__ == "__main__":
    main()
