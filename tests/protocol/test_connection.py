"""The connection state machine with a fake clock and a recording wire: no sockets."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nkservice.errors import ApiError, ErrorCode
from nkservice.protocol.connection import Connection, Goodbye, Limits
from nkservice.protocol.messages import Request, Response


class FakeWire:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.closed_because: str | None = None
        self.close_code: int | None = None
        self.wake: float | None = None

    def send(self, data: bytes) -> None:
        self.sent.append(json.loads(data))

    def close(self, goodbye: Goodbye) -> None:
        self.closed_because = goodbye.reason
        self.close_code = goodbye.code

    def wake_at(self, when: float) -> None:
        self.wake = when

    def backlog(self) -> int:
        return self.unsent

    unsent = 0

    def take(self) -> list[dict[str, Any]]:
        sent, self.sent = self.sent, []
        return sent


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Handler:
    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.closed = False

    def on_request(self, request: Request) -> None:
        self.requests.append(request)

    def on_closed(self) -> None:
        self.closed = True


class RecordingWaiter:
    def __init__(self) -> None:
        self.events: list[Any] = []

    def answered(self, response: Response) -> None:
        self.events.append(("answered", response.ok, response.data))

    def acked(self) -> None:
        self.events.append("acked")

    def failed(self, error: ApiError) -> None:
        self.events.append(("failed", error.code))


class Rig:
    def __init__(self, **limits: Any) -> None:
        self.wire = FakeWire()
        self.clock = Clock()
        self.handler = Handler()
        self.conn = Connection(Limits(**limits), self.wire, self.clock, self.handler)

    def feed(self, message: Any) -> None:
        self.conn.receive(message if isinstance(message, bytes) else json.dumps(message).encode())

    def advance_to_wake(self) -> None:
        """Move the clock to the wake-up the connection asked for and fire it."""
        assert self.wire.wake is not None
        self.clock.now = self.wire.wake
        self.wire.wake = None
        self.conn.on_timer()


def test_login_deadline_closes() -> None:
    rig = Rig(login_timeout=30)
    assert rig.wire.wake == 130.0
    rig.advance_to_wake()
    assert rig.wire.closed_because == "login timeout"
    assert rig.handler.closed


def test_login_stops_the_deadline_and_starts_pings() -> None:
    rig = Rig(login_timeout=30, ping_interval=10, request_timeout=5)
    rig.conn.logged_in()
    assert rig.wire.wake == 110.0  # earlier than the login deadline
    rig.advance_to_wake()
    assert rig.wire.take() == [{"class": "core", "cmd": "ping", "tid": 1, "data": {"time": 10}}]
    rig.feed({"result": "ok", "tid": 1})
    # The old login deadline (130) may still wake us; nothing happens then.
    rig.clock.now = 130.0
    rig.conn.on_timer()
    assert rig.wire.closed_because is None
    assert rig.wire.take() == [{"class": "core", "cmd": "ping", "tid": 2, "data": {"time": 10}}]


def test_pings_off_with_interval_zero() -> None:
    rig = Rig(ping_interval=0)
    rig.conn.logged_in()
    rig.clock.now = 10_000
    rig.conn.on_timer()
    assert rig.wire.take() == []
    assert rig.wire.closed_because is None


def test_unanswered_request_closes_and_fails_the_waiter_with_timeout() -> None:
    rig = Rig(request_timeout=5)
    rig.conn.logged_in()
    waiter = RecordingWaiter()
    rig.conn.send_request("app", "do", {"x": 1}, waiter=waiter)
    assert rig.wire.wake == 105.0
    rig.advance_to_wake()
    assert rig.wire.closed_because == "request timeout"
    assert waiter.events == [("failed", ErrorCode.timeout.code)]


def test_ack_extends_the_deadline() -> None:
    rig = Rig(request_timeout=5, ack_timeout=180, ping_interval=0)
    rig.conn.logged_in()
    waiter = RecordingWaiter()
    tid = rig.conn.send_request("app", "do", waiter=waiter)
    rig.clock.now = 104.0
    rig.feed({"ack": tid})
    assert waiter.events == ["acked"]
    rig.advance_to_wake()  # the plain deadline, 105: nothing due any more
    assert rig.wire.closed_because is None
    assert rig.wire.wake == 284.0
    rig.clock.now = 200.0
    rig.feed({"result": "ok", "tid": tid, "data": {"late": True}})
    assert waiter.events == ["acked", ("answered", True, {"late": True})]
    rig.advance_to_wake()
    assert rig.wire.closed_because is None


def test_each_ack_restarts_the_ack_window() -> None:
    rig = Rig(request_timeout=5, ack_timeout=10, ping_interval=0)
    rig.conn.logged_in()
    tid = rig.conn.send_request("app", "do")
    rig.feed({"ack": tid})
    rig.clock.now = 109.0
    rig.feed({"ack": tid})
    rig.clock.now = 118.0
    rig.conn.on_timer()
    assert rig.wire.closed_because is None
    rig.clock.now = 119.0
    rig.conn.on_timer()
    assert rig.wire.closed_because == "request timeout"


def test_error_response_reaches_the_waiter() -> None:
    rig = Rig()
    waiter = RecordingWaiter()
    tid = rig.conn.send_request("app", "do", waiter=waiter)
    rig.feed({"result": "error", "tid": tid, "data": {"code": 7, "error": "no"}})
    assert waiter.events == [("answered", False, {"code": 7, "error": "no"})]


def test_server_tids_count_up_and_client_tids_are_separate() -> None:
    rig = Rig()
    waiter = RecordingWaiter()
    assert rig.conn.send_request("a", "b", waiter=waiter) == 1
    assert rig.conn.send_request("a", "b") == 2
    rig.feed({"class": "core", "cmd": "ping", "tid": 1})  # a client request with tid 1
    assert [r.tid for r in rig.handler.requests] == [1]
    assert waiter.events == []
    rig.feed({"result": "ok", "tid": "1"})  # a string is not the server's integer tid 1
    assert waiter.events == []
    rig.feed({"result": "ok", "tid": 1})
    assert waiter.events == [("answered", True, None)]


def test_stray_answers_are_ignored() -> None:
    rig = Rig()
    rig.feed({"result": "ok", "tid": 55})
    rig.feed({"ack": 56})
    assert rig.wire.take() == []
    assert rig.wire.closed_because is None


def test_replies() -> None:
    rig = Rig()
    rig.conn.reply(1)
    rig.conn.reply("t", {"a": 1})
    rig.conn.reply(2, [])
    rig.conn.reply(3, {})
    rig.conn.reply_error(4, ApiError(ErrorCode.missing_field, "user"))
    rig.conn.ack(5)
    assert rig.wire.take() == [
        {"result": "ok", "tid": 1},
        {"result": "ok", "tid": "t", "data": {"a": 1}},
        {"result": "ok", "tid": 2, "data": []},
        {"result": "ok", "tid": 3},
        {"result": "error", "tid": 4, "data": {"code": 100045, "error": "Missing field: user"}},
        {"ack": 5},
    ]


def test_max_pending_requests() -> None:
    rig = Rig(max_pending_requests=2)
    for tid in (1, 2, 3):
        rig.feed({"class": "app", "cmd": "x", "tid": tid})
    assert [r.tid for r in rig.handler.requests] == [1, 2]
    assert rig.wire.take() == [{"result": "error", "tid": 3, "data": {
        "code": 100078, "error": "Too many requests"}}]
    rig.conn.reply(1)
    rig.feed({"class": "app", "cmd": "x", "tid": 4})
    assert [r.tid for r in rig.handler.requests] == [1, 2, 4]


def test_bad_messages_are_counted_and_the_limit_closes() -> None:
    rig = Rig(max_bad_messages=2)
    rig.feed(b"{")
    rig.feed(b"[]")
    assert rig.wire.closed_because is None
    rig.feed({"class": "a", "cmd": "b", "tid": None})
    assert [m["data"]["code"] for m in rig.wire.take()] == [100072, 100076, 100076]
    assert rig.wire.closed_because == "too many bad messages"
    rig.feed({"class": "core", "cmd": "ping", "tid": 1})  # after the close: nothing
    assert rig.handler.requests == []


def test_message_too_large() -> None:
    rig = Rig(max_message_size=20)
    rig.feed({"class": "core", "cmd": "ping", "tid": 1})
    assert rig.wire.take() == [{"result": "error", "tid": None, "data": {
        "code": 100077, "error": "Message too large"}}]
    assert rig.wire.closed_because == "message too large"


def test_closing_fails_waiters_once_and_tells_the_handler() -> None:
    rig = Rig()
    waiter = RecordingWaiter()
    rig.conn.send_request("a", "b", waiter=waiter)
    rig.conn.lost()
    rig.conn.lost()
    assert waiter.events == [("failed", ErrorCode.session_not_found.code)]
    assert rig.handler.closed
    late = RecordingWaiter()
    rig.conn.send_request("a", "b", waiter=late)
    assert late.events == [("failed", ErrorCode.session_not_found.code)]
    assert rig.wire.take() == [{"class": "a", "cmd": "b", "tid": 1}]


@pytest.mark.parametrize("data", [None, {}, {"a": 1}, [], 0, "", False])
def test_request_data_is_omitted_only_when_empty(data: Any) -> None:
    rig = Rig()
    rig.conn.send_request("a", "b", data, subclass="s")
    sent = rig.wire.take()[0]
    if data is None or data == {}:
        assert "data" not in sent
    else:
        assert sent["data"] == data
    assert sent["subclass"] == "s"


def test_events_are_answered_fast_or_slow_and_acked() -> None:
    rig = Rig(request_timeout=5, ack_timeout=60, ping_interval=0, max_unanswered_events=3)
    rig.conn.logged_in()
    for _ in range(3):
        rig.conn.send_event(b'{"class":"media"}')
    assert [m["tid"] for m in rig.wire.take()] == [1, 2, 3]
    rig.feed(b'{"result":"ok","tid":1}')  # the exact bytes: no JSON parsing
    rig.feed({"result": "error", "tid": 2, "data": {"code": 1, "error": "no handler"}})
    rig.feed({"ack": 3})
    rig.clock.now = 106.0  # past the plain deadline: event 3 was acked
    rig.conn.on_timer()
    assert rig.wire.closed_because is None
    rig.feed(b'{"result": "ok", "tid": 3}')  # spaced: the general path
    rig.feed(b'{"result":"ok","tid":007}')  # not JSON: not taken for tid 7
    assert rig.wire.take()[0]["data"]["code"] == 100072
    for _ in range(3):
        rig.conn.send_event(b'{"class":"media"}')
    assert rig.wire.closed_because is None
    rig.conn.send_event(b'{"class":"media"}')  # a fourth unanswered: too many
    assert rig.wire.closed_because == "too many unanswered events"
    assert rig.wire.close_code == 1008


def test_the_outgoing_queue_bounds_a_slow_consumer_not_unanswered_events() -> None:
    """§5.2: what counts is what could not be handed to the socket yet."""
    rig = Rig(ping_interval=0, max_queue=3, max_queue_bytes=1000)
    rig.conn.logged_in()
    for _ in range(50):  # written at once (no backlog) and never answered: fine
        rig.conn.send_event(b'{"class":"media"}')
    assert rig.wire.closed_because is None
    rig.wire.unsent = 100  # the transport is over its high-water mark from now on
    for _ in range(3):
        rig.conn.send_event(b'{"class":"media"}')
    assert rig.wire.closed_because is None
    rig.wire.unsent = 0  # drained: the queue is empty again
    rig.conn.send_event(b'{"class":"media"}')
    rig.wire.unsent = 100
    for _ in range(3):
        rig.conn.send_event(b'{"class":"media"}')
    assert rig.wire.closed_because is None
    rig.conn.send_event(b'{"class":"media"}')  # a fourth message queued
    assert rig.wire.closed_because == "slow consumer"
    assert rig.wire.close_code == 1008


def test_too_many_queued_bytes_is_a_slow_consumer() -> None:
    rig = Rig(ping_interval=0, max_queue_bytes=1000)
    rig.conn.logged_in()
    rig.wire.unsent = 1001
    rig.conn.send_event(b'{"class":"media"}')
    assert rig.wire.closed_because == "slow consumer"


def test_an_unanswered_event_closes() -> None:
    rig = Rig(request_timeout=5, ping_interval=0)
    rig.conn.logged_in()
    rig.conn.send_event(b'{"class":"media"}')
    rig.advance_to_wake()
    assert rig.wire.closed_because == "request timeout"


def test_a_full_socket_makes_a_slow_consumer() -> None:
    rig = Rig(max_queue_bytes=1000)
    rig.wire.unsent = 1001
    rig.conn.send_event(b'{"class":"media"}')
    assert rig.wire.closed_because == "slow consumer"


message_bytes = st.one_of(
    st.binary(max_size=60),
    st.sampled_from([
        b'{"class":"core","cmd":"ping","tid":1}', b'{"result":"ok","tid":1}',
        b'{"result":"ok","tid":2}', b'{"result":"error","tid":3,"data":{"code":1}}',
        b'{"ack":1}', b'{"ack":"x"}', b"[]", b"{}", b'{"class":1,"cmd":"x","tid":2}',
    ]),
)


@settings(max_examples=200)
@given(st.lists(st.tuples(message_bytes, st.floats(0, 3), st.booleans()), max_size=40))
def test_any_input_and_timing_keeps_the_state_machine_sound(
        steps: list[tuple[bytes, float, bool]]) -> None:
    """Random input, clock jumps and server requests: nothing raises, every request is
    answered or the connection is closed, and a closed connection stays silent."""
    rig = Rig(request_timeout=1, ack_timeout=2, ping_interval=0.5, login_timeout=5,
              max_bad_messages=5, max_pending_requests=3, max_queue=4)
    rig.conn.logged_in()
    for raw, elapsed, send_event in steps:
        rig.feed(raw)
        for request in rig.handler.requests:
            rig.conn.reply(request.tid)
        rig.handler.requests.clear()
        if send_event:
            rig.conn.send_event(b'{"class":"x"}')
        rig.clock.now += elapsed
        if rig.wire.wake is not None and rig.wire.wake <= rig.clock.now:
            rig.wire.wake = None
            rig.conn.on_timer()
        if rig.conn.closed:
            rig.wire.take()
            rig.feed(b'{"class":"core","cmd":"ping","tid":9}')
            assert rig.wire.take() == [] and rig.handler.requests == []
            return
    assert rig.wire.closed_because is None


def test_answers_count_in_the_outgoing_queue() -> None:
    """A client that sends requests and never reads is a slow consumer too."""
    rig = Rig(ping_interval=0, max_queue=3)
    rig.wire.unsent = 100
    for tid in range(4):
        rig.conn.reply(tid)
    assert rig.wire.closed_because == "slow consumer"


def test_a_queue_seen_draining_starts_counting_again() -> None:
    rig = Rig(ping_interval=0, max_queue=3)
    rig.conn.logged_in()
    for unsent in (5000, 6000, 7000, 4000, 5000, 6000):  # it drained once, after the third
        rig.wire.unsent = unsent
        rig.conn.send_event(b'{"class":"media"}')
    assert rig.wire.closed_because is None
    rig.wire.unsent = 7000
    rig.conn.send_event(b'{"class":"media"}')  # four since it last drained
    assert rig.wire.closed_because == "slow consumer"
