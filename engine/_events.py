"""Committed events, fanned out live, and the resumable streams built on them.

A watcher reads the backlog from the store (after the sequence it last saw), then follows the
live events the hub publishes after each commit, and reads the store again whenever none came
for a while (a run scheduled by another replica sharing the database publishes nothing here).
Subscribing before reading the backlog means no event falls between the two; sequence numbers
drop the ones seen twice.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from plait._models import LogEntry, RunEvent
from plait.engine.store import _runs

if TYPE_CHECKING:
    from plait.engine.store import Store

PAGE = 1000
"""Backlog rows read per query."""
STORE_POLL = 0.5
"""How long a watcher waits for live events before it reads the store: the events of a run
another control-plane replica schedules reach it only that way."""


class EventHub:
    """Fans committed events out to the watchers of each run."""

    def __init__(self) -> None:
        # run id -> id(receive stream) -> its send stream
        self._subs: dict[str, dict[int, MemoryObjectSendStream[list[RunEvent]]]] = {}

    def subscribe(self, run_id: str) -> MemoryObjectReceiveStream[list[RunEvent]]:
        """A stream of the run's events, in batches, from now on; pass it to unsubscribe."""
        send, recv = anyio.create_memory_object_stream[list[RunEvent]](math.inf)
        self._subs.setdefault(run_id, {})[id(recv)] = send
        return recv

    def unsubscribe(self, run_id: str, recv: MemoryObjectReceiveStream[list[RunEvent]]) -> None:
        subs = self._subs.get(run_id, {})
        send = subs.pop(id(recv), None)
        if send is not None:
            send.close()
        if not subs:
            self._subs.pop(run_id, None)
        recv.close()

    def publish(self, events: list[RunEvent]) -> None:
        by_run: dict[str, list[RunEvent]] = defaultdict(list)
        for e in events:
            if e.run_id in self._subs:
                by_run[e.run_id].append(e)
        for run_id, evs in by_run.items():
            for send in list(self._subs.get(run_id, {}).values()):
                with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                    send.send_nowait(evs)


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
    live = hub.subscribe(run_id)
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
            batch: list[RunEvent] | None = None
            # the hub has the events of the runs this control plane schedules; those of a run
            # another replica schedules (or takes over) are read from the store, now and then
            with anyio.move_on_after(math.inf if scheduled_here() else STORE_POLL):
                batch = await live.receive()
            if batch is None:
                batch = await store.read(_runs.list_events, run_id, last, PAGE, run_events_only)
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
