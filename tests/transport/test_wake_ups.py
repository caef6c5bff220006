"""`WakeUps`: the wake-ups of all the connections of a loop, on one loop timer."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from nkservice.transport import base
from nkservice.transport.base import WakeUps


async def until(check: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while not check():  # noqa: ASYNC110 (no event to await)
            await asyncio.sleep(0.005)


class Sleeper:
    def __init__(self, log: list[tuple[str, float]], name: str,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.log, self.name, self.loop = log, name, loop
        self.then: tuple[WakeUps, int, float] | None = None  # a next wake-up to ask for

    def on_timer(self) -> None:
        self.log.append((self.name, self.loop.time()))
        if self.then is not None:
            wake_ups, key, when = self.then
            self.then = None
            wake_ups.wake_at(key, self, when)


async def test_one_per_loop_with_one_clock() -> None:
    loop = asyncio.get_running_loop()
    wake_ups = WakeUps.of(loop)
    assert WakeUps.of(loop) is wake_ups
    assert wake_ups.clock is wake_ups.clock  # one bound method for every connection
    assert wake_ups.new_key() != wake_ups.new_key()


async def test_each_is_woken_at_its_time_in_order() -> None:
    loop = asyncio.get_running_loop()
    wake_ups, log = WakeUps(loop), list[tuple[str, float]]()
    now = loop.time()
    for name, delay in (("c", 0.06), ("a", 0.02), ("b", 0.04)):
        wake_ups.wake_at(wake_ups.new_key(), Sleeper(log, name, loop), now + delay)
    await until(lambda: len(log) == 3)
    assert [name for name, _ in log] == ["a", "b", "c"]
    for (_, at), delay in zip(log, (0.02, 0.04, 0.06), strict=True):
        assert at >= now + delay - 0.001  # never early (the loop's clock has 1 ms steps)
    assert wake_ups.pending() == 0


async def test_a_new_time_replaces_the_old_one_and_cancel_drops_it() -> None:
    loop = asyncio.get_running_loop()
    wake_ups, log = WakeUps(loop), list[tuple[str, float]]()
    moved, dropped = Sleeper(log, "moved", loop), Sleeper(log, "dropped", loop)
    now = loop.time()
    key, other = wake_ups.new_key(), wake_ups.new_key()
    wake_ups.wake_at(key, moved, now + 0.01)
    wake_ups.wake_at(key, moved, now + 0.1)  # later: the first time is forgotten
    wake_ups.wake_at(other, dropped, now + 0.02)
    wake_ups.cancel(other)
    await until(lambda: bool(log))
    await asyncio.sleep(0.05)
    assert [name for name, _ in log] == ["moved"]
    assert log[0][1] >= now + 0.1 - 0.001
    assert wake_ups.pending() == 0 and not wake_ups._heap


async def test_a_woken_connection_may_ask_again_and_a_failure_stops_no_other(
        caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.get_running_loop()
    wake_ups, log = WakeUps(loop), list[tuple[str, float]]()

    class Broken:
        def on_timer(self) -> None:
            raise RuntimeError("bug")

    now = loop.time()
    again = Sleeper(log, "again", loop)
    key = wake_ups.new_key()
    again.then = (wake_ups, key, now + 0.04)
    wake_ups.wake_at(wake_ups.new_key(), Broken(), now + 0.01)
    wake_ups.wake_at(key, again, now + 0.01)
    await until(lambda: len(log) == 2)
    assert [name for name, _ in log] == ["again", "again"]
    assert "a connection's timer failed" in caplog.text


async def test_many_due_at_once_are_woken_over_several_turns(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(base, "WAKE_BATCH", 10)
    loop = asyncio.get_running_loop()
    wake_ups, log = WakeUps(loop), list[tuple[str, float]]()
    after_first_turn: list[int] = []

    class First(Sleeper):
        def on_timer(self) -> None:
            super().on_timer()
            loop.call_soon(lambda: after_first_turn.append(len(log)))

    when = loop.time() + 0.01
    wake_ups.wake_at(wake_ups.new_key(), First(log, "0", loop), when)
    for number in range(1, 35):
        wake_ups.wake_at(wake_ups.new_key(), Sleeper(log, str(number), loop), when)
    await until(lambda: len(log) == 35)
    assert after_first_turn == [10]  # the others came in later turns of the loop
    assert wake_ups.pending() == 0
