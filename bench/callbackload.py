"""The load generator of the callbacks section, run as its own process (one core) by bench/run.py.

    python bench/callbackload.py login --port P --core-port C --apps K --conns 50 ...
    python bench/callbackload.py roundtrip --port P --core-port C --apps K --request bench ...

Everything is tcp (newline-delimited JSON) on 127.0.0.1. The apps (external server-side
apps, docs/protocol.md §12) live in this process: each is a connection to the core service,
logged in as the global admin, that registers a callback of the `demo` service and answers
every callback request at once (`api_server_login`: `{"authorized": true}`;
`api_server_cmd`: ok, no data). They are part of the load, on the load generator's core.

`login`: with `--apps` apps registered for `login` (0: the static `users` table decides),
`--conns` loops each open a tcp connection, send the login of the static user, wait for its
answer, half-close (FIN) and wait for the server to close its side (so the server's whole
work for a session, teardown included, is inside the loop); then the next connection.
Reported: logins answered ok per second.

`roundtrip`: with `--apps` apps registered for `cmd` of class `bench`, `--conns` sessions
(the static user) each keep `--window` requests in flight, each answer sending the next:
`--request ping` is `core`/`ping`, `--request bench` is `{"class":"bench","cmd":"run"}`,
answered by the `cmd` callback app or by the service's Lua script.

Both connect and log in, warm up, measure, then close everything cleanly (users first, then
the apps, so that no callback is in flight when an app goes), and print one JSON line.
Every phase has a deadline; the process always ends by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import sys
import time
from collections.abc import Callable
from typing import Any, cast

import orjson
import uvloop
from clients import CLOSE_TIMEOUT, Session, TcpClient
from cpuwatch import Period
from oslimits import raise_nofile_limit

HOST = "127.0.0.1"
ADMIN_LOGIN = b'{"class":"core","cmd":"login","tid":0,"data":{"user":"admin","password":"admin"}}'
# The static user of the bench services (callbacks.py writes it into their `users`).
USER, PASSWORD = "bench", "bench"
USER_LOGIN = orjson.dumps(
    {"class": "core", "cmd": "login", "tid": 0, "data": {"user": USER, "password": PASSWORD}}
)
REQUESTS = {
    "ping": b'{"class":"core","cmd":"ping","tid":%d}',
    "bench": b'{"class":"bench","cmd":"run","tid":%d}',
}
CALLBACK_CLASS = "bench"


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.buffer.write(orjson.dumps(obj) + b"\n")
    sys.stdout.flush()


# -- the apps --------------------------------------------------------------------------------


class App(asyncio.Protocol):
    """An external app: logs in on the core service, registers, answers callbacks at once."""

    def __init__(self, registrations: list[dict[str, Any]]) -> None:
        self._registrations = registrations
        self._transport: asyncio.WriteTransport | None = None
        self._pending = b""
        self._unanswered = 1 + len(registrations)  # the login and the registrations
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.ended = asyncio.Event()
        self.closed = False
        self.callbacks = 0  # callback requests answered
        self.other_requests = 0  # any other request from the server (e.g. a ping)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.WriteTransport, transport)
        lines = [ADMIN_LOGIN]
        for tid, data in enumerate(self._registrations, 1):
            lines.append(
                orjson.dumps({"class": "core", "cmd": "register_callback", "tid": tid,
                              "data": data})
            )
        self._transport.write(b"\n".join(lines) + b"\n")

    def data_received(self, data: bytes) -> None:
        lines = (self._pending + data).split(b"\n") if self._pending else data.split(b"\n")
        self._pending = lines.pop()
        out = [answer for line in lines if line.strip() and (answer := self._on_message(line))]
        if out and self._transport is not None:
            self._transport.write(b"\n".join(out) + b"\n")  # one write per read

    def _on_message(self, line: bytes) -> bytes | None:
        msg = orjson.loads(line)
        if "result" in msg:  # the answer to our login or to a registration
            if msg["result"] != "ok" and not self.ready.done():
                self.ready.set_exception(ConnectionError(f"app setup refused: {msg!r}"))
            self._unanswered -= 1
            if not self._unanswered and not self.ready.done():
                self.ready.set_result(None)
            return None
        if "cmd" not in msg:
            return None  # an ack
        tid = orjson.dumps(msg["tid"])
        cmd = msg["cmd"]
        if cmd == "api_server_login":
            self.callbacks += 1
            return b'{"result":"ok","tid":%b,"data":{"authorized":true}}' % tid
        if cmd == "api_server_cmd":
            self.callbacks += 1
        else:
            self.other_requests += 1
        return b'{"result":"ok","tid":%b}' % tid

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.ended.set()
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("app connection closed during setup"))

    async def aclose(self) -> None:
        if self._transport is None or self.closed:
            return
        self._transport.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.ended.wait(), CLOSE_TIMEOUT)
        if not self.closed:
            self._transport.abort()


async def _open_apps(args: argparse.Namespace, registration: dict[str, Any]) -> list[App]:
    loop = asyncio.get_running_loop()
    apps: list[App] = []
    try:
        for _ in range(args.apps):
            _, app = await asyncio.wait_for(
                loop.create_connection(lambda: App([registration]), HOST, args.core_port),
                args.connect_timeout,
            )
            apps.append(app)
            await asyncio.wait_for(app.ready, args.connect_timeout)
    except BaseException:
        await asyncio.gather(*(app.aclose() for app in apps))
        raise
    return apps


# -- logins ----------------------------------------------------------------------------------


class LoginTally:
    __slots__ = ("errors", "first_error", "ok", "running")

    def __init__(self) -> None:
        self.ok = 0
        self.errors = 0
        self.first_error: str | None = None
        self.running = True


class LoginConn(asyncio.Protocol):
    """One login: send it on connect; on its answer, FIN; done when the server has closed."""

    __slots__ = ("_answered", "_buffer", "_done", "_tally", "_transport")

    def __init__(self, tally: LoginTally, done: asyncio.Future[None]) -> None:
        self._tally = tally
        self._done = done
        self._buffer = b""
        self._answered = False
        self._transport: asyncio.WriteTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.WriteTransport, transport)
        self._transport.write(USER_LOGIN + b"\n")

    def data_received(self, data: bytes) -> None:
        if self._answered:
            return
        self._buffer += data
        end = self._buffer.find(b"\n")
        if end < 0:
            return
        self._answered = True
        msg = orjson.loads(self._buffer[:end])
        tally = self._tally
        data_ = msg.get("data")
        if msg.get("result") == "ok" and isinstance(data_, dict) and "session_id" in data_:
            tally.ok += 1
        else:
            tally.errors += 1
            if tally.first_error is None:
                tally.first_error = self._buffer[:end].decode(errors="replace")[:300]
        assert self._transport is not None
        self._transport.write_eof()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._done.done():
            self._done.set_result(None)


async def _login_loop(port: int, tally: LoginTally, failures: list[str]) -> None:
    loop = asyncio.get_running_loop()
    while tally.running:
        done: asyncio.Future[None] = loop.create_future()
        try:
            await loop.create_connection(functools.partial(LoginConn, tally, done), HOST, port)
        except OSError as exc:
            failures.append(f"connect: {type(exc).__name__}: {exc}")
            if len(failures) > 100:
                return
            await asyncio.sleep(0.01)
            continue
        await done


async def logins(args: argparse.Namespace) -> dict[str, Any]:
    apps = await _open_apps(args, {"service": args.service, "callback": "login"})
    tally = LoginTally()
    failures: list[str] = []
    tasks = [asyncio.create_task(_login_loop(args.port, tally, failures))
             for _ in range(args.conns)]
    await asyncio.sleep(args.warmup)
    ok0, errors0, callbacks0 = tally.ok, tally.errors, sum(a.callbacks for a in apps)
    period = Period(args.server_pid)
    t0 = time.perf_counter()
    await asyncio.sleep(args.duration)
    elapsed = time.perf_counter() - t0
    figures = period.finish()
    ok, errors = tally.ok - ok0, tally.errors - errors0
    callbacks = sum(a.callbacks for a in apps) - callbacks0
    per_app = [a.callbacks for a in apps]
    tally.running = False
    _done, stuck = await asyncio.wait(tasks, timeout=args.phase_timeout)
    for task in stuck:
        task.cancel()
    dropped_apps = sum(a.closed for a in apps)
    await asyncio.gather(*(app.aclose() for app in apps))
    if failures and not ok:
        raise SystemExit(f"callbackload: no login succeeded; first failure: {failures[0]}")
    return {
        "count": ok,
        "seconds": elapsed,
        "rate": ok / elapsed,
        "errors": errors,
        "first_error": tally.first_error,
        "connect_failures": len(failures),
        "first_connect_failure": failures[0] if failures else None,
        "stuck": len(stuck),
        # Over the measured period: each login (ok or refused) asks an app once.
        "callbacks": callbacks,
        "expected_callbacks": (ok + errors) if apps else 0,
        "per_app": per_app,
        "server_requests": sum(a.other_requests for a in apps),
        "disconnected": dropped_apps,
        **figures,
    }


# -- round trips -----------------------------------------------------------------------------


class UserSession(Session):
    """clients.Session, logging in as the bench user and sending `template` requests."""

    def __init__(self, send: Callable[[list[bytes]], None], template: bytes) -> None:
        super().__init__(send, echo=False)
        self._template = template

    def start_login(self) -> None:
        self._send([USER_LOGIN])

    def _next_ping(self) -> bytes:
        tid = self._next_tid
        self._next_tid = tid + 1
        self.in_flight += 1
        return self._template % tid


class UserClient(TcpClient):
    def __init__(self, template: bytes) -> None:
        super().__init__(echo=False)
        self.session = UserSession(self._write, template)


async def _open_user(args: argparse.Namespace, template: bytes) -> UserClient:
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(lambda: UserClient(template), HOST, args.port)
    client.session.start_login()
    try:
        await asyncio.wait_for(client.session.login, args.connect_timeout)
    except BaseException:
        await client.aclose()
        raise
    return client


async def roundtrips(args: argparse.Namespace) -> dict[str, Any]:
    registration = {"service": args.service, "callback": "cmd", "class": CALLBACK_CLASS}
    apps = await _open_apps(args, registration)
    template = REQUESTS[args.request]
    results = await asyncio.gather(
        *(asyncio.wait_for(_open_user(args, template), args.phase_timeout)
          for _ in range(args.conns)),
        return_exceptions=True,
    )
    users = [r for r in results if isinstance(r, UserClient)]
    failed = [r for r in results if not isinstance(r, UserClient)]
    if failed:
        await asyncio.gather(*(u.aclose() for u in users))
        await asyncio.gather(*(a.aclose() for a in apps))
        raise SystemExit(f"callbackload: {len(failed)} of {args.conns} sessions failed;"
                         f" first: {failed[0]!r}")
    sessions = [u.session for u in users]
    for session in sessions:
        session.start(args.window)
    await asyncio.sleep(args.warmup)
    replies0 = sum(s.replies for s in sessions)
    errors0 = sum(s.errors for s in sessions)
    callbacks0 = sum(a.callbacks for a in apps)
    period = Period(args.server_pid)
    t0 = time.perf_counter()
    await asyncio.sleep(args.duration)
    elapsed = time.perf_counter() - t0
    figures = period.finish()
    replies = sum(s.replies for s in sessions) - replies0
    errors = sum(s.errors for s in sessions) - errors0
    callbacks = sum(a.callbacks for a in apps) - callbacks0
    per_app = [a.callbacks for a in apps]
    dropped = sum(s.closed for s in sessions) + sum(a.closed for a in apps)
    await asyncio.gather(*(u.aclose() for u in users))  # waits for the requests in flight
    await asyncio.gather(*(a.aclose() for a in apps))
    return {
        "count": replies,
        "seconds": elapsed,
        "rate": replies / elapsed,
        "errors": errors,
        "first_error": None,
        # Approximate: a callback answered just before the period's end is counted here,
        # its user's reply just after (at most one window's worth).
        "callbacks": callbacks,
        "expected_callbacks": (replies + errors) if apps else 0,
        "per_app": per_app,
        "server_requests": sum(s.server_requests for s in sessions)
        + sum(a.other_requests for a in apps),
        "disconnected": dropped,
        **figures,
    }


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=["login", "roundtrip"])
    parser.add_argument("--port", type=int, required=True, help="the users' service port (tcp)")
    parser.add_argument("--core-port", type=int, required=True, help="the apps' port (tcp)")
    parser.add_argument("--service", default="demo", help="the service the apps register for")
    parser.add_argument("--apps", type=int, default=0, help="app connections registered")
    parser.add_argument("--request", choices=sorted(REQUESTS), default="ping")
    parser.add_argument("--conns", type=int, default=50)
    parser.add_argument("--window", type=int, default=32, help="requests in flight per session")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--connect-timeout", type=float, default=10.0)
    parser.add_argument("--phase-timeout", type=float, default=30.0)
    parser.add_argument("--server-pid", type=int, default=0)
    return parser.parse_args()


def main() -> None:
    args = _parse_args()
    raise_nofile_limit()
    result = uvloop.run(logins(args) if args.mode == "login" else roundtrips(args))
    _emit(result)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
