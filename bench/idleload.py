"""The load generator of the cluster section's idle sessions, run as its own process.

    python bench/idleload.py idle --port P --source 127.0.0.2 --conns 12500
    python bench/idleload.py admin --port P --workers 8

Both print one JSON line once set up, then run the commands the orchestrator writes on
stdin (one JSON object a line), answering each with one JSON line ({"error": ...} when it
failed); {"op": "close"} (or EOF) closes every connection and ends the process.

- idle: `conns` WebSocket sessions, every one from the source address `source` (a
  127.0.0.x address: loopback only; several processes on several addresses, so that the
  (source address, source port) pairs suffice for 100,000 connections to one port).
  {"op": "connect"}: connect and log in all of them (`core`/`login` as the admin, no
  session id: the server chooses one, kept here), `concurrency` at a time;
  {"op": "count"}: how many are still open;
  {"op": "storm", "pause": 0}: drop all of them at once (a reset, SO_LINGER 0: no FIN, no
  TIME_WAIT), wait `pause` seconds (none by default), then reconnect each and log in
  with its session id, `concurrency` at a time; a failed attempt is tried again after
  RETRY_PAUSE, up to RETRIES times.
- admin: tcp connections to the core service logged in as the global admin, one per
  worker process (told apart by the `process` of the admin's `core ping` answer), each
  sending `core ping` one at a time every INTERVAL seconds. {"op": "mark", "phase": NAME}
  ends the current phase, answering its latencies (a ping still unanswered counts with its
  age), and starts the next.

The client is minimal on purpose, so that 12,500 sessions cost a process little: an asyncio
protocol per connection (uvloop), the WebSocket handshake and framing written here (client
frames masked with the all-zero key, as in bench/eventclients.py), no object per message,
nothing kept per session but its transport and its session id. Every phase has a deadline;
the process always ends by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import os
import socket
import struct
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import orjson
import uvloop
from oslimits import raise_nofile_limit

HOST = "127.0.0.1"
LOGIN_TID = 1
PING_TID0 = 2
RETRIES = 5  # attempts after the first, for one connection
RETRY_PAUSE = 0.2
INTERVAL = 0.05  # seconds between an admin's pings
COMMAND_WAIT = 1800.0  # the longest the orchestrator may leave us waiting for a command
_WS_KEY = base64.b64encode(b"nkservice-bench!").decode()
_WS_ACCEPT = base64.b64encode(
    hashlib.sha1((_WS_KEY + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
_LINGER_RESET = struct.pack("ii", 1, 0)
_IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # Linux
_CLOSE_FRAME = b"\x88\x80\x00\x00\x00\x00"  # a masked close frame without a payload
_HANDSHAKE, _LOGIN, _IDLE, _CLOSED = range(4)


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.buffer.write(orjson.dumps(obj) + b"\n")
    sys.stdout.flush()


def masked(payload: bytes, opcode: int = 0x1) -> bytes:
    """A client frame (FIN) carrying `payload`, masked with the zero key."""
    size = len(payload)
    first = 0x80 | opcode
    if size < 126:
        header = bytes((first, 0x80 | size))
    elif size < 1 << 16:
        header = bytes((first, 0x80 | 126)) + size.to_bytes(2, "big")
    else:
        header = bytes((first, 0x80 | 127)) + size.to_bytes(8, "big")
    return header + b"\x00\x00\x00\x00" + payload


def login_request(session_id: str | None) -> bytes:
    data: dict[str, str] = {"user": "admin", "password": "admin"}
    if session_id is not None:
        data["session_id"] = session_id
    return orjson.dumps({"class": "core", "cmd": "login", "tid": LOGIN_TID, "data": data})


def _percentile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _summary(latencies: list[float]) -> dict[str, float | None]:
    ordered = sorted(latencies)
    return {
        "p50_ms": None if not ordered else 1000 * ordered[len(ordered) // 2],
        "p99_ms": None if not ordered else 1000 * (_percentile(ordered, 0.99) or 0.0),
        "max_ms": None if not ordered else 1000 * ordered[-1],
    }


# -- idle WebSocket sessions ------------------------------------------------------------------


class WsSession(asyncio.Protocol):
    """One WebSocket connection: handshake, login, then idle (server requests answered)."""

    __slots__ = ("_buf", "_login", "_port", "answer", "load", "state", "transport")

    def __init__(self, load: IdleLoad, login: bytes, answer: asyncio.Future[dict[str, Any]]
                 ) -> None:
        self.load = load
        self._login = login
        self._port = load.port
        self.answer = answer
        self.transport: asyncio.Transport | None = None
        self._buf = b""
        self.state = _HANDSHAKE

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(
            b"GET / HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
            % (HOST.encode(), self._port, _WS_KEY.encode()))

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        if self.state == _HANDSHAKE:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self._buf = buf
                return
            head = buf[:end]
            if not head.startswith(b"HTTP/1.1 101") or _WS_ACCEPT not in head:
                self._fail(f"handshake refused: {head[:200]!r}")
                return
            buf = buf[end + 4:]
            self.state = _LOGIN
            assert self.transport is not None
            self.transport.write(masked(self._login))
        out: list[bytes] = []
        pos, size = 0, len(buf)
        while size - pos >= 2:
            first, second = buf[pos], buf[pos + 1] & 0x7F
            header = 2
            if second == 126:
                header = 4
                if size - pos < header:
                    break
                second = int.from_bytes(buf[pos + 2:pos + 4], "big")
            elif second == 127:
                header = 10
                if size - pos < header:
                    break
                second = int.from_bytes(buf[pos + 2:pos + 10], "big")
            end = pos + header + second
            if end > size:
                break
            self._frame(first & 0x0F, buf[pos + header:end], out)
            pos = end
            if self.state == _CLOSED:
                return
        self._buf = buf[pos:] if pos < size else b""
        if out and self.transport is not None:
            self.transport.write(b"".join(out))

    def _frame(self, opcode: int, payload: bytes, out: list[bytes]) -> None:
        if opcode in (0x1, 0x2):
            msg = orjson.loads(payload)
            if "cmd" in msg and "tid" in msg:  # a request of the server (an event, a ping)
                self.load.server_requests += 1
                out.append(masked(b'{"result":"ok","tid":%b}' % orjson.dumps(msg["tid"])))
            elif self.state == _LOGIN and msg.get("tid") == LOGIN_TID and "result" in msg:
                data = msg.get("data")
                if msg["result"] == "ok" and isinstance(data, dict) and "session_id" in data:
                    self.state = _IDLE
                    if not self.answer.done():
                        self.answer.set_result(data)
                else:
                    self._fail(f"login refused: {payload[:200]!r}")
        elif opcode == 0x8:  # close: answer it, then let go
            out.append(_CLOSE_FRAME)
            self.load.closed_by_server += 1
            assert self.transport is not None
            self.transport.write(b"".join(out))
            out.clear()
            self.transport.close()
            self.state = _CLOSED
        elif opcode == 0x9:  # ping
            out.append(masked(payload, 0xA))

    def _fail(self, why: str) -> None:
        if not self.answer.done():
            self.answer.set_exception(ConnectionError(why))
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state == _IDLE and not self.load.dropping:
            self.load.dropped += 1
        self.state = _CLOSED
        if not self.answer.done():
            self.answer.set_exception(ConnectionError(
                f"closed before the login answer ({exc or 'EOF'})"))

    def reset(self) -> None:
        """Drop the connection at once: a reset, no FIN (no TIME_WAIT on either side)."""
        transport = self.transport
        if transport is None or self.state == _CLOSED:
            return
        with contextlib.suppress(OSError):
            transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        transport.abort()


class IdleLoad:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.port: int = args.port
        self.sessions: list[WsSession | None] = [None] * args.conns
        self.session_ids: list[str | None] = [None] * args.conns
        self.dropping = False  # the storm's own resets are not drops
        self.dropped = 0  # sessions that ended while idle, not by us
        self.closed_by_server = 0
        self.server_requests = 0

    async def _open(self, index: int, session_id: str | None) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[dict[str, Any]] = loop.create_future()
        login = login_request(session_id)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            # The source port is chosen at connect(), for the whole 4-tuple: a bind() to
            # port 0 would search for a port free on its own, which gets slower with every
            # port taken (most of the load generator's time went there, in the kernel).
            sock.setsockopt(socket.SOL_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((self.args.source, 0))
            sock.setblocking(False)
            await loop.sock_connect(sock, (HOST, self.port))
            transport, session = await loop.create_connection(
                lambda: WsSession(self, login, answer), sock=sock)
        except BaseException:
            sock.close()
            raise
        try:
            data = await answer
        except BaseException:
            transport.abort()
            raise
        assert isinstance(session, WsSession)
        self.sessions[index] = session
        return data

    async def _run(self, resume: bool) -> dict[str, Any]:
        """Connect and log in every session, `concurrency` at a time."""
        args = self.args
        latencies: list[float] = []
        failures: list[str] = []
        counts = {"retries": 0, "resumed": 0, "other_id": 0}
        indexes = iter(range(args.conns))

        async def one(index: int) -> None:
            wanted = self.session_ids[index] if resume else None
            for attempt in range(RETRIES + 1):
                t0 = time.perf_counter()
                try:
                    data = await asyncio.wait_for(self._open(index, wanted), args.timeout)
                except Exception as exc:  # tried again, then counted
                    if attempt == RETRIES:
                        failures.append(f"{type(exc).__name__}: {exc}")
                        return
                    counts["retries"] += 1
                    await asyncio.sleep(RETRY_PAUSE)
                    continue
                latencies.append(time.perf_counter() - t0)
                if resume:
                    counts["resumed"] += bool(data.get("resumed"))
                    counts["other_id"] += data["session_id"] != wanted
                else:
                    self.session_ids[index] = data["session_id"]
                return

        async def runner() -> None:
            for index in indexes:
                await one(index)

        t0 = time.perf_counter()
        runners = [asyncio.ensure_future(runner()) for _ in range(args.concurrency)]
        _done, pending = await asyncio.wait(runners, timeout=args.phase_timeout)
        for task in pending:
            task.cancel()
        seconds = time.perf_counter() - t0
        if pending:
            failures.append(f"unfinished after {args.phase_timeout:g} s")
        return {
            "sessions": len(latencies),
            "failed": args.conns - len(latencies),
            "first_failure": failures[0] if failures else None,
            "seconds": seconds,
            "ended_at": time.time(),
            **counts,
            **_summary(latencies),
        }

    async def connect(self) -> dict[str, Any]:
        return await self._run(resume=False)

    async def storm(self, pause: float) -> dict[str, Any]:
        """Drop every session, wait `pause` seconds (0: reconnect at once), reconnect."""
        self.dropping = True
        t0 = time.perf_counter()
        for session in self.sessions:
            if session is not None:
                session.reset()
        self.sessions = [None] * self.args.conns
        drop_seconds = time.perf_counter() - t0
        await asyncio.sleep(pause)
        self.dropping = False
        result = await self._run(resume=True)
        result["drop_seconds"] = drop_seconds
        return result

    def count(self) -> dict[str, Any]:
        open_now = sum(1 for s in self.sessions if s is not None and s.state == _IDLE)
        return {"open": open_now, "dropped": self.dropped,
                "closed_by_server": self.closed_by_server,
                "server_requests": self.server_requests}

    async def aclose(self) -> None:
        self.dropping = True
        for session in self.sessions:
            if session is not None:
                session.reset()
        await asyncio.sleep(0)


# -- admins' pings ----------------------------------------------------------------------------


class AdminLine(asyncio.Protocol):
    """A tcp connection logged in as the global admin, pinging one request at a time."""

    def __init__(self, pinger: Pinger) -> None:
        self.pinger = pinger
        self.transport: asyncio.Transport | None = None
        self._pending = b""
        self.process: str | None = None
        self.ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.sent_at: float | None = None  # the ping in flight, if any
        self._tid = PING_TID0
        self.closed = False
        self.discarded = False  # a second connection to a process already covered

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(login_request(None) + b"\n")

    def data_received(self, data: bytes) -> None:
        lines = (self._pending + data).split(b"\n")
        self._pending = lines.pop()
        for line in lines:
            if line.strip():
                self._message(orjson.loads(line))

    def _message(self, msg: dict[str, Any]) -> None:
        if "cmd" in msg and "tid" in msg:  # a request of the server
            assert self.transport is not None
            self.transport.write(orjson.dumps({"result": "ok", "tid": msg["tid"]}) + b"\n")
            return
        if "result" not in msg:
            return
        if msg.get("tid") == LOGIN_TID:
            if msg["result"] != "ok":
                self.ready.set_exception(ConnectionError(f"admin login refused: {msg!r}"))
                return
            self.ping()
            return
        if msg["result"] != "ok":
            self.pinger.errors += 1
        elif self.process is None:
            cluster = (msg.get("data") or {}).get("cluster") or {}
            self.process = str(cluster.get("process", "single"))
            if not self.ready.done():
                self.ready.set_result(self.process)
        elif self.sent_at is not None:
            self.pinger.record(self.process, time.perf_counter() - self.sent_at)
        self.sent_at = None

    def ping(self) -> None:
        if self.transport is None or self.closed or self.sent_at is not None:
            return
        self._tid += 1
        self.sent_at = time.perf_counter()
        self.transport.write(b'{"class":"core","cmd":"ping","tid":%d}\n' % self._tid)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"admin connection lost: {exc}"))
        elif not self.pinger.closing and not self.discarded:
            self.pinger.lost += 1


class Pinger:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.lines: list[AdminLine] = []
        self.closing = False
        self.errors = 0
        self.lost = 0
        self.phase = "start"
        self.latencies: list[float] = []
        self.by_process: dict[str, float] = {}
        self._ticker: asyncio.Task[None] | None = None

    async def setup(self) -> dict[str, Any]:
        """One admin connection per worker process, found by trying (SO_REUSEPORT decides)."""
        loop = asyncio.get_running_loop()
        seen: set[str] = set()
        attempts = 0
        while len(seen) < self.args.workers and attempts < self.args.attempts:
            attempts += 1
            _, line = await loop.create_connection(lambda: AdminLine(self), HOST, self.args.port)
            assert isinstance(line, AdminLine)
            process = await asyncio.wait_for(line.ready, 10.0)
            if process in seen:
                line.discarded = True
                assert line.transport is not None
                line.transport.close()
                continue
            seen.add(process)
            self.lines.append(line)
        self._ticker = asyncio.ensure_future(self._tick())
        return {"processes": sorted(seen), "attempts": attempts}

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(INTERVAL)
            for line in self.lines:
                line.ping()

    def record(self, process: str | None, seconds: float) -> None:
        self.latencies.append(seconds)
        key = process or "?"
        if seconds > self.by_process.get(key, 0.0):
            self.by_process[key] = seconds

    def mark(self, phase: str) -> dict[str, Any]:
        now = time.perf_counter()
        for line in self.lines:  # a ping still unanswered counts with its age
            if line.sent_at is not None:
                self.record(line.process, now - line.sent_at)
        result = {
            "phase": self.phase,
            "pings": len(self.latencies),
            "late": sum(1 for s in self.latencies if s > 1.0),
            "errors": self.errors,
            "lost": self.lost,
            "max_ms_by_process": {p: 1000 * s for p, s in sorted(self.by_process.items())},
            **_summary(self.latencies),
        }
        self.phase, self.latencies, self.by_process = phase, [], {}
        self.errors = 0
        return result

    async def aclose(self) -> None:
        self.closing = True
        if self._ticker is not None:
            self._ticker.cancel()
        for line in self.lines:
            if line.transport is not None:
                line.transport.close()
        await asyncio.sleep(0.1)


# -- the command loop -------------------------------------------------------------------------


async def _commands(handle: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        try:
            line = await asyncio.wait_for(reader.readline(), COMMAND_WAIT)
        except TimeoutError:
            return
        command = orjson.loads(line) if line.strip() else {"op": "close"}
        if command["op"] == "close":
            return
        try:
            _emit(await handle(command))
        except Exception as exc:  # reported to the orchestrator
            _emit({"error": f"{type(exc).__name__}: {exc}"})


async def _idle(args: argparse.Namespace) -> None:
    load = IdleLoad(args)
    _emit({"ready": True, "source": args.source, "conns": args.conns})

    async def handle(command: dict[str, Any]) -> dict[str, Any]:
        op = command["op"]
        if op == "connect":
            return await load.connect()
        if op == "storm":
            return await load.storm(float(command.get("pause", 0.0)))
        if op == "count":
            return load.count()
        raise ValueError(f"unknown op {op!r}")

    try:
        await _commands(handle)
    finally:
        await load.aclose()
    _emit({"closed": True, **load.count()})


async def _admin(args: argparse.Namespace) -> None:
    pinger = Pinger(args)
    try:
        _emit(await asyncio.wait_for(pinger.setup(), args.phase_timeout))
    except Exception as exc:
        _emit({"error": f"admin setup: {type(exc).__name__}: {exc}"})
        return

    async def handle(command: dict[str, Any]) -> dict[str, Any]:
        if command["op"] == "mark":
            return pinger.mark(command["phase"])
        raise ValueError(f"unknown op {command['op']!r}")

    try:
        await _commands(handle)
    finally:
        await pinger.aclose()
    _emit({"closed": True})


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=["idle", "admin"])
    parser.add_argument("--port", type=int, required=True, help="ws port (idle), tcp (admin)")
    parser.add_argument("--source", default=HOST, help="idle: the source address (127.0.0.x)")
    parser.add_argument("--conns", type=int, default=1000, help="idle: sessions")
    parser.add_argument("--concurrency", type=int, default=100, help="idle: connects at once")
    parser.add_argument("--timeout", type=float, default=20.0, help="idle: one connect+login")
    parser.add_argument("--phase-timeout", type=float, default=600.0,
                        help="bound on connecting all (idle) or on finding the workers (admin)")
    parser.add_argument("--workers", type=int, default=1, help="admin: processes to cover")
    parser.add_argument("--attempts", type=int, default=100,
                        help="admin: connections tried to cover them")
    return parser.parse_args()


def main() -> None:
    args = _parse_args()
    raise_nofile_limit()
    uvloop.run(_idle(args) if args.mode == "idle" else _admin(args))
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
