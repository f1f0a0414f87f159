"""Committed events, fanned out live, and the resumable streams built on them.

A watcher reads the backlog from the store (after the sequence it last saw), then follows the
live events the hub publishes after each commit, and reads the store again whenever none came
for a while (a run scheduled by another replica sharing the database publishes nothing here).
Subscribing before reading the backlog means no event falls between the two; sequence numbers
drop the ones seen twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

import anyio

from plait._models import LogEntry, RunEvent
from plait.engine.store import _runs

if TYPE_CHECKING:
    from plait.engine.store import Store

PAGE = 1000
"""Backlog rows read per query."""
STORE_POLL = 0.5
"""How long a watcher waits for live events before it reads the store: the events of a run
another control-plane replica schedules reach it only that way."""


class Subscription:
    """The events published for one watcher of a run, from when it subscribed, in order.

    A plain asyncio queue: the hub hands over a batch per commit, and receiving it is on the
    per-step path of every watched run (anyio's memory streams add a checkpoint and an Event per
    wait)."""

    __slots__ = ("_queue", "run_events_only")

    def __init__(self, run_events_only: bool) -> None:
        self.run_events_only = run_events_only
        """Only the run's own events (those with no step id) are handed over."""
        self._queue: asyncio.Queue[list[RunEvent]] = asyncio.Queue()

    def put(self, events: list[RunEvent]) -> None:
        self._queue.put_nowait(events)

    async def receive(self) -> list[RunEvent]:
        """The events published since the last call, in order; waits for some."""
        events = await self._queue.get()
        while not self._queue.empty():  # a watcher that fell behind catches up in one batch
            events = events + self._queue.get_nowait()
        return events


class EventHub:
    """Fans committed events out to the watchers of each run."""

    def __init__(self) -> None:
        # run id -> id(subscription) -> the subscription
        self._subs: dict[str, dict[int, Subscription]] = {}

    def subscribe(self, run_id: str, run_events_only: bool = False) -> Subscription:
        """The run's events from now on; pass it to unsubscribe. With ``run_events_only``, a
        batch of step events alone does not wake the watcher (a run of many steps would wake it
        at every commit for nothing)."""
        sub = Subscription(run_events_only)
        self._subs.setdefault(run_id, {})[id(sub)] = sub
        return sub

    def unsubscribe(self, run_id: str, sub: Subscription) -> None:
        subs = self._subs.get(run_id, {})
        subs.pop(id(sub), None)
        if not subs:
            self._subs.pop(run_id, None)

    def publish(self, events: list[RunEvent]) -> None:
        if not self._subs:
            return
        by_run: dict[str, list[RunEvent]] = {}
        for e in events:
            if e.run_id in self._subs:
                by_run.setdefault(e.run_id, []).append(e)
        for run_id, evs in by_run.items():
            run_evs: list[RunEvent] | None = None
            for sub in self._subs[run_id].values():
                if not sub.run_events_only:
                    sub.put(evs)
                    continue
                if run_evs is None:
                    run_evs = [e for e in evs if not e.step_id]
                if run_evs:
                    sub.put(run_evs)


def _ends_run(events: list[RunEvent]) -> bool:
    return any(e.run_status is not None and e.run_status.is_final for e in events)


async def watch_events(
    store: Store,
    hub: EventHub,
    run_id: str,
    after: int,
    run_events_only: bool = False,
    scheduled_here: Callable[[], bool] = lambda: True,
) -> AsyncIterator[list[RunEvent]]:
    """A run's events after sequence ``after``, in batches: the backlog, then live, until the
    run ends. While ``scheduled_here()`` says the run is not this control plane's (another
    replica schedules it, or it ended), the store is read every STORE_POLL seconds."""
    live = hub.subscribe(run_id, run_events_only)
    try:
        last = after
        while True:
            backlog = await store.read(_runs.list_events, run_id, last, PAGE, run_events_only)
            if not backlog:
                break
            last = backlog[-1].sequence
            yield backlog
            if _ends_run(backlog):
                return
        while True:
            # the hub has the events of the runs this control plane schedules; those of a run
            # another replica schedules (or takes over) are read from the store, now and then
            if scheduled_here():
                batch = await live.receive()
            else:
                polled: list[RunEvent] | None = None
                with anyio.move_on_after(STORE_POLL):
                    polled = await live.receive()
                if polled is None:
                    polled = await store.read(
                        _runs.list_events, run_id, last, PAGE, run_events_only
                    )
                batch = polled
            events = [e for e in batch if e.sequence > last and not (run_events_only and e.step_id)]
            if not events:
                continue
            last = events[-1].sequence
            yield events
            if _ends_run(events):
                return
    finally:
        hub.unsubscribe(run_id, live)


async def follow_logs(
    store: Store, hub: EventHub, run_id: str, step_id: str, after: int
) -> AsyncIterator[list[LogEntry]]:
    """A run's (or a step's) captured output after sequence ``after``, in batches, live, until
    the run ends."""
    live = hub.subscribe(run_id)
    try:
        last = after
        while True:
            # read the status first: logs committed before the run ended are then seen
            ended = (await store.read(_runs.run_status, run_id)).is_final
            while True:
                entries = await store.read(_runs.list_logs, run_id, step_id, last, PAGE)
                if not entries:
                    break
                last = entries[-1].sequence
                yield entries
            if ended:
                return
            # woken by the run's events, or after a short while (logs alone publish none)
            with anyio.move_on_after(0.25):
                await live.receive()
    finally:
        hub.unsubscribe(run_id, live)
