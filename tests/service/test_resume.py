"""What a session moving between processes is given: the old process's events, then the
new one's less those the old one had (`service/resume.py`)."""

from __future__ import annotations

from nkservice.events.bus import HeldEvent
from nkservice.service.resume import kept_then_new


def held(*events: tuple[str, int] | str) -> list[HeldEvent]:
    """("p", 3) → an event numbered 3 by publisher p; "x" → one without an id."""
    return [(None, event.encode()) if isinstance(event, str)
            else (event, f"{event[0]}{event[1]}".encode()) for event in events]


def test_the_copies_the_old_process_had_are_left_out() -> None:
    kept = held("old", ("a", 1), ("b", 7), ("a", 2), ("b", 8))
    new = held(("b", 8), ("a", 2), ("a", 3), ("b", 9), ("c", 1))
    assert kept_then_new(kept, new) == [b"old", b"a1", b"b7", b"a2", b"b8", b"a3", b"b9",
                                        b"c1"]


def test_events_without_an_id_are_all_kept() -> None:
    assert kept_then_new(held("x", ("a", 5)), held("y", ("a", 5), ("a", 6))) == [
        b"x", b"a5", b"y", b"a6"]


def test_nothing_kept_leaves_everything_new() -> None:
    assert kept_then_new([], held(("a", 1), ("a", 2))) == [b"a1", b"a2"]
