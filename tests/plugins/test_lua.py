"""A service's Lua script (PROTOCOL.md §8) as a link of its chain, on the fake wire: each hook,
the JSON data both ways, the sandbox, the time and memory limits, and scripts that do not load.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from lupa import lua54  # type: ignore[import-untyped, unused-ignore]

import nkservice.plugins.lua as lua_plugin
from nkservice.errors import ApiError, ConfigError
from nkservice.plugins.lua import InvalidAnswer, LuaLogic, command_result, login_decision
from nkservice.protocol.messages import Request
from nkservice.service.contracts import CONTINUE, LoginAttempt, LoginDecision
from nkservice.service.service import Service
from tests.service.fakes import Client, FakeNode, code_of

LOGGER = "nkservice.lua.demo"
MEMORY = 32 * 1024 * 1024

# A script with every hook and every kind of answer, failure and limit the tests need.
SCRIPT = """
kv.events = array()

function login(req)
  kv.last_login = req
  if req.user == "carol" then
    return req.password == "c"                       -- a boolean: accepted or refused
  elseif req.user == "mallory" then
    return {authorized = false, reason = "banned"}
  elseif req.user == "dave" then                     -- accepted under another name
    return {authorized = "true", user = "david", session_id = "dev-" .. req.meta.device,
            meta = {via = "lua"}, data = {greeting = "hello"}}
  end
  return nil                                         -- pass: the static users decide
end

function subscribe(req)
  kv.last_subscription = req.subscription
  if req.subscription.class == "secret" then
    return {authorized = false, reason = "no secrets"}
  elseif req.subscription.class == "private" then
    return false
  end
end

function event(req)
  local events = kv.events
  events[#events + 1] = req.event
end

function cmd(req)
  kv.calls = (kv.calls or 0) + 1
  if req.class ~= "demo" then return nil end         -- pass: another link, or unknown_class
  local c = req.cmd
  if c == "echo" then return {result = "ok", data = req} end
  if c == "get" then return {result = "ok", data = kv[req.data.key]} end
  if c == "shapes" then
    return {result = "ok", data = {empty_object = {}, empty_array = array(), none = null,
                                   list = {1, "two", null, 4.5}, whole = 2.0,
                                   nested = {a = {b = {true, false}}}, [7] = "seven"}}
  end
  if c == "fail" then return {result = "error", code = 100045, error = "Missing field: room"} end
  if c == "odd" then return {result = "error", code = 123456, error = "Odd failure"} end
  if c == "named" then
    return {result = "error", code = "invalid_value", error = "Invalid value: x"}
  end
  if c == "crash" then error("boom") end
  if c == "invalid" then return 42 end
  if c == "cycle" then local t = {} t.t = t return {result = "ok", data = t} end
  if c == "binary" then return {result = "ok", data = "\\255\\254"} end
  if c == "loop" then while true do end end
  if c == "pcall_loop" then while true do pcall(function() while true do end end) end end
  if c == "coroutine_loop" then coroutine.wrap(function() while true do end end)() end
  if c == "resume_loop" then
    while true do coroutine.resume(coroutine.create(function() while true do end end)) end
  end
  if c == "pattern" then  -- one call of a C function: about a second, out of the hook's reach
    return {result = "ok", data = ("a"):rep(14):find(("a*"):rep(14) .. "b")}
  end
  if c == "bomb" then
    local t = {} for i = 1, 1e9 do t[i] = string.rep("x", 1000) end
  end
  if c == "log" then
    log.debug("a debug line") log.info("an info line", 1, true, nil)
    log.warning("a warning") log.error("an error") print("printed")
    return {result = "ok"}
  end
  return {result = "error", code = "unknown_command", error = "Unknown command '" .. c .. "'"}
end
"""

Make = Callable[..., tuple[LuaLogic, Service]]


@pytest.fixture
def lua() -> Iterator[Make]:
    """A service named demo whose logic is a Lua script; its thread ends with the test."""
    links: list[LuaLogic] = []

    def make(script: str = SCRIPT, *, timeout: float = 2.0,
             memory: int = MEMORY) -> tuple[LuaLogic, Service]:
        link = LuaLogic(script, name="demo", timeout=timeout, memory=memory)
        links.append(link)
        return link, FakeNode().add("demo", logic=[link])

    yield make
    for link in links:
        link.close()


async def logged_in(service: Service, user: str = "alice", password: str = "pw1") -> Client:
    client = Client(service)
    answer = await client.login(user, password)
    assert answer["result"] == "ok", answer
    return client


async def demo(client: Client, cmd: str, data: Any = None) -> dict[str, Any]:
    return await client.request(cmd, data, class_="demo")


async def kv_value(client: Client, key: str) -> Any:
    answer = await demo(client, "get", {"key": key})
    assert answer["result"] == "ok", answer
    return answer.get("data")


# -- login ---------------------------------------------------------------------------------------

async def test_login_accepts_or_refuses_with_a_boolean(lua: Make) -> None:
    _, service = lua()
    carol = Client(service)
    assert code_of(await carol.login("carol", "wrong")) == 100030
    answer = await carol.login("carol", "c", meta={"device": "phone"})
    assert answer["result"] == "ok"
    assert answer["data"]["user"] == "carol"
    # The request the script saw: §7's fields (null session_id: left out).
    seen = await kv_value(carol, "last_login")
    port = seen["remote"].rsplit(":", 1)[1]
    assert seen == {"service": "demo", "user": "carol", "password": "c", "pass": "c",
                    "meta": {"device": "phone"}, "transport": "tcp",
                    "remote": f"tcp:127.0.0.1:{port}"}


async def test_login_refuses_with_the_scripts_reason(lua: Make) -> None:
    _, service = lua()
    answer = await Client(service).login("mallory", "anything")
    assert answer["data"] == {"code": 100030, "error": "Unauthorized: banned"}


async def test_login_renames_the_user_and_chooses_the_session(lua: Make) -> None:
    _, service = lua()
    dave = Client(service)
    answer = await dave.login("dave", "x", meta={"device": "tablet"})
    assert answer["data"] == {"user": "david", "session_id": "dev-tablet", "greeting": "hello"}
    session = next(iter(service.connections))
    assert session.user == "david"
    assert session.meta == {"via": "lua"}


async def test_login_passes_to_the_static_users(lua: Make) -> None:
    _, service = lua()
    alice = Client(service)
    assert code_of(await alice.login("alice", "bad")) == 100038  # the static table decided
    assert (await alice.login("alice", "pw1"))["result"] == "ok"
    assert code_of(await Client(service).login("nobody", "x")) == 100030


# -- subscribe -----------------------------------------------------------------------------------

async def test_subscribe_may_be_refused(lua: Make) -> None:
    _, service = lua()
    alice = await logged_in(service)
    refused = await alice.request("subscribe", {"class": "secret", "type": "t"})
    assert refused["data"] == {"code": 100030, "error": "Unauthorized: no secrets"}
    assert await kv_value(alice, "last_subscription") == {
        "class": "secret", "subclass": "*", "type": "t", "obj_id": "*"}
    assert code_of(await alice.request("subscribe", {"class": "private"})) == 100030
    assert (await alice.request("subscribe", {"class": "public"}))["result"] == "ok"
    classes = [s["class"] for s in (await alice.request("get_subscriptions"))["data"]]
    assert "public" in classes
    assert "secret" not in classes
    assert "private" not in classes


# -- cmd -----------------------------------------------------------------------------------------

async def test_cmd_answers_ok_with_the_request_it_saw(lua: Make) -> None:
    _, service = lua()
    alice = await logged_in(service)
    data: dict[str, Any] = {"list": [1, None, "x", {"deep": [[]]}], "empty": [],
                            "object": {}, "gone": None, "n": 1.5, "big": 2**53,
                            "huge": 2**64 - 1, "text": "é\n\"\\"}
    answer = await alice.request("echo", data, class_="demo", subclass="room")
    assert answer["result"] == "ok"
    session_id = answer["data"].pop("session_id")
    assert session_id
    assert answer["data"] == {
        "service": "demo", "user": "alice", "class": "demo", "subclass": "room",
        "cmd": "echo",
        # null: left out of an object, kept in an array; arrays stay arrays, even empty.
        "data": {"list": [1, None, "x", {"deep": [[]]}], "empty": [], "object": {},
                 "n": 1.5, "big": 2**53, "huge": float(2**64 - 1), "text": "é\n\"\\"}}


async def test_cmd_answers_json_shapes(lua: Make) -> None:
    _, service = lua()
    alice = await logged_in(service)
    answer = await demo(alice, "shapes")
    assert answer["data"] == {"empty_object": {}, "empty_array": [], "none": None,
                              "list": [1, "two", None, 4.5], "whole": 2.0,
                              "nested": {"a": {"b": [True, False]}}, "7": "seven"}
    assert type(answer["data"]["whole"]) is float


async def test_cmd_answers_errors_with_their_code(lua: Make) -> None:
    _, service = lua()
    alice = await logged_in(service)
    assert (await demo(alice, "fail"))["data"] == {"code": 100045,
                                                   "error": "Missing field: room"}
    assert (await demo(alice, "odd"))["data"] == {"code": 123456, "error": "Odd failure"}
    assert (await demo(alice, "named"))["data"] == {"code": 100046,
                                                    "error": "Invalid value: x"}
    assert (await demo(alice, "what"))["data"] == {"code": 100042,
                                                   "error": "Unknown command 'what'"}


async def test_cmd_passes_and_never_sees_core_requests(lua: Make) -> None:
    _, service = lua()
    alice = await logged_in(service)
    assert code_of(await alice.request("join", class_="video")) == 100050  # passed, nobody else
    assert await kv_value(alice, "calls") == 2  # "join" and this "get"
    for _ in range(3):
        assert (await alice.request("ping"))["result"] == "ok"
    assert await kv_value(alice, "calls") == 3


async def test_a_missing_function_passes_at_once(lua: Make) -> None:
    link, service = lua("kv.x = 1  -- no hook at all")
    assert link.defined == frozenset()
    attempt = LoginAttempt("demo", "alice", "pw1", None, None, "tcp", "tcp:127.0.0.1:1")
    request = Request("demo", "x", 1)
    assert link.login(attempt) is CONTINUE
    assert link.subscribe(None, None) is CONTINUE  # type: ignore[arg-type]  # not looked at
    assert link.command(None, request) is CONTINUE  # type: ignore[arg-type]
    assert link.client_event(None, request) is CONTINUE  # type: ignore[arg-type]
    alice = await logged_in(service)
    assert code_of(await demo(alice, "x")) == 100050


# -- what answers mean ---------------------------------------------------------------------------

@pytest.mark.parametrize("answer", [
    1, "yes", {"authorized": 1}, {"authorized": "True"}, {},
    {"authorized": False, "reason": 7},
    {"authorized": True, "user": ""}, {"authorized": True, "user": 5},
    {"authorized": True, "session_id": "x" * 129}, {"authorized": True, "session_id": 12},
    {"authorized": True, "data": [1]}])
def test_a_login_answer_that_is_not_one_is_refused(answer: Any) -> None:
    with pytest.raises(InvalidAnswer):
        login_decision(answer)


def test_login_answers() -> None:
    assert login_decision(None) is CONTINUE
    assert login_decision(True) == LoginDecision(True)
    assert login_decision(False) == LoginDecision(False)
    assert login_decision({"authorized": "false", "reason": "r", "user": "ignored"}) == \
        LoginDecision(False, reason="r")
    assert login_decision({"authorized": "true", "session_id": "x" * 128, "meta": [1]}) == \
        LoginDecision(True, session_id="x" * 128, meta=[1])


@pytest.mark.parametrize(("answer", "wire"), [
    ({"result": "error", "code": 100046.0, "error": "Invalid value: x"},
     {"code": 100046, "error": "Invalid value: x"}),
    ({"result": "error", "code": "unauthorized"}, {"code": 100030, "error": "Unauthorized"}),
    ({"result": "error", "error": "no code"}, {"code": 100002, "error": "no code"}),
    ({"result": "error", "code": 7}, {"code": 7, "error": "Internal error"})])
def test_cmd_error_answers(answer: Any, wire: dict[str, Any]) -> None:
    with pytest.raises(ApiError) as raised:
        command_result(answer)
    assert raised.value.to_wire() == wire


@pytest.mark.parametrize("answer", [
    "ok", {"result": "fine"}, {"result": "error", "code": "no_such_code"},
    {"result": "error", "code": 1.5}, {"result": "error", "code": 7, "error": 8}])
def test_a_cmd_answer_that_is_not_one_is_refused(answer: Any) -> None:
    with pytest.raises(InvalidAnswer):
        command_result(answer)


# -- event and kv --------------------------------------------------------------------------------

async def test_event_is_seen_and_kv_keeps_it_for_a_later_cmd(lua: Make) -> None:
    _, service = lua()
    alice = await logged_in(service)
    bob = await logged_in(service, "bob", "pw2")
    assert (await alice.request("event", {"k": [1, 2]}, class_="chat"))["result"] == "ok"
    assert (await alice.request("event", None, class_="media", subclass="call"))["result"] \
        == "ok"
    # Lua calls run in the order they came: the events before bob's command.
    assert await kv_value(bob, "events") == [
        {"class": "chat", "data": {"k": [1, 2]}},
        {"class": "media", "subclass": "call"}]


# -- failures ------------------------------------------------------------------------------------

async def test_a_script_error_answers_internal_error_and_logs_the_traceback(
        lua: Make, caplog: pytest.LogCaptureFixture) -> None:
    _, service = lua()
    alice = await logged_in(service)
    with caplog.at_level(logging.ERROR, LOGGER):
        assert (await demo(alice, "crash"))["data"] == {"code": 100002,
                                                        "error": "Internal error"}
    record = next(r for r in caplog.records if r.name == LOGGER)
    message = record.getMessage()
    assert "cmd(req) failed" in message
    assert "services.demo.script:" in message
    assert "boom" in message
    assert "stack traceback" in message
    assert (await demo(alice, "echo"))["result"] == "ok"  # the next call works


@pytest.mark.parametrize(("cmd", "why"), [
    ("invalid", "cmd(req) returned an invalid answer (not nil or a table): 42"),
    ("cycle", "its answer cannot be sent as JSON: tables nested more than 100 deep"),
    ("binary", "its answer cannot be sent as JSON: a string that is not valid UTF-8")])
async def test_an_answer_that_cannot_be_sent_is_an_internal_error(
        lua: Make, caplog: pytest.LogCaptureFixture, cmd: str, why: str) -> None:
    _, service = lua()
    alice = await logged_in(service)
    with caplog.at_level(logging.ERROR, LOGGER):
        assert code_of(await demo(alice, cmd)) == 100002
    assert any(why in r.getMessage() for r in caplog.records if r.name == LOGGER)
    assert (await demo(alice, "echo"))["result"] == "ok"


async def test_log_writes_to_the_services_lua_logger(
        lua: Make, caplog: pytest.LogCaptureFixture) -> None:
    _, service = lua()
    alice = await logged_in(service)
    with caplog.at_level(logging.DEBUG, LOGGER):
        assert (await demo(alice, "log"))["result"] == "ok"
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == LOGGER]
    assert lines == [(logging.DEBUG, "a debug line"), (logging.INFO, "an info line 1 true nil"),
                     (logging.WARNING, "a warning"), (logging.ERROR, "an error"),
                     (logging.INFO, "printed")]


# -- limits --------------------------------------------------------------------------------------

async def test_an_infinite_loop_is_stopped_while_other_clients_get_answers(
        lua: Make, caplog: pytest.LogCaptureFixture) -> None:
    _, service = lua(timeout=1.0)
    alice = await logged_in(service)
    bob = await logged_in(service, "bob", "pw2")
    started = time.monotonic()
    looping = asyncio.create_task(demo(alice, "loop"))
    await asyncio.sleep(0.05)
    with caplog.at_level(logging.ERROR, LOGGER):
        for _ in range(5):  # the event loop is free: bob's pings are answered at once
            asked = time.monotonic()
            assert (await bob.request("ping"))["result"] == "ok"
            assert time.monotonic() - asked < 0.25
        assert not looping.done()
        assert code_of(await looping) == 100002
    assert 0.9 < time.monotonic() - started < 3.0
    assert any("ran longer than lua_timeout" in r.getMessage()
               for r in caplog.records if r.name == LOGGER)
    assert (await demo(bob, "echo"))["result"] == "ok"  # the next call works


@pytest.mark.parametrize("cmd", ["pcall_loop", "coroutine_loop", "resume_loop"])
async def test_pcall_and_coroutines_do_not_escape_the_timeout(
        lua: Make, caplog: pytest.LogCaptureFixture, cmd: str) -> None:
    _, service = lua(timeout=0.3)
    alice = await logged_in(service)
    with caplog.at_level(logging.ERROR, LOGGER):
        assert code_of(await demo(alice, cmd)) == 100002
    assert any("ran longer than lua_timeout" in r.getMessage()
               for r in caplog.records if r.name == LOGGER)
    assert (await demo(alice, "echo"))["result"] == "ok"


async def test_a_call_stuck_in_a_c_function_is_given_up(
        lua: Make, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lua_plugin, "GRACE", 0.15)
    _, service = lua(timeout=0.05)
    alice = await logged_in(service)
    started = time.monotonic()
    with caplog.at_level(logging.ERROR, LOGGER):
        assert code_of(await demo(alice, "pattern")) == 100002
    assert time.monotonic() - started < 0.7  # its waiter did not wait for the pattern
    assert any("was not stopped" in r.getMessage() for r in caplog.records if r.name == LOGGER)
    for _ in range(100):  # the state is the service's again once the pattern is done
        if (await demo(alice, "echo"))["result"] == "ok":
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("the Lua state never came back")


async def test_a_memory_bomb_is_stopped_by_the_memory_limit(
        lua: Make, caplog: pytest.LogCaptureFixture) -> None:
    _, service = lua(timeout=10.0, memory=16 * 1024 * 1024)
    alice = await logged_in(service)
    assert (await alice.request("event", {"before": True}, class_="chat"))["result"] == "ok"
    started = time.monotonic()
    with caplog.at_level(logging.ERROR, LOGGER):
        assert code_of(await demo(alice, "bomb")) == 100002
    assert time.monotonic() - started < 5.0  # the memory limit, not the time limit
    assert any("lua_memory" in r.getMessage() for r in caplog.records if r.name == LOGGER)
    # The garbage is collected: the state works, and kv still holds what it held.
    assert await kv_value(alice, "events") == [{"class": "chat", "data": {"before": True}}]


# -- the sandbox ---------------------------------------------------------------------------------

def bytecode_literal() -> str:
    """A Lua string literal holding a compiled chunk (made by an unsandboxed Lua)."""
    plain = lua54.LuaRuntime(encoding=None)
    code: bytes = plain.eval(b'string.dump(function() return "escaped" end)')
    assert code.startswith(b"\x1bLua")
    return '"' + "".join(f"\\{byte:03d}" for byte in code) + '"'


SANDBOX = """
local BYTECODE = %s

local function reader(text)  -- load() of a reader function, one piece at a time
  local done = false
  return function()
    if done then return nil end
    done = true
    return text
  end
end

local function userdata_in(t, seen)  -- anything of Python's in reach?
  seen = seen or {}
  if seen[t] then return false end
  seen[t] = true
  for k, v in pairs(t) do
    if type(k) == "userdata" or type(v) == "userdata" then return true end
    if type(v) == "table" and userdata_in(v, seen) then return true end
  end
  local mt = getmetatable(t)
  return type(mt) == "table" and userdata_in(mt, seen)
end

function cmd(req)
  local c = req.cmd
  if c == "globals" then
    local found = {}
    for _, name in ipairs({"os", "io", "require", "package", "debug", "dofile", "loadfile",
                           "python", "warn", "loadstring", "module", "setfenv", "getfenv"}) do
      if _G[name] ~= nil then found[#found + 1] = name end
    end
    return {result = "ok", data = {
      found = array(found),
      dump = type(string.dump), method_dump = type(("").dump),
      meta_dump = type(getmetatable("").__index.dump),
      loaded_os = type(load("return os")()),
      loaded_io_in_g = type(load("return io", "x", "t", _G)()),
      userdata = userdata_in(_G),
      count = type(collectgarbage("count")),
      stop = pcall(collectgarbage, "stop"),
    }}
  end
  if c == "bytecode" then
    local f1, e1 = load(BYTECODE)
    local f2, e2 = load(BYTECODE, "b", "b")
    local f3, e3 = load(reader(BYTECODE), "r", "bt")
    return {result = "ok", data = {loaded = f1 ~= nil or f2 ~= nil or f3 ~= nil,
                                   errors = {e1, e2, e3}}}
  end
  if c == "text" then return {result = "ok", data = load("return 1 + 1")()} end
  if c == "execute" then os.execute("touch " .. req.data) end
  if c == "open" then io.open(req.data, "w"):write("x") end
  if c == "require" then require("os").execute("touch " .. req.data) end
  if c == "python" then return {result = "ok", data = python.eval("1")} end
  return {result = "ok", data = "not escaped"}
end
"""


async def test_the_sandbox_has_no_way_out(lua: Make) -> None:
    _, service = lua(SANDBOX % bytecode_literal())
    alice = await logged_in(service)
    answer = await demo(alice, "globals")
    assert answer["data"] == {"found": [], "dump": "nil", "method_dump": "nil",
                              "meta_dump": "nil", "loaded_os": "nil", "loaded_io_in_g": "nil",
                              "userdata": False, "count": "number", "stop": False}
    assert (await demo(alice, "text"))["data"] == 2  # load() of text works


async def test_bytecode_is_never_loaded(lua: Make) -> None:
    _, service = lua(SANDBOX % bytecode_literal())
    alice = await logged_in(service)
    answer = (await demo(alice, "bytecode"))["data"]
    assert answer["loaded"] is False
    assert all("attempt to load a binary chunk" in error for error in answer["errors"])


@pytest.mark.parametrize("cmd", ["execute", "open", "require", "python"])
async def test_os_io_require_and_python_are_refused(
        lua: Make, tmp_path: Path, caplog: pytest.LogCaptureFixture, cmd: str) -> None:
    _, service = lua(SANDBOX % bytecode_literal())
    alice = await logged_in(service)
    target = tmp_path / "escaped"
    with caplog.at_level(logging.ERROR, LOGGER):
        assert code_of(await demo(alice, cmd, str(target))) == 100002
    assert not target.exists()
    assert any("attempt to index a nil value" in r.getMessage() or
               "attempt to call a nil value" in r.getMessage()
               for r in caplog.records if r.name == LOGGER)


# -- scripts that do not load --------------------------------------------------------------------

def test_a_syntax_error_names_the_script_and_the_line() -> None:
    with pytest.raises(ConfigError, match=r"^services\.demo\.script: line 3: .*near '='"):
        LuaLogic("x = 1\ny = 2\nz = = 3\n", name="demo", timeout=1.0, memory=MEMORY)


def test_an_error_while_the_script_runs_names_the_line() -> None:
    with pytest.raises(ConfigError,
                       match=r"^services\.demo\.script_code: line 2: .*nil value \(global 'foo'\)"):
        LuaLogic("local a = 1\nfoo()\n", name="demo", timeout=1.0, memory=MEMORY,
                 where="services.demo.script_code")


def test_a_script_that_does_not_finish_does_not_load() -> None:
    with pytest.raises(ConfigError, match="did not finish within lua_timeout"):
        LuaLogic("while true do end", name="demo", timeout=0.2, memory=MEMORY)


def test_a_script_too_big_for_its_memory_does_not_load() -> None:
    with pytest.raises(ConfigError, match="lua_memory"):
        LuaLogic("big = string.rep('x', 4 * 1024 * 1024)", name="demo", timeout=1.0,
                 memory=2 * 1024 * 1024)


# -- the examples of docs/lua.md -----------------------------------------------------------------

DOC = (Path(__file__).resolve().parents[2] / "docs" / "lua.md").read_text(encoding="utf-8")
EXAMPLES: list[str] = re.findall(r"```lua\n(.*?)```", DOC, re.S)


def example(defining: str) -> str:
    return next(code for code in EXAMPLES if f"function {defining}" in code)


@pytest.mark.parametrize("code", EXAMPLES, ids=[f"example{n}" for n in range(len(EXAMPLES))])
def test_every_example_of_the_docs_loads(code: str) -> None:
    link = LuaLogic(code, name="demo", timeout=1.0, memory=MEMORY)
    assert link.defined
    link.close()
    assert not link.defined  # closed: every hook passes


async def test_the_docs_login_example_answers_as_shown(lua: Make) -> None:
    _, service = lua(example("login"))
    bob = Client(service)
    answer = await bob.login("Bob@example.com", "open-sesame", meta={"device": "tab1"})
    assert answer["data"] == {"session_id": "device-tab1", "user": "bob@example.com",
                              "logins": 1}
    refused = await Client(service).login("eve@example.com", "guess")
    assert refused["data"] == {"code": 100030, "error": "Unauthorized: wrong code"}
    await logged_in(service)  # alice: passed on to the static users


async def test_the_docs_cmd_example_answers_as_shown(lua: Make) -> None:
    _, service = lua(example("cmd(req)\n  if req.class ~= \"counter\""))
    alice = await logged_in(service)
    exchanges = re.search(r"```json\n(.*?)```", DOC[DOC.index("### `cmd`"):], re.S)
    assert exchanges is not None
    lines = [json.loads(line) for line in exchanges[1].splitlines()]
    for request, response in zip(lines[::2], lines[1::2], strict=True):
        answer = await alice.request(request["cmd"], request["data"], class_=request["class"])
        assert {"result": answer["result"], "data": answer["data"]} == {
            "result": response["result"], "data": response["data"]}


async def test_the_docs_event_example_keeps_a_history(lua: Make) -> None:
    _, service = lua(example("event(req)\n  if req.event.class"))
    alice = await logged_in(service)
    for n in range(12):
        await alice.request("event", {"n": n}, class_="chat")
    await alice.request("event", {"n": 99}, class_="other")
    history = (await alice.request("history", class_="chat"))["data"]
    assert history == [{"user": "alice", "data": {"n": n}} for n in range(2, 12)]


async def test_the_docs_subscribe_example_refuses_as_shown(lua: Make) -> None:
    _, service = lua(example("subscribe"))
    alice = await logged_in(service)
    assert (await alice.request("subscribe", {"class": "room", "obj_id": "alice"}))["result"] \
        == "ok"
    refused = await alice.request("subscribe", {"class": "room", "obj_id": "bob"})
    assert refused["data"] == {"code": 100030, "error": "Unauthorized: not your room"}
    assert code_of(await alice.request("subscribe", {"class": "audit"})) == 100030
