"""A service's Lua script as a link of its logic chain (PROTOCOL.md §8; docs/lua.md).

The script may define `login(req)`, `subscribe(req)`, `cmd(req)` and `event(req)`; only the
hooks it defines take part, the others pass at once. `req` carries the fields of the matching
callback request of §7, as Lua tables; the answer comes back as JSON data.

Each service has its own Lua 5.4 state (lupa), and that state its own thread: a Lua state is
not thread-safe, so its calls run one at a time, in the order they were asked, and they run
off the event loop (lupa frees the GIL while Lua runs), so a script that loops only delays
the calls of its own service, never the other requests of the node. (The hop to that
thread and back costs some 50 µs a call more than calling Lua on the loop would: the
price of a loop that a script cannot stall; docs/lua.md has the measures.)

The script runs in a sandbox: a global table of its own holding only the safe parts of the
standard library (no `io`, `os`, `require`, `debug`, `string.dump`; `load` of text only,
into the sandbox), `log.*`, a `kv` table that lasts as long as the service, and `null` and
`array()` for the JSON data. No Python object is reachable from it. A call is stopped by a
debug hook when its time is up (every `HOOK_EVERY` instructions it compares the clock with
the call's deadline, also in the script's coroutines, and `pcall` cannot catch that stop),
and the state's memory is capped by lupa's allocator. A failed call (an error, the time or
memory limit) answers `internal_error`, its Lua traceback goes to the logger
`nkservice.lua.<service>`, and the next call runs as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import re
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from lupa import lua54  # type: ignore[import-untyped, unused-ignore]

from nkservice.errors import ApiError, ConfigError, ErrorCode
from nkservice.events.index import Topic
from nkservice.protocol.messages import Request
from nkservice.service.contracts import (
    CONTINUE,
    MAX_SESSION_ID_LENGTH,
    Caller,
    Continue,
    LoginAttempt,
    LoginDecision,
    caller_data,
    event_data,
    login_data,
    request_data,
    subscription_data,
)
from nkservice.service.logic import Link

HOOK_EVERY = 100_000
"""Lua instructions between two looks at the clock (a fraction of a millisecond)."""

GRACE = 1.0
"""Seconds past a call's deadline after which its waiter gives up on it: Lua cannot be
stopped inside one call of a C function (a pathological string pattern, say)."""

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # Lua's integers; beyond them, floats


LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}

# The trusted half, run once with the whole standard library before the script is loaded.
# It keeps what it needs in locals (the script may change the shared `string` table), arms
# the time limit on the main thread, builds the sandbox and returns the functions Python
# calls. Python objects are only its upvalues: the script never sees them.
BOOTSTRAP = r"""
local expired, pylog, hook_every = ...

local sethook, traceback, rawmeta = debug.sethook, debug.traceback, debug.getmetatable
local load, pcall, xpcall, error, select = load, pcall, xpcall, error, select
local type, next, tostring, tonumber = type, next, tostring, tonumber
local rawget, rawlen, rawequal, setmetatable = rawget, rawlen, rawequal, setmetatable
local concat = table.concat
local format, gsub, byte, find = string.format, string.gsub, string.byte, string.find
local utf8len, mathtype, huge = utf8.len, math.type, math.huge
local collect = collectgarbage
local cocreate, coresume, coclose = coroutine.create, coroutine.resume, coroutine.close

string.dump = nil  -- `("").dump` reaches the real string table through its metatable
python = nil       -- lupa's bridge module: nothing of it for scripts
package.loaded.python = nil

-- The time limit. Once a call is stopped it stays stopped: every look at the clock raises
-- STOP again, and the sandbox's pcall, xpcall and coroutines pass it on.
local STOP = setmetatable({}, {__metatable = false,
                               __tostring = function() return "lua_timeout" end})
local stopped = false
local function check()
  if stopped or expired() then
    stopped = true
    error(STOP, 0)
  end
end
sethook(check, "", hook_every)
local function armed(co)  -- a coroutine has hooks of its own
  sethook(co, check, "", hook_every)
  return co
end
local function rethrow(ok, ...)
  if not ok and stopped then error(STOP, 0) end
  return ok, ...
end
local function unwrap(ok, ...)
  if ok then return ... end
  if stopped then error(STOP, 0) end
  error((...), 0)
end

local function text(value)  -- for the log: a string, and valid UTF-8
  local ok, s = pcall(tostring, value)
  if not ok or type(s) ~= "string" then s = "(a " .. type(value) .. " value)" end
  if not utf8len(s) then s = gsub(s, "[\128-\255]", "?") end
  return s
end

-- JSON data: null and arrays.
local NULL = setmetatable({}, {
  __metatable = false,
  __tostring = function() return "null" end,
  __newindex = function() error("null is read-only", 2) end,
})
local ARRAY = {__name = "array"}
local function array(t)
  if t == nil then t = {} end
  if type(t) ~= "table" then error("array() takes a table", 2) end
  return setmetatable(t, ARRAY)
end

-- The sandbox.
local env = {}
for _, name in next, {"assert", "error", "getmetatable", "ipairs", "next", "pairs",
                      "rawequal", "rawget", "rawlen", "rawset", "select", "setmetatable",
                      "tonumber", "tostring", "type", "_VERSION"} do
  env[name] = _G[name]
end
env.string, env.table, env.math, env.utf8 = string, table, math, utf8
env._G = env
env.pcall = function(f, ...) return rethrow(pcall(f, ...)) end
env.xpcall = function(f, handler, ...)
  return rethrow(xpcall(f, function(e)
    if stopped then return e end
    return handler(e)
  end, ...))
end
env.load = function(chunk, name, mode, chunkenv)  -- text only, into the sandbox by default
  if chunkenv == nil then chunkenv = env end
  return load(chunk, name, "t", chunkenv)
end
env.collectgarbage = function(option, ...)
  if option == nil then option = "collect" end
  if option == "collect" or option == "count" or option == "step" or option == "isrunning" then
    return collect(option, ...)
  end
  error("collectgarbage: option '" .. text(option) .. "' is not allowed", 2)
end
env.coroutine = {
  create = function(f) return armed(cocreate(f)) end,
  resume = function(co, ...) return rethrow(coresume(co, ...)) end,
  wrap = function(f)
    local co = armed(cocreate(f))
    return function(...) return unwrap(coresume(co, ...)) end
  end,
  close = function(co) return rethrow(coclose(co)) end,
  yield = coroutine.yield, status = coroutine.status, running = coroutine.running,
  isyieldable = coroutine.isyieldable,
}
local function logger(level)
  return function(...)
    local parts = {}
    for i = 1, select("#", ...) do parts[i] = text((select(i, ...))) end
    pylog(level, concat(parts, " "))
  end
end
env.log = {debug = logger("debug"), info = logger("info"), warning = logger("warning"),
           error = logger("error")}
env.print = env.log.info
env.kv = {}
env.null = NULL
env.array = array

-- Answers as JSON text (raw access only: the script's metamethods do not run here).
local ESCAPES = {['"'] = '\\"', ["\\"] = "\\\\", ["\b"] = "\\b", ["\f"] = "\\f",
                 ["\n"] = "\\n", ["\r"] = "\\r", ["\t"] = "\\t"}
local function escape(c) return ESCAPES[c] or format("\\u%04x", byte(c)) end
local function quote(s)
  if not utf8len(s) then error("a string that is not valid UTF-8", 0) end
  return '"' .. (gsub(s, '[%c"\\]', escape)) .. '"'
end
local function number(n)
  if mathtype(n) == "integer" then return format("%d", n) end
  if n ~= n or n == huge or n == -huge then return "null" end
  local s = format("%.14g", n)
  if tonumber(s) ~= n then s = format("%.17g", n) end
  if not find(s, "[%.e]") then s = s .. ".0" end  -- a float stays a float
  return s
end
local MAX_DEPTH = 100
local encode
local function sequence(t)  -- n if t is 1..n with nothing else, else nil
  local n, count = rawlen(t), 0
  for k in next, t do
    if mathtype(k) ~= "integer" or k < 1 or k > n then return nil end
    count = count + 1
  end
  if count == n then return n end
  return nil
end
local function encode_table(t, out, depth)
  if depth > MAX_DEPTH then
    error("tables nested more than " .. MAX_DEPTH .. " deep (a cycle?)", 0)
  end
  local n  -- the length of an array; nil for an object (an empty table is one)
  if rawequal(rawmeta(t), ARRAY) then n = rawlen(t)
  elseif next(t) ~= nil then n = sequence(t) end
  if n == nil then
    out[#out + 1] = "{"
    local first = true
    for k, v in next, t do
      local key
      if type(k) == "string" then key = quote(k)
      elseif type(k) == "number" then key = '"' .. number(k) .. '"'
      else error("a table key of type " .. type(k), 0) end
      if not first then out[#out + 1] = "," end
      first = false
      out[#out + 1] = key
      out[#out + 1] = ":"
      encode(v, out, depth + 1)
    end
    out[#out + 1] = "}"
    return
  end
  out[#out + 1] = "["
  for i = 1, n do
    if i > 1 then out[#out + 1] = "," end
    encode(rawget(t, i), out, depth + 1)
  end
  out[#out + 1] = "]"
end
encode = function(value, out, depth)
  local kind = type(value)
  if value == nil or rawequal(value, NULL) then out[#out + 1] = "null"
  elseif kind == "boolean" then out[#out + 1] = value and "true" or "false"
  elseif kind == "number" then out[#out + 1] = number(value)
  elseif kind == "string" then out[#out + 1] = quote(value)
  elseif kind == "table" then encode_table(value, out, depth)
  else error("a " .. kind .. " value", 0) end
end
local function json(value)
  local out = {}
  encode(value, out, 0)
  return concat(out)
end

-- Calls: (status, text). Status "ok" (text: the answer as JSON), "missing" (no such
-- function), "timeout", "memory", "error" (text: the message and the Lua traceback).
local function handler(e)
  if stopped then return traceback("stopped: lua_timeout", 3) end  -- not error() itself
  return traceback(text(e), 2)
end
local function unsendable(e)
  if stopped then return "stopped: lua_timeout, while its answer was encoded" end
  return "its answer cannot be sent as JSON: " .. text(e)
end
local function failed(message)
  if stopped then
    collect("collect")
    return "timeout", message
  end
  if message == "not enough memory" then  -- memory errors skip the handler
    collect("collect")
    return "memory", message
  end
  return "error", message
end
local function call(name, req)
  stopped = false
  local f = rawget(env, name)
  if type(f) ~= "function" then return "missing", nil end
  -- Called by xpcall itself, the function is named by its line in the traceback.
  local ok, result = xpcall(f, handler, req)
  if ok then ok, result = xpcall(json, unsendable, result) end
  if ok then return "ok", result end
  return failed(result)
end
local function start(source, chunkname)  -- "ok" and the names of the hooks it defines
  stopped = false
  local chunk, message = load(source, chunkname, "t", env)
  if not chunk then return "error", message end
  local ok, result = xpcall(chunk, handler)
  if not ok then return failed(result) end
  local defined = {}
  for _, name in next, {"login", "subscribe", "cmd", "event"} do
    if type(rawget(env, name)) == "function" then defined[#defined + 1] = name end
  end
  return "ok", concat(defined, " ")
end
return call, start, array, NULL
"""

# "services.demo.script:3: unexpected symbol near 'x'" (a chunk name given with "=")
WHERE_LINE = re.compile(r"(?s)^(.*?):(\d+): (.*)$")


class LuaFailure(Exception):
    """A call that did not answer: `kind` is "error", "timeout", "memory", "late" (its
    time was up before it ran) or "stuck" (given up on: not stopped by its deadline)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


def _no_attributes(obj: object, name: object, is_setting: bool) -> object:
    raise AttributeError("Lua scripts have no access to Python objects")


class LuaState:
    """One sandboxed Lua state and its script: synchronous, for one thread at a time."""

    def __init__(self, source: str, *, where: str, timeout: float, memory: int,
                 log: logging.Logger) -> None:
        self.log = log
        self.seconds = 0.0  # spent in the script's calls (only its thread writes it)
        self._deadline = 0.0  # past between calls: a finalizer that loops stops at once
        try:
            self._runtime = lua54.LuaRuntime(
                register_eval=False, register_builtins=False, unpack_returned_tuples=False,
                attribute_filter=_no_attributes, max_memory=memory)
            self._call, start, self._array, self._null = self._runtime.execute(
                BOOTSTRAP, self._expired, self._log, HOOK_EVERY, name="=nkservice.lua",
                mode="t")
            self._deadline = time.monotonic() + timeout
            status, detail = start(source, "=" + where)
        except lua54.LuaMemoryError:  # not even room for the sandbox, or the script's text
            raise ConfigError(where, f"lua_memory ({memory} bytes) is too small") from None
        finally:
            self._deadline = 0.0
        if status != "ok":
            raise ConfigError(where, _load_error(status, str(detail)))
        self.defined = frozenset(str(detail).split())
        """The hooks the script defines when it has run: "login", "subscribe", "cmd", "event"."""

    def _expired(self) -> bool:
        return time.monotonic() > self._deadline

    def _log(self, level: str, message: str) -> None:
        self.log.log(LEVELS[level], "%s", message)

    def call(self, hook: str, req: dict[str, Any], deadline: float) -> Any:
        """The JSON answer of the script's function `hook` to `req`, or `CONTINUE` when the
        script has no such function; raises `LuaFailure`."""
        if time.monotonic() >= deadline:  # its turn came too late
            raise LuaFailure("late", "its time was up before its turn")
        self._deadline = deadline
        started = time.perf_counter()
        try:
            status, detail = self._call(hook, self._to_lua(req))
        except lua54.LuaMemoryError as error:  # out of memory outside the script itself
            raise LuaFailure("memory", str(error)) from None
        except lua54.LuaError as error:
            raise LuaFailure("error", str(error)) from None
        finally:
            self._deadline = 0.0
            self.seconds += time.perf_counter() - started
        if status == "ok":
            return orjson.loads(detail)
        if status == "missing":
            return CONTINUE
        raise LuaFailure(str(status), str(detail))

    def _to_lua(self, value: Any) -> Any:
        """JSON data as Lua data: objects and arrays as tables (arrays marked, so that an
        empty one goes back as `[]`), null as nil in an object and as `null` in an array."""
        kind = type(value)
        if kind is dict:
            return self._runtime.table_from(
                {key: self._to_lua(item) for key, item in value.items() if item is not None})
        if kind is list:
            return self._array(self._runtime.table_from(
                [self._null if item is None else self._to_lua(item) for item in value]))
        if kind is int and not INT64_MIN <= value <= INT64_MAX:  # orjson reads up to 2**64-1
            return float(value)
        return value


def script_traceback(text: str) -> str:
    """A Lua traceback without the frames of the trusted code around the script."""
    return "\n".join(line for line in text.splitlines()
                     if "nkservice.lua:" not in line and line != "\t[C]: in function 'xpcall'")


def _load_error(status: str, detail: str) -> str:
    if status == "timeout":
        return "the script did not finish within lua_timeout"
    if status == "memory":
        return "the script needs more than lua_memory"
    message = detail.split("\nstack traceback:", 1)[0]
    match = WHERE_LINE.match(message)
    if match is None:
        return message
    return f"line {match[2]}: {match[3]}"


class _Worker:
    """The thread of one Lua state: runs its calls one at a time, in the order asked.

    A daemon thread: a call stuck in a C function must not keep the process from exiting.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._jobs: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit(self, work: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._jobs.put((loop, future, work, args))
        if self._thread is None:
            self._thread = threading.Thread(target=_serve, args=(self._jobs,),
                                            name=self._name, daemon=True)
            self._thread.start()
        return future

    def stop(self) -> None:
        self._jobs.put(None)


def _serve(jobs: queue.SimpleQueue[tuple[Any, ...] | None]) -> None:
    while (job := jobs.get()) is not None:
        loop, future, work, args = job
        if future.cancelled():  # its waiter gave up (a benign race: it runs, for nothing)
            continue
        settle: Callable[[asyncio.Future[Any], Any], None]
        try:
            outcome, settle = work(*args), _succeed
        except BaseException as error:
            outcome, settle = error, _fail
        del job, args  # no reference to the request outlives its call
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            loop.call_soon_threadsafe(settle, future, outcome)


def _succeed(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _fail(future: asyncio.Future[Any], error: Any) -> None:
    if not future.done():
        future.set_exception(error)


@dataclass(slots=True)
class Asked:
    """A call on its way: its hook, its answer to come, and the timer that gives up on it."""

    hook: str
    future: asyncio.Future[Any]
    watchdog: asyncio.TimerHandle


def _give_up(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(LuaFailure("stuck", "not stopped by its deadline"))


class InvalidAnswer(Exception):
    """The script answered something that is not an answer to that hook."""


class LuaLogic(Link):
    """A service's Lua script in its logic chain: below its Python plugins, above the
    callbacks to external apps (§3 step 3)."""

    core_requests = False  # `cmd(req)` sees the requests of the service's own classes

    def __init__(self, source: str, *, name: str, timeout: float, memory: int,
                 where: str | None = None) -> None:
        """Load and run the script (`where` names it in errors: by default
        `services.<name>.script`); a script that does not load raises `ConfigError`."""
        where = where or f"services.{name}.script"
        if not timeout > 0:
            raise ConfigError(f"services.{name}.lua_timeout", "must be more than 0")
        if memory <= 0:
            raise ConfigError(f"services.{name}.lua_memory", "must be more than 0")
        self.name = name
        self.timeout = timeout
        self.log = logging.getLogger(f"nkservice.lua.{name}")
        self._state = LuaState(source, where=where, timeout=timeout, memory=memory,
                               log=self.log)
        self.defined = self._state.defined
        self._worker = _Worker(f"nkservice-lua-{name}")
        self._finalizer = weakref.finalize(self, self._worker.stop)

    @property
    def seconds(self) -> float:
        """Time spent in the script's calls so far (for /metrics)."""
        return self._state.seconds

    def stop(self) -> None:
        """The service stopped: end the script's thread (every hook passes from now on)."""
        self.close()

    def close(self) -> None:
        """End the state's thread once the calls already asked are done; from then on every
        hook passes. Idempotent."""
        self.defined = frozenset()
        self._finalizer()

    # -- the hooks: each asks its Lua function at once, and returns the awaitable answer ---

    def login(self, attempt: LoginAttempt) -> Any:
        if "login" not in self.defined:
            return CONTINUE
        return self._login(self._ask("login", login_data(attempt)))

    def subscribe(self, caller: Caller, topic: Topic) -> Any:
        if "subscribe" not in self.defined:
            return CONTINUE
        return self._subscribe(self._ask("subscribe", {
            **caller_data(caller), "subscription": subscription_data(topic)}))

    def command(self, caller: Caller, request: Request) -> Any:
        if "cmd" not in self.defined or request.class_ == "core":
            return CONTINUE
        # As the `cmd` callback's data, with the request's fields at the top level (§8).
        return self._command(self._ask("cmd", {**caller_data(caller),
                                               **request_data(request)}))

    def client_event(self, caller: Caller, request: Request) -> Any:
        if "event" not in self.defined:
            return CONTINUE
        return self._event(self._ask("event", {**caller_data(caller),
                                               "event": event_data(request)}))

    async def _login(self, asked: Asked) -> LoginDecision | Continue:
        answer = await self._answer(asked)
        try:
            return login_decision(answer)
        except InvalidAnswer as error:
            raise self._invalid(asked.hook, answer, error) from None

    async def _subscribe(self, asked: Asked) -> Continue | None:
        answer = await self._answer(asked)
        try:
            decision = authorization(answer)
        except InvalidAnswer as error:
            raise self._invalid(asked.hook, answer, error) from None
        if decision is None:
            return CONTINUE
        if not decision.authorized:
            raise ApiError(ErrorCode.unauthorized, decision.reason)
        return None

    async def _command(self, asked: Asked) -> Any:
        answer = await self._answer(asked)
        try:
            return command_result(answer)
        except InvalidAnswer as error:
            raise self._invalid(asked.hook, answer, error) from None

    async def _event(self, asked: Asked) -> Continue:
        with contextlib.suppress(ApiError):  # already logged; the client had its ok (§5.3)
            await self._answer(asked)
        return CONTINUE  # seen: the links below may want it too

    # -- calling the script ----------------------------------------------------------------

    def _ask(self, hook: str, req: dict[str, Any]) -> Asked:
        """Queue the call now, so that the script sees the calls in the order they came.
        Its deadline counts from now: a call that waits for the ones before it has that
        much less time."""
        deadline = time.monotonic() + self.timeout
        future = self._worker.submit(self._state.call, hook, req, deadline)
        watchdog = future.get_loop().call_later(self.timeout + GRACE, _give_up, future)
        return Asked(hook, future, watchdog)

    async def _answer(self, asked: Asked) -> Any:
        """The script's JSON answer, or CONTINUE; a failure is logged and raised as
        `internal_error`."""
        try:
            return await asked.future
        except LuaFailure as failure:
            self._report(asked.hook, failure)
        except Exception:
            self.log.exception("%s(req) failed", asked.hook)
        finally:
            asked.watchdog.cancel()
        raise ApiError(ErrorCode.internal_error)

    def _report(self, hook: str, failure: LuaFailure) -> None:
        if failure.kind == "timeout":
            self.log.error("%s(req) stopped: it ran longer than lua_timeout (%ss)\n%s",
                           hook, self.timeout, script_traceback(failure.message))
        elif failure.kind == "late":
            self.log.error("%s(req) not run: its lua_timeout (%ss) passed while it waited for "
                           "the service's earlier calls", hook, self.timeout)
        elif failure.kind == "memory":
            self.log.error("%s(req) stopped: the script needs more than lua_memory", hook)
        elif failure.kind == "stuck":
            self.log.error("%s(req) was not stopped %ss after lua_timeout (stuck in a library "
                           "call?): the service's later calls wait for it", hook, GRACE)
        else:
            self.log.error("%s(req) failed: %s", hook, script_traceback(failure.message))

    def _invalid(self, hook: str, answer: Any, error: InvalidAnswer) -> ApiError:
        self.log.error("%s(req) returned an invalid answer (%s): %r", hook, error, answer)
        return ApiError(ErrorCode.internal_error)


# -- what the script's answers mean ----------------------------------------------------------

def authorization(answer: Any) -> LoginDecision | None:
    """A `login` or `subscribe` answer: None to pass, else authorized or not (a boolean or a
    table {authorized, reason, ...}); raises `InvalidAnswer`."""
    if answer is CONTINUE or answer is None:
        return None
    if type(answer) is bool:
        return LoginDecision(answer)
    if type(answer) is not dict:
        raise InvalidAnswer("not nil, a boolean or a table")
    authorized = answer.get("authorized")
    if type(authorized) is str and authorized in ("true", "false"):
        authorized = authorized == "true"
    if type(authorized) is not bool:  # 1 == True in Python, but not an answer
        raise InvalidAnswer("authorized is not true, false, \"true\" or \"false\"")
    reason = answer.get("reason")
    if reason is not None and type(reason) is not str:
        raise InvalidAnswer("reason is not a string")
    return LoginDecision(authorized, reason=reason or None)


def login_decision(answer: Any) -> LoginDecision | Continue:
    decision = authorization(answer)
    if decision is None:
        return CONTINUE
    if not decision.authorized or type(answer) is not dict:
        return decision
    user, session_id, data = answer.get("user"), answer.get("session_id"), answer.get("data")
    if user is not None and not (type(user) is str and user):
        raise InvalidAnswer("user is not a non-empty string")
    if session_id is not None and not (
            type(session_id) is str and 0 < len(session_id) <= MAX_SESSION_ID_LENGTH):
        raise InvalidAnswer(f"session_id is not a string of 1 to {MAX_SESSION_ID_LENGTH} "
                            "characters")
    if data is not None and type(data) is not dict:
        raise InvalidAnswer("data is not a table with names")
    decision.user = user
    decision.session_id = session_id
    decision.meta = answer.get("meta")
    decision.data = data or {}
    return decision


def command_result(answer: Any) -> Any:
    """A `cmd` answer: CONTINUE to pass, the ok data, or raises its `ApiError` (an unknown
    code is kept as is); raises `InvalidAnswer`."""
    if answer is CONTINUE or answer is None:
        return CONTINUE
    if type(answer) is not dict:
        raise InvalidAnswer("not nil or a table")
    result = answer.get("result")
    if result == "ok":
        return answer.get("data")
    if result != "error":
        raise InvalidAnswer("result is not \"ok\" or \"error\"")
    code, text = answer.get("code", ErrorCode.internal_error.code), answer.get("error")
    if type(code) is str and code in ErrorCode.__members__:
        code = ErrorCode[code].code
    elif type(code) is float and code.is_integer():
        code = int(code)
    if type(code) is not int:
        raise InvalidAnswer("code is not an error code (a number, or a name of one)")
    if text is not None and type(text) is not str:
        raise InvalidAnswer("error is not a string")
    raise ApiError.from_wire({"code": code, "error": text})
