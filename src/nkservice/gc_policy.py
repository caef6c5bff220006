"""The garbage collector's policy in a serving process (a node of one process, or a worker).

CPython's cyclic collector walks every object of the generations it collects. A full
collection (generation 2) walks every long-lived object: on a worker holding 12,500 idle
sessions that is some 400,000 objects and 200 ms or more of CPU, and on a busy box that
becomes a second or more in which the worker answers nobody. In 3.11 a full collection
comes once ten generation-1 collections have passed and the objects that reached
generation 2 since the last full one are a quarter of the long-lived ones: while sessions
keep arriving, full collections keep coming, each longer than the one before.

What this module does, once the process serves (`apply_gc_policy`):

- **Freeze what start-up made.** A full collection, then `gc.freeze()`: the modules,
  the configuration, the services move to the permanent generation, which no collection
  walks.
- **Freeze what survives a collection of generation 1** (a `gc.callbacks` hook, on
  collections of generation 1 and 2): an object that lived through one is frozen with the
  rest. Generation 2 then stays empty, and a full collection walks no more than a young
  one does (a few thousand objects), however many sessions the process holds. Freezing
  only after full collections was tried first: each one still walked what had arrived
  since the last (some 70,000 objects while 12,500 sessions log in: 130-480 ms of a busy
  box's wall time). Garbage cycles that die young (before a collection of generation 1,
  some 7,000 allocations) are collected as before.
- **A leak guard.** A frozen object that later ends up in a garbage cycle is never freed
  while frozen. Objects that end normally are freed at once (reference counting ignores
  freezing); a finished session is to leave no cycle (tests/transport/test_cycles.py), and
  logins and resumes across processes leave none. For whatever does, an **audit** now and
  then: `gc.unfreeze()`, a full collection of everything, `gc.freeze()` again. It costs
  one walk of the whole process, so it is rare: every `AUDIT_INTERVAL` seconds (each
  process a little apart from the others, so that a node's workers do not all pause at
  once), and sooner, but not within `AUDIT_SPACING` of the last one, when the memory
  blocks in use (`sys.getallocatedblocks()`) have grown `AUDIT_GROWTH` times over since
  the last audit (start-up counts as one) and by `AUDIT_FLOOR` blocks at least (a worker
  starts with some 35,000 objects and 12,500 sessions add some 300,000: that is no leak).
  What leaks in cycles is then bounded: freed within an interval, and never more than a
  few times what the process holds. Each audit logs what it walked, freed and took (an
  audit of 400,000 objects: some 200 ms).
- **The young collected when nothing else collects them.** The collector counts its
  youngest generation down whenever a tracked object is freed: while thousands of frozen
  objects are freed (every session of a worker dropped at once), new objects pile up
  uncollected, and one collection then walks them all (up to 100 ms of CPU). A look every
  `CHECK_EVERY` seconds collects the young generations if no collection came since the
  last look.

The thresholds of the collector are left as they are. Nothing here calls
`gc.get_freeze_count()` but start-up and the audits: it walks every frozen object (20 ms
for 800,000 of them; called on every look, it took a worker's CPU in a reconnect storm).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import sys
import time
from typing import Any

log = logging.getLogger(__name__)

AUDIT_INTERVAL = 600.0  # seconds between two audits, at most (± AUDIT_JITTER)
AUDIT_JITTER = 0.1  # each process's interval is AUDIT_INTERVAL * (1 ± this), at random
AUDIT_GROWTH = 8.0  # an audit once the memory blocks are this many times the last audit's
AUDIT_FLOOR = 2_000_000  # ... and at least this many more (a small start grows that much)
AUDIT_SPACING = 60.0  # seconds between two audits, at least
CHECK_EVERY = 0.25  # seconds between two looks (each costs some 50 µs)
FREEZE_FROM = 1  # a collection of this generation or an older one freezes its survivors

_active: GcPolicy | None = None


class GcPolicy:
    """The policy of one process (see the module's docstring). `start()` applies it,
    `stop()` takes it back (tests). Growth is read from the memory blocks in use
    (`sys.getallocatedblocks()`, some 50 µs), a held-back young generation from the
    collector's own counts of collections (`gc.get_stats()`, 2 µs)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, *,
                 interval: float = AUDIT_INTERVAL, growth: float = AUDIT_GROWTH,
                 floor: int = AUDIT_FLOOR, spacing: float = AUDIT_SPACING,
                 check_every: float = CHECK_EVERY, jitter: float = AUDIT_JITTER,
                 freeze_from: int = FREEZE_FROM) -> None:
        self._loop = loop
        self.interval = interval * (1.0 + random.uniform(-jitter, jitter))
        self.growth = growth
        self.floor = floor
        self.freeze_from = freeze_from
        self.spacing = spacing
        self.check_every = check_every
        self._check: asyncio.TimerHandle | None = None
        self._auditing = False
        self.running = False
        self.freezes = 0  # collections followed by a freeze
        self.young_collections = 0  # made here: none had come since the last look
        self._collections = 0  # the collector's, at the last look
        self.audits = 0
        self.audit_blocks = 0  # memory blocks in use right after the last audit (or start)
        self.last_audit = 0.0  # time.monotonic() of the last audit (or start-up)
        self.last_report: dict[str, Any] = {}

    def start(self) -> None:
        """Freeze what start-up made, hook the collector, start the looks."""
        if self.running:
            return
        self.running = True
        report = self._collect_and_freeze()
        gc.callbacks.append(self._after_collection)
        self._schedule()
        log.info("garbage collector: %d objects frozen after start-up (%d freed, %.0f ms); "
                 "survivors frozen after each collection of generation %d or older, audited "
                 "every %.0f s or on %gx growth", report["frozen"], report["freed"],
                 report["ms"], self.freeze_from, self.interval, self.growth)

    def stop(self) -> None:
        """Unhook and unfreeze: the collector as it was."""
        if not self.running:
            return
        self.running = False
        if self._after_collection in gc.callbacks:
            gc.callbacks.remove(self._after_collection)
        if self._check is not None:
            self._check.cancel()
            self._check = None
        gc.unfreeze()

    def audit(self) -> dict[str, Any]:
        """Unfreeze, collect everything, freeze again: cycles among frozen objects freed."""
        report = self._collect_and_freeze()
        self.audits += 1
        log.info("garbage collector audit: %d objects walked, %d freed, %d frozen, %.0f ms",
                 report["walked"], report["freed"], report["frozen"], report["ms"])
        return report

    def _collect_and_freeze(self) -> dict[str, Any]:
        self._auditing = True
        started = time.perf_counter()
        try:
            walked = gc.get_freeze_count()  # and the few young objects of the moment
            gc.unfreeze()
            freed = gc.collect()
            gc.freeze()
            frozen = gc.get_freeze_count()
        finally:
            self._auditing = False
        self.audit_blocks = sys.getallocatedblocks()
        self.last_audit = time.monotonic()
        self.last_report = {"walked": walked, "freed": freed, "frozen": frozen,
                            "ms": 1000 * (time.perf_counter() - started)}
        return self.last_report

    def _after_collection(self, phase: str, info: dict[str, Any]) -> None:
        # Called by the collector itself: nothing here but the freeze (no loop calls, no
        # logging: the collection may have started anywhere), which costs nothing (lists
        # joined). The younger generations are empty at this point: what is frozen is
        # what survived this collection.
        if phase == "stop" and info["generation"] >= self.freeze_from and not self._auditing:
            gc.freeze()
            self.freezes += 1

    def due(self, now: float | None = None) -> bool:
        """Is an audit due (the interval passed, or the memory in use grew enough)?"""
        since = (time.monotonic() if now is None else now) - self.last_audit
        if since >= self.interval:
            return True
        if since < self.spacing:
            return False
        blocks = sys.getallocatedblocks()
        return blocks > self.growth * self.audit_blocks and blocks - self.audit_blocks > self.floor

    def _schedule(self) -> None:
        self._check = self._loop.call_later(self.check_every, self._tick)

    def _tick(self) -> None:
        self._check = None
        if not self.running:
            return
        try:
            self._collect_young_if_held_back()
            if self.due():
                self.audit()
        finally:
            self._schedule()

    def _collect_young_if_held_back(self) -> None:
        """The collector counts its youngest generation down each time a tracked object is
        freed, old or young. While thousands of frozen objects are freed (a worker's
        12,500 sessions dropped at once), new objects pile up in the youngest generation
        uncollected, and the collection that comes at last walks them all at once (some
        100,000 objects, up to 100 ms of CPU in a reconnect storm). So if no collection
        came since the last look, the young generations are collected now (survivors
        frozen): in a process that is not held back, that is a handful of objects."""
        collections = sum(stats["collections"] for stats in gc.get_stats())
        if collections == self._collections:
            gc.collect(1)
            self.young_collections += 1
            collections += 1
        self._collections = collections


def apply_gc_policy(**options: Any) -> GcPolicy:
    """Apply the policy to this process, once it serves (on its running loop); a second
    call returns the policy already applied. `options`: GcPolicy's, for tests."""
    global _active
    if _active is None or not _active.running:
        _active = GcPolicy(asyncio.get_running_loop(), **options)
        _active.start()
    return _active


def active_policy() -> GcPolicy | None:
    return _active if _active is not None and _active.running else None
