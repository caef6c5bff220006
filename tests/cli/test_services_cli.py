"""`nkservice services list|get|create|update|stop`, run for real: `main([...])` in-process
for usage and file mistakes and against a scripted server (the request each action puts on
the wire), else a child process against an in-process node. The rule under test, as for
every command: no traceback ever; a failure is one line on stderr and a non-zero status (an
error answer of the server is that answer as one JSON line)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nkservice.client import Client
from nkservice.errors import ApiError
from tests.cli.test_cli import (
    NodeFactory,
    Terminal,
    cli,
    no_terminal,
    one_line,
    run_cli,
    terminal,
)
from tests.conftest import free_port, url_of

__all__ = ["no_terminal", "terminal"]  # fixtures, used by name

LOGIN = ["--user", "admin", "--password", "secret"]  # the global admin of `make_node`


def no_server() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# -- a scripted server: what the command sends, whatever the server side does --------------

@contextlib.contextmanager
def scripted_server(answer: dict[str, Any]) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """A tcp server that accepts any login and answers every other request with `answer`
    (`{"result": ..., "data": ...}`); yields its port and the requests it received."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)
    received: list[dict[str, Any]] = []
    stop = threading.Event()

    def converse(connection: socket.socket) -> None:
        with connection, connection.makefile("rwb") as stream:
            for line in stream:
                message = json.loads(line)
                if "tid" not in message or "cmd" not in message:
                    continue  # an ack or an answer: nothing to say
                if message["cmd"] == "login":
                    reply: dict[str, Any] = {"result": "ok", "data": {
                        "session_id": "s1", "user": message["data"]["user"]}}
                else:
                    received.append(message)
                    reply = answer
                stream.write(json.dumps({**reply, "tid": message["tid"]}).encode() + b"\n")
                stream.flush()

    def serve() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                connection, _ = listener.accept()
                connection.settimeout(None)
                threading.Thread(target=converse, args=(connection,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], received
    finally:
        stop.set()
        thread.join()
        listener.close()


def sent(capsys: pytest.CaptureFixture[str], *args: str,
         answer: Any = None) -> tuple[dict[str, Any], str]:
    """Run `nkservice services ARGS` against a scripted server answering ok with `answer`:
    the one request it sent (without its tid) and what it printed."""
    with scripted_server({"result": "ok", "data": answer}) as (port, received):
        action, *rest = args
        status, out, err = cli(capsys, "services", action, f"tcp://127.0.0.1:{port}", *rest,
                               *LOGIN)
    assert (status, err) == (0, "")
    (request,) = received
    del request["tid"]
    return request, out


# -- usage --------------------------------------------------------------------------------------

def test_help_documents_the_actions(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = cli(capsys, "--help")
    assert status == 0
    assert "nkservice services create ws://127.0.0.1:9010/ demo.toml" in out
    status, out, _ = cli(capsys, "services", "--help")
    assert status == 0
    for usage in ["services list URL", "services get URL NAME",
                  "services create URL FILE [--name NAME]", "services update URL NAME FILE",
                  "services stop URL NAME"]:
        assert f"  nkservice {usage}" in out, usage
    assert "`-` reads the\ndefinition from stdin" in out
    status, out, _ = cli(capsys, "services", "update", "--help")
    assert status == 0
    assert out.startswith("usage: nkservice services update [options] URL NAME FILE\n")
    assert "a service cannot be renamed" in out
    assert "--password PASSWORD" in out and "--cafile CAFILE" in out


@pytest.mark.parametrize(("args", "says"), [
    (["services"], "nkservice services: the following arguments are required: ACTION"),
    (["services", "start"], "nkservice services: argument ACTION: invalid choice: 'start'"),
    (["services", "get", "tcp://127.0.0.1:9"],
     "nkservice services get: the following arguments are required: NAME"),
    (["services", "update", "tcp://127.0.0.1:9", "demo"],
     "nkservice services update: the following arguments are required: FILE"),
    (["services", "list", "127.0.0.1:9010"],
     "nkservice services: bad URL '127.0.0.1:9010': it needs a scheme"),
    (["services", "get", "http://127.0.0.1:9010/", "demo"],
     "nkservice services: bad URL 'http://127.0.0.1:9010/': WebSocket URLs start with ws://"),
    (["services", "stop", "tcp://127.0.0.1:9", "demo", "--password", "x"],
     "nkservice services: --password needs --user"),
    (["services", "list", "tcp://127.0.0.1:9"],
     "nkservice services: services list needs a login: give --user USER --password PASSWORD "
     "(there is no terminal to ask on)"),
    (["services", "get", "tcp://127.0.0.1:9", "demo", "--user", "admin"],
     "nkservice services: no password for admin: give --password PASSWORD (there is no "
     "terminal to ask on)"),
    (["services", "list", "tls://127.0.0.1:9", "--cafile", "/no/such/ca.pem", *LOGIN],
     "nkservice services: cannot use --cafile /no/such/ca.pem: No such file or directory"),
])
def test_a_usage_mistake_is_one_line(capsys: pytest.CaptureFixture[str], no_terminal: None,
                                     args: list[str], says: str) -> None:
    status, out, err = cli(capsys, *args)
    assert (status, out) == (2, "")
    assert one_line(err).startswith(says)


# -- a bad FILE: one line, status 1, nothing sent -----------------------------------------------

@pytest.mark.parametrize(("action", "name", "text", "extra", "why"), [
    ("create", "d.toml", 'listen = ["tcp://127.0.0.1:9020"\n', [],
     "not TOML: Unclosed array"),  # then where, as this Python's tomllib says it
    ("create", "d.json", '{"listen": }', [],
     "not JSON: Expecting value: line 1 column 12 (char 11)"),
    ("create", "d.json", '["tcp://127.0.0.1:9020"]', [],
     'not a JSON object: a service definition is one, e.g. '
     '{"listen": ["tcp://127.0.0.1:9020"]}'),
    ("create", "d.json", '{"name": "x", "ping_interval": NaN}', [],
     "not JSON: NaN is not a JSON value"),
    ("create", "d.toml", "ping_interval = nan\n", ["--name", "x"],
     "ping_interval: nan is not a value a service definition takes"),
    ("create", "d.json", '{"name": "x", "users": [1, 100000000000000000000]}', [],
     "users.1: a number that large is not a value a service definition takes"),
    ("create", "d.toml", 'name = "x"\n[tls]\ncertfile = 2026-01-01\n', [],
     "tls.certfile: a TOML date is not a value a service definition takes"),
    ("create", "d.toml", 'listen = ["tcp://127.0.0.1:9020"]\n', [],
     'no name: give --name NAME, a "name" key, or a [services.NAME] table'),
    ("create", "d.toml", "name = 7\n", [], "\"name\" must be a string, not 7"),
    ("create", "d.toml", 'name = "one"\n', ["--name", "two"],
     "its name 'one' is not --name 'two': give one of them, or the same name"),
    ("create", "d.toml", "[services.a]\n[services.b]\n", [],
     "give one [services.NAME] table, not 2 (a, b)"),
    ("create", "d.toml", '[services.a]\nname = "b"\n', [], "[services.a] says \"name\" is 'b'"),
    ("update", "d.toml", 'name = "other"\nping_interval = 5\n', [],
     "its name 'other' is not NAME 'demo': a service cannot be renamed; leave \"name\" out"),
    ("update", "d.toml", "", [], "no keys to change"),
    ("update", "d.json", '{"name": "demo"}', [], "no keys to change"),
])
def test_a_bad_file_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                action: str, name: str, text: str, extra: list[str],
                                why: str) -> None:
    path = write(tmp_path, name, text)
    names = ["demo"] if action == "update" else []
    status, out, err = cli(capsys, "services", action, no_server(), *names, path, *extra,
                           *LOGIN)
    assert (status, out) == (1, "")
    assert one_line(err).startswith(f"nkservice services: {path}: {why}")


def test_an_unreadable_file_is_one_line(capsys: pytest.CaptureFixture[str],
                                        tmp_path: Path) -> None:
    (tmp_path / "bytes.json").write_bytes(b'{"name": "\xff"}')
    for path, why in [(tmp_path / "none.toml", "No such file or directory"),
                      (tmp_path, "Is a directory"),
                      (tmp_path / "bytes.json", "not UTF-8 text (invalid start byte at byte 10)")]:
        status, out, err = cli(capsys, "services", "create", no_server(), str(path), *LOGIN)
        assert (status, out) == (1, "")
        assert one_line(err) == f"nkservice services: {path}: {why}"


@pytest.mark.parametrize(("text", "why"), [
    ("", "empty: give a service definition as JSON or TOML"),
    ('{"name": "x",}', "not JSON: "),  # then why, as this Python's json says it
    ("name = \n", "not TOML: Invalid value (at line 1, column 8)"),
])
def test_a_bad_definition_on_stdin_is_one_line(capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch, text: str,
                                               why: str) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))
    status, out, err = cli(capsys, "services", "create", no_server(), "-", *LOGIN)
    assert (status, out) == (1, "")
    assert one_line(err).startswith(f"nkservice services: stdin: {why}")


# -- the requests on the wire -----------------------------------------------------------------

def test_each_action_sends_its_core_service_command(capsys: pytest.CaptureFixture[str],
                                                    tmp_path: Path) -> None:
    toml = write(tmp_path, "d.toml", 'listen = ["tcp://127.0.0.1:9020"]\n'
                                     'users = { alice = "pw1" }\n[admin]\nuser = "da"\n')
    request, out = sent(capsys, "create", toml, "--name", "demo", answer={"name": "demo"})
    assert request == {"class": "core", "subclass": "service", "cmd": "create", "data": {
        "name": "demo", "listen": ["tcp://127.0.0.1:9020"], "users": {"alice": "pw1"},
        "admin": {"user": "da"}}}
    assert out == '{\n  "name": "demo"\n}\n'

    as_json = write(tmp_path, "d.JSON", '{"name": "demo", "ping_interval": 5}')
    request, _ = sent(capsys, "create", as_json, answer={"name": "demo"})
    assert request["data"] == {"name": "demo", "ping_interval": 5}

    request, _ = sent(capsys, "update", "demo", as_json, answer={"name": "demo"})
    assert request == {"class": "core", "subclass": "service", "cmd": "update",
                       "data": {"name": "demo", "ping_interval": 5}}

    listed = [{"name": "demo", "listen": ["tcp://127.0.0.1:9020"], "sessions": 0,
               "origin": "api"}]
    request, out = sent(capsys, "list", answer=listed)
    assert request == {"class": "core", "subclass": "service", "cmd": "list"}  # data {}: left out
    assert out == json.dumps(listed, indent=2) + "\n"

    for action in ["get", "stop"]:
        request, out = sent(capsys, action, "demo")
        assert request == {"class": "core", "subclass": "service", "cmd": action,
                           "data": {"name": "demo"}}
        assert out == "{}\n"  # no data is {}, as for `call`


def test_a_node_config_table_is_taken_whole(capsys: pytest.CaptureFixture[str],
                                            tmp_path: Path) -> None:
    path = write(tmp_path, "demo.toml", '[services.demo]\nlisten = ["ws://127.0.0.1:9020/"]\n')
    request, _ = sent(capsys, "create", path)
    assert request["data"] == {"name": "demo", "listen": ["ws://127.0.0.1:9020/"]}
    request, _ = sent(capsys, "update", "demo", path)
    assert request["data"] == {"name": "demo", "listen": ["ws://127.0.0.1:9020/"]}


@pytest.mark.parametrize(("text", "data"), [
    ('{"name": "demo", "users": {"alice": "pw1"}}', {"name": "demo", "users": {"alice": "pw1"}}),
    ('name = "demo"\n[users]\nalice = "pw1"\n', {"name": "demo", "users": {"alice": "pw1"}}),
    ('[services.demo]\nping_interval = 0.5\n', {"name": "demo", "ping_interval": 0.5}),
])
def test_a_definition_on_stdin(capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch, text: str,
                               data: dict[str, Any]) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))
    request, _ = sent(capsys, "create", "-")
    assert request["data"] == data


def test_an_error_answer_is_its_json_line(capsys: pytest.CaptureFixture[str]) -> None:
    error = {"code": 100020, "error": "Service not found"}
    with scripted_server({"result": "error", "data": error}) as (port, _):
        status, out, err = cli(capsys, "services", "stop", f"tcp://127.0.0.1:{port}", "nope",
                               *LOGIN)
    assert (status, out) == (1, "")
    assert json.loads(one_line(err)) == error


def test_connection_refused(capsys: pytest.CaptureFixture[str]) -> None:
    url = no_server()
    status, out, err = cli(capsys, "services", "list", url, *LOGIN)
    assert (status, out) == (1, "")
    assert one_line(err).startswith(f"nkservice services: cannot connect to {url}: "
                                    "connection refused; ")


# -- against a node (the server side of `core service`) ---------------------------------------

async def services(url: str, *args: str, login: list[str] = LOGIN) -> tuple[int, Any, str]:
    """`nkservice services ARGS` in a child process: status, stdout parsed, stderr."""
    action, *rest = args
    status, out, err = await run_cli("services", action, url, *rest, *login)
    return status, json.loads(out) if out else None, err


async def can_log_in(url: str, user: str, password: str) -> bool:
    client = Client(url, request_timeout=5)
    try:
        await client.connect()
        await client.login(user, password)
        return True
    except (OSError, ApiError):  # refused, closed, or the login refused
        return False
    finally:
        await client.close()


def error_of(err: str) -> dict[str, Any]:
    answer: dict[str, Any] = json.loads(one_line(err))
    return answer


async def test_create_list_get_update_stop(make_node: NodeFactory, tmp_path: Path) -> None:
    node = await make_node(demo={})
    core = url_of(node, "core", "ws")
    one, two = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    toml = write(tmp_path, "one.toml", (
        f'name = "one"\nlisten = ["{one}"]\nlogin_failure_delay = 0.01\n'
        '[admin]\nuser = "one-admin"\npassword = "pw-a"\n[users]\nalice = "pw-alice"\n'))
    as_json = write(tmp_path, "two.json", json.dumps({
        "listen": [two], "users": {"bob": "pw-bob"}, "login_failure_delay": 0.01}))

    assert await services(core, "create", toml) == (0, {"name": "one"}, "")
    assert await services(core, "create", as_json, "--name", "two") == (0, {"name": "two"}, "")
    assert await can_log_in(one, "alice", "pw-alice")
    assert await can_log_in(two, "bob", "pw-bob")

    status, listed, err = await services(core, "list")
    assert (status, err) == (0, "")
    by_name = {entry["name"]: entry for entry in listed}
    assert by_name["one"] == {"name": "one", "listen": [one], "sessions": 0, "origin": "api"}
    assert by_name["two"] == {"name": "two", "listen": [two], "sessions": 0, "origin": "api"}
    assert by_name["demo"]["origin"] == "config"

    status, definition, err = await services(core, "get", "one")
    assert (status, err) == (0, "")
    assert definition["listen"] == [one]
    assert "alice" in json.dumps(definition) and "one-admin" in json.dumps(definition)
    assert "pw-" not in json.dumps(definition)  # no password, whatever the form

    update = write(tmp_path, "update.toml", '[users]\ncarol = "pw-carol"\n')
    assert await services(core, "update", "one", update) == (0, {"name": "one"}, "")
    assert await can_log_in(one, "carol", "pw-carol")
    status, definition, err = await services(core, "get", "one")
    assert (status, err) == (0, "")
    assert "carol" in json.dumps(definition) and "pw-" not in json.dumps(definition)
    assert definition["listen"] == [one]  # the keys left out are kept

    assert await services(core, "stop", "two") == (0, {}, "")
    status, listed, err = await services(core, "list")
    assert (status, err) == (0, "")
    assert "two" not in {entry["name"] for entry in listed}
    assert not await can_log_in(two, "bob", "pw-bob")
    status, out, err = await services(core, "get", "two")
    assert (status, out) == (1, None)
    assert error_of(err)["code"] == 100020


async def test_unknown_and_existing_names(make_node: NodeFactory, tmp_path: Path) -> None:
    node = await make_node(demo={})
    core = url_of(node, "core", "tcp")
    path = write(tmp_path, "d.toml", "ping_interval = 5\n")
    for args in [("get", "nope"), ("stop", "nope"), ("update", "nope", path)]:
        status, out, err = await services(core, *args)
        assert (status, out) == (1, None), args
        error = error_of(err)
        assert error["code"] == 100020, args
        assert error["error"].startswith("Service not found"), args
    status, out, err = await services(core, "create", path, "--name", "demo")
    assert (status, out) == (1, None)
    error = error_of(err)
    assert error["code"] == 100021 and error["error"].startswith("Service already exists")


async def test_user_and_password_are_asked_for_on_a_terminal(
        make_node: NodeFactory, terminal: Callable[..., Terminal]) -> None:
    node = await make_node(demo={})

    def session() -> tuple[int, str]:
        command = terminal("services", "get", url_of(node, "core", "ws"), "demo")
        command.expect("user: ")
        command.type("admin\n")
        command.expect("password for admin: ")
        command.type("secret\n")
        return command.finish()

    status, output = await asyncio.to_thread(session)
    assert status == 0, output
    assert '"name": "demo"' in output
    assert "secret\n" not in output  # not echoed


async def test_only_the_global_admin(make_node: NodeFactory) -> None:
    node = await make_node(demo={})
    status, out, err = await services(url_of(node, "core", "tcp"), "list",
                                      login=["--user", "admin", "--password", "wrong"])
    assert (status, out) == (1, None)
    assert error_of(err)["code"] == 100038  # invalid_password
    status, out, err = await services(url_of(node, "demo", "tcp"), "list",
                                      login=["--user", "demo-admin", "--password", "pw"])
    assert (status, out) == (1, None)
    assert error_of(err)["code"] == 100030  # unauthorized


async def test_a_created_service_s_sessions_are_counted(make_node: NodeFactory,
                                                        tmp_path: Path) -> None:
    node = await make_node()
    core = url_of(node, "core", "tcp")
    url = f"tcp://127.0.0.1:{free_port()}"
    path = write(tmp_path, "d.json", json.dumps({"name": "live", "listen": [url],
                                                 "users": {"alice": "pw1"}}))
    assert await services(core, "create", path) == (0, {"name": "live"}, "")
    alice = Client(url, request_timeout=5)
    try:
        await alice.connect()
        await alice.login("alice", "pw1")
        status, listed, _ = await services(core, "list")
        assert status == 0
        assert {entry["name"]: entry["sessions"] for entry in listed}["live"] == 1
        assert await services(core, "stop", "live") == (0, {}, "")
        assert not await can_log_in(url, "alice", "pw1")
    finally:
        await alice.close()
