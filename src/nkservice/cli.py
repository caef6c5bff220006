"""The `nkservice` command: run a node, call a server, hash a password."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import signal
import ssl
import sys
from pathlib import Path
from typing import Any

import uvloop

from nkservice import __version__
from nkservice.errors import ApiError
from nkservice.node import Node
from nkservice.service.config import ConfigError, NodeConfig, load_config
from nkservice.service.passwords import hash_password
from nkservice.transport.websocket import PICOWS_LOGGER

log = logging.getLogger("nkservice")

DESCRIPTION = """\
nkservice serves the NkSERVICE External API: JSON requests, events and callbacks over
TCP, TLS, WebSocket and secure WebSocket.

  nkservice serve                         run a node on the embedded default: the core
                                          (admin) service on ws://127.0.0.1:9010/ and
                                          tcp://127.0.0.1:9010, user admin / password admin
  nkservice serve --config node.toml      run a node from a config file (see docs/config.md)
  nkservice call ws://127.0.0.1:9010/ core user list --user admin --password admin
                                          log in, send one request, print the answer as JSON
  nkservice listen ws://127.0.0.1:9010/ --user admin --password admin \
      --subscribe core/session            print events as JSON lines until Ctrl-C
  nkservice hash-password                 print a scrypt hash to put in a config file
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nkservice", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"nkservice {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser("serve", help="run a node (Ctrl-C or SIGTERM stops it cleanly)")
    serve.add_argument("--config", type=Path, metavar="FILE",
                       help="node config (TOML); without it, the embedded default")
    serve.add_argument("--log-level", default="info",
                       choices=["debug", "info", "warning", "error"])

    call = commands.add_parser(
        "call", help="send one request and print the answer as JSON",
        description="Connect to URL, log in (with --user), send CLASS [SUBCLASS] CMD with "
                    "--data, print the answer's data as JSON. Exit 0 on ok; on an error "
                    "answer print it to stderr and exit 1.")
    _add_connection_options(call)
    call.add_argument("words", nargs="+", metavar="CLASS [SUBCLASS] CMD",
                      help="e.g. `core ping` or `core user list`")
    call.add_argument("--data", default="{}", help="the request's data, as JSON")
    call.add_argument("--user", help="log in as this user first")
    call.add_argument("--password", help="the user's password (asked for if --user is given)")

    listen = commands.add_parser(
        "listen", help="subscribe and print events as JSON lines until interrupted",
        description="Connect to URL, log in, subscribe, and print every event received as "
                    "one JSON line, until Ctrl-C. Reconnects (and subscribes again) when the "
                    "connection drops.")
    _add_connection_options(listen)
    listen.add_argument("--subscribe", action="append", default=[], required=True,
                        metavar="CLASS[/SUBCLASS[/TYPE[/OBJ_ID]]]",
                        help="what to receive; `*` or a left-out part matches anything; "
                             "repeat for more")
    listen.add_argument("--user", required=True)
    listen.add_argument("--password", help="asked for when not given")

    hashing = commands.add_parser("hash-password", help="print a scrypt hash of a password")
    hashing.add_argument("password", nargs="?", help="asked for when not given")

    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args.config, args.log_level)
    if args.command == "call":
        return _call(args)
    if args.command == "listen":
        return _listen(args)
    if args.command == "hash-password":
        print(hash_password(args.password or getpass.getpass("password: ")))
        return 0
    parser.print_help()
    return 2


def _serve(config_path: Path | None, level: str) -> int:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: "
                                                    "%(message)s")
    if level != "debug":  # picows says INFO at every connect and disconnect: noise at scale
        logging.getLogger(PICOWS_LOGGER).setLevel(logging.WARNING)
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(f"nkservice: bad config: {exc}", file=sys.stderr)
        return 2
    try:
        uvloop.run(_run_node(config))
    except (ConfigError, OSError) as exc:
        print(f"nkservice: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


async def _run_node(config: NodeConfig) -> None:
    if config.workers > 1:
        log.warning("workers = %d: several workers need the cluster bus, which is not "
                    "available yet; running one worker", config.workers)
    node = Node(config)
    await node.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    log.info("node started; Ctrl-C or SIGTERM stops it")
    await stopping.wait()
    log.info("stopping: closing listeners and sessions")
    await node.stop()
    log.info("stopped")


def _add_connection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", help="tcp://HOST:PORT, tls://…, ws://HOST:PORT/PATH or wss://…")
    parser.add_argument("--cafile", help="trust this CA (tls and wss)")
    parser.add_argument("--insecure", action="store_true",
                        help="do not verify the server certificate (tls and wss)")


def _tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    if not args.url.startswith(("tls:", "wss:")):
        return None
    context = ssl.create_default_context(cafile=args.cafile)
    if args.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _failed(command: str, exc: Exception) -> int:
    """Report a failed client command: an error answer as its JSON, else the reason."""
    if isinstance(exc, ApiError):
        print(json.dumps({"code": exc.code, "error": exc.text}), file=sys.stderr)
    else:
        print(f"nkservice {command}: {exc or type(exc).__name__}", file=sys.stderr)
    return 1


def _password(args: argparse.Namespace) -> str | None:
    if args.user and args.password is None:
        return getpass.getpass(f"password for {args.user}: ")
    password: str | None = args.password
    return password


def _listen(args: argparse.Namespace) -> int:
    from nkservice.client import Client

    subscriptions = []
    for spec in args.subscribe:
        parts = spec.split("/")
        if not parts[0] or len(parts) > 4:
            print(f"nkservice listen: bad --subscribe {spec!r}", file=sys.stderr)
            return 2
        subscriptions.append([*parts, *["*"] * (4 - len(parts))])
    password = _password(args)

    async def listen() -> None:
        async with Client(args.url, ssl=_tls_context(args), reconnect=True) as client:
            events = client.events()
            await client.login(args.user, password or "")
            for class_, subclass, type_, obj_id in subscriptions:
                await client.subscribe(class_, subclass or "*", type_ or "*", obj_id or "*")
            async for event in events:
                print(json.dumps(event), flush=True)

    try:
        asyncio.run(listen())
    except KeyboardInterrupt:
        return 0
    except (ApiError, OSError, TimeoutError) as exc:
        return _failed("listen", exc)
    return 0


def _call(args: argparse.Namespace) -> int:
    from nkservice.client import call

    if len(args.words) not in (2, 3):
        print("nkservice call: give CLASS CMD or CLASS SUBCLASS CMD", file=sys.stderr)
        return 2
    class_, *subclass, cmd = args.words
    try:
        data: Any = json.loads(args.data)
    except ValueError as exc:
        print(f"nkservice call: --data is not JSON: {exc}", file=sys.stderr)
        return 2
    try:
        answer = call(args.url, class_, cmd, data, subclass=subclass[0] if subclass else None,
                      user=args.user, password=_password(args), ssl=_tls_context(args))
    except (ApiError, OSError, TimeoutError) as exc:
        return _failed("call", exc)
    print(json.dumps({} if answer is None else answer, indent=2))  # no data means {} (§1.2)
    return 0
