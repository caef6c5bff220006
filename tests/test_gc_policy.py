"""The garbage collector's policy of a serving process (src/nkservice/gc_policy.py): what is
frozen and when, the audits that free cycles among frozen objects, and a soak of sessions
opened and closed on a node under the policy (the tracked objects come back to where they
were)."""

from __future__ import annotations

import asyncio
import gc
import ssl
import weakref
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from nkservice.gc_policy import GcPolicy, active_policy, apply_gc_policy
from tests.conftest import NodeFactory, url_of
from tests.transport.blocking import sessions

# No audit on its own during a test.
QUIET: dict[str, Any] = {"interval": 3600.0, "check_every": 3600.0, "jitter": 0.0}


class Node:
    """Something the collector tracks, that can be in a cycle and be watched dying."""

    def __init__(self) -> None:
        self.other: Node | None = None


def tracked() -> int:
    """Every object the collector tracks, frozen or not."""
    return len(gc.get_objects()) + gc.get_freeze_count()


@pytest.fixture
async def policy() -> AsyncIterator[GcPolicy]:
    applied = apply_gc_policy(**QUIET)
    try:
        yield applied
    finally:
        applied.stop()


@pytest.fixture(autouse=True)
def collector_restored() -> Iterator[None]:
    yield
    gc.unfreeze()
    gc.enable()


async def test_start_freezes_what_is_there_and_stop_takes_it_back() -> None:
    applied = GcPolicy(asyncio.get_running_loop(), **QUIET)
    applied.start()
    try:
        assert gc.get_freeze_count() > 1000  # the modules, pytest, ...
        assert applied.last_report["frozen"] == gc.get_freeze_count()
        assert applied._after_collection in gc.callbacks
    finally:
        applied.stop()
    assert gc.get_freeze_count() == 0
    assert applied._after_collection not in gc.callbacks


async def test_a_full_collection_freezes_what_survived_it(policy: GcPolicy) -> None:
    before = gc.get_freeze_count()
    kept = [Node() for _ in range(5000)]
    freezes = policy.freezes
    gc.collect()
    assert policy.freezes == freezes + 1
    assert gc.get_freeze_count() >= before + len(kept)
    assert not any(obj is kept[0] for obj in gc.get_objects())  # not walked any more


async def test_a_collection_of_generation_1_freezes_too(policy: GcPolicy) -> None:
    kept = Node()
    freezes = policy.freezes
    gc.collect(0)  # the youngest: nothing frozen
    assert policy.freezes == freezes
    assert any(obj is kept for obj in gc.get_objects())
    gc.collect(1)
    assert policy.freezes == freezes + 1
    assert not any(obj is kept for obj in gc.get_objects())


async def test_young_cycles_are_still_collected(policy: GcPolicy) -> None:
    first, second = Node(), Node()
    first.other, second.other = second, first
    watch = weakref.ref(first)
    del first, second
    gc.collect(1)  # found before anything is frozen
    assert watch() is None


async def test_a_cycle_of_frozen_objects_waits_for_an_audit(policy: GcPolicy) -> None:
    first, second = Node(), Node()
    first.other, second.other = second, first
    watch = weakref.ref(first)
    gc.collect()  # both frozen, alive
    del first, second  # now garbage, but frozen: no collection looks at them
    gc.collect()
    assert watch() is not None
    report = policy.audit()
    assert watch() is None
    assert report["freed"] >= 2
    assert policy.audits == 1
    assert report["frozen"] == gc.get_freeze_count()


async def test_an_audit_is_due_after_the_interval_or_on_growth(policy: GcPolicy) -> None:
    assert not policy.due()
    assert policy.due(policy.last_audit + policy.interval)
    policy.spacing, policy.growth, policy.floor = 0.0, 1.5, 100
    kept = [Node() for _ in range(policy.audit_blocks)]  # twice as many memory blocks
    gc.collect()
    assert policy.due()
    policy.spacing = 3600.0  # but never twice within `spacing`
    assert not policy.due()
    del kept


async def test_the_young_are_collected_when_frees_hold_the_collector_back(
        policy: GcPolicy) -> None:
    """Frees of frozen objects count the youngest generation down: new objects pile up
    there uncollected; a look that sees no collection since the last one collects them."""
    old = [Node() for _ in range(30_000)]
    gc.collect()  # frozen
    policy._tick()  # a look
    young_collections = policy.young_collections
    young = []
    for _ in range(3000):  # ten frozen objects freed for each new one
        del old[-10:]
        young.append(Node())
    assert len(gc.get_objects(0)) >= len(young)  # piled up: no collection came
    policy._tick()
    assert policy.young_collections == young_collections + 1
    assert len(gc.get_objects(0)) < 100
    assert not any(obj is young[0] for obj in gc.get_objects())  # collected, then frozen


async def test_no_extra_collection_when_the_collector_runs_on_its_own(
        policy: GcPolicy) -> None:
    policy._tick()
    young_collections = policy.young_collections
    gc.collect(0)  # as the collector does when objects are made
    policy._tick()
    assert policy.young_collections == young_collections


async def test_the_checks_run_the_audit_when_due() -> None:
    applied = GcPolicy(asyncio.get_running_loop(), interval=0.05, check_every=0.02,
                       jitter=0.0, spacing=0.0)
    applied.start()
    try:
        async with asyncio.timeout(5):
            while applied.audits < 2:  # noqa: ASYNC110 (time is what is tested)
                await asyncio.sleep(0.02)
    finally:
        applied.stop()


async def test_apply_applies_once() -> None:
    applied = apply_gc_policy(**QUIET)
    try:
        assert active_policy() is applied
        assert apply_gc_policy() is applied
    finally:
        applied.stop()
    assert active_policy() is None


# -- a soak: sessions opened and closed under the policy -------------------------------------

ROUNDS = 4
PER_ROUND = 40  # sessions, half on tcp, half on ws
SLACK = 60  # tracked objects a round may leave (the loop's own, logging, ...)


async def _soak(make_node: NodeFactory, client_tls: ssl.SSLContext, rounds: int = ROUNDS,
                audit_after: int = 0) -> list[int]:
    """Rounds of sessions on a node: opened and logged in, a full collection while they
    live (their objects frozen), then all closed. The tracked objects after each round
    (after an audit, for the first `audit_after` rounds)."""
    node = await make_node(demo={})
    service = node.services["demo"]
    urls = [url_of(node, "demo", transport) for transport in ("tcp", "ws")]
    policy = active_policy()
    counts = []
    for number in range(rounds):
        held = []
        for url in urls:
            held += await asyncio.to_thread(sessions, url, PER_ROUND // len(urls), "hold",
                                            user="alice", password="pw1",
                                            context=client_tls)
        gc.collect()  # a full collection now: the live sessions are frozen
        assert gc.get_freeze_count() > 0
        for client in held:
            client.close()
        del held
        async with asyncio.timeout(10):
            while service.connections:  # noqa: ASYNC110 (no event to await)
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        if number < audit_after:
            assert policy is not None
            policy.audit()
        gc.collect(1)  # young garbage only: frozen objects stay as they are
        counts.append(tracked())
    return counts


async def test_soak_sessions_leave_nothing_frozen(
        policy: GcPolicy, make_node: NodeFactory, client_tls: ssl.SSLContext) -> None:
    """Sessions that end are freed even when frozen: the count comes back, no audit."""
    counts = await _soak(make_node, client_tls)
    assert policy.audits == 0
    assert counts[-1] - counts[0] <= SLACK, counts


async def test_soak_the_audit_brings_the_count_back(
        policy: GcPolicy, make_node: NodeFactory, client_tls: ssl.SSLContext) -> None:
    """Whatever sessions leave in cycles among frozen objects, an audit frees: after it,
    the count is where it was after the first round (and its audit)."""
    counts = await _soak(make_node, client_tls, audit_after=1)
    policy.audit()
    gc.collect(1)
    assert tracked() - counts[0] <= SLACK, (counts, tracked())
