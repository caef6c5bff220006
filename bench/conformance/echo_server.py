"""The conformance harness's echo server: nkservice's own WebSocket transport — the picows
adapter (`nkservice.transport.picows_adapter`) and `MessageListener` with every check it
makes — with an echo in the place of the protocol `Connection`: each message goes back
whole, as text or binary like it came. Not a mode of the node: the Autobahn TestSuite
checks WebSocket behaviour with an echo, and the node answers JSON only.

    .venv/bin/python bench/conformance/echo_server.py PORT [MAX_MESSAGE_SIZE]
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Callable
from typing import Any

import uvloop
from picows import WSFrame, WSMsgType, WSTransport

from nkservice.protocol.connection import CloseCode, Goodbye, Limits
from nkservice.transport.websocket import MessageListener, websocket_protocol_factory

HOST = "127.0.0.1"
# Autobahn's largest messages (cases 9.1.6, 9.2.6) are 16 MiB.
DEFAULT_MAX_MESSAGE_SIZE = 32 * 1024 * 1024


class EchoListener(MessageListener):
    """`MessageListener`, remembering whether the message in progress is text or binary."""

    kind = WSMsgType.TEXT

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind is WSMsgType.TEXT or kind is WSMsgType.BINARY:
            self.kind = kind
        super().on_ws_frame(transport, frame)

    def echo(self, message: bytes) -> None:
        self._flush()
        assert self._ws is not None
        self._ws.send(self.kind, message)


class EchoConnection:
    """What `MessageListener` needs of a `Connection`, answering each message with itself."""

    def __init__(self, wire: EchoListener, limits: Limits) -> None:
        self.limits = limits
        self.closed = False
        self._wire = wire

    def receive(self, raw: bytes) -> None:
        if not self.closed:
            self._wire.echo(raw)

    def message_too_large(self) -> None:
        if not self.closed:
            self._wire.close(Goodbye(CloseCode.too_large, "message too large"))
            self.lost()

    def on_timer(self) -> None:
        pass

    def lost(self) -> None:
        self.closed = True


async def serve(listen_port: int, max_message_size: int) -> None:
    limits = Limits(max_message_size=max_message_size)

    def accept(wire: Any, clock: Callable[[], float], transport: str, host: str,
               port: int) -> Any:
        return EchoConnection(wire, limits)

    factory = websocket_protocol_factory(accept, "ws", ["/"], lambda: max_message_size,
                                         listener=EchoListener)
    server = await asyncio.get_running_loop().create_server(factory, HOST, listen_port)
    print(f"echo server on ws://{HOST}:{listen_port}/", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    port = int(sys.argv[1])
    size = int(sys.argv[2]) if len(sys.argv) > 2 else DEFAULT_MAX_MESSAGE_SIZE
    with contextlib.suppress(KeyboardInterrupt):  # SIGINT: the harness is done
        uvloop.run(serve(port, size))


if __name__ == "__main__":
    main()
