"""The node's event stream: every state change, fanned out to whoever listens.

How this works: the daemon calls ``EventBus.publish(type, object, **fields)`` on its event loop
whenever something changes; the bus stamps the event ``{"seq", "time", "type", "object",
**fields}`` and appends it to the queue of every ``Subscription``.  ``type`` is one of drbdsetup
events2's words: ``exists``, ``create``, ``change``, ``destroy``; ``object`` names what changed
(``mirror``, ``job``, ``volume``, ``node``).  ``seq`` counts 1, 2, 3... per bus; ``time`` is UTC,
ISO 8601 with milliseconds and ``Z``.  A subscriber may first get the current state: one
``exists`` event (``seq`` 0) per item of a snapshot (dicts with ``object`` and their fields),
then the marker ``{"type": "exists", "object": "-"}``, then live events.  Snapshot and
subscription happen in one step of the loop, so no change falls between them.

Publishing never waits for a subscriber.  A subscription holds at most ``QUEUE_LIMIT`` pending
events (the initial state counts); the event that does not fit ends it instead.  Its consumer
reads what is queued, then the overflow marker ``{"seq": 0, "time": ..., "type": "change",
"object": "-", "lost_events": true, "first_lost_seq": N}`` (N: the first event it will never
see), then iteration stops; it should reconnect to read the state afresh.  ``EventBus.close()``
ends every subscription the same way, without the marker: call it when the node stops, or
uvicorn waits for the open streams forever.

The bus also keeps its last ``HISTORY`` events: ``recent(after)`` answers those numbered after
``after``, with the bus's ``boot`` (a random id per bus, so per daemon run: a reader that sees
it change knows the numbering started again) -- a GUI that polls reads the event log with
causes from there, and nothing is lost between two of its polls unless more than ``HISTORY``
events happened.

``sse_response`` serves one subscription as Server-Sent Events (``text/event-stream``): per event
``id: <seq>``, ``event: <type>``, ``data: <the event as one line of JSON>`` and a blank line;
a ``: keepalive`` comment after ``KEEPALIVE_S`` of silence.  When the client goes away,
starlette cancels the generator, whose ``finally`` closes the subscription.  Not thread-safe:
publish and subscribe on the loop's thread.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections import deque
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

from starlette.responses import StreamingResponse

Event = dict[str, Any]
Snapshot = Callable[[], list[Event]]

TYPES = frozenset({"exists", "create", "change", "destroy"})
QUEUE_LIMIT = 4096
HISTORY = 512
KEEPALIVE_S = 15.0
_STAMPS = frozenset({"seq", "time"})


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Subscription:
    """One subscriber's events, in order: an async iterator that ends on close or overflow."""

    def __init__(self, bus: EventBus, initial: list[Event]) -> None:
        self._bus = bus
        # None is the end: once queued it stays at the head, so every later read ends too.
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue()
        for event in initial:
            self._queue.put_nowait(event)
        self._ended = False

    def _deliver(self, event: Event) -> None:
        if self._queue.qsize() < QUEUE_LIMIT:
            self._queue.put_nowait(event)
            return
        lost = {"seq": 0, "time": _now(), "type": "change", "object": "-"}
        self._end({**lost, "lost_events": True, "first_lost_seq": event["seq"]})

    def close(self) -> None:
        """Detach from the bus; iteration ends after the events already queued."""
        if not self._ended:
            self._end(None)

    def _end(self, last: Event | None) -> None:
        self._ended = True
        self._bus._detach(self)
        if last is not None:
            self._queue.put_nowait(last)
        self._queue.put_nowait(None)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        event = await self._queue.get()
        if event is None:
            self._queue.put_nowait(None)
            raise StopAsyncIteration
        return event


class EventBus:
    """Numbers, stamps and fans out a node's events; see the module docstring."""

    def __init__(self) -> None:
        self._seq = 0
        self._subscribers: set[Subscription] = set()
        self._closed = False
        self._history: deque[Event] = deque(maxlen=HISTORY)
        self.boot = secrets.token_hex(8)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def publish(self, type: str, object: str, **fields: Any) -> None:
        if type not in TYPES:
            raise ValueError(f"event type {type!r} is not one of {', '.join(sorted(TYPES))}")
        if _STAMPS & fields.keys():
            raise ValueError("an event's seq and time are set by the bus, not by its fields")
        self._seq += 1
        event = {"seq": self._seq, "time": _now(), "type": type, "object": object, **fields}
        self._history.append(event)
        for subscription in tuple(self._subscribers):
            subscription._deliver(event)

    def recent(self, after: int = 0) -> dict[str, Any]:
        """The kept events numbered after ``after``, oldest first, with ``boot`` and ``seq``
        (the last number given out)."""
        events = [event for event in self._history if event["seq"] > after]
        return {"boot": self.boot, "seq": self._seq, "events": events}

    def subscribe(self, snapshot: Snapshot | None = None) -> Subscription:
        """Live events; with a snapshot, first its items as ``exists`` events and ``exists -``."""
        subscription = Subscription(self, [] if snapshot is None else _exists(snapshot))
        if self._closed:
            subscription.close()
        else:
            self._subscribers.add(subscription)
        return subscription

    def _detach(self, subscription: Subscription) -> None:
        self._subscribers.discard(subscription)

    def close(self) -> None:
        """End every subscription (after what it has queued) and refuse new ones."""
        self._closed = True
        for subscription in tuple(self._subscribers):
            subscription.close()


def _exists(snapshot: Snapshot) -> list[Event]:
    time = _now()
    head = {"seq": 0, "time": time, "type": "exists"}
    items = [{**head, "object": item["object"]} | item for item in snapshot()]
    return [*items, {**head, "object": "-"}]


def _sse_frame(event: Event) -> bytes:
    data = json.dumps(event, separators=(",", ":"), default=str)
    return f"id: {event['seq']}\nevent: {event['type']}\ndata: {data}\n\n".encode()


async def _sse_stream(bus: EventBus, snapshot: Snapshot | None) -> AsyncIterator[bytes]:
    # Subscribing here, not in sse_response, ties the subscription to this generator's finally.
    subscription = bus.subscribe(snapshot)
    try:
        while True:
            try:
                async with asyncio.timeout(KEEPALIVE_S):
                    event = await anext(subscription)
            except TimeoutError:
                yield b": keepalive\n\n"
                continue
            except StopAsyncIteration:
                return
            yield _sse_frame(event)
    finally:
        subscription.close()


def sse_response(bus: EventBus, snapshot: Snapshot | None) -> StreamingResponse:
    """The bus as Server-Sent Events; with a snapshot, the current state comes first."""
    return StreamingResponse(
        _sse_stream(bus, snapshot),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache"},
    )
