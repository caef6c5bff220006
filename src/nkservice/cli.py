"""The `nkservice` command: run a node, call a server, manage its services, listen to events,
hash a password.

No traceback reaches a user: every failure is one line on stderr (an error answer of the
server is that answer as one JSON line), with a non-zero exit status: 1 when the command
failed, 2 for a usage mistake, 130 after Ctrl-C (`listen` ends with 0 on Ctrl-C: that is
how it is meant to stop).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import errno
import getpass
import json
import logging
import math
import os
import re
import resource
import signal
import socket
import ssl
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import urlsplit

import uvloop
from pythonjsonlogger.json import JsonFormatter

from nkservice import __version__
from nkservice.errors import ApiError, ConfigError, ServerError
from nkservice.node import Node
from nkservice.protocol.names import canonical
from nkservice.service.config import NodeConfig, load_config
from nkservice.service.passwords import hash_password
from nkservice.transport.websocket import PICOWS_LOGGER
from nkservice.workers import StartFailure, Supervisor, check_workers, ready_signal

if TYPE_CHECKING:
    from nkservice.client import Client

log = logging.getLogger("nkservice")

SCHEMES = ("tcp", "tls", "ws", "wss")
DEFAULT_TIMEOUT = 30.0
INTERRUPTED = 130  # the shell's status for a command ended by SIGINT (128 + 2)

DESCRIPTION = """\
nkservice serves the NkSERVICE External API: JSON requests, events and callbacks over
TCP, TLS, WebSocket and secure WebSocket.

  nkservice serve                         run a node on the embedded default: the core
                                          (admin) service on ws://127.0.0.1:9010/ and
                                          tcp://127.0.0.1:9010, user admin / password admin
  nkservice serve --config node.toml      run a node from a config file (see docs/config.md)
  nkservice call ws://127.0.0.1:9010/ core ping
                                          send one request, print the answer as JSON
  nkservice call ws://127.0.0.1:9010/ core user list --user admin --password admin
                                          log in first (asked for on a terminal if left out)
  nkservice services create ws://127.0.0.1:9010/ demo.toml --user admin --password admin
                                          start a service at run time; also list, get,
                                          update, stop (see `nkservice services --help`)
  nkservice listen ws://127.0.0.1:9010/ --user admin --password admin \\
      --subscribe core/session            print events as JSON lines until Ctrl-C
  nkservice hash-password                 print a scrypt hash to put in a config file

Every failure is one line on stderr and a non-zero exit status.
"""


class _Failure(Exception):
    """A failure to report as one line on stderr: `nkservice COMMAND: message`, or the
    message alone when `bare` (an error answer of the server, as its JSON)."""

    def __init__(self, message: str, status: int = 1, *, bare: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.bare = bare


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors on one line too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        print("nkservice: give a command: serve, call, listen, services or hash-password (see "
              "`nkservice --help`)", file=sys.stderr)
        return 2
    try:
        return int(_COMMANDS[args.command](args))
    except _Failure as failure:
        line = failure.message if failure.bare else f"nkservice {args.command}: {failure.message}"
        print(line, file=sys.stderr, flush=True)
        return failure.status
    except KeyboardInterrupt:
        return INTERRUPTED
    except BrokenPipeError:  # whoever read our output is gone (`| head`): nothing to say
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:  # a bug; still one line (`--verbose` logs more where it exists)
        print(f"nkservice {args.command}: internal error: {type(exc).__name__}: {exc} "
              "(please report it)", file=sys.stderr, flush=True)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nkservice", description=DESCRIPTION,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"nkservice {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser("serve", help="run a node (Ctrl-C or SIGTERM stops it cleanly)")
    serve.add_argument("--config", type=Path, metavar="FILE",
                       help="node config (TOML); without it, the embedded default")
    serve.add_argument("--log-level", default="info",
                       choices=["debug", "info", "warning", "error"])
    serve.add_argument("--workers", type=_workers_count, metavar="N",
                       help="run N worker processes sharing the node's ports (default: the "
                            "config's node.workers, else 1)")
    # How the supervisor of a node with workers starts each of them (src/nkservice/workers.py).
    serve.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--cluster", help=argparse.SUPPRESS)
    serve.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)

    call = commands.add_parser(
        "call", help="send one request and print the answer as JSON",
        usage="%(prog)s [options] URL CLASS [SUBCLASS] CMD",
        description="Connect to URL, log in, send CLASS [SUBCLASS] CMD with --data, print the "
                    "answer's data as JSON. `core ping` needs no login; anything else logs "
                    "in with --user and --password, asked for when left out and stdin is a "
                    "terminal. Exit 0 on ok; on an error answer print it to stderr as JSON "
                    "and exit 1; any other failure is one line on stderr.")
    _add_connection_options(call)
    call.add_argument("words", nargs="+", metavar="CLASS [SUBCLASS] CMD",
                      help="e.g. `core ping` or `core user list`")
    call.add_argument("--data", default="{}", help="the request's data, as JSON")
    _add_login_options(call)

    _add_services_parser(commands)

    listen = commands.add_parser(
        "listen", help="subscribe and print events as JSON lines until interrupted",
        usage="%(prog)s [options] URL --subscribe CLASS[/SUBCLASS[/TYPE[/OBJ_ID]]] ...",
        description="Connect to URL, log in, subscribe, and print every event received as "
                    "one JSON line on stdout, until Ctrl-C. When the connection drops it "
                    "says so on stderr, reconnects, logs in and subscribes again, and says "
                    "so again.")
    _add_connection_options(listen)
    listen.add_argument("--subscribe", action="append", default=[], required=True,
                        metavar="CLASS[/SUBCLASS[/TYPE[/OBJ_ID]]]",
                        help="what to receive; `*` or a left-out part matches anything; "
                             "repeat for more")
    _add_login_options(listen)

    hashing = commands.add_parser(
        "hash-password", help="print a scrypt hash of a password",
        description="Print a scrypt hash of PASSWORD for a config file. Without PASSWORD: "
                    "asked for twice on a terminal, else read from the first line of stdin.")
    hashing.add_argument("password", nargs="?", help="asked for when not given")
    return parser


SERVICE_FILE_HELP = """\
FILE is a service definition: the keys of a `[services.NAME]` table of a node config
(listen, admin, users, tls, ...; see docs/config.md), at the top level of a TOML file,
or as a JSON object when FILE ends in .json. A TOML file holding one `[services.NAME]`
table, as in a node config, is taken too; NAME is then the table's. `-` reads the
definition from stdin, as JSON or TOML."""


def _add_services_parser(commands: Any) -> None:
    services = commands.add_parser(
        "services", help="list, get, create, update or stop the services of a node",
        usage="%(prog)s {list,get,create,update,stop} URL ...",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Manage a node's services at run time: send a `core service` command to "
                    "URL, the node's core\nservice (e.g. ws://127.0.0.1:9010/), as the "
                    "global admin, and print the answer's data\nas JSON. Logging in is as "
                    "for `call`: --user and --password, asked for when left\nout and stdin "
                    "is a terminal. Exit 0 on ok; on an error answer print it to stderr as\n"
                    "JSON and exit 1; any other failure is one line on stderr.\n\n"
                    "  nkservice services list URL              name, listen URLs, "
                    "sessions, origin of each\n"
                    "  nkservice services get URL NAME          its definition, without "
                    "secrets\n"
                    "  nkservice services create URL FILE [--name NAME]\n"
                    "                                           start a service defined "
                    "in FILE\n"
                    "  nkservice services update URL NAME FILE  change the keys given in "
                    "FILE\n"
                    "  nkservice services stop URL NAME         stop it, closing its "
                    "sessions\n\n" + SERVICE_FILE_HELP)
    actions = services.add_subparsers(dest="action", metavar="ACTION", required=True)

    def action(name: str, help_: str, usage: str, description: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = actions.add_parser(
            name, help=help_, prog=f"nkservice services {name}",
            usage=f"%(prog)s [options] URL {usage}".rstrip(),
            description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_connection_options(parser)
        return parser

    listing = action("list", "list the services", "",
                     "Print the node's services as a JSON list of {name, listen, sessions, "
                     "origin}:\n`sessions` is how many there are, `origin` is `config` or "
                     "`api`.")
    _add_login_options(listing)
    get = action("get", "print a service's definition", "NAME",
                 "Print the definition of service NAME as JSON, without its secrets.")
    get.add_argument("name", metavar="NAME", help="the service's name")
    _add_login_options(get)
    create = action("create", "create a service from a file", "FILE [--name NAME]",
                    "Create a service from FILE and start it. Its name is --name, FILE's "
                    "`name` key, or the\nNAME of FILE's `[services.NAME]` table: one of "
                    "them, or more that agree. Prints\n{\"name\": NAME}. The node keeps a "
                    "service created so across restarts.\n\n" + SERVICE_FILE_HELP)
    create.add_argument("file", metavar="FILE", help="the definition (TOML or JSON; - for stdin)")
    create.add_argument("--name", help="the service's name, when FILE does not give it")
    _add_login_options(create)
    update = action("update", "change keys of a service from a file", "NAME FILE",
                    "Change the keys of service NAME to those given in FILE; the keys left out "
                    "are kept.\nFILE needs no `name`; when it has one, it must be NAME (a "
                    "service cannot be renamed).\nPrints {\"name\": NAME}.\n\n"
                    + SERVICE_FILE_HELP)
    update.add_argument("name", metavar="NAME", help="the service's name")
    update.add_argument("file", metavar="FILE", help="the keys to change (TOML or JSON; - for "
                                                     "stdin)")
    _add_login_options(update)
    stop = action("stop", "stop a service", "NAME",
                  "Stop service NAME and close its sessions. One created by the API is removed "
                  "for good;\none from the node's config file is stopped until the node "
                  "restarts.")
    stop.add_argument("name", metavar="NAME", help="the service's name")
    _add_login_options(stop)


def _add_connection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", metavar="URL",
                        help="tcp://HOST:PORT, tls://HOST:PORT, ws://HOST:PORT/PATH or "
                             "wss://HOST:PORT/PATH")
    parser.add_argument("--cafile", help="trust this CA (tls and wss)")
    parser.add_argument("--insecure", action="store_true",
                        help="do not verify the server certificate (tls and wss)")
    parser.add_argument("--timeout", type=_seconds, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help=f"to connect, and for each answer (default {DEFAULT_TIMEOUT:g})")
    parser.add_argument("--verbose", action="store_true",
                        help="log what the client does on stderr")


def _add_login_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--user", help="log in as this user (asked for on a terminal)")
    parser.add_argument("--password", help="the user's password (asked for on a terminal)")


def _workers_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of workers: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more: {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds: {text!r}")
    return value


# -- serve -----------------------------------------------------------------------------------

def _serve(args: argparse.Namespace) -> int:
    worker: int | None = args.worker
    try:
        config = load_config(args.config)
        workers = 1 if worker is not None else args.workers or config.workers
        check_workers(config, workers)
    except ConfigError as exc:
        raise _Failure(f"bad config: {exc}", 2) from None
    _configure_logging(args.log_level, config.log_format, worker)
    if worker is not None:
        if not args.cluster:
            raise _Failure("--worker needs --cluster URL", 2)
        config = dataclasses.replace(config, cluster=args.cluster)
    elif workers > 1:
        return _supervise(config, workers, args)
    _raise_open_files_limit()
    try:
        uvloop.run(_run_node(config, worker, ready_signal(args.ready_fd)))
    except ConfigError as exc:  # found while starting: ports, TLS files
        if isinstance(exc.__cause__, OSError) and exc.key.endswith(".listen"):
            raise _Failure(f"cannot start: {_listen_failure(exc.__cause__)}") from None
        raise _Failure(f"bad config: {exc}", 2) from None
    except OSError as exc:
        raise _Failure(f"cannot start: {_listen_failure(exc)}") from None
    except ServerError as exc:  # the cluster: NATS cannot be reached, ...
        first_line = str(exc).partition("\n")[0]
        raise _Failure(f"cannot start: {first_line}") from None
    return 0


def _configure_logging(level: str, log_format: str, worker: int | None) -> None:
    """The node's log on stderr: text lines, or one JSON object per line (`log_format`)."""
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            static_fields={"pid": os.getpid(), **({} if worker is None else {"worker": worker})}))
    else:
        who = "" if worker is None else f"[worker {worker} pid {os.getpid()}] "
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {who}"
                                               "%(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])
    if level != "debug":  # picows says INFO at every connect and disconnect: noise at scale
        logging.getLogger(PICOWS_LOGGER).setLevel(logging.WARNING)


def _supervise(config: NodeConfig, workers: int, args: argparse.Namespace) -> int:
    """A node of several workers: this process supervises them (see nkservice.workers)."""
    supervisor = Supervisor(config, workers=workers, config_file=args.config,
                            log_level=args.log_level)
    try:
        return uvloop.run(supervisor.run())
    except StartFailure as failure:
        if failure.said:  # the worker said why, in its one line
            return failure.status
        raise _Failure(f"cannot start: {failure.message}", failure.status) from None


def _raise_open_files_limit() -> None:
    """Every connection and listening socket is a file: take all the system allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        log.debug("open files limit raised from %d to %d", soft, hard)


def _listen_failure(exc: OSError) -> str:
    """What a failed bind means, and what to do about it."""
    found = re.search(r"\('([^']*)', (\d+)", str(exc))
    where, port = (f"{found[1]}:{found[2]}", found[2]) if found else ("that address", "PORT")
    if exc.errno == errno.EADDRINUSE:
        return (f"{where} is already in use by another process: find it with "
                f"`ss -ltnp 'sport = :{port}'` or `lsof -i :{port}`, stop it, or listen on "
                "other ports with --config FILE")
    if exc.errno == errno.EACCES:
        return f"no permission to listen on {where}: ports below 1024 need privileges"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{where} is not an address of this machine: fix the host in `listen`"
    return str(exc)


async def _run_node(config: NodeConfig, worker: int | None = None,
                    ready: Callable[[], None] | None = None) -> None:
    """Run the node (or, with `worker`, one worker of it) until SIGINT or SIGTERM; `ready`
    is called once it serves."""
    node = Node(config, worker=worker is not None)  # it logs the config's warnings
    await node.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    if worker is None:
        log.info("node started; Ctrl-C or SIGTERM stops it")
    else:
        process = node.cluster.process if node.cluster is not None else "-"
        log.info("worker %d started: cluster process %s", worker, process)
    if ready is not None:
        ready()
    await stopping.wait()
    log.info("stopping: closing listeners and sessions")
    await node.stop()
    log.info("stopped")


# -- what call and listen share --------------------------------------------------------------

def _check_url(url: str) -> None:
    """Refuse a URL the client cannot use, saying how to write it."""
    example = "tcp://127.0.0.1:9010 or ws://127.0.0.1:9010/"
    if "://" not in url:
        raise _Failure(f"bad URL {url!r}: it needs a scheme, e.g. tcp://{url} or ws://{url}/", 2)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise _Failure(f"bad URL {url!r}: {exc}; e.g. {example}", 2) from None
    if parts.scheme in ("http", "https"):
        secure = "s" if parts.scheme == "https" else ""
        raise _Failure(f"bad URL {url!r}: WebSocket URLs start with ws{secure}://, not "
                       f"{parts.scheme}://", 2)
    if parts.scheme not in SCHEMES:
        raise _Failure(f"bad URL {url!r}: the scheme must be tcp, tls, ws or wss; "
                       f"e.g. {example}", 2)
    if not parts.hostname:
        raise _Failure(f"bad URL {url!r}: no host; e.g. {example}", 2)
    if port == 0:
        raise _Failure(f"bad URL {url!r}: port 0 cannot be connected to", 2)


@contextlib.contextmanager
def _client_logging(verbose: bool) -> Iterator[None]:
    """The client library logs what it does; the command line says only its own lines,
    unless --verbose. (Without a handler, Python would print the library's warnings.)"""
    root = logging.getLogger()
    level = root.level
    handler: logging.Handler
    if verbose:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: "
                                               "%(message)s"))
        root.setLevel(logging.DEBUG)
    else:
        handler = logging.NullHandler()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def _tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    if not args.url.startswith(("tls:", "wss:")):
        return None
    try:
        context = ssl.create_default_context(cafile=args.cafile)
    except (OSError, ssl.SSLError) as exc:  # FileNotFoundError is an OSError
        reason = getattr(exc, "strerror", None) or exc
        raise _Failure(f"cannot use --cafile {args.cafile}: {reason}", 2) from None
    if args.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _credentials(args: argparse.Namespace, what: str, *, needed: bool
                 ) -> tuple[str, str] | None:
    """--user and --password, asked for on a terminal when left out; None: no login."""
    user: str | None = args.user
    password: str | None = args.password
    if user is None and password is not None:
        raise _Failure("--password needs --user", 2)
    if user is None and not needed:
        return None
    terminal = sys.stdin.isatty()
    if user is None:
        if not terminal:
            raise _Failure(f"{what} needs a login: give --user USER --password PASSWORD "
                           "(there is no terminal to ask on)", 2)
        user = _ask("user: ", secret=False, instead="give --user")
        if not user:
            raise _Failure("no user given: type one at the prompt or give --user", 2)
    if password is None:
        if not terminal:
            raise _Failure(f"no password for {user}: give --password PASSWORD (there is no "
                           "terminal to ask on)", 2)
        password = _ask(f"password for {user}: ", secret=True, instead="give --password")
    return user, password


def _ask(prompt: str, *, secret: bool, instead: str) -> str:
    """Ask on the terminal. End of input fails with one line saying what to do `instead`;
    Ctrl-C ends the prompt's line and goes on as KeyboardInterrupt (exit status 130,
    nothing more to say)."""
    try:
        if secret:
            return getpass.getpass(prompt)
        sys.stderr.write(prompt)  # stdout is for the answer
        sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\r\n")
    except EOFError:
        print(file=sys.stderr)
        raise _Failure(f"end of input at the prompt: type the answer, or {instead}") from None
    except KeyboardInterrupt:
        print(file=sys.stderr)
        raise


def _connect_failure(url: str, exc: BaseException, timeout: float) -> _Failure:
    """Why connecting failed, and what to do, in one line."""
    if isinstance(exc, TimeoutError):  # before OSError: it is one
        return _Failure(f"no connection to {url} within {timeout:g} s: check the host, the "
                        "port and the scheme (tcp, tls, ws, wss), or wait longer with --timeout")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _Failure(f"the TLS certificate of {url} is not trusted "
                        f"({exc.verify_message}): give --cafile CA_FILE, or --insecure for a "
                        "test server")
    if isinstance(exc, ssl.SSLError):
        return _Failure(f"TLS handshake with {url} failed ({exc.reason or exc}): is it a "
                        "tls/wss port? a plain port takes tcp:// or ws://")
    if isinstance(exc, ConnectionRefusedError):
        return _Failure(f"cannot connect to {url}: connection refused; is the server running "
                        "on that host and port? (`nkservice serve` starts one)")
    if isinstance(exc, socket.gaierror):
        host = urlsplit(url).hostname
        return _Failure(f"cannot connect to {url}: unknown host {host!r} ({exc.strerror})")
    if isinstance(exc, ConnectionError) and "handshake" in str(exc):
        hint = ("check the URL's path" if "404" in str(exc)
                else "is the URL's scheme (tcp, tls, ws, wss) the one of that port?")
        return _Failure(f"{exc}: {hint}")
    if isinstance(exc, OSError):
        return _Failure(f"cannot connect to {url}: {exc.strerror or exc}")
    return _Failure(f"cannot connect to {url}: {exc}")


def _answer_failure(url: str, what: str, exc: BaseException, timeout: float) -> _Failure:
    """Why no answer came to `what` (the login, a request)."""
    if isinstance(exc, ApiError):
        return _Failure(json.dumps(exc.to_wire()), bare=True)
    if isinstance(exc, TimeoutError):
        return _Failure(f"no answer to {what} from {url} within {timeout:g} s: the server may "
                        "be busy (wait longer with --timeout), or not an nkservice server")
    reason = str(exc) or "connection lost"
    hint = ("" if reason.startswith("Connection closed") else
            "; is the URL's scheme (tcp, tls, ws, wss) the one of that port?")
    return _Failure(f"{url} closed the connection before answering {what} ({reason}){hint}")


async def _open(client: Client, url: str, timeout: float) -> None:
    try:
        await client.connect()
    except (OSError, ValueError, TimeoutError) as exc:
        raise _connect_failure(url, exc, timeout) from None
    except Exception as exc:  # e.g. a WebSocket handshake cut short by a TLS port
        raise _Failure(f"cannot connect to {url}: the handshake failed "
                       f"({type(exc).__name__}{': ' if str(exc) else ''}{exc}); is the URL's "
                       "scheme (tcp, tls, ws, wss) the one of that port?") from None


async def _login(client: Client, url: str, credentials: tuple[str, str], timeout: float) -> None:
    try:
        await client.login(*credentials)
    except (ApiError, ConnectionError, TimeoutError) as exc:
        raise _answer_failure(url, "the login", exc, timeout) from None


# -- call ------------------------------------------------------------------------------------

def _call(args: argparse.Namespace) -> int:
    if len(args.words) not in (2, 3):
        raise _Failure("give CLASS CMD or CLASS SUBCLASS CMD, e.g. `core ping` or "
                       "`core user list`", 2)
    class_, *subclasses, cmd = args.words
    subclass = subclasses[0] if subclasses else None
    try:
        data: Any = json.loads(args.data)
    except ValueError as exc:
        raise _Failure(f"--data is not JSON ({exc}); e.g. --data '{{\"user\": \"alice\"}}'",
                       2) from None
    _check_url(args.url)
    what = " ".join(args.words)
    is_ping = class_ == "core" and canonical(subclass, cmd) == ("core", "ping")
    credentials = _credentials(args, what, needed=not is_ping)
    _print_answer(_request(args, what, credentials, class_, cmd, data, subclass))
    return 0


def _request(args: argparse.Namespace, what: str, credentials: tuple[str, str] | None,
             class_: str, cmd: str, data: Any, subclass: str | None) -> Any:
    """Connect to args.url, log in when there are credentials, send one request; its
    answer's data, or a _Failure saying why not."""
    from nkservice.client import Client

    context = _tls_context(args)
    url, timeout = args.url, args.timeout

    async def run() -> Any:
        client = Client(url, ssl=context, request_timeout=timeout)
        try:
            await _open(client, url, timeout)
            if credentials is not None:
                await _login(client, url, credentials, timeout)
            try:
                return await client.request(class_, cmd, data, subclass)
            except (ApiError, ConnectionError, TimeoutError) as exc:
                raise _answer_failure(url, what, exc, timeout) from None
        finally:
            await client.close()

    with _client_logging(args.verbose):
        return asyncio.run(run())


def _print_answer(answer: Any) -> None:
    print(json.dumps({} if answer is None else answer, indent=2))  # no data means {} (§1.2)


# -- services --------------------------------------------------------------------------------

def _services(args: argparse.Namespace) -> int:
    action: str = args.action
    if action == "create":
        definition = _service_file(args.file)
        name = _service_name(args.file, definition, args.name, "--name",
                             "give one of them, or the same name")
        if name is None:
            raise _Failure(f"{_file_label(args.file)}: no name: give --name NAME, a \"name\" "
                           "key, or a [services.NAME] table")
        data: dict[str, Any] = {"name": name, **definition}
    elif action == "update":
        definition = _service_file(args.file)
        _service_name(args.file, definition, args.name, "NAME",
                      "a service cannot be renamed; leave \"name\" out")
        definition.pop("name", None)
        if not definition:
            raise _Failure(f"{_file_label(args.file)}: no keys to change")
        data = {"name": args.name, **definition}
    elif action == "list":
        data = {}
    else:  # get, stop
        data = {"name": args.name}
    _check_url(args.url)
    what = f"services {action}"
    credentials = _credentials(args, what, needed=True)
    _print_answer(_request(args, what, credentials, "core", action, data, "service"))
    return 0


def _file_label(file: str) -> str:
    return "stdin" if file == "-" else file


def _service_file(file: str) -> dict[str, Any]:
    """The service definition in FILE (JSON by its extension, else TOML; `-`: stdin, either),
    a [services.NAME] table unwrapped to its keys plus `name`; a bad file is a _Failure."""
    label = _file_label(file)
    try:
        text = sys.stdin.read() if file == "-" else Path(file).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise _Failure(f"{label}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise _Failure(f"{label}: {exc.strerror or exc}") from None
    if file == "-" and not text.strip():
        raise _Failure(f"{label}: empty: give a service definition as JSON or TOML")
    definition: Any
    try:
        if file.lower().endswith(".json"):
            definition = _parse("JSON", _json_loads, text)
        elif file != "-":
            definition = _parse("TOML", tomllib.loads, text)
        else:  # either: what it starts with says which error to tell
            try:
                definition = _parse("JSON", _json_loads, text)
            except ValueError:
                if text.lstrip().startswith("{"):
                    raise
                definition = _parse("TOML", tomllib.loads, text)
    except ValueError as exc:
        raise _Failure(f"{label}: {exc}") from None
    if not isinstance(definition, dict):
        raise _Failure(f"{label}: not a JSON object: a service definition is one, e.g. "
                       '{"listen": ["tcp://127.0.0.1:9020"]}')
    tables = definition.get("services")
    if list(definition) == ["services"] and isinstance(tables, dict):
        if len(tables) != 1:
            names = ", ".join(map(str, tables)) or "none"
            raise _Failure(f"{label}: give one [services.NAME] table, not {len(tables)} "
                           f"({names})")
        ((name, table),) = tables.items()
        if not isinstance(table, dict):
            raise _Failure(f"{label}: services.{name} is not a table")
        if "name" in table and table["name"] != name:
            raise _Failure(f"{label}: [services.{name}] says \"name\" is "
                           f"{table['name']!r}")
        definition = {"name": name, **table}
    where = _not_json(definition)
    if where is not None:
        raise _Failure(f"{label}: {where[0]}: {where[1]} is not a value a service definition "
                       "takes")
    found: dict[str, Any] = definition
    return found


def _parse(language: str, parse: Callable[[str], Any], text: str) -> Any:
    try:
        return parse(text)
    except ValueError as exc:  # json.JSONDecodeError and tomllib.TOMLDecodeError both are
        raise ValueError(f"not {language}: {exc}") from None


def _json_loads(text: str) -> Any:
    def refuse(constant: str) -> NoReturn:
        raise ValueError(f"{constant} is not a JSON value")

    return json.loads(text, parse_constant=refuse)


def _not_json(value: Any, path: str = "") -> tuple[str, str] | None:
    """The dotted key of the first value JSON cannot carry (TOML's dates, times, nan, inf;
    integers beyond 64 bits), and what it is."""
    if isinstance(value, float) and not math.isfinite(value):
        return path, str(value)
    if isinstance(value, int) and not -2**63 <= value < 2**64:
        return path, "a number that large"
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    elif isinstance(value, str | int | float | bool) or value is None:
        return None
    else:
        return path, f"a TOML {type(value).__name__}"
    for key, item in items:
        found = _not_json(item, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


def _service_name(file: str, definition: dict[str, Any], given: str | None,
                  option: str, hint: str) -> str | None:
    """The service's name: FILE's `name` and `given` (by `option`) must agree (else say
    `hint`)."""
    named = definition.get("name")
    if named is not None and not isinstance(named, str):
        raise _Failure(f"{_file_label(file)}: \"name\" must be a string, not {named!r}")
    if named is not None and given is not None and named != given:
        raise _Failure(f"{_file_label(file)}: its name {named!r} is not {option} {given!r}: "
                       f"{hint}")
    return given if given is not None else named


# -- listen ----------------------------------------------------------------------------------

def _listen(args: argparse.Namespace) -> int:
    from nkservice.client import Client

    subscriptions = []
    for spec in args.subscribe:
        parts = spec.split("/")
        if not parts[0] or len(parts) > 4:
            raise _Failure(f"bad --subscribe {spec!r}: write CLASS[/SUBCLASS[/TYPE[/OBJ_ID]]], "
                           "e.g. core/session or chat", 2)
        subscriptions.append([part or "*" for part in [*parts, *["*"] * (4 - len(parts))]])
    _check_url(args.url)
    credentials = _credentials(args, "listen", needed=True)
    assert credentials is not None
    context = _tls_context(args)
    url, timeout = args.url, args.timeout
    listening = False

    def say(text: str) -> None:
        print(f"nkservice listen: {text}", file=sys.stderr, flush=True)

    async def run() -> None:
        nonlocal listening
        client = Client(url, ssl=context, request_timeout=timeout, reconnect=True,
                        on_disconnect=lambda reason: say(f"connection to {url} lost ({reason}); "
                                                         "reconnecting"),
                        on_reconnect=lambda: say(f"reconnected to {url}, subscribed again"))
        try:
            await _open(client, url, timeout)
            events = client.events()
            await _login(client, url, credentials, timeout)
            for class_, subclass, type_, obj_id in subscriptions:
                try:
                    await client.subscribe(class_, subclass, type_, obj_id)
                except (ApiError, ConnectionError, TimeoutError) as exc:
                    what = f"the subscription to {'/'.join((class_, subclass, type_, obj_id))}"
                    raise _answer_failure(url, what, exc, timeout) from None
            listening = True
            say(f"listening on {url} as {credentials[0]}; Ctrl-C stops")
            async for event in events:
                print(json.dumps(event), flush=True)
        finally:
            await client.close()

    with _client_logging(args.verbose):
        try:
            asyncio.run(run())
        except KeyboardInterrupt:
            if listening:
                return 0  # the way to stop listening
            raise
    return 0


# -- hash-password ---------------------------------------------------------------------------

def _hash_password(args: argparse.Namespace) -> int:
    password: str | None = args.password
    if password is None:
        if sys.stdin.isatty():
            instead = "give the password as the argument"
            password = _ask("password: ", secret=True, instead=instead)
            if password and _ask("again: ", secret=True, instead=instead) != password:
                raise _Failure("the two passwords differ; run it again")
        else:
            password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise _Failure("no password: give one as the argument, type it at the prompt, or "
                       "pipe it on stdin", 2)
    print(hash_password(password))
    return 0


_COMMANDS = {"serve": _serve, "call": _call, "services": _services, "listen": _listen,
             "hash-password": _hash_password}
